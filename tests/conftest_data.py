"""Fixtures shared by the data tests (loaded by `pytest_plugins = ["conftest_data"]` in tests/test_data_*.py).

The toy world is written once per test session into a temporary folder; `toy_config(name, *options)`
loads configs/datasets/<name> with `paths.toy_data` pointing there.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinygpt_v.config import load_config
from tinygpt_v.data.toy_world import make_toy_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_world")
    make_toy_world(str(root), seed=0, n_train=48, n_heldout=12)
    return root


@pytest.fixture(scope="session")
def toy_scenes(toy_root) -> dict[int, dict]:
    scenes = json.loads((toy_root / "scenes.json").read_text())
    return {s["image_id"]: s for s in scenes["train"] + scenes["heldout"]}


@pytest.fixture(scope="session")
def toy_config(toy_root):
    def load(name: str, *options: str):
        return load_config(REPO / "configs" / "datasets" / name, [f"paths.toy_data={toy_root}", *options])
    return load
