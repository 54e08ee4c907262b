"""Fused sparse optimizer steps against the references and against torch.optim.

Each test runs several steps with different sets of touched rows (unique, unsorted),
and checks that untouched rows of the values and of every state stay bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from kernels import adagrad_step, adam_step, rowwise_adagrad_step, sgd_step
from kernels.reference import (
    adagrad_step_reference,
    adam_step_reference,
    rowwise_adagrad_step_reference,
    sgd_step_reference,
)

from .conftest import assert_close

ROWS = 300
DIMS = [1, 9, 41, 341]
DTYPES = [torch.float32, torch.bfloat16]

# name -> (op, reference, state shapes given (R, dim), hyper-parameters of 1-based step t)
OPTIMIZERS = {
    "sgd": (sgd_step, sgd_step_reference, lambda R, d: [], lambda t: dict(lr=0.1)),
    "sgd_weight_decay": (
        sgd_step, sgd_step_reference, lambda R, d: [],
        lambda t: dict(lr=0.1, weight_decay=0.05),
    ),
    "adagrad": (
        adagrad_step, adagrad_step_reference, lambda R, d: [(R, d)],
        lambda t: dict(lr=0.1, eps=1e-10, step=t),
    ),
    "adagrad_lr_decay": (
        adagrad_step, adagrad_step_reference, lambda R, d: [(R, d)],
        lambda t: dict(lr=0.1, eps=1e-10, lr_decay=0.05, step=t),
    ),
    "rowwise_adagrad": (
        rowwise_adagrad_step, rowwise_adagrad_step_reference, lambda R, d: [(R,)],
        lambda t: dict(lr=0.1, eps=1e-8),
    ),
    "adam": (
        adam_step, adam_step_reference, lambda R, d: [(R, d), (R, d)],
        lambda t: dict(step=t, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8),
    ),
    "adamw": (
        adam_step, adam_step_reference, lambda R, d: [(R, d), (R, d)],
        lambda t: dict(step=t, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.1, decoupled=True),
    ),
}


def _row_sets(R):
    """Touched rows of successive steps: unique, unsorted, of different sizes."""
    perm = torch.randperm(R)
    return [
        torch.tensor([R - 1]),
        perm[: R // 2],  # >= 128 rows: the C path splits over threads
        torch.cat([torch.tensor([0]), torch.randperm(R - 1)[:36] + 1]),
        perm[R // 4 : R // 4 + 7].flip(0),
        torch.randperm(R)[: R - 1],
    ]


def _states(shapes):
    # Non-zero, non-negative states, as after some earlier steps.
    return [torch.rand(shape) * 0.1 for shape in shapes]


def _untouched(R, rows):
    mask = torch.ones(R, dtype=torch.bool)
    mask[rows] = False
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_matches_reference(path, name, dim, dtype):
    op, reference, state_shapes, hyper = OPTIMIZERS[name]
    values = torch.randn(ROWS, dim).to(dtype)
    states = _states(state_shapes(ROWS, dim))
    ref_values, ref_states = values.clone(), [s.clone() for s in states]

    for t, rows in enumerate(_row_sets(ROWS), start=1):
        grads = torch.randn(rows.numel(), dim)
        before, before_states = values.clone(), [s.clone() for s in states]

        op(values, *states, rows, grads, **hyper(t))
        reference(ref_values, *ref_states, rows, grads, **hyper(t))

        assert values.dtype == dtype
        assert_close(values, ref_values)
        for s, ref_s in zip(states, ref_states):
            assert_close(s, ref_s)
        keep = _untouched(ROWS, rows)
        assert torch.equal(values[keep], before[keep])
        for s, s0 in zip(states, before_states):
            assert torch.equal(s[keep], s0[keep])
        if dtype == torch.float32:  # a bfloat16 row may not move by half an ulp
            assert not torch.equal(values[rows], before[rows])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_float64_values_use_reference(name):
    op, reference, state_shapes, hyper = OPTIMIZERS[name]
    values = torch.randn(41, 9, dtype=torch.float64)
    states = _states(state_shapes(41, 9))
    ref_values, ref_states = values.clone(), [s.clone() for s in states]
    for t, rows in enumerate(_row_sets(41), start=1):
        grads = torch.randn(rows.numel(), 9)
        op(values, *states, rows, grads, **hyper(t))
        reference(ref_values, *ref_states, rows, grads, **hyper(t))
        torch.testing.assert_close(values, ref_values, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_no_rows_is_a_no_op(path, name):
    op, _, state_shapes, hyper = OPTIMIZERS[name]
    values = torch.randn(10, 9)
    states = _states(state_shapes(10, 9))
    before, before_states = values.clone(), [s.clone() for s in states]
    op(values, *states, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 9), **hyper(1))
    assert torch.equal(values, before)
    assert all(torch.equal(s, s0) for s, s0 in zip(states, before_states))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_strided_values(path, name, dtype):
    # A column block of a wider table: row stride != dim.
    op, reference, state_shapes, hyper = OPTIMIZERS[name]
    base = torch.randn(50, 60).to(dtype)
    ref_base = base.clone()
    values, ref_values = base[:, 5:46], ref_base[:, 5:46]
    states = _states(state_shapes(50, 41))
    ref_states = [s.clone() for s in states]
    rows = torch.randperm(50)[:20]
    grads = torch.randn(20, 41)
    op(values, *states, rows, grads, **hyper(1))
    reference(ref_values, *ref_states, rows, grads, **hyper(1))
    assert_close(base, ref_base)
    assert torch.equal(base[:, :5], ref_base[:, :5]) and torch.equal(base[:, 46:], ref_base[:, 46:])


# ---- against torch.optim (float32) --------------------------------------------------


# The C path weights the second moment by (1.0f - (float)beta2), off by 1.3e-5 relative
# for beta2 = 0.999 (see test_adam_moment_weights_exact); values still match to 1e-6.
MOMENT_RTOL = 5e-5


def _sparse(rows, grads, shape):
    return torch.sparse_coo_tensor(rows[None], grads, shape, check_invariants=False)


@pytest.mark.parametrize("dim", DIMS)
def test_sgd_matches_torch_optim_sparse(path, dim):
    values = torch.randn(ROWS, dim)
    param = torch.nn.Parameter(values.clone())
    opt = torch.optim.SGD([param], lr=0.1)
    for rows in _row_sets(ROWS):
        grads = torch.randn(rows.numel(), dim)
        param.grad = _sparse(rows, grads, param.shape)
        opt.step()
        sgd_step(values, rows, grads, lr=0.1)
        assert_close(values, param.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim", DIMS)
def test_sgd_weight_decay_matches_torch_optim_on_touched_rows(path, dim):
    values = torch.randn(ROWS, dim)
    rows = torch.randperm(ROWS)[:150]
    sub = torch.nn.Parameter(values[rows].clone())
    opt = torch.optim.SGD([sub], lr=0.1, weight_decay=0.05)
    for _ in range(3):
        grads = torch.randn(rows.numel(), dim)
        sub.grad = grads.clone()
        opt.step()
        sgd_step(values, rows, grads, lr=0.1, weight_decay=0.05)
        assert_close(values[rows], sub.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lr_decay", [0.0, 0.05])
@pytest.mark.parametrize("dim", DIMS)
def test_adagrad_matches_torch_optim_sparse(path, dim, lr_decay):
    values = torch.randn(ROWS, dim)
    state_sum = torch.zeros(ROWS, dim)
    param = torch.nn.Parameter(values.clone())
    opt = torch.optim.Adagrad([param], lr=0.1, lr_decay=lr_decay, eps=1e-10)
    for t, rows in enumerate(_row_sets(ROWS), start=1):
        grads = torch.randn(rows.numel(), dim)
        param.grad = _sparse(rows, grads, param.shape)
        opt.step()
        adagrad_step(values, state_sum, rows, grads, lr=0.1, eps=1e-10, lr_decay=lr_decay, step=t)
        assert_close(values, param.detach(), rtol=1e-6, atol=1e-6)
        assert_close(state_sum, opt.state[param]["sum"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim", DIMS)
def test_adam_matches_torch_sparse_adam(path, dim):
    """decoupled=False is SparseAdam: lazy, untouched rows keep their moments."""
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    values = torch.randn(ROWS, dim)
    exp_avg, exp_avg_sq = torch.zeros(ROWS, dim), torch.zeros(ROWS, dim)
    param = torch.nn.Parameter(values.clone())
    opt = torch.optim.SparseAdam([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for t, rows in enumerate(_row_sets(ROWS) * 2, start=1):
        grads = torch.randn(rows.numel(), dim)
        param.grad = _sparse(rows, grads, param.shape)
        opt.step()
        adam_step(values, exp_avg, exp_avg_sq, rows, grads, step=t, **hyper)
        state = opt.state[param]
        assert state["step"] == t
        assert_close(values, param.detach(), rtol=1e-6, atol=1e-6)
        assert_close(exp_avg, state["exp_avg"], rtol=1e-5, atol=1e-7)
        assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=MOMENT_RTOL, atol=1e-8)


def _adamw_hyper():
    return dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _torch_adamw(param):
    return torch.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=0.1, foreach=False)


@pytest.mark.parametrize("dim", DIMS)
def test_adamw_single_step_matches_torch_adamw(path, dim):
    values = torch.randn(ROWS, dim)
    exp_avg, exp_avg_sq = torch.zeros(ROWS, dim), torch.zeros(ROWS, dim)
    rows = torch.randperm(ROWS)[:150]
    grads = torch.randn(rows.numel(), dim)
    sub = torch.nn.Parameter(values[rows].clone())
    opt = _torch_adamw(sub)
    sub.grad = grads.clone()
    opt.step()
    before = values.clone()
    adam_step(values, exp_avg, exp_avg_sq, rows, grads, step=1, decoupled=True, **_adamw_hyper())
    assert_close(values[rows], sub.detach(), rtol=1e-6, atol=1e-6)
    assert_close(exp_avg[rows], opt.state[sub]["exp_avg"], rtol=1e-6, atol=1e-7)
    assert_close(exp_avg_sq[rows], opt.state[sub]["exp_avg_sq"], rtol=MOMENT_RTOL, atol=1e-8)
    keep = _untouched(ROWS, rows)
    assert torch.equal(values[keep], before[keep])
    assert not exp_avg[keep].any() and not exp_avg_sq[keep].any()


@pytest.mark.parametrize("dim", DIMS)
def test_adamw_steps_on_same_rows_match_torch_adamw(path, dim):
    values = torch.randn(ROWS, dim)
    exp_avg, exp_avg_sq = torch.zeros(ROWS, dim), torch.zeros(ROWS, dim)
    rows = torch.randperm(ROWS)[:37]
    sub = torch.nn.Parameter(values[rows].clone())
    opt = _torch_adamw(sub)
    for t in range(1, 7):
        grads = torch.randn(rows.numel(), dim)
        sub.grad = grads.clone()
        opt.step()
        adam_step(values, exp_avg, exp_avg_sq, rows, grads, step=t, decoupled=True, **_adamw_hyper())
        assert_close(values[rows], sub.detach(), rtol=1e-6, atol=1e-6)
        assert_close(exp_avg[rows], opt.state[sub]["exp_avg"], rtol=1e-5, atol=1e-7)
        assert_close(exp_avg_sq[rows], opt.state[sub]["exp_avg_sq"], rtol=MOMENT_RTOL, atol=1e-8)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("beta2", [0.999, 0.9999])
def test_adam_moment_weights_exact(request, path, beta2, decoupled):
    hyper = dict(step=1, lr=1e-2, beta1=0.9, beta2=beta2, eps=1e-8, weight_decay=0.1,
                 decoupled=decoupled)
    values = torch.randn(ROWS, 9)
    states = [torch.zeros(ROWS, 9), torch.zeros(ROWS, 9)]
    ref_values, ref_states = values.clone(), [torch.zeros(ROWS, 9), torch.zeros(ROWS, 9)]
    rows = torch.randperm(ROWS)[:150]
    grads = torch.randn(rows.numel(), 9)
    adam_step(values, *states, rows, grads, **hyper)
    adam_step_reference(ref_values, *ref_states, rows, grads, **hyper)
    assert_close(states[0], ref_states[0], rtol=1e-6, atol=0)
    assert_close(states[1], ref_states[1], rtol=1e-6, atol=0)
    assert_close(values, ref_values, rtol=1e-6, atol=1e-7)


def test_rowwise_adagrad_formula(path):
    # One accumulator per row, fed by mean(g²); written out for a single row.
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    state = torch.tensor([0.5])
    grads = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    rowwise_adagrad_step(values, state, torch.tensor([0]), grads, lr=0.1, eps=1e-8)
    s = 0.5 + (1 + 1 + 4 + 0) / 4
    assert_close(state, torch.tensor([s]))
    assert_close(values, torch.tensor([[1.0, 2.0, 3.0, 4.0]]) - 0.1 * grads / (s**0.5 + 1e-8))


# ---- validation ---------------------------------------------------------------------


def _valid(R=10, dim=4, U=3):
    return torch.randn(R, dim), torch.tensor([7, 2, 5]), torch.randn(U, dim)


@pytest.mark.parametrize(
    "make, error, field",
    [
        (lambda v, r, g: (v[0], r, g[:, 0]), ValueError, "values"),
        (lambda v, r, g: (v, r.int(), g), TypeError, "rows"),
        (lambda v, r, g: (v, r[None], g), TypeError, "rows"),
        (lambda v, r, g: (v, r.float(), g), TypeError, "rows"),
        (lambda v, r, g: (v, r, g.double()), ValueError, "grads"),
        (lambda v, r, g: (v, r, g.bfloat16()), ValueError, "grads"),
        (lambda v, r, g: (v, r, g[:2]), ValueError, "grads"),
        (lambda v, r, g: (v, r, g[:, :3]), ValueError, "grads"),
        (lambda v, r, g: (v, torch.tensor([7, 2, 10]), g), IndexError, "rows"),
        (lambda v, r, g: (v, torch.tensor([7, -1, 5]), g), IndexError, "rows"),
    ],
)
@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_step_validation(name, make, error, field):
    op, _, state_shapes, hyper = OPTIMIZERS[name]
    values, rows, grads = make(*_valid())
    states = [torch.zeros(s) for s in state_shapes(10, 4)]
    before = values.clone()
    with pytest.raises(error, match=rf"^{field}:"):
        op(values, *states, rows, grads, **hyper(1))
    assert torch.equal(values, before)


@pytest.mark.parametrize(
    "name, states, field",
    [
        ("adagrad", [torch.zeros(10, 4, dtype=torch.float64)], "state_sum"),
        ("adagrad", [torch.zeros(4, 10).t()], "state_sum"),  # not contiguous
        ("adagrad", [torch.zeros(9, 4)], "state_sum"),
        ("rowwise_adagrad", [torch.zeros(11)], "state_sum"),
        ("adam", [torch.zeros(10, 4), torch.zeros(10, 4, dtype=torch.bfloat16)], "exp_avg_sq"),
        ("adam", [torch.zeros(12, 4), torch.zeros(10, 4)], "exp_avg"),
    ],
)
def test_step_validates_states(name, states, field):
    op, _, _, hyper = OPTIMIZERS[name]
    values, rows, grads = _valid()
    with pytest.raises((TypeError, ValueError), match=rf"^{field}:"):
        op(values, *states, rows, grads, **hyper(1))


# States of the right row count but the wrong layout: refused before any write.
@pytest.mark.parametrize(
    "name, states, field",
    [
        ("adagrad", [torch.zeros(10, 5)], "state_sum"),
        ("rowwise_adagrad", [torch.zeros(10, 4)], "state_sum"),
        ("adam", [torch.zeros(10, 5), torch.zeros(10, 5)], "exp_avg"),
    ],
)
def test_step_validates_state_width(name, states, field):
    op, _, _, hyper = OPTIMIZERS[name]
    values, rows, grads = _valid()
    with pytest.raises(ValueError, match=rf"^{field}:"):
        op(values, *states, rows, grads, **hyper(1))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_non_contiguous_rows(request, path, name):
    op, reference, state_shapes, hyper = OPTIMIZERS[name]
    values = torch.randn(40, 9)
    states = _states(state_shapes(40, 9))
    ref_values, ref_states = values.clone(), [s.clone() for s in states]
    rows = torch.randperm(40)[:20][::2]
    assert not rows.is_contiguous()
    grads = torch.randn(rows.numel(), 9)
    op(values, *states, rows, grads, **hyper(1))
    reference(ref_values, *ref_states, rows.contiguous(), grads, **hyper(1))
    assert_close(values, ref_values)
    for s, ref_s in zip(states, ref_states):
        assert_close(s, ref_s)
