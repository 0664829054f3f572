"""How a run is distributed, decided without starting processes: the launcher's environment, the
mode it resolves to, the refusals (one line: why and how to fix), the generated DeepSpeed config
and the start line. The runs themselves are in test_distributed_runs.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from conftest import REPO
from omegaconf import OmegaConf

from tinygpt_v.registry import ConfigError
from tinygpt_v.training.distributed import (DistributedSetupError, Launcher, Plan, check_started, deepspeed_config,
                                            deepspeed_plugin, describe, plan_run, read_launcher, resolve_mode)
from tinygpt_v.training.settings import read_run_settings

TORCHRUN_2 = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
ACCELERATE_FSDP2 = {**TORCHRUN_2, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
ACCELERATE_ZERO3 = {**TORCHRUN_2, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


def run_settings(**run):
    return read_run_settings({"output_dir": "out", "max_epoch": 1, "iters_per_epoch": 4, "init_lr": 1e-4, **run})


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# --- the launcher and the mode --------------------------------------------------------------------

def test_read_launcher_from_torchrun_and_accelerate_environments(tmp_path):
    assert read_launcher({}) == Launcher(None, None, None)
    assert read_launcher(TORCHRUN_2) == Launcher(2, 2, None)
    assert read_launcher(ACCELERATE_FSDP2).accelerate_mode == "fsdp2"
    assert read_launcher({"ACCELERATE_USE_FSDP": "true"}).accelerate_mode == "fsdp1"  # accelerate's default
    assert read_launcher(ACCELERATE_ZERO3).accelerate_mode == "zero3"
    # a DeepSpeed JSON named by accelerate's config decides the stage
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    env = {**ACCELERATE_ZERO3, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json)}
    assert read_launcher(env).accelerate_mode == "zero2"
    assert Launcher(4, 2, None).nodes == 2 and Launcher(None, None, None).nodes == 1


def test_fsdp2_takes_accelerates_fsdp_over_and_the_next_stage_still_sees_it(monkeypatch):
    """The trainer switches accelerate's own FSDP off (it shards itself); a pipeline's next stage,
    in the same process, must still resolve `auto` to fsdp2, not fall back to DDP."""
    from tinygpt_v.training.distributed import accelerator_kwargs
    for name, value in ACCELERATE_FSDP2.items():
        monkeypatch.setenv(name, value)
    # set first so that monkeypatch removes it again: accelerator_kwargs writes it to os.environ
    monkeypatch.setenv("TINYGPT_V_LAUNCHED_FSDP_VERSION", "")
    monkeypatch.delenv("TINYGPT_V_LAUNCHED_FSDP_VERSION")
    first = plan_run(run_settings(), None, cuda=True)
    assert first.mode == "fsdp2"
    accelerator_kwargs(first, run_settings())
    import os
    assert os.environ["ACCELERATE_USE_FSDP"] == "false"
    assert plan_run(run_settings(), None, cuda=True).mode == "fsdp2"


def test_auto_follows_the_launcher_and_a_disagreement_is_refused():
    assert resolve_mode("auto", read_launcher(TORCHRUN_2)) == "ddp"
    assert resolve_mode("auto", read_launcher(ACCELERATE_FSDP2)) == "fsdp2"
    assert resolve_mode("auto", read_launcher(ACCELERATE_ZERO3)) == "zero3"
    assert resolve_mode("fsdp2", read_launcher(TORCHRUN_2)) == "fsdp2"  # torchrun + YAML: the YAML decides
    with pytest.raises(DistributedSetupError) as error:
        resolve_mode("ddp", read_launcher(ACCELERATE_ZERO3))
    assert "mode is ddp but accelerate's config asks for zero3" in one_line(error)
    assert "configs/accelerate/ddp.yaml" in str(error.value)


@pytest.mark.parametrize("env, words", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version: 2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "ZeRO stage 1"),
])
def test_strategies_the_trainer_does_not_run_are_refused(env, words):
    with pytest.raises(DistributedSetupError) as error:
        resolve_mode("auto", read_launcher(env))
    assert words in one_line(error)


def test_device_auto_under_a_launcher_without_gpu_trains_on_cpu():
    """The bug of issue 14: torchrun + device auto + no GPU gave N single-process runs."""
    assert plan_run(run_settings(), None, env=TORCHRUN_2, cuda=False).cpu
    assert not plan_run(run_settings(), None, env=TORCHRUN_2, cuda=True).cpu
    assert not plan_run(run_settings(), None, env={}, cuda=False).cpu  # one process: accelerate picks the CPU
    assert plan_run(run_settings(device="cpu"), None, env={}, cuda=True).cpu


def test_plan_refuses_combinations_that_cannot_work():
    with pytest.raises(DistributedSetupError) as error:
        plan_run(run_settings(device="cpu", distributed={"mode": "zero2"}), None, env=TORCHRUN_2, cuda=False)
    assert "run.device: auto" in one_line(error)
    with pytest.raises(DistributedSetupError) as error:
        plan_run(run_settings(mixed_precision="fp16", distributed={"mode": "fsdp2"}), None, env=TORCHRUN_2, cuda=True)
    assert "bf16" in one_line(error)


def test_run_distributed_keys_are_checked_at_load_time():
    with pytest.raises(ConfigError, match=r"run\.distributed\.mode"):
        run_settings(distributed={"mode": "fsdp"})
    with pytest.raises(ConfigError, match=r"run\.distributed\.shard"):
        run_settings(distributed={"shard": True})
    assert run_settings(distributed={"mode": "zero3"}).distributed == {"mode": "zero3"}


# --- after accelerate started ---------------------------------------------------------------------

def fake_accelerator(num_processes: int, kind: DistributedType, zero_stage: int | None = None, backend="gloo"):
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    return SimpleNamespace(num_processes=num_processes, distributed_type=kind, device=SimpleNamespace(type="cpu"),
                           state=SimpleNamespace(deepspeed_plugin=plugin, backend=backend))


def plan(mode: str, world_size: int | None = 2, batch: int = 4) -> Plan:
    return Plan(mode, cpu=True, cuda=False, launcher=Launcher(world_size, world_size, None), micro_batch=batch)


def test_a_process_that_accelerate_runs_alone_under_a_launcher_is_refused():
    with pytest.raises(DistributedSetupError) as error:
        check_started(fake_accelerator(1, DistributedType.NO, backend=None), plan("ddp"))
    text = one_line(error)
    assert "WORLD_SIZE=2" in text and "1 of 1" in text and "run.device: cpu" in text
    check_started(fake_accelerator(2, DistributedType.MULTI_CPU), plan("ddp"))  # agrees: no error
    check_started(fake_accelerator(1, DistributedType.NO), plan("ddp", world_size=None))  # no launcher


@pytest.mark.parametrize("mode, accelerator, words", [
    ("zero2", fake_accelerator(2, DistributedType.MULTI_GPU), "asked for DeepSpeed ZeRO-2 but accelerate set up"),
    ("zero3", fake_accelerator(2, DistributedType.DEEPSPEED, zero_stage=2), "ZeRO-3 but accelerate set up"),
    ("fsdp2", fake_accelerator(2, DistributedType.DEEPSPEED, zero_stage=2), "mode fsdp2 but accelerate set up"),
    ("ddp", fake_accelerator(2, DistributedType.FSDP), "mode ddp but accelerate set up"),
])
def test_a_strategy_other_than_the_one_asked_for_is_refused(mode, accelerator, words):
    with pytest.raises(DistributedSetupError) as error:
        check_started(accelerator, plan(mode))
    assert words in one_line(error)


def test_start_line_names_backend_world_size_mode_and_batch():
    line = describe(fake_accelerator(4, DistributedType.MULTI_CPU), Plan("fsdp2", True, False, Launcher(4, 2, None), 3),
                    accum=2)
    assert line.startswith("distributed: FSDP2")
    for words in ("backend gloo", "device cpu", "world size 4 (2 nodes)", "per-process batch 3 x accum 2",
                  "global batch 24"):
        assert words in line


# --- DeepSpeed ------------------------------------------------------------------------------------

def test_generated_deepspeed_config_needs_no_json():
    datasets = {"a": {"batch_size": 6}, "b": {"batch_size": 2}}
    run = run_settings(accum_grad_iters=3, max_grad_norm=1.5, distributed={"mode": "zero3"})
    p = plan_run(run, datasets, env=TORCHRUN_2, cuda=True)
    assert (p.mode, p.micro_batch, p.cpu) == ("zero3", 6, False)
    config = deepspeed_plugin(p, run).deepspeed_config  # accelerate's plugin; DeepSpeed itself not needed
    assert config["train_micro_batch_size_per_gpu"] == 6  # accelerate would otherwise need the loader
    assert config["gradient_accumulation_steps"] == 3 and config["gradient_clipping"] == 1.5
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_a_users_deepspeed_json_is_completed_or_refused_when_it_contradicts():
    run = run_settings(accum_grad_iters=2)
    p = plan("zero2", batch=4)
    filled = deepspeed_config(p, run, {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2},
                                       "bf16": {"enabled": True}})
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["bf16"] == {"enabled": True}
    assert filled["gradient_clipping"] == 0.0  # run.max_grad_norm null: no clipping, as the original
    with pytest.raises(DistributedSetupError, match="train_micro_batch_size_per_gpu 8 but"):
        deepspeed_config(p, run, {"train_micro_batch_size_per_gpu": 8})
    with pytest.raises(DistributedSetupError, match="stage 3 but run.distributed.mode is zero2"):
        deepspeed_config(p, run, {"zero_optimization": {"stage": 3}})


# --- the shipped accelerate configs ----------------------------------------------------------------

@pytest.mark.parametrize("name, mode", [("ddp", "ddp"), ("fsdp2", "fsdp2"), ("zero2", "zero2"), ("zero3", "zero3"),
                                        ("multi_node", "ddp")])
def test_shipped_accelerate_configs_resolve_to_their_mode(name, mode):
    """The environment accelerate launch derives from each file gives the mode it is named after."""
    from accelerate.commands.config.config_args import load_config_from_file
    config = load_config_from_file(str(REPO / "configs/accelerate" / f"{name}.yaml"))
    env = {}
    if config.distributed_type == DistributedType.FSDP:
        env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(config.fsdp_config["fsdp_version"])}
    elif config.distributed_type == DistributedType.DEEPSPEED:
        env = {"ACCELERATE_USE_DEEPSPEED": "true",
               "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(config.deepspeed_config["zero_stage"])}
    assert resolve_mode("auto", read_launcher(env)) == mode
    assert resolve_mode(mode, read_launcher(env)) == mode
    if name == "multi_node":
        assert config.num_machines == 2 and config.rdzv_backend == "c10d"


def test_docs_list_every_mode_with_a_command():
    text = (REPO / "docs/training.md").read_text()
    for name in ("ddp", "fsdp2", "zero2", "zero3", "multi_node"):
        assert f"configs/accelerate/{name}.yaml" in text
    assert "--rdzv-backend c10d" in text
    assert OmegaConf.load(REPO / "configs/accelerate/zero2.yaml").deepspeed_config.zero_stage == 2

