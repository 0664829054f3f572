"""Every run / optimiser / LoRA / dataset number is checked when the config is loaded, with the
key and the file in the message (issue 13 item 5), and what the trainable groups and the data's
image size need is checked there too, before anything is built (item 10).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import tiny_model_section
from omegaconf import OmegaConf

from tinygpt_v.config import load_config
from tinygpt_v.registry import ConfigError


def training_config(tmp_path: Path) -> dict:
    return {
        "model": tiny_model_section(**{"vision.image_size": 28}),
        "datasets": {"coco_vqa": {
            "batch_size": 2,
            "vis_processor": {"name": "blip2_image_train", "image_size": 28},
            "ann_paths": [str(tmp_path / "ann.json")],
            "image_root": str(tmp_path)}},
        "run": {"output_dir": str(tmp_path / "out"), "init_lr": 1e-4, "max_epoch": 1, "iters_per_epoch": 5,
                "min_lr": 1e-5, "warmup_lr": 1e-6, "warmup_steps": 2, "wandb": False, "tensorboard": False},
    }


def load_with(tmp_path: Path, dotted: dict):
    """Write a valid training config with `dotted` keys replaced, load it; returns the error."""
    (tmp_path / "ann.json").write_text("[]")
    cfg = OmegaConf.create(training_config(tmp_path))
    for key, value in dotted.items():
        OmegaConf.update(cfg, key, value, merge=False)
    path = tmp_path / "stage.yaml"
    OmegaConf.save(cfg, path)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert error.value.file == str(path)
    return error.value


def test_the_base_config_is_valid(tmp_path):
    (tmp_path / "ann.json").write_text("[]")
    path = tmp_path / "stage.yaml"
    OmegaConf.save(OmegaConf.create(training_config(tmp_path)), path)
    load_config(path)


@pytest.mark.parametrize("key, value, words", [
    ("run.init_lr", 0, "greater than 0"),
    ("run.init_lr", -1e-4, "greater than 0"),
    ("run.warmup_lr", -1, "at least 0"),        # the audit's run that trained at lr -1
    ("run.min_lr", -1e-5, "at least 0"),
    ("run.weight_decay", -0.05, "at least 0"),
    ("run.beta2", 1.0, "less than 1"),
    ("run.beta2", -0.1, "at least 0"),
    ("run.seed", -1, "at least 0"),
    ("run.seed", 2**40, "less than"),
    ("run.seed", 1.5, "expected int"),
    ("run.max_epoch", 0, "at least 1"),
    ("run.iters_per_epoch", 0, "at least 1"),
    ("run.warmup_steps", -5, "at least 0"),
    ("run.max_grad_norm", 0.0, "greater than 0"),
    ("run.num_workers", -1, "at least 0"),
    ("run.init_lr", math.inf, "finite"),
    ("run.init_lr", math.nan, "nan"),
    ("model.lora.r", 0, "at least 1"),
    ("model.lora.alpha", 0, "greater than 0"),
    ("model.lora.dropout", 1.0, "less than 1"),
    ("model.lora.dropout", -0.1, "at least 0"),
    ("datasets.coco_vqa.sample_ratio", math.inf, "finite"),
    ("datasets.coco_vqa.sample_ratio", 0, "greater than 0"),
    ("datasets.coco_vqa.batch_size", 0, "at least 1"),
])
def test_bad_numbers_are_refused_at_load_naming_the_key(tmp_path, key, value, words):
    error = load_with(tmp_path, {key: value})
    assert error.key == key and words in error.message, str(error)


def test_dataset_image_size_must_match_the_vision_encoder(tmp_path):
    error = load_with(tmp_path, {"datasets.coco_vqa.vis_processor.image_size": 56})
    assert error.key == "datasets.coco_vqa.vis_processor.image_size"
    assert "model.vision.image_size" in error.message and "56" in error.message and "28" in error.message


def test_processor_default_image_size_is_compared_too(tmp_path):
    """A processor without `image_size` makes 224-pixel images (its default): not the model's 28."""
    error = load_with(tmp_path, {"datasets.coco_vqa.vis_processor": {"name": "blip2_image_train"}})
    assert error.key == "datasets.coco_vqa.vis_processor.image_size" and "224" in error.message


@pytest.mark.parametrize("trainable, key, words", [
    ([], "model.trainable", "is empty"),
    (["projection", "lora"], "model.trainable[1]", "needs a `model.lora` section"),
])
def test_trainable_groups_that_train_nothing_are_refused_at_load(tmp_path, trainable, key, words):
    error = load_with(tmp_path, {"model.trainable": trainable, "model.lora": None})
    assert error.key == key and words in error.message


def test_trainable_is_not_checked_in_configs_that_do_not_train(tmp_path):
    """An evaluation / chat config (no `run:`) may say `trainable: []`."""
    path = tmp_path / "chat.yaml"
    OmegaConf.save(OmegaConf.create({"model": {**tiny_model_section(), "trainable": []}}), path)
    assert list(load_config(path).model.trainable) == []
