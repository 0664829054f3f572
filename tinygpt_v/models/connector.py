"""Connectors: Q-Former outputs (B, 32, in_width) -> LLM input embeddings (B, 32, out_width),
or, without a Q-Former, the vision tokens themselves (`pixel_shuffle` merges neighbouring
patches first, nanoVLM / Idefics3 style, so the LLM sees factor^2 times fewer image tokens).

A connector that changes the number of tokens says so with `num_output_tokens(n)`."""
from __future__ import annotations

import torch
from torch import nn

from ..registry import CONNECTORS, ConfigError, supplied_by_code


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


class PixelShuffle(nn.Module):
    """nanoVLM's modality projector: each `factor` x `factor` block of the patch grid becomes one
    token of factor^2 * width features (space-to-depth), then a projection to the LLM width (a
    bias-free Linear as nanoVLM, or a GELU MLP with `hidden`). Needs a square grid of patch
    tokens only: a vision encoder with a class token needs `keep_cls: false`."""

    def __init__(self, in_width: int, out_width: int, factor: int, hidden: int | None):
        super().__init__()
        self.factor = factor
        merged = in_width * factor * factor
        self.proj = nn.Linear(merged, out_width, bias=False) if hidden is None else MLP(merged, hidden, out_width)

    def num_output_tokens(self, num_tokens: int) -> int:
        side = self._grid_side(num_tokens)
        return (side // self.factor) ** 2

    def _grid_side(self, num_tokens: int) -> int:
        side = int(round(num_tokens ** 0.5))
        if side * side != num_tokens or side % self.factor:
            raise ValueError(f"pixel_shuffle connector: {num_tokens} image tokens are not a square grid whose side "
                             f"divides by factor {self.factor} (a class token? set model.vision.keep_cls: false)")
        return side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, width = x.shape
        side, f = self._grid_side(num_tokens), self.factor
        grid = x.reshape(batch, side // f, f, side // f, f, width)
        merged = grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, (side // f) ** 2, f * f * width)
        return self.proj(merged)


@CONNECTORS.register("pixel_shuffle")
@supplied_by_code("in_width", "out_width")
def pixel_shuffle(in_width: int, out_width: int, factor: int = 2, hidden: int | None = None) -> PixelShuffle:
    if factor < 1:
        raise ConfigError("model.connector.factor", f"must be >= 1, got {factor}")
    return PixelShuffle(in_width, out_width, factor, hidden)
