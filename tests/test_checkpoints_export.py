"""Export -> from_pretrained: a self-contained folder that rebuilds the same model."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import tiny_model_section

from tinygpt_v.checkpoints import CheckpointError, load_checkpoints
from tinygpt_v.models import TinyGPTV, build_model

SECTION = tiny_model_section(**{"vision.precision": "bf16"})  # frozen parts in half precision


def logits(model: TinyGPTV) -> torch.Tensor:
    """Image + text through the whole model, deterministic (eval mode)."""
    model.eval()
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    prompts = [["<Img><ImageHere></Img> what shape is this?"], ["<Img><ImageHere></Img> describe it"]]
    answers = [["a red circle"], ["two blue squares"]]
    with torch.no_grad():
        embeds, mask, _ = model.prepare_training_inputs(images, prompts, answers)
        return model.llm(inputs_embeds=embeds, attention_mask=mask).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 'trained' model (every weight perturbed so nothing is at its init) and its export."""
    torch.manual_seed(0)
    model = build_model(SECTION, verbose=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("export") / "tinygpt_v_tiny"
    model.save_pretrained(folder, SECTION)
    return model, folder


def test_export_folder_is_self_contained_and_round_trips(exported, tmp_path):
    model, folder = exported
    assert {"config.yaml", "model.safetensors"} <= set(os.listdir(folder))
    assert not any(name.startswith(".") for name in os.listdir(folder))  # no temporary files left
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)  # nothing refers back to where it was written or built from
    loaded = TinyGPTV.from_pretrained(moved)
    assert torch.equal(logits(loaded), logits(model))
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(original[k].dtype == reloaded[k].dtype for k in original)
    # a bf16 vision tower: Linear/Conv weights bf16, the rest fp32 (as the original's fp16 EVA)
    assert reloaded["vision.model.blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    assert reloaded["vision.model.pos_embed"].dtype == torch.float32
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
    assert loaded.tokenizer("a red circle")["input_ids"] == model.tokenizer("a red circle")["input_ids"]


def test_export_config_has_no_external_sources(exported):
    from omegaconf import OmegaConf
    _, folder = exported
    config = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml").model)
    assert config["tokenizer"] == {"name": "hf", "path": "."}
    assert config["llm"]["pretrained"] is None and "ckpt" not in config
    assert config["llm"]["config"]["num_attention_heads"] == 4  # the full LLM architecture is written out


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_export_gives_a_clear_error(exported, tmp_path, damage):
    model, folder = exported
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(len(data)))
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        TinyGPTV.from_pretrained(broken)
    assert str(weights) in str(err.value)
    # loading the broken weights into a live model changes nothing in it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_checkpoints(model, [broken])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_of_a_different_model_is_refused_by_name(exported, tmp_path):
    _, folder = exported
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    config = (other / "config.yaml").read_text().replace("r: 8", "r: 4")
    (other / "config.yaml").write_text(config)
    with pytest.raises(CheckpointError, match="lora_A"):
        TinyGPTV.from_pretrained(other)


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.yaml"):
        TinyGPTV.from_pretrained(tmp_path)


def test_export_script_bakes_a_training_checkpoint_into_the_folder(tmp_path):
    """scripts/convert_checkpoint.py export: config + trained checkpoint -> one loadable folder."""
    import importlib.util

    from conftest import REPO

    from tinygpt_v.checkpoints import save_trainable
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "scripts/convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.manual_seed(1)
    trained = build_model(tiny_model_section(), verbose=False)
    with torch.no_grad():
        trained.connector.llama_proj2.weight.fill_(0.25)
    save_trainable(trained, tmp_path / "checkpoint_5" / "model.safetensors")
    out = tmp_path / "exported"
    assert script.main(["export", "--config", str(REPO / "configs/models/tiny.yaml"), "--out", str(out),
                        "--ckpt", str(tmp_path / "checkpoint_5")]) == 0
    loaded = TinyGPTV.from_pretrained(out)
    assert torch.all(loaded.connector.llama_proj2.weight == 0.25)
