"""Loading ahead (worker processes + a prefetch thread) changes neither the batches nor a resume."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from tinygpt_v.data import build_train_loader
from tinygpt_v.data.prefetch import Prefetcher

pytest_plugins = ["conftest_data"]  # fixtures: toy_root, toy_scenes, toy_config


def cfg_with_skips(toy_config, toy_root, tmp_path):
    """A map-style dataset where every 4th caption is empty (a counted skip), a stream, text only."""
    pairs = OmegaConf.to_container(toy_config("toy_pairs.yaml").datasets, resolve=True)
    align = OmegaConf.to_container(toy_config("toy_align.yaml").datasets, resolve=True)
    instruct = OmegaConf.to_container(toy_config("toy_instruct.yaml").datasets, resolve=True)
    data = json.loads((toy_root / "cc_sbu_align/filter_cap.json").read_text())
    for i, record in enumerate(data["annotations"]):
        if i % 4 == 1:
            record["caption"] = "   "
    (tmp_path / "filter_cap.json").write_text(json.dumps(data))
    return OmegaConf.create({
        "laion": {**pairs["laion"], "batch_size": 5, "sample_ratio": 1},
        "cc_sbu_align": {**align["cc_sbu_align"], "ann_path": str(tmp_path / "filter_cap.json"),
                         "batch_size": 6, "sample_ratio": 2},
        "unnatural_instruction": {**instruct["unnatural_instruction"], "batch_size": 3, "sample_ratio": 1}})


def fingerprint(batch: dict) -> tuple:
    image = None if batch["image"] is None else batch["image"].double().sum().item()
    return batch["dataset"][0], tuple(batch["id"]), image, str(batch["prompt"]), str(batch["answer"])


def draw(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_with_workers_and_prefetch_matches_an_uninterrupted_one(toy_config, toy_root, tmp_path, workers):
    cfg = cfg_with_skips(toy_config, toy_root, tmp_path)
    plain = build_train_loader(cfg, seed=3)
    expected = draw(plain, 14)  # crosses cc_sbu_align's epoch end (36 good samples of 48)

    first = build_train_loader(cfg, seed=3, num_workers=workers, prefetch=2)
    head = draw(first, 6)
    state = first.state_dict()  # the thread has prepared batches 7 and 8 already: not counted
    first.close()
    assert state["step"] == 6

    resumed = build_train_loader(cfg, seed=3, num_workers=workers, prefetch=2)
    resumed.load_state_dict(state)
    tail = draw(resumed, 8)
    for got, want in zip(head + tail, expected, strict=True):
        assert fingerprint(got) == fingerprint(want)
        if want["image"] is not None:
            assert torch.equal(got["image"], want["image"])
    # skip counts and samples used carried over exactly, not the prepared-ahead batches'
    assert resumed.state_dict() == plain.state_dict()
    assert plain.skip_counts()["cc_sbu_align"]["empty_text"] > 0
    assert resumed.health_summary() == plain.health_summary()
    resumed.close()


def test_worker_processes_give_the_batches_of_the_main_process(toy_config):
    cfg = toy_config("toy_align.yaml").datasets
    serial = build_train_loader(cfg, seed=5)
    forked = build_train_loader(cfg, seed=5, num_workers=2)
    for a, b in zip(draw(serial, 4), draw(forked, 4)):
        assert a["id"] == b["id"] and torch.equal(a["image"], b["image"])
    forked.close()


def test_an_error_while_prefetching_arrives_at_its_own_position():
    produced = iter(range(3))

    def produce():
        n = next(produced, None)
        if n is None:
            raise RuntimeError("dataset x: 1000 samples in a row were bad")
        return {"n": n}, {"step": n + 1}

    prefetcher = Prefetcher(produce, depth=2)
    assert [prefetcher.get()[0]["n"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="in a row were bad"):
        prefetcher.get()
    prefetcher.close()
