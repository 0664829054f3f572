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
from typing import Annotated, Literal

from ..config import register_section, to_plain
from ..registry import (LR_SCHEDULES, Bound, ConfigError, Fraction, LocalPath, NonNegativeFloat, NonNegativeInt,
                        PositiveFloat, PositiveInt, Section, check_kwargs)
from .distributed import distributed_schema

# numpy's seed must be below 2**32 and accelerate seeds process r with seed + r
Seed = Annotated[int, Bound(ge=0, lt=2**31)]


def run_schema(
    output_dir: str,
    max_epoch: PositiveInt,
    iters_per_epoch: PositiveInt,
    init_lr: PositiveFloat,
    lr_sched: str = "linear_warmup_cosine_lr",
    min_lr: NonNegativeFloat = 0.0,
    warmup_lr: NonNegativeFloat | None = None,
    warmup_steps: NonNegativeInt = 0,
    decay_rate: PositiveFloat = 1.0,
    weight_decay: NonNegativeFloat = 0.05,
    beta2: Fraction = 0.999,
    accum_grad_iters: PositiveInt = 1,
    max_grad_norm: PositiveFloat | None = None,
    mixed_precision: Literal["no", "fp16", "bf16"] = "no",
    gradient_checkpointing: bool = False,
    seed: Seed = 42,
    max_steps: PositiveInt | None = None,
    save_every: PositiveInt | None = None,
    keep_last: PositiveInt = 2,
    resume: str | None = None,
    resume_inexact: bool = False,
    log_every: PositiveInt = 10,
    wandb: bool | None = None,
    tensorboard: bool | None = None,
    project: str = "tinygpt_v",
    job_name: str | None = None,
    num_workers: NonNegativeInt = 0,
    prefetch: NonNegativeInt = 0,
    feature_cache: str | None = None,
    device: Literal["auto", "cpu"] = "auto",
    cpu_threads: PositiveInt | None = None,
    find_unused_parameters: bool = False,
    distributed: Annotated[dict, Section(distributed_schema)] | None = None,
) -> None:
    """The `run:` section.

    One *step* is one optimiser update (`accum_grad_iters` micro-batches per process). The
    schedule spans `max_epoch * iters_per_epoch` steps; `max_steps` stops earlier (smoke runs)
    without changing the schedule. `warmup_lr: null` starts the warm-up at `init_lr` (the
    original's -1). `save_every` (steps, default `iters_per_epoch`: once per epoch as the
    original) writes `checkpoint_{step}`; the end writes `checkpoint_final`; `keep_last` numbered
    checkpoints are kept. `resume`: `auto` (the newest checkpoint in `output_dir`, if any) or a
    checkpoint folder. A resume is exact (bit-identical to an uninterrupted run) or refused: missing
    or unreadable resume state (optimizer.bin, random_states_*.pkl, data_rank*.pt) is an error
    naming the file, unless `resume_inexact: true` accepts continuing without it (fresh optimiser
    moments / RNG / data order for the missing part, each warned about); `auto` first falls back
    past a damaged newest checkpoint to the newest one that resumes exactly. `max_grad_norm: null`
    disables clipping (the original does not clip).
    `wandb` / `tensorboard`: null (the default) logs to the tracker when its package is installed
    and skips it silently otherwise; `true` asks for it (a warning if it is missing); `false` never.
    `num_workers` processes load the samples; `prefetch` batches are prepared ahead in a thread
    (pinned, copied to the GPU without blocking); either way the batches and a resume are the same.
    `feature_cache: DIR` stores the frozen towers' output per image and reuses it (stage 1 -> 2,
    every epoch); refused when a tower trains or a processor augments (training/feature_cache.py).
    `cpu_threads` sets torch's intra-op threads (null: torch's default); 1 is the fastest for the
    tiny model and keeps a shared CPU from stalling in OpenMP barriers.
    `distributed`: `{mode: auto|ddp|fsdp2|zero2|zero3, reshard_after_forward: true}`, how the
    launched processes share the work (training/distributed.py; docs/training.md).
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
    resume = section.get("resume")
    if resume not in (None, "auto"):
        check_kwargs(_resume_path, {"resume": resume}, key)


def _resume_path(resume: LocalPath) -> None:
    """`run.resume` when it is not `auto`: a checkpoint folder that must exist."""


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
