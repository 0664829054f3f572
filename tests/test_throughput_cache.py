"""Frozen-tower feature cache: same loss bit for bit, stale entries rebuilt, refused where wrong;
trainer runs with the cache, worker processes and prefetching resume exactly."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import tiny_model_section
from conftest_data import toy_root  # noqa: F401  (session fixture)
from omegaconf import OmegaConf
from test_train_runner import fit, losses, tiny_config, trainable_weights

from tinygpt_v.data import build_train_loader
from tinygpt_v.models import build_model
from tinygpt_v.registry import ConfigError
from tinygpt_v.training.feature_cache import FeatureCache, offload_if_complete, setup_input_pipeline


class Run:
    def __init__(self, feature_cache=None):
        self.feature_cache = feature_cache


def align_cfg(toy_root, augment=False):
    return OmegaConf.create({"cc_sbu_align": {
        "batch_size": 4, "vis_processor": {"name": "blip2_image_train", "image_size": 28, "augment": augment},
        "ann_path": f"{toy_root}/cc_sbu_align/filter_cap.json", "image_root": f"{toy_root}/cc_sbu_align/image"}})


def tiny(**overrides):
    torch.manual_seed(0)
    model = build_model(tiny_model_section(**{"vision.image_size": 28, "lora.dropout": 0.0, **overrides}),
                        verbose=False)
    return model.eval()


def batch_losses(model, toy_root, cache_dir=None, steps=3) -> tuple[list[torch.Tensor], FeatureCache | None]:
    loader = build_train_loader(align_cfg(toy_root), seed=1)
    cache = setup_input_pipeline(loader, model, Run(cache_dir), ["projection", "lora"])
    out = []
    for _ in range(steps):
        batch = next(loader)
        out.append(model(cache.fill(batch) if cache else batch)["loss"].detach())
    return out, cache


@pytest.mark.parametrize("qformer", [True, False], ids=["qformer", "vision_tokens"])
def test_loss_with_the_cache_equals_the_loss_without_bit_for_bit(toy_root, tmp_path, qformer):
    model = tiny() if qformer else tiny(qformer=None)  # without a Q-Former: ln_vision'd vision tokens
    plain, _ = batch_losses(model, toy_root)
    written, cache = batch_losses(model, toy_root, tmp_path)  # first pass: computed, then written
    assert cache.hits == 0 and cache.misses == 3
    read, cache = batch_losses(model, toy_root, tmp_path)  # second pass: every image from disk
    assert cache.hits == 12 and cache.misses == 0
    entry = torch.load(next((tmp_path / "cc_sbu_align" / "28px").glob("*/*.pt")), weights_only=True)
    assert entry["features"].shape[0] == (8 if qformer else 5)  # 8 queries; 2x2 patches + CLS
    for a, b, c in zip(plain, written, read, strict=True):
        assert a.item() == b.item() == c.item()  # exact, fp32
    # reused in a later epoch, with other batch mates, an image's features may differ from a
    # recomputation by float rounding only: CPU matmuls are not batch-size invariant
    loader = build_train_loader(align_cfg(toy_root), seed=1)
    pixels = next(loader)["image"]
    with torch.no_grad():
        together, alone = model.image_features(pixels)[2:3], model.image_features(pixels[2:3])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_other_tower_weights_make_the_cache_stale_and_it_is_rebuilt(toy_root, tmp_path, caplog):
    model = tiny()
    batch_losses(model, toy_root, tmp_path, steps=1)
    with torch.no_grad():
        model.qformer.query_tokens.add_(0.01)  # other towers (as another stage-1 checkpoint)
    plain, _ = batch_losses(model, toy_root, steps=1)
    with caplog.at_level(logging.WARNING):
        rebuilt, cache = batch_losses(model, toy_root, tmp_path, steps=1)
    assert any("written with other tower weights" in r.message for r in caplog.records)
    assert cache.hits == 0 and rebuilt[0].item() == plain[0].item()
    again, cache = batch_losses(model, toy_root, tmp_path, steps=1)
    assert cache.hits == 4 and again[0].item() == plain[0].item()


def test_an_entry_of_another_image_size_or_image_is_stale(toy_root, tmp_path):
    model = tiny()
    batch_losses(model, toy_root, tmp_path, steps=1)
    entries = sorted((tmp_path / "cc_sbu_align" / "28px").glob("*/*.pt"))
    assert len(entries) == 4
    entry = torch.load(entries[0], weights_only=True)
    torch.save({**entry, "image_size": 56}, entries[0])
    entry = torch.load(entries[1], weights_only=True)
    torch.save({**entry, "pixel_sum": entry["pixel_sum"] + 1.0}, entries[1])  # another image under that key
    _, cache = batch_losses(model, toy_root, tmp_path, steps=1)
    assert cache.stale == 1 and cache.hits == 0  # the batch is recomputed whole, and rewritten
    _, cache = batch_losses(model, toy_root, tmp_path, steps=1)
    assert cache.stale == 0 and cache.hits == 4


def test_the_cache_is_refused_when_a_tower_trains_or_images_are_augmented(toy_root, tmp_path):
    model = tiny()
    loader = build_train_loader(align_cfg(toy_root), seed=1)
    with pytest.raises(ConfigError, match="run.feature_cache") as error:
        setup_input_pipeline(loader, model, Run(tmp_path), ["projection", "qformer"])
    assert "qformer" in str(error.value)
    loader = build_train_loader(align_cfg(toy_root, augment=True), seed=1)
    with pytest.raises(ConfigError, match="run.feature_cache") as error:
        setup_input_pipeline(loader, model, Run(tmp_path), ["projection"])
    assert "datasets.cc_sbu_align.vis_processor augments" in str(error.value)


def test_a_complete_cache_moves_the_towers_off_the_device(toy_root, tmp_path):
    model = tiny()
    loader = build_train_loader(align_cfg(toy_root), seed=1)
    cache = setup_input_pipeline(loader, model, Run(tmp_path), ["projection"])
    assert not cache.is_complete(loader.datasets)
    for _ in range(12):  # one epoch: 48 samples
        cache.fill(next(loader))
    assert cache.is_complete(loader.datasets)
    expected = [model(cache.fill(next(loader)))["loss"].item() for _ in range(2)]
    assert offload_if_complete(cache, model, loader.datasets, num_processes=1)
    assert model.vision_device.type == "cpu" and model.ln_vision.weight.device.type == "cpu"
    resumed = build_train_loader(align_cfg(toy_root), seed=1)
    resumed.load_state_dict({**loader.state_dict(), "step": 12,
                             "sources": {"cc_sbu_align": {"epoch": 1, "position": 0}}})
    resumed.prepare = loader.prepare
    assert [model(cache.fill(next(resumed)))["loss"].item() for _ in range(2)] == expected


def test_training_with_cache_workers_and_prefetch_resumes_exactly(toy_root, tmp_path):
    straight = tiny_config(toy_root, tmp_path / "straight", save_every=3)
    fit(straight)
    fast = {"feature_cache": str(tmp_path / "cache"), "num_workers": 2, "prefetch": 2, "save_every": 3}
    first = tiny_config(toy_root, tmp_path / "resumed", max_steps=3, **fast)
    fit(first)
    fit({**first, "run": {**first["run"], "max_steps": None, "resume": "auto"}})
    a = trainable_weights(tmp_path / "straight/checkpoint_final")
    b = trainable_weights(tmp_path / "resumed/checkpoint_final")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    # a second run over the warm cache: every image read from disk, the same losses
    warm = fit(tiny_config(toy_root, tmp_path / "warm", **fast))
    assert warm.feature_cache.hits == 12  # (its misses: batches prefetched past the last step)
    assert losses(tmp_path / "warm") == losses(tmp_path / "straight")
    assert json.loads((tmp_path / "cache" / "coco_vqa" / "28px" / "manifest.json").read_text())["image_size"] == 28
