"""Real values for the small integer tensors of a fake run.

A training step indexes activations with boolean masks (image slots, target positions) and
reads a few integers back (`.item()`); the sizes that follow depend on those values, which a
fake tensor does not have. This mode runs on top of FakeTensorMode and keeps, beside every
integer or boolean fake tensor computed only from known inputs (factories, `torch.tensor(...)`,
other known tensors), its real value on the CPU. With it:
- `.item()` / `bool()` / `int()` of a known tensor answers from the real value;
- a boolean mask index with a known mask becomes the integer index it stands for;
- `nonzero` of a known tensor gets its real size.
Floating-point tensors are computed only when tiny (a few thousand values): never activations.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
MAX_KNOWN_NUMEL = 1 << 25  # attention masks of long sequences are the largest known tensors
MAX_KNOWN_FLOAT_NUMEL = 4096  # small float vectors (a linspace of drop-path rates), never activations
_BOOL_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                   aten._unsafe_index_put.default, aten._index_put_impl_.default}


class KnownValues(TorchDispatchMode):
    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode
        self.values = WeakIdKeyDictionary()

    def _real(self, t):
        """The real value of a tensor argument, or None when unknown."""
        from torch._subclasses.fake_tensor import FakeTensor
        if not isinstance(t, torch.Tensor):
            return None
        if isinstance(t, FakeTensor):
            return self.values.get(t)
        return t  # a real tensor handed to the fake run

    def _fake(self, real: torch.Tensor) -> torch.Tensor:
        with _disable_current_modes():
            fake = self.fake_mode.from_tensor(real.clone())
        self.values[fake] = real
        return fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default):
            real = [self._real(a) for a in args if isinstance(a, torch.Tensor)]
            if all(r is not None for r in real):
                return self._run_real(func, args, kwargs)
        if func is aten.nonzero.default and self._real(args[0]) is not None:
            return self._fake(self._run_real(func, args, kwargs))
        if func in _BOOL_INDEX_OPS:
            args = self._bool_indices_to_int(args)
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _bool_indices_to_int(self, args):
        indices = args[1]
        converted = []
        for index in indices:
            real = self._real(index) if index is not None else None
            if real is not None and real.dtype == torch.bool:
                with _disable_current_modes():
                    parts = real.nonzero(as_tuple=True)
                converted += [self._fake(part) for part in parts]
            else:
                converted.append(index)
        return (args[0], converted, *args[2:])

    def _run_real(self, func, args, kwargs):
        real_args, real_kwargs = tree_map(lambda a: self._real(a) if isinstance(a, torch.Tensor) else a,
                                          (args, kwargs))
        with _disable_current_modes():
            return func(*real_args, **real_kwargs)

    def _record(self, func, args, kwargs, out) -> None:
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        small = all(t.numel() <= (MAX_KNOWN_FLOAT_NUMEL if t.is_floating_point() or t.is_complex()
                                  else MAX_KNOWN_NUMEL) for t in outputs + inputs)
        mutates = func._schema.is_mutable
        if not (outputs or mutates) or not small or any(self._real(a) is None for a in inputs):
            if mutates:  # an in-place op with an unknown input leaves its known target stale
                for target in tree_flatten(args[:1])[0]:
                    if isinstance(target, torch.Tensor):
                        self.values.pop(target, None)
            return
        real_out = self._run_real(func, args, kwargs)  # in place on the real values, too
        for fake, real in zip(outputs, [r for r in tree_flatten(real_out)[0] if isinstance(r, torch.Tensor)]):
            self.values[fake] = real
