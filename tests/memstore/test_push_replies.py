"""Repeated pushes on the plain ShardWorker (no Ray, no socket): a push repeated after a
lost reply gets the dw its first arrival got and is not applied again, for each of the
block's 16 most recent pushes, also when their steps were applied since; another push
reusing a remembered (step, push_id) with different bytes is refused naming push_id,
never answered with the first push's dw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memstore import Adam, InvalidArgument
from memstore._internal.shard_actor import ShardWorker
from memstore.grid import ShardGrid

ROWS, DIM, RECENT = 64, 8, 16


def _config(mode: str) -> dict:
    return {
        "name": "replies",
        "rows": ROWS,
        "dim": DIM,
        "dtype": "float32",
        "seed": 5,
        "optimizer": Adam(lr=0.1).to_dict(),
        "mode": mode,
        # sync: every push is the last of its step and applies it (step_on_push).
        "pushes_per_step": 1 if mode == "sync" else None,
        "step_on_push": mode == "sync",
        "max_staleness": None,
        "data_channel": "ray",
        "checkpoint_root": None,
        "grid": ShardGrid.make(ROWS, DIM, 1).to_dict(),
    }


def _push(worker: ShardWorker, step: int, seed: int | None = None):
    """Push ``step`` (push id 0) with slots drawn from ``seed`` (default ``step``): the
    dw it gets back."""
    rng = np.random.default_rng(step if seed is None else seed)
    rows = rng.integers(0, ROWS, 12).astype(np.int64)
    w = rng.random(12, dtype=np.float32)
    offsets = np.arange(4, dtype=np.int64) * 4
    dy = rng.standard_normal((3, DIM), dtype=np.float32)
    expected = f"{worker.incarnation}/{worker.epoch}"
    return worker.backward(rows, w, offsets, dy, step, 0, None, expected)[1]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_each_of_the_recent_pushes_repeated_gets_its_first_reply_and_is_not_reapplied(mode):
    torch.manual_seed(0)
    worker = ShardWorker(_config(mode), 0, 0)
    first = {step: _push(worker, step).copy() for step in range(1, RECENT + 1)}
    # Every push applied its step on arrival: the values moved, and a push computed again
    # on them would get another dw (or, in sync mode, be refused as a step of the past).
    assert worker.table.last_step == RECENT and worker.table.pending_steps() == []
    state = worker.fingerprint()
    for step in range(1, RECENT + 1):
        np.testing.assert_array_equal(_push(worker, step), first[step])
    assert worker.fingerprint() == state
    assert worker.table.last_step == RECENT and worker.table.pending_steps() == []
    assert worker.replayed == RECENT


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_another_push_under_a_remembered_id_is_refused_and_changes_nothing(mode):
    torch.manual_seed(0)
    worker = ShardWorker(_config(mode), 0, 0)
    first = _push(worker, 1).copy()
    state = worker.fingerprint()
    with pytest.raises(InvalidArgument) as refused:
        _push(worker, 1, seed=99)  # a stale second pusher reusing step 1, push id 0
    assert refused.value.field == "push_id"
    assert worker.fingerprint() == state
    np.testing.assert_array_equal(_push(worker, 1), first)  # the true retry still replays
