"""CUDA autocast's casting rules, applied to the CPU tensors of a fake run.

A fake run lives on the CPU (autograd's engine will not run a backward on fake CUDA tensors
without a GPU), where autocast follows the CPU op lists, which differ from CUDA's (under CUDA
autocast `layer_norm`, `pow`, `softmax`, `sum`, ... run in fp32, and their fp32 results are what
autograd keeps). This TorchFunctionMode applies CUDA's lists whenever CPU autocast is on, so
`torch.autocast("cpu", dtype)` in the estimator behaves like `torch.autocast("cuda", dtype)`,
including inside gradient checkpointing's recomputation (which restores the autocast state;
the backward must then be started without passing through this mode, see steps.backward, as a
mode is switched off while its own handler runs).
As CUDA autocast, it caches the low-precision copy of a trainable fp32 leaf weight until the
autocast region ends. The lists are torch's (aten/src/ATen/autocast_mode.cpp, CUDA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

T = torch.Tensor


def _functions(*candidates):
    return {c for c in candidates if c is not None}


def _get(obj, *names):
    return [getattr(obj, n, None) for n in names]


# CUDA "lower_precision_fp": inputs cast to the autocast dtype
LOWER_PRECISION = _functions(
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.prelu, F.scaled_dot_product_attention, F.bilinear,
    *_get(torch, "matmul", "mm", "mv", "bmm", "baddbmm", "addmm", "addmv", "addr", "addbmm", "einsum",
          "chain_matmul", "conv1d", "conv2d", "conv3d", "conv_tbc", "prelu"),
    *_get(torch.linalg, "multi_dot", "vecdot"),
    *_get(T, "matmul", "__matmul__", "__rmatmul__", "mm", "mv", "bmm", "baddbmm", "addmm", "addmv", "addr",
          "addbmm"),
)
# CUDA "fp32": inputs cast to float32
FP32 = _functions(
    F.layer_norm, F.group_norm, F.softplus, F.cosine_similarity, F.cross_entropy, F.nll_loss, F.kl_div,
    F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.mse_loss, F.margin_ranking_loss, F.multilabel_margin_loss,
    F.soft_margin_loss, F.triplet_margin_loss, F.multi_margin_loss, F.binary_cross_entropy_with_logits,
    F.poisson_nll_loss, F.cosine_embedding_loss, F.hinge_embedding_loss, F.pdist, F.interpolate, F.grid_sample,
    *_get(torch, "pow", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "acos",
          "asin", "cosh", "sinh", "tan", "erfinv", "layer_norm", "group_norm", "norm", "frobenius_norm",
          "nuclear_norm", "dist", "cdist", "renorm", "logsumexp", "cosine_similarity"),
    *_get(T, "pow", "__pow__", "__rpow__", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
          "rsqrt", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "norm", "dist", "renorm", "logsumexp"),
)
# CUDA "fp32_set_opt_dtype": a reduced-precision input is reduced in fp32 (dtype=float32)
FP32_SET_DTYPE = _functions(
    F.softmax, F.log_softmax,
    *_get(torch, "softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum"),
    *_get(torch.linalg, "vector_norm", "matrix_norm"),
    *_get(T, "softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum"),
)
REDUCED = (torch.float16, torch.bfloat16)


class CudaAutocastRules(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self._weight_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu"):
            self._weight_cache.clear()  # the autocast region ended: CUDA drops its cached casts
            return func(*args, **kwargs)
        dtype = torch.get_autocast_dtype("cpu")
        if func in LOWER_PRECISION:
            args, kwargs = tree_map(lambda a: self._to_lower(a, dtype), (args, kwargs))
        elif func in FP32:
            args, kwargs = tree_map(_to_fp32, (args, kwargs))
        elif func in FP32_SET_DTYPE and kwargs.get("dtype") is None and _first_tensor_reduced(args):
            kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)

    def _to_lower(self, a, dtype):
        if not _castable(a) or a.dtype == dtype:
            return a
        cacheable = a.dtype == torch.float32 and a.requires_grad and a.is_leaf and torch.is_grad_enabled()
        if not cacheable:
            return a.to(dtype)
        cached = self._weight_cache.get(id(a))
        if cached is None or cached[0] is not a:
            cached = (a, a.to(dtype))
            self._weight_cache[id(a)] = cached
        return cached[1]


def _castable(a) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64


def _to_fp32(a):
    return a.float() if _castable(a) and a.dtype in REDUCED else a


def _first_tensor_reduced(args) -> bool:
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return first is not None and first.dtype in REDUCED
