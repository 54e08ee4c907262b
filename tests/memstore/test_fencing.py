"""Fencing of one block, on the plain ShardWorker (no Ray, no socket): a write carries
``incarnation/epoch`` and is refused, with nothing changed, when either is not the
block's; reads are fenced by the incarnation alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memstore import Adam
from memstore._internal.shard_actor import ShardWorker
from memstore.errors import InvalidArgument, ShardRestarted
from memstore.grid import ShardGrid

ROWS, DIM = 64, 8


def _config() -> dict:
    return {
        "name": "fence",
        "rows": ROWS,
        "dim": DIM,
        "dtype": "float32",
        "seed": 11,
        "optimizer": Adam(lr=0.1).to_dict(),
        "mode": "sync",
        "pushes_per_step": None,
        "data_channel": "ray",
        "checkpoint_root": None,
        "grid": ShardGrid.make(ROWS, DIM, 1).to_dict(),
    }


def _push(worker: ShardWorker, expected: str, step: int = 1):
    rng = np.random.default_rng(step)
    rows = rng.integers(0, ROWS, 12).astype(np.int64)
    w = rng.random(12, dtype=np.float32)
    offsets = np.arange(4, dtype=np.int64) * 4
    dy = rng.standard_normal((3, DIM), dtype=np.float32)
    return worker.backward(rows, w, offsets, dy, step, 0, None, expected)


@pytest.fixture
def worker():
    torch.manual_seed(0)
    return ShardWorker(_config(), 0, 0)


def test_a_write_for_the_current_epoch_is_taken(worker):
    _, dw = _push(worker, f"{worker.incarnation}/0")
    assert dw.shape == (12,) and worker.table.pushes(1) == [0]
    assert worker.step(1, 1, None, f"{worker.incarnation}/0")[1] > 0


@pytest.mark.parametrize(
    "expected",
    ["{inc}/1", "{inc}", "other/0", "{inc}/", "{inc}/0/0"],
    ids=["old epoch", "no epoch", "other incarnation", "empty epoch", "extra field"],
)
def test_a_write_for_another_epoch_or_incarnation_changes_nothing(worker, expected):
    worker.reload(None, [], epoch=2)  # as a rollback by another handle leaves it
    before = worker.fingerprint()
    expected = expected.format(inc=worker.incarnation)
    with pytest.raises(ShardRestarted) as refused:
        _push(worker, expected)
    # The fence the block holds: its incarnation, with the epoch when only that differs.
    ours = expected.partition("/")[0] == worker.incarnation
    assert refused.value.incarnation == (f"{worker.incarnation}/2" if ours else worker.incarnation)
    with pytest.raises(ShardRestarted):
        worker.step(1, None, None, expected)
    assert worker.table.pending_steps() == [] and worker.fingerprint() == before
    _push(worker, f"{worker.incarnation}/2")  # the epoch the reload set
    assert worker.table.pushes(1) == [0]


def test_reads_are_fenced_by_the_incarnation_only(worker):
    worker.reload(None, [], epoch=3)
    rows = np.arange(4, dtype=np.int64)
    _, values, _ = worker.gather(rows, worker.incarnation)
    expected = worker.table.gather(torch.from_numpy(rows)).float().numpy()
    np.testing.assert_array_equal(values, expected)
    with pytest.raises(ShardRestarted):
        worker.gather(rows, "another-incarnation")


def test_a_reload_takes_only_a_valid_epoch(worker):
    with pytest.raises(InvalidArgument, match="epoch"):
        worker.reload(None, [], epoch=-1)
