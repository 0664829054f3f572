"""The offline demo's pipeline end to end, shortened to a few steps per stage.

Runs `python train.py --cfg-path train_configs/demo.yaml` from an empty working folder that
sees only the repo's configs, so the demo provably needs nothing it does not generate. The
full-length demo (its accuracy) is a recorded run, see docs/training.md.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_demo_pipeline_chains_four_stages_and_scores(tmp_path):
    for folder in ("configs", "train_configs", "eval_configs"):
        (tmp_path / folder).symlink_to(REPO / folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "train.py"), "--cfg-path", "train_configs/demo.yaml",
               "--options", "run.max_steps=15", "run.log_every=5"]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    demo = tmp_path / "output/demo"
    assert (demo / "toy_data/README.json").is_file()
    for stage in (1, 2, 3, 4):
        assert (demo / f"stage{stage}/checkpoint_final/model.safetensors").is_file()
        assert (demo / f"stage{stage}/curves.png").is_file()
    assert first.stdout.count("done: steps 0->15") == 4
    assert "held-out toy VQA accuracy:" in first.stdout and "vs chance 16.7%" in first.stdout

    # run again: every stage is already trained (run.resume: auto), only the score is computed
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("nothing to do") == 4 and "done: steps" not in again.stdout
    score = [line for line in first.stdout.splitlines() if line.startswith("held-out")]
    assert score == [line for line in again.stdout.splitlines() if line.startswith("held-out")]

    # eval.py rebuilds the demo model from eval_configs/demo.yaml and scores the same questions
    # with the benchmark runner: its table must agree with the pipeline's own count
    evaluation = subprocess.run([sys.executable, str(REPO / "eval.py"), "--cfg-path", "eval_configs/demo.yaml"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    correct, total = map(int, re.search(r"\((\d+)/(\d+)\)", score[0]).groups())
    row = re.search(r"\| toy_vqa \| accuracy \| ([\d.]+) \| ([\d.]+) \| (\d+) \|", evaluation.stdout)
    assert row, evaluation.stdout[-2000:]
    assert int(row.group(3)) == total
    assert float(row.group(1)) == round(100 * correct / total, 2)
