"""The language model: any transformers causal LM, TinyGPT-V's extra norms, and LoRA (peft).

TinyGPT-V adds two normalisations inside Phi-2 to keep small-LLM training stable:
- QK LayerNorm: a LayerNorm over each head's query and key. transformers' Phi has it built in
  (`qk_layernorm` in PhiConfig), so it is a config switch.
- post-attention RMSNorm: `h = post_layernorm(attn(ln(x))) + mlp(ln(x)) + x`. Phi has no such
  module, so each decoder layer is rebuilt as a subclass that owns one (`post_layernorm`, the
  original's name), keeping the layer's existing submodules. It is a real module: it saves,
  loads, counts and trains like any other parameter.
"""
from __future__ import annotations

from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.phi.modeling_phi import PhiDecoderLayer

from ..registry import LLMS, ConfigError, Fraction, PathOrHubId, PositiveFloat, PositiveInt
from .vision import DTYPES, Precision


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 and returned in the input's dtype (as LLaMA's), so an fp32
    trainable norm can sit inside an fp16/bf16 frozen LLM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


class PhiDecoderLayerWithPostNorm(PhiDecoderLayer):
    """Phi's parallel attention+MLP block with TinyGPT-V's RMSNorm on the attention output."""

    def __init__(self, config, layer_idx: int, post_norm_eps: float = 1e-6):
        super().__init__(config, layer_idx)
        self.post_layernorm = RMSNorm(config.hidden_size, eps=post_norm_eps)

    @classmethod
    def from_layer(cls, layer: PhiDecoderLayer, config, eps: float) -> "PhiDecoderLayerWithPostNorm":
        """Adopt an existing layer's (possibly pretrained or quantised) submodules as they are."""
        with torch.device("meta"):
            new = cls(config, layer.self_attn.layer_idx, eps)
        for name, child in layer.named_children():
            setattr(new, name, child)
        device = layer.input_layernorm.weight.device
        new.post_layernorm = RMSNorm(config.hidden_size, eps=eps, device=device, dtype=torch.float32)
        return new.train(layer.training)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        attn_outputs, _ = self.self_attn(
            hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache,
            position_embeddings=position_embeddings, **kwargs)
        attn_outputs = self.resid_dropout(self.post_layernorm(attn_outputs))
        feed_forward = self.resid_dropout(self.mlp(hidden_states))
        return attn_outputs + feed_forward + residual


# model_type -> decoder-layer class carrying the post-attention norm. Supporting another LLM
# family is one subclass plus one entry here.
POST_ATTN_NORM_LAYERS: dict[str, type] = {"phi": PhiDecoderLayerWithPostNorm}
# model_type -> name of its config switch for per-head QK LayerNorm.
QK_LAYERNORM_SWITCHES: dict[str, str] = {"phi": "qk_layernorm"}


@LLMS.register("hf_causal_lm")
def hf_causal_lm(pretrained: PathOrHubId | None = None, model_type: str = "phi",
                 config: dict | None = None, qk_layernorm: bool = False, post_attn_norm: bool = False,
                 post_attn_norm_eps: float = 1e-6, dtype: Precision = "fp32",
                 attn_implementation: str = "sdpa", quantization: Literal["int8", "nf4"] | None = None,
                 gradient_checkpointing: bool = False) -> PreTrainedModel:
    """A causal LM from a local folder / hub id (`pretrained`), or randomly initialised from
    `model_type` + `config` overrides when `pretrained` is null."""
    overrides = dict(config or {})
    if qk_layernorm:
        overrides[_qk_switch(model_type)] = True
    if pretrained is None:
        if quantization:
            raise ConfigError("model.llm.quantization", "needs `pretrained` weights to quantise")
        llm_config = AutoConfig.for_model(model_type, **overrides)
        llm_config._attn_implementation = attn_implementation
        llm = AutoModelForCausalLM.from_config(llm_config, dtype=DTYPES[dtype])
    else:
        llm = _load_pretrained(pretrained, overrides, dtype, attn_implementation, quantization)
    if post_attn_norm:
        add_post_attn_norm(llm, post_attn_norm_eps)
    if gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return llm


def _qk_switch(model_type: str) -> str:
    if model_type not in QK_LAYERNORM_SWITCHES:
        raise ConfigError("model.llm.qk_layernorm", f"not available for model_type '{model_type}'; "
                          f"supported: {sorted(QK_LAYERNORM_SWITCHES)}")
    return QK_LAYERNORM_SWITCHES[model_type]


def _load_pretrained(source: str, overrides: dict, dtype: str, attn_implementation: str,
                     quantization: str | None) -> PreTrainedModel:
    llm_config = AutoConfig.from_pretrained(source, **overrides)
    kwargs = {"config": llm_config, "dtype": DTYPES[dtype], "attn_implementation": attn_implementation}
    if quantization:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if quantization == "int8" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=DTYPES[dtype] if dtype != "fp32" else torch.float16))
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def add_post_attn_norm(llm: PreTrainedModel, eps: float) -> None:
    """Replace every decoder layer with its post-attention-norm subclass, in place."""
    layer_cls = POST_ATTN_NORM_LAYERS.get(llm.config.model_type)
    if layer_cls is None:
        raise ConfigError("model.llm.post_attn_norm", f"not available for model_type "
                          f"'{llm.config.model_type}'; supported: {sorted(POST_ATTN_NORM_LAYERS)}")
    layers = llm.get_decoder().layers
    for i, layer in enumerate(layers):
        layers[i] = layer_cls.from_layer(layer, llm.config, eps)


def apply_lora(llm: PreTrainedModel, r: int, alpha: int, dropout: float, target_modules: list[str]):
    """Wrap the LLM with peft LoRA adapters; the base weights are left untouched."""
    lora_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                             target_modules=list(target_modules), task_type="CAUSAL_LM")
    return get_peft_model(llm, lora_config)


def lora_settings(r: PositiveInt = 64, alpha: PositiveFloat = 16, dropout: Fraction = 0.05,
                  target_modules: list[str] = ("q_proj", "k_proj", "v_proj", "dense")) -> dict:
    """Schema of the `model.lora` section (the paper's values are the defaults)."""
    return {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": list(target_modules)}
