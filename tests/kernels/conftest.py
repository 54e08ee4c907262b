"""Shared fixtures of the CPU kernel tests.

Every test runs from a fixed seed, and the ``path`` fixture runs a test once through
the C fast path and once through the torch composites (``native_ok`` patched to False
in the op modules, since ``_native.library()`` is cached and ignores later changes to
MEMSTORE_NATIVE).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import kernels.bag
import kernels.product_key
import kernels.sparse_optim
from kernels import _native

NATIVE_AVAILABLE = _native.library() is not None

# Tolerances by the dtype of the tensors compared.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=1e-4, rtol=1e-5),  # atol: sums of up to 341 products
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def assert_close(actual, expected, dtype=None, **overrides):
    """torch.testing.assert_close with the tolerance of ``dtype`` (default: expected's)."""
    kw = dict(tol(dtype or expected.dtype))
    kw.update(overrides)
    torch.testing.assert_close(actual, expected, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield


def use_composite(monkeypatch) -> None:
    """Route every op of ``kernels`` through its torch composite."""
    for module in (kernels.bag, kernels.product_key, kernels.sparse_optim):
        monkeypatch.setattr(module, "native_ok", lambda *a, **k: False)


@pytest.fixture(params=["native", "composite"])
def path(request, monkeypatch):
    """Which CPU implementation the ops dispatch to: the C fast path or the composite."""
    if request.param == "native":
        if not NATIVE_AVAILABLE:
            pytest.skip("the C fast path is unavailable (no compiler or MEMSTORE_NATIVE=0)")
        assert kernels.bag.native_ok(torch.zeros(1))
    else:
        use_composite(monkeypatch)
    return request.param


@pytest.fixture
def native():
    """Tests that are about the C fast path only."""
    if not NATIVE_AVAILABLE:
        pytest.skip("the C fast path is unavailable (no compiler or MEMSTORE_NATIVE=0)")
    return True
