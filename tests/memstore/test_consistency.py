"""Consistency claims of the distributed table, each checked by value on a real local Ray
instance: validation in the wire dtype, bounded steps, fencing, exactly-once pushes,
refused steps and pushes that change nothing, async staleness and its value math,
create_table that fails without leaving anything behind, a local Ray started on
demand, a silent shard, and the memory budget against a node's Ray memory."""

import os
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
import ray
import torch

import memstore
from memstore import (
    InvalidArgument,
    MemoryBudgetExceeded,
    ShardTable,
    ShardUnavailable,
    StepOutOfOrder,
    TableNotFound,
)
from memstore._internal.shard_actor import ShardWorker
from memstore._internal.validation import MAX_STEPS_AHEAD
from memstore.errors import ShardRestarted
from memstore.table import NAMESPACE

pytestmark = pytest.mark.usefixtures("ray_start_16_cpus")

ROWS, DIM, SEED = 600, 128, 3
HUGE = 1e39  # finite in float64, Inf in float32


def make(name, shards=(2, 1), optimizer=None, **kw):
    return memstore.create_table(
        name,
        ROWS,
        DIM,
        shards=shards,
        seed=SEED,
        timeout_s=60,
        optimizer=optimizer or memstore.Adam(lr=0.05),
        **kw,
    )


def batch(seed: int, B: int = 10, M: int = 6):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, ROWS, (B, M), generator=g)
    return idx, torch.rand(B, M, generator=g), torch.randn(B, DIM, generator=g)


def pending(t) -> list:
    return [s["pending_steps"] for s in t.stats()["shards"]]


def test_values_beyond_float32_are_refused_in_process_and_in_a_grid(table_names):
    """float64 inputs are checked after the cast to float32: 1e39 is finite before it."""
    idx, w, dy = batch(0)
    huge_w = w.double().masked_fill(w > 0.5, HUGE)
    huge_dy = dy.double().masked_fill(dy > 1, HUGE)
    local = ShardTable(ROWS, DIM, seed=SEED)
    t = make(table_names("wire"))
    before_local, before = local.fingerprint(), t.fingerprints()
    for table in (local, t):
        for field, call in [
            ("w", lambda table=table: table.lookup(idx, huge_w)),
            ("w", lambda table=table: table.backward(idx, huge_w, dy, step=1)),
            ("dy", lambda table=table: table.backward(idx, w, huge_dy, step=1)),
        ]:
            with pytest.raises(InvalidArgument) as e:
                call()
            assert e.value.field == field
    assert local.fingerprint() == before_local and local.pending_steps() == []
    assert t.fingerprints() == before and pending(t) == [[], []]
    # The same values in range pass, in float64 as in float32.
    torch.testing.assert_close(t.lookup(idx, w.double()), local.lookup(idx, w))


def test_steps_past_the_window_and_bad_learning_rates_change_nothing(table_names):
    idx, w, dy = batch(1)
    local = ShardTable(ROWS, DIM, seed=SEED)
    t = make(table_names("window"))
    before_local, before = local.fingerprint(), t.fingerprints()
    for table in (local, t):
        with pytest.raises(InvalidArgument, match="at most 2 after") as e:
            table.backward(idx, w, dy, step=MAX_STEPS_AHEAD + 1)
        assert e.value.field == "step"
        for lr in (0.0, -1e-3, float("nan"), float("inf"), True):
            with pytest.raises(InvalidArgument) as e:
                table.backward(idx, w, dy, step=1, lr=lr)
            assert e.value.field == "lr"
    assert local.fingerprint() == before_local and local.pending_steps() == []
    assert t.fingerprints() == before and pending(t) == [[], []]
    with pytest.raises(InvalidArgument) as e:
        t.step(MAX_STEPS_AHEAD + 1)
    assert e.value.field == "step" and t.fingerprints() == before
    # The last step of the window is open.
    t.backward(idx, w, dy, step=MAX_STEPS_AHEAD)
    assert pending(t) == [[MAX_STEPS_AHEAD]] * 2


def test_a_push_that_one_block_refuses_is_withdrawn_from_the_others(table_names):
    """Worker 1's push of step 1 reached block (0, 0) only so far, asking lr 0.1; this
    handle's push of step 1 asks lr 0.2: block (0, 0) refuses it, block (1, 0) took it
    first; afterwards no block holds it."""
    t = make(table_names("retract"))
    idx, w, dy = batch(2)
    other = t.shards[(0, 0)]
    rows = np.array([1, 2], dtype=np.int32)
    ray.get(
        other.backward.remote(
            rows,
            np.ones(2, np.float32),
            np.array([0, 2]),
            np.ones((1, DIM), np.float32),
            1,
            1,
            0.1,
            t._write_fence((0, 0)),  # a write: the incarnation and the rollback epoch
        )
    )
    before = t.fingerprints()
    with pytest.raises(InvalidArgument) as e:
        t.backward(idx, w, dy, step=1, push_id=0, lr=0.2)
    assert e.value.field == "lr"
    assert [ray.get(a.stats.remote())["pending_steps"] for a in t.shards.values()] == [[1], []]
    assert ray.get(other.stats.remote())["pushes"] == 1  # push 1 is still there
    assert t.fingerprints() == before


def test_a_step_before_every_push_arrived_is_refused_and_changes_nothing(table_names):
    t = make(table_names("early"), pushes_per_step=2)
    ref = ShardTable(ROWS, DIM, seed=SEED, optimizer=memstore.Adam(lr=0.05))
    (i0, w0, d0), (i1, w1, d1) = batch(3), batch(4)
    t.backward(i0, w0, d0, step=1, push_id=0)
    before = t.fingerprints()
    with pytest.raises(InvalidArgument, match="2 pushes before step") as e:
        t.step(1)
    assert e.value.field == "step"
    assert t.fingerprints() == before and pending(t) == [[1], [1]]
    t.backward(i1, w1, d1, step=1, push_id=1)
    assert t.step(1) > 0
    ref.backward(i0, w0, d0, step=1, push_id=0)
    ref.backward(i1, w1, d1, step=1, push_id=1)
    ref.step(1)
    torch.testing.assert_close(t.gather(torch.arange(ROWS)), ref.values, rtol=1e-6, atol=1e-7)


def _sgd_push(values: torch.Tensor, idx, w, dy, lr: float) -> torch.Tensor:
    """dw of a push on float64 values, and the SGD update applied in place: each slot
    adds w·dy[b] to its row's gradient."""
    dw = (values[idx] * dy[:, None, :]).sum(-1)
    grad = torch.zeros_like(values)
    grad.index_add_(0, idx.reshape(-1), (w[..., None] * dy[:, None, :]).reshape(-1, DIM))
    values -= lr * grad
    return dw


def test_async_staleness_bound_and_values_against_hand_computed_sgd(table_names):
    lr = 0.5
    t = make(
        table_names("async"),
        shards=(1, 2),
        optimizer=memstore.SGD(lr=lr),
        mode="async",
        max_staleness=1,
    )
    values = t.gather(torch.arange(ROWS)).double()
    for step, push_id, seed in [(3, 0, 5), (3, 1, 6), (2, 0, 7)]:  # lag 0, 0, 1 (= bound)
        idx, w, dy = batch(seed)
        dw = t.backward(idx, w, dy, step=step, push_id=push_id)
        expected = _sgd_push(values, idx, w.double(), dy.double(), lr)
        torch.testing.assert_close(dw.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.gather(torch.arange(ROWS)).double(), values, rtol=1e-5, atol=1e-6)
    before = t.fingerprints()
    idx, w, dy = batch(8)
    with pytest.raises(InvalidArgument, match="steps behind") as e:
        t.backward(idx, w, dy, step=1, push_id=1)  # lag 2: one past the bound
    assert e.value.field == "step"
    with pytest.raises(InvalidArgument, match="ahead") as e:
        t.backward(idx, w, dy, step=3 + MAX_STEPS_AHEAD + 1, push_id=1)
    assert t.fingerprints() == before
    assert [s["staleness_max"] for s in t.stats()["shards"]] == [1, 1]


@pytest.mark.parametrize("path", ["socket", "ray-fallback"])
def test_a_repeated_push_gets_its_first_reply_after_its_step_was_applied(path, table_names):
    """With step_on_push, a push's own call applies its step; a retry of that push (its
    reply was lost) is answered with the same dw and applies nothing again."""
    t = make(table_names("retry"), shards=(1, 2), pushes_per_step=1, step_on_push=True)
    idx, w, dy = batch(9)
    initial = t.fingerprints()
    dw = t.backward(idx, w, dy, step=1)
    applied = t.fingerprints()
    assert applied != initial
    if path == "ray-fallback":
        t._addresses = {b: ("127.0.0.1", 9) for b in t._addresses}  # nobody listens there
    again = t.backward(idx, w, dy, step=1)
    assert torch.equal(again, dw)
    assert t.fingerprints() == applied
    assert [s["replayed_pushes"] for s in t.stats()["shards"]] == [1, 1]
    with pytest.raises(StepOutOfOrder):  # a new push of the applied step is refused
        t.backward(idx, w, dy, step=1, push_id=1)


def test_a_call_for_another_incarnation_is_refused_and_changes_nothing(table_names, tmp_path):
    t = make(table_names("fence"))
    actor = t.shards[(1, 0)]
    before = t.fingerprints()
    rows = np.array([ROWS - 1], dtype=np.int32)
    one = (rows, np.ones(1, np.float32), np.array([0, 1]))
    calls = [
        actor.lookup.remote(*one, "an-earlier-incarnation"),
        actor.backward.remote(*one, np.ones((1, DIM), np.float32), 1, 0, None, "old"),
        actor.step.remote(1, None, None, "old"),
        actor.gather.remote(rows, "old"),
        actor.save.remote(str(tmp_path / "ckpt"), "old"),
    ]
    for ref in calls:
        with pytest.raises(ShardRestarted) as e:
            ray.get(ref)
        assert e.value.shard == "1-0" and e.value.incarnation == t._incarnations[(1, 0)]
    assert t.fingerprints() == before and pending(t) == [[], []]
    assert not (tmp_path / "ckpt").exists()


class FailsToStart(ShardWorker):
    """A shard whose block (1, 0) cannot be built (e.g. its memory cannot be allocated)."""

    def __init__(self, config, r, c):
        if (r, c) == (1, 0):
            raise MemoryError("cannot allocate the block")
        super().__init__(config, r, c)


def _leftovers(name: str) -> dict:
    from ray.util import placement_group_table

    actors = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and a["name"].startswith(f"{name}/")
    ]
    groups = [
        g
        for g in placement_group_table().values()
        if g["name"] == f"memstore/{name}" and g["state"] != "REMOVED"
    ]
    return {"actors": actors, "placement_groups": groups}


def test_create_table_failing_in_a_shard_constructor_leaves_nothing(table_names):
    name = table_names("halfway")
    with pytest.raises(ShardUnavailable, match="creation task"):
        make(name, worker_cls=FailsToStart, max_restarts=0)
    assert _leftovers(name) == {"actors": [], "placement_groups": []}
    with pytest.raises(TableNotFound):
        memstore.connect(name)
    t = make(name)  # the name is free again
    assert t.grid.shape == (2, 1)


def test_create_table_without_room_for_its_shards_leaves_nothing(table_names):
    from ray.util.placement_group import placement_group, remove_placement_group

    name = table_names("noroom")
    hog = placement_group([{"CPU": 15}])  # of the instance's 16 CPUs
    ray.get(hog.ready(), timeout=60)
    try:
        with pytest.raises(ShardUnavailable, match="no room"):
            memstore.create_table(name, ROWS, DIM, shards=2, timeout_s=2)
        assert _leftovers(name) == {"actors": [], "placement_groups": []}
    finally:
        remove_placement_group(hog)
    assert make(name).grid.shape == (2, 1)


def test_create_table_starts_a_local_ray_when_none_is_attached():
    """In a fresh process with no RAY_ADDRESS and its own Ray temp dir (so no cluster of
    this machine can be found), create_table starts a local instance and serves."""
    script = (
        "import ray, torch, memstore\n"
        "assert not ray.is_initialized()\n"
        "t = memstore.create_table('solo', 64, 64, seed=1)\n"
        "assert ray.is_initialized()\n"
        "ref = memstore.ShardTable(64, 64, seed=1)\n"
        "idx, w = torch.tensor([[1, 2], [3, 63]]), torch.rand(2, 2)\n"
        "torch.testing.assert_close(t.lookup(idx, w), ref.lookup(idx, w))\n"
        "print('nodes', len(ray.nodes()), ray.get_runtime_context().gcs_address)\n"
        "t.drop()\n"
        "ray.shutdown()\n"
    )
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    nodes, gcs = out.stdout.split()[-2:]
    assert nodes == "1"
    assert gcs != ray.get_runtime_context().gcs_address  # not this test's instance


class SilentShard(ShardWorker):
    """Alive, but block (0, 1) never answers a lookup, on either path."""

    def __init__(self, config, r, c):
        super().__init__(config, r, c)
        self.never = threading.Event()

    def lookup(self, *args):
        if self.block_id == "0-1":
            self.never.wait(600)
        return super().lookup(*args)


def test_a_shard_alive_but_silent_on_its_data_path_is_unavailable(table_names):
    name = table_names("silent")
    t = memstore.create_table(
        name, ROWS, DIM, shards=(1, 2), seed=SEED, timeout_s=60, worker_cls=SilentShard
    )
    t.timeout_s = 3  # the wait for the silent shard, on the data channel and over Ray
    idx, w, _ = batch(10)
    with pytest.raises(ShardUnavailable) as e:
        t.lookup(idx, w)
    assert e.value.shard == f"{name}/shard-0-1"


def test_memory_budget_against_a_nodes_ray_memory(table_names):
    """A table whose single block (values + Adam's two moments) exceeds the largest
    node's Ray ``memory`` resource is refused with both numbers, before any placement."""
    memory = max(n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"])
    assert memory > 0
    dim = 256
    rows = int(memory // (dim * 4 * 3)) + 1  # one row more than fits
    name = table_names("toobig")
    with pytest.raises(MemoryBudgetExceeded) as e:
        memstore.create_table(name, rows, dim, shards=1, optimizer=memstore.Adam())
    assert e.value.bytes_per_shard == rows * dim * 4 * 3
    assert e.value.budget_bytes == int(memory)
    assert "Ray memory" in str(e.value)
    assert _leftovers(name) == {"actors": [], "placement_groups": []}


class SlowLookupShard(ShardWorker):
    def delay_next_lookup(self, seconds: float) -> None:
        self.data_server.faults.delay_replies("lookup", 1, seconds)


def test_a_lookup_adds_the_row_blocks_in_block_order_whoever_answers_first(table_names):
    """One bag of three slots, one in each of three row blocks, weighted so that the
    float32 sum of the three partial sums depends on their order (1 - 1 + 2^-30 is
    2^-30 in this order and 0 with the first block added last). The first block's
    reply is held back so that it arrives last; the lookup still equals the block-order
    sum, bit for bit, and the lookup of an undisturbed call."""
    t = make(table_names("order"), shards=(3, 1), worker_cls=SlowLookupShard)
    bounds = t.grid.row_bounds
    rows = torch.tensor([bounds[0], bounds[1], bounds[2]])
    v = t.gather(rows)[:, 0].double()
    targets = torch.tensor([1.0, -1.0, 2.0**-30], dtype=torch.float64)
    w = (targets / v).float()
    q = w * v.float()  # each block's partial sum in column 0, as float32
    in_block_order = ((torch.zeros(()) + q[0]) + q[1]) + q[2]
    first_block_last = ((torch.zeros(()) + q[1]) + q[2]) + q[0]
    assert in_block_order != first_block_last  # the order matters for these weights
    undisturbed = t.lookup(rows[None], w[None])
    ray.get(t.shards[(0, 0)].delay_next_lookup.remote(0.5))
    held_back = t.lookup(rows[None], w[None])
    assert held_back[0, 0] == in_block_order
    assert torch.equal(held_back, undisturbed)
