"""Trainable groups, TinyGPT-V's two normalisations, batched generation."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from tests.conftest import tiny_model_section
from tinygpt_v.models import GROUPS, build_model
from tinygpt_v.models.llm import PhiDecoderLayerWithPostNorm
from tinygpt_v.models.parameters import parameter_groups

IMG_PROMPT = "<Img><ImageHere></Img> What colour is the circle?"
# Prompts with different last words: a random 2-layer model's output depends mostly on the last
# token, so these make its greedy answers differ from prompt to prompt.
DISTINCT_PROMPTS = ["<Img><ImageHere></Img> What colour is the circle",
                    "<Img><ImageHere></Img> How many shapes are there in this picture, in total",
                    "<Img><ImageHere></Img> Left or right"]

# (LoRA in the model?, trainable groups) of the paper's four stages (REFERENCE.md), plus a
# fully unfrozen ablation so that every group is exercised as trainable at least once.
STAGE_SETTINGS = {
    "stage1": (False, ["projection", "llm_norms"]),
    "stage2": (True, ["projection", "llm_norms", "lora"]),
    "stage3": (True, ["projection", "llm_norms", "lora"]),
    "stage4": (True, ["projection", "llm_norms", "lora"]),
    "everything": (True, list(GROUPS)),
}


def build(**overrides):
    torch.manual_seed(0)
    return build_model(tiny_model_section(**overrides), verbose=False)


@pytest.mark.parametrize("stage", STAGE_SETTINGS)
def test_gradients_reach_exactly_the_trainable_groups(stage):
    with_lora, trainable = STAGE_SETTINGS[stage]
    model = build(**{"trainable": trainable, **({} if with_lora else {"lora": None})})
    groups = parameter_groups(model)
    for name, p in groups["lora"].items():  # peft starts B at zero, which would zero A's gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p.data, std=0.1)
    pixels = torch.randn(2, 3, 112, 112)
    batch = {"image": pixels, "prompt": [[IMG_PROMPT], [IMG_PROMPT + " And the square?"]],
             "answer": [["red"], ["a blue one"]]}
    model(batch)["loss"].backward()
    for group, params in groups.items():
        if not params:
            assert group == "lora" and not with_lora
            continue
        for name, p in params.items():
            if group in trainable:
                assert p.requires_grad and p.dtype == torch.float32, name
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{group}: {name} got no gradient"
            else:
                assert not p.requires_grad and p.grad is None, f"{group}: {name} is frozen but has a gradient"


def test_groups_cover_every_parameter_once_and_norm_group_holds_the_new_norms():
    model = build()
    groups = parameter_groups(model)
    names = [n for params in groups.values() for n in params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    norms, biases = groups["llm_norms"], groups["llm_norm_biases"]
    layers = model.llm.config.num_hidden_layers
    # llm_norms: the norm WEIGHTS, the original's trainable set (4 per layer + the final norm)
    for suffix, count in [("post_layernorm.weight", layers), ("q_layernorm.weight", layers),
                          ("k_layernorm.weight", layers), ("input_layernorm.weight", layers),
                          ("final_layernorm.weight", 1)]:
        assert sum(n.endswith(suffix) for n in norms) == count, suffix
    assert len(norms) == 4 * layers + 1 and all(n.endswith(".weight") for n in norms)
    # their biases are a group of their own (post_layernorm is an RMSNorm: no bias)
    for suffix, count in [("q_layernorm.bias", layers), ("k_layernorm.bias", layers),
                          ("input_layernorm.bias", layers), ("final_layernorm.bias", 1)]:
        assert sum(n.endswith(suffix) for n in biases) == count, suffix
    assert len(biases) == 3 * layers + 1
    assert not any("lora_" in n for n in groups["llm"])


def test_norm_biases_stay_frozen_unless_asked_for_and_share_their_weights_dtype():
    model = build(**{"llm.dtype": "bf16"})
    groups = parameter_groups(model)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in groups["llm_norms"].values())
    # frozen, but in fp32 beside their trainable fp32 weights, as the original casts them
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in groups["llm_norm_biases"].values())
    assert all(p.dtype == torch.bfloat16 for p in groups["llm"].values())
    opted_in = build(**{"trainable": ["projection", "llm_norms", "llm_norm_biases"]})
    assert all(p.requires_grad for p in parameter_groups(opted_in)["llm_norm_biases"].values())


def test_frozen_parts_stay_in_eval_mode_while_training():
    model = build(**{"trainable": ["projection", "lora"]})
    model.train()
    assert not model.vision.training and not model.qformer.training
    assert model.connector.training and model.llm.training
    model = build(**{"trainable": ["projection", "qformer"]})
    model.train()
    assert model.qformer.training and not model.vision.training


def test_unknown_or_empty_group_is_a_config_error():
    from tinygpt_v.registry import ConfigError
    with pytest.raises(ConfigError, match=r"model.trainable\[1\].*unknown parameter group 'lora_adapters'"):
        build(**{"trainable": ["projection", "lora_adapters"]})
    with pytest.raises(ConfigError, match="group 'lora' has no parameters"):
        build(**{"trainable": ["lora"], "lora": None})


# --- the normalisations, against an independent plain-torch computation ----------------------

def reference_phi_layer(layer, x, theta, rotary_ndims):
    """post_layernorm(attn(ln(x))) + mlp(ln(x)) + x, with per-head QK LayerNorm, partial
    rotary embedding and causal attention, written from the formulas with plain torch."""
    attn = layer.self_attn
    batch, seq, hidden = x.shape
    heads, head_dim = layer.self_attn.config.num_attention_heads, attn.head_dim
    ln = layer.input_layernorm
    h = F.layer_norm(x, (hidden,), ln.weight, ln.bias, ln.eps)

    def split(t):
        return t.view(batch, seq, heads, head_dim).transpose(1, 2)
    q, k, v = (split(F.linear(h, proj.weight, proj.bias)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q = F.layer_norm(q, (head_dim,), attn.q_layernorm.weight, attn.q_layernorm.bias, attn.q_layernorm.eps)
    k = F.layer_norm(k, (head_dim,), attn.k_layernorm.weight, attn.k_layernorm.bias, attn.k_layernorm.eps)

    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_ndims, 2).float() / rotary_ndims)
    angles = torch.arange(seq).float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate(t):
        rot, keep = t[..., :rotary_ndims], t[..., rotary_ndims:]
        half = rotary_ndims // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], -1)
        return torch.cat([rot * cos + rotated_half * sin, keep], -1)
    q, k = rotate(q), rotate(k)

    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    attn_out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, hidden)
    attn_out = F.linear(attn_out, attn.dense.weight, attn.dense.bias)
    norm = layer.post_layernorm
    attn_out = attn_out * torch.rsqrt(attn_out.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    u = F.linear(h, layer.mlp.fc1.weight, layer.mlp.fc1.bias)
    gelu_new = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    mlp_out = F.linear(gelu_new, layer.mlp.fc2.weight, layer.mlp.fc2.bias)
    return attn_out + mlp_out + x


def test_patched_phi_layer_matches_the_reference_formula():
    model = build(**{"lora": None, "trainable": ["projection"], "llm.config.hidden_size": 128,
                     "llm.config.num_attention_heads": 4})
    llm = model.llm.eval()
    layer = llm.model.layers[1]
    assert isinstance(layer, PhiDecoderLayerWithPostNorm)
    assert layer.post_layernorm.eps == 1e-6
    with torch.no_grad():  # move every norm away from its identity init so the test can see it
        for p in list(layer.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 7, 128)
    position_ids = torch.arange(7)[None].expand(2, -1)
    cos_sin = llm.model.rotary_emb(x, position_ids)
    mask = torch.full((7, 7), float("-inf")).triu(1)[None, None].expand(2, 1, 7, 7)
    with torch.no_grad():
        got = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin)
        expected = reference_phi_layer(layer, x, theta=10000.0, rotary_ndims=int(32 * 0.4))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_switches_off_give_stock_phi_layers():
    model = build(**{"llm.qk_layernorm": False, "llm.post_attn_norm": False, "lora": None,
                     "trainable": ["projection"]})
    layer = model.llm.model.layers[0]
    assert type(layer).__name__ == "PhiDecoderLayer"
    assert not hasattr(layer.self_attn, "q_layernorm") and not hasattr(layer, "post_layernorm")


# --- generation ----------------------------------------------------------------------------

def test_batched_greedy_generation_equals_one_prompt_at_a_time():
    model = build().eval()
    pixels = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    prompts = DISTINCT_PROMPTS
    together = model.generate(pixels, prompts, max_new_tokens=8)
    alone = [model.generate(pixels[i:i + 1], [p], max_new_tokens=8)[0] for i, p in enumerate(prompts)]
    assert together == alone
    assert all(together) and len(set(together)) > 1  # non-trivial strings, not all the same


def test_generation_stops_at_end_sym():
    model = build().eval()
    pixels = torch.randn(1, 3, 112, 112)
    raw = model.generate(pixels, [IMG_PROMPT], max_new_tokens=12)[0]
    assert raw
    model.end_sym = raw.split()[0]  # pretend the first generated word is the stop symbol
    stopped = model.generate(pixels, [IMG_PROMPT], max_new_tokens=12)[0]
    assert model.end_sym not in stopped and raw.startswith(stopped)


def test_score_candidates_ranks_by_likelihood():
    model = build().eval()
    pixels = torch.randn(2, 3, 112, 112)
    scores = model.score_candidates(pixels, [IMG_PROMPT, IMG_PROMPT], [["red", "blue"], ["green"]])
    assert [len(s) for s in scores] == [2, 1]
    # with end_sym excluded, the summed log-prob is -(mean loss x tokens) of "green" alone
    model.end_sym = ""
    loss = model({"image": pixels[1:], "prompt": [[IMG_PROMPT]], "answer": [["green"]]})
    torch.testing.assert_close(torch.tensor(scores[1][0]), -loss["loss"] * loss["num_target_tokens"],
                               rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_near_zero_temperature_is_greedy():
    model = build().eval()
    pixels = torch.randn(2, 3, 112, 112)
    prompts = ["<Img><ImageHere></Img> What colour is the circle", "<Img><ImageHere></Img> Left or right"]
    greedy = model.generate(pixels, prompts, max_new_tokens=6)
    torch.manual_seed(3)
    hot = model.generate(pixels, prompts, max_new_tokens=6, do_sample=True, temperature=5.0)
    torch.manual_seed(3)
    assert model.generate(pixels, prompts, max_new_tokens=6, do_sample=True, temperature=5.0) == hot
    assert hot != greedy  # at temperature 5 over a 1024-token vocabulary, sampling leaves the argmax
    assert model.generate(pixels, prompts, max_new_tokens=6, do_sample=True, temperature=1e-4) == greedy


def test_llm_loads_pretrained_weights_from_a_local_folder(tmp_path):
    source = build(**{"lora": None, "trainable": ["projection"]}).llm
    for layer in source.model.layers:  # save a stock Phi: the original's checkpoint has no post norm
        del layer.post_layernorm
    source.save_pretrained(tmp_path / "phi")
    model = build(**{"llm.pretrained": str(tmp_path / "phi"), "lora": None, "trainable": ["projection"]})
    loaded = dict(model.llm.named_parameters())
    for name, p in source.named_parameters():
        assert torch.equal(loaded[name], p), name
    layer = model.llm.model.layers[0]
    assert isinstance(layer, PhiDecoderLayerWithPostNorm)
    assert torch.equal(layer.post_layernorm.weight, torch.ones(64))  # the new norm starts as identity


def test_static_cache_decode_gives_the_same_greedy_answers():
    model = build().eval()
    pixels = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    prompts = DISTINCT_PROMPTS
    plain = model.generate(pixels, prompts, max_new_tokens=8)
    assert model.generate(pixels, prompts, max_new_tokens=8, static_cache=True) == plain


def test_checkpoints_keep_frozen_parts_only_when_no_file_can_restore_them():
    from tinygpt_v.models.parameters import checkpoint_parameter_names
    model = build(**{"trainable": ["projection"]})
    groups = parameter_groups(model)
    everything = {n for params in groups.values() for n in params}
    assert set(checkpoint_parameter_names(model)) == everything  # all random: all saved
    model.model_config["vision"]["pretrained"] = "weights/eva_vit_g.pth"
    model.model_config["llm"]["pretrained"] = "microsoft/phi-2"
    expected = (everything - set(groups["vision"]) - set(groups["llm"]) - set(groups["llm_norms"])
                - set(groups["llm_norm_biases"]))
    assert set(checkpoint_parameter_names(model)) == expected  # Q-Former + ln_vision still random
    model.model_config["qformer"]["pretrained"] = "weights/blip2_pretrained_flant5xxl.pth"
    # the connector trains; LoRA is frozen here but only a checkpoint can hold its weights
    assert set(checkpoint_parameter_names(model)) == set(groups["projection"]) | set(groups["lora"])


def test_qformer_initializer_range_sets_the_random_init_scale():
    narrow = build(**{"qformer.initializer_range": 0.02}).qformer
    wide = build(**{"qformer.initializer_range": 0.5}).qformer
    weight = "bert.encoder.layer.0.crossattention.attention.query.weight"
    narrow_std, wide_std = (dict(q.named_parameters())[weight].std().item() for q in (narrow, wide))
    assert narrow_std == pytest.approx(0.02, rel=0.1) and wide_std == pytest.approx(0.5, rel=0.1)
    assert wide.query_tokens.std().item() == pytest.approx(0.5, rel=0.2)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_eva_converts_matmul_weights_only_and_keeps_an_fp32_stream(precision):
    """As LAVIS convert_weights_to_fp16 + autocast: Linear/Conv weights low precision; norms,
    position embedding, class token and q/v biases fp32; output close to an fp32 run."""
    from tinygpt_v.models.vision import DTYPES, eva_vit_g
    torch.manual_seed(0)
    encoder = eva_vit_g(image_size=112, width=64, depth=3, heads=4, mlp_dim=128, precision=precision).eval()
    reference = eva_vit_g(image_size=112, width=64, depth=3, heads=4, mlp_dim=128, precision="fp32").eval()
    reference.load_state_dict({k: v.float() for k, v in encoder.state_dict().items()})
    low = DTYPES[precision]
    for name, module in encoder.model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            is_matmul = isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            assert p.dtype == (low if is_matmul else torch.float32), f"{name}.{pname}"
    assert encoder.model.pos_embed.dtype == encoder.model.blocks[0].norm1.weight.dtype == torch.float32
    assert encoder.model.blocks[0].attn.qkv.weight.dtype == low
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens, expected = encoder(pixels), reference(pixels)
    assert tokens.dtype == torch.float32  # the residual stream never left fp32
    # relative to the largest activation; measured (CPU, this draw) fp16 3.5e-4, bf16 2.8e-3
    error = ((tokens - expected).abs().max() / expected.abs().max()).item()
    assert error < {"fp16": 2e-3, "bf16": 1e-2}[precision]
    # casting the whole tower instead (an fp16 residual stream) drifts further: 1.2e-3 / 8.4e-3
    whole = reference.model.to(low)
    with torch.no_grad():
        whole_tokens = whole.forward_features(pixels.to(low)).float()
    assert error < ((whole_tokens - expected).abs().max() / expected.abs().max()).item()


def test_lora_kind_follows_the_config():
    from tinygpt_v.models.llm import lora_settings
    from tinygpt_v.registry import ConfigError
    assert lora_settings()["target_modules"] == ["query_key_value", "dense"]
    assert lora_settings(fused_qkv=False)["target_modules"] == ["q_proj", "k_proj", "v_proj", "dense"]
    # configs and exports from before the fused adapter: per-projection, as they were trained
    assert lora_settings(target_modules=["q_proj", "v_proj"])["fused_qkv"] is False
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        lora_settings(fused_qkv=True, target_modules=["q_proj", "dense"])
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        lora_settings(fused_qkv=False, target_modules=["query_key_value"])
    per_projection = build(**{"lora.fused_qkv": False, "lora.target_modules": None})
    lora = parameter_groups(per_projection)["lora"]
    assert sum(".q_proj.lora_A." in n for n in lora) == 2 and not any("query_key_value" in n for n in lora)
