"""Shared setup of the Triton kernel tests: the device they run on, and the interpreter.

With a GPU the kernels are compiled and run on CUDA tensors. Without one they run under
the Triton interpreter on CPU tensors, which is how CPU-only CI checks them. The
interpreter is chosen when ``@triton.jit`` decorates a function: Triton reads
``TRITON_INTERPRET`` (through ``triton.knobs``) at that moment, not at launch. The
kernels of ``kernels.triton`` are decorated when that package is first imported: on a
machine without CUDA only here, after the variable is set, or by ``kernels._dispatch``
under ``MEMSTORE_FORCE_TRITON=1``, which sets it too. Triton's own library functions
(``tl.sum``, ``tl.max``, ...) are decorated when ``triton`` itself is imported: when
something imported triton before this module, :func:`_interpret_triton_library` swaps
them for interpreted ones, so the tests run whatever the import order.
"""

from __future__ import annotations

import collections
import importlib
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"

# Tolerances by compared dtype; float32 atol covers sums of a few hundred products in a
# different order than the reference; bfloat16 allows one rounding flip of the result.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}


def _interpret_triton_library() -> int:
    """Make the jitted functions of ``triton.language`` callable by the interpreter.

    Imported without TRITON_INTERPRET, triton decorates ``tl.sum`` & co. as compiled
    JITFunctions, which raise when an interpreted kernel calls them. Each is replaced by
    an InterpretedFunction of the same Python source. Returns the number replaced.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    replaced = 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("triton.language"):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                setattr(module, attr, InterpretedFunction(value.fn))
                replaced += 1
    return replaced


def _import_interpreted():
    pytest.importorskip("triton", reason="Triton is not installed")
    was_compiled = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
    # Left set for the rest of the process: triton imports some of its modules lazily at
    # the first launch, and they must agree with the interpreted kernels.
    os.environ["TRITON_INTERPRET"] = "1"
    if was_compiled:
        _interpret_triton_library()
    return importlib.import_module("memstore.kernels.triton")


if INTERPRETED:
    triton_kernels = _import_interpreted()
else:
    pytest.importorskip("triton", reason="Triton is not installed")
    triton_kernels = importlib.import_module("memstore.kernels.triton")


@pytest.fixture
def triton_dispatch(monkeypatch):
    """Public ops on DEVICE tensors dispatch to Triton: CUDA tensors do by themselves; on
    CPU the ``MEMSTORE_FORCE_TRITON`` switch sends them there (through the interpreter).
    Returns a function giving the dispatches ``kernels._dispatch`` recorded since."""
    from memstore.kernels import _dispatch

    if INTERPRETED:
        monkeypatch.setenv(_dispatch.FORCE_TRITON_ENV, "1")
    start = collections.Counter(_dispatch.COUNTS)
    return lambda: collections.Counter(_dispatch.COUNTS) - start


def assert_close(actual, expected, dtype=None, **overrides):
    """torch.testing.assert_close on CPU copies with the tolerance of ``dtype``."""
    kw = dict(TOLERANCES[dtype or expected.dtype])
    kw.update(overrides)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **kw)


def generator(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator: inputs are drawn on CPU, then moved to DEVICE."""
    return torch.Generator().manual_seed(seed)
