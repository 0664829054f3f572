"""A stand-in model that answers from a script: for tests, and for dry runs of a benchmark suite
(checking files, prompts and scoring before spending GPU time)."""
from __future__ import annotations

from collections.abc import Callable

import torch


class Interrupted(RuntimeError):
    """Raised by ScriptedModel after `stop_after_batches` batches, like a job killed mid-run."""


class ScriptedModel:
    """`generate` replies `answer(prompt)`; `score_candidates` prefers the candidate `answer(prompt)`
    names. Every prompt it is asked about is recorded in `seen`."""

    def __init__(self, answer: Callable[[str], str] | dict[str, str], image_size: int = 16,
                 stop_after_batches: int | None = None):
        self.answer = answer if callable(answer) else (lambda prompt: _lookup(answer, prompt))
        self.image_size = image_size
        self.stop_after_batches = stop_after_batches
        self.seen: list[str] = []

    def generate(self, images: torch.Tensor | None, prompts: list[str], max_new_tokens: int = 20,
                 do_sample: bool = False, num_beams: int = 1, **_) -> list[str]:
        self._take(images, prompts)
        return [self.answer(p) for p in prompts]

    def score_candidates(self, images: torch.Tensor | None, prompts: list[str],
                         candidates: list[list[str]], **_) -> list[list[float]]:
        self._take(images, prompts)
        return [[0.0 if c == self.answer(p) else -1.0 for c in options] for p, options in zip(prompts, candidates)]

    def _take(self, images: torch.Tensor | None, prompts: list[str]) -> None:
        if self.stop_after_batches == 0:
            raise Interrupted("scripted interruption")
        if images is not None and tuple(images.shape) != (len(prompts), 3, self.image_size, self.image_size):
            raise ValueError(f"images {tuple(images.shape)} do not match {len(prompts)} prompts")
        self.seen.extend(prompts)
        if self.stop_after_batches is not None:
            self.stop_after_batches -= 1


def _lookup(table: dict[str, str], prompt: str) -> str:
    """The reply of the first key that occurs in the prompt, else an empty reply."""
    return next((reply for key, reply in table.items() if key in prompt), "")
