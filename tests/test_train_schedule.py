"""LR schedules against the original's formulas, worked by hand; the optimiser's groups."""
from __future__ import annotations

import pytest
import torch

from tinygpt_v.training.optim import build_optimizer, parameter_groups
from tinygpt_v.training.schedules import (StepScheduler, constant_lr, linear_warmup_cosine_lr,
                                          linear_warmup_step_lr)

# The paper's stage 1: init 1e-4, min 8e-5, warm-up from 1e-6 over 1000 steps, 1 epoch of 5000.
STAGE1 = dict(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=1000, max_epoch=1, iters_per_epoch=5000)


@pytest.mark.parametrize("step, expected", [
    (0, 1e-6),                 # warm-up starts at warmup_lr
    (500, 5.05e-5),            # 1e-6 + 99e-6 * 500/1000
    (999, 9.9901e-5),          # 1e-6 + 99e-6 * 999/1000: the last warm-up step
    # first cosine step: the phase is the global step (1000/5000), not restarted after warm-up:
    # 8e-5 + 2e-5 * (1 + cos(pi/5)) / 2, cos(36 deg) = 0.809016994
    (1000, 9.809016994e-5),
    (2500, 9.0e-5),            # mid-run: cos(pi/2) = 0 -> halfway between init and min
    (3750, 8.292893219e-5),    # 3/4: 8e-5 + 2e-5 * (1 - 0.707106781) / 2
    (5000, 8.0e-5),            # the end: min_lr
])
def test_warmup_cosine_matches_the_original_formula(step, expected):
    assert linear_warmup_cosine_lr(**STAGE1)(step) == pytest.approx(expected, rel=1e-9)


def test_cosine_spans_all_epochs():
    # stage 3: 5 epochs x 200 steps, 200 warm-up steps; mid-run is step 500
    lr_at = linear_warmup_cosine_lr(init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200,
                                    max_epoch=5, iters_per_epoch=200)
    assert lr_at(500) == pytest.approx(2e-5, rel=1e-9)
    assert lr_at(1000) == pytest.approx(1e-5, rel=1e-9)
    assert lr_at(100) == pytest.approx(1e-6 + 29e-6 / 2, rel=1e-9)


def test_warmup_lr_null_starts_at_init_lr():
    lr_at = linear_warmup_cosine_lr(init_lr=1e-4, min_lr=0.0, warmup_steps=10, max_epoch=1, iters_per_epoch=100)
    assert lr_at(0) == pytest.approx(1e-4)
    assert lr_at(5) == pytest.approx(1e-4)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),         # warm-up from 0 ...
    (5, 5e-5),        # ... halfway after 5 of 10 steps
    (10, 1e-4),       # capped at init_lr for the rest of epoch 0
    (99, 1e-4),
    (100, 5e-5),      # epoch 1: 1e-4 * 0.5
    (250, 2.5e-5),    # epoch 2: 1e-4 * 0.25
    (400, 1e-5),      # epoch 4: 6.25e-6 is below min_lr -> 1e-5
])
def test_warmup_step_matches_the_original_formula(step, expected):
    lr_at = linear_warmup_step_lr(init_lr=1e-4, min_lr=1e-5, decay_rate=0.5, warmup_lr=0.0, warmup_steps=10,
                                  iters_per_epoch=100)
    assert lr_at(step) == pytest.approx(expected, abs=1e-15)


def test_scheduler_sets_every_group():
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "weight_decay": 0.0}], lr=1.0)
    scheduler = StepScheduler(optimizer, linear_warmup_cosine_lr(**STAGE1))
    assert scheduler.set_step(2500) == pytest.approx(9e-5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([9e-5, 9e-5])
    assert StepScheduler(optimizer, constant_lr(3e-4)).set_step(123) == 3e-4


def test_no_decay_on_biases_norms_and_1d(tiny_model):
    from tinygpt_v.models.parameters import set_trainable
    set_trainable(tiny_model, ["projection", "llm_norms", "lora", "query_tokens"])
    decay, no_decay = parameter_groups(tiny_model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "connector.llama_proj.weight" in decay["names"]
    assert "connector.llama_proj.bias" in no_decay["names"]
    assert "qformer.query_tokens" in decay["names"]  # (1, 8, 64): a 3-D tensor, decayed as in the original
    assert any(".lora_A." in n for n in decay["names"])
    norm_names = [n for n in no_decay["names"] if "layernorm" in n or "norm" in n.split(".")[-2]]
    assert norm_names, "LLM norms must be in the no-decay group"
    assert not [n for n in decay["names"] if n.endswith("bias")]
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert set(decay["names"]) | set(no_decay["names"]) == trainable
    assert not set(decay["names"]) & set(no_decay["names"])


def test_optimizer_has_the_original_betas(tiny_model):
    optimizer = build_optimizer(tiny_model, init_lr=1e-4, weight_decay=0.05, beta2=0.999)
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == \
        sum(p.requires_grad for p in tiny_model.parameters())
