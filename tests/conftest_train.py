"""What the trainer tests share: a whole tiny training config, one in-process run, and the
torch thread count given back afterwards (import the names you use, the fixture included)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_model_section
from omegaconf import OmegaConf

from tinygpt_v.training.trainer import Trainer


def tiny_config(toy_root: Path, output_dir: Path, batch_size: int = 2, trainable=None, **run) -> dict:
    """A whole training config: tiny model (28 px, no dropout), toy VQA data, CPU; `trainable`
    replaces the preset's groups, `run` keys override the run section."""
    model = tiny_model_section(**{"vision.image_size": 28, "lora.dropout": 0.0})
    if trainable is not None:
        model["trainable"] = list(trainable)
    return {
        "model": model,
        "datasets": {"coco_vqa": {
            "batch_size": batch_size,
            "vis_processor": {"name": "blip2_image_train", "image_size": 28},
            "ann_paths": [f"{toy_root}/vqav2/vqa_train.json"],
            "image_root": f"{toy_root}/coco"}},
        "run": {"output_dir": str(output_dir), "lr_sched": "linear_warmup_cosine_lr", "init_lr": 1e-3,
                "min_lr": 1e-4, "warmup_steps": 2, "warmup_lr": 1e-5, "max_epoch": 1, "iters_per_epoch": 6,
                "device": "cpu", "cpu_threads": 1, "wandb": False, "tensorboard": False, "log_every": 1, "seed": 7,
                **run},
    }


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The runs set 1 thread (run.cpu_threads); give the rest of the session its setting back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def fit(config: dict) -> Trainer:
    trainer = Trainer(OmegaConf.create(config))
    trainer.fit()
    return trainer
