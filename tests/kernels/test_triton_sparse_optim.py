"""Triton fused sparse optimizer steps (and the fused bag backward + Adam) against references.

SGD, Adagrad and row-wise Adagrad against kernels.reference's plain-torch steps; lazy
Adam and AdamW against float64 SparseAdam and AdamW updates written out here; the fused
bag backward + Adam against the unfused reference; strided values update in place, no
rows is a no-op, and the public Adam dispatches to Triton (interpreter on CPU, or CUDA).
bfloat16 results may differ by one bfloat16 ulp.
"""

from __future__ import annotations

import pytest
import torch

from memstore.kernels import _dispatch
from memstore.kernels.reference import (
    adagrad_step_reference,
    bag_backward_reference,
    rowwise_adagrad_step_reference,
    sgd_step_reference,
)

from ._triton_util import DEVICE, assert_close, generator, triton_dispatch, triton_kernels  # noqa: F401

# (rows R, dim, touched U): one row; odd dims; every row touched; dim above the
# 256-column tile (two column blocks, and two passes of the row-wise kernel).
SHAPES = [(1, 1, 1), (10, 9, 4), (12, 41, 12), (20, 300, 7)]
DTYPES = [torch.float32, torch.bfloat16]


def adam_step_oracle(
    values,
    exp_avg,
    exp_avg_sq,
    rows,
    grads,
    *,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay=0.0,
    decoupled=False,
):
    """Lazy Adam on the touched rows, in float64 and written out here (the package's
    reference shares its per-step scalars with the kernels): torch.optim.SparseAdam's
    update, or with ``decoupled`` torch.optim.AdamW's (weight decay first, eps added to
    the bias-corrected root)."""
    g = grads.double()
    v = values[rows].double()
    m = beta1 * exp_avg[rows].double() + (1 - beta1) * g
    s = beta2 * exp_avg_sq[rows].double() + (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    if decoupled:
        v = v * (1 - lr * weight_decay) - lr * (m / bc1) / ((s / bc2).sqrt() + eps)
    else:
        v = v - lr * bc2**0.5 / bc1 * m / (s.sqrt() + eps)
    exp_avg[rows] = m.to(exp_avg.dtype)
    exp_avg_sq[rows] = s.to(exp_avg_sq.dtype)
    values[rows] = v.to(values.dtype)


def _rows_and_grads(g, R, dim, U):
    rows = torch.randperm(R, generator=g)[:U]  # unique, unsorted
    return rows, torch.randn(U, dim, generator=g)


def _run_both(ref_fn, triton_fn, tensors, kwargs):
    """Run the reference on CPU clones and the kernel on device clones; return both sets."""
    ref = [t.clone() for t in tensors]
    dev = [t.clone().to(DEVICE) for t in tensors]
    ref_fn(*ref, **kwargs)
    assert triton_fn(*dev, **kwargs) is None
    return ref, dev


def _compare(ref, dev, n_inplace, original_values):
    """The first n_inplace tensors were updated in place: values, then float32 states."""
    if not torch.equal(ref[0], original_values):
        # (A bfloat16 update smaller than half an ulp rounds back to the old value.)
        assert not torch.equal(dev[0].cpu(), original_values), "values were not updated"
    for r, d in zip(ref[:n_inplace], dev[:n_inplace]):
        assert d.dtype == r.dtype
        assert_close(d, r, **_ONE_ULP.get(d.dtype, {}))


# bfloat16 values: float32 results that differ in their last bits may round to
# neighbouring bfloat16 numbers, never further apart (rtol 2⁻⁷ is one bfloat16 ulp).
_ONE_ULP = {torch.bfloat16: dict(rtol=2**-7, atol=1e-6)}


def test_registered_for_cuda():
    for name in ("sgd_step", "adagrad_step", "rowwise_adagrad_step", "adam_step"):
        assert _dispatch._CUDA_IMPLS[name].__name__ == f"{name}_triton"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sgd(shape, dtype):
    R, dim, U = shape
    g = generator(10)
    values = torch.randn(R, dim, generator=g).to(dtype)
    rows, grads = _rows_and_grads(g, R, dim, U)
    ref, dev = _run_both(
        sgd_step_reference,
        triton_kernels.sgd_step_triton,
        [values, rows, grads],
        dict(lr=0.1, weight_decay=0.01),
    )
    _compare(ref, dev, 1, values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_adagrad(shape, dtype):
    R, dim, U = shape
    g = generator(11)
    values = torch.randn(R, dim, generator=g).to(dtype)
    state = torch.rand(R, dim, generator=g)
    rows, grads = _rows_and_grads(g, R, dim, U)
    ref, dev = _run_both(
        adagrad_step_reference,
        triton_kernels.adagrad_step_triton,
        [values, state, rows, grads],
        dict(lr=0.05, eps=1e-10, lr_decay=0.01, step=3),
    )
    _compare(ref, dev, 2, values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rowwise_adagrad(shape, dtype):
    R, dim, U = shape
    g = generator(12)
    values = torch.randn(R, dim, generator=g).to(dtype)
    state = torch.rand(R, generator=g)
    rows, grads = _rows_and_grads(g, R, dim, U)
    ref, dev = _run_both(
        rowwise_adagrad_step_reference,
        triton_kernels.rowwise_adagrad_step_triton,
        [values, state, rows, grads],
        dict(lr=0.05, eps=1e-8),
    )
    _compare(ref, dev, 2, values)


ADAM_CONFIGS = [
    dict(step=1, decoupled=False, weight_decay=0.0),
    dict(step=5, decoupled=False, weight_decay=0.0),
    dict(step=7, decoupled=True, weight_decay=0.1),
]


@pytest.mark.parametrize(
    "config", ADAM_CONFIGS, ids=["sparse_adam_step1", "sparse_adam_step5", "adamw"]
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_adam(shape, dtype, config):
    R, dim, U = shape
    g = generator(13)
    values = torch.randn(R, dim, generator=g).to(dtype)
    exp_avg = torch.randn(R, dim, generator=g) * 0.1
    exp_avg_sq = torch.rand(R, dim, generator=g) * 0.01
    rows, grads = _rows_and_grads(g, R, dim, U)
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, **config)
    ref, dev = _run_both(
        adam_step_oracle,
        triton_kernels.adam_step_triton,
        [values, exp_avg, exp_avg_sq, rows, grads],
        kwargs,
    )
    _compare(ref, dev, 3, values)


def test_strided_values_update_in_place():
    # Column stride != 1 (a transposed view): the kernels address columns by their
    # stride, so the update lands in the caller's tensor without a copy.
    base = torch.randn(9, 12, generator=generator(14))
    rows, grads = _rows_and_grads(generator(15), 12, 9, 5)
    expected = base.t().clone()
    sgd_step_reference(expected, rows, grads, lr=0.1)
    values = base.clone().to(DEVICE).t()
    triton_kernels.sgd_step_triton(values, rows.to(DEVICE), grads.to(DEVICE), lr=0.1)
    assert not torch.equal(values.cpu(), base.t())
    assert_close(values, expected)


def test_strided_rows():
    g = generator(19)
    values = torch.randn(12, 9, generator=g)
    rows = torch.randperm(12, generator=g)[::2]  # stride 2
    grads = torch.randn(rows.numel(), 9, generator=g)
    ref, dev = _run_both(
        sgd_step_reference, triton_kernels.sgd_step_triton, [values, rows, grads], dict(lr=0.1)
    )
    _compare(ref, dev, 1, values)
    state = torch.rand(12, generator=g)
    ref = [values.clone(), state.clone()]
    rowwise_adagrad_step_reference(*ref, rows, grads, lr=0.1, eps=1e-8)
    dev = [values.clone().to(DEVICE), state.clone().to(DEVICE)]
    triton_kernels.rowwise_adagrad_step_triton(
        *dev, rows.to(DEVICE), grads.to(DEVICE), lr=0.1, eps=1e-8
    )
    _compare(ref, dev, 2, values)


def test_no_rows_is_a_no_op():
    values = torch.randn(4, 9, generator=generator(16)).to(DEVICE)
    before = values.clone()
    empty_rows = torch.empty(0, dtype=torch.int64, device=DEVICE)
    triton_kernels.sgd_step_triton(values, empty_rows, torch.empty(0, 9, device=DEVICE), lr=1.0)
    assert torch.equal(values, before)


# (B, M, R, dim, idx): random with duplicates; every slot on one row (one long segment).
FUSED_CASES = [
    (9, 5, 20, 41, None),
    (3, 4, 1000, 300, None),
    (8, 5, 6, 9, torch.full((8, 5), 2, dtype=torch.int64)),
]


@pytest.mark.parametrize("decoupled", [False, True], ids=["sparse_adam", "adamw"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES, ids=["dup", "wide", "one_row"])
def test_bag_backward_adam_step_matches_unfused_reference(case, dtype, decoupled):
    B, M, R, dim, idx = case
    g = generator(17)
    values = torch.randn(R, dim, generator=g).to(dtype)
    exp_avg = torch.randn(R, dim, generator=g) * 0.1
    exp_avg_sq = torch.rand(R, dim, generator=g) * 0.01
    if idx is None:
        idx = torch.randint(0, R, (B, M), generator=g)
    w = torch.randn(B, M, generator=g)
    dy = torch.randn(B, dim, generator=g)
    kwargs = dict(
        step=4,
        lr=0.1,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.05 if decoupled else 0.0,
        decoupled=decoupled,
    )

    ref = [values.clone(), exp_avg.clone(), exp_avg_sq.clone()]
    dw_ref, (rows_ref, grads_ref) = bag_backward_reference(ref[0], idx, w, dy)
    adam_step_oracle(*ref, rows_ref, grads_ref, **kwargs)

    dev = [t.clone().to(DEVICE) for t in (values, exp_avg, exp_avg_sq)]
    dw, rows = triton_kernels.bag_backward_adam_step(
        *dev, idx.to(DEVICE), w.to(DEVICE), dy.to(DEVICE), **kwargs
    )
    assert torch.equal(rows.cpu(), rows_ref)
    assert_close(dw, dw_ref, torch.float32)
    assert not torch.equal(dev[0].cpu(), values)
    for r, d in zip(ref, dev):
        assert_close(d, r, **_ONE_ULP.get(d.dtype, {}))


def test_public_adam_dispatches_to_triton(triton_dispatch):
    from memstore.kernels import adam_step

    R, dim, U = (5000, 341, 1200) if DEVICE == "cuda" else (60, 41, 9)
    g = generator(18)
    values = torch.randn(R, dim, generator=g)
    exp_avg, exp_avg_sq = torch.zeros(R, dim), torch.zeros(R, dim)
    rows, grads = _rows_and_grads(g, R, dim, U)
    kwargs = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    ref, dev = _run_both(
        adam_step_oracle, adam_step, [values, exp_avg, exp_avg_sq, rows, grads], kwargs
    )
    _compare(ref, dev, 3, values)
    assert triton_dispatch() == {("adam_step", "triton"): 1}
