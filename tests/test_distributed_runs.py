"""Distributed runs on this machine's CPU, launched as a user would: FSDP2 (torchrun, gloo),
DeepSpeed ZeRO-2 / ZeRO-3 (accelerate launch with configs/accelerate/*.yaml, and torchrun;
DeepSpeed's CPU accelerator over gloo; skipped without `deepspeed`), and a two-"node" rehearsal
(two torchrun launchers over 127.0.0.1 with a c10d rendezvous).

Each compares with one process training the same global batch (in this process), and resumes
a checkpoint in a fresh folder: the steps after it must repeat the uninterrupted run exactly.
The tiny model, 28-pixel images, one thread per process; CUDA is hidden so `run.device: auto`
must find the CPU under a launcher by itself.
"""
from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from conftest_data import toy_root  # noqa: F401  (session fixture)
from omegaconf import OmegaConf
from test_train_distributed import ENV, losses, max_weight_difference, train_command, write_config
from test_train_runner import tiny_config

from tinygpt_v.training import ResumeError, Trainer

CPU_ENV = {**ENV, "CUDA_VISIBLE_DEVICES": ""}
STEPS = 6
has_deepspeed = importlib.util.find_spec("deepspeed") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port())]


def accelerate_launch(config: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs/accelerate" / config), "--num_processes", "2", "--main_process_port", str(free_port())]


def run_config(toy_root: Path, output_dir: Path, batch_size: int = 2, **run) -> dict:
    return tiny_config(toy_root, output_dir, batch_size=batch_size, iters_per_epoch=STEPS, max_grad_norm=1.0,
                       save_every=3, keep_last=5, **run)


def launch(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=CPU_ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def start_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stdout.splitlines() if line.startswith("distributed: ")]


@pytest.fixture(scope="module")
def one_process(toy_root, tmp_path_factory) -> Path:
    """The reference: one process, batch 4 (= 2 processes x 2), same schedule, in this process."""
    out = tmp_path_factory.mktemp("one_process")
    threads = torch.get_num_threads()
    try:
        Trainer(OmegaConf.create(run_config(toy_root, out, batch_size=4))).fit()
    finally:
        torch.set_num_threads(threads)
    return out


def check_run(output_dir: Path, done: subprocess.CompletedProcess, one_process: Path, words: tuple[str, ...]) -> None:
    """One run of 2 processes (not two runs of one), training like one process with their batch."""
    lines = start_lines(done)  # one per node (each node's first process says it)
    assert len(lines) >= 1 and len(set(lines)) == 1, lines
    line = lines[0]
    for word in words + ("world size 2", "backend gloo", "device cpu", "per-process batch 2"):
        assert word in line, line
    assert done.stdout.count("done: steps 0->6") == 1
    assert json.loads((output_dir / "checkpoint_final/meta.json").read_text())["world_size"] == 2
    a, b = losses(one_process), losses(output_dir)
    assert sorted(b) == list(range(1, STEPS + 1))  # one metrics line per step: one run wrote the folder
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-4
    assert b[STEPS] < b[1]


def check_exact_resume(straight: Path, resumed: Path) -> None:
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    assert max(abs(a[s] - b[s]) for s in b) <= 1e-6
    assert max_weight_difference(straight / "checkpoint_final", resumed / "checkpoint_final") <= 1e-6


@pytest.mark.slow  # two launches of two processes: ~40 s on 2 shared cores
def test_fsdp2_two_cpu_processes_train_like_one_and_resume_exactly(toy_root, tmp_path, one_process):
    """torchrun + run.device auto without a GPU + mode fsdp2, with gradient checkpointing."""
    config = write_config(tmp_path / "fsdp2.yaml", run_config(
        toy_root, tmp_path / "straight", device="auto", gradient_checkpointing=True, distributed={"mode": "fsdp2"}))
    done = launch(train_command(config, launcher=torchrun()))
    check_run(tmp_path / "straight", done, one_process, ("FSDP2",))
    assert json.loads((tmp_path / "straight/checkpoint_3/meta.json").read_text())["distributed"] == "fsdp2"
    assert (tmp_path / "straight/checkpoint_3/resume_state/optimizer.bin").is_file()  # whole, from rank 0

    resumed = launch(train_command(config, f"run.output_dir={tmp_path / 'resumed'}",
                                   f"run.resume={tmp_path / 'straight/checkpoint_3'}", launcher=torchrun()))
    assert "at step 3" in resumed.stdout
    check_exact_resume(tmp_path / "straight", tmp_path / "resumed")


def test_a_checkpoint_resumes_only_under_the_mode_that_wrote_it(toy_root, tmp_path, one_process):
    config = run_config(toy_root, tmp_path / "other", batch_size=4, resume=str(one_process / "checkpoint_3"),
                        distributed={"mode": "ddp"})
    meta = one_process / "checkpoint_3/meta.json"
    written = json.loads(meta.read_text())
    meta.write_text(json.dumps({**written, "distributed": "fsdp2"}))
    try:
        with pytest.raises(ResumeError, match="written with run.distributed.mode fsdp2; resume it with the same"):
            Trainer(OmegaConf.create(config)).fit()
    finally:
        meta.write_text(json.dumps(written))


@pytest.mark.slow
@pytest.mark.skipif(not has_deepspeed, reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
@pytest.mark.parametrize("mode, launcher", [("zero2", "accelerate"), ("zero3", "torchrun")])
def test_deepspeed_zero_on_cpu_trains_like_one_process_and_resumes_exactly(toy_root, tmp_path, one_process, mode,
                                                                          launcher):
    """accelerate launch --config_file configs/accelerate/zero2.yaml (mode auto follows it), and
    torchrun with run.distributed.mode zero3: no DeepSpeed JSON, rank 0 writes the shared files."""
    distributed = {"mode": mode} if launcher == "torchrun" else None
    config = write_config(tmp_path / "zero.yaml", run_config(toy_root, tmp_path / "straight", device="auto",
                                                            distributed=distributed))
    start = (lambda: accelerate_launch(f"{mode}.yaml")) if launcher == "accelerate" else torchrun
    done = launch(train_command(config, launcher=start()))
    check_run(tmp_path / "straight", done, one_process, (f"DeepSpeed ZeRO-{mode[-1]}",))
    resumed = launch(train_command(config, f"run.output_dir={tmp_path / 'resumed'}",
                                   f"run.resume={tmp_path / 'straight/checkpoint_3'}", launcher=start()))
    assert "at step 3" in resumed.stdout
    check_exact_resume(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.slow
def test_two_node_rehearsal_over_loopback(toy_root, tmp_path, one_process):
    """Two torchrun launchers, one process each, meeting at a c10d rendezvous on 127.0.0.1: the
    documented multi-node command with both "nodes" on this machine."""
    config = write_config(tmp_path / "ddp.yaml", run_config(toy_root, tmp_path / "run", device="auto"))
    endpoint = f"127.0.0.1:{free_port()}"
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "rehearsal"]
    nodes = [subprocess.Popen(train_command(config, launcher=node), env=CPU_ENV, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in nodes]
    for p, (out, err) in zip(nodes, outputs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    stdout = "".join(out for out, _ in outputs)
    done = subprocess.CompletedProcess([], 0, stdout, "")
    check_run(tmp_path / "run", done, one_process, ("DDP", "(2 nodes)"))
