"""The language model: any transformers causal LM, TinyGPT-V's extra norms, and LoRA (peft).

TinyGPT-V adds two normalisations inside Phi-2 to keep small-LLM training stable:
- QK LayerNorm: a LayerNorm over each head's query and key. transformers' Phi has it built in
  (`qk_layernorm` in PhiConfig), so it is a config switch.
- post-attention RMSNorm: `h = post_layernorm(attn(ln(x))) + mlp(ln(x)) + x`. Phi has no such
  module, so each decoder layer is rebuilt as a subclass that owns one (`post_layernorm`, the
  original's name), keeping the layer's existing submodules. It is a real module: it saves,
  loads, counts and trains like any other parameter.

LoRA comes in two parametrisations (`model.lora.fused_qkv`):
- fused (the original's): its Phi (transformers 4.36) has ONE `query_key_value` Linear, so peft
  puts ONE adapter on q, k and v together: A (r x hidden) shared, B (3*hidden x r) with rows in
  that layer's per-head order q_0 k_0 v_0 q_1 k_1 v_1 ... Today's Phi has separate q/k/v, so
  each attention gets a `query_key_value` module (`FusedQKV`) that presents its q/k/v as that
  one Linear, and peft wraps it through its custom-module API with `FusedQKVLoraLinear`. The
  base weights keep their names (`q_proj.weight`, ...); the adapter is named as the original's
  (`self_attn.query_key_value.lora_A.default.weight`).
- per projection (ablation): peft's ordinary adapters on `q_proj`, `k_proj`, `v_proj`.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from peft.tuners.lora import Linear as LoraLinear
from transformers.models.phi.modeling_phi import (ALL_ATTENTION_FUNCTIONS, PhiAttention, PhiDecoderLayer,
                                                  apply_rotary_pos_emb, eager_attention_forward)

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


# --- LLM families ----------------------------------------------------------------------------
# TinyGPT-V's two norms on the Llama-style families. Their decoder layers share one pre-norm
# shape (h = x + attn(norm(x)); out = h + mlp(norm(h))) and their attentions one shape (project
# q/k/v, view per head, rotary, attention interface, o_proj), so one mixin each covers them,
# combined with the family's own classes at run time; the rotary and eager-attention functions
# are taken from the family's own modeling module.


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and returned in the input's dtype (see RMSNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return nn.functional.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give `new` (built on the meta device) `old`'s submodules as they are (pretrained, quantised)."""
    for name, child in old.named_children():
        setattr(new, name, child)
    return new.train(old.training)


def _device_of(module: nn.Module) -> torch.device:
    return next(p.device for p in module.parameters())


class QKNormAttention:
    """Mixin for a Llama-style attention: TinyGPT-V's QK LayerNorm, a LayerNorm over each head's
    query and key (`q_layernorm`, `k_layernorm`: Phi's names), after the projection and before
    the rotary embedding, as Phi's `qk_layernorm` does. q/k/v come from separate q_proj, k_proj,
    v_proj, or from one `qkv_proj` (Phi-3) split as the family splits it."""

    @classmethod
    def from_attention(cls, attention: nn.Module, eps: float) -> nn.Module:
        with torch.device("meta"):
            new = cls(attention.config, attention.layer_idx)
        _adopt(new, attention)
        for name in ("q_layernorm", "k_layernorm"):  # one LayerNorm over head_dim, shared by the heads (Phi's)
            setattr(new, name, LayerNorm(new.head_dim, eps=eps, device=_device_of(attention), dtype=torch.float32))
        return new

    def _project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not hasattr(self, "qkv_proj"):
            return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q_width = self.config.num_attention_heads * self.head_dim
        kv_width = self.config.num_key_value_heads * self.head_dim
        return self.qkv_proj(hidden_states).split([q_width, kv_width, kv_width], dim=-1)

    def _attention_kwargs(self) -> dict:
        """What the family passes to its attention interface beyond the common arguments."""
        window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        extra = {"sliding_window": window}
        if getattr(self, "attn_logit_softcapping", None) is not None:  # Gemma 2
            extra["softcap"] = self.attn_logit_softcapping
        return extra

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        family = _family_module(type(self), QKNormAttention)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = (t.view(hidden_shape) for t in self._project(hidden_states))
        query = self.q_layernorm(query).transpose(1, 2)
        key = self.k_layernorm(key).transpose(1, 2)
        value = value.transpose(1, 2)
        cos, sin = position_embeddings
        query, key = family.apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    family.eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling, **self._attention_kwargs(), **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class PostNormDecoderLayer:
    """Mixin for a Llama-style pre-norm decoder layer: TinyGPT-V's RMSNorm on the attention
    output before the residual add (`post_layernorm`, the original's name). Phi-3's residual
    dropouts are kept where the family has them."""

    @classmethod
    def from_layer(cls, layer: nn.Module, config, eps: float) -> nn.Module:
        with torch.device("meta"):
            new = cls(config, layer.self_attn.layer_idx)
        _adopt(new, layer)
        new.post_layernorm = RMSNorm(config.hidden_size, eps=eps, device=_device_of(layer), dtype=torch.float32)
        return new

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        residual = hidden_states
        attn_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
            position_embeddings=position_embeddings, **kwargs)
        hidden_states = residual + _dropout(self, "resid_attn_dropout", self.post_layernorm(attn_output))
        residual = hidden_states
        feed_forward = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + _dropout(self, "resid_mlp_dropout", feed_forward)


def _family_module(cls: type, mixin: type):
    """The transformers modeling module of the family class that `mixin` was combined with."""
    mro = cls.__mro__
    return sys.modules[mro[mro.index(mixin) + 1].__module__]


def _dropout(layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    return getattr(layer, name)(x) if hasattr(layer, name) else x


@functools.cache
def _with_mixin(mixin: type, family_cls: type) -> type:
    """`family_cls` with `mixin`'s forward, e.g. LlamaAttention -> LlamaAttentionWithQKNorm."""
    suffix = "WithQKNorm" if mixin is QKNormAttention else "WithPostNorm"
    return type(family_cls.__name__ + suffix, (mixin, family_cls), {"__module__": __name__})


@dataclass(frozen=True)
class LLMFamily:
    """How TinyGPT-V's additions fit one transformers model_type.

    qk_norm: "config:<switch>" (the family has it behind a config switch), "builtin" (always
    there, e.g. Qwen3's q_norm/k_norm: nothing is added), or "module" (QKNormAttention).
    post_attn_norm: a decoder-layer class with a `from_layer`, "builtin" (the family already
    norms the attention output, e.g. Gemma 2's post_attention_layernorm), or "module"
    (PostNormDecoderLayer). lora_targets: the default `model.lora.target_modules` (Phi's with
    its fused q/k/v adapter; `model.lora.fused_qkv` exists for Phi only, FUSED_QKV_ATTENTIONS).
    only_attention: used whatever `attn_implementation` says (Gemma 2's soft-capping: eager)."""
    qk_norm: str
    post_attn_norm: str | type
    lora_targets: tuple[str, ...]
    only_attention: str | None = None  # the one attn_implementation transformers has for the family


LLAMA_STYLE_LORA = ("q_proj", "k_proj", "v_proj", "o_proj")
# model_type -> family. Supporting another Llama-style family is one entry here (and one YAML).
FAMILIES: dict[str, LLMFamily] = {
    "phi": LLMFamily("config:qk_layernorm", PhiDecoderLayerWithPostNorm, ("query_key_value", "dense")),
    "llama": LLMFamily("module", "module", LLAMA_STYLE_LORA),      # Llama 2/3.x, SmolLM2, TinyLlama
    "mistral": LLMFamily("module", "module", LLAMA_STYLE_LORA),
    "qwen2": LLMFamily("module", "module", LLAMA_STYLE_LORA),      # Qwen2 / Qwen2.5
    "qwen3": LLMFamily("builtin", "module", LLAMA_STYLE_LORA),     # q_norm/k_norm (RMSNorm) built in
    "gemma": LLMFamily("module", "module", LLAMA_STYLE_LORA),
    "gemma2": LLMFamily("module", "builtin", LLAMA_STYLE_LORA, "eager"),  # post_attention_layernorm built in
    "phi3": LLMFamily("module", "module", ("qkv_proj", "o_proj")),  # Phi-3 / Phi-3.5 / Phi-4-mini
}


def family_of(model_type: str, key: str = "model.llm.model_type") -> LLMFamily:
    if model_type not in FAMILIES:
        raise ConfigError(key, f"model_type '{model_type}' has no TinyGPT-V family entry "
                               f"(tinygpt_v.models.llm.FAMILIES); supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


# Kept for callers of the Phi-only tables (model_type -> post-norm layer class / QK config switch).
POST_ATTN_NORM_LAYERS: dict[str, type] = {"phi": PhiDecoderLayerWithPostNorm}
QK_LAYERNORM_SWITCHES: dict[str, str] = {"phi": "qk_layernorm"}


@LLMS.register("hf_causal_lm")
def hf_causal_lm(pretrained: PathOrHubId | None = None, model_type: str = "phi",
                 config: dict | None = None, qk_layernorm: bool = False, post_attn_norm: bool = False,
                 post_attn_norm_eps: float = 1e-6, qk_layernorm_eps: float = 1e-5, dtype: Precision = "fp32",
                 attn_implementation: str = "sdpa", quantization: Literal["int8", "nf4"] | None = None,
                 gradient_checkpointing: bool = False) -> PreTrainedModel:
    """A causal LM from a local folder / hub id (`pretrained`), or randomly initialised from
    `model_type` + `config` overrides when `pretrained` is null. `qk_layernorm` and
    `post_attn_norm` add TinyGPT-V's norms as the family allows (FAMILIES); `qk_layernorm_eps`
    is the eps of an added QK LayerNorm (a config-switch family uses its config's)."""
    overrides = dict(config or {})
    if model_type in FAMILIES and FAMILIES[model_type].only_attention:
        attn_implementation = FAMILIES[model_type].only_attention
    if qk_layernorm:
        switch = _qk_switch(model_type)
        if switch:
            overrides[switch] = True
    if pretrained is None:
        if quantization:
            raise ConfigError("model.llm.quantization", "needs `pretrained` weights to quantise")
        llm_config = AutoConfig.for_model(model_type, **overrides)
        llm_config._attn_implementation = attn_implementation
        llm = AutoModelForCausalLM.from_config(llm_config, dtype=DTYPES[dtype])
    else:
        llm = _load_pretrained(pretrained, overrides, dtype, attn_implementation, quantization)
        if llm.config.model_type != model_type and (qk_layernorm or post_attn_norm):
            raise ConfigError("model.llm.model_type", f"is '{model_type}' but {pretrained} holds a "
                                                      f"'{llm.config.model_type}' model")
    if qk_layernorm and not _qk_switch(llm.config.model_type):
        add_qk_layernorm(llm, qk_layernorm_eps)
    if post_attn_norm:
        add_post_attn_norm(llm, post_attn_norm_eps)
    if gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return llm


def _qk_switch(model_type: str) -> str | None:
    """The family's config switch for QK norm, or None when it is built in or added as modules."""
    strategy = family_of(model_type, "model.llm.qk_layernorm").qk_norm
    return strategy.split(":", 1)[1] if strategy.startswith("config:") else None


def _load_pretrained(source: str, overrides: dict, dtype: str, attn_implementation: str,
                     quantization: str | None) -> PreTrainedModel:
    from ..checkpoints.phi2_layout import today_layout_source
    source = today_layout_source(source)  # an old Phi-2 layout folder -> its cached conversion
    llm_config = AutoConfig.from_pretrained(source, **overrides)
    kwargs = {"config": llm_config, "dtype": DTYPES[dtype], "attn_implementation": attn_implementation}
    if quantization:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if quantization == "int8" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=DTYPES[dtype] if dtype != "fp32" else torch.float16))
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def add_qk_layernorm(llm: PreTrainedModel, eps: float) -> None:
    """Give every attention its QK LayerNorm modules (QKNormAttention), in place. A family with
    QK norm built in (Qwen3) gets no second one; one with a config switch (Phi) uses that."""
    strategy = family_of(llm.config.model_type, "model.llm.qk_layernorm").qk_norm
    if strategy == "builtin":
        return
    if strategy != "module":
        raise ConfigError("model.llm.qk_layernorm", f"'{llm.config.model_type}' has QK LayerNorm behind its config "
                                                    f"switch ({strategy}); set it when building")
    for layer in llm.get_decoder().layers:
        if not isinstance(layer.self_attn, QKNormAttention):
            layer.self_attn = _with_mixin(QKNormAttention, type(layer.self_attn)).from_attention(layer.self_attn, eps)


def add_post_attn_norm(llm: PreTrainedModel, eps: float) -> None:
    """Replace every decoder layer with its post-attention-norm subclass, in place (nothing to
    do for a family that has one built in)."""
    strategy = family_of(llm.config.model_type, "model.llm.post_attn_norm").post_attn_norm
    if strategy == "builtin":
        return
    layers = llm.get_decoder().layers
    for i, layer in enumerate(layers):
        if hasattr(layer, "post_layernorm"):
            continue
        layer_cls = _with_mixin(PostNormDecoderLayer, type(layer)) if strategy == "module" else strategy
        layers[i] = layer_cls.from_layer(layer, llm.config, eps)


# --- LoRA ---------------------------------------------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Separate q, k, v features (last dim) -> the original's fused order q_0 k_0 v_0 q_1 ..."""
    return torch.stack([t.unflatten(-1, (heads, -1)) for t in (q, k, v)], dim=-2).flatten(-3)


def split_qkv(fused: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `fuse_qkv` (the original's `_split_heads`, flattened back per projection)."""
    per_head = fused.unflatten(-1, (heads, 3, -1))
    return tuple(per_head[..., j, :].flatten(-2) for j in range(3))


class FusedQKV(nn.Module):
    """An attention's q_proj, k_proj and v_proj presented as the original's one fused Linear
    (hidden -> 3*hidden, output rows per head: q_0 k_0 v_0 q_1 k_1 v_1 ...; the original's Phi
    splits them with Bloom's `_split_heads`, a view as (heads, 3, head_dim)).

    It owns no weights: it calls the attention's own projections, looked up at every call (so
    they keep their names, and a later quantisation or replacement of them is seen). The
    attention is held by a plain reference, not as a child, so its weights are listed once."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        object.__setattr__(self, "attention", attention)
        self.num_heads = attention.config.num_attention_heads
        self.in_features = attention.q_proj.in_features
        self.out_features = 3 * attention.q_proj.out_features

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.attention.q_proj, self.attention.k_proj, self.attention.v_proj

    def fuse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fuse_qkv(q, k, v, self.num_heads)

    def split(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return split_qkv(fused, self.num_heads)

    @property
    def weight(self) -> torch.Tensor:
        """The fused weight (3*hidden, hidden) in the original's row order, as a new tensor (peft
        reads a target's `weight` for its device and dtype)."""
        q, k, v = (p.weight for p in self.projections())
        return self.fuse(q.T, k.T, v.T).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(*(proj(x) for proj in self.projections()))


class FusedQKVLoraLinear(LoraLinear):
    """peft's LoRA Linear over a `FusedQKV` target: forward is peft's own (base output + B A x,
    both in the fused row order); merging adds each projection's rows of B A to its weight."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.lora_A:
                self._add_delta(adapter, +1.0, safe_merge)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self._add_delta(adapter, -1.0, False)

    @torch.no_grad()
    def _add_delta(self, adapter: str, sign: float, safe: bool) -> None:
        fused = self.get_base_layer()
        delta = self.get_delta_weight(adapter)  # (3*hidden, hidden), fused row order
        parts = fused.split(delta.T)
        if safe and not all(torch.isfinite(part).all() for part in parts):
            raise ValueError(f"NaNs or infs in the merged weights of adapter '{adapter}'")
        for proj, part in zip(fused.projections(), parts):
            proj.weight.data += sign * part.T.to(proj.weight.dtype)


class PhiAttentionFusedQKV(PhiAttention):
    """Phi attention that takes q, k, v from its `query_key_value` (a `FusedQKV`), so a LoRA on
    that module acts on all three together, as in the original. The rest is PhiAttention's."""

    @classmethod
    def from_attention(cls, attention: PhiAttention) -> "PhiAttentionFusedQKV":
        with torch.device("meta"):
            new = cls(attention.config, attention.layer_idx)
        for name, child in attention.named_children():
            setattr(new, name, child)
        new.query_key_value = FusedQKV(new)
        return new.train(attention.training)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        query_states, key_states, value_states = (
            t.view(*input_shape, -1, self.head_dim).transpose(1, 2)
            for t in split_qkv(self.query_key_value(hidden_states), self.config.num_attention_heads))
        if self.qk_layernorm:
            query_states = self.q_layernorm(query_states)
            key_states = self.k_layernorm(key_states)
        cos, sin = position_embeddings
        rot = self.rotary_ndims  # partial rotary embedding
        query_rot, key_rot = apply_rotary_pos_emb(query_states[..., :rot], key_states[..., :rot], cos, sin)
        query_states = torch.cat((query_rot, query_states[..., rot:]), dim=-1)
        key_states = torch.cat((key_rot, key_states[..., rot:]), dim=-1)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.dense(attn_output), attn_weights


# model_type -> attention class with a fused q/k/v LoRA target.
FUSED_QKV_ATTENTIONS: dict[str, type] = {"phi": PhiAttentionFusedQKV}
FUSED_QKV_TARGET = "query_key_value"


def add_fused_qkv(llm: PreTrainedModel) -> None:
    """Give every attention a `query_key_value` module (see FusedQKV), in place."""
    attention_cls = FUSED_QKV_ATTENTIONS.get(llm.config.model_type)
    if attention_cls is None:
        raise ConfigError("model.lora.fused_qkv", f"not available for model_type '{llm.config.model_type}'; "
                                                  f"supported: {sorted(FUSED_QKV_ATTENTIONS)}")
    for layer in llm.get_decoder().layers:
        layer.self_attn = attention_cls.from_attention(layer.self_attn)


def apply_lora(llm: PreTrainedModel, r: int, alpha: int, dropout: float, target_modules: list[str],
               fused_qkv: bool = False):
    """Wrap the LLM with peft LoRA adapters; the base weights are left untouched."""
    lora_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                             target_modules=list(target_modules), task_type="CAUSAL_LM")
    if fused_qkv:
        if getattr(llm, "is_quantized", False):
            raise ConfigError("model.lora.fused_qkv", "a fused q/k/v adapter needs an unquantised LLM; "
                                                      "set fused_qkv: false to train LoRA on a quantised one")
        add_fused_qkv(llm)
        lora_config._register_custom_module({FusedQKV: FusedQKVLoraLinear})  # peft's API for custom targets
    return get_peft_model(llm, lora_config)


SEPARATE_QKV = ("q_proj", "k_proj", "v_proj")


def lora_settings(r: PositiveInt = 64, alpha: PositiveFloat = 16, dropout: Fraction = 0.05,
                  fused_qkv: bool | None = None, target_modules: list[str] | None = None) -> dict:
    """Schema of the `model.lora` section (the paper's values are the defaults).

    `fused_qkv: true` (the original's): ONE adapter over q, k and v together (target
    `query_key_value`) plus one on `dense`. `false`: separate adapters on q_proj, k_proj, v_proj.
    Unset: true, unless `target_modules` names q_proj / k_proj / v_proj (configs and exports
    written before the fused adapter existed)."""
    if fused_qkv is None:
        fused_qkv = not (target_modules and set(SEPARATE_QKV) & set(target_modules))
    if target_modules is None:
        target_modules = [FUSED_QKV_TARGET, "dense"] if fused_qkv else [*SEPARATE_QKV, "dense"]
    if fused_qkv and set(SEPARATE_QKV) & set(target_modules):
        raise ConfigError("model.lora.target_modules", f"with fused_qkv: true, q/k/v are one target, "
                                                       f"'{FUSED_QKV_TARGET}'; got {list(target_modules)}")
    if not fused_qkv and FUSED_QKV_TARGET in target_modules:
        raise ConfigError("model.lora.target_modules", f"'{FUSED_QKV_TARGET}' exists only with fused_qkv: true")
    return {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": list(target_modules),
            "fused_qkv": fused_qkv}


def family_lora_settings(section: dict, model_type: str) -> dict:
    """`lora_settings` for an LLM of `model_type`: Phi keeps its own defaults (the original's
    fused adapter); another family defaults to per-projection adapters on its own projection
    names (FAMILIES[...].lora_targets) and refuses `fused_qkv: true`."""
    section = dict(section)
    if model_type in FUSED_QKV_ATTENTIONS:
        return lora_settings(**section)
    if section.get("fused_qkv"):
        raise ConfigError("model.lora.fused_qkv", f"a fused q/k/v adapter exists only for model_type "
                                                  f"{sorted(FUSED_QKV_ATTENTIONS)}, not '{model_type}'; "
                                                  f"set fused_qkv: false (or leave it out)")
    section["fused_qkv"] = False
    if section.get("target_modules") is None:
        if model_type not in FAMILIES:
            raise ConfigError("model.lora.target_modules", f"model_type '{model_type}' has no family entry with "
                                                           f"default LoRA targets; name its projections")
        section["target_modules"] = list(FAMILIES[model_type].lora_targets)
    return lora_settings(**section)


# --- rebuilding an LLM of the same family (a quantised copy, a reload through transformers) ---------

def added_norm_keys(llm: nn.Module) -> set[str]:
    """State-dict keys of the norms TinyGPT-V added as modules (no transformers class has them, so
    a save_pretrained / from_pretrained round trip through transformers drops them)."""
    keys = set()
    for name, module in llm.named_modules():
        added = ("q_layernorm", "k_layernorm") if isinstance(module, QKNormAttention) else ()
        added += ("post_layernorm",) if isinstance(module, (PostNormDecoderLayer, PhiDecoderLayerWithPostNorm)) else ()
        keys |= {f"{name}.{child}.{p}" for child in added for p, _ in getattr(module, child).named_parameters()}
    return keys


def add_norms_like(target: PreTrainedModel, source: nn.Module) -> None:
    """Give `target` (the same family rebuilt by transformers) the norm modules `source` has, at
    the same eps and with the same weights (fp32)."""
    modules = dict(source.named_modules())
    qk = next((m for m in modules.values() if isinstance(m, QKNormAttention)), None)
    post = next((m for m in modules.values() if isinstance(m, (PostNormDecoderLayer, PhiDecoderLayerWithPostNorm))),
                None)
    if qk is not None:
        add_qk_layernorm(target, qk.q_layernorm.eps)
    if post is not None:
        add_post_attn_norm(target, post.post_layernorm.eps)
    state = source.state_dict()
    result = target.load_state_dict({key: state[key].float() for key in added_norm_keys(source)}, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"added norms not placed: {result.unexpected_keys[:3]}")
