"""The memory estimator (scripts/estimate_memory.py, tinygpt_v/memory/).

Validation against GPU measurements (issue 16, one H100 80GB): the four workloads in
benchmarks/memory_workloads/ each carry their measured peak; the estimate must be within 15%.
The full-size runs take ~20-40 s each on a CPU (fake tensors compute nothing).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinygpt_v.config import load_config
from tinygpt_v.memory import allocated_size, estimate_config, estimate_workload, load_workload
from tinygpt_v.memory.session import FakeSession
from tinygpt_v.memory.steps import greedy_generate

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = sorted((ROOT / "benchmarks" / "memory_workloads").glob("*.yaml"))
MB = 1 << 20


def test_allocator_rounding():
    assert allocated_size(0) == 0
    assert allocated_size(1) == 512
    assert allocated_size(513) == 1024
    assert allocated_size(5 * MB + 1) == 5 * MB + 512          # split from a 20 MB segment
    assert allocated_size(11 * MB + 100) == 12 * MB            # 2 MB-rounded segment kept whole
    assert allocated_size(11 * MB - 100 * 1024) == 11 * MB - 100 * 1024 + 0  # 1 MB+ left: split


def test_tracker_counts_live_storages_and_frees_them():
    with FakeSession() as session:
        session.start_tracking()
        a = torch.empty(1000, dtype=torch.float32)                # 4000 B -> 4096
        view = a[10:]
        assert session.tracker.total == 4096                      # a view allocates nothing
        b = torch.empty(100, dtype=torch.float16)                 # 200 B -> 512
        assert session.tracker.total == 4096 + 512
        del a
        assert session.tracker.total == 4096 + 512                # the view keeps the storage
        del view, b
        assert session.tracker.total == 0
        assert session.tracker.peak_total == 4096 + 512


def test_saved_tensors_count_as_activations():
    with FakeSession() as session:
        session.start_tracking()
        x = torch.empty(256, 256, requires_grad=True)
        with session.tracker.saved_as_activations():
            y = torch.tanh(x)                                     # tanh keeps its output for backward
            z = y * 2                                             # a scalar product keeps nothing
        assert session.tracker.live["activations"] == 256 * 256 * 4
        assert session.tracker.live["temporaries"] == 256 * 256 * 4 * 2  # x and z
        del y, z


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_rules_give_cuda_autocast_dtypes(dtype):
    """Our CPU emulation vs torch's own CUDA autocast kernels on fake CUDA tensors (forward
    only: that needs no GPU), op by op."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    ops = {
        "linear": lambda x, w: F.linear(x, w), "matmul": lambda x, w: x @ w,
        "layer_norm": lambda x, w: F.layer_norm(x, (64,)), "pow": lambda x, w: torch.pow(x, 3.0),
        "softmax": lambda x, w: F.softmax(x, -1), "sum": lambda x, w: x.sum(), "tanh": lambda x, w: torch.tanh(x),
        "exp": lambda x, w: torch.exp(x), "gelu": lambda x, w: F.gelu(x, approximate="tanh"),
        "sdpa": lambda x, w: F.scaled_dot_product_attention(x[None], x[None], x[None]),
    }
    inputs = {"fp32": torch.float32, "reduced": dtype}

    def dtypes(device, enter_autocast):
        found = {}
        with FakeTensorMode(allow_non_fake_inputs=True):
            for in_name, in_dtype in inputs.items():
                x = torch.empty(8, 64, dtype=in_dtype, device=device)
                w = torch.empty(64, 64, device=device)
                with enter_autocast():
                    for name, op in ops.items():
                        found[name, in_name] = op(x, w).dtype
        return found

    def cuda_autocast():  # torch.autocast("cuda") refuses without a GPU; its switches do not
        import contextlib

        @contextlib.contextmanager
        def enabled():
            previous = torch.get_autocast_dtype("cuda")
            torch.set_autocast_dtype("cuda", dtype)
            torch.set_autocast_enabled("cuda", True)
            torch.autocast_increment_nesting()
            try:
                yield
            finally:
                torch.autocast_decrement_nesting()
                torch.set_autocast_enabled("cuda", False)
                torch.set_autocast_dtype("cuda", previous)
        return enabled()

    from tinygpt_v.memory.autocast import CudaAutocastRules
    expected = dtypes("cuda", cuda_autocast)

    def emulated():
        import contextlib
        stack = contextlib.ExitStack()
        stack.enter_context(CudaAutocastRules())
        stack.enter_context(torch.autocast("cpu", dtype=dtype))
        return stack
    assert dtypes("cpu", emulated) == expected


def test_boolean_mask_indexing_and_item_work_on_fake_tensors():
    with FakeSession() as session:
        session.start_tracking()
        hidden = torch.empty(2, 6, 16)
        mask = torch.tensor([[0, 1, 1, 0, 0, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
        picked = hidden[mask]
        assert picked.shape == (7, 16)
        assert int(mask.sum()) == 7
        hidden[0, mask[0]] = torch.empty(3, 16)                   # index_put with a known mask


def _tiny_training_cfg(**run):
    cfg = load_config(ROOT / "configs" / "models" / "tiny.yaml", validate=False)
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg["datasets"] = {"a": {"batch_size": 4}, "b": {"batch_size": 2}}
    cfg["run"] = {"output_dir": "unused", "max_epoch": 1, "iters_per_epoch": 1, "init_lr": 1e-4,
                  "mixed_precision": "bf16", **run}
    return cfg


def test_tiny_preset_one_estimate_per_batch_size_and_checkpointing_saves_activations():
    plain = estimate_config(_tiny_training_cfg(), "tiny", text_tokens=40)
    assert [e.setting["batch_size"] for e in plain] == [4, 2]
    big, small = plain
    assert big.setting["text_tokens"] == 40
    assert big.peak_bytes > small.peak_bytes > big.breakdown["parameters"]
    assert big.breakdown["optimizer_state"] > 0
    checkpointed = estimate_config(_tiny_training_cfg(gradient_checkpointing=True), "tiny", text_tokens=40,
                                   batch_size=4)[0]
    assert checkpointed.peak_bytes < big.peak_bytes


def test_generation_shortcut_matches_every_step():
    """The middle decode steps run as one chunk: the peak may only grow by that chunk's
    temporaries (on the full-size generate_b1 workload: 7.76 GB against 7.75 GB step by step)."""
    from tinygpt_v.memory.workloads import build_llm
    spec = {"model_type": "phi", "dtype": "fp16", "config": {"vocab_size": 4096, "hidden_size": 256,
            "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4}}
    peaks = []
    for every_step in (True, False):
        llm = build_llm(spec, None, False)
        with FakeSession() as session:
            session.materialize(llm)
            with torch.no_grad():
                embeds = torch.empty(2, 10, 256, dtype=torch.float16)
                greedy_generate(llm, embeds, torch.ones(2, 10, dtype=torch.long), 20, every_step=every_step)
            peaks.append(session.tracker.peak_total)
    every_step, shortcut = peaks
    assert every_step <= shortcut <= every_step * 1.05


@pytest.mark.slow
@pytest.mark.parametrize("path", WORKLOADS, ids=[p.stem for p in WORKLOADS])
def test_validation_workloads_within_15_percent_of_h100_measurements(path):
    spec = load_workload(path)
    estimate = estimate_workload(spec)
    assert abs(estimate.peak_gb / spec["measured_gb"] - 1) <= 0.15, (estimate.peak_gb, spec["measured_gb"])


def test_four_validation_workloads_exist():
    assert len(WORKLOADS) == 4


@pytest.mark.slow
def test_a_full_size_stage_fits_24_gb():
    cfg = load_config(ROOT / "train_configs" / "stage3.yaml", validate=False)
    estimates = estimate_config(cfg, "stage3")
    assert estimates and all(e.peak_gb <= 24 for e in estimates)


def test_benchmarks_table_says_every_paper_config_fits():
    """benchmarks/memory.json (scripts/estimate_memory.py on every stage and inference mode)."""
    rows = json.loads((ROOT / "benchmarks" / "memory.json").read_text())["rows"]
    stages = [r for r in rows if r["kind"] == "train"]
    assert {r["config"] for r in stages} >= {"stage1", "stage2", "stage3", "stage4"}
    assert all(r["peak_gb"] <= 24 for r in stages)
    fp16 = [r for r in rows if r["kind"] == "generate" and r["mode"] == "fp16"]
    assert fp16 and all(r["peak_gb"] <= r["budget_gb"] or r["misses_because"] for r in fp16)


def _script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("estimate_memory", ROOT / "scripts" / "estimate_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_training_config_writes_json_and_checks_a_budget(tmp_path, capsys):
    script = _script()
    out = tmp_path / "estimate.json"
    args = ["--cfg-path", str(ROOT / "train_configs" / "demo_stage3.yaml"), "--tokens", "30", "--json", str(out)]
    assert script.main(args) == 0
    rows = json.loads(out.read_text())
    assert rows and all(r["kind"] == "train" and r["setting"]["text_tokens"] == 30 for r in rows)
    assert "peak GB" in capsys.readouterr().out
    assert script.main(args + ["--budget-gb", "1e-6"]) == 1


def test_cli_chat_config_estimates_one_generation(tmp_path):
    out = tmp_path / "estimate.json"
    assert _script().main(["--cfg-path", str(ROOT / "eval_configs" / "chat_tiny.yaml"), "--max-new-tokens", "5",
                           "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["kind"] == "generate" and row["setting"]["max_new_tokens"] == 5
    assert row["peak_bytes"] > row["breakdown"]["parameters"] > 0
