"""Shared fixtures: the tiny model preset (same classes as the paper's, toy sizes)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_model_section(**overrides) -> dict:
    """The `model:` section of configs/models/tiny.yaml as a plain dict, with overrides
    given as dotted keys, e.g. tiny_model_section(**{"llm.dtype": "fp32"})."""
    cfg = OmegaConf.load(REPO / "configs/models/tiny.yaml").model
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture
def tiny_model():
    from tinygpt_v.models import build_model
    torch.manual_seed(0)
    return build_model(tiny_model_section(), verbose=False)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Code under test may set launcher variables in os.environ (the distributed trainer does, on
    purpose, for a pipeline's next stage): no test sees another test's environment."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
