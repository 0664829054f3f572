"""Mixing by sample_ratio, per-dataset batch sizes, exact resume, DDP sharding, config errors."""
from __future__ import annotations

import io
import json
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from tinygpt_v.data import build_train_loader
from tinygpt_v.registry import ConfigError

pytest_plugins = ["conftest_data"]  # fixtures: toy_root, toy_scenes, toy_config


def mixed_cfg(toy_config, laion_batch=16, align_batch=16):
    """A stream dataset, a map-style one and a text-only one, with small epochs so they wrap."""
    pairs = toy_config("toy_pairs.yaml").datasets
    align = toy_config("toy_align.yaml").datasets
    instruct = toy_config("toy_instruct.yaml").datasets
    return OmegaConf.create({
        "laion": {**OmegaConf.to_container(pairs.laion, resolve=True), "batch_size": laion_batch, "sample_ratio": 2},
        "cc_sbu_align": {**OmegaConf.to_container(align.cc_sbu_align, resolve=True), "batch_size": align_batch, "sample_ratio": 2},
        "unnatural_instruction": {**OmegaConf.to_container(instruct.unnatural_instruction, resolve=True), "batch_size": 3,
                                  "sample_ratio": 1}})


def same_batches(a: list[dict], b: list[dict]) -> bool:
    for x, y in zip(a, b, strict=True):
        if (x["prompt"], x["answer"], x["id"], x["dataset"]) != (y["prompt"], y["answer"], y["id"], y["dataset"]):
            return False
        if (x["image"] is None) != (y["image"] is None) or (x["image"] is not None and not torch.equal(x["image"], y["image"])):
            return False
    return True


def test_ratio_shares_over_10k_draws(toy_config):
    loader = build_train_loader(mixed_cfg(toy_config), seed=42)
    shares = Counter(loader.choose(step) for step in range(10_000))
    for name, ratio in {"laion": 0.4, "cc_sbu_align": 0.4, "unnatural_instruction": 0.2}.items():
        assert abs(shares[name] / 10_000 - ratio) < 0.02, (name, shares)
    # the original stage-1 mix: LAION 115 : CC+SBU 14
    loader = build_train_loader(toy_config("toy_pairs.yaml").datasets, seed=0)
    shares = Counter(loader.choose(step) for step in range(10_000))
    assert abs(shares["laion"] / 10_000 - 115 / 129) < 0.02


def test_each_batch_is_one_dataset_at_its_batch_size(toy_config):
    loader = build_train_loader(mixed_cfg(toy_config, laion_batch=5, align_batch=4), seed=1)
    sizes = {"laion": 5, "cc_sbu_align": 4, "unnatural_instruction": 3}
    for step in range(12):
        expected = loader.choose(step)
        batch = next(loader)
        assert set(batch["dataset"]) == {expected} and len(batch["id"]) == sizes[expected]
        assert (batch["image"] is None) == (expected == "unnatural_instruction")


def test_resume_gives_the_same_batches(toy_config):
    cfg = mixed_cfg(toy_config)
    first = build_train_loader(cfg, seed=7)
    for _ in range(9):  # crosses epoch ends: 48 samples per epoch, batches of 16
        next(first)
    state = first.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # plain data only
    assert json.loads(json.dumps(state)) == state
    expected = [next(first) for _ in range(8)]

    resumed = build_train_loader(cfg, seed=7)
    resumed.load_state_dict(state)
    assert same_batches([next(resumed) for _ in range(8)], expected)
    assert resumed.state_dict() == first.state_dict()
    epochs = {name: s["epoch"] for name, s in first.state_dict()["sources"].items()}
    assert epochs["laion"] >= 1 or epochs["cc_sbu_align"] >= 1  # the test did cross an epoch


def test_worker_threads_do_not_change_the_batches(toy_config):
    serial = build_train_loader(mixed_cfg(toy_config), seed=5)
    threaded = build_train_loader(mixed_cfg(toy_config), seed=5, num_workers=2)
    assert same_batches([next(serial) for _ in range(5)], [next(threaded) for _ in range(5)])
    threaded.close()


def test_a_different_seed_gives_a_different_stream(toy_config):
    a = build_train_loader(mixed_cfg(toy_config), seed=1)
    b = build_train_loader(mixed_cfg(toy_config), seed=2)
    assert not same_batches([next(a) for _ in range(4)], [next(b) for _ in range(4)])


def epoch_ids(entry_cfg, rank, world_size, steps):
    loader = build_train_loader(entry_cfg, seed=3, rank=rank, world_size=world_size)
    return [i for _ in range(steps) for i in next(loader)["id"]]


@pytest.mark.parametrize("config, entry, world_size", [
    ("toy_align.yaml", "cc_sbu_align", 2),  # map-style: interleaved permutation
    ("toy_pairs.yaml", "laion", 2),         # two shards, two ranks: one shard each
    ("toy_pairs.yaml", "laion", 3),         # fewer shards than ranks: every third sample
])
def test_ranks_see_disjoint_shards(toy_config, config, entry, world_size):
    options = OmegaConf.to_container(toy_config(config).datasets[entry], resolve=True)
    cfg = OmegaConf.create({entry: {**options, "batch_size": 1}})
    per_rank = 48 // world_size
    seen = [epoch_ids(cfg, r, world_size, per_rank) for r in range(world_size)]
    assert all(len(set(ids)) == per_rank for ids in seen)
    union = set().union(*map(set, seen))
    assert len(union) == 48  # disjoint and complete


def test_config_errors_name_the_key(toy_config):
    with pytest.raises(ConfigError, match=r"datasets\.coco_vqa\.image_root: path does not exist: /nowhere"):
        toy_config("toy_vqa.yaml", "datasets.coco_vqa.image_root=/nowhere")
    with pytest.raises(ConfigError, match=r"datasets\.gqa\.ann_pahts: unknown key \(did you mean 'ann_paths'\?\)"):
        toy_config("toy_vqa.yaml", "datasets.gqa.ann_pahts=x")
    with pytest.raises(ConfigError, match=r"datasets\.refcocop\.builder: unknown dataset 'refcocoo'"):
        toy_config("toy_grounding.yaml", "datasets.refcocop.builder=refcocoo")
    with pytest.raises(ConfigError, match=r"datasets\.laion\.sample_ratio: must be (positive|greater than 0)"):
        toy_config("toy_pairs.yaml", "datasets.laion.sample_ratio=0")
    with pytest.raises(ConfigError, match=r"datasets\.laion\.batch_size: required key is missing"):
        build_train_loader({"laion": {"shards": "x.tar"}}, seed=0)


def test_grounding_refuses_a_box_moving_augmentation(toy_config):
    options = OmegaConf.to_container(toy_config("toy_grounding.yaml").datasets.refcoco, resolve=True)
    options["vis_processor"]["augment"] = True
    with pytest.raises(ConfigError, match=r"datasets\.refcoco\.vis_processor\.augment: grounding data cannot"):
        build_train_loader({"refcoco": options}, seed=0)


def test_missing_root_and_empty_shard_list_fail_at_start_up(toy_config, tmp_path):
    options = OmegaConf.to_container(toy_config("toy_align.yaml").datasets.cc_sbu_align, resolve=True)
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(ConfigError, match=rf"datasets\.cc_sbu_align\.image_root: .*{missing}"):
        build_train_loader({"cc_sbu_align": {**options, "image_root": missing}}, seed=0)
    pattern = str(tmp_path / "shards" / "{00000..00009}.tar")
    with pytest.raises(ConfigError, match=r"datasets\.laion\.shards: no shard files match") as error:
        build_train_loader({"laion": {"batch_size": 2, "shards": pattern}}, seed=0)
    assert pattern in str(error.value)
