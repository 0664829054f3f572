"""Connectors: Q-Former outputs (B, 32, in_width) -> LLM input embeddings (B, 32, out_width)."""
from __future__ import annotations

import torch
from torch import nn

from ..registry import CONNECTORS, supplied_by_code


class TwoLinear(nn.Module):
    """TinyGPT-V's connector: MiniGPT-4's `llama_proj` (768 -> 4096, Vicuna-7B's width), kept so
    MiniGPT-4 weights can be reused, then a fresh `llama_proj2` to the LLM width. No
    non-linearity between them, as in the original."""

    def __init__(self, in_width: int, hidden: int, out_width: int):
        super().__init__()
        self.llama_proj = nn.Linear(in_width, hidden)
        self.llama_proj2 = nn.Linear(hidden, out_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.llama_proj2(self.llama_proj(x))


class MLP(nn.Module):
    """LLaVA-1.5-style two-layer GELU MLP, for connector ablations."""

    def __init__(self, in_width: int, hidden: int, out_width: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_width, hidden), nn.GELU(), nn.Linear(hidden, out_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@CONNECTORS.register("minigpt4_two_linear")
@supplied_by_code("in_width", "out_width")
def minigpt4_two_linear(in_width: int, out_width: int, hidden: int = 4096) -> TwoLinear:
    return TwoLinear(in_width, hidden, out_width)


@CONNECTORS.register("linear")
@supplied_by_code("in_width", "out_width")
def linear(in_width: int, out_width: int) -> nn.Linear:
    return nn.Linear(in_width, out_width)


@CONNECTORS.register("mlp")
@supplied_by_code("in_width", "out_width")
def mlp(in_width: int, out_width: int, hidden: int = 2048) -> MLP:
    return MLP(in_width, hidden, out_width)
