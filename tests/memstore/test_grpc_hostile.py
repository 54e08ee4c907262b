"""Malformed requests: each is answered with the status and field it deserves, the
server keeps serving, and no shard changes (fingerprints before and after)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memstore
import memstore.server as ms
from memstore.v1 import memstore_pb2 as pb

from .grpc_util import TOKENS, auth, code_of, stub, tensor

ROWS, DIM = 256, 8  # 16 x 16 product keys
LIMIT = 1 << 20
C = grpc.StatusCode


@pytest.fixture(scope="module")
def hostile(ray_start_16_cpus):
    table = memstore.create_table("hostile", ROWS, DIM, shards=2, seed=11)
    table.backward(torch.tensor([[1, 2]]), torch.ones(1, 2), torch.ones(1, DIM), step=1)
    table.step(1)  # the table is at step 1: steps 0 and 1 are from the past
    server = ms.start(
        ms.ServerOptions(address="127.0.0.1:0", tokens=TOKENS, max_message_bytes=LIMIT)
    )
    channel, s = stub(server.address)
    yield table, s
    channel.close()
    server.stop()
    memstore.drop_table("hostile")


I64 = np.zeros((2, 3), np.int64)
F32 = np.ones((2, 3), np.float32)
DY = np.ones((2, DIM), np.float32)
NAN = np.full((2, 3), np.nan, np.float32)


def lookup(idx=None, w=None, table="hostile"):
    return "Lookup", pb.LookupRequest(
        table=table, idx=tensor(I64) if idx is None else idx, w=tensor(F32) if w is None else w
    )


def push(step=2, push_id=0, dy=None, lr=None, **kw):
    request = pb.ApplyGradientsRequest(
        table="hostile",
        idx=tensor(I64),
        w=tensor(F32),
        dy=tensor(DY) if dy is None else dy,
        step=step,
        push_id=push_id,
        **kw,
    )
    if lr is not None:
        request.lr = lr
    return "ApplyGradients", request


def query(q=None, k=4):
    return "Query", pb.QueryRequest(
        table="hostile", k=k, q=tensor(np.ones((2, 2, 8), np.float32)) if q is None else q
    )


CASES = {
    "unknown dtype": (lookup(idx=tensor(I64, dtype=99)), C.INVALID_ARGUMENT, "idx.dtype"),
    "float indices": (lookup(idx=tensor(F32)), C.INVALID_ARGUMENT, "idx.dtype"),
    "shape vs bytes": (lookup(idx=tensor(I64, shape=[2, 4])), C.INVALID_ARGUMENT, "idx.data"),
    "negative dim": (lookup(idx=tensor(I64, shape=[-2, -3])), C.INVALID_ARGUMENT, "idx.shape"),
    "huge dims": (
        lookup(idx=tensor(I64, shape=[1 << 40, 1 << 40])),
        C.INVALID_ARGUMENT,
        "idx.shape",
    ),
    "product overflow": (
        lookup(idx=tensor(I64, shape=[1 << 30, 1 << 30])),
        C.INVALID_ARGUMENT,
        "idx.data",
    ),
    "wrong rank": (lookup(idx=tensor(I64, shape=[6])), C.INVALID_ARGUMENT, "idx.shape"),
    "index too large": (lookup(idx=tensor(np.full((2, 3), ROWS))), C.INVALID_ARGUMENT, "idx"),
    "negative index": (lookup(idx=tensor(np.full((2, 3), -1))), C.INVALID_ARGUMENT, "idx"),
    "NaN weights": (lookup(w=tensor(NAN)), C.INVALID_ARGUMENT, "w"),
    "Inf weights": (lookup(w=tensor(np.full((2, 3), np.inf, np.float32))), C.INVALID_ARGUMENT, "w"),
    "w shape": (lookup(w=tensor(np.ones((3, 2), np.float32))), C.INVALID_ARGUMENT, "w"),
    "empty tensor": (lookup(idx=tensor(np.zeros((0, 3), np.int64))), C.INVALID_ARGUMENT, "idx"),
    "missing tensor": (
        ("Lookup", pb.LookupRequest(table="hostile", idx=tensor(I64))),
        C.INVALID_ARGUMENT,
        "w",
    ),
    "unknown table": (lookup(table="nope"), C.NOT_FOUND, "nope"),
    "no table name": (lookup(table=""), C.INVALID_ARGUMENT, "table"),
    "bad table name": (lookup(table="a/b"), C.INVALID_ARGUMENT, "table"),
    "gather out of range": (
        ("Gather", pb.GatherRequest(table="hostile", rows=tensor(np.array([ROWS])))),
        C.INVALID_ARGUMENT,
        "rows",
    ),
    "keys not published": (query(), C.FAILED_PRECONDITION, "keys"),
    "push from the past": (push(step=1), C.FAILED_PRECONDITION, "step"),
    "push of step 0": (push(step=0), C.FAILED_PRECONDITION, "step"),
    "negative step": (push(step=-4), C.INVALID_ARGUMENT, "step"),
    "NaN dy": (push(dy=tensor(np.full((2, DIM), np.nan, np.float32))), C.INVALID_ARGUMENT, "dy"),
    "dy shape": (push(dy=tensor(np.ones((2, DIM + 1), np.float32))), C.INVALID_ARGUMENT, "dy"),
    "negative push id": (push(push_id=-1), C.INVALID_ARGUMENT, "push_id"),
    "NaN lr": (push(lr=float("nan")), C.INVALID_ARGUMENT, "lr"),
    "negative lr": (push(lr=-0.1), C.INVALID_ARGUMENT, "lr"),
    "step from the past": (
        ("Step", pb.StepRequest(table="hostile", step=1)),
        C.FAILED_PRECONDITION,
        "step",
    ),
    "step without pushes": (
        ("Step", pb.StepRequest(table="hostile", step=2, pushes_per_step=1)),
        C.INVALID_ARGUMENT,
        "step",
    ),
    "keys shape": (
        (
            "PublishKeys",
            pb.PublishKeysRequest(table="hostile", keys=tensor(np.ones((2, 2, 15, 4), np.float32))),
        ),
        C.INVALID_ARGUMENT,
        "keys",
    ),
    "NaN keys": (
        (
            "PublishKeys",
            pb.PublishKeysRequest(
                table="hostile", keys=tensor(np.full((2, 2, 16, 4), np.nan, np.float32))
            ),
        ),
        C.INVALID_ARGUMENT,
        "keys",
    ),
    "save without a save root": (
        ("Save", pb.SaveRequest(table="hostile", path="x")),
        C.FAILED_PRECONDITION,
        "path",
    ),
    "oversized message": (
        lookup(idx=tensor(np.zeros((LIMIT // 8, 2), np.int64))),
        C.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
}


def test_every_malformed_request_is_refused_and_changes_nothing(hostile):
    table, s = hostile
    before = table.fingerprints()
    for name, ((method, request), code, field) in CASES.items():
        got, details = code_of(getattr(s, method), request, metadata=auth(), timeout=60)
        assert (got, field in details) == (code, True), (name, got, details)
    assert table.fingerprints() == before
    valid = s.Lookup(lookup()[1], metadata=auth(), timeout=60)  # still serving
    assert list(valid.y.shape) == [2, DIM]


def test_query_arguments_once_keys_are_published(hostile):
    table, s = hostile
    table.publish_keys(torch.randn(2, 2, 16, 4))
    before = table.fingerprints()
    for (method, request), field in (
        (query(k=0), "k"),
        (query(k=ROWS + 1), "k"),
        (query(q=tensor(np.ones((2, 3, 8), np.float32))), "q"),
        (query(q=tensor(np.full((1, 2, 8), np.inf, np.float32))), "q"),
    ):
        got, details = code_of(getattr(s, method), request, metadata=auth(), timeout=60)
        assert (got, field in details) == (C.INVALID_ARGUMENT, True), (request, details)
    assert table.fingerprints() == before


DTYPES = st.sampled_from(
    [0, pb.FLOAT32, pb.FLOAT64, pb.INT32, pb.INT64, pb.BFLOAT16, pb.FLOAT16, 7, 1000]
)
DIMS = st.one_of(st.integers(-3, 6), st.integers(-(1 << 62), 1 << 62))


@st.composite
def tensors(draw):
    shape = draw(st.lists(DIMS, max_size=4))
    data = draw(
        st.one_of(
            st.binary(max_size=96),
            st.builds(lambda a: a.tobytes(), st.just(np.ones(6, np.float32))),
        )
    )
    return pb.Tensor(dtype=draw(DTYPES), shape=shape, data=data)


@st.composite
def requests(draw):
    table = draw(st.sampled_from(["hostile", "", "nope", "x" * 300]))
    kind = draw(st.sampled_from(["Lookup", "Gather", "Query", "ApplyGradients", "PublishKeys"]))
    t = lambda: draw(tensors())  # noqa: E731 - one draw per call
    if kind == "Lookup":
        return kind, pb.LookupRequest(table=table, idx=t(), w=t())
    if kind == "Gather":
        return kind, pb.GatherRequest(table=table, rows=t())
    if kind == "Query":
        return kind, pb.QueryRequest(table=table, q=t(), k=draw(st.integers(-5, 300)))
    if kind == "PublishKeys":  # shapes never fit the table's 16 keys: refused
        keys = t()
        if len(keys.shape) == 4 and keys.shape[2] == 16:
            keys.shape[2] = 15
        return kind, pb.PublishKeysRequest(table=table, keys=keys)
    # steps 0 and 1 are applied: a push that passes every other check is still refused
    return kind, pb.ApplyGradientsRequest(
        table=table,
        idx=t(),
        w=t(),
        dy=t(),
        step=draw(st.integers(-3, 1)),
        push_id=draw(st.integers(-3, 3)),
    )


@pytest.mark.timeout(240)
def test_fuzzed_requests_get_a_client_error_status(hostile):
    table, s = hostile
    before = table.fingerprints()
    allowed = {C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED}

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(requests())
    def check(case):
        method, request = case
        got, details = code_of(getattr(s, method), request, metadata=auth(), timeout=60)
        assert got in allowed or (got == C.OK and method in ("Lookup", "Gather", "Query")), (
            got,
            details,
        )

    check()
    assert table.fingerprints() == before
    assert list(s.Lookup(lookup()[1], metadata=auth(), timeout=60).y.shape) == [2, DIM]
