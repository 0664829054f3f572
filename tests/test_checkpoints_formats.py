"""Foreign checkpoints with the original key names load into our model.

The synthetic files below are written from the key listings in REFERENCE.md (and, for the
Hugging Face names, transformers' BLIP-2 conversion script), not from our key tables, so a
wrong table entry shows up as a missing or unexpected key.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import pytest
import torch
from conftest import REPO, tiny_model_section
from safetensors.torch import save_file

from tinygpt_v.checkpoints import CheckpointError, load_checkpoints, load_ln_vision, plan_load
from tinygpt_v.checkpoints.loading import llm_heads, model_parts
from tinygpt_v.models import build_model


@dataclass
class Sizes:
    """Geometry of every part, tiny (tiny.yaml) or full (the paper)."""
    vis_width: int = 64
    vis_depth: int = 3          # the file has one block more than the model (40 vs 39 in full)
    vis_mlp: int = 128
    patch: int = 14
    grid: int = 8               # 112 px / 14
    q_hidden: int = 64
    q_layers: int = 2
    q_inter: int = 128
    queries: int = 8
    text_vocab: int = 50
    proj_hidden: int = 128
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 256
    vocab: int = 1024
    lora_r: int = 8


FULL = Sizes(vis_width=1408, vis_depth=40, vis_mlp=6144, grid=16, q_hidden=768, q_layers=12, q_inter=3072,
             queries=32, text_vocab=30523, proj_hidden=4096, hidden=2560, layers=32, heads=32, mlp=10240,
             vocab=51200, lora_r=64)
TINY = Sizes()


# --- key listings in the original formats -------------------------------------------------------

def lavis_eva(s: Sizes, prefix: str = "") -> dict[str, tuple]:
    w = s.vis_width
    keys = {"cls_token": (1, 1, w), "pos_embed": (1, 1 + s.grid ** 2, w),
            "patch_embed.proj.weight": (w, 3, s.patch, s.patch), "patch_embed.proj.bias": (w,)}
    for i in range(s.vis_depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
                     b + "attn.q_bias": (w,), b + "attn.v_bias": (w,), b + "attn.proj.weight": (w, w),
                     b + "attn.proj.bias": (w,), b + "norm2.weight": (w,), b + "norm2.bias": (w,),
                     b + "mlp.fc1.weight": (s.vis_mlp, w), b + "mlp.fc1.bias": (s.vis_mlp,),
                     b + "mlp.fc2.weight": (w, s.vis_mlp), b + "mlp.fc2.bias": (w,)})
    return {prefix + k: v for k, v in keys.items()}


def hf_vision(s: Sizes) -> dict[str, tuple]:
    """Blip2VisionModel names (transformers' convert_blip_2_original_to_pytorch.py); 39 of 40 blocks."""
    w, v = s.vis_width, "vision_model."
    keys = {v + "embeddings.class_embedding": (1, 1, w), v + "embeddings.position_embedding": (1, 1 + s.grid ** 2, w),
            v + "embeddings.patch_embedding.weight": (w, 3, s.patch, s.patch),
            v + "embeddings.patch_embedding.bias": (w,),
            v + "post_layernorm.weight": (w,), v + "post_layernorm.bias": (w,)}
    for i in range(s.vis_depth - 1):
        b = f"{v}encoder.layers.{i}."
        keys.update({b + "layer_norm1.weight": (w,), b + "layer_norm1.bias": (w,),
                     b + "self_attn.qkv.weight": (3 * w, w), b + "self_attn.q_bias": (w,),
                     b + "self_attn.v_bias": (w,), b + "self_attn.projection.weight": (w, w),
                     b + "self_attn.projection.bias": (w,), b + "layer_norm2.weight": (w,),
                     b + "layer_norm2.bias": (w,), b + "mlp.fc1.weight": (s.vis_mlp, w),
                     b + "mlp.fc1.bias": (s.vis_mlp,), b + "mlp.fc2.weight": (w, s.vis_mlp), b + "mlp.fc2.bias": (w,)})
    return keys


def qformer_layer(s: Sizes, b: str, self_attn: str, cross: bool, text_branch: bool) -> dict[str, tuple]:
    h, i = s.q_hidden, s.q_inter
    keys = {}
    blocks = [("attention", h)] + ([("crossattention", s.vis_width)] if cross else [])
    for name, kv_in in blocks:
        keys.update({f"{b}{name}.{self_attn}.query.weight": (h, h), f"{b}{name}.{self_attn}.query.bias": (h,),
                     f"{b}{name}.{self_attn}.key.weight": (h, kv_in), f"{b}{name}.{self_attn}.key.bias": (h,),
                     f"{b}{name}.{self_attn}.value.weight": (h, kv_in), f"{b}{name}.{self_attn}.value.bias": (h,),
                     f"{b}{name}.output.dense.weight": (h, h), f"{b}{name}.output.dense.bias": (h,),
                     f"{b}{name}.output.LayerNorm.weight": (h,), f"{b}{name}.output.LayerNorm.bias": (h,)})
    ffns = ["_query"] + ([""] if text_branch else [])
    for suffix in ffns:
        keys.update({f"{b}intermediate{suffix}.dense.weight": (i, h), f"{b}intermediate{suffix}.dense.bias": (i,),
                     f"{b}output{suffix}.dense.weight": (h, i), f"{b}output{suffix}.dense.bias": (h,),
                     f"{b}output{suffix}.LayerNorm.weight": (h,), f"{b}output{suffix}.LayerNorm.bias": (h,)})
    return keys


def lavis_blip2(s: Sizes) -> dict[str, tuple]:
    """blip2_pretrained_flant5xxl.pth: ln_vision, query_tokens, Q-Former in BERT naming, plus the
    parts TinyGPT-V does not use (text branch, LM head, T5 projection)."""
    h, q = s.q_hidden, "Qformer.bert."
    keys = {"ln_vision.weight": (s.vis_width,), "ln_vision.bias": (s.vis_width,), "query_tokens": (1, s.queries, h),
            q + "embeddings.LayerNorm.weight": (h,), q + "embeddings.LayerNorm.bias": (h,),
            q + "embeddings.word_embeddings.weight": (s.text_vocab, h),
            q + "embeddings.position_embeddings.weight": (512, h),
            "Qformer.cls.predictions.bias": (s.text_vocab,), "Qformer.cls.predictions.transform.dense.weight": (h, h),
            "t5_proj.weight": (4096 if s is FULL else 32, h), "t5_proj.bias": (4096 if s is FULL else 32,)}
    for i in range(s.q_layers):
        keys.update(qformer_layer(s, f"{q}encoder.layer.{i}.", "self", i % 2 == 0, text_branch=True))
    return keys


def hf_blip2(s: Sizes) -> dict[str, tuple]:
    h = s.q_hidden
    keys = {**hf_vision(s), "query_tokens": (1, s.queries, h),
            "qformer.layernorm.weight": (h,), "qformer.layernorm.bias": (h,),
            "language_projection.weight": (32, h), "language_projection.bias": (32,),
            "language_model.model.decoder.embed_tokens.weight": (100, 32)}
    for i in range(s.q_layers):
        keys.update(qformer_layer(s, f"qformer.encoder.layer.{i}.", "attention", i % 2 == 0, text_branch=False))
    return keys


def tinygptv_stage(s: Sizes) -> dict[str, tuple]:
    """TinyGPT-V_for_Stage{1..4}.pth `model`: projections, LoRA on the fused qkv and dense, and the
    norm WEIGHTS (the original trains no norm bias, and saves only what it trains)."""
    h, r, d = s.hidden, s.lora_r, s.hidden // s.heads
    keys = {"llama_proj.weight": (s.proj_hidden, s.q_hidden), "llama_proj.bias": (s.proj_hidden,),
            "llama_proj2.weight": (h, s.proj_hidden), "llama_proj2.bias": (h,),
            "llama_model.base_model.model.model.final_layernorm.weight": (h,)}
    for i in range(s.layers):
        b = f"llama_model.base_model.model.model.layers.{i}."
        keys.update({b + "self_attn.query_key_value.lora_A.default.weight": (r, h),
                     b + "self_attn.query_key_value.lora_B.default.weight": (3 * h, r),
                     b + "self_attn.dense.lora_A.default.weight": (r, h),
                     b + "self_attn.dense.lora_B.default.weight": (h, r),
                     b + "self_attn.q_layernorm.weight": (d,), b + "self_attn.k_layernorm.weight": (d,),
                     b + "post_layernorm.weight": (h,), b + "input_layernorm.weight": (h,)})
    return keys


def phi_fused(s: Sizes) -> dict[str, tuple]:
    """Phi-2 as the original loaded it (transformers 4.36): fused query_key_value, no TinyGPT-V norms."""
    h = s.hidden
    keys = {"model.embed_tokens.weight": (s.vocab, h), "model.final_layernorm.weight": (h,),
            "model.final_layernorm.bias": (h,), "lm_head.weight": (s.vocab, h), "lm_head.bias": (s.vocab,)}
    for i in range(s.layers):
        b = f"model.layers.{i}."
        keys.update({b + "self_attn.query_key_value.weight": (3 * h, h), b + "self_attn.query_key_value.bias": (3 * h,),
                     b + "self_attn.dense.weight": (h, h), b + "self_attn.dense.bias": (h,),
                     b + "mlp.fc1.weight": (s.mlp, h), b + "mlp.fc1.bias": (s.mlp,),
                     b + "mlp.fc2.weight": (h, s.mlp), b + "mlp.fc2.bias": (h,),
                     b + "input_layernorm.weight": (h,), b + "input_layernorm.bias": (h,)})
    return keys


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}


def meta_state(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_model_section(), verbose=False)


@pytest.fixture(scope="module")
def full_model():
    """The paper's model on the meta device: every name and shape, no memory."""
    from tinygpt_v.config import load_config, to_plain
    section = to_plain(load_config(REPO / "configs/models/tinygpt_v.yaml", validate=False).model)
    for part in ("vision", "qformer", "llm"):
        section[part]["pretrained"] = None
    section["tokenizer"] = {"name": "toy_bpe"}
    with torch.device("meta"):
        return build_model(section, verbose=False)


# --- full-size key listings ----------------------------------------------------------------------

def full_plan(full_model, shapes):
    return plan_load(full_model, meta_state(shapes), "synthetic", parts=model_parts(full_model),
                     llm_heads=llm_heads(full_model))


def minigpt4(s: Sizes) -> dict[str, tuple]:
    """MiniGPT-4's checkpoint: its llama_proj only (stage 1 starts from it)."""
    return {"llama_proj.weight": (s.proj_hidden, s.q_hidden), "llama_proj.bias": (s.proj_hidden,)}


@pytest.mark.parametrize("listing, parts", [
    (tinygptv_stage, {"projection:llama_proj", "projection:llama_proj2", "llm_norms", "added_norms", "lora"}),
    (minigpt4, {"projection:llama_proj"}),
    (lambda s: lavis_eva(s), {"vision"}),
    (lambda s: lavis_eva(s, "visual_encoder."), {"vision"}),
    (lavis_blip2, {"ln_vision", "query_tokens", "qformer"}),
    (hf_blip2, {"vision", "ln_vision", "query_tokens", "qformer"}),
    (phi_fused, {"llm", "llm_norms", "llm_norm_biases"}),
], ids=["tinygptv_stage", "minigpt4", "eva_vit_g", "eva_in_model_file", "lavis_blip2", "hf_blip2", "phi_fused"])
def test_full_size_original_names_map_completely(full_model, listing, parts):
    plan = full_plan(full_model, listing(FULL))
    report = plan.report
    assert report.ok, str(report)
    covered = {part for part, names in model_parts(full_model).items() if names and set(names) <= set(plan.tensors)}
    assert covered == parts
    # what a file holds but TinyGPT-V does not use is reported, not loaded
    if listing is lavis_blip2:
        assert any("text FFN" in s for s in report.skipped) and any("Flan-T5" in s for s in report.skipped)


def test_full_size_eva_drops_block_39_and_interpolates_to_448(full_model):
    plan = full_plan(full_model, lavis_eva(FULL))
    assert sum("blocks.39." in s for s in plan.report.skipped) == 13
    assert not any("blocks.38." in s for s in plan.report.skipped)
    from tinygpt_v.config import load_config, to_plain
    section = to_plain(load_config(REPO / "configs/models/tinygpt_v.yaml", validate=False).model)
    section["vision"]["pretrained"] = None
    with torch.device("meta"):
        from tinygpt_v.models.vision import VISION_ENCODERS
        eva = VISION_ENCODERS.build({**section["vision"], "image_size": 448}, "model.vision").model
    plan = plan_load(eva, meta_state(lavis_eva(FULL)), "synthetic", prefix="vision.model.")
    assert plan.report.ok, str(plan.report)
    assert plan.tensors["pos_embed"].shape == (1, 1 + 32 * 32, 1408)


# --- tiny files through the real loaders ------------------------------------------------------------

def released_stage_file(tmp_path):
    state = random_state(tinygptv_stage(TINY))
    path = tmp_path / "TinyGPT-V_for_Stage4.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "config": {"run": {"seed": 42}},
                "scaler": None, "epoch": 3}, path)
    return state, path


def test_released_stage_checkpoint_loads_into_the_fused_adapter_and_keeps_norm_biases(tmp_path, model):
    state, path = released_stage_file(tmp_path)
    before = snapshot(model)
    (report,) = load_checkpoints(model, [path])
    assert report.ok and report.format.startswith("original TinyGPT-V")
    assert len(report.matched) == len(state)  # one to one: the same fused adapter
    sd = model.state_dict()
    layer = "llm.base_model.model.model.layers.1.self_attn.query_key_value."
    orig = "llama_model.base_model.model.model.layers.1.self_attn.query_key_value."
    for ab in ("A", "B"):
        assert torch.equal(sd[f"{layer}lora_{ab}.default.weight"], state[f"{orig}lora_{ab}.default.weight"])
    # the norm biases are not in the file: they keep their values and the report says why
    biases = [k for k in sd if k.startswith("llm.") and "layernorm.bias" in k]
    assert len(biases) == 3 * TINY.layers + 1
    assert sorted(k.split(" ")[0] for k in report.kept) == sorted(biases)
    assert all("never trains" in k for k in report.kept)
    assert all(torch.equal(sd[k], before[k]) for k in biases)


def test_released_stage_checkpoint_splits_fused_lora_for_per_projection_adapters(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_model_section(**{"lora.fused_qkv": False, "lora.target_modules": None}), verbose=False)
    state, path = released_stage_file(tmp_path)
    before = snapshot(model)
    (report,) = load_checkpoints(model, [path])
    assert report.ok and report.format.startswith("original TinyGPT-V")
    assert len(report.matched) == 4 + 1 + TINY.layers * (3 * 2 + 2 + 2 + 1 + 1)
    sd = model.state_dict()
    layer = "llm.base_model.model.model.layers.1.self_attn."
    fused_a = state["llama_model.base_model.model.model.layers.1.self_attn.query_key_value.lora_A.default.weight"]
    fused_b = state["llama_model.base_model.model.model.layers.1.self_attn.query_key_value.lora_B.default.weight"]
    d = TINY.hidden // TINY.heads
    for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(sd[layer + f"{proj}.lora_A.default.weight"], fused_a)
        head0_rows = fused_b[j * d:(j + 1) * d]  # rows run q0 k0 v0 q1 k1 v1 ... per head
        assert torch.equal(sd[layer + f"{proj}.lora_B.default.weight"][:d], head0_rows)
    assert torch.equal(sd["connector.llama_proj2.weight"], state["llama_proj2.weight"])
    assert torch.equal(sd["llm.base_model.model.model.layers.0.post_layernorm.weight"],
                       state["llama_model.base_model.model.model.layers.0.post_layernorm.weight"])
    # the frozen parts were not touched
    assert torch.equal(sd["vision.model.pos_embed"], before["vision.model.pos_embed"])


def write_hf_blip2(folder, state) -> None:
    """A Salesforce/blip2-* style folder with two safetensors shards and an index."""
    folder.mkdir()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(folder / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "blip-2"}))


def hf_from_lavis(eva: dict, blip2: dict, s: Sizes) -> dict[str, torch.Tensor]:
    """The same weights under Hugging Face names, renamed as transformers' BLIP-2 converter does
    (the text branch was already deleted from the LAVIS model it converted)."""
    out = {"vision_model.embeddings.class_embedding": eva["cls_token"],
           "vision_model.embeddings.position_embedding": eva["pos_embed"],
           "vision_model.embeddings.patch_embedding.weight": eva["patch_embed.proj.weight"],
           "vision_model.embeddings.patch_embedding.bias": eva["patch_embed.proj.bias"],
           "vision_model.post_layernorm.weight": blip2["ln_vision.weight"],
           "vision_model.post_layernorm.bias": blip2["ln_vision.bias"],
           "qformer.layernorm.weight": blip2["Qformer.bert.embeddings.LayerNorm.weight"],
           "qformer.layernorm.bias": blip2["Qformer.bert.embeddings.LayerNorm.bias"],
           "query_tokens": blip2["query_tokens"]}
    block_renames = (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), (".attn.proj.", ".attn.projection."),
                     (".attn.", ".self_attn."), ("blocks.", "vision_model.encoder.layers."))
    for key, value in eva.items():
        if key.startswith("blocks.") and int(key.split(".")[1]) < s.vis_depth - 1:
            for old, new in block_renames:
                key = key.replace(old, new)
            out[key] = value
    for key, value in blip2.items():
        text_branch = re.search(r"encoder\.layer\.\d+\.(intermediate|output)\.", key)
        if key.startswith("Qformer.bert.encoder.") and not text_branch:
            out[key.replace("Qformer.bert", "qformer").replace("self", "attention")] = value
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random EVA + BLIP-2 weights saved LAVIS-style and Hugging Face-style."""
    root = tmp_path_factory.mktemp("weights")
    eva = random_state(lavis_eva(TINY), seed=1)
    blip2 = random_state(lavis_blip2(TINY), seed=2)
    torch.save(eva, root / "eva_vit_g.pth")
    torch.save({"model": blip2}, root / "blip2_pretrained_flant5xxl.pth")
    hf = hf_from_lavis(eva, blip2, TINY)
    language = {k: v for k, v in hf_blip2(TINY).items() if k.startswith("language_")}
    assert set(hf) | set(language) == set(hf_blip2(TINY))  # the two listings agree
    hf.update(random_state(language, seed=3))
    write_hf_blip2(root / "blip2-hf", hf)
    return {"eva": eva, "blip2": blip2, "root": root}


def build_eva(pretrained, image_size=112):
    from tinygpt_v.models.vision import eva_vit_g
    torch.manual_seed(123)
    return eva_vit_g(image_size=image_size, width=64, depth=2, heads=4, mlp_dim=128, patch_size=14,
                     precision="fp32", pretrained=pretrained).eval()


@pytest.mark.parametrize("image_size", [112, 224])
def test_eva_lavis_and_hf_names_give_identical_image_features(weights, image_size):
    lavis = build_eva(str(weights["root"] / "eva_vit_g.pth"), image_size)
    hf = build_eva(str(weights["root"] / "blip2-hf"), image_size)
    fresh = build_eva(None, image_size)
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        features = lavis(pixels)
        assert torch.equal(features, hf(pixels))
        assert not torch.allclose(features, fresh(pixels))
    assert torch.equal(lavis.model.blocks[1].mlp.fc2.weight, weights["eva"]["blocks.1.mlp.fc2.weight"])
    if image_size == 224:  # 8x8 grid -> 16x16, bicubic as LAVIS's interpolate_pos_embed
        old = weights["eva"]["pos_embed"]
        grid = old[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
        expected = torch.cat([old[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
        assert torch.allclose(lavis.model.pos_embed, expected, atol=1e-6)


def test_qformer_and_ln_vision_from_lavis_and_hf_agree(weights, model):
    from tinygpt_v.models.qformer import blip2_qformer
    kwargs = dict(encoder_width=64, num_query_tokens=8, hidden_size=64, num_layers=2, num_heads=4,
                  intermediate_size=128)
    lavis = blip2_qformer(**kwargs, pretrained=str(weights["root"] / "blip2_pretrained_flant5xxl.pth")).eval()
    hf = blip2_qformer(**kwargs, pretrained=str(weights["root"] / "blip2-hf")).eval()
    tokens = torch.randn(2, 65, 64)
    with torch.no_grad():
        assert torch.equal(lavis(tokens), hf(tokens))
    assert torch.equal(lavis.query_tokens, weights["blip2"]["query_tokens"])
    ln_a, ln_b = torch.nn.LayerNorm(64), torch.nn.LayerNorm(64)
    load_ln_vision(ln_a, weights["root"] / "blip2_pretrained_flant5xxl.pth")
    report = load_ln_vision(ln_b, weights["root"] / "blip2-hf")
    assert report.ok and torch.equal(ln_a.weight, ln_b.weight)
    assert torch.equal(ln_a.weight, weights["blip2"]["ln_vision.weight"])


def test_lavis_blip2_file_as_whole_model_checkpoint(weights, model):
    """model.ckpt may name the BLIP-2 file: it covers ln_vision, query_tokens and the Q-Former."""
    (report,) = load_checkpoints(model, [weights["root"] / "blip2_pretrained_flant5xxl.pth"])
    sd = model.state_dict()
    assert report.ok and not report.missing
    assert torch.equal(sd["ln_vision.bias"], weights["blip2"]["ln_vision.bias"])
    assert torch.equal(sd["qformer.bert.encoder.layer.0.crossattention.attention.key.weight"],
                       weights["blip2"]["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
    assert any("word_embeddings" in s for s in report.skipped)


# --- strictness, reports and bad files -----------------------------------------------------------

def test_missing_unexpected_and_misshaped_keys_are_errors_and_load_nothing(tmp_path, model):
    good = random_state(tinygptv_stage(TINY), seed=5)
    cases = {
        "missing": {k: v for k, v in good.items() if not k.endswith("layers.1.self_attn.dense.lora_B.default.weight")},
        "unexpected": {**good, "llama_model.base_model.model.model.layers.0.self_attn.rotary.weight": torch.ones(2)},
        "mismatched": {**good, "llama_proj2.weight": torch.ones(3, 3)},
    }
    before = snapshot(model)
    for kind, state in cases.items():
        torch.save({"model": state}, tmp_path / f"{kind}.pth")
        with pytest.raises(CheckpointError) as err:
            load_checkpoints(model, [tmp_path / f"{kind}.pth"])
        assert f"{kind}.pth" in str(err.value) and f"1 {kind if kind != 'mismatched' else 'shape'}" in str(err.value)
        assert_unchanged(model, before)
    # non-strict loads what fits and reports the rest
    (report,) = load_checkpoints(model, [tmp_path / "missing.pth"], strict=False)
    assert report.missing == ["llm.base_model.model.model.layers.1.self_attn.dense.lora_B.default.weight"]


def test_lora_file_into_model_without_lora_is_refused(tmp_path):
    torch.manual_seed(0)
    plain = build_model(tiny_model_section(lora=None, trainable=["projection", "llm_norms"]), verbose=False)
    torch.save({"model": random_state(tinygptv_stage(TINY))}, tmp_path / "stage.pth")
    with pytest.raises(CheckpointError, match="unexpected"):
        load_checkpoints(plain, [tmp_path / "stage.pth"])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_files_raise_a_clear_error_and_change_nothing(tmp_path, model, damage, suffix):
    state = random_state(tinygptv_stage(TINY), seed=7)
    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        torch.save({"model": state}, good)
    else:
        save_file(state, str(good))
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    load_checkpoints(model, [good])
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        load_checkpoints(model, [bad])
    assert str(bad) in str(err.value)
    assert_unchanged(model, before)


class NotAWeight:
    """Unpickling this would import and build an arbitrary object: weights_only must refuse."""
    def __init__(self):
        self.payload = "code"


def test_pickled_objects_are_refused_not_executed(tmp_path, model):
    torch.save({"model": random_state(tinygptv_stage(TINY)), "extra": NotAWeight()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoints(model, [tmp_path / "evil.pth"])


def test_our_checkpoint_folder_and_bare_safetensors_round_trip(tmp_path, model):
    from tinygpt_v.checkpoints import save_trainable
    folder = tmp_path / "checkpoint_100"
    saved = save_trainable(model, folder / "model.safetensors")
    (folder / "meta.json").write_text(json.dumps({"step": 100, "epoch": 0, "config": {}}))
    assert set(os.listdir(folder)) == {"model.safetensors", "meta.json"}  # no temporary file left
    trainable = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    for path in (folder, saved):
        (report,) = load_checkpoints(model, [path])
        assert report.ok and sorted(report.matched) == sorted(trainable)
        assert all(torch.equal(model.get_parameter(k), v) for k, v in trainable.items())


def test_convert_script_writes_our_format(tmp_path, model):
    import importlib.util
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "scripts/convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    state = random_state(tinygptv_stage(TINY), seed=9)
    torch.save({"model": state}, tmp_path / "stage.pth")
    out = tmp_path / "stage.safetensors"
    assert script.main(["convert", str(tmp_path / "stage.pth"), "--out", str(out),
                        "--config", str(REPO / "configs/models/tiny.yaml")]) == 0
    load_checkpoints(model, [tmp_path / "stage.pth"])
    direct = snapshot(model)
    with torch.no_grad():
        model.connector.llama_proj2.weight.zero_()
    (report,) = load_checkpoints(model, [out])
    assert report.format == "tinygpt_v" and report.ok
    assert_unchanged(model, direct)
    # a file that does not fit is refused with exit status 1, nothing written
    torch.save({"model": {**state, "llama_proj2.weight": torch.ones(2, 2)}}, tmp_path / "bad.pth")
    assert script.main(["convert", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "bad.safetensors"),
                        "--config", str(REPO / "configs/models/tiny.yaml")]) == 1
    assert not (tmp_path / "bad.safetensors").exists()


def test_convert_script_writes_the_original_layout_from_our_checkpoint(tmp_path, model):
    """ours -> the original's names (fused adapter as one query_key_value LoRA) -> ours again."""
    import importlib.util

    from tinygpt_v.checkpoints import save_trainable
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "scripts/convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ours = save_trainable(model, tmp_path / "ours" / "model.safetensors")
    out = tmp_path / "original.pth"
    assert script.main(["to-original", str(ours.parent), "--out", str(out)]) == 0
    written = torch.load(out, weights_only=True)["model"]
    expected = set(tinygptv_stage(TINY))  # the original's names, as listed from REFERENCE.md
    assert set(k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
               for k in written) == expected
    before = snapshot(model)
    with torch.no_grad():
        model.connector.llama_proj2.weight.zero_()
    (report,) = load_checkpoints(model, [out])
    assert report.ok and report.format.startswith("original TinyGPT-V")
    assert_unchanged(model, before)
    assert script.main(["to-original", str(ours.parent), "--out", str(tmp_path / "b.pth"),
                        "--peft-adapter", "default"]) == 0
    assert set(torch.load(tmp_path / "b.pth", weights_only=True)["model"]) == expected
