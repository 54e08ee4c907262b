"""Faults injected around the data calls of a training loop: lost replies and shard
restarts, on a real local Ray instance and the real data channel.

The loop trains a 2 x 1 grid towards a fixed target: y = lookup(idx, w),
dy = (y - target) / B, backward(idx, w, dy, step), then step (or the shards step on the
push, with ``step_on_push``). The batch of a step depends only on the step, so a run
that rolls back replays exactly. Every run is compared with an undisturbed run of a
table of the same shape, seed and options, without checkpoints (one, trained once per
module, serves the tests of plain sync tables): the final fingerprints (values,
optimizer state, step counters) must be equal, bit for bit.

Faults go in through a ShardWorker subclass: ``arm`` drops the next reply of an op
(lookup, backward or step) on the data channel (the handler ran: the call took effect
and its answer was lost), or makes the shard's process exit right before or right after
handling the next call of an op (Ray restarts it; it reloads the newest checkpoint).
"""

import os

import pytest
import ray
import torch

import memstore
from memstore import StoreRolledBack
from memstore._internal.shard_actor import ShardWorker

pytestmark = pytest.mark.usefixtures("ray_start_16_cpus")

ROWS, DIM, B, M, SEED = 512, 64, 16, 4, 5
STEPS = 6
LOST_REPLY_S = 2.0  # a lost reply costs this long before the call is repeated over Ray


class FaultyShard(ShardWorker):
    def __init__(self, config, r, c):
        super().__init__(config, r, c)
        self.exit_at: tuple[str, str] | None = None

    def arm(self, fault: str, op: str) -> None:
        """``fault``: "drop" (the next reply of ``op`` is lost), "exit-before" or
        "exit-after" (the process exits before or after handling the next ``op``)."""
        if fault == "drop":
            self.data_server.faults.drop_replies(op, 1)
        else:
            self.exit_at = (fault, op)

    def dropped(self) -> int:
        return sum(self.data_server.faults.dropped.values())

    def _maybe_exit(self, when: str, op: str) -> None:
        if self.exit_at == (f"exit-{when}", op):
            os._exit(1)

    def lookup(self, *args):
        self._maybe_exit("before", "lookup")
        out = super().lookup(*args)
        self._maybe_exit("after", "lookup")
        return out

    def backward(self, *args):
        self._maybe_exit("before", "backward")
        out = super().backward(*args)
        self._maybe_exit("after", "backward")
        return out

    def step(self, *args):
        self._maybe_exit("before", "step")
        out = super().step(*args)
        self._maybe_exit("after", "step")
        return out


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, ROWS, (B, M), generator=g), torch.rand(B, M, generator=g)


TARGET = torch.randn(B, DIM, generator=torch.Generator().manual_seed(1))


def _make(name, tmp_path=None, **kw):
    options = dict(checkpoint_root=str(tmp_path), save_every=2) if tmp_path else {}
    return memstore.create_table(
        name,
        ROWS,
        DIM,
        shards=(2, 1),
        seed=SEED,
        optimizer=memstore.Adam(lr=0.05),
        timeout_s=60,
        worker_cls=FaultyShard,
        max_restarts=4,
        **options,
        **kw,
    )


def _train(t, faults: dict | None = None) -> list[int]:
    """Steps 1..STEPS; ``faults[(step, op)] = (block, fault)`` is armed before that call.
    A rollback restarts the loop after the step it reports. Returns the rollbacks."""
    faults = dict(faults or {})
    rolled, step = [], 1
    while step <= STEPS:
        idx, w = _batch(step)
        try:
            _arm(t, faults.pop((step, "lookup"), None))
            y = t.lookup(idx, w)
            _arm(t, faults.pop((step, "backward"), None))
            t.backward(idx, w, (y - TARGET) / B, step=step)
            if not t.config.get("step_on_push"):
                _arm(t, faults.pop((step, "step"), None))
                t.step(step)
        except StoreRolledBack as e:
            rolled.append(e.step)
            step = e.step + 1
            continue
        step += 1
    return rolled


def _arm(t, plan) -> None:
    if plan is not None:
        block, fault, op = plan
        ray.get(t.shards[block].arm.remote(fault, op))


@pytest.fixture(scope="module")
def undisturbed(ray_start_16_cpus) -> dict:
    """The fingerprints of an undisturbed sync run (no checkpoints, no faults): the
    result every disturbed run of a sync table without step_on_push must end at."""
    clean = _make("undisturbed")
    try:
        assert _train(clean) == []
        return clean.fingerprints()
    finally:
        clean.drop()


def test_lost_replies_of_every_data_call_change_nothing(table_names):
    """A reply lost after the call took effect: the handle repeats the call over Ray,
    and a repeated push is answered from the shard's replies, even after its call
    applied the step (step_on_push). Faults on both blocks, on lookups and pushes."""
    options = dict(pushes_per_step=1, step_on_push=True)
    clean = _make(table_names("clean"), **options)
    assert _train(clean) == []
    t = _make(table_names("lossy"), **options)
    t.timeout_s = LOST_REPLY_S
    faults = {
        (1, "lookup"): ((0, 0), "drop", "lookup"),
        (2, "backward"): ((1, 0), "drop", "backward"),
        (3, "backward"): ((0, 0), "drop", "backward"),
        (5, "lookup"): ((1, 0), "drop", "lookup"),
    }
    assert _train(t, faults) == []
    assert sum(ray.get([a.dropped.remote() for a in t.shards.values()])) == len(faults)
    # A lost reply repeats the whole call over Ray: each block answers a push's repeat.
    assert sum(s["replayed_pushes"] for s in t.stats()["shards"]) == 2 * 2
    assert t.fingerprints() == clean.fingerprints()


def test_a_lost_step_reply_applies_the_step_once(table_names, undisturbed):
    """A step's reply lost after the block applied it: the handle repeats the step on
    every block over Ray, and each block answers the repeat with its first reply
    instead of refusing a step it has applied (or applying it twice)."""
    t = _make(table_names("lossy"))
    t.timeout_s = LOST_REPLY_S
    faults = {
        (2, "step"): ((0, 0), "drop", "step"),
        (5, "step"): ((1, 0), "drop", "step"),
    }
    assert _train(t, faults) == []
    assert sum(ray.get([a.dropped.remote() for a in t.shards.values()])) == len(faults)
    assert sum(s["replayed_steps"] for s in t.stats()["shards"]) == 2 * 2
    assert t.fingerprints() == undisturbed


def test_shard_restarts_around_every_data_call_replay_from_the_checkpoint(
    table_names, tmp_path, undisturbed
):
    """A shard exits before or after a lookup or a push; it restarts from the newest
    checkpoint, the handle rolls every block back to the path it reports (pending
    pushes included), and the loop replays from there to the undisturbed result."""
    t = _make(table_names("crashy"), tmp_path / "crashy")
    faults = {
        (3, "backward"): ((0, 0), "exit-after", "backward"),  # checkpoint: step 2
        (4, "lookup"): ((1, 0), "exit-before", "lookup"),  # step 2 again
        (5, "backward"): ((1, 0), "exit-before", "backward"),  # checkpoint: step 4
        (6, "lookup"): ((0, 0), "exit-after", "lookup"),
    }  # step 4 again
    rolled = _train(t, faults)
    assert rolled == [2, 2, 4, 4]
    info = t._call_all("info")
    assert [i["restored_path"] is not None for i in info.values()] == [True, True]
    assert {i["last_step"] for i in info.values()} == {STEPS}
    assert all(s["pending_steps"] == [] for s in t.stats()["shards"])
    assert t.fingerprints() == undisturbed


def test_a_push_from_a_handle_that_missed_a_rollback_is_refused_on_every_block(
    table_names, tmp_path, undisturbed
):
    """Handle A meets a shard restart and rolls the table back; handle B, which has not
    met it, pushes the next step. Every block refuses B's push, the one that did not
    restart included (it carries the old rollback epoch), B learns of the rollback, and
    A's replay from the checkpoint ends exactly where an undisturbed run ends."""
    a = _make(table_names("fenced"), tmp_path / "fenced")
    b = memstore.connect(a.name)
    for step in (1, 2, 3):  # the checkpoint of step 2 is the newest
        idx, w = _batch(step)
        a.backward(idx, w, (a.lookup(idx, w) - TARGET) / B, step=step)
        a.step(step)
    _arm(a, ((0, 0), "exit-before", "lookup"))
    with pytest.raises(StoreRolledBack) as rolled:
        a.lookup(*_batch(4))
    assert rolled.value.step == 2
    idx, w = _batch(3)
    with pytest.raises(StoreRolledBack) as missed:
        b.backward(idx, w, torch.full((B, DIM), 1e3), step=3)
    assert missed.value.step == 2 and b.last_step == 2
    assert all(s["pending_steps"] == [] for s in a.stats()["shards"])
    for step in range(3, STEPS + 1):
        idx, w = _batch(step)
        a.backward(idx, w, (a.lookup(idx, w) - TARGET) / B, step=step)
        a.step(step)
    assert a.fingerprints() == undisturbed
