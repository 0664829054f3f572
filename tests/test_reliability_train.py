"""Reliability of training runs (issue 13 items 1, 6, 8, 9, 10; issue 20 item 3): one run per
output folder, exact-or-refused resume, damaged checkpoints fallen back from, a torn metrics
line repaired, a changed `model.trainable` named, data problems before the model is built, and
every expected failure of train.py as one line with a non-zero exit status.

Tiny model, 28-pixel toy images, CPU, a few steps per run.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from conftest_data import toy_root  # noqa: F401  (session fixture: the toy world in a temp folder)
from conftest_train import fit, restore_torch_threads, tiny_config  # noqa: F401  (the fixture is autouse)
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tinygpt_v.registry import ConfigError
from tinygpt_v.training import ResumeError, list_checkpoints
from tinygpt_v.training.lock import OutputDirLock, OutputDirLocked
from tinygpt_v.training.trainer import Trainer


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / "model.safetensors"))


def write_yaml(path: Path, config: dict) -> Path:
    OmegaConf.save(OmegaConf.create(config), path)
    return path


def run_train_script(capsys, *args: str) -> tuple[int, list[str]]:
    """train.py's main in-process: (exit status, the non-progress lines it printed to stderr)."""
    import train as train_script
    status = train_script.main(list(args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "step/s" not in line and "|" not in line]
    return status, lines


# --- item 1: one run per output folder --------------------------------------------------------------

HOLD_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("lock", sys.argv[1])
lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(lock)
held = lock.OutputDirLock(sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def lock_holder(tmp_path):
    """Another process (a real one) holding the lock on tmp_path/out."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(REPO / "tinygpt_v/training/lock.py"), str(out)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield out, holder
    if holder.poll() is None:
        holder.kill()
    holder.wait()


def test_second_run_on_a_locked_folder_refuses_before_building_anything(toy_root, lock_holder, monkeypatch):
    out, holder = lock_holder
    built = []
    monkeypatch.setattr("tinygpt_v.data.build_train_loader", lambda *a, **k: built.append(1))
    with pytest.raises(OutputDirLocked) as error:
        Trainer(OmegaConf.create(tiny_config(toy_root, out)))
    message = str(error.value)
    assert str(out) in message and f"pid {holder.pid}" in message and "another run" in message
    assert not built  # refused before the data (and the model) were built


def test_train_script_says_the_folder_is_locked_in_one_line(toy_root, lock_holder, tmp_path, capsys):
    out, holder = lock_holder
    config = write_yaml(tmp_path / "c.yaml", tiny_config(toy_root, out))
    status, lines = run_train_script(capsys, "--cfg-path", str(config))
    assert status == 1 and len(lines) == 1
    assert lines[0].startswith("error: ") and str(out) in lines[0] and f"pid {holder.pid}" in lines[0]


def test_a_killed_holder_leaves_no_stale_lock(toy_root, lock_holder):
    out, holder = lock_holder
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / ".lock").exists()  # SIGKILL leaves the file, but the kernel dropped the lock
    trainer = fit(tiny_config(toy_root, out, max_steps=1))
    assert trainer.step == 1
    assert not (out / ".lock").exists() and not trainer.lock.held  # a clean end lets the folder go


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with OutputDirLock(tmp_path):
        with pytest.raises(OutputDirLocked, match=f"pid {os.getpid()}"):
            OutputDirLock(tmp_path).acquire()
    OutputDirLock(tmp_path).acquire().release()  # free again once released


# --- item 6: exact or refused ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight_run(toy_root, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of 6 uninterrupted steps: what every exact resume must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    fit(tiny_config(toy_root, out))
    torch.set_num_threads(threads)
    return weights(out / "checkpoint_final")


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-6


def test_missing_random_states_is_an_error_unless_an_inexact_resume_is_asked_for(toy_root, tmp_path, capsys):
    fit(tiny_config(toy_root, tmp_path, max_steps=2))
    lost = tmp_path / "checkpoint_final/resume_state/random_states_0.pkl"
    lost.unlink()
    with pytest.raises(ResumeError) as error:
        fit(tiny_config(toy_root, tmp_path, resume="auto"))
    assert str(lost) in str(error.value) and "missing" in str(error.value)
    assert "run.resume_inexact: true" in str(error.value)
    capsys.readouterr()
    trainer = fit(tiny_config(toy_root, tmp_path, resume="auto", resume_inexact=True))
    assert trainer.step == 6
    err = capsys.readouterr().err
    assert str(lost) in err and "not bit-identical" in err


def test_unreadable_optimizer_state_of_a_named_checkpoint_is_an_error(toy_root, tmp_path):
    fit(tiny_config(toy_root, tmp_path, max_steps=2))
    damaged = tmp_path / "checkpoint_final/resume_state/optimizer.bin"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(ResumeError) as error:
        fit(tiny_config(toy_root, tmp_path, resume=str(tmp_path / "checkpoint_final")))
    assert str(damaged) in str(error.value) and "truncated" in str(error.value)


# --- item 8: damaged newest checkpoint -> the one before it ---------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


@pytest.mark.parametrize("damaged", ["model.safetensors", "resume_state/optimizer.bin", "meta.json"])
def test_auto_resume_falls_back_past_a_damaged_newest_checkpoint(toy_root, tmp_path, straight_run, damaged, capsys):
    fit(tiny_config(toy_root, tmp_path, max_steps=4, save_every=2, keep_last=5))
    assert [p.name for _, p in list_checkpoints(tmp_path)] == ["checkpoint_2", "checkpoint_final"]
    _truncate(tmp_path / "checkpoint_final" / damaged)
    capsys.readouterr()
    trainer = fit(tiny_config(toy_root, tmp_path, resume="auto", save_every=2, keep_last=1))
    err = capsys.readouterr().err
    assert str(tmp_path / "checkpoint_final" / damaged) in err  # the damaged file is named
    out_lines = [r for r in capsys.readouterr().out.splitlines()]
    assert trainer.step == 6
    # resumed exactly from checkpoint_2: the same weights as 6 steps in one go
    assert_same(weights(tmp_path / "checkpoint_final"), straight_run)
    if damaged != "meta.json":  # set aside, not deleted, and not counted by keep_last
        assert (tmp_path / ".checkpoint_final.damaged" / damaged).is_file()
    assert out_lines is not None


def test_no_resumable_checkpoint_left_names_every_damaged_file(toy_root, tmp_path):
    fit(tiny_config(toy_root, tmp_path, max_steps=2))
    _truncate(tmp_path / "checkpoint_final/model.safetensors")
    with pytest.raises(ResumeError) as error:
        fit(tiny_config(toy_root, tmp_path, resume="auto"))
    assert str(tmp_path / "checkpoint_final/model.safetensors") in str(error.value)
    assert "can be resumed" in str(error.value)


def test_torn_metrics_line_is_repaired_on_resume(toy_root, tmp_path, caplog):
    fit(tiny_config(toy_root, tmp_path, max_steps=3))
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 4, "loss": 6.1, "l')  # what a full disk leaves
    with caplog.at_level(logging.WARNING):
        fit(tiny_config(toy_root, tmp_path, resume="auto"))
    assert any(str(metrics) in r.getMessage() and "cut short" in r.getMessage() for r in caplog.records)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# --- item 9: a changed model.trainable ---------------------------------------------------------------------

def test_resume_after_changing_trainable_names_the_groups(toy_root, tmp_path):
    fit(tiny_config(toy_root, tmp_path, max_steps=2))
    with pytest.raises(ResumeError) as error:
        fit(tiny_config(toy_root, tmp_path, trainable=("projection", "lora"), resume="auto"))
    message = str(error.value)
    assert "model.trainable changed" in message and "removed ['llm_norms']" in message and "added []" in message
    assert "parameter group" not in message  # not torch's optimizer message


# --- item 10: what needs the data is checked before the model is built ---------------------------------------

def test_missing_data_is_reported_before_the_model_is_built(toy_root, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr("tinygpt_v.models.build_model", lambda *a, **k: built.append(1))
    config = tiny_config(toy_root, tmp_path / "out")
    config["datasets"]["coco_vqa"]["ann_paths"] = [str(tmp_path / "no_such_annotations.json")]
    with pytest.raises(ConfigError, match="datasets.coco_vqa"):
        Trainer(OmegaConf.create(config))  # a config made in code: load_config's checks were skipped
    assert not built
    assert OutputDirLock(tmp_path / "out").acquire()  # the failed start let the folder go


@pytest.mark.parametrize("trainable, key, words", [
    ([], "model.trainable", "is empty"),
    (["projection", "qformer"], "model.trainable[1]", "needs a `model.qformer` section"),
])
def test_trainable_groups_are_checked_before_the_model_is_built(toy_root, tmp_path, monkeypatch, trainable, key, words):
    built = []
    monkeypatch.setattr("tinygpt_v.models.build_model", lambda *a, **k: built.append(1))
    config = tiny_config(toy_root, tmp_path / "out", trainable=trainable)
    del config["model"]["qformer"]
    with pytest.raises(ConfigError) as error:
        Trainer(OmegaConf.create(config))
    assert error.value.key == key and words in error.value.message and not built


# --- issue 20 item 3: every expected failure of train.py is one line --------------------------------------

def test_train_script_one_line_for_a_bad_checkpoint(toy_root, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    config = tiny_config(toy_root, tmp_path / "out")
    config["model"]["ckpt"] = str(bad)
    status, lines = run_train_script(capsys, "--cfg-path", str(write_yaml(tmp_path / "c.yaml", config)))
    assert status == 1 and lines[-1].startswith("error: ") and str(bad) in lines[-1]
    assert not [line for line in lines if "Traceback" in line]


def test_train_script_one_line_for_a_resume_error(toy_root, tmp_path, capsys):
    fit(tiny_config(toy_root, tmp_path / "out", max_steps=1))
    config = tiny_config(toy_root, tmp_path / "out", trainable=("projection",), resume="auto")
    status, lines = run_train_script(capsys, "--cfg-path", str(write_yaml(tmp_path / "c.yaml", config)))
    assert status == 1 and lines[-1].startswith("error: model.trainable changed")


def test_train_script_one_line_for_a_full_disk(toy_root, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")
    monkeypatch.setattr("tinygpt_v.training.checkpointing.save_safetensors_atomic", full)
    config = tiny_config(toy_root, tmp_path / "out", max_steps=2)
    status, lines = run_train_script(capsys, "--cfg-path", str(write_yaml(tmp_path / "c.yaml", config)))
    assert status == 1 and lines[-1].startswith("error: the disk is full")
    assert ".checkpoint_final.tmp" in lines[-1] and "run.resume=auto" in lines[-1]


def test_train_script_one_line_for_a_non_finite_loss(toy_root, tmp_path, capsys, monkeypatch):
    from tinygpt_v.models import TinyGPTV
    forward = TinyGPTV.forward

    def poisoned(self, batch):
        out = forward(self, batch)
        out["loss"] = out["loss"] * float("inf")
        return out
    monkeypatch.setattr(TinyGPTV, "forward", poisoned)
    config = tiny_config(toy_root, tmp_path / "out", max_steps=2)
    status, lines = run_train_script(capsys, "--cfg-path", str(write_yaml(tmp_path / "c.yaml", config)))
    assert status == 1 and lines[-1].startswith("error: loss is inf at step 1")


def test_disk_full_errno_is_kept(tmp_path):
    """An OSError that already says ENOSPC passes through save_checkpoint unchanged."""
    from tinygpt_v.training.checkpointing import save_checkpoint

    class Full:
        is_main_process, process_index = True, 0

        def wait_for_everyone(self):
            raise OSError(errno.ENOSPC, "No space left on device", "x")
    with pytest.raises(OSError) as error:
        save_checkpoint(Full(), None, None, tmp_path, "checkpoint_1", {"step": 1})
    assert error.value.errno == errno.ENOSPC


# --- item 7 (and issue 20 item 4): a pickle with code in it ---------------------------------------------

class RunsAShellCommand:
    """Unpickling this calls os.system (posix.system): what a malicious .pth does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Harmless:
    """A non-tensor object in a checkpoint the user trusts (an old training script's config)."""

    def __init__(self):
        self.lr = 1e-4


def test_malicious_pickle_is_refused_unrun_and_explained(toy_root, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": RunsAShellCommand(marker)}, evil)
    config = tiny_config(toy_root, tmp_path / "out")
    config["model"]["ckpt"] = str(evil)
    status, lines = run_train_script(capsys, "--cfg-path", str(write_yaml(tmp_path / "c.yaml", config)))
    assert not marker.exists()  # nothing ran
    assert status == 1
    message = lines[-1]
    assert message.startswith(f"error: {evil}: holds Python code or objects other than tensors")
    assert "posix.system" in message and "refused for safety" in message
    assert "weights_only" not in message and "corrupt" not in message  # no advice to disable the check
    assert f"convert_checkpoint.py unpickle {evil} --trust-pickle" in message


@pytest.mark.parametrize("torch_text, refused", [
    ("Weights only load failed. ... Trying to load unsupported GLOBAL posix.system whose module posix is "
     "blocked.", "posix.system"),                                       # torch 2.14
    ("Weights only load failed ... Unsupported global: GLOBAL __main__.Evil was not an allowed global by "
     "default.", "__main__.Evil"),                                      # torch 2.4-2.6
    ("Weights only load failed ... Unsupported operand 202", None),     # random bytes: damage, not code
])
def test_refusals_are_told_from_damage_in_every_torch_wording(torch_text, refused):
    from tinygpt_v.checkpoints.files import pickled_code
    assert pickled_code(Exception(torch_text)) == refused


def test_a_trusted_pickle_converts_with_an_explicit_flag_only(tmp_path, capsys):
    import importlib.util

    from tinygpt_v.checkpoints import read_state_dict
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "scripts/convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    state = {"a": torch.arange(4.0), "b": torch.ones(2, 3)}
    source, out = tmp_path / "old.pth", tmp_path / "old.safetensors"
    torch.save({"model": {**state, "settings": Harmless()}}, source)
    from tinygpt_v.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="refused for safety"):
        read_state_dict(source)
    with pytest.raises(SystemExit, match="--trust-pickle"):
        script.main(["unpickle", str(source), "--out", str(out)])
    assert not out.exists()
    assert script.main(["unpickle", str(source), "--trust-pickle", "--out", str(out)]) == 0
    assert "left out 1 non-tensor entries: settings" in capsys.readouterr().out
    converted = read_state_dict(out)
    assert set(converted) == {"a", "b"} and all(torch.equal(converted[k], state[k]) for k in state)


def test_the_end_of_a_run_prints_a_data_health_line_per_dataset(toy_root, tmp_path, capsys):
    """Issue 20 item 6: samples used and skipped per dataset, after the summary line."""
    fit(tiny_config(toy_root, tmp_path, max_steps=2))
    out = capsys.readouterr().out.splitlines()
    done = next(i for i, line in enumerate(out) if line.startswith("done:"))
    assert out[done + 1].startswith("data coco_vqa: 4 samples used")  # 2 steps x batch 2
