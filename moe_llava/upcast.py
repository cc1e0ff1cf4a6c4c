"""Weights kept in the checkpoint's 16-bit dtype, computed in fp32: an fp32 reference in half the memory.

Every floating parameter that is not already fp32 gets a parametrization that casts it to fp32 when a module
reads it, so each layer's fp32 weights exist only while that layer runs. The 16 -> 32 bit cast is exact, so
the outputs are bit for bit those of the same checkpoint loaded in fp32 (tests/model/test_upcast.py); buffers
(rotary frequencies) are never stored low. Quantised-export validation uses it: a released StableLM-1.6B-4e
reference is 6.4 GB this way instead of 12.8 GB.

Two weights are too large to cast whole on every call: the embedding table and the LM head (StableLM-1.6B:
100352 x 2048, 822 MB each in fp32, cast once per generated token). Run eagerly, an Embedding over LARGE_BYTES
casts only the rows it gathers and a Linear over it casts LARGE_BYTES of rows at a time; traced for export
(torch.compiler.is_exporting) both keep the one Cast node. The row blocks give the same bits at the released
LM head's shape (8192-row blocks, 1-656 input rows, checked once) and in the tests (128-row blocks); blocks of
8 rows did not (1 ULP: MKL takes other kernels for such thin products), hence blocks of LARGE_BYTES.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

LARGE_BYTES = 64 << 20


class _CastTo(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.dtype)


def compute_in(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Make `model` compute in `dtype` whatever dtype its parameters are stored in (in place)."""
    for module in list(model.modules()):
        kind = type(module)  # before a parametrization swaps in its generated subclass
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                parametrize.register_parametrization(module, name, _CastTo(dtype), unsafe=True)
        if not parametrize.is_parametrized(module, "weight"):
            continue
        if stored(module, "weight").numel() * dtype.itemsize <= LARGE_BYTES:
            continue
        if kind is nn.Embedding and module.max_norm is None:   # max_norm would renormalise the table
            module.forward = types.MethodType(_gathered_rows_forward, module)
        elif kind is nn.Linear:
            module.forward = types.MethodType(_row_blocks_forward, module)
    return model


def _gathered_rows_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_exporting():
        return nn.Embedding.forward(self, ids)
    rows = F.embedding(ids, stored(self, "weight"), self.padding_idx)
    return rows.to(compute_dtype(self))


def _row_blocks_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_exporting():
        return nn.Linear.forward(self, x)
    weight, bias, dtype = stored(self, "weight"), self.bias, compute_dtype(self)
    rows = max(1, LARGE_BYTES // (weight.shape[1] * dtype.itemsize))
    return torch.cat([F.linear(x, weight[i:i + rows].to(dtype), None if bias is None else bias[i:i + rows])
                      for i in range(0, weight.shape[0], rows)], dim=-1)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module` computes in: its parameters' dtype, or the one compute_in casts them to."""
    for m in module.modules():
        if parametrize.is_parametrized(m):
            return next(iter(m.parametrizations.values()))[0].dtype
    return next(module.parameters()).dtype


def stored(module: nn.Module, name: str) -> torch.Tensor:
    """Parameter `name` of `module` as stored (no cast): what in-place edits and export buffers must use."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)
