"""The distributed table on a real local Ray instance: routing, consistency,
checkpoints, faults, memory budget and input validation.

Every grid, both data channels, 2 workers × 3 shards, published-key queries and
checkpoints loaded into other grids are compared with one local ShardTable of the same
seed trained on the same batches; a killed shard rolls the table back, one that stays
down is unavailable; bad input names the field and changes no shard (a fingerprint of
every block before and after).
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import ray
import torch
import torch.nn.functional as F

import memstore
from memstore import (
    Adam,
    InvalidArgument,
    MemoryBudgetExceeded,
    MemoryLayer,
    MemoryLayerArgs,
    ShardTable,
    ShardUnavailable,
    StepOutOfOrder,
    StoreRolledBack,
    TableNotFound,
)

pytestmark = pytest.mark.usefixtures("ray_start_16_cpus")

ROWS, DIM, LR, SEED = 3000, 128, 0.05, 7


def make(name, shards, **kw):
    return memstore.create_table(
        name, ROWS, DIM, shards=shards, optimizer=Adam(lr=LR), seed=SEED, timeout_s=120, **kw
    )


def local():
    return ShardTable(ROWS, DIM, optimizer=Adam(lr=LR), seed=SEED)


def batch(B=13, M=9):
    idx = torch.randint(0, ROWS, (B, M))
    idx[0] = 5  # every slot of token 0 on one row, so on one row block
    idx[1, :4] = idx[1, 4]  # duplicates inside a bag
    idx[2] = torch.arange(ROWS - M, ROWS)  # a token whose slots all sit in the last block
    return idx, torch.rand(B, M), torch.randn(B, DIM)


def all_rows(table) -> torch.Tensor:
    return table.gather(torch.arange(ROWS)).float()


@pytest.mark.parametrize("shards", [1, 2, (3, 1), (2, 2)])
def test_every_grid_equals_one_local_table(shards, table_names):
    t, ref = make(table_names("grid"), shards), local()
    for step in (1, 2, 3):
        idx, w, dy = batch()
        torch.testing.assert_close(t.lookup(idx, w), ref.lookup(idx, w), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            t.backward(idx, w, dy, step=step),
            ref.backward(idx, w, dy, step=step),
            rtol=1e-5,
            atol=1e-5,
        )
        assert t.step(step) > 0
        ref.step(step)
    torch.testing.assert_close(all_rows(t), ref.values, rtol=1e-5, atol=1e-6)
    stats = t.stats()
    assert len(stats["shards"]) == (shards if isinstance(shards, int) else shards[0] * shards[1])
    assert stats["bytes"] == ref.nbytes()


def test_connect_from_another_driver_sees_the_same_table(table_names):
    name = table_names("shared")
    t = make(name, 2)
    idx, w, dy = batch()
    t.backward(idx, w, dy, step=1)
    t.step(1)
    expected = float(t.lookup(idx[:1], w[:1]).sum())
    script = (
        "import torch, ray, memstore\n"
        "ray.init(address='auto', log_to_driver=False)\n"
        f"t = memstore.connect({name!r})\n"
        f"y = t.lookup(torch.tensor({idx[:1].tolist()}), torch.tensor({w[:1].tolist()}))\n"
        "print(float(y.sum()))\n"
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-6)


VALUE_OPTIMIZER = memstore.SGD(lr=0.5)


class TrainerWorker:
    """One data-parallel rank: a MemoryLayer whose values live in the store."""

    def __init__(self, args: dict, table: str | None, push_id: int, seed: int):
        torch.manual_seed(seed)
        if table is None:
            a = MemoryLayerArgs(**args)
            value_table = ShardTable(a.n_keys**2, a.value_dim, optimizer=VALUE_OPTIMIZER, seed=SEED)
        else:
            value_table = memstore.connect(table, push_id=push_id)
        self.layer = MemoryLayer(MemoryLayerArgs(**args), table=value_table)
        self.head = torch.nn.Linear(args["dim"], 4)
        self.params = [*self.layer.parameters(), *self.head.parameters()]
        # SGD on both sides: Adam's first steps behave like sign(g), which would turn
        # the last-bit differences of a different summation order into lr-sized ones.
        self.opt = torch.optim.SGD(self.params, lr=0.1)

    def forward_backward(self, step, x, y, weight):
        self.layer.step = step
        loss = F.cross_entropy(self.head(self.layer(x)), y) * weight
        self.opt.zero_grad()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in self.params]

    def apply(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = g
        self.opt.step()

    def keys(self):
        return self.layer.keys.detach().clone()


def test_two_workers_and_three_shards_train_like_one_process(table_names):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    args = dict(dim=16, heads=2, k=4, n_keys=16, key_dim=8, value_lr=0.05, seed=SEED)
    name = table_names("dp")
    table = memstore.create_table(
        name,
        256,
        16,
        shards=3,
        optimizer=VALUE_OPTIMIZER,
        seed=SEED,
        pushes_per_step=2,
        timeout_s=120,
    )
    workers = [ray.remote(TrainerWorker).remote(args, name, rank, 0) for rank in range(2)]
    single = TrainerWorker(args, None, 0, 0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    for step in range(1, 21):
        rows = torch.randint(0, 64, (16,))
        halves = [(x[rows[:8]], y[rows[:8]]), (x[rows[8:]], y[rows[8:]])]
        results = ray.get(
            [w.forward_backward.remote(step, hx, hy, 0.5) for w, (hx, hy) in zip(workers, halves)]
        )
        grads = [a + b for a, b in zip(results[0][1], results[1][1])]
        ray.get([w.apply.remote(grads) for w in workers])
        table.step(step)
        loss, dense = single.forward_backward(None, x[rows], y[rows], 1.0)
        single.apply(dense)
        single.layer.table.step(step)
        assert results[0][0] + results[1][0] == pytest.approx(loss, abs=1e-5)
    torch.testing.assert_close(ray.get(workers[0].keys.remote()), single.keys(), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        table.gather(torch.arange(256)), single.layer.table.values, atol=1e-5, rtol=0
    )


def train(table, steps, first=1):
    gen = torch.Generator().manual_seed(11)
    for step in range(first, first + steps):
        idx = torch.randint(0, ROWS, (13, 9), generator=gen)
        w, dy = torch.rand(13, 9, generator=gen), torch.randn(13, DIM, generator=gen)
        table.backward(idx, w, dy, step=step)
        table.step(step)


def test_checkpoint_of_four_shards_loads_into_one_and_three(tmp_path, table_names):
    t = make(table_names("ckpt"), (2, 2))
    train(t, 2)
    path = t.save(tmp_path / "ckpt")
    assert sorted(os.listdir(path))[-1] == "manifest.json"
    idx, w, dy = batch()
    expected = t.lookup(idx, w)
    for shards in (1, (3, 1)):  # blocks of other rows and columns than the saved ones
        loaded = memstore.load_table(path, table_names("loaded"), shards=shards, timeout_s=120)
        assert loaded.last_step == 2
        torch.testing.assert_close(loaded.lookup(idx, w), expected, rtol=1e-6, atol=1e-6)
        train(loaded, 1, first=3)
    train(t, 1, first=3)
    for name in ("loaded-1", "loaded-2"):
        torch.testing.assert_close(
            all_rows(memstore.connect(name)), all_rows(t), rtol=1e-6, atol=1e-6
        )


def test_periodic_save_writes_under_the_checkpoint_root(tmp_path, table_names):
    t = make(table_names("periodic"), 2, checkpoint_root=str(tmp_path), save_every=2)
    train(t, 3)
    assert memstore.checkpoint.latest_checkpoint(tmp_path).endswith("step-000000002")


def test_a_killed_shard_restarts_and_the_table_rolls_back(tmp_path, table_names):
    t = make(table_names("crash"), (2, 1), checkpoint_root=str(tmp_path), max_restarts=2)
    ref = local()
    train(t, 2)
    train(ref, 2)
    t.save()
    train(t, 1, first=3)  # a step after the checkpoint, lost in the crash
    pid = ray.get(t.shards[(1, 0)].info.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    idx, w, _ = batch()
    with pytest.raises(StoreRolledBack) as e:
        for _ in range(50):  # the next call that reaches the dead shard raises
            t.lookup(idx, w)
            time.sleep(0.2)
    assert e.value.step == 2
    torch.testing.assert_close(all_rows(t), ref.values)  # no post-crash rows survive
    train(t, 1, first=3)
    train(ref, 1, first=3)
    torch.testing.assert_close(all_rows(t), ref.values, rtol=1e-6, atol=1e-6)


def test_a_shard_that_stays_down_is_unavailable_not_a_hang(table_names):
    t = memstore.create_table(
        table_names("down"), ROWS, DIM, shards=2, max_restarts=0, timeout_s=120
    )
    t.timeout_s = 15  # how long the handle waits for the dead shard
    os.kill(ray.get(t.shards[(0, 1)].info.remote())["pid"], signal.SIGKILL)
    idx, w, _ = batch()
    with pytest.raises(ShardUnavailable, match="shard-0-1"):
        for _ in range(50):
            t.lookup(idx, w)
            time.sleep(0.2)


def test_memory_budget_refuses_a_grid_and_auto_shards_fit_it(table_names):
    whole = ROWS * DIM * 4 * 3  # values + Adam's two moments
    with pytest.raises(MemoryBudgetExceeded) as e:
        make(table_names("budget"), 2, max_shard_bytes=whole // 4)
    assert e.value.bytes_per_shard == whole // 2 and e.value.budget_bytes == whole // 4
    t = make(table_names("auto"), "auto", max_shard_bytes=whole // 4)
    assert t.grid.shape[0] * t.grid.shape[1] >= 4
    ref = local()
    train(t, 2)
    train(ref, 2)
    torch.testing.assert_close(all_rows(t), ref.values, rtol=1e-6, atol=1e-6)


BAD_CALLS = [
    ("idx", lambda t, i, w, d: t.lookup(i.float(), w)),
    ("idx", lambda t, i, w, d: t.lookup(i - ROWS, w)),
    ("idx", lambda t, i, w, d: t.backward(i + ROWS, w, d, step=2)),
    ("w", lambda t, i, w, d: t.lookup(i, w[:, :2])),
    ("w", lambda t, i, w, d: t.backward(i, w.masked_fill(w > 0.5, float("nan")), d, step=2)),
    ("dy", lambda t, i, w, d: t.backward(i, w, d.masked_fill(d > 1, float("inf")), step=2)),
    ("dy", lambda t, i, w, d: t.backward(i, w, d[:, :5], step=2)),
    ("step", lambda t, i, w, d: t.backward(i, w, d, step=1)),
    ("step", lambda t, i, w, d: t.step(1)),
    ("rows", lambda t, i, w, d: t.gather(torch.tensor([ROWS]))),
]


def test_bad_input_names_the_field_and_changes_no_shard(table_names):
    t = make(table_names("bad"), (2, 2))
    train(t, 1)
    idx, w, dy = batch()
    before = t.fingerprints()
    for field, call in BAD_CALLS:
        with pytest.raises(InvalidArgument) as e:
            call(t, idx, w, dy)
        assert e.value.field == field
    assert isinstance(pytest.raises(StepOutOfOrder, t.step, 1).value, InvalidArgument)
    assert t.fingerprints() == before
    with pytest.raises(TableNotFound):
        memstore.connect("no-such-table")


def test_async_mode_applies_on_arrival_once_and_bounds_staleness(table_names):
    t = make(table_names("async"), 2, mode="async", max_staleness=1)
    idx, w, dy = batch()
    before = t.lookup(idx, w)
    t.backward(idx, w, dy, step=1)
    after = t.lookup(idx, w)
    assert not torch.allclose(before, after)
    prints = t.fingerprints()
    t.backward(idx, w, dy, step=1)  # a retried push
    assert t.fingerprints() == prints
    t.backward(idx, w, dy, step=3, push_id=1)
    with pytest.raises(InvalidArgument, match="steps behind"):
        t.backward(idx, w, dy, step=1, push_id=2)
    assert t.stats()["shards"][0]["staleness_max"] == 0


def brute_force_query(q, keys, values, k):
    """Oracle of a product-key query, in float64: every pair (i, j) of sub-keys scored
    as <q's first half, keys[h, 0, i]> + <q's second half, keys[h, 1, j]> at row i·n + j,
    the k best per head, and the rows they name summed with the softmax of their scores
    over each head's k."""
    B, H, _ = q.shape
    n = keys.shape[2]
    q, keys, values = q.double(), keys.double(), values.double()
    indices = torch.empty(B, H, k, dtype=torch.int64)
    scores = torch.empty(B, H, k, dtype=torch.float64)
    y = torch.zeros(B, values.shape[1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            first, second = q[b, h].chunk(2)
            pairs = (keys[h, 0] @ first)[:, None] + (keys[h, 1] @ second)[None, :]
            best = sorted(range(n * n), key=lambda r: -float(pairs[r // n, r % n]))[:k]
            indices[b, h] = torch.tensor(best)
            scores[b, h] = torch.stack([pairs[r // n, r % n] for r in best])
            y[b] += (torch.softmax(scores[b, h], 0)[:, None] * values[best]).sum(0)
    return indices, scores, y


def test_published_keys_answer_queries_without_the_model(table_names):
    n, H, half = 16, 2, 4
    t = memstore.create_table(table_names("query"), n * n, 64, seed=SEED, timeout_s=120)
    keys = torch.randn(H, 2, n, half)
    t.publish_keys(keys)
    q = torch.randn(5, H, 2 * half)
    idx, scores, y = t.query(q, k=6)
    # The rows' values are the table's initial ones, which the seed fixes.
    values = ShardTable(n * n, 64, seed=SEED).values
    ref_idx, ref_scores, ref_y = brute_force_query(q, keys, values, 6)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgument) as e:
        t.publish_keys(torch.randn(H, 2, n + 1, half))
    assert e.value.field == "keys"
    for bad, field in [
        (dict(q=torch.randn(5, H + 1, 2 * half)), "q"),
        (dict(q=torch.full((5, H, 2 * half), float("nan"))), "q"),
        (dict(q=q, k=0), "k"),
        (dict(q=q, k=n * n + 1), "k"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            t.query(**bad)
        assert e.value.field == field
    # A restarted catalog starts without keys; the shards' copies refill it.
    ray.kill(t._catalog(), no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            again = memstore.connect(t.name)
            break
        except Exception:  # noqa: BLE001 - restarting
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert ray.get(again._catalog().get_keys.remote()) is None  # restarted, empty
    assert torch.equal(again.query(q, k=6)[0], ref_idx)
    assert ray.get(t._catalog().get_keys.remote()) is not None


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(shards=17), "shards"),  # 17 shards x 1 CPU on a 16-CPU instance
        (dict(shards=(2, 3)), "shards"),  # 3 column blocks of 128 columns < 64 each
        (dict(shards=2, threads_per_shard=0), "threads_per_shard"),
        (dict(shards=2, mode="eventual"), "mode"),
        (dict(shards=2, dtype="float16"), "dtype"),
        (dict(shards="auto"), "shards"),  # auto needs max_shard_bytes
        (dict(shards=2, data_channel="tcp"), "data_channel"),
        (dict(shards=2, step_on_push=True), "step_on_push"),  # needs pushes_per_step
        (dict(shards=2, step_on_push=True, pushes_per_step=2, mode="async"), "step_on_push"),
        (dict(shards=2, device="cuda"), "device"),  # no GPU in this instance: refused at once
        (dict(shards=2, device="tpu"), "device"),
        (dict(shards=2, cpus_per_shard=0), "cpus_per_shard"),
        (dict(shards=(4, 1), cpus_per_shard=4.5), "shards"),  # 18 of 16 CPUs
    ],
)
def test_create_table_validates_options_before_placing_anything(options, field, table_names):
    name = table_names("opts")
    with pytest.raises(InvalidArgument) as e:
        memstore.create_table(name, ROWS, DIM, **options)
    assert e.value.field == field
    with pytest.raises(TableNotFound):
        memstore.connect(name)


def test_without_a_checkpoint_a_restart_resets_every_shard(table_names):
    t = make(table_names("nockpt"), (2, 1), max_restarts=2)
    train(t, 2)
    os.kill(ray.get(t.shards[(0, 0)].info.remote())["pid"], signal.SIGKILL)
    idx, w, _ = batch()
    with pytest.raises(StoreRolledBack) as e:
        for _ in range(50):
            t.lookup(idx, w)
            time.sleep(0.2)
    assert e.value.step == 0
    torch.testing.assert_close(all_rows(t), local().values)  # both blocks back at the start


@pytest.mark.parametrize("channel", ["socket", "ray"])
def test_both_data_channels_answer_like_a_local_table(channel, table_names):
    t, ref = make(table_names("chan"), (2, 2), data_channel=channel), local()
    train(t, 2)
    train(ref, 2)
    idx, w, dy = batch()
    torch.testing.assert_close(t.lookup(idx, w), ref.lookup(idx, w), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        t.backward(idx, w, dy, step=3), ref.backward(idx, w, dy, step=3), rtol=1e-5, atol=1e-5
    )
    opened = t._channel is not None and len(t._channel.socks) == 4
    assert opened == (channel == "socket")
    with pytest.raises(InvalidArgument) as e:  # a shard's own error crosses the channel
        t.backward(idx, w, dy, step=3, push_id=-1)
    assert e.value.field == "push_id"


def test_a_broken_data_connection_falls_back_to_ray(table_names):
    t, ref = make(table_names("fallback"), 2), local()
    train(t, 1)
    train(ref, 1)
    with socket.socket() as s:  # an address where nobody listens
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()
    t._addresses[(0, 1)] = dead
    idx, w, _ = batch()
    torch.testing.assert_close(t.lookup(idx, w), ref.lookup(idx, w), rtol=1e-5, atol=1e-6)


def test_step_on_push_applies_a_step_with_its_last_push(tmp_path, table_names):
    t = make(table_names("onpush"), 2, pushes_per_step=2, step_on_push=True)
    other = memstore.connect(t.name)  # a handle that never calls step
    ref = local()
    idx, w, dy = batch()
    before = t.fingerprints()
    t.backward(idx[:6], w[:6], dy[:6], step=1, push_id=0)
    assert t.fingerprints() == before  # one push of two: nothing applied yet
    t.backward(idx[6:], w[6:], dy[6:], step=1, push_id=1)
    ref.backward(idx[:6], w[:6], dy[:6], step=1, push_id=0)
    ref.backward(idx[6:], w[6:], dy[6:], step=1, push_id=1)
    ref.step(1)
    torch.testing.assert_close(all_rows(t), ref.values, rtol=1e-6, atol=1e-6)
    assert t.step(1) == 0  # already applied: step only confirms it
    assert t.last_step == 1
    path = other.save(tmp_path / "ckpt")
    assert memstore.checkpoint.read_manifest(path)["step"] == 1


def test_cpus_per_shard_is_the_reservation_of_each_shard(table_names):
    """A fractional reservation lets more shards than CPUs share a machine."""
    from ray.util import placement_group_table

    name = table_names("cpus")
    t = memstore.create_table(name, ROWS, DIM, shards=(2, 1), cpus_per_shard=0.25, seed=SEED)
    group = next(
        g
        for g in placement_group_table().values()
        if g["name"] == f"memstore/{name}" and g["state"] == "CREATED"
    )
    assert [b["CPU"] for b in group["bundles"].values()] == [0.25, 0.25]
    idx, w, _ = batch()
    torch.testing.assert_close(t.lookup(idx, w), local().lookup(idx, w), rtol=1e-5, atol=1e-6)


def test_pushes_grouped_once_by_the_client_train_like_a_local_table(table_names):
    """The column blocks take the client's grouping of the pushed slots (over Ray)."""
    t, ref = make(table_names("grouped"), (2, 2), data_channel="ray"), local()
    t._group_slots = True
    for step in (1, 2):
        idx, w, dy = batch()
        torch.testing.assert_close(
            t.backward(idx, w, dy, step=step),
            ref.backward(idx, w, dy, step=step),
            rtol=1e-5,
            atol=1e-5,
        )
        t.step(step)
        ref.step(step)
    torch.testing.assert_close(all_rows(t), ref.values, rtol=1e-5, atol=1e-6)


def brute_force_topk(q, keys, k):
    """Top-k of every one of the n² product keys' scores, computed in full (float64)."""
    H, _, n, half = keys.shape
    q, keys = q.double(), keys.double()
    first = torch.einsum("bhd,hnd->bhn", q[..., :half], keys[:, 0])
    second = torch.einsum("bhd,hnd->bhn", q[..., half:], keys[:, 1])
    scores = (first[..., :, None] + second[..., None, :]).flatten(2)
    return scores.topk(k, dim=-1)


def test_a_query_after_keys_are_published_again_uses_the_new_keys(table_names):
    n, half = 16, 4
    t = memstore.create_table(table_names("requery"), n * n, 64, shards=2, seed=SEED, timeout_s=120)
    other = memstore.connect(t.name)
    gen = torch.Generator().manual_seed(SEED)
    first, second = (
        torch.randn(2, 2, n, half, generator=gen),
        torch.randn(2, 2, n, half, generator=gen),
    )
    wider = torch.randn(3, 2, n, half, generator=gen)
    q = torch.randn(5, 2, 2 * half, generator=gen)
    t.publish_keys(first)
    assert torch.equal(t.query(q, k=6)[0], brute_force_topk(q, first, 6).indices)
    assert torch.equal(other.query(q, k=6)[0], brute_force_topk(q, first, 6).indices)
    other.publish_keys(second)  # t still holds the first keys; the shards tell it
    idx, scores, _ = t.query(q, k=6)
    ref = brute_force_topk(q, second, 6)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(scores.double(), ref.values, rtol=1e-5, atol=1e-5)
    assert set(t.last_read_steps) == {"0-0", "1-0"}
    other.publish_keys(wider)  # three heads: a q of three heads fits only the new keys
    q3 = torch.randn(4, 3, 2 * half, generator=gen)
    assert torch.equal(t.query(q3, k=5)[0], brute_force_topk(q3, wider, 5).indices)
    t.publish_keys(first)
    assert torch.equal(other.query(q, k=6)[0], brute_force_topk(q, first, 6).indices)


def test_concurrent_creates_of_one_name_leave_exactly_one_table(table_names, monkeypatch):
    """Two create_table calls for one name, both past the existence check before either
    places anything: one creates the table, the other raises TableExists, and the
    loser's failure removes nothing of the winner's (its shards still answer)."""
    import threading

    import memstore.api

    name = table_names("race")
    both_checked = threading.Barrier(2, timeout=60)
    check = memstore.api.raise_if_exists

    def check_then_wait(n):
        check(n)
        both_checked.wait()

    monkeypatch.setattr(memstore.api, "raise_if_exists", check_then_wait)
    outcomes = [None, None]

    def create(i):
        try:
            outcomes[i] = memstore.create_table(name, ROWS, DIM, shards=(2, 1), seed=SEED)
        except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
            outcomes[i] = e

    threads = [threading.Thread(target=create, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    tables = [o for o in outcomes if isinstance(o, memstore.Table)]
    errors = [o for o in outcomes if not isinstance(o, memstore.Table)]
    assert len(tables) == 1 and len(errors) == 1
    assert isinstance(errors[0], memstore.TableExists)
    idx = torch.randint(0, ROWS, (4, 3), generator=torch.Generator().manual_seed(SEED))
    w = torch.ones(4, 3)
    rows = ShardTable(ROWS, DIM, seed=SEED).gather(idx.flatten()).reshape(4, 3, DIM)
    torch.testing.assert_close(memstore.connect(name).lookup(idx, w), rows.sum(1))
