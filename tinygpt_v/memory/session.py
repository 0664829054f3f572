"""A fake device: FakeTensorMode + the storage tracker + known small values + CUDA autocast rules.

    with torch.device("meta"):
        model = build(...)              # no memory, no time; dtype changes, merges etc. here too
    with FakeSession() as session:
        session.materialize(model)      # fake CPU tensors; parameters and buffers counted as such
        ...run a step...
    session.tracker.peak_total, session.tracker.peak

Models are built on the meta device, not under FakeTensorMode: a module whose parameters are
fake tensors cannot change dtype (`.to()` swaps fake parameters, which the fake mode's own weak
references forbid), and a model's preparation changes dtypes.

The fake device is the CPU (see autocast.py for why); what the tracker counts is what a GPU
run would hold on the GPU.
"""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .autocast import CudaAutocastRules
from .known_values import KnownValues
from .tracker import StorageTracker


class FakeSession(contextlib.ExitStack):
    def __init__(self):
        super().__init__()
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.tracker = StorageTracker()
        self._tracking = False

    def __enter__(self) -> "FakeSession":
        super().__enter__()
        self.enter_context(self.fake_mode)
        self.enter_context(KnownValues(self.fake_mode))
        return self

    def materialize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Meta-device model -> fake CPU tensors, counted as parameters."""
        with torch.no_grad():
            model.to_empty(device="cpu")
        self.track_model(model)
        return model

    def start_tracking(self) -> None:
        """From here on every storage is counted (call after building the model)."""
        if self._tracking:
            return
        self._tracking = True
        self.enter_context(self.tracker)
        self.enter_context(CudaAutocastRules())

    def track_model(self, model: torch.nn.Module) -> None:
        self.start_tracking()
        for tensor in [*model.parameters(), *model.buffers()]:
            self.tracker.retag(tensor, "parameters")

    def track(self, tensor: torch.Tensor, category: str = "temporaries") -> None:
        self.start_tracking()
        self.tracker.retag(tensor, category)
