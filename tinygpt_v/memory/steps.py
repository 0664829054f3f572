"""One training step and one greedy generation, as the trainer and `generate` run them on a GPU.

The training step follows `tinygpt_v.training.Trainer.train_step` under accelerate: forward
under autocast (fp16 or bf16), GradScaler's loss scaling for fp16, backward, unscale, gradient
clipping, AdamW (foreach, as torch picks on CUDA), `zero_grad(set_to_none=True)`. Before it, one
optimizer step on zero gradients creates AdamW's state, so the measured step is a steady-state
step (the first step of a run holds no optimizer state during forward and backward).
"""
from __future__ import annotations

import contextlib
import math

import torch

from .session import FakeSession

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
GRAD_SCALE = 65536.0  # GradScaler's initial scale


def autocast(mixed_precision: str | None):
    if mixed_precision in AUTOCAST_DTYPES:
        return torch.autocast("cpu", dtype=AUTOCAST_DTYPES[mixed_precision])
    return contextlib.nullcontext()


def make_optimizer(params_or_groups, lr: float = 1e-4, weight_decay: float = 0.05):
    return torch.optim.AdamW(params_or_groups, lr=lr, weight_decay=weight_decay, foreach=True)


def watch_gradients(session: FakeSession, params: list[torch.nn.Parameter]) -> list:
    """A parameter's .grad counts as a gradient once autograd has accumulated it."""
    return [p.register_post_accumulate_grad_hook(lambda p: session.tracker.retag(p.grad, "gradients"))
            for p in params]


def warm_optimizer(session: FakeSession, optimizer: torch.optim.Optimizer, params: list) -> None:
    """Create AdamW's state (exp_avg, exp_avg_sq) as the first real step would."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tag_optimizer_state(session, optimizer)


def tag_optimizer_state(session: FakeSession, optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                session.tracker.retag(value, "optimizer_state")


def train_step(session: FakeSession, loss_fn, params: list, optimizer, mixed_precision: str | None,
               max_grad_norm: float | None = None) -> None:
    """forward (loss_fn) -> backward -> unscale -> clip -> step -> zero_grad, phase-labelled."""
    tracker = session.tracker
    with tracker.phase_label("forward"), tracker.saved_as_activations(), autocast(mixed_precision):
        loss = loss_fn()
    with tracker.phase_label("backward"):
        if mixed_precision == "fp16":
            loss = loss * GRAD_SCALE
        backward(loss)
        del loss
    with tracker.phase_label("optimizer step"):
        grads = [p.grad for p in params if p.grad is not None]
        if mixed_precision == "fp16":
            torch._foreach_mul_(grads, 1.0 / GRAD_SCALE)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf, foreach=False)
        del grads
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def backward(loss: torch.Tensor) -> None:
    """`loss.backward()`, started below torch-function handling: `Tensor.backward` is a torch
    function, and a TorchFunctionMode (the CUDA autocast rules) is off while it handles one,
    which would leave checkpoint recomputation in backward without those rules."""
    from torch.autograd.graph import _engine_run_backward
    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (),
                         allow_unreachable=True, accumulate_grad=True)


@torch.no_grad()
def greedy_generate(llm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    every_step: bool = False) -> None:
    """What `generate` keeps on the GPU for greedy decoding: a DynamicCache growing by one
    position per token, the prefill's last-position logits, the next token's fp32 logits.
    transformers' own loop asks the device whether every sequence has finished, a value a fake
    tensor does not have, so the loop is spelled out here.

    Decode steps differ only in the cache length, so by default the steps between the first
    and the last run as one chunk (the cache then holds all but the last token) and only the
    last single-token step runs as such: 3 forward passes instead of max_new_tokens + 1.
    `every_step=True` runs every step (tests compare the two)."""
    out = llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
    cache, batch = out.past_key_values, inputs_embeds.shape[0]
    steps = [1] * max_new_tokens if every_step or max_new_tokens < 3 else [max_new_tokens - 1, 1]
    for width in steps:
        next_logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
        next_tokens = next_logits.argmax(-1, keepdim=True).expand(batch, width)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, width))], dim=-1)
        del out, next_logits
        out = llm(input_ids=next_tokens, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
