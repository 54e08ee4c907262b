"""Fused sparse optimizer steps against torch.optim and against float64 loops.

On CPU the composite path of every step is ``kernels.reference``, so nothing here
compares with it: each step is checked against ``torch.optim`` (SGD, Adagrad,
SparseAdam, AdamW) or against the optimizer's formula written out below in float64
numpy, applied to the same rows from the same state. Each test runs several steps with
different sets of touched rows (unique, unsorted), checks that untouched rows of the
values and of every state stay bit-identical, and asserts which path (C or composite)
the step took.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memstore.kernels import (
    SparseRowGrads,
    adagrad_step,
    adam_step,
    rowwise_adagrad_step,
    sgd_step,
)

ROWS = 300
DIMS = [1, 9, 41, 341]
DTYPES = [torch.float32, torch.bfloat16]


# ---- float64 oracles: the update of the touched rows, as the torch docs write it ----


def sgd64(v, states, g, *, lr, weight_decay=0.0):
    return v - lr * (g + weight_decay * v), []


def adagrad64(v, states, g, *, lr, eps, lr_decay=0.0, step=1):
    (s,) = states
    clr = lr / (1 + (step - 1) * lr_decay)
    s = s + g * g
    return v - clr * g / (np.sqrt(s) + eps), [s]


def rowwise_adagrad64(v, states, g, *, lr, eps):
    (s,) = states
    s = s + (g * g).mean(axis=1)
    return v - lr * g / (np.sqrt(s) + eps)[:, None], [s]


def adam64(v, states, g, *, step, lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False):
    m, s = states
    m = beta1 * m + (1 - beta1) * g
    s = beta2 * s + (1 - beta2) * g * g
    if decoupled:  # torch.optim.AdamW: decay first, then eps added to sqrt(v̂)
        v = v * (1 - lr * weight_decay)
        m_hat, v_hat = m / (1 - beta1**step), s / (1 - beta2**step)
        return v - lr * m_hat / (np.sqrt(v_hat) + eps), [m, s]
    # torch.optim.SparseAdam: eps added to sqrt(v) before the bias correction
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    return v - step_size * m / (np.sqrt(s) + eps), [m, s]


# name -> (op, oracle, state shapes given (R, dim), hyper-parameters of 1-based step t).
# Values are N(0, 1/16), as in a table of dim 16, and the learning rates make a step
# move a touched value by far more than the tolerance of the comparison: _check_step
# asserts that the median move is more than 5 times the median tolerance.
OPTIMIZERS = {
    "sgd": (sgd_step, sgd64, lambda R, d: [], lambda t: dict(lr=0.1)),
    "sgd_weight_decay": (
        sgd_step,
        sgd64,
        lambda R, d: [],
        lambda t: dict(lr=0.1, weight_decay=0.05),
    ),
    "adagrad": (
        adagrad_step,
        adagrad64,
        lambda R, d: [(R, d)],
        lambda t: dict(lr=0.1, eps=1e-10, step=t),
    ),
    "adagrad_lr_decay": (
        adagrad_step,
        adagrad64,
        lambda R, d: [(R, d)],
        lambda t: dict(lr=0.1, eps=1e-10, lr_decay=0.05, step=t),
    ),
    "rowwise_adagrad": (
        rowwise_adagrad_step,
        rowwise_adagrad64,
        lambda R, d: [(R,)],
        lambda t: dict(lr=0.1, eps=1e-8),
    ),
    "adam": (
        adam_step,
        adam64,
        lambda R, d: [(R, d), (R, d)],
        lambda t: dict(step=t, lr=0.2, beta1=0.9, beta2=0.999, eps=1e-8),
    ),
    "adamw": (
        adam_step,
        adam64,
        lambda R, d: [(R, d), (R, d)],
        lambda t: dict(
            step=t, lr=0.2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True
        ),
    ),
}
# The op (as kernels._dispatch records it) each optimizer runs; on CPU it takes the C path.
OP = {
    "sgd": "sgd_step",
    "sgd_weight_decay": "sgd_step",
    "adagrad": "adagrad_step",
    "adagrad_lr_decay": "adagrad_step",
    "rowwise_adagrad": "rowwise_adagrad_step",
    "adam": "adam_step",
    "adamw": "adam_step",
}

# float32 results against the float64 oracle: a few float32 roundings of values of
# magnitude below 2, i.e. well under 1e-6.
F32 = dict(rtol=2e-6, atol=2e-6)
# float32 optimizer states: exp_avg = beta1·m + (1 - beta1)·g can cancel to near 0,
# leaving the float32 rounding of its terms (|terms| < 1, so a few 1e-8) as the error.
STATE = dict(rtol=2e-6, atol=1e-7)


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


def _values(R, dim, dtype):
    return (torch.randn(R, dim) * 0.25).to(dtype)


def _states(shapes):
    # Non-zero, non-negative states, as after some earlier steps.
    return [torch.rand(shape) * 0.1 for shape in shapes]


def _untouched(R, rows):
    mask = torch.ones(R, dtype=torch.bool)
    mask[rows] = False
    return mask


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def assert_bf16_is_rounded(
    actual: torch.Tensor, exact: np.ndarray, before: np.ndarray
) -> np.ndarray:
    """``actual`` (bfloat16) is the bfloat16 nearest to the exact float64 update: at most
    half a bfloat16 ulp away, plus the float32 error of computing the update (a few
    1e-7 of the magnitudes involved), which can flip a rounding that lies on a tie."""
    got = _f64(actual)
    _, exponent = np.frexp(exact)
    half_ulp = np.ldexp(0.5, exponent - 8)  # bfloat16 keeps 8 significant bits
    slack = 1e-6 * (np.abs(before) + np.abs(exact - before)) + 1e-30
    err = np.abs(got - exact)
    bad = err > half_ulp + slack
    assert not bad.any(), (
        f"{int(bad.sum())} values not the nearest bfloat16: worst error "
        f"{err[bad].max():.3g} against half an ulp {half_ulp[bad][err[bad].argmax()]:.3g}"
    )
    return half_ulp + slack


def _expected_step(oracle, values, states, rows, grads, hyper):
    """The oracle's values and states of the touched rows after this step, in float64."""
    return oracle(_f64(values[rows]), [_f64(s[rows]) for s in states], _f64(grads), **hyper)


def _check_step(values, states, rows, expected, before):
    new_v, new_states = expected
    if values.dtype == torch.bfloat16:
        tolerance = assert_bf16_is_rounded(values[rows], new_v, _f64(before[rows]))
    else:
        torch.testing.assert_close(values[rows], torch.from_numpy(new_v).to(values.dtype), **F32)
        tolerance = F32["atol"] + F32["rtol"] * np.abs(new_v)
    moved = np.abs(new_v - _f64(before[rows]))
    assert np.median(moved) > 5 * np.median(tolerance), "the step is too small for its tolerance"
    for s, s_exp in zip(states, new_states):
        torch.testing.assert_close(s[rows], torch.from_numpy(s_exp).float(), **STATE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_matches_float64_oracle(path, name, dim, dtype):
    op, oracle, state_shapes, hyper = OPTIMIZERS[name]
    values = _values(ROWS, dim, dtype)
    states = _states(state_shapes(ROWS, dim))

    for t, rows in enumerate(_row_sets(ROWS), start=1):
        grads = torch.randn(rows.numel(), dim)
        before, before_states = values.clone(), [s.clone() for s in states]
        expected = _expected_step(oracle, values, states, rows, grads, hyper(t))

        op(values, *states, rows, grads, **hyper(t))

        assert values.dtype == dtype
        _check_step(values, states, rows, expected, before)
        keep = _untouched(ROWS, rows)
        assert torch.equal(values[keep], before[keep])
        for s, s0 in zip(states, before_states):
            assert torch.equal(s[keep], s0[keep])
    path.took(**{OP[name]: "native"})


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_float64_values_take_the_composite(native_calls, name):
    """float64 values always run the composite, whose update is computed in float32."""
    op, oracle, state_shapes, hyper = OPTIMIZERS[name]
    values = _values(41, 9, torch.float64)
    states = _states(state_shapes(41, 9))
    for t, rows in enumerate(_row_sets(41), start=1):
        grads = torch.randn(rows.numel(), 9)
        before = values.clone()
        expected = _expected_step(oracle, values, states, rows, grads, hyper(t))
        op(values, *states, rows, grads, **hyper(t))
        torch.testing.assert_close(values[rows], torch.from_numpy(expected[0]), **F32)
        assert torch.equal(values[_untouched(41, rows)], before[_untouched(41, rows)])
    native_calls.took(**{OP[name]: "composite"})


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
    op, oracle, state_shapes, hyper = OPTIMIZERS[name]
    base = _values(50, 60, dtype)
    before_base = base.clone()
    values = base[:, 5:46]
    states = _states(state_shapes(50, 41))
    rows = torch.randperm(50)[:20]
    grads = torch.randn(20, 41)
    expected = _expected_step(oracle, values, states, rows, grads, hyper(1))
    op(values, *states, rows, grads, **hyper(1))
    _check_step(values, states, rows, expected, before_base[:, 5:46])
    assert torch.equal(base[:, :5], before_base[:, :5])
    assert torch.equal(base[:, 46:], before_base[:, 46:])
    path.took(**{OP[name]: "native"})


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_non_contiguous_rows_fall_back_to_the_composite(native_calls, name):
    """The C path needs contiguous rows (what a backward returns); a strided view of
    rows is still applied correctly, by the composite."""
    op, oracle, state_shapes, hyper = OPTIMIZERS[name]
    values = _values(40, 9, torch.float32)
    states = _states(state_shapes(40, 9))
    rows = torch.randperm(40)[:20][::2]
    assert not rows.is_contiguous()
    grads = torch.randn(rows.numel(), 9)
    before, before_states = values.clone(), [s.clone() for s in states]
    expected = _expected_step(oracle, values, states, rows, grads, hyper(1))
    op(values, *states, rows, grads, **hyper(1))
    _check_step(values, states, rows, expected, before)
    native_calls.took(**{OP[name]: "composite"})
    native_calls.clear()
    # The same rows made contiguous take the C path, to the oracle's values too.
    values2, states2 = before.clone(), [s.clone() for s in before_states]
    op(values2, *states2, rows.contiguous(), grads, **hyper(1))
    native_calls.took(**{OP[name]: "native"})
    _check_step(values2, states2, rows, expected, before)


# ---- against torch.optim, over several steps (float32) ------------------------------


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
        torch.testing.assert_close(values, param.detach(), rtol=1e-6, atol=1e-7)
    path.took(sgd_step="native")


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
        torch.testing.assert_close(values[rows], sub.detach(), rtol=1e-6, atol=1e-7)
    path.took(sgd_step="native")


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
        torch.testing.assert_close(values, param.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state_sum, opt.state[param]["sum"], rtol=1e-6, atol=1e-7)
    path.took(adagrad_step="native")


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
        torch.testing.assert_close(values, param.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-5, atol=1e-8)
    path.took(adam_step="native")


def _adamw_hyper():
    return dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _torch_adamw(param):
    return torch.optim.AdamW(
        [param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False
    )


@pytest.mark.parametrize("dim", DIMS)
def test_adamw_steps_on_same_rows_match_torch_adamw(path, dim):
    """decoupled=True is AdamW on the touched rows; untouched rows and moments stay."""
    values = torch.randn(ROWS, dim)
    exp_avg, exp_avg_sq = torch.zeros(ROWS, dim), torch.zeros(ROWS, dim)
    rows = torch.randperm(ROWS)[:150]
    sub = torch.nn.Parameter(values[rows].clone())
    opt = _torch_adamw(sub)
    before = values.clone()
    for t in range(1, 7):
        grads = torch.randn(rows.numel(), dim)
        sub.grad = grads.clone()
        opt.step()
        adam_step(
            values, exp_avg, exp_avg_sq, rows, grads, step=t, decoupled=True, **_adamw_hyper()
        )
        torch.testing.assert_close(values[rows], sub.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(exp_avg[rows], opt.state[sub]["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            exp_avg_sq[rows], opt.state[sub]["exp_avg_sq"], rtol=1e-5, atol=1e-8
        )
    keep = _untouched(ROWS, rows)
    assert torch.equal(values[keep], before[keep])
    assert not exp_avg[keep].any() and not exp_avg_sq[keep].any()
    path.took(adam_step="native")


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("beta2", [0.999, 0.9999])
def test_adam_moment_weights_exact(path, beta2, decoupled):
    """The moments weigh the gradient by exactly 1 - beta (to float32 rounding), also
    for a beta2 whose 1 - beta2 is not a float32 number."""
    hyper = dict(
        step=1, lr=1e-2, beta1=0.9, beta2=beta2, eps=1e-8, weight_decay=0.1, decoupled=decoupled
    )
    values = torch.randn(ROWS, 9)
    states = [torch.zeros(ROWS, 9), torch.zeros(ROWS, 9)]
    rows = torch.randperm(ROWS)[:150]
    grads = torch.randn(rows.numel(), 9)
    _, (m, s) = adam64(_f64(values[rows]), [np.zeros((150, 9))] * 2, _f64(grads), **hyper)
    adam_step(values, *states, rows, grads, **hyper)
    torch.testing.assert_close(states[0][rows], torch.from_numpy(m).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(states[1][rows], torch.from_numpy(s).float(), rtol=1e-6, atol=0)
    path.took(adam_step="native")


def test_rowwise_adagrad_formula(path):
    # One accumulator per row, fed by mean(g²); written out for a single row.
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    state = torch.tensor([0.5])
    grads = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    rowwise_adagrad_step(values, state, torch.tensor([0]), grads, lr=0.1, eps=1e-8)
    s = 0.5 + (1 + 1 + 4 + 0) / 4
    torch.testing.assert_close(state, torch.tensor([s]))
    expected = torch.tensor([[1.0, 2.0, 3.0, 4.0]]) - 0.1 * grads / (s**0.5 + 1e-8)
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-7)
    path.took(rowwise_adagrad_step="native")


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


# ---- factored row gradients (what a table's step passes) ----------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_with_factored_gradients_matches_float64_oracle(path, name, dtype):
    """SparseRowGrads (slots of each row, their weights and bags, and dy) go to the C
    step unmaterialised; each row's gradient Σ w·dy[bag] is summed in float64 here."""
    op, oracle, state_shapes, hyper = OPTIMIZERS[name]
    R, dim, P, bags = ROWS, 41, 900, 60
    values = _values(R, dim, dtype)
    states = _states(state_shapes(R, dim))
    slot_rows = torch.randint(0, R, (P,))
    slot_w, slot_bag, dy = torch.rand(P), torch.randint(0, bags, (P,)), torch.randn(bags, dim)
    grads = SparseRowGrads.from_slots(slot_rows, slot_w, slot_bag, dy, num_rows=R)
    rows = grads.rows
    dense64 = torch.zeros(R, dim, dtype=torch.float64).index_add_(
        0, slot_rows, slot_w.double()[:, None] * dy.double()[slot_bag]
    )[rows]
    before = values.clone()
    expected = oracle(
        _f64(values[rows]), [_f64(s[rows]) for s in states], dense64.numpy(), **hyper(2)
    )
    op(values, *states, rows, grads, **hyper(2))
    _check_step(values, states, rows, expected, before)
    keep = _untouched(R, rows)
    assert torch.equal(values[keep], before[keep])
    path.took(**{OP[name]: "native"})
    if path.name == "fast":  # the gradient stayed factored: never materialised in C
        assert "row_grads" not in path.symbols
