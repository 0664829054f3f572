"""Length-grouped batches: deterministic, resumable, less padding, and the batch loss is the
token-weighted mean of the per-sample losses. Also: the decode options reach generate."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_section
from omegaconf import OmegaConf

from tinygpt_v.data import build_train_loader
from tinygpt_v.data.mixing import group_by_length
from tinygpt_v.models import build_model
from tinygpt_v.models.tinygpt_v import IGNORE
from tinygpt_v.registry import ConfigError

pytest_plugins = ["conftest_data"]  # fixtures: toy_root, toy_scenes, toy_config


def conversation_cfg(toy_config, grouped: bool, batch_size: int = 4):
    entry = OmegaConf.to_container(toy_config("toy_instruct.yaml").datasets.llava_conversation, resolve=True)
    return OmegaConf.create({"llava_conversation": {**entry, "batch_size": batch_size, "group_by_length": grouped}})


def test_grouping_sorts_within_mega_batches_and_keeps_every_index():
    lengths = [7, 1, 9, 3, 5, 2, 8, 4]
    order = group_by_length(list(range(8)), lengths, 2, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(8))
    batches = [order[i:i + 2] for i in range(0, 8, 2)]
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [[1, 2], [3, 4], [5, 7], [8, 9]]


def test_grouped_batches_are_deterministic_and_resume_exactly(toy_config):
    cfg = conversation_cfg(toy_config, grouped=True)
    straight = build_train_loader(cfg, seed=2)
    expected = [next(straight)["id"] for _ in range(8)]
    first = build_train_loader(cfg, seed=2)
    head = [next(first)["id"] for _ in range(3)]
    resumed = build_train_loader(cfg, seed=2)
    resumed.load_state_dict(first.state_dict())
    assert head + [next(resumed)["id"] for _ in range(5)] == expected
    plain = build_train_loader(conversation_cfg(toy_config, grouped=False), seed=2)
    assert [next(plain)["id"] for _ in range(8)] != expected  # the option does change the order


def test_grouping_a_stream_is_a_config_error_naming_the_key(toy_config):
    entry = OmegaConf.to_container(toy_config("toy_pairs.yaml").datasets.laion, resolve=True)
    with pytest.raises(ConfigError, match="datasets.laion.group_by_length"):
        build_train_loader(OmegaConf.create({"laion": {**entry, "group_by_length": True}}), seed=0)


def test_batch_loss_is_the_token_weighted_mean_of_the_sample_losses(toy_config):
    torch.manual_seed(0)
    model = build_model(tiny_model_section(**{"lora.dropout": 0.0, "max_txt_len": 128}), verbose=False).eval()
    batch = next(build_train_loader(conversation_cfg(toy_config, grouped=False), seed=4))
    with torch.no_grad():
        whole = model(batch)
        parts = [model({"image": batch["image"][i:i + 1], "prompt": batch["prompt"][i:i + 1],
                        "answer": batch["answer"][i:i + 1]}) for i in range(len(batch["id"]))]
    targets = [p["num_target_tokens"] for p in parts]
    assert whole["num_target_tokens"] == sum(targets) and len(set(targets)) > 1  # samples of unequal length
    weighted = sum(p["loss"].double() * n for p, n in zip(parts, targets)) / sum(targets)
    # padding changes nothing but float rounding (right padding, causal attention)
    assert whole["loss"].double().item() == pytest.approx(weighted.item(), rel=1e-6)
    tokens = model.training_tokens(batch["image"], batch["prompt"], batch["answer"])
    assert int((tokens["labels"][:, 1:] != IGNORE).sum()) == sum(targets)


def test_decode_options_from_settings_reach_generate(monkeypatch):
    from tinygpt_v.inference.settings import GenerationSettings
    assert GenerationSettings(static_cache=True, compile=True).generate_kwargs()["static_cache"] is True
    assert "static_cache" not in GenerationSettings().generate_kwargs()
    torch.manual_seed(0)
    model = build_model(tiny_model_section(), verbose=False).eval()
    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs)
        return torch.zeros((1, 1), dtype=torch.long)
    monkeypatch.setattr(model.llm, "generate", fake_generate)
    model.decode_options = {"static_cache": True, "compile": False}
    model.generate(None, ["hello"], max_new_tokens=2)
    assert seen["cache_implementation"] == "static" and seen["disable_compile"] is True
    model.generate(None, ["hello"], max_new_tokens=2, static_cache=False)
    assert seen["cache_implementation"] is None
