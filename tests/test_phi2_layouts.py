"""`llm.pretrained` may be a Phi-2 folder in any published layout: detected and converted by itself.

Fixtures (tests/fixtures/make_phi2_layout_fixtures.py): tiny Phi folders in the fused layout
written by transformers 4.36.2 and in the phi-msft layout, with the logits transformers 4.36.2
computes on them (msft converted by transformers' own phi-2 converter)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinygpt_v.checkpoints import CheckpointError
from tinygpt_v.checkpoints.phi2_layout import (FUSED, MSFT, TODAY, detect_layout, today_layout_source)
from tinygpt_v.models.llm import hf_causal_lm

FIXTURES = Path(__file__).parent / "fixtures" / "phi2_layouts"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_V_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def expected():
    return load_file(FIXTURES / "expected.safetensors")


def logits(folder, input_ids):
    llm = hf_causal_lm(pretrained=str(folder), model_type="phi", dtype="fp32", attn_implementation="eager").eval()
    with torch.no_grad():
        return llm(input_ids).logits


@pytest.mark.parametrize("layout", [FUSED, MSFT])
def test_old_layout_loads_with_the_reference_logits(layout, expected):
    assert detect_layout(FIXTURES / layout) == layout
    torch.testing.assert_close(logits(FIXTURES / layout, expected["input_ids"]), expected[f"logits_{layout}"],
                               rtol=1e-4, atol=1e-4)


def test_without_the_detection_the_fused_folder_would_load_wrong(expected):
    """What the original's users hit (issues #10, #11, #26): transformers alone reads the fused
    folder with its q/k/v left random."""
    from transformers import AutoModelForCausalLM
    llm = AutoModelForCausalLM.from_pretrained(str(FIXTURES / FUSED), attn_implementation="eager").eval()
    with torch.no_grad():
        plain = llm(expected["input_ids"]).logits
    assert not torch.allclose(plain, expected["logits_fused"], atol=1e-2)


def test_sharded_fused_folder_is_detected_from_its_index(tmp_path, expected):
    """Real Phi-2 folders are sharded: the layout comes from model.safetensors.index.json."""
    state = load_file(FIXTURES / FUSED / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    folder = tmp_path / "phi-2"
    folder.mkdir()
    shutil.copy(FIXTURES / FUSED / "config.json", folder)
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert detect_layout(folder) == FUSED
    torch.testing.assert_close(logits(folder, expected["input_ids"]), expected["logits_fused"], rtol=1e-4, atol=1e-4)


def test_conversion_is_cached_and_redone_when_the_source_changes(tmp_path):
    folder = tmp_path / "msft"
    shutil.copytree(FIXTURES / MSFT, folder)
    first = today_layout_source(folder)
    assert Path(first) != folder and detect_layout(first) == TODAY
    stamp = (Path(first) / "model.safetensors").stat().st_mtime_ns
    assert today_layout_source(folder) == first
    assert (Path(first) / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    (folder / "generation_config.json").write_text("{}")
    assert today_layout_source(folder) != first


def test_today_layout_and_hub_ids_pass_through():
    today = Path(today_layout_source(FIXTURES / FUSED))  # the conversion is a today-layout folder
    assert today_layout_source(today) == str(today)
    assert today_layout_source("microsoft/phi-2") == "microsoft/phi-2"


def test_other_model_families_pass_through(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    assert today_layout_source(folder) == str(folder)


def test_a_folder_without_phi_attention_is_one_clear_error(tmp_path):
    folder = tmp_path / "not_phi"
    folder.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a Phi model.*not_phi|not_phi.*not a Phi model"):
        detect_layout(folder)


def test_bad_msft_config_names_the_file(tmp_path):
    folder = tmp_path / "msft"
    shutil.copytree(FIXTURES / MSFT, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["rotary_dim"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json.*rotary_dim"):
        today_layout_source(folder)
