"""AdamW over the trainable parameters, with the original's decay / no-decay split."""
from __future__ import annotations

import torch
from torch import nn

from ..models.parameters import is_norm


def no_decay_names(model: nn.Module) -> set[str]:
    """Trainable parameters that get no weight decay: biases, norm weights, any 1-D tensor
    (the original: `p.ndim < 2 or "bias" in name or "ln" in name or "bn" in name`)."""
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    return {name for name, p in model.named_parameters()
            if p.requires_grad and (p.ndim < 2 or name.endswith("bias") or id(p) in norm_params)}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, each listing its parameter names (for logs and tests)."""
    skip = no_decay_names(model)
    decay = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n not in skip]
    no_decay = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n in skip]
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, init_lr: float, weight_decay: float, beta2: float = 0.999) -> torch.optim.AdamW:
    groups = [g for g in parameter_groups(model, weight_decay) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters: check model.trainable")
    return torch.optim.AdamW(groups, lr=init_lr, weight_decay=weight_decay, betas=(0.9, beta2))
