"""The trainer's Engram prefetch (``model.engram_prefetch``): the lookups of a batch issued
before its forward, the pushes issued without waiting. On a local ShardTable and on a
2-shard store table over one real local Ray instance: the losses and values equal the
blocking path's; every prefetched read sees the values of the step before its own,
checked against a plain torch SGD of the pushed row gradients; a failed prefetched
lookup raises what the blocking lookup raises.
"""

from __future__ import annotations

import pytest
import torch

import memstore
from memstore import MemstoreError, ShardUnavailable
from memstore.trainer.model import table_specs
from memstore.trainer.replica import Replica
from tests.local_ray import local_ray
from tests.memstore.test_faults import FaultyShard

from .helpers import config
from .test_engram_model import TEXT

STEPS = 5
SGD_LR = 0.5
TABLE = "engram.0"


@pytest.fixture(scope="module")
def ray_local():
    with local_ray(num_cpus=4) as ray:
        yield ray


@pytest.fixture
def store_tables(ray_local):
    """Make 2-shard store tables of the tiny model's Engram table; dropped after the test."""
    made = []

    def make(args, optimizer, step_on_push: bool, **options) -> memstore.Table:
        rows, dim = table_specs(args.model_args(256))[TABLE]
        made.append(f"prefetch-{len(made)}")
        return memstore.create_table(
            made[-1],
            rows,
            dim,
            shards=2,
            optimizer=optimizer,
            seed=args.seed,  # as the local table of the Engram layer after layer 0
            pushes_per_step=1,
            step_on_push=step_on_push,
            timeout_s=60,
            **options,
        )

    yield make
    for name in made:
        try:
            memstore.drop_table(name)
        except MemstoreError:
            pass  # a test killed one of its shards


def tiny(tmp_path, *overrides: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 30, encoding="utf-8")
    return config(
        "text-small-engram",
        tmp_path,
        "workers=0",
        f"data.path={corpus}",
        "data.seq_len=16",
        "model.dim=16",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.max_seq_len=16",
        "model.engram_rows=67",
        "batch_size=4",
        f"steps={STEPS}",
        "warmup=1",
        "eval_every=0",
        "checkpoint_every=0",
        *overrides,
    )


def local_table(args, optimizer) -> memstore.ShardTable:
    rows, dim = table_specs(args.model_args(256))[TABLE]
    return memstore.ShardTable(rows, dim, optimizer=optimizer, seed=args.seed)


def train(args, table) -> tuple[Replica, list[float]]:
    """STEPS steps of a replica over ``table``, stepped as ``run_steps`` steps it (a
    ``step_on_push`` table applies each step with its push)."""
    replica = Replica(args, tables={TABLE: table})
    losses = []
    for step in range(1, STEPS + 1):
        losses.append(replica.train_step(step)["loss"])
        if not (isinstance(table, memstore.Table) and table.config.get("step_on_push")):
            table.step(step)
    return replica, losses


def values(table) -> torch.Tensor:
    return table.gather(torch.arange(table.rows))


def test_prefetch_equals_the_blocking_path_on_a_local_table(tmp_path):
    args = tiny(tmp_path)
    blocking_args = tiny(tmp_path, "model.engram_prefetch=false")
    blocking = local_table(args, memstore.Adam(lr=args.value_lr))
    prefetched = local_table(args, memstore.Adam(lr=args.value_lr))
    lookups = []
    lookup = prefetched.lookup
    prefetched.lookup = lambda idx, w: lookups.append(idx) or lookup(idx, w)
    replica, losses = train(args, prefetched)
    assert len(lookups) == STEPS  # the prefetches: the forward took their values
    plain, want = train(blocking_args, blocking)
    assert replica.prefetch and not replica.lookahead and not plain.prefetch
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), rtol=1e-6, atol=0)
    torch.testing.assert_close(values(prefetched), values(blocking), rtol=1e-6, atol=1e-7)
    assert not torch.equal(values(prefetched), values(local_table(args, memstore.Adam())))


@pytest.mark.parametrize("step_on_push", [False, True], ids=["separate-step", "step-on-push"])
def test_prefetch_on_a_store_table_equals_the_blocking_local_path(
    tmp_path, store_tables, step_on_push
):
    """The store table with prefetch (with ``step_on_push``, a one-batch lookahead)
    against the blocking path on a local table of the same initial values."""
    args = tiny(tmp_path)
    table = store_tables(args, memstore.Adam(lr=args.value_lr), step_on_push)
    blocking = local_table(args, memstore.Adam(lr=args.value_lr))
    assert torch.equal(values(table), values(blocking))
    replica, losses = train(args, table)
    _, want = train(tiny(tmp_path, "model.engram_prefetch=false"), blocking)
    assert replica.prefetch and replica.lookahead == step_on_push
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), rtol=1e-5, atol=0)
    torch.testing.assert_close(values(table), values(blocking), rtol=1e-5, atol=1e-6)


def _record(replica: Replica, table, monkeypatch) -> tuple[list, list]:
    """The fetches the replica makes, in order (one per step), and the pushes the
    Engram layer sends, as (step, rows, row gradients)."""
    fetches, pushes = [], []
    prefetch = replica.model.prefetch_engram

    def record_fetch(tokens):
        fetches.append(prefetch(tokens)[0])
        return {0: fetches[-1]}

    name = "backward_async" if isinstance(table, memstore.Table) else "backward"
    push = getattr(table, name)

    def record_push(idx, w, dy, step=None, **kwargs):
        pushes.append((step, idx[:, 0].clone(), dy.detach().clone()))
        return push(idx, w, dy, step=step, **kwargs)

    monkeypatch.setattr(replica.model, "prefetch_engram", record_fetch)
    monkeypatch.setattr(table, name, record_push)
    return fetches, pushes


@pytest.mark.parametrize("kind", ["local", "store-separate-step", "store-step-on-push"])
def test_a_prefetched_read_sees_the_step_before_its_own(tmp_path, store_tables, monkeypatch, kind):
    """SGD on the table, replayed in plain torch from the pushed row gradients: the
    fetch of step s reads the values after step s - 1 exactly, which differ from those
    before it (a read one step stale fails)."""
    args = tiny(tmp_path, f"value_lr={SGD_LR}")  # constant value lr: each push's lr
    if kind == "local":
        table = local_table(args, memstore.SGD(lr=SGD_LR))
    else:
        table = store_tables(args, memstore.SGD(lr=SGD_LR), kind == "store-step-on-push")
    reference = values(table).double()
    replica = Replica(args, tables={TABLE: table})
    assert replica.lookahead == (kind == "store-step-on-push")
    fetches, pushes = _record(replica, table, monkeypatch)
    for step in range(1, STEPS + 1):
        replica.train_step(step)
        if kind != "store-step-on-push":
            table.step(step)
    assert len(fetches) == STEPS and [p[0] for p in pushes] == list(range(1, STEPS + 1))
    before = None
    for fetch, (_, rows, dy) in zip(fetches, pushes):
        read = fetch.values.result().double()
        idx = fetch.rows.idx[:, 0]
        torch.testing.assert_close(read, reference[idx], rtol=1e-6, atol=1e-7)
        if before is not None:
            assert (read - before[idx]).abs().max() > 1e-3  # step s - 1 moved these rows
        before = reference.clone()
        reference.index_add_(0, rows, -SGD_LR * dy.double())
    torch.testing.assert_close(values(table).double(), reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", ["lookup", "backward"])
def test_a_failed_prefetched_call_raises_the_blocking_calls_error(tmp_path, store_tables, op):
    """Twin tables whose second row block exits at its next lookup (a separate-step
    table) or push (a step-on-push table, read a step ahead), never restarted: the step
    with prefetch raises what the blocking step raises, from the same shard."""
    import ray

    errors = []
    for prefetch in ("true", "false"):
        args = tiny(tmp_path / prefetch, f"model.engram_prefetch={prefetch}")
        table = store_tables(
            args,
            memstore.Adam(lr=args.value_lr),
            op == "backward",
            worker_cls=FaultyShard,
            max_restarts=0,
        )
        replica = Replica(args, tables={TABLE: table})
        replica.train_step(1)
        if op == "lookup":
            table.step(1)
        ray.get(table.shards[(1, 0)].arm.remote("exit-before", op))
        if op == "lookup":  # the forward alone raises: the values are never used
            tokens = replica.data.global_batch(2).inputs
            fetch = replica.model.prefetch_engram(tokens) if replica.prefetch else None
            with pytest.raises(MemstoreError) as failed:
                replica.model(tokens, engram=fetch)
            errors.append((table.name, failed.value))
        with pytest.raises(MemstoreError) as failed:
            replica.train_step(2)
        if op == "backward":
            errors.append((table.name, failed.value))
    (prefetch_name, prefetched), (blocking_name, blocking) = errors
    assert type(prefetched) is type(blocking) is ShardUnavailable
    assert (prefetched.shard, blocking.shard) == (
        f"{prefetch_name}/shard-1-0",
        f"{blocking_name}/shard-1-0",
    )
