"""Every optimizer of a ShardTable, on the production path (backward pushes factored row
gradients, step applies the fused optimizer), against torch.optim on the same rows.

The oracle is torch in float64: ``F.embedding_bag(..., sparse=True)`` gives the sparse
value gradient of the same batch, and ``torch.optim`` (SGD, Adagrad, SparseAdam, AdamW)
applies it; RowWiseAdagrad has no torch twin and is written out as a float64 loop.
Before each step the oracle's parameter is set to the table's current values, so the
check is per step and its tolerance does not grow with the number of steps; the
oracle's optimizer state is its own, so a wrong state or step count shows up.

Tolerances, against one step's size: the learning rates make a step move the median
touched value by more than 1e-2 (asserted in ``_check``). float32 tables must match
the float64 update to 2e-6 (float32 rounding of values below 2, and of the float32
gradient and state), thousands of times below a step. bfloat16 tables must hold the
bfloat16 nearest to the float64 update: at most half a bfloat16 ulp (at most 2^-9
for the |v| < 1 of a table of std 1/4, five times below a step, and 2^-11 for the
typical |v| ~ 1/4) plus the float32 error of computing it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memstore
from memstore import ShardTable
from memstore.kernels import _dispatch, _native

ROWS, DIM, B, M = 200, 16, 24, 6
STEPS = 5
F32 = dict(rtol=2e-6, atol=2e-6)
MIN_STEP = 1e-2  # the median move of a touched value per step, at least


def _batch(lo=0, hi=ROWS, rows=None):
    idx = (
        torch.randint(lo, hi, (B, M)) if rows is None else rows[torch.randint(0, len(rows), (B, M))]
    )
    return idx, torch.rand(B, M), torch.randn(B, DIM)


def _sparse_grad(param, idx, w, dy):
    """The value gradient of sum(dy · bag(values)) as torch computes it: sparse COO."""
    param.grad = None
    F.embedding_bag(idx, param, per_sample_weights=w.double(), mode="sum", sparse=True).backward(
        dy.double()
    )
    return param.grad


def _dense_grad(values64, idx, w, dy):
    param = values64.clone().requires_grad_()
    F.embedding_bag(idx, param, per_sample_weights=w.double(), mode="sum").backward(dy.double())
    return param.grad


def assert_bf16_is_rounded(actual, exact, before):
    """bfloat16 ``actual`` is the bfloat16 nearest to the float64 ``exact``: at most half
    an ulp away, plus the float32 error of the update (it can flip a near-tie)."""
    got, exact, before = (t.double().numpy() for t in (actual, exact, before))
    _, exponent = np.frexp(exact)
    half_ulp = np.ldexp(0.5, exponent - 8)
    slack = 1e-6 * (np.abs(before) + np.abs(exact - before)) + 1e-30
    err = np.abs(got - exact)
    assert (err <= half_ulp + slack).all(), f"worst error {err.max():.3g}"


def _check(table, expected, before, touched):
    """``table`` after a step against the oracle's float64 values of every row."""
    moved = (expected[touched] - before[touched].double()).abs()
    assert float(moved.median()) > MIN_STEP, "the step is too small for the tolerance to mean much"
    if table.values.dtype == torch.bfloat16:
        assert_bf16_is_rounded(table.values, expected, before)
    else:
        torch.testing.assert_close(table.values, expected.float(), **F32)
    untouched = torch.ones(table.values.shape[0], dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(table.values[untouched], before[untouched])


class TorchOracle:
    """A torch optimizer over a float64 copy of the table, re-synced to the table's
    values before each step (its state stays its own)."""

    def __init__(self, values, make_opt):
        self.param = torch.nn.Parameter(values.double())
        self.opt = make_opt([self.param])

    def step(self, values, idx, w, dy) -> torch.Tensor:
        with torch.no_grad():
            self.param.copy_(values.double())
        self.param.grad = _sparse_grad(self.param, idx, w, dy)
        self.opt.step()
        return self.param.detach().clone()


class SGDOracle:
    """torch.optim.SGD (stateless) on the rows a step touches: torch refuses weight decay
    on a sparse gradient, and only touched rows may decay."""

    def __init__(self, table, lr, weight_decay):
        self.lr, self.weight_decay = lr, weight_decay

    def step(self, values, idx, w, dy) -> torch.Tensor:
        rows = torch.unique(idx)
        out = values.double()
        sub = torch.nn.Parameter(out[rows].clone())
        sub.grad = _dense_grad(values.double(), idx, w, dy)[rows]
        torch.optim.SGD([sub], lr=self.lr, weight_decay=self.weight_decay).step()
        out[rows] = sub.detach()
        return out


class RowWiseAdagradOracle:
    """Row-wise Adagrad written out in float64: one accumulator per row, fed by the mean
    of g² over the row, on the rows the step touches."""

    def __init__(self, table, lr, eps):
        self.lr, self.eps = lr, eps
        self.sum = torch.zeros(table.values.shape[0], dtype=torch.float64)

    def step(self, values, idx, w, dy) -> torch.Tensor:
        g = _dense_grad(values.double(), idx, w, dy)
        out = values.double()
        for r in torch.unique(idx).tolist():
            self.sum[r] += float((g[r] * g[r]).mean())
            out[r] -= self.lr * g[r] / (self.sum[r].sqrt() + self.eps)
        return out


def _c_steps(kind) -> int:
    """How many steps of this optimizer kind took the C path so far."""
    op = {
        "sgd": "sgd_step",
        "adagrad": "adagrad_step",
        "rowwise_adagrad": "rowwise_adagrad_step",
        "adam": "adam_step",
        "adamw": "adam_step",
    }[kind.value]
    return _dispatch.COUNTS[(op, "native")]


# name -> (memstore optimizer, oracle factory given the table)
CASES = {
    "sgd": (memstore.SGD(lr=0.5), lambda t: SGDOracle(t, 0.5, 0.0)),
    "sgd_weight_decay": (memstore.SGD(lr=0.5, weight_decay=0.1), lambda t: SGDOracle(t, 0.5, 0.1)),
    "adagrad": (
        memstore.Adagrad(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1),
        lambda t: TorchOracle(
            t.values,
            lambda p: torch.optim.Adagrad(
                p, lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, eps=1e-10
            ),
        ),
    ),
    "rowwise_adagrad": (
        memstore.RowWiseAdagrad(lr=0.1),
        lambda t: RowWiseAdagradOracle(t, 0.1, 1e-10),
    ),
    "adam": (
        memstore.Adam(lr=0.05, betas=(0.9, 0.99)),
        lambda t: TorchOracle(
            t.values, lambda p: torch.optim.SparseAdam(p, lr=0.05, betas=(0.9, 0.99))
        ),
    ),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_shard_table_steps_match_torch(name, dtype):
    """Each step touches a different set of rows: the optimizers are lazy (untouched rows
    keep their values and, for the torch oracle too, their state)."""
    optimizer, make_oracle = CASES[name]
    table = ShardTable(ROWS, DIM, optimizer=optimizer, dtype=dtype, seed=1)
    oracle = make_oracle(table)
    for step in range(1, STEPS + 1):
        idx, w, dy = _batch()
        before = table.values.clone()
        expected = oracle.step(before, idx, w, dy)
        table.backward(idx, w, dy, step=step)
        c_steps = _c_steps(optimizer.kind)
        assert table.step(step) == torch.unique(idx).numel()
        # The production path on CPU: the C step on the factored gradient.
        assert _c_steps(optimizer.kind) == c_steps + (_native.library() is not None)
        _check(table, expected, before, torch.unique(idx))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shard_table_adamw_matches_torch_adamw(dtype):
    """torch.optim.AdamW takes no sparse gradient: every batch touches the same 40 rows,
    and AdamW runs on those rows as a dense parameter. The other rows never move."""
    table = ShardTable(
        ROWS, DIM, optimizer=memstore.AdamW(lr=0.05, weight_decay=0.1), dtype=dtype, seed=1
    )
    rows = torch.randperm(ROWS)[:40].sort().values
    sub = torch.nn.Parameter(table.values[rows].double())
    opt = torch.optim.AdamW([sub], lr=0.05, weight_decay=0.1, foreach=False)
    for step in range(1, STEPS + 1):
        idx, w, dy = _batch(rows=rows)
        idx[0, :] = rows[:M]  # every row of the set at least once
        idx[1:8].view(-1)[: 40 - M] = rows[M:]
        before = table.values.clone()
        with torch.no_grad():
            sub.copy_(before[rows].double())
        sub.grad = _dense_grad(before.double(), idx, w, dy)[rows]
        opt.step()
        expected = before.double()
        expected[rows] = sub.detach()
        table.backward(idx, w, dy, step=step)
        assert table.step(step) == 40
        _check(table, expected, before, rows)


def _sparse_adam():
    return lambda p: torch.optim.SparseAdam(p, lr=0.05, betas=(0.9, 0.99))


def test_adam_step_counter_advances_on_a_block_without_rows():
    """A 2-block grid in one process: at step 1 only block 0 gets rows (block 1 gets
    no push, as a router sends nothing to a block no token reads); both blocks step.
    At step 2 block 1's rows get their first update, with the bias correction of
    update 2, as torch.optim.SparseAdam over the whole table gives them."""
    adam = memstore.Adam(lr=0.05, betas=(0.9, 0.99))
    blocks = [
        ShardTable(ROWS, DIM, optimizer=adam, row_range=r, seed=1) for r in ((0, 100), (100, ROWS))
    ]
    start = torch.cat([b.values for b in blocks])
    oracle = TorchOracle(start, _sparse_adam())

    idx, w, dy = _batch(0, 100)
    expected = oracle.step(start, idx, w, dy)
    blocks[0].backward(idx, w, dy, step=1)
    assert [b.step(1) for b in blocks] == [torch.unique(idx).numel(), 0]
    assert [b.state_dict()["updates"] for b in blocks] == [1, 1]
    torch.testing.assert_close(torch.cat([b.values for b in blocks]), expected.float(), **F32)
    assert torch.equal(blocks[1].values, start[100:])

    lo, hi = _batch(0, 100), _batch(100, ROWS)
    idx, w, dy = (torch.cat([a, b]) for a, b in zip(lo, hi))
    before = torch.cat([b.values for b in blocks])
    expected = oracle.step(before, idx, w, dy)
    blocks[0].backward(*lo, step=2)
    blocks[1].backward(*hi, step=2)
    for b in blocks:
        b.step(2)
    torch.testing.assert_close(torch.cat([b.values for b in blocks]), expected.float(), **F32)

    # A block 1 that had not counted step 1 (first update, bias correction of update 1)
    # would be far outside that tolerance.
    lagging = TorchOracle(before[100:], _sparse_adam()).step(before[100:], hi[0] - 100, *hi[1:])
    assert float((lagging - expected[100:]).abs().max()) > 1e3 * F32["atol"]
