"""The paper's model at full size, built on the meta device (shapes and counts, no memory)."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from tests.conftest import REPO
from tinygpt_v.models import build_model
from tinygpt_v.models.parameters import parameter_groups, trainable_table


def full_size_section():
    cfg = OmegaConf.load(REPO / "configs/models/tinygpt_v.yaml").model
    for key in ("vision.pretrained", "qformer.pretrained", "llm.pretrained"):
        OmegaConf.update(cfg, key, None)
    cfg.tokenizer = {"name": "toy_bpe"}  # Phi-2's tokenizer is a download; the count does not depend on it
    return OmegaConf.to_container(cfg)


def linear(n_in, n_out, bias=True):
    return n_in * n_out + (n_out if bias else 0)


def expected_counts():
    """Parameter counts from the architecture table of REFERENCE.md, written out by hand."""
    W, depth, M, patches = 1408, 39, 6144, (224 // 14) ** 2
    eva_block = 2 * W + linear(W, 3 * W, bias=False) + 2 * W + linear(W, W) + 2 * W + linear(W, M) + linear(M, W)
    eva = linear(3 * 14 * 14, W) + W + (patches + 1) * W + depth * eva_block
    Q, heads_layers = 768, 12
    attention = 3 * linear(Q, Q) + linear(Q, Q) + 2 * Q
    cross = linear(Q, Q) + 2 * linear(W, Q) + linear(Q, Q) + 2 * Q
    ffn = linear(Q, 3072) + linear(3072, Q) + 2 * Q
    qformer = 2 * Q + heads_layers * (attention + ffn) + heads_layers // 2 * cross
    H, V, layers, head_dim = 2560, 51200, 32, 80
    phi_layer = 2 * H + 4 * linear(H, H) + linear(H, 4 * H) + linear(4 * H, H)
    phi = V * H + layers * phi_layer + 2 * H + linear(H, V)
    new_norms = layers * (2 * 2 * head_dim + H)  # q/k LayerNorm (weight+bias) + post RMSNorm
    r = 64  # the original's LoRA: one adapter on the fused query_key_value (A r x H, B 3H x r) + dense
    lora = layers * (r * H + 3 * H * r + r * H + H * r)
    projection = linear(Q, 4096) + linear(4096, H)
    return {"vision": eva, "ln_vision": 2 * W, "qformer": qformer, "query_tokens": 32 * Q,
            "llm_side": phi + new_norms + lora + projection}


def test_full_size_model_has_the_papers_shapes_and_parameter_count():
    with torch.device("meta"):
        model = build_model(full_size_section(), verbose=False)
    counts = {g: sum(p.numel() for p in ps.values()) for g, ps in parameter_groups(model).items()}
    expected = expected_counts()
    for group in ("vision", "ln_vision", "qformer", "query_tokens"):
        assert counts[group] == expected[group], group
    llm_side = sum(counts[g] for g in ("projection", "llm_norms", "llm_norm_biases", "lora", "llm"))
    assert llm_side == expected["llm_side"]
    assert 2.8e9 <= llm_side <= 2.9e9  # the paper's "2.8B": Phi-2 + connector + LoRA + norms

    with torch.device("meta"):
        out = model.encode_image(torch.zeros(2, 3, 224, 224, device="meta"))
    assert out.shape == (2, 32, 2560)
    assert model.connector.llama_proj.weight.shape == (4096, 768)
    assert model.connector.llama_proj2.weight.shape == (2560, 4096)
    layer = model.llm.base_model.model.model.layers[0]
    assert layer.self_attn.q_layernorm.weight.shape == (80,)
    assert layer.post_layernorm.weight.shape == (2560,)
    assert layer.self_attn.query_key_value.lora_A["default"].weight.shape == (64, 2560)
    assert layer.self_attn.query_key_value.lora_B["default"].weight.shape == (7680, 64)
    assert model.vision.model.pos_embed.shape == (1, 257, 1408)
    assert model.llm.get_input_embeddings().weight.dtype == torch.float16  # frozen: fp16
    assert layer.post_layernorm.weight.dtype == torch.float32              # trainable: fp32


def test_448_px_vision_encoder_has_a_32x32_position_grid():
    section = full_size_section()
    section["vision"]["image_size"] = 448
    with torch.device("meta"):
        model = build_model(section, verbose=False)
        out = model.vision(torch.zeros(1, 3, 448, 448, device="meta"))
    assert model.vision.model.pos_embed.shape == (1, 1025, 1408)
    assert out.shape == (1, 1025, 1408)


def test_full_size_trainable_set_is_the_originals():
    """The original trains (root copy, `base_model.init_llm` + peft on query_key_value/dense):
    4 norm weights per layer + the final norm weight = 129 tensors, and 31.5 M LoRA parameters."""
    with torch.device("meta"):
        model = build_model(full_size_section(), verbose=False)
    groups = parameter_groups(model)
    H, layers, head_dim, r = 2560, 32, 80, 64
    norms = groups["llm_norms"]
    assert len(norms) == 4 * layers + 1 == 129
    assert sum(p.numel() for p in norms.values()) == layers * (2 * head_dim + 2 * H) + H
    assert all(p.requires_grad for p in norms.values())
    assert not any(p.requires_grad for p in groups["llm_norm_biases"].values())
    lora = groups["lora"]
    assert len(lora) == 4 * layers
    assert sum(p.numel() for p in lora.values()) == layers * (r * H + 3 * H * r + r * H + H * r) == 31_457_280
    print(trainable_table(groups))  # the README's table: pytest -s tests/test_model_fullsize.py
