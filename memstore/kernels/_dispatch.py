"""Where each op picks its implementation, and a count of where each call went.

CUDA tensors go to an implementation registered by ``kernels.triton`` (when Triton
is importable); CPU tensors go to the fastest CPU implementation measured for the op
(``benchmarks/ops.py``: the library kernel or the C fast path); everything else
(float64 for gradcheck, a machine without a compiler) runs the torch composite.

``MEMSTORE_FORCE_TRITON=1`` sends CPU tensors through the Triton implementations as
well, for checking the whole CUDA path on a machine without a GPU. Triton can only run
CPU tensors in its interpreter, so the switch also needs ``TRITON_INTERPRET=1`` in the
environment before anything imports ``triton`` (the dispatcher sets it when triton is
not imported yet). While the switch is on, the C fast path is off, so that every step
runs as it would on a GPU.

Every call records which implementation it took in :data:`COUNTS`, keyed by
``(op, path)`` with path one of ``"triton"``, ``"native"``, ``"library"`` and
``"composite"``; tests read it to prove which path an operation went through.
"""

from __future__ import annotations

import collections
import importlib
import os
import sys
from collections.abc import Callable

import torch

from . import _native

__all__ = [
    "register_cuda",
    "cuda_impl",
    "native_ok",
    "force_triton",
    "record",
    "COUNTS",
    "TRITON_DTYPES",
]

_CUDA_IMPLS: dict[str, Callable] = {}
COUNTS: collections.Counter = collections.Counter()
FORCE_TRITON_ENV = "MEMSTORE_FORCE_TRITON"
# Value dtypes the Triton kernels read (they accumulate in float32); float64 stays in torch.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def register_cuda(name: str):
    """Decorator: make ``fn`` the CUDA implementation of op ``name``."""

    def wrap(fn: Callable) -> Callable:
        _CUDA_IMPLS[name] = fn
        return fn

    return wrap


def force_triton() -> bool:
    """True when ``MEMSTORE_FORCE_TRITON=1``: CPU tensors take the Triton path too."""
    return os.environ.get(FORCE_TRITON_ENV) == "1"


def record(op: str, path: str) -> None:
    COUNTS[(op, path)] += 1


_TRITON_TRIED = False


def _import_triton_kernels(interpreted: bool) -> None:
    """Import ``kernels.triton`` once; its modules register their implementations."""
    global _TRITON_TRIED
    if _TRITON_TRIED:
        return
    _TRITON_TRIED = True
    if interpreted:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{FORCE_TRITON_ENV}=1 runs CPU tensors in the Triton interpreter, but triton "
                "was imported without TRITON_INTERPRET=1: set both before starting Python"
            )
        # Triton reads the variable when it (and each kernel) is first imported.
        os.environ["TRITON_INTERPRET"] = "1"
        importlib.import_module(f"{__package__}.triton")
        return
    try:
        importlib.import_module(f"{__package__}.triton")
    except ImportError:
        pass  # no Triton: CUDA ops stay on the torch composites


def cuda_impl(name: str, *tensors: torch.Tensor) -> Callable | None:
    """The Triton implementation of ``name`` for these tensors, or None.

    CUDA tensors get it when Triton is importable; CPU tensors only under
    ``MEMSTORE_FORCE_TRITON=1``, where a missing implementation is an error rather
    than a silent fallback. The caller records the dispatch when it calls the result.
    """
    if not tensors:
        return None
    if all(t.is_cuda for t in tensors):
        _import_triton_kernels(interpreted=False)
        return _CUDA_IMPLS.get(name)
    if force_triton() and all(t.device.type == "cpu" for t in tensors):
        _import_triton_kernels(interpreted=True)
        if name not in _CUDA_IMPLS:
            raise RuntimeError(f"{FORCE_TRITON_ENV}=1 but op {name!r} has no Triton implementation")
        return _CUDA_IMPLS[name]
    return None


def native_ok(*tensors: torch.Tensor, dtypes=(torch.float32, torch.bfloat16)) -> bool:
    """True when the C fast path can take these tensors (CPU, supported dtype)."""
    if any(t.device.type != "cpu" for t in tensors):
        return False
    if tensors[0].dtype not in dtypes:
        return False
    if force_triton():
        return False
    return _native.library() is not None
