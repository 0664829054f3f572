"""LLM families and vision encoders beyond Phi-2 / EVA (issue 21).

Every Llama-style family of tinygpt_v.models.llm.FAMILIES, at toy sizes behind the tiny SigLIP
twin (configs/models/tiny_siglip_qwen2.yaml with its LLM swapped): builds with TinyGPT-V's two
norms as real modules, generates, trains a few steps on the toy world, reloads its checkpoint
and its export identically. The added norms are checked against the family's own layers: with
the norms replaced by identities the layer computes exactly what transformers' layer does.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO
from conftest_data import toy_root  # noqa: F401  (session fixture: the toy world in a temp folder)
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tinygpt_v.config import load_config, to_plain
from tinygpt_v.models import TinyGPTV, build_model
from tinygpt_v.models.llm import (FAMILIES, QKNormAttention, add_norms_like, add_post_attn_norm, add_qk_layernorm,
                                  added_norm_keys)
from tinygpt_v.models.parameters import parameter_groups
from tinygpt_v.registry import ConfigError
from tinygpt_v.training.trainer import Trainer

TOY_LLM = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
           "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
# per family: what its toy config needs beyond TOY_LLM
FAMILY_CONFIG = {"llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 16}, "gemma": {"head_dim": 16},
                 "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16}, "phi3": {}}
LLAMA_STYLE = sorted(set(FAMILIES) - {"phi"})
IMAGE = 28  # 2x2 patches of 14 px: one image token after the 2x2 pixel shuffle


def family_section(model_type: str, preset: str = "tiny_siglip_qwen2", **overrides) -> dict:
    cfg = OmegaConf.load(REPO / "configs" / "models" / f"{preset}.yaml").model
    cfg.llm.model_type = model_type
    cfg.llm.config = {**TOY_LLM, **FAMILY_CONFIG[model_type]}
    cfg.vision.image_size = IMAGE
    cfg.lora.dropout = 0.0
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return OmegaConf.to_container(cfg, resolve=True)


def decoder_layers(model: TinyGPTV) -> nn.ModuleList:
    return model.llm.get_base_model().get_decoder().layers


def test_every_llama_style_family_has_a_test():
    assert LLAMA_STYLE == sorted(FAMILY_CONFIG)


# --- the added modules are exact where they are identities ------------------------------------------

@pytest.mark.parametrize("model_type", LLAMA_STYLE)
def test_added_norms_as_identities_give_the_family_layer_exactly(model_type):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TOY_LLM, **FAMILY_CONFIG[model_type])
    config._attn_implementation = "eager"  # Gemma 2's soft-capping lives in the eager path
    reference = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(1, 1024, (2, 9))
    expected = reference(ids).logits
    normed = copy.deepcopy(reference)
    add_qk_layernorm(normed, 1e-5)
    add_post_attn_norm(normed, 1e-6)
    changed = normed(ids).logits
    for layer in normed.model.layers:
        for name in ("q_layernorm", "k_layernorm", "post_layernorm"):
            if hasattr(layer.self_attn, name):
                setattr(layer.self_attn, name, nn.Identity())
            if hasattr(layer, name):
                setattr(layer, name, nn.Identity())
    assert torch.equal(normed(ids).logits, expected)
    assert not torch.allclose(changed, expected, atol=1e-3)  # the real norms do act


@pytest.mark.parametrize("model_type", ["qwen2", "phi3"])
def test_added_norms_survive_a_round_trip_through_transformers(model_type, tmp_path):
    """What a quantised copy needs: transformers' class drops the added norms; add_norms_like puts
    them back with their weights and eps."""
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TOY_LLM)).eval()
    add_qk_layernorm(source, 1e-4)
    add_post_attn_norm(source, 1e-3)
    for name, param in source.named_parameters():
        if "layernorm" in name:
            param.data.normal_()
    added = added_norm_keys(source)
    assert len(added) == 2 * 5  # per layer: q/k LayerNorm weight + bias, the RMSNorm weight
    source.save_pretrained(tmp_path, state_dict={k: v for k, v in source.state_dict().items() if k not in added})
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    add_norms_like(rebuilt, source)
    ids = torch.randint(1, 1024, (1, 6))
    assert torch.equal(rebuilt(ids).logits, source(ids).logits)
    assert rebuilt.model.layers[1].post_layernorm.eps == 1e-3


def test_qwen3_keeps_its_own_qk_norm_and_gemma2_its_own_post_attention_norm():
    qwen3 = build_model(family_section("qwen3"), verbose=False)
    attention = decoder_layers(qwen3)[0].self_attn
    assert not isinstance(attention, QKNormAttention) and not hasattr(attention, "q_layernorm")
    assert hasattr(attention, "q_norm") and hasattr(decoder_layers(qwen3)[0], "post_layernorm")
    gemma2 = build_model(family_section("gemma2"), verbose=False)
    layer = decoder_layers(gemma2)[0]
    assert isinstance(layer.self_attn, QKNormAttention) and not hasattr(layer, "post_layernorm")
    assert type(layer).__name__ == "Gemma2DecoderLayer"


# --- configuration --------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", LLAMA_STYLE)
def test_default_lora_targets_and_norm_groups_per_family(model_type):
    model = build_model(family_section(model_type), verbose=False)
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert adapted == set(FAMILIES[model_type].lora_targets)
    groups = parameter_groups(model)
    norms = groups["llm_norms"]
    layer0 = "llm.base_model.model.model.layers.0."
    assert f"{layer0}input_layernorm.weight" in norms and "llm.base_model.model.model.norm.weight" in norms
    qk = ("self_attn.q_norm.weight",) if model_type == "qwen3" else ("self_attn.q_layernorm.weight",)
    post = "post_attention_layernorm.weight" if model_type == "gemma2" else "post_layernorm.weight"
    assert {f"{layer0}{name}" for name in (*qk, post)} <= set(norms)
    # RMSNorms have no bias; the only norm biases are those of the added QK LayerNorms
    assert all(".q_layernorm.bias" in n or ".k_layernorm.bias" in n for n in groups["llm_norm_biases"])
    assert all(p.requires_grad for p in norms.values())
    assert not any(p.requires_grad for p in groups["llm"].values())


def test_pretrained_folder_of_a_family_loads_its_weights_and_gains_the_norms(tmp_path):
    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **TOY_LLM))
    saved.save_pretrained(tmp_path / "qwen2")
    section = family_section("qwen2", **{"llm.pretrained": str(tmp_path / "qwen2"), "llm.config": None})
    model = build_model(section, verbose=False)
    weights = {k.replace(".base_layer", ""): v for k, v in model.llm.get_base_model().state_dict().items()}
    assert all(torch.equal(weights[k], v) for k, v in saved.state_dict().items())
    assert hasattr(decoder_layers(model)[0], "post_layernorm")
    assert hasattr(decoder_layers(model)[0].self_attn, "q_layernorm")
    section["llm"]["model_type"] = "llama"  # the YAML says one family, the folder holds another
    with pytest.raises(ConfigError, match=r"model\.llm\.model_type.*'qwen2'"):
        build_model(section, verbose=False)


def test_fused_qkv_is_refused_for_other_families_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.lora\.fused_qkv.*'qwen2'"):
        build_model(family_section("qwen2", **{"lora.fused_qkv": True}), verbose=False)


def test_a_family_without_an_entry_needs_its_lora_targets_named():
    section = family_section("qwen2", **{"llm.qk_layernorm": False, "llm.post_attn_norm": False})
    section["llm"]["model_type"] = "gpt2"
    section["llm"]["config"] = {"vocab_size": 1024, "n_embd": 64, "n_layer": 1, "n_head": 4}
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules.*'gpt2'"):
        build_model(section, verbose=False)
    section["lora"]["target_modules"] = ["c_attn"]
    model = build_model(section, verbose=False)
    assert any(".c_attn.lora_A" in name for name, _ in model.named_parameters())


def test_a_family_without_an_entry_is_named_when_norms_are_asked_for():
    section = family_section("qwen2")
    section["llm"]["model_type"] = "gpt2"
    section["llm"]["config"] = {"vocab_size": 1024, "n_embd": 64, "n_layer": 1, "n_head": 4}
    with pytest.raises(ConfigError, match=r"model\.llm\.qk_layernorm.*gpt2.*supported"):
        build_model(section, verbose=False)


# --- vision encoders and the connector ---------------------------------------------------------------

def test_clip_encoder_penultimate_block_without_class_token():
    from tinygpt_v.models.vision import timm_model
    kwargs = {"image_size": 28, "patch_size": 14, "embed_dim": 32, "depth": 3, "num_heads": 2}
    full = timm_model("vit_base_patch16_clip_224.openai", **kwargs)
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 28, 28)
    assert full(pixels).shape == (1, 5, 32)  # class token + 2x2 patches
    penultimate = timm_model("vit_base_patch16_clip_224.openai", feature_layer=-2, keep_cls=False, **kwargs)
    penultimate.load_state_dict(full.state_dict(), strict=False)
    assert len(penultimate.model.blocks) == 2
    # by hand: the same tower's first two blocks, no final norm, class token dropped
    m = full.model
    x = m.norm_pre(m._pos_embed(m.patch_embed(pixels)))
    expected = m.blocks[1](m.blocks[0](x))[:, 1:]
    assert torch.allclose(penultimate(pixels), expected, atol=1e-6)
    with pytest.raises(ConfigError, match="model.vision.feature_layer"):
        timm_model("vit_base_patch16_clip_224.openai", feature_layer=5, **kwargs)


def test_siglip_sees_its_own_normalisation_from_clip_normalised_pixels():
    from tinygpt_v.data.processors import CLIP_MEAN, CLIP_STD
    from tinygpt_v.models.vision import timm_model
    encoder = timm_model("vit_base_patch16_siglip_224.v2_webli", image_size=28, patch_size=14, embed_dim=32,
                         depth=1, num_heads=2)
    assert encoder.mean == encoder.std == (0.5, 0.5, 0.5)  # timm's pretrained config of SigLIP 2
    raw = torch.rand(2, 3, 28, 28)
    clip = (raw - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(encoder.renormalize(clip), (raw - 0.5) / 0.5, atol=1e-5)
    assert torch.allclose(encoder(clip), encoder.model.forward_features((raw - 0.5) / 0.5), atol=1e-5)
    clip_encoder = timm_model("vit_base_patch16_clip_224.openai", image_size=28, patch_size=14, embed_dim=32,
                              depth=1, num_heads=2)
    assert clip_encoder.renormalize(clip) is clip  # CLIP statistics: pixels pass as they are


def test_pixel_shuffle_merges_each_2x2_block_of_patches():
    from tinygpt_v.models.connector import pixel_shuffle
    connector = pixel_shuffle(in_width=2, out_width=8, factor=2)
    nn.init.eye_(connector.proj.weight)
    grid = torch.arange(16 * 2, dtype=torch.float32).view(1, 16, 2)  # 4x4 patches, 2 features each
    out = connector(grid)
    assert out.shape == (1, 4, 8) and connector.num_output_tokens(16) == 4
    # first merged token: patches (0,0) (0,1) (1,0) (1,1) = tokens 0, 1, 4, 5
    assert out[0, 0].tolist() == grid[0, [0, 1, 4, 5]].flatten().tolist()
    with pytest.raises(ValueError, match="keep_cls: false"):
        connector(torch.zeros(1, 17, 2))


# --- build, generate, train, reload, export per family -----------------------------------------------

def training_config(model: dict, toy_root: Path, output_dir: Path, steps: int = 3) -> dict:
    return {
        "model": model,
        "datasets": {"coco_vqa": {"batch_size": 2, "vis_processor": {"name": "blip2_image_train", "image_size": IMAGE},
                                  "ann_paths": [f"{toy_root}/vqav2/vqa_train.json"], "image_root": f"{toy_root}/coco"}},
        "run": {"output_dir": str(output_dir), "lr_sched": "constant_lr", "init_lr": 1e-3, "max_epoch": 1,
                "iters_per_epoch": steps, "device": "cpu", "cpu_threads": 1, "wandb": False, "tensorboard": False,
                "log_every": 1, "seed": 3},
    }


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("model_type", LLAMA_STYLE)
def test_family_trains_generates_reloads_and_exports(model_type, toy_root, tmp_path, one_thread):  # noqa: F811
    section = family_section(model_type)
    trainer = Trainer(OmegaConf.create(training_config(section, toy_root, tmp_path / "run")))
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.fit()
    trained = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(".lora_B" in n for n in trained) and any("layernorm" in n for n in trained)
    model.eval()
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    prompts = ["<ImageHere> What colour is the circle?", "<ImageHere> How many shapes?"]
    answers = model.generate(pixels, prompts, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    # the training checkpoint rebuilds the same model (other seed: every weight comes from the file)
    torch.manual_seed(99)
    reloaded = build_model({**section, "ckpt": str(tmp_path / "run" / "checkpoint_final")}, verbose=False).eval()
    assert_same_model(model, reloaded, pixels, prompts, answers)

    # export and from_pretrained, from a moved folder
    model.save_pretrained(tmp_path / "export")
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "export", moved)
    assert_same_model(model, TinyGPTV.from_pretrained(moved).eval(), pixels, prompts, answers)


def assert_same_model(model: TinyGPTV, other: TinyGPTV, pixels, prompts, answers) -> None:
    theirs = dict(other.named_parameters())
    assert set(theirs) == {n for n, _ in model.named_parameters()}
    assert all(torch.equal(p, theirs[n]) for n, p in model.named_parameters())
    assert other.generate(pixels, prompts, max_new_tokens=4) == answers


# --- presets -----------------------------------------------------------------------------------------

PRESETS = {"siglip2_qwen25_0p5b": ("tiny_siglip_qwen2", "qwen2"), "siglip_smollm2_360m": ("tiny_siglip_llama", "llama"),
           "clip_qwen3_0p6b": ("tiny_clip_qwen3", "qwen3")}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_names_hub_sources_and_its_twin_has_the_same_classes(preset):
    real = OmegaConf.load(REPO / "configs" / "models" / f"{preset}.yaml").model
    twin_name, model_type = PRESETS[preset]
    twin = OmegaConf.load(REPO / "configs" / "models" / f"{twin_name}.yaml").model
    assert real.llm.model_type == twin.llm.model_type == model_type
    assert "/" in real.llm.pretrained and real.tokenizer.path == real.llm.pretrained  # a hub id
    assert real.vision.pretrained is True and twin.vision.pretrained is False
    for part in ("vision", "connector", "llm", "tokenizer"):
        assert real[part].name == twin[part].name or part == "tokenizer"
    assert real.vision.model_name.split(".")[0] == twin.vision.model_name.split(".")[0]
    assert "qformer" not in real and "qformer" not in twin


@pytest.mark.parametrize("twin", ["tiny_siglip_qwen2", "tiny_siglip_llama", "tiny_clip_qwen3"])
def test_tiny_twin_builds_and_answers(twin):
    torch.manual_seed(0)
    model = build_model(to_plain(OmegaConf.load(REPO / "configs" / "models" / f"{twin}.yaml").model), verbose=False)
    pixels = torch.randn(1, 3, 112, 112)
    loss = model({"image": pixels, "prompt": [["<ImageHere> What is it?"]], "answer": [["a red circle"]]})["loss"]
    assert torch.isfinite(loss)
    assert len(model.generate(pixels, ["<ImageHere> What is it?"], max_new_tokens=3)) == 1


def copy_configs(tmp_path: Path) -> Path:
    """The repo's configs/ and train_configs/ under tmp_path, so stage copies resolve their includes."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copytree(REPO / "train_configs", tmp_path / "train_configs")
    return tmp_path / "train_configs"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_four_stage_configs_take_a_preset_by_changing_defaults_only(preset, tmp_path):
    from tinygpt_v.models import check_model_section
    from tinygpt_v.training.preflight import check_training_config
    stages = copy_configs(tmp_path)
    for k in (1, 3, 4):  # stage 2 includes stage 1
        path = stages / f"stage{k}.yaml"
        path.write_text(path.read_text().replace("models/tinygpt_v.yaml", f"models/{preset}.yaml"))
    for k in (1, 2, 3, 4):
        # the datasets of stages 3-4 name files that are not here: check the model side as load does
        cfg = to_plain(load_config(stages / f"stage{k}.yaml", ["model.ckpt=null"], validate=False))
        check_model_section(cfg["model"])
        check_training_config(cfg)  # trainable groups exist; datasets' image size = the encoder's
        assert cfg["model"]["llm"]["pretrained"] == OmegaConf.load(stages.parent / "configs/models" /
                                                                   f"{preset}.yaml").model.llm.pretrained
        assert cfg["model"]["vision"]["name"] == "timm" and not cfg["model"].get("qformer")


# --- the demo with a modern tiny preset ----------------------------------------------------------------

def demo_modern_options() -> list[str]:
    """The `--options` documented in train_configs/demo.yaml for the SigLIP + Qwen2 demo."""
    text = (REPO / "train_configs" / "demo.yaml").read_text()
    block = text.split("DEMO_MODERN_OPTIONS:", 1)[1].split("\n\n", 1)[0]
    return [line.lstrip("#").strip() for line in block.splitlines()[1:] if line.lstrip("#").strip()]


def test_demo_stages_take_the_modern_tiny_preset_through_options():
    options = demo_modern_options()
    twin = to_plain(OmegaConf.load(REPO / "configs" / "models" / "tiny_siglip_qwen2.yaml").model)
    for k in (1, 2, 3, 4):
        cfg = to_plain(load_config(REPO / "train_configs" / f"demo_stage{k}.yaml", [*options, "model.ckpt=null"],
                                   validate=False))
        model = cfg["model"]
        assert model["vision"] == twin["vision"] and model["connector"] == twin["connector"]
        assert model["llm"]["model_type"] == "qwen2" and model["lora"]["fused_qkv"] is False
    built = build_model(model, verbose=False)
    assert type(decoder_layers(built)[0]).__name__ == "Qwen2DecoderLayerWithPostNorm"
    # the rest of the phi-sized toy config carries over: no partial rotary for Qwen2
    assert built.llm.config.rope_parameters.get("partial_rotary_factor", 1.0) == 1.0
