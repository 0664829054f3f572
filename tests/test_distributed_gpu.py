"""The distributed modes on GPUs (nccl): written for a machine with 2+ CUDA devices, skipped
elsewhere. The same checks as test_distributed_runs.py's CPU runs, in bf16: each mode trains like
DDP, resumes exactly, and prints its benchmark line (tokens/s, peak GPU memory per process)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from conftest_data import toy_root  # noqa: F401  (session fixture)
from test_distributed_runs import (accelerate_launch, check_exact_resume, run_config, start_lines, torchrun)
from test_train_distributed import ENV, losses, train_command, write_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]
has_deepspeed = importlib.util.find_spec("deepspeed") is not None


def launch(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env={**ENV, "CUDA_VISIBLE_DEVICES": "0,1"}, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def benchmark_line(done: subprocess.CompletedProcess) -> str:
    [line] = [line for line in done.stdout.splitlines() if line.startswith("peak GPU memory allocated:")]
    assert float(re.search(r"([\d.]+) GiB", line).group(1)) > 0
    print(f"\n{line}")
    return line


@pytest.fixture(scope="module")
def ddp_run(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_gpu")
    config = write_config(out / "ddp.yaml", run_config(toy_root, out / "run", device="auto", mixed_precision="bf16"))
    done = launch(train_command(config, launcher=torchrun()))
    assert "backend nccl" in start_lines(done)[0] and "device cuda" in start_lines(done)[0]
    benchmark_line(done)
    return out / "run"


@pytest.mark.parametrize("mode, launcher", [("fsdp2", "torchrun"), ("fsdp2", "accelerate"),
                                            ("zero2", "accelerate"), ("zero3", "accelerate")])
def test_mode_on_gpus_trains_like_ddp_and_resumes_exactly(toy_root, tmp_path, ddp_run, mode, launcher):
    if mode.startswith("zero") and not has_deepspeed:
        pytest.skip("DeepSpeed is not installed")
    distributed = {"mode": mode} if launcher == "torchrun" else None
    config = write_config(tmp_path / "run.yaml", run_config(toy_root, tmp_path / "straight", device="auto",
                                                           mixed_precision="bf16", gradient_checkpointing=True,
                                                           distributed=distributed))
    start = (lambda: accelerate_launch(f"{mode}.yaml")) if launcher == "accelerate" else torchrun
    done = launch(train_command(config, launcher=start()))
    [line] = start_lines(done)
    assert "backend nccl" in line and "world size 2" in line
    benchmark_line(done)
    a, b = losses(ddp_run), losses(tmp_path / "straight")
    assert max(abs(a[s] - b[s]) for s in a) <= 2e-2  # bf16
    launch(train_command(config, f"run.output_dir={tmp_path / 'resumed'}",
                         f"run.resume={tmp_path / 'straight/checkpoint_3'}", launcher=start()))
    check_exact_resume(tmp_path / "straight", tmp_path / "resumed")


def test_fsdp2_fp16_is_refused_before_anything_runs(toy_root, tmp_path):
    config = write_config(tmp_path / "run.yaml", run_config(toy_root, tmp_path / "out", device="auto",
                                                           mixed_precision="fp16", distributed={"mode": "fsdp2"}))
    done = subprocess.run(train_command(config, launcher=[sys.executable]), env=ENV, cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode != 0 and "use mixed_precision bf16" in done.stderr
