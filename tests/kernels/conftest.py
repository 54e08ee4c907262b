"""Shared fixtures and oracles of the CPU kernel tests.

Every test runs from a fixed seed. The ``path`` fixture runs a test once through the
fast path the dispatch picks (C, or a library kernel where that measured faster) and
once through the torch composites. It records the path ``kernels._dispatch`` logged
for each op and every call that entered the C library (``_native.parallel_for`` is
the one way in), so a test named after a path asserts it went through that path. On
CPU the composites *are* ``kernels.reference``: tests therefore check values against
implementations that share no code with the package: ``torch.optim``, ``F.embedding_bag``, autograd
of a plain torch expression, or a float64 loop written out in the test.
"""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest
import torch

from memstore.kernels import _dispatch, _native, bag, product_key, row_grads, sparse_optim

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
    """torch.testing.assert_close with the tolerance of ``dtype`` (default: actual's);
    ``expected`` (often a float64 oracle) is compared in ``actual``'s dtype."""
    kw = dict(tol(dtype or actual.dtype))
    kw.update(overrides)
    torch.testing.assert_close(actual, expected.to(actual.dtype), **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield


# The ops' modules that choose between the C path and a composite.
_DISPATCHING_MODULES = (bag, product_key, row_grads, sparse_optim)

# The C function (prefix of its symbol) behind each op's "native" path.
C_FUNCTION = {
    "bag_forward_csr": "bag_forward",
    "bag_backward_sparse": "bag_dw",
    "sgd_step": "sgd",
    "adagrad_step": "adagrad",
    "rowwise_adagrad_step": "rowwise_adagrad",
    "adam_step": "adam",
    "product_key_topk": "pk_topk",
}


def use_composite(monkeypatch) -> None:
    """Route every op of ``kernels`` through its torch composite (no C, no library
    kernel such as F.embedding_bag)."""
    for module in _DISPATCHING_MODULES:
        monkeypatch.setattr(module, "native_ok", lambda *a, **k: False)
    monkeypatch.setattr(bag, "_library_bag", lambda *a, **k: False)


class Dispatch:
    """Where the ops went since the fixture started: the paths ``kernels._dispatch``
    recorded per op, and the C functions actually entered (by symbol, ``adam_f32``)."""

    def __init__(self, name: str):
        self.name = name
        self.symbols: list[str] = []
        self._start = collections.Counter(_dispatch.COUNTS)

    def clear(self) -> None:
        self.symbols.clear()
        self._start = collections.Counter(_dispatch.COUNTS)

    def paths(self, op: str) -> set[str]:
        return {p for (o, p), n in _dispatch.COUNTS.items() if o == op and n > self._start[(o, p)]}

    def took(self, **expected: str) -> None:
        """Assert each op took the path given for it (``adam_step="native"``), and that a
        "native" path entered its C function. On the "composite" path every op, whatever
        is expected on the fast path, must have run its composite and no C code."""
        if self.name == "composite":
            assert self.symbols == [], f"composite path called C functions {self.symbols}"
            for op in expected:
                assert self.paths(op) <= {"composite"}, f"{op} took {self.paths(op)}"
            return
        for op, path in expected.items():
            assert self.paths(op) == {path}, (
                f"{op}: expected the {path} path, took {self.paths(op)}"
            )
            if path == "native":
                assert any(s.startswith(C_FUNCTION[op]) for s in self.symbols), (
                    f"{op} never entered its C function; called {self.symbols}"
                )
            else:
                assert not any(s.startswith(C_FUNCTION[op]) for s in self.symbols), (
                    f"{op} took {path} but ran its C function"
                )


def _spy_native(monkeypatch, calls: Dispatch) -> None:
    real = _native.parallel_for

    def recording(fn, count, *args):
        calls.symbols.append(fn.__name__)
        return real(fn, count, *args)

    monkeypatch.setattr(_native, "parallel_for", recording)


@pytest.fixture(params=["fast", "composite"])
def path(request, monkeypatch) -> Dispatch:
    """Which CPU implementation the ops dispatch to: "fast" leaves the dispatch alone
    (the C kernels, or a library kernel where it measured faster); "composite" forces
    the torch composites. Records where each call went."""
    if request.param == "fast":
        if not NATIVE_AVAILABLE:
            pytest.skip("the C fast path is unavailable (no compiler or MEMSTORE_NATIVE=0)")
    else:
        use_composite(monkeypatch)
    calls = Dispatch(request.param)
    _spy_native(monkeypatch, calls)
    return calls


@pytest.fixture
def native_calls(monkeypatch) -> Dispatch:
    """The dispatch as it is (C path available), recorded."""
    if not NATIVE_AVAILABLE:
        pytest.skip("the C fast path is unavailable (no compiler or MEMSTORE_NATIVE=0)")
    calls = Dispatch("fast")
    _spy_native(monkeypatch, calls)
    return calls
