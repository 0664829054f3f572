"""The original's fused-qkv Phi-2 (+ LoRA on the fused layer) and our split q/k/v (+ one LoRA
per projection) compute the same function.

The reference below is written from the original's attention (TinyGPT-V's modeling_phi, the
transformers 4.36 Phi): one `query_key_value` Linear whose output is viewed as
(batch, seq, heads, 3, head_dim), LoRA added on the fused output, per-head QK LayerNorm,
partial rotary, causal softmax attention, `dense` (+ LoRA). Both models are built from one
random fused weight set; only the conversion under test connects them.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model_section
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.phi.modeling_phi import apply_rotary_pos_emb

from tinygpt_v.checkpoints import convert_fused_phi, load_checkpoints
from tinygpt_v.models import build_model
from tinygpt_v.models.llm import add_post_attn_norm

R, ALPHA = 8, 16  # tiny.yaml's LoRA
TINYGPT_V_NORMS = ("q_layernorm", "k_layernorm", "post_layernorm")  # absent from Phi-2 itself


def fused_original_weights(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Phi-2 in the fused layout plus TinyGPT-V's trained parts, original names (LoRA B non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    h, d, n = config.hidden_size, config.hidden_size // config.num_attention_heads, config.intermediate_size

    def rand(*shape, scale=0.2):
        return torch.randn(shape, generator=gen) * scale

    w = {"model.embed_tokens.weight": rand(config.vocab_size, h, scale=1.0),
         "model.final_layernorm.weight": 1 + rand(h), "model.final_layernorm.bias": rand(h),
         "lm_head.weight": rand(config.vocab_size, h), "lm_head.bias": rand(config.vocab_size)}
    for i in range(config.num_hidden_layers):
        b = f"model.layers.{i}."
        w.update({
            b + "self_attn.query_key_value.weight": rand(3 * h, h), b + "self_attn.query_key_value.bias": rand(3 * h),
            b + "self_attn.query_key_value.lora_A.default.weight": rand(R, h),
            b + "self_attn.query_key_value.lora_B.default.weight": rand(3 * h, R),
            b + "self_attn.dense.weight": rand(h, h), b + "self_attn.dense.bias": rand(h),
            b + "self_attn.dense.lora_A.default.weight": rand(R, h),
            b + "self_attn.dense.lora_B.default.weight": rand(h, R),
            b + "self_attn.q_layernorm.weight": 1 + rand(d), b + "self_attn.q_layernorm.bias": rand(d),
            b + "self_attn.k_layernorm.weight": 1 + rand(d), b + "self_attn.k_layernorm.bias": rand(d),
            b + "mlp.fc1.weight": rand(n, h), b + "mlp.fc1.bias": rand(n),
            b + "mlp.fc2.weight": rand(h, n), b + "mlp.fc2.bias": rand(h),
            b + "input_layernorm.weight": 1 + rand(h), b + "input_layernorm.bias": rand(h),
            b + "post_layernorm.weight": 1 + rand(h)})
    return w


class OriginalFusedAttention(nn.Module):
    """The original's attention forward on fused weights (eval mode: no dropout, no padding)."""

    def __init__(self, w: dict[str, torch.Tensor], prefix: str, config, q_layernorm, k_layernorm, lora: bool):
        super().__init__()
        self.w = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.rotary = int(self.head_dim * config.rope_parameters["partial_rotary_factor"])
        self.q_layernorm, self.k_layernorm = q_layernorm, k_layernorm
        self.lora_scale = ALPHA / R if lora else 0.0

    def linear_with_lora(self, x, name):
        w = self.w
        out = nn.functional.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])
        return out + self.lora_scale * (x @ w[f"{name}.lora_A.default.weight"].T @ w[f"{name}.lora_B.default.weight"].T)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        batch, seq, _ = hidden_states.shape
        fused = self.linear_with_lora(hidden_states, "query_key_value")
        fused = fused.view(batch, seq, self.heads, 3, self.head_dim)  # Bloom-style _split_heads
        q, k, v = fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]
        q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        cos, sin = position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :self.rotary], k[..., :self.rotary], cos, sin)
        q = torch.cat((q_rot, q[..., self.rotary:]), dim=-1)
        k = torch.cat((k_rot, k[..., self.rotary:]), dim=-1)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)
        causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        attn = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        out = attn.transpose(1, 2).reshape(batch, seq, -1)
        return self.linear_with_lora(out, "dense"), None


def reference_model(config, w: dict[str, torch.Tensor], lora: bool):
    """A Phi with TinyGPT-V's post-attention norm whose attention runs the original fused code."""
    model = AutoModelForCausalLM.from_config(config)
    add_post_attn_norm(model, 1e-6)
    plain = {k: v for k, v in w.items() if "query_key_value" not in k and "dense" not in k and "lora" not in k}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    assert not unexpected and all("self_attn" in k and "layernorm" not in k for k in missing)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        layer.self_attn = OriginalFusedAttention(w, f"model.layers.{i}.self_attn.", config,
                                                 attn.q_layernorm, attn.k_layernorm, lora)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_model_section(), verbose=False)


def test_fused_qkv_and_fused_lora_equal_split_projections(tmp_path, model):
    config = model.llm.get_base_model().config
    w = fused_original_weights(config)
    # the frozen Phi-2 (fused layout) and the released-style trainable file (runner format)
    phi = {k: v for k, v in w.items() if not any(s in k for s in ("lora", *TINYGPT_V_NORMS))}
    stage = {f"llama_model.base_model.model.{k}": v for k, v in w.items()
             if any(s in k for s in ("lora", "input_layernorm", "final_layernorm", *TINYGPT_V_NORMS))}
    torch.save(phi, tmp_path / "phi2_fused.bin")
    torch.save({"model": stage}, tmp_path / "stage.pth")
    reports = load_checkpoints(model, [tmp_path / "phi2_fused.bin", tmp_path / "stage.pth"])
    assert all(r.ok for r in reports)
    assert {r.format for r in reports} == {"Phi-2 (transformers layout, fused or separate q/k/v)",
                                           "original TinyGPT-V / MiniGPT-4 / LAVIS BLIP-2"}

    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        ours = model.llm(input_ids=ids).logits
        original = reference_model(config, w, lora=True)(input_ids=ids).logits
        without_lora = reference_model(config, w, lora=False)(input_ids=ids).logits
    assert torch.allclose(ours, original, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, without_lora, atol=1e-3)  # the LoRA matters, so it was compared
    model.train()


def test_fused_phi_folder_converts_to_todays_layout(tmp_path):
    """The `phi` command: an old fused-layout folder becomes one `llm.pretrained` can point at."""
    config = AutoConfig.for_model("phi", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, qk_layernorm=False)
    w = fused_original_weights(config, seed=3)
    base = {k: v for k, v in w.items() if not any(s in k for s in ("lora", *TINYGPT_V_NORMS))}
    old = tmp_path / "phi2_old"
    old.mkdir()
    torch.save(base, old / "pytorch_model.bin")
    (old / "config.json").write_text(json.dumps({**config.to_dict(), "architectures": ["PhiForCausalLM"]}))
    (old / "tokenizer_config.json").write_text("{}")
    new = convert_fused_phi(old, tmp_path / "phi2")
    assert (new / "tokenizer_config.json").exists()

    converted = AutoModelForCausalLM.from_pretrained(new).eval()
    reference = AutoModelForCausalLM.from_config(config).eval()
    reference.load_state_dict({k: v for k, v in base.items() if "query_key_value" not in k and "dense" not in k},
                              strict=False)
    for i, layer in enumerate(reference.model.layers):
        layer.self_attn = OriginalFusedAttention(w, f"model.layers.{i}.self_attn.", config,
                                                 nn.Identity(), nn.Identity(), lora=False)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(converted(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)
