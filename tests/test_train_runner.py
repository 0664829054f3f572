"""The trainer on the tiny model and the toy world: checkpoints, resume, NaN stop, config errors.

Runs in-process on 28-pixel images (2x2 patches) with batch 2, a few steps each. The
subprocess tests (SIGKILL + resume, torchrun DDP) are in test_train_distributed.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO
from conftest_data import toy_root  # noqa: F401  (session fixture: the toy world in a temp folder)
from conftest_train import fit, restore_torch_threads, tiny_config  # noqa: F401  (the fixture is autouse)
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tinygpt_v.config import load_config
from tinygpt_v.registry import ConfigError
from tinygpt_v.training import latest_checkpoint, list_checkpoints, read_meta
from tinygpt_v.training.trainer import NonFiniteLossError, Trainer


def losses(output_dir: Path) -> dict[int, float]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def trainable_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / "model.safetensors"))


# --- checkpoints ------------------------------------------------------------------------------------

def test_checkpoints_hold_the_trainable_parameters_and_keep_the_last_k(toy_root, tmp_path):
    trainer = fit(tiny_config(toy_root, tmp_path, save_every=2, keep_last=1))
    names = sorted(p.name for p in tmp_path.iterdir())
    # steps 2 and 4 were saved, only the newest numbered one is kept, plus the final one
    assert [n for n in names if n.startswith("checkpoint")] == ["checkpoint_4", "checkpoint_final"]
    assert "curves.png" in names and not [n for n in names if n.startswith(".")]
    final = tmp_path / "checkpoint_final"
    model = trainer.accelerator.unwrap_model(trainer.model)
    # every part of the tiny model is randomly initialised (no `pretrained`), so the checkpoint
    # holds all of it: the trainable parameters and the frozen ones no file could restore
    weights = trainable_weights(final)
    assert set(weights) == {n for n, _ in model.named_parameters()}
    assert all(torch.equal(weights[n], p.detach()) for n, p in model.named_parameters())
    assert set(read_meta(final)["trainable"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    meta = read_meta(final)
    assert meta["step"] == 6 and meta["epoch"] == 1 and meta["config"]["run"]["output_dir"] == str(tmp_path)
    assert (final / "resume_state" / "data_rank0.pt").is_file()
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5, 6]


def test_interrupted_write_leaves_the_previous_checkpoint_loadable(toy_root, tmp_path, monkeypatch):
    trainer = fit(tiny_config(toy_root, tmp_path, save_every=2, keep_last=5))
    before = trainable_weights(tmp_path / "checkpoint_final")

    def crash(*args, **kwargs):  # dies after model.safetensors and meta.json are written
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(trainer.accelerator, "save_state", crash)
    with torch.no_grad():  # the weights move on, as they would in training
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    for name in ("checkpoint_8", "checkpoint_final"):  # a new one, and one replacing the previous
        with pytest.raises(KeyboardInterrupt):
            trainer.step = 8
            trainer._save(name)
        assert (tmp_path / f".{name}.tmp" / "model.safetensors").is_file()  # the half-written folder
    assert [p.name for _, p in list_checkpoints(tmp_path)] == ["checkpoint_2", "checkpoint_4", "checkpoint_final"]
    assert latest_checkpoint(tmp_path).name == "checkpoint_final"
    after = trainable_weights(tmp_path / "checkpoint_final")
    assert all(torch.equal(before[n], after[n]) for n in before)
    # and a resume from it works, ignoring the half-written folders
    monkeypatch.undo()
    resumed = fit(tiny_config(toy_root, tmp_path, resume="auto", max_epoch=2, save_every=2, keep_last=5))
    assert resumed.step == 12 and read_meta(tmp_path / "checkpoint_final")["step"] == 12
    assert not (tmp_path / ".checkpoint_final.tmp").exists()


def test_resume_in_process_continues_exactly(toy_root, tmp_path):
    """Quick version of the SIGKILL test: 3 steps + resume 3 == 6 steps in one go."""
    straight = tiny_config(toy_root, tmp_path / "straight", save_every=3)
    fit(straight)
    first = tiny_config(toy_root, tmp_path / "resumed", save_every=3, max_steps=3)
    fit(first)
    fit({**first, "run": {**first["run"], "max_steps": None, "resume": "auto"}})
    a, b = trainable_weights(tmp_path / "straight/checkpoint_final"), trainable_weights(tmp_path / "resumed/checkpoint_final")
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-6
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)


def test_fresh_run_refuses_an_output_dir_with_checkpoints(toy_root, tmp_path):
    fit(tiny_config(toy_root, tmp_path, max_steps=1))
    with pytest.raises(FileExistsError, match="run.resume=auto"):
        fit(tiny_config(toy_root, tmp_path, max_steps=1))


def test_finished_run_resumed_does_nothing(toy_root, tmp_path):
    fit(tiny_config(toy_root, tmp_path, max_steps=2))
    before = trainable_weights(tmp_path / "checkpoint_final")
    trainer = fit(tiny_config(toy_root, tmp_path, max_steps=2, resume="auto"))
    assert trainer.step == 2
    assert all(torch.equal(before[n], t) for n, t in trainable_weights(tmp_path / "checkpoint_final").items())


# --- accumulation, checkpointing switch ---------------------------------------------------------------

def test_gradient_accumulation_updates_once_per_accum_micro_batches(toy_root, tmp_path):
    trainer = fit(tiny_config(toy_root, tmp_path, accum_grad_iters=3, max_steps=2))
    assert trainer.loader.state_dict()["step"] == 6  # 2 updates x 3 micro-batches
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {2}


def test_gradient_checkpointing_gives_the_same_gradients(toy_root):
    from tinygpt_v.data import build_train_loader
    from tinygpt_v.models import build_model
    from tinygpt_v.training.trainer import enable_gradient_checkpointing
    cfg = tiny_config(toy_root, "unused")
    batch = next(build_train_loader(cfg["datasets"], seed=0))
    grads = []
    for checkpointing_on in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg["model"], verbose=False)
        if checkpointing_on:
            enable_gradient_checkpointing(model)
            assert model.llm.is_gradient_checkpointing
        model(batch)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


# --- NaN ------------------------------------------------------------------------------------------------

def test_nan_loss_stops_naming_step_and_batch_and_saves_nothing(toy_root, tmp_path, monkeypatch):
    from tinygpt_v.models import TinyGPTV
    forward, calls = TinyGPTV.forward, []

    def poisoned(self, batch):
        out = forward(self, batch)
        calls.append(batch["id"])
        if len(calls) == 5:
            out["loss"] = out["loss"] * math.nan
        return out
    monkeypatch.setattr(TinyGPTV, "forward", poisoned)
    config = tiny_config(toy_root, tmp_path, save_every=2)
    trainer = Trainer(OmegaConf.create(config))
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit()
    message = str(error.value)
    assert "loss is nan at step 5" in message
    assert "dataset 'coco_vqa'" in message and str(calls[4]) in message
    assert "nothing was saved" in message
    assert [p.name for _, p in list_checkpoints(tmp_path)] == ["checkpoint_2", "checkpoint_4"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    saved = trainable_weights(tmp_path / "checkpoint_4")
    assert all(torch.isfinite(t).all() for t in saved.values())


# --- config -------------------------------------------------------------------------------------------

def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "stage.yaml"
    OmegaConf.save(OmegaConf.create(config), path)
    return path


@pytest.mark.parametrize("run, key, words", [
    ({"init_lrr": 1e-4}, "run.init_lrr", "did you mean 'init_lr'"),
    ({"max_epoch": "two"}, "run.max_epoch", "expected int"),
    ({"mixed_precision": "fp8"}, "run.mixed_precision", "expected one of"),
    ({"decay_rate": 0.9}, "run.decay_rate", "not used by lr_sched 'linear_warmup_cosine_lr'"),
    ({"resume": "no/such/checkpoint"}, "run.resume", "does not exist"),
    ({"accum_grad_iters": 0}, "run.accum_grad_iters", "at least 1"),
])
def test_bad_run_keys_fail_at_load_naming_key_and_file(toy_root, tmp_path, run, key, words):
    config = tiny_config(toy_root, tmp_path / "out")
    config["run"].update(run)
    path = _write(tmp_path, config)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert error.value.key == key and words in error.value.message and error.value.file == str(path)


def test_missing_run_key_is_named(toy_root, tmp_path):
    config = tiny_config(toy_root, tmp_path / "out")
    del config["run"]["iters_per_epoch"]
    with pytest.raises(ConfigError, match=r"run.iters_per_epoch: required key is missing"):
        load_config(_write(tmp_path, config))


def test_missing_previous_stage_checkpoint_says_to_train_it_first(toy_root, tmp_path, capsys):
    import train as train_script
    config = tiny_config(toy_root, tmp_path / "out")
    config["model"]["ckpt"] = str(tmp_path / "stage1/checkpoint_final")
    assert train_script.main(["--cfg-path", str(_write(tmp_path, config))]) == 2
    err = capsys.readouterr().err
    assert "model.ckpt" in err and "does not exist" in err and "train that first" in err


STAGES = {  # REFERENCE.md's table
    1: dict(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=1000, iters_per_epoch=5000, image=224,
            trainable={"projection", "llm_norms"}, batch=64),
    2: dict(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=5000, iters_per_epoch=5000, max_epoch=4, image=224,
            trainable={"projection", "llm_norms", "lora"}, batch=64),
    3: dict(init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200, iters_per_epoch=200, image=224,
            trainable={"projection", "llm_norms", "lora"}, batch=6, max_epoch=5),
    4: dict(init_lr=1e-5, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=1000, iters_per_epoch=1000, image=448,
            trainable={"projection", "llm_norms", "lora"}, max_epoch=50),
}


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_configs_follow_the_paper(stage):
    from tinygpt_v.training import check_run_section
    cfg = load_config(REPO / f"train_configs/stage{stage}.yaml", validate=False)
    want = STAGES[stage]
    check_run_section(cfg.run)
    for key in ("init_lr", "min_lr", "warmup_lr", "warmup_steps", "iters_per_epoch", "max_epoch"):
        if key in want:
            assert cfg.run[key] == pytest.approx(want[key]), key
    assert cfg.run.lr_sched == "linear_warmup_cosine_lr" and cfg.run.weight_decay == 0.05
    assert set(cfg.model.trainable) == want["trainable"]
    assert cfg.model.vision.image_size == want["image"]
    image_sizes = {d.vis_processor.image_size for d in cfg.datasets.values() if "vis_processor" in d}
    assert image_sizes == {want["image"]}
    if "batch" in want:
        assert {d.batch_size for d in cfg.datasets.values()} == {want["batch"]}
    if stage > 1:
        assert cfg.model.ckpt == f"output/stage{stage - 1}/checkpoint_final"


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_configs_validate_against_every_schema(stage, toy_root):
    """Every key of the stage configs is one the model, data and run schemas accept: loaded with
    the toy world (which mirrors the real folder layouts) as the data root and no weight files."""
    options = [f"paths.data={toy_root}", "model.ckpt=null", "model.vision.pretrained=null",
               "model.qformer.pretrained=null"]
    cfg = load_config(REPO / f"train_configs/stage{stage}.yaml", options)
    assert cfg.run.job_name == f"tinygptv_stage{stage}"


# --- logging ------------------------------------------------------------------------------------------

def test_tensorboard_summary_line_and_curves(toy_root, tmp_path, capsys):
    fit(tiny_config(toy_root, tmp_path, max_steps=3, tensorboard=True, log_every=2))
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    out = capsys.readouterr().out
    summary = [line for line in out.splitlines() if line.startswith("done:")]
    assert len(summary) == 1 and "steps 0->3" in summary[0] and "tokens/s" in summary[0]
    assert str(tmp_path / "checkpoint_final") in summary[0]
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_wandb_is_offline_without_a_key_and_off_when_disabled(tmp_path, monkeypatch):
    from tinygpt_v.training.settings import read_run_settings
    from tinygpt_v.training.tracking import tracker_init_kwargs, tracker_names
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    section = {"output_dir": str(tmp_path), "init_lr": 1e-4, "max_epoch": 1, "iters_per_epoch": 1}
    run = read_run_settings(section)
    assert tracker_init_kwargs(run, tmp_path)["wandb"]["mode"] == "offline"
    assert "wandb" in tracker_names(run)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracker_init_kwargs(run, tmp_path)["wandb"]["mode"] == "online"
    off = read_run_settings({**section, "wandb": False, "tensorboard": False})
    assert tracker_names(off) == []


# --- pipeline -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("section, key", [
    ({"stages": []}, "pipeline.stages"),
    ({"stages": ["no/such/stage.yaml"]}, "pipeline.stages[0]"),
    ({"stages": ["train_configs/demo_stage1.yaml"], "evaluate_toy_vqa": True}, "pipeline.evaluate_toy_vqa"),
    ({"stages": ["train_configs/demo_stage1.yaml"], "toy_data": {"train_image": 5}}, "pipeline.toy_data.train_image"),
])
def test_bad_pipeline_sections_fail_at_load(tmp_path, monkeypatch, section, key):
    monkeypatch.chdir(REPO)
    path = _write(tmp_path, {"pipeline": section})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert error.value.key == key


def test_bf16_mixed_precision_on_cpu_keeps_fp32_weights(toy_root, tmp_path):
    trainer = fit(tiny_config(toy_root, tmp_path, mixed_precision="bf16", max_steps=2))
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(math.isfinite(loss) for loss in losses(tmp_path).values())
    weights = trainable_weights(tmp_path / "checkpoint_final")
    assert {t.dtype for t in weights.values()} == {torch.float32}
