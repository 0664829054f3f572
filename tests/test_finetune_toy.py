"""Fine-tuning on your own data, end to end on the toy world: the README's "Fine-tune on your
data" commands, run as written (with fewer steps), from a folder that sees only the repo's configs.

The demo's stage-4 model (output/demo/stage4 of this checkout when the demo has been run; else
stage 4 trained here for a few steps from random weights) is fine-tuned on a question no demo
stage teaches ("how many corners does the <colour> shape have?", dataset/export_toy_custom.py),
and its held-out accuracy, scored by eval.py's custom_vqa benchmark, must rise clearly above the
pre-fine-tune value. Then the checkpoint is exported to a self-contained folder and answers
through the chat's batch mode with LoRA merged.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def run(cwd, *args, timeout=300) -> str:
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def accuracy(stdout: str, metric: str = "accuracy") -> float:
    row = re.search(rf"\| custom \| {metric} \| ([\d.]+) \| (\d+) \|", stdout)
    assert row, stdout[-2000:]
    return float(row.group(1))


def stage4_checkpoint(work) -> None:
    """output/demo/stage4 in `work`: the repo's trained demo, or a few steps of stage 4 here."""
    trained = REPO / "output/demo/stage4/checkpoint_final"
    (work / "output/demo").mkdir(parents=True)
    if (trained / "model.safetensors").is_file():
        (work / "output/demo/stage4").mkdir()
        (work / "output/demo/stage4/checkpoint_final").symlink_to(trained)
        return
    run(work, REPO / "dataset/make_toy_data.py", "--out", "output/demo/toy_data", "--train-images", "40",
        "--heldout-images", "4")
    run(work, REPO / "train.py", "--cfg-path", "train_configs/demo_stage4.yaml",
        "--options", "model.ckpt=null", "run.max_steps=10", "run.log_every=5")


def test_finetune_on_toy_data_raises_heldout_accuracy_then_exports_and_chats(tmp_path):
    for folder in ("configs", "train_configs", "eval_configs"):
        (tmp_path / folder).symlink_to(REPO / folder)
    stage4_checkpoint(tmp_path)
    run(tmp_path, REPO / "dataset/export_toy_custom.py", "--out", "output/demo/toy_custom", "--images", "300")
    assert "OK: usable" in run(tmp_path, REPO / "scripts/check_data.py", "--cfg-path",
                               "train_configs/finetune_demo.yaml")

    before = run(tmp_path, REPO / "eval.py", "--cfg-path", "eval_configs/finetune_demo.yaml", "--options",
                 "evaluation.checkpoint=output/demo/stage4/checkpoint_final",
                 "evaluation.output_dir=output/demo/finetune/eval_before")
    trained = run(tmp_path, REPO / "train.py", "--cfg-path", "train_configs/finetune_demo.yaml",
                  "--options", "run.max_steps=300", "run.iters_per_epoch=300")
    assert "done: steps 0->300" in trained
    after = run(tmp_path, REPO / "eval.py", "--cfg-path", "eval_configs/finetune_demo.yaml")
    print(f"held-out corners accuracy: {accuracy(before):.1f}% before, {accuracy(after):.1f}% after fine-tuning")
    assert accuracy(after) >= accuracy(before) + 20
    assert accuracy(after, "exact_match") >= accuracy(before, "exact_match") + 20

    run(tmp_path, REPO / "scripts/convert_checkpoint.py", "export", "--config", "eval_configs/chat_finetune_demo.yaml",
        "--out", "output/demo/finetune_export", "--ckpt", "output/demo/finetune/checkpoint_final")
    assert (tmp_path / "output/demo/finetune_export/config.yaml").is_file()
    run(tmp_path, "-m", "tinygpt_v.chat", "--cfg-path", "eval_configs/chat_finetune_demo.yaml",
        "--options", "inference.checkpoint=output/demo/finetune_export", "--batch", "output/demo/toy_custom/qa.jsonl",
        "--output", "output/demo/finetune/answers.jsonl")
    answers = [json.loads(line) for line in (tmp_path / "output/demo/finetune/answers.jsonl").read_text().splitlines()]
    assert len(answers) == 300 and all(isinstance(a.get("answer"), str) for a in answers)
