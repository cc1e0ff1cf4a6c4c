"""Weights kept in the checkpoint's 16-bit dtype, computed in fp32: an fp32 reference in half the memory.

Every floating parameter that is not already fp32 gets a parametrization that casts it to fp32 when a module
reads it, so each layer's fp32 weights exist only while that layer runs. The 16 -> 32 bit cast is exact, so
the outputs are bit for bit those of the same checkpoint loaded in fp32 (tests/model/test_upcast.py); buffers
(rotary frequencies) are never stored low. Quantised-export validation uses it: a released StableLM-1.6B-4e
reference is 6.4 GB this way instead of 12.8 GB.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class _CastTo(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.dtype)


def compute_in(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Make `model` compute in `dtype` whatever dtype its parameters are stored in (in place)."""
    for module in list(model.modules()):
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                parametrize.register_parametrization(module, name, _CastTo(dtype), unsafe=True)
    return model


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
