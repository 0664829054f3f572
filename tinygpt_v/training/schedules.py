"""Learning-rate schedules: the original's formulas (MiniGPT-4's `common/optims.py`), as pure
functions of the step.

A schedule builder takes its settings from the `run:` section (its signature says which keys
it reads) and returns `lr_at(step) -> float`, the rate used for optimiser step `step`
(0-based: `lr_at(0)` is the first update's). Because the rate is a function of the step only,
the scheduler's whole resume state is the step.

The original advanced its schedule once per loader iteration; here a step is one optimiser
update, which is the same thing with `accum_grad_iters: 1` (every stage of the paper).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable

from torch.optim import Optimizer

from ..registry import LR_SCHEDULES

Schedule = Callable[[int], float]


def linear_warmup(step: int, warmup_steps: int, start_lr: float, init_lr: float) -> float:
    """Linear from start_lr (step 0) towards init_lr (reached at step warmup_steps), capped."""
    return min(init_lr, start_lr + (init_lr - start_lr) * step / max(warmup_steps, 1))


def cosine_lr(step: int, total_steps: int, init_lr: float, min_lr: float) -> float:
    """Half a cosine from init_lr (step 0) to min_lr (step total_steps)."""
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps)) + min_lr


@LR_SCHEDULES.register("linear_warmup_cosine_lr")
def linear_warmup_cosine_lr(init_lr: float, max_epoch: int, iters_per_epoch: int, min_lr: float = 0.0,
                            warmup_steps: int = 0, warmup_lr: float | None = None) -> Schedule:
    """Warm up linearly over `warmup_steps`, then cosine over the whole run.

    As in the original, the cosine is evaluated at the global step (its phase does not restart
    after the warm-up), so the first step after the warm-up is already a little below init_lr."""
    start_lr = init_lr if warmup_lr is None else warmup_lr
    total_steps = max_epoch * iters_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return linear_warmup(step, warmup_steps, start_lr, init_lr)
        return cosine_lr(step, total_steps, init_lr, min_lr)
    return lr_at


@LR_SCHEDULES.register("linear_warmup_step_lr")
def linear_warmup_step_lr(init_lr: float, iters_per_epoch: int, min_lr: float = 0.0, decay_rate: float = 1.0,
                          warmup_steps: int = 0, warmup_lr: float | None = None) -> Schedule:
    """Warm up during the first epoch (capped at init_lr), then init_lr * decay_rate**epoch,
    never below min_lr. As in the original, the warm-up only happens in epoch 0."""
    start_lr = init_lr if warmup_lr is None else warmup_lr

    def lr_at(step: int) -> float:
        epoch, step_in_epoch = divmod(step, iters_per_epoch)
        if epoch == 0:
            return linear_warmup(step_in_epoch, warmup_steps, start_lr, init_lr)
        return max(min_lr, init_lr * decay_rate ** epoch)
    return lr_at


@LR_SCHEDULES.register("constant_lr")
def constant_lr(init_lr: float) -> Schedule:
    """init_lr at every step (tests, ablations)."""
    return lambda step: init_lr


def build_schedule(settings) -> Schedule:
    """The schedule `settings.lr_sched` with the `run:` keys its builder reads."""
    builder = LR_SCHEDULES.get(settings.lr_sched, "run.lr_sched")
    wanted = inspect.signature(builder).parameters
    return builder(**{name: settings.values[name] for name in wanted if name in settings.values})


class StepScheduler:
    """Sets the optimiser's rate for a step. Stateless beyond the step, which the trainer keeps."""

    def __init__(self, optimizer: Optimizer, lr_at: Schedule):
        self.optimizer, self.lr_at = optimizer, lr_at

    def set_step(self, step: int) -> float:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
