"""Live device-storage bytes, by category, seen from the dispatcher.

Every tensor an operator returns lives in a storage; the tracker registers each new storage
with its size as the CUDA caching allocator would hand it out and drops it when Python frees the
storage (a weak reference's callback). Under FakeTensorMode nothing is computed, but storages
are created and freed exactly as in a real run, so the running total is the device's
`memory_allocated()` and its maximum is `max_memory_allocated()`.

Categories: a storage is a temporary until something says otherwise: parameters and buffers
are registered as such, autograd's saved tensors become activations (a saved-tensor hook), a
parameter's `.grad` becomes a gradient, an optimizer's state tensors optimizer state.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")
HOST = "host"  # storages that live in host memory (a vision tower placed on the CPU): not counted

# The CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp): every block is a multiple of
# 512 bytes; requests above 1 MB come from large segments, and a request of 10 MB or more gets a
# segment rounded up to 2 MB that it keeps whole when splitting would leave 1 MB or less.
MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def allocated_size(nbytes: int) -> int:
    """Bytes `memory_allocated()` grows by for a request of `nbytes`."""
    if nbytes <= 0:
        return 0
    block = MIN_BLOCK * math.ceil(nbytes / MIN_BLOCK)
    if nbytes >= MIN_LARGE_ALLOC:
        segment = ROUND_LARGE * math.ceil(nbytes / ROUND_LARGE)
        if segment - block <= SMALL_SIZE:
            return segment
    return block


class _Entry:
    __slots__ = ("nbytes", "category")

    def __init__(self, nbytes: int, category: str):
        self.nbytes, self.category = nbytes, category


class StorageTracker(TorchDispatchMode):
    """Running and peak totals of live storages, split by category, with a phase label."""

    def __init__(self):
        super().__init__()
        self._entries: dict[int, _Entry] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.live = dict.fromkeys((*CATEGORIES, HOST), 0)
        self.default_category = "temporaries"
        self.peak_total = 0
        self.peak = self._counted()
        self.peak_phase = ""
        self.phase = ""

    # --- bookkeeping -----------------------------------------------------------------------

    @property
    def total(self) -> int:
        return sum(v for k, v in self.live.items() if k != HOST)

    def track(self, tensor: torch.Tensor, category: str | None = None) -> None:
        """Register the tensor's storage (once); an already known storage keeps its category
        unless `category` is given by a caller that knows better (see `retag`)."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._entries:
            return
        entry = _Entry(allocated_size(storage.nbytes()), category or self.default_category)
        self._entries[key] = entry
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._free(key))
        self.live[entry.category] += entry.nbytes
        self._update_peak()

    def retag(self, tensor: torch.Tensor, category: str, only_from: tuple[str, ...] | None = None) -> None:
        """Move the tensor's storage to `category` (registering it if new)."""
        storage = tensor.untyped_storage()
        entry = self._entries.get(id(storage))
        if entry is None:
            self.track(tensor, category)
            return
        if entry.category == category or (only_from is not None and entry.category not in only_from):
            return
        self.live[entry.category] -= entry.nbytes
        self.live[category] += entry.nbytes
        entry.category = category

    def _free(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        self._refs.pop(key, None)
        if entry is not None:
            self.live[entry.category] -= entry.nbytes

    def _update_peak(self) -> None:
        total = self.total
        if total > self.peak_total:
            self.peak_total, self.peak, self.peak_phase = total, self._counted(), self.phase

    def reset_peak(self) -> None:
        self.peak_total, self.peak, self.peak_phase = self.total, self._counted(), self.phase

    def _counted(self) -> dict[str, int]:
        return {k: self.live[k] for k in CATEGORIES}

    @contextmanager
    def on_host(self):
        """Storages created in this block live in host memory (not counted)."""
        previous, self.default_category = self.default_category, HOST
        try:
            yield
        finally:
            self.default_category = previous

    @contextmanager
    def phase_label(self, name: str):
        previous, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = previous

    # --- saved tensors become activations ----------------------------------------------------

    @contextmanager
    def saved_as_activations(self):
        """Within this block, tensors autograd saves for backward count as activations.
        (Tensors saved inside a checkpointed region are not kept, so they stay temporaries
        until the region is recomputed in backward.)"""
        def pack(t):
            self.retag(t, "activations", only_from=("temporaries",))
            # a detached alias keeps the storage alive as autograd would, without the
            # output -> grad_fn -> saved output cycle that returning `t` itself would make
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    # --- the dispatcher ------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out
