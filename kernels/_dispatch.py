"""Where each op picks its implementation.

CUDA tensors go to an implementation registered by ``kernels.triton`` (when Triton
is importable); CPU tensors of a supported dtype go to the C fast path; everything
else (float64 for gradcheck, a machine without a compiler) runs the torch composite.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from . import _native

_CUDA_IMPLS: dict[str, Callable] = {}


def register_cuda(name: str):
    """Decorator: make ``fn`` the CUDA implementation of op ``name``."""

    def wrap(fn: Callable) -> Callable:
        _CUDA_IMPLS[name] = fn
        return fn

    return wrap


_TRITON_TRIED = False


def cuda_impl(name: str, *tensors: torch.Tensor) -> Callable | None:
    if tensors and all(t.is_cuda for t in tensors):
        global _TRITON_TRIED
        if not _TRITON_TRIED:
            # First CUDA call: importing kernels.triton registers its kernels. Without
            # Triton the import fails and CUDA ops stay on the torch composites.
            _TRITON_TRIED = True
            try:
                importlib.import_module(f"{__package__}.triton")
            except ImportError:
                pass
        return _CUDA_IMPLS.get(name)
    return None


def native_ok(*tensors: torch.Tensor, dtypes=(torch.float32, torch.bfloat16)) -> bool:
    """True when the C fast path can take these tensors (CPU, supported dtype)."""
    if any(t.device.type != "cpu" for t in tensors):
        return False
    if tensors[0].dtype not in dtypes:
        return False
    return _native.library() is not None
