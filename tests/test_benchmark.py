"""scripts/benchmark.py on the tiny preset: it measures, records and appends (no speed asserts)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts/benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_records_runs_with_environment_and_appends(tmp_path):
    benchmark = load_benchmark()
    args = ["--out", str(tmp_path), "--steps", "1", "--new-tokens", "4", "--train-batch", "2", "--modes", "fp32,bf16",
            "--note", "first"]
    benchmark.main(args)
    benchmark.main(args[:-1] + ["second"])
    runs = json.loads((tmp_path / "results.json").read_text())
    assert [r["note"] for r in runs] == ["second", "first"]  # newest first, nothing overwritten
    run = runs[0]
    assert run["config"] == "configs/models/tiny.yaml" and run["torch"] and run["date"]
    train = run["training"]
    assert train["batch"] == 2 and train["tokens_per_s"] > 0 and train["peak_memory_gb"] > 0
    assert train["tokens_per_s"] / train["samples_per_s"] == pytest.approx(train["tokens_per_step"] / 2)
    naive = run["training_naive"]
    assert naive["tokens_per_step"] == train["tokens_per_step"] and naive["tokens_per_s"] > 0
    assert [(g["batch"], g["path"]) for g in run["generation"]] == [(1, "plain"), (8, "plain"), (1, "static cache")]
    assert [m["mode"] for m in run["inference_modes"]] == ["fp32", "bf16"]
    for row in run["generation"] + run["inference_modes"]:
        assert row["decode_tokens_per_s"] > 0 and row["time_to_first_token_s"] > 0
    assert [v["image_size"] for v in run["vision"]] == [112]  # fixed-grid EVA: only its own size
    table = (tmp_path / "results.md").read_text()
    assert table.count("## ") == 2 and "| train: tokens/s |" in table and "naive baseline" in table
    assert "generate batch 1, bf16 plain: decode tokens/s" in table


def test_forced_length_generation_restores_the_stop_settings(tiny_model):
    benchmark = load_benchmark()
    end_sym, eos = tiny_model.end_sym, tiny_model.tokenizer.eos_token_id
    benchmark.bench_generation(tiny_model, "cpu", 112, batch=1, new_tokens=3)
    assert (tiny_model.end_sym, tiny_model.tokenizer.eos_token_id) == (end_sym, eos)
