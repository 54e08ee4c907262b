"""16 gRPC readers and one gRPC writer on loopback for a bounded number of steps: every
read that says it saw whole steps equals the in-process reference table at those steps,
and no write is lost or doubled."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import memstore
import memstore.server as ms
from memstore.client import MemoryClient

from .grpc_util import ADMIN, READER, TOKENS

ROWS, DIM, SEED, STEPS, READERS = 512, 8, 21, 12, 16
BOUNDARY = ROWS // 2  # the (2, 1) grid: rows [0, 256) on shard 0-0, the rest on 1-0


def reference():
    return memstore.ShardTable(ROWS, DIM, optimizer=memstore.SGD(lr=0.5), seed=SEED)


@pytest.fixture(scope="module")
def loaded(ray_start_16_cpus):
    memstore.create_table(
        "load-t", ROWS, DIM, shards=(2, 1), seed=SEED, optimizer=memstore.SGD(lr=0.5)
    )
    server = ms.start(ms.ServerOptions(address="127.0.0.1:0", tokens=TOKENS, threads=17))
    yield server.address
    server.stop()
    memstore.drop_table("load-t")


def _writer(address, snapshots: dict, done: threading.Event, errors: list):
    rng = np.random.default_rng(0)
    ref = reference()
    snapshots[0] = ref.gather(torch.arange(ROWS)).numpy()
    try:
        with MemoryClient(address, token=ADMIN) as c:
            for s in range(1, STEPS + 1):
                idx = rng.integers(0, ROWS, (32, 4))
                w = rng.random((32, 4), dtype=np.float32)
                dy = rng.standard_normal((32, DIM)).astype(np.float32)
                c.apply_gradients("load-t", idx, w, dy, step=s, push_id=0)
                c.step("load-t", s)
                ref.backward(
                    torch.from_numpy(idx), torch.from_numpy(w), torch.from_numpy(dy), step=s
                )
                ref.step(s)
                snapshots[s] = ref.gather(torch.arange(ROWS)).numpy()
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(e)
    finally:
        done.set()


def _reader(address, seed: int, done: threading.Event, seen: list, errors: list):
    rng = np.random.default_rng(seed)
    try:
        with MemoryClient(address, token=READER) as c:
            while not done.is_set():
                rows = rng.integers(0, ROWS, 24)
                values, s = c.gather("load-t", rows, with_seen=True)
                seen.append(("gather", rows, None, values, s))
                idx = rng.integers(0, ROWS, (6, 3))
                w = rng.random((6, 3), dtype=np.float32)
                y, s = c.lookup("load-t", idx, w, with_seen=True)
                seen.append(("lookup", idx, w, y, s))
    except Exception as e:  # noqa: BLE001
        errors.append(e)


def _expected(kind, rows, w, snapshots, s):
    """The answer from the reference values of each row's shard at its step (float64)."""
    steps = np.where(np.asarray(rows) < BOUNDARY, s.shard_steps["0-0"], s.shard_steps["1-0"])
    values = np.stack([snapshots[int(t)][r] for t, r in zip(steps.ravel(), np.ravel(rows))])
    if kind == "gather":
        return values
    values = values.reshape(*rows.shape, DIM).astype(np.float64)
    return np.einsum("bm,bmd->bd", w.astype(np.float64), values)


@pytest.mark.timeout(300)
def test_concurrent_readers_and_writer_agree_with_the_reference(loaded):
    snapshots, done, errors = {}, threading.Event(), []
    seen = [[] for _ in range(READERS)]
    threads = [
        threading.Thread(target=_reader, args=(loaded, i, done, seen[i], errors))
        for i in range(READERS)
    ]
    threads.append(threading.Thread(target=_writer, args=(loaded, snapshots, done, errors)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    checked = 0
    for kind, rows, w, answer, s in (x for per_reader in seen for x in per_reader):
        assert set(s.shard_steps.values()) <= set(snapshots)
        if s.consistent:
            np.testing.assert_allclose(
                answer, _expected(kind, rows, w, snapshots, s), rtol=1e-5, atol=1e-6
            )
            checked += 1
    assert checked >= READERS
    # Every push applied exactly once: the table equals the reference after all steps.
    with MemoryClient(loaded, token=READER) as c:
        final, s = c.gather("load-t", np.arange(ROWS), with_seen=True)
        shards = c.stats("load-t")["shards"]
    assert s.shard_steps == {"0-0": STEPS, "1-0": STEPS}
    np.testing.assert_allclose(final, snapshots[STEPS], rtol=1e-6, atol=1e-7)
    assert [(x["pushes"], x["duplicate_pushes"]) for x in shards] == [(STEPS, 0)] * 2
