"""Finite inputs that would overflow a table are refused before anything changes, and
what is accepted keeps every value finite: the push's w * dy products and the learning
rate are bounded (memstore._internal.validation), checked here with float64 arithmetic
written in the test, on a local block and on the distributed table."""

from __future__ import annotations

import pytest
import torch

import memstore
from memstore import InvalidArgument, ShardTable
from memstore._internal.validation import MAX_LR, MAX_ROW_GRAD

ROWS, DIM, B, M = 64, 8, 4, 3
OPTIMIZERS = [memstore.SGD, memstore.Adagrad, memstore.RowWiseAdagrad, memstore.Adam]


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ROWS, (B, M), generator=g), torch.rand(B, M, generator=g)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.__name__)
def test_huge_products_are_refused_and_change_nothing(optimizer):
    table = ShardTable(ROWS, DIM, optimizer=optimizer(lr=0.1), seed=1)
    before = table.fingerprint()
    idx, _ = _batch(0)
    with pytest.raises(InvalidArgument, match="dy"):
        table.backward(idx, torch.full((B, M), 1e20), torch.full((B, DIM), 1e20), step=1)
    assert table.pending_steps() == [] and table.fingerprint() == before


@pytest.mark.parametrize("lr", [3e38, MAX_LR * 2, float("inf")])
def test_learning_rates_beyond_the_bound_are_refused(lr):
    with pytest.raises(InvalidArgument, match="lr"):
        memstore.Adam(lr=lr)
    table = ShardTable(ROWS, DIM, optimizer=memstore.SGD(lr=0.1), seed=1)
    idx, w = _batch(1)
    with pytest.raises(InvalidArgument, match="lr"):
        table.backward(idx, w, torch.ones(B, DIM), step=1, lr=lr)
    with pytest.raises(InvalidArgument, match="lr"):
        table.step(1, lr=lr)
    assert table.pending_steps() == []


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.__name__)
def test_the_largest_accepted_push_and_lr_keep_every_value_finite(optimizer):
    """At the bounds (max|w| * max|dy| * slots = MAX_ROW_GRAD, lr = MAX_LR), three steps
    leave finite values, and the gradient the rows got is what float64 predicts."""
    table = ShardTable(ROWS, DIM, optimizer=optimizer(lr=MAX_LR), seed=1)
    idx = torch.zeros(B, M, dtype=torch.int64)  # every slot on row 0: the largest sum
    w = torch.ones(B, M)
    # Just under the bound once rounded to float32, the wire dtype.
    dy_value = float(torch.tensor(0.999 * MAX_ROW_GRAD / (B * M), dtype=torch.float32))
    for step in (1, 2, 3):
        table.backward(idx, w, torch.full((B, DIM), dy_value), step=step)
        table.step(step)
    values = table.gather(torch.arange(ROWS)).double()
    assert torch.isfinite(values).all()
    if optimizer is memstore.SGD:  # v0 - 3 * lr * (B * M * dy) for row 0, in float64
        start = ShardTable(ROWS, DIM, optimizer=optimizer(lr=MAX_LR), seed=1)
        v0 = start.gather(torch.tensor([0])).double()[0]
        expected = v0 - 3 * MAX_LR * B * M * dy_value
        torch.testing.assert_close(values[0], expected, rtol=1e-6, atol=0)


def test_the_distributed_table_refuses_before_any_block_takes_it(ray_start_16_cpus, table_names):
    t = memstore.create_table(table_names("finite"), ROWS, DIM, shards=(2, 1), seed=3)
    before = t.fingerprints()
    idx, _ = _batch(2)
    with pytest.raises(InvalidArgument, match="dy"):
        t.backward(idx, torch.full((B, M), 1e20), torch.full((B, DIM), 1e20), step=1)
    with pytest.raises(InvalidArgument, match="lr"):
        t.step(1, lr=3e38)
    assert all(s["pending_steps"] == [] for s in t.stats()["shards"])
    assert t.fingerprints() == before
