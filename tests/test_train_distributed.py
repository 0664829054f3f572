"""Acceptance tests that need whole processes: exact resume after SIGKILL, and DDP on CPU.

Both train the tiny model (28-pixel images, batch 2, one thread per process) on the toy VQA
data through `train.py`, as a user would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from conftest_data import toy_root  # noqa: F401  (session fixture)
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_train_runner import tiny_config

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def write_config(path: Path, config: dict) -> Path:
    OmegaConf.save(OmegaConf.create(config), path)
    return path


def train_command(config: Path, *options: str, launcher: list[str] | None = None) -> list[str]:
    cmd = (launcher or [sys.executable]) + [str(REPO / "train.py"), "--cfg-path", str(config)]
    return cmd + (["--options", *options] if options else [])


def losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def last_logged_step(output_dir: Path) -> int:
    """The newest step in metrics.jsonl of a running process (a half-written last line is skipped)."""
    steps = [0]
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return max(steps)


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb)
    return max((wa[n] - wb[n]).abs().max().item() for n in wa)


def test_sigkill_then_resume_equals_one_run(toy_root, tmp_path):
    """2000 steps in one go == 1000 steps, SIGKILL, resume=auto, 1000 more."""
    config = write_config(tmp_path / "run.yaml", tiny_config(
        toy_root, tmp_path / "unused", iters_per_epoch=2000, warmup_steps=100, save_every=1000, keep_last=2,
        log_every=100))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    started = time.perf_counter()
    one_go = subprocess.Popen(train_command(config, f"run.output_dir={straight}"), env=ENV, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(train_command(config, f"run.output_dir={killed}"), env=ENV, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (killed / "checkpoint_1000" / "meta.json").exists():
        assert victim.poll() is None, "the run to be killed ended before its step-1000 checkpoint"
        time.sleep(0.05)
    while last_logged_step(killed) < 1010:  # let it run past the checkpoint: those steps must be redone
        assert victim.poll() is None
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "checkpoint_final").exists()
    killed_at = last_logged_step(killed)
    resumed = subprocess.run(train_command(config, f"run.output_dir={killed}", "run.resume=auto"), env=ENV, cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert one_go.wait() == 0, one_go.stderr.read()[-3000:]
    print(f"\nresume test: killed after step {killed_at}, total {time.perf_counter() - started:.0f} s")

    assert killed_at > 1000 and "at step 1000" in resumed.stdout
    assert max_weight_difference(straight / "checkpoint_final", killed / "checkpoint_final") <= 1e-6
    a, b = losses(straight), losses(killed)
    assert sorted(b) == list(range(1, 2001))  # the killed run's steps after 1000 were replaced
    after_resume = range(1001, 2001)
    assert max(abs(a[s] - b[s]) for s in after_resume) <= 1e-6
    assert (killed / "curves.png").is_file()


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(toy_root, tmp_path):
    steps = 12
    one = write_config(tmp_path / "one.yaml", tiny_config(toy_root, tmp_path / "one", batch_size=4,
                                                          iters_per_epoch=steps, max_grad_norm=1.0))
    two = write_config(tmp_path / "two.yaml", tiny_config(toy_root, tmp_path / "two", batch_size=2,
                                                          iters_per_epoch=steps, max_grad_norm=1.0))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517"]
    ddp = subprocess.run(train_command(two, launcher=torchrun), env=ENV, cwd=REPO, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(train_command(one), env=ENV, cwd=REPO, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]

    assert json.loads((tmp_path / "two/checkpoint_final/meta.json").read_text())["world_size"] == 2
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-4
    assert a[steps] < a[1]  # and it trained
    # (the weights are not compared at 1e-4: Adam divides by sqrt(v), so a parameter whose gradient
    # is ~0 moves by +-lr on float noise that the two summation orders differ in)
    # a DDP checkpoint resumes only with the same number of processes
    resume = subprocess.run(train_command(two, "run.resume=auto", "run.max_epoch=2"), env=ENV, cwd=REPO,
                            capture_output=True, text=True)
    assert resume.returncode == 1 and "written by 2 processes" in resume.stderr
