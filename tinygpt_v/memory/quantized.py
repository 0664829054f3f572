"""bitsandbytes int8 / nf4 Linear layers as the GPU holds them, for a fake run.

bitsandbytes quantises on the GPU, which a fake run cannot call, so each quantised Linear is
replaced by a stand-in with the same storage sizes and the same per-call allocations:
- int8 (LLM.int8, Linear8bitLt): int8 weight (out x in) + one fp32 scale per row; a call
  quantises the input to int8 (+ fp32 row scales), multiplies into int32, dequantises to fp16.
- nf4 (Linear4bit, blocksize 64, no double quantisation): 4-bit weight (out x in / 2 bytes) +
  one fp32 absmax per 64 weights; one token at a time it runs a 4-bit GEMV (output only), a
  longer input dequantises the whole weight to the compute dtype first, then multiplies.
transformers leaves `lm_head` unquantised; so does `quantize_llm`, which goes through it.
"""
from __future__ import annotations

import torch
from torch import nn

NF4_BLOCK = 64


class QuantizedLinearStandIn(nn.Module):
    def __init__(self, linear: nn.Linear, mode: str, compute_dtype: torch.dtype):
        super().__init__()
        self.mode, self.compute_dtype = mode, compute_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        device = linear.weight.device
        if mode == "int8":
            self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=device),
                                       requires_grad=False)
            self.register_buffer("scales", torch.empty(self.out_features, dtype=torch.float32, device=device))
        elif mode == "nf4":
            count = self.out_features * self.in_features
            self.weight = nn.Parameter(torch.empty((count + 1) // 2, 1, dtype=torch.uint8, device=device),
                                       requires_grad=False)
            self.register_buffer("absmax", torch.empty(-(-count // NF4_BLOCK), dtype=torch.float32, device=device))
        else:
            raise ValueError(f"quantization: expected int8 or nf4, got {mode!r}")
        self.bias = None if linear.bias is None else nn.Parameter(
            torch.empty(self.out_features, dtype=compute_dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        rows = x.shape[:-1]
        if self.mode == "int8":
            x_int8 = torch.empty_like(x, dtype=torch.int8)
            row_scales = torch.empty(rows, dtype=torch.float32, device=x.device)
            accumulated = torch.empty(*rows, self.out_features, dtype=torch.int32, device=x.device)
            del x_int8, row_scales
            out = torch.empty(*rows, self.out_features, dtype=self.compute_dtype, device=x.device)
            del accumulated
        elif x.numel() == x.shape[-1]:  # one token: GEMV straight from the 4-bit weight
            out = torch.empty(*rows, self.out_features, dtype=self.compute_dtype, device=x.device)
        else:
            weight = torch.empty(self.out_features, self.in_features, dtype=self.compute_dtype, device=x.device)
            out = nn.functional.linear(x, weight)
            del weight
        return out + self.bias if self.bias is not None else out


def quantize_linears(llm: nn.Module, mode: str, compute_dtype: torch.dtype, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every nn.Linear of `llm` (except `skip`) by its stand-in; returns how many."""
    targets = [(name, module) for name, module in llm.named_modules()
               if isinstance(module, nn.Linear) and name.split(".")[-1] not in skip]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        setattr(parent, child, QuantizedLinearStandIn(linear, mode, compute_dtype))
    return len(targets)
