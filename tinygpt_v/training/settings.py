"""The `run:` section: its schema, its load-time check, and the settings object the trainer reads.

Key names follow the original (MiniGPT-4 / LAVIS run configs) where it had one: `init_lr`,
`min_lr`, `warmup_lr`, `warmup_steps`, `lr_sched`, `max_epoch`, `iters_per_epoch`,
`weight_decay`, `beta2`, `accum_grad_iters`, `seed`, `output_dir`, `num_workers`.
The signature of `run_schema` is the schema: `check_kwargs` reports an unknown or mistyped key
as `run.<key>` together with the file that set it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal

from ..config import register_section, to_plain
from ..registry import LR_SCHEDULES, ConfigError, LocalPath, check_kwargs


def run_schema(
    output_dir: str,
    max_epoch: int,
    iters_per_epoch: int,
    init_lr: float,
    lr_sched: str = "linear_warmup_cosine_lr",
    min_lr: float = 0.0,
    warmup_lr: float | None = None,
    warmup_steps: int = 0,
    decay_rate: float = 1.0,
    weight_decay: float = 0.05,
    beta2: float = 0.999,
    accum_grad_iters: int = 1,
    max_grad_norm: float | None = None,
    mixed_precision: Literal["no", "fp16", "bf16"] = "no",
    gradient_checkpointing: bool = False,
    seed: int = 42,
    max_steps: int | None = None,
    save_every: int | None = None,
    keep_last: int = 2,
    resume: str | None = None,
    log_every: int = 10,
    wandb: bool = True,
    tensorboard: bool = True,
    project: str = "tinygpt_v",
    job_name: str | None = None,
    num_workers: int = 0,
    device: Literal["auto", "cpu"] = "auto",
    cpu_threads: int | None = None,
    find_unused_parameters: bool = False,
) -> None:
    """The `run:` section.

    One *step* is one optimiser update (`accum_grad_iters` micro-batches per process). The
    schedule spans `max_epoch * iters_per_epoch` steps; `max_steps` stops earlier (smoke runs)
    without changing the schedule. `warmup_lr: null` starts the warm-up at `init_lr` (the
    original's -1). `save_every` (steps, default `iters_per_epoch`: once per epoch as the
    original) writes `checkpoint_{step}`; the end writes `checkpoint_final`; `keep_last` numbered
    checkpoints are kept. `resume`: `auto` (the newest checkpoint in `output_dir`, if any) or a
    checkpoint folder. `max_grad_norm: null` disables clipping (the original does not clip).
    `cpu_threads` sets torch's intra-op threads (null: torch's default); 1 is the fastest for the
    tiny model and keeps a shared CPU from stalling in OpenMP barriers.
    """


# Keys that only some schedules read: setting one the chosen schedule ignores is an error, so a
# `decay_rate` under a cosine schedule does not silently do nothing.
_ALWAYS_READ = {"init_lr", "max_epoch", "iters_per_epoch"}  # the trainer reads these whatever the schedule


def _schedule_keys() -> set[str]:
    keys: set[str] = set()
    for name in LR_SCHEDULES.names():
        keys |= set(inspect.signature(LR_SCHEDULES.get(name)).parameters)
    return keys


@register_section("run")
def check_run_section(section, key: str = "run") -> None:
    section = to_plain(section) or {}
    check_kwargs(run_schema, section, key)
    name = section.get("lr_sched", "linear_warmup_cosine_lr")
    wanted = set(inspect.signature(LR_SCHEDULES.get(name, f"{key}.lr_sched")).parameters)
    unused = sorted((_schedule_keys() - wanted - _ALWAYS_READ) & set(section))
    if unused:
        raise ConfigError(f"{key}.{unused[0]}", f"is not used by lr_sched '{name}' (it reads "
                                                f"{', '.join(sorted(wanted))}); remove it")
    _check_positive(section, key)
    resume = section.get("resume")
    if resume not in (None, "auto"):
        check_kwargs(_resume_path, {"resume": resume}, key)


def _resume_path(resume: LocalPath) -> None:
    """`run.resume` when it is not `auto`: a checkpoint folder that must exist."""


def _check_positive(section: dict, key: str) -> None:
    for name in ("max_epoch", "iters_per_epoch", "accum_grad_iters", "log_every", "keep_last",
                 "save_every", "max_steps", "cpu_threads"):
        value = section.get(name)
        if value is not None and value < 1:
            raise ConfigError(f"{key}.{name}", f"must be at least 1, got {value}")
    if section.get("max_grad_norm") is not None and section["max_grad_norm"] <= 0:
        raise ConfigError(f"{key}.max_grad_norm", "must be positive, or null for no clipping")


@dataclass(frozen=True)
class RunSettings:
    """The checked `run:` section with every default filled in (attribute per key)."""
    values: dict

    def __getattr__(self, name: str):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def total_steps(self) -> int:
        """Steps of the schedule: max_epoch x iters_per_epoch."""
        return self.max_epoch * self.iters_per_epoch

    @property
    def last_step(self) -> int:
        """Where this run stops: the schedule's end, or max_steps if that comes first."""
        return min(self.total_steps, self.max_steps or self.total_steps)

    @property
    def checkpoint_every(self) -> int:
        return self.save_every or self.iters_per_epoch


def read_run_settings(section) -> RunSettings:
    """Check the `run:` section and fill in the defaults of `run_schema`."""
    section = to_plain(section) or {}
    check_run_section(section)
    bound = inspect.signature(run_schema).bind(**section)
    bound.apply_defaults()
    return RunSettings(dict(bound.arguments))
