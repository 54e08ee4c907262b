"""Shared setup of the Triton kernel tests: the device they run on, and the interpreter.

With a GPU the kernels are compiled and run on CUDA tensors. Without one they run under
the Triton interpreter on CPU tensors, which is how CPU-only CI checks them. The
interpreter is chosen when ``@triton.jit`` decorates a function: Triton 3.x reads
``TRITON_INTERPRET`` (through ``triton.knobs``) at that moment, not at launch. Triton's
own library functions (``tl.sum``, ``tl.max``, ...) are decorated when ``triton`` is
imported, and some of its modules are imported lazily at the first launch, so the
variable is set before anything imports triton and stays set for the whole process.
This module must therefore be imported before triton is (the Triton test modules import
it first; nothing else in ``kernels`` imports triton on a machine without CUDA).
"""

from __future__ import annotations

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


def _import_interpreted():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton's own library functions (tl.sum, tl.max, ...) are jitted when triton is
        # imported, so they are already compiled-mode; a C extension cannot be re-imported.
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run the "
                    "Triton tests in their own process or export TRITON_INTERPRET=1",
                    allow_module_level=True)
    # Left set for the rest of the process: triton imports some of its modules lazily at
    # the first launch, and they must agree with the interpreted kernels.
    os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton", reason="Triton is not installed")
    return importlib.import_module("kernels.triton")


if INTERPRETED:
    triton_kernels = _import_interpreted()
else:
    pytest.importorskip("triton", reason="Triton is not installed")
    triton_kernels = importlib.import_module("kernels.triton")


def assert_close(actual, expected, dtype=None, **overrides):
    """torch.testing.assert_close on CPU copies with the tolerance of ``dtype``."""
    kw = dict(TOLERANCES[dtype or expected.dtype])
    kw.update(overrides)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **kw)


def generator(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator: inputs are drawn on CPU, then moved to DEVICE."""
    return torch.Generator().manual_seed(seed)
