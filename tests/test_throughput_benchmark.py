"""scripts/benchmark.py --throughput: every section measured beside its plain path, in one run."""
from __future__ import annotations

import importlib.util
import json

from tests.conftest import REPO


def test_throughput_sections_record_ratios_beside_the_plain_path(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts/benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(["--out", str(tmp_path), "--throughput", "--skip-core", "--quick", "--note", "quick"])
    (run,) = json.loads((tmp_path / "results.json").read_text())
    t = run["throughput"]
    assert run["device"] and run["torch"]
    assert {(r["image_size"], r["workers"]) for r in t["loader"]} == {(s, w) for s in (224, 448) for w in (0, 1, 2)}
    assert all(r["samples_per_s"] > 0 for r in t["loader"])
    for section in ("prefetch", "feature_cache", "splice", "tokenisation", "lora_merge"):
        assert t[section]["ratio"] > 0, section
    assert t["splice"]["bit_identical"] and t["tokenisation"]["bit_identical"]
    assert t["lora_merge"]["same_greedy_text"] and t["lora_merge"]["max_logit_diff"] < 1e-4
    grouping = t["grouping"]  # grouping never adds padding to the conversation batches
    assert grouping["grouped"]["conversation_padding_share"] <= grouping["plain"]["conversation_padding_share"]
    assert 0.3 < t["feature_cache"]["full_size_estimate"]["towers_share"] < 0.5  # EVA ViT-g at 224 vs Phi-2
    assert t.get("stages_gpu", []) == []  # no CUDA here: the GPU section is skipped
    table = (tmp_path / "results.md").read_text()
    for row in ("prefetch vs none", "feature cache vs none", "grouped vs plain"):
        assert row in table
