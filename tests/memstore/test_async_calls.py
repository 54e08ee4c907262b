"""Async lookups and pushes (``Table.lookup_async``, ``Table.backward_async``) on a real
local Ray instance: over the data channel and over Ray, their results are those of the
blocking calls and of a float64 computation of the table's arithmetic; ``step`` waits
for the pushes of its step; a shard that dies while a future is in flight fails the
future as it fails the blocking call, and the replay ends where an undisturbed run
ends; bad input raises at the call.
"""

import pickle

import numpy as np
import pytest
import ray
import torch

import memstore
from memstore import InvalidArgument, StepOutOfOrder, StoreRolledBack
from tests.memstore.test_faults import FaultyShard

pytestmark = pytest.mark.usefixtures("ray_start_16_cpus")

ROWS, DIM, B, M, SEED, LR = 256, 128, 8, 4, 11, 0.5
STEPS = 5
TARGET = torch.randn(B, DIM, generator=torch.Generator().manual_seed(3))


def _batch(step: int, part: int = 0):
    g = torch.Generator().manual_seed(1000 * part + step)
    return torch.randint(0, ROWS, (B, M), generator=g), torch.rand(B, M, generator=g)


def _values(t) -> np.ndarray:
    """The whole table in float64."""
    return t.gather(torch.arange(ROWS)).double().numpy()


def _lookup64(values: np.ndarray, idx, w) -> np.ndarray:
    return np.einsum("bm,bmd->bd", w.double().numpy(), values[idx.numpy()])


def _sgd64(values: np.ndarray, pushes: list) -> np.ndarray:
    """One SGD step over the summed row gradients of ``pushes`` [(idx, w, dy)]."""
    grad = np.zeros_like(values)
    for idx, w, dy in pushes:
        contributions = w.double().numpy()[:, :, None] * dy.double().numpy()[:, None, :]
        np.add.at(grad, idx.numpy().reshape(-1), contributions.reshape(-1, DIM))
    return values - LR * grad


def _sgd_table(name, data_channel="socket"):
    return memstore.create_table(
        name,
        ROWS,
        DIM,
        shards=(2, 2),
        seed=SEED,
        optimizer=memstore.SGD(lr=LR),
        data_channel=data_channel,
        timeout_s=60,
    )


@pytest.mark.parametrize("data_channel", ["socket", "ray"])
def test_async_calls_equal_the_blocking_calls_and_float64(table_names, data_channel):
    """Four lookups in flight at once; two async pushes (one without dw) and the step
    that waits for them; a blocking twin table fed the blocking calls."""
    t = _sgd_table(table_names("async"), data_channel)
    twin = _sgd_table(table_names("blocking"), data_channel)
    assert t.fingerprints() == twin.fingerprints()
    for step in (1, 2):
        values = _values(t)
        batches = [_batch(step, part) for part in range(4)]
        looked = [t.lookup_async(idx, w) for idx, w in batches]  # all four in flight
        for (idx, w), future in zip(batches, looked):
            y = future.result(timeout=60)
            assert torch.equal(y, twin.lookup(idx, w))
            np.testing.assert_allclose(y.numpy(), _lookup64(values, idx, w), rtol=1e-5, atol=1e-6)
        pushes = [(idx, w, (looked[p].result() - TARGET) / B) for p, (idx, w) in enumerate(batches)]
        pushed = [
            t.backward_async(*pushes[0], step=step, push_id=0),
            t.backward_async(*pushes[1], step=step, push_id=1, need_dw=False),
        ]
        t.step(step)  # waits for both pushes
        assert all(future.done() for future in pushed)
        dw = twin.backward(*pushes[0], step=step, push_id=0)
        twin.backward(*pushes[1], step=step, push_id=1)
        twin.step(step)
        assert torch.equal(pushed[0].result(), dw)
        dw64 = np.einsum("bmd,bd->bm", values[pushes[0][0].numpy()], pushes[0][2].double().numpy())
        np.testing.assert_allclose(dw.numpy(), dw64, rtol=1e-5, atol=1e-6)
        assert pushed[1].result() is None
        np.testing.assert_allclose(_values(t), _sgd64(values, pushes[:2]), rtol=1e-5, atol=1e-6)
        assert t.fingerprints() == twin.fingerprints()
    copy = pickle.loads(pickle.dumps(t))  # a handle with calls behind it still pickles
    idx, w = _batch(9)
    assert torch.equal(copy.lookup_async(idx, w).result(timeout=60), twin.lookup(idx, w))


def test_a_prefetched_lookup_reads_one_step_of_the_table(table_names):
    """Issued after step(s) returned, a lookup reads s on every block. Issued before a
    push of s that step(s) waits for, it reads s - 1 (the handle's calls run in the
    order issued). Issued after the pushes but before step(s), it reads s - 1 or s, the
    same step on every block, and its values are those of that step."""
    t = _sgd_table(table_names("prefetch"))
    idx, w = _batch(7)
    history = {0: _values(t)}
    for step in range(1, STEPS + 1):
        before_push = t.lookup_async(idx, w)
        dy = torch.randn(B, DIM, generator=torch.Generator().manual_seed(step))
        t.backward_async(idx, w, dy, step=step, need_dw=False)
        before_step = t.lookup_async(idx, w)  # runs before or after the step
        t.step(step)
        y = before_step.result(timeout=60)
        read = set(t.last_read_steps.values())  # the last read run: before_step's
        history[step] = _values(t)
        assert len(read) == 1 and read <= {step - 1, step}
        np.testing.assert_allclose(
            y.numpy(), _lookup64(history[read.pop()], idx, w), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            before_push.result().numpy(),
            _lookup64(history[step - 1], idx, w),
            rtol=1e-5,
            atol=1e-6,
        )
        late = t.lookup_async(idx, w).result(timeout=60)
        assert set(t.last_read_steps.values()) == {step}
        np.testing.assert_allclose(
            late.numpy(), _lookup64(history[step], idx, w), rtol=1e-5, atol=1e-6
        )


def test_bad_input_raises_at_the_call_and_changes_nothing(table_names):
    t = _sgd_table(table_names("bad"))
    before = t.fingerprints()
    idx, w = _batch(1)
    dy = torch.zeros(B, DIM)
    calls = {
        "idx": lambda: t.lookup_async(idx + ROWS, w),
        "w": lambda: t.lookup_async(idx, w[:, :2]),
        "dy": lambda: t.backward_async(idx, w, dy[:, :3], step=1),
        "need_dw": lambda: t.backward_async(idx, w, dy, step=1, need_dw="no"),
        "lr": lambda: t.backward_async(idx, w, dy, step=1, lr=-1.0),
    }
    for field, call in calls.items():
        with pytest.raises(InvalidArgument) as bad:
            call()
        assert bad.value.field == field
    with pytest.raises(StepOutOfOrder):
        t.backward_async(idx, w, dy, step=0)
    assert t._pushes == {}  # nothing issued: step has no push of these to wait for
    assert t.fingerprints() == before


def test_a_timeout_set_on_the_handle_reaches_its_open_data_channel(table_names):
    t = _sgd_table(table_names("timeout"))
    idx, w = _batch(1)
    t.lookup(idx, w)  # opens the data channel with the table's 60 s
    t.timeout_s = 7.5
    assert t._data_channel().timeout_s == 7.5  # a lost reply now fails after 7.5 s


# ---- a shard dying while a future is in flight --------------------------------------
def _faulty_table(name, root):
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
        checkpoint_root=str(root),
        save_every=2,
    )


def _arm(t, plan) -> None:
    if plan is not None:
        block, fault, op = plan
        ray.get(t.shards[block].arm.remote(fault, op))


def _train(t, faults: dict, blocking: bool) -> list[int]:
    """Steps 1..STEPS towards TARGET, with blocking calls or with two lookups in flight
    and a push without dw that only ``step`` waits for; ``faults[(step, op)]`` is armed
    before that call. A rollback restarts the loop after the step it reports."""
    faults = dict(faults)
    rolled, step = [], 1
    while step <= STEPS:
        idx, w = _batch(step)
        try:
            _arm(t, faults.pop((step, "lookup"), None))
            y = t.lookup(idx, w) if blocking else _both(t, idx, w)
            _arm(t, faults.pop((step, "backward"), None))
            if blocking:
                t.backward(idx, w, (y - TARGET) / B, step=step)
            else:
                t.backward_async(idx, w, (y - TARGET) / B, step=step, need_dw=False)
            t.step(step)
        except StoreRolledBack as e:
            rolled.append(e.step)
            step = e.step + 1
            continue
        step += 1
    return rolled


def _both(t, idx, w) -> torch.Tensor:
    """Two equal lookups in flight together: the one result, or, when the first meets a
    restarted shard, the rollback both raise (the second is never sent)."""
    with t._lock:  # holds the I/O thread back: both are issued before either runs
        futures = [t.lookup_async(idx, w) for _ in range(2)]
    errors = [future.exception(timeout=120) for future in futures]
    if any(errors):
        assert all(isinstance(e, StoreRolledBack) for e in errors), errors
        assert len({e.step for e in errors}) == 1
        raise errors[0]
    assert torch.equal(futures[0].result(), futures[1].result())
    return futures[0].result()


def test_a_shard_dying_under_futures_fails_them_as_it_fails_blocking_calls(table_names, tmp_path):
    """A shard exits while an async lookup (a second one queued behind it) or an async
    push is in flight: the futures raise StoreRolledBack of the step the blocking calls
    report under the same faults, and both runs replay to the undisturbed result."""
    faults = {
        (3, "lookup"): ((0, 0), "exit-before", "lookup"),  # checkpoint: step 2
        (5, "backward"): ((1, 0), "exit-after", "backward"),  # checkpoint: step 4
    }
    clean = _faulty_table(table_names("clean"), tmp_path / "clean")
    assert _train(clean, {}, blocking=True) == []
    blocking = _faulty_table(table_names("blocking"), tmp_path / "blocking")
    assert _train(blocking, faults, blocking=True) == [2, 4]
    futures = _faulty_table(table_names("async"), tmp_path / "async")
    assert _train(futures, faults, blocking=False) == [2, 4]
    assert all(s["pending_steps"] == [] for s in futures.stats()["shards"])
    assert futures.fingerprints() == clean.fingerprints() == blocking.fingerprints()
