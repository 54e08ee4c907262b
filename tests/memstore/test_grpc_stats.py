"""Row statistics and sparse steps over gRPC (a real server on 127.0.0.1, real Ray).

Stats with ``rows`` answers the same tf, df and steps as the table handle, in pages
that fit the reply (refused, naming row_count, when a page would not); Step with a row
budget updates the rows one in-process table chooses; ApplyGradients with a budget
makes a sparse push on an async table. Every bad field is refused with
INVALID_ARGUMENT naming it, and changes nothing in any shard; scopes hold (Stats with
rows is a read, Step and ApplyGradients writes).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

import memstore
import memstore.server as ms
from memstore.client import MemoryClient
from memstore.errors import RemoteError
from memstore.v1 import memstore_pb2 as pb

from .grpc_util import ADMIN, READER, TOKENS, auth, code_of, stub, tensor

ROWS, DIM, SEED, B, M = 1024, 16, 5, 8, 6
MAX_ROWS = 300  # rows of tf and df one reply of this server holds
MESSAGE_BYTES = (64 << 10) + 16 * MAX_ROWS
PRETRAIN, TOP_T = 3, 11


def _push(k: int, push_id: int = 0):
    g = torch.Generator().manual_seed(100 * k + push_id)
    # Rows from a narrow range, so that pushes share rows and df varies.
    idx = torch.randint(0, 96, (B, M), generator=g) * 7 % ROWS
    return idx, torch.rand(B, M, generator=g) + 0.1, torch.randn(B, DIM, generator=g)


@pytest.fixture(scope="module")
def served(ray_start_16_cpus):
    kw = {"seed": SEED, "optimizer": memstore.Adam(lr=0.05), "cpus_per_shard": 0.25}
    sync = memstore.create_table("grpc-rows", ROWS, DIM, shards=(2, 1), **kw)
    asynchronous = memstore.create_table("grpc-rows-async", ROWS, DIM, shards=2, mode="async", **kw)
    reference = memstore.ShardTable(ROWS, DIM, optimizer=memstore.Adam(lr=0.05), seed=SEED)
    for s in range(1, PRETRAIN + 1):
        for t in (sync, reference):
            for p in (0, 1):
                t.backward(*_push(s, p), step=s, push_id=p)
            t.step(s)
        asynchronous.backward(*_push(s), step=s)
    for t in (sync, reference, asynchronous):
        t.snapshot_stats("pre")
    server = ms.start(
        ms.ServerOptions(
            address="127.0.0.1:0",
            tokens=TOKENS,
            max_message_bytes=MESSAGE_BYTES,
        )
    )
    yield sync, asynchronous, reference, server
    server.stop()
    memstore.drop_table("grpc-rows")
    memstore.drop_table("grpc-rows-async")


@pytest.fixture
def client(served):
    with MemoryClient(served[3].address, token=ADMIN, max_message_bytes=MESSAGE_BYTES) as c:
        yield c


def _same_stats(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["tf"], b["tf"])
    np.testing.assert_array_equal(a["df"], b["df"])
    assert a["steps"] == b["steps"]


def test_stats_pages_the_row_statistics_of_the_table(served):
    sync, _, reference, server = served
    with MemoryClient(server.address, token=READER) as reader:  # a read
        page = reader.stats("grpc-rows", rows=True, row_start=500, row_count=MAX_ROWS)
        rs = page["row_stats"]
        assert (rs["row_start"], rs["table_rows"], rs["max_rows"]) == (500, ROWS, MAX_ROWS)
        want = reference.row_stats()
        np.testing.assert_array_equal(rs["df"], want["df"][500 : 500 + MAX_ROWS])
        assert rs["df"].sum() > 0 and rs["tf"].dtype == np.int64
        _same_stats(reader.row_stats("grpc-rows"), sync.row_stats())
        _same_stats(reader.row_stats("grpc-rows"), want)
        _same_stats(reader.row_stats("grpc-rows", "pre"), reference.row_stats("pre"))
        assert "row_stats" not in reader.stats("grpc-rows")


@pytest.mark.parametrize(
    "request_kw, field",
    [
        ({"rows": True}, "row_count"),  # all 1024 rows: more than a reply holds
        ({"rows": True, "row_count": MAX_ROWS + 1}, "row_count"),
        ({"rows": True, "row_start": ROWS}, "row_start"),
        ({"rows": True, "row_start": -1, "row_count": 1}, "row_start"),
        ({"rows": True, "row_start": 1000, "row_count": 25}, "row_count"),
        ({"rows": True, "row_count": 0}, "row_count"),
        ({"rows": True, "row_count": 5, "background": "nope"}, "background"),
        ({"background": "pre"}, "rows"),
        ({"row_count": 5}, "rows"),
    ],
)
def test_bad_row_stats_requests_are_refused_naming_the_field(served, request_kw, field):
    channel, s = stub(served[3].address)
    with channel:
        code, details = code_of(
            s.Stats, pb.StatsRequest(table="grpc-rows", **request_kw), metadata=auth(READER)
        )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{field}:" in details, details


def _changed(before: torch.Tensor, after) -> np.ndarray:
    return torch.nonzero((before != torch.as_tensor(after)).any(1)).flatten().numpy()


def test_step_with_a_row_budget_updates_the_rows_one_table_chooses(served, client):
    sync, _, reference, _ = served
    step = PRETRAIN + 1
    for t in (sync, reference):
        for p in (0, 1):
            t.backward(*_push(step, p), step=step, push_id=p)
    chosen, _ = reference.top_rows(step, TOP_T, "pre")
    before = sync.gather(torch.arange(ROWS))
    assert client.step("grpc-rows", step, top_t=TOP_T, background="pre") == TOP_T
    reference.step(step, top_t=TOP_T, background="pre")
    after = client.gather("grpc-rows", np.arange(ROWS))
    np.testing.assert_array_equal(_changed(before, after), np.sort(chosen))
    np.testing.assert_allclose(after, reference.values.numpy(), rtol=1e-6, atol=1e-7)
    step += 1
    for t in (sync, reference):
        t.backward(*_push(step), step=step)
    explicit = np.unique(_push(step)[0].numpy())[::3]
    assert client.step("grpc-rows", step, rows=explicit) == len(explicit)
    reference.step(step, rows=torch.from_numpy(explicit))
    np.testing.assert_allclose(
        client.gather("grpc-rows", np.arange(ROWS)), reference.values.numpy(), rtol=1e-6, atol=1e-7
    )


def test_bad_step_budgets_are_refused_and_change_nothing(served):
    sync, _, _, server = served
    step = max(sh["last_step"] for sh in sync.stats()["shards"]) + 1  # Step went over gRPC
    sync.backward(*_push(50), step=step)
    before, stats = sync.fingerprints(), sync.row_stats()
    rows = np.array([1, 2], np.int64)
    channel, s = stub(server.address)
    with channel:
        for kw, field in [
            ({"top_t": 0}, "top_t"),
            ({"top_t": -3}, "top_t"),
            ({"rows": tensor(np.array([0, ROWS], np.int64))}, "rows"),
            ({"rows": tensor(np.array([1.0], np.float32))}, "rows"),
            ({"rows": tensor(np.zeros((2, 2), np.int64))}, "rows"),
            ({"rows": tensor(rows), "top_t": 2}, "top_t"),
            ({"background": "pre"}, "background"),
            ({"top_t": 2, "background": "nope"}, "background"),
        ]:
            code, details = code_of(
                s.Step, pb.StepRequest(table="grpc-rows", step=step, **kw), metadata=auth(ADMIN)
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT, kw
            assert details.startswith((f"{field}:", f"{field}.")), (kw, details)
            assert sync.fingerprints() == before
            _same_stats(sync.row_stats(), stats)
        code, details = code_of(
            s.Step,
            pb.StepRequest(table="grpc-rows", step=step, top_t=2),
            metadata=auth(READER),
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "write" in details
    assert sync.fingerprints() == before
    sync.step(step, top_t=2)  # the step is still there


def test_apply_gradients_with_a_budget_is_a_sparse_push_on_an_async_table(served, client):
    _, asynchronous, _, _ = served
    k = PRETRAIN + 1
    idx, w, dy = _push(k)
    mirror = memstore.ShardTable(ROWS, DIM, optimizer=memstore.Adam(lr=0.05), seed=SEED)
    for s in range(1, k):
        mirror.backward(*_push(s), step=s)
        mirror.step(s)
    mirror.snapshot_stats("pre")
    mirror.backward(idx, w, dy, step=k)
    chosen, _ = mirror.top_rows(k, 5, "pre")
    mirror.step(k, top_t=5, background="pre")
    before = asynchronous.gather(torch.arange(ROWS))
    client.apply_gradients(
        "grpc-rows-async", idx.numpy(), w.numpy(), dy.numpy(), step=k, top_t=5, background="pre"
    )
    after = client.gather("grpc-rows-async", np.arange(ROWS))
    np.testing.assert_array_equal(_changed(before, after), np.sort(chosen))
    np.testing.assert_allclose(after, mirror.values.numpy(), rtol=1e-6, atol=1e-7)
    # A sync table stepped by Step refuses a budget on its pushes; nothing changes.
    sync = served[0]
    before = sync.fingerprints()
    with pytest.raises(RemoteError) as e:
        client.apply_gradients(
            "grpc-rows", idx.numpy(), w.numpy(), dy.numpy(), step=sync.last_step + 9, top_t=2
        )
    assert e.value.code == "INVALID_ARGUMENT" and "top_t:" in str(e.value)
    assert sync.fingerprints() == before
    assert sync.stats()["shards"][0]["pending_steps"] == []


def test_tagged_pushes_over_grpc_count_documents(served, client, table_names):
    table = memstore.create_table(
        table_names("grpc-docs"), ROWS, DIM, shards=2, seed=SEED, cpus_per_shard=0.25
    )
    idx, w, dy = _push(70)
    tags = np.array([4, 4, 9, 9, 9, 2, 2, 4])
    client.apply_gradients(table.name, idx.numpy(), w.numpy(), dy.numpy(), step=1, doc_ids=tags)
    client.step(table.name, 1)
    df = np.zeros(ROWS, dtype=np.int64)
    for r in range(ROWS):
        df[r] = len({int(tags[b]) for b in range(B) if r in idx[b].tolist()})
    stats = client.row_stats(table.name)
    assert stats["steps"] == 3
    np.testing.assert_array_equal(stats["df"], df)
    for bad in (np.array([1, 2]), np.full(B, -1)):
        with pytest.raises(RemoteError) as e:
            client.apply_gradients(
                table.name, idx.numpy(), w.numpy(), dy.numpy(), step=2, doc_ids=bad
            )
        assert e.value.code == "INVALID_ARGUMENT" and e.value.details.startswith("doc_ids")
    assert table.stats()["shards"][0]["pending_steps"] == []
