"""The gRPC edge under hostile callers: calls that never send a body hold nothing,
every method bounds its work before a shard is called, tokens are scoped per table
and per verb, deadlines hold on the server, the detached server's tokens stay off
Ray, and tokens never go in clear beyond loopback."""

from __future__ import annotations

import gc
import logging
import threading

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import memstore
import memstore.server as ms
from memstore._internal.grpc_auth import Grant, parse_tokens
from memstore.cli import build_parser
from memstore.client import MemoryClient
from memstore.v1 import memstore_pb2 as pb

from .grpc_util import ADMIN, READER, TOKENS, WRITER, auth, code_of, stub, tensor

C = grpc.StatusCode
N, DIM, WIDE = 16, 8, 1024  # "edge": N² rows x DIM; "wide": N² rows x WIDE
LIMIT = 1 << 20  # the server's message limit: a Gather reply holds 1 MiB / (4 x WIDE) rows
ONLY_EDGE = "only-edge-token-" + "e" * 20  # read, table "edge" only
EDGE_WRITER = "edge-writer-token-" + "x" * 20  # read and write, table "edge" only
SCOPED = {
    **TOKENS,
    ONLY_EDGE: Grant(frozenset({"read"}), frozenset({"edge"})),
    EDGE_WRITER: Grant(frozenset({"read", "write"}), frozenset({"edge"})),
}


@pytest.fixture(scope="module")
def edge(ray_start_16_cpus):
    table = memstore.create_table(
        "edge", N * N, DIM, shards=2, seed=3, max_batch=512, max_pairs=4096
    )
    table.publish_keys(torch.randn(2, 2, N, 4, generator=torch.Generator().manual_seed(0)))
    wide = memstore.create_table("wide", N * N, WIDE, shards=2, seed=4)
    server = ms.start(
        ms.ServerOptions(address="127.0.0.1:0", tokens=SCOPED, max_message_bytes=LIMIT)
    )
    yield {"edge": table, "wide": wide, "address": server.address}
    server.stop()
    memstore.drop_table("edge")
    memstore.drop_table("wide")


def _query(table="edge", batch=1, k=4) -> pb.QueryRequest:
    q = np.random.default_rng(batch).standard_normal((batch, 2, 8)).astype(np.float32)
    return pb.QueryRequest(table=table, q=tensor(q), k=k, return_values=True)


# ---- calls that send headers and never a body ----------------------------------------
def _headers_only(channel, method: str, metadata, release: threading.Event):
    """A call of ``method`` whose request stream never yields: the client sends the
    HTTP/2 headers (path and metadata) and then nothing until ``release``."""

    def never():
        release.wait()
        return
        yield  # a generator that yields nothing

    call = channel.stream_unary(method)
    return call.future(never(), metadata=metadata, timeout=120)


def test_calls_without_a_body_hold_no_worker(edge):
    """32 unauthenticated calls (no token, a wrong token) and 16 authenticated ones
    send headers and no body: the unauthenticated are refused without their body, and
    health checks and valid queries are answered while all of them are open."""
    release = threading.Event()
    attackers = [grpc.insecure_channel(edge["address"]) for _ in range(4)]
    lookup = "/memstore.v1.MemoryStore/Lookup"
    held = []
    try:
        for i in range(48):
            metadata = [(), auth("x" * 40), auth(READER)][i % 3]
            held.append((metadata, _headers_only(attackers[i % 4], lookup, metadata, release)))
        refused = [f for m, f in held if m != auth(READER)]
        for future in refused:  # answered while their body has still not been sent
            assert future.exception(timeout=60).code() == C.UNAUTHENTICATED
        assert not release.is_set()
        with grpc.insecure_channel(edge["address"]) as channel:
            probe = health_pb2_grpc.HealthStub(channel)
            reply = probe.Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            answer = stub(edge["address"])[1].Query(_query(), metadata=auth(READER), timeout=60)
            assert list(answer.indices.shape) == [1, 2, 4]
        assert not any(f.done() for m, f in held if m == auth(READER))  # still open
    finally:
        release.set()
        for _, future in held:
            future.cancel()
        for channel in attackers:
            channel.close()


# ---- work bounded before any shard is called -----------------------------------------
def _peak_rss(table) -> dict:
    """Each shard process's peak resident memory (VmHWM, bytes)."""
    import ray

    peaks = {}
    for block, actor in table.shards.items():
        pid = ray.get(actor.info.remote())["pid"]
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        peaks[block] = int(line.split()[1]) * 1024
    return peaks


def test_a_gather_of_huge_row_counts_is_refused_before_any_shard_reads(edge):
    """0.5 MiB of row numbers would make a 256 MiB reply (and as much on a shard)."""
    channel, s = stub(edge["address"])
    before = _peak_rss(edge["wide"])
    request = pb.GatherRequest(table="wide", rows=tensor(np.zeros(1 << 16, np.int64)))
    with channel:
        code, details = code_of(s.Gather, request, metadata=auth(READER), timeout=60)
    assert code == C.INVALID_ARGUMENT and "rows" in details and "reply bytes" in details
    after = _peak_rss(edge["wide"])
    assert all(after[b] - before[b] < 64 << 20 for b in before), (before, after)


def _lookups(table) -> int:
    return sum(s["lookups"] for s in table.stats()["shards"])


CAPPED = {
    "gather over max_batch": (
        "Gather",
        pb.GatherRequest(table="edge", rows=tensor(np.zeros(513, np.int64))),
        "rows",
        "max_batch",
    ),
    "lookup over max_batch": (
        "Lookup",
        pb.LookupRequest(
            table="edge",
            idx=tensor(np.zeros((513, 1), np.int64)),
            w=tensor(np.ones((513, 1), np.float32)),
        ),
        "idx",
        "max_batch",
    ),
    "lookup over max_pairs": (
        "Lookup",
        pb.LookupRequest(
            table="edge",
            idx=tensor(np.zeros((64, 65), np.int64)),
            w=tensor(np.ones((64, 65), np.float32)),
        ),
        "idx",
        "max_pairs",
    ),
    "lookup reply over the limit": (
        "Lookup",
        pb.LookupRequest(
            table="wide",
            idx=tensor(np.zeros((300, 1), np.int64)),
            w=tensor(np.ones((300, 1), np.float32)),
        ),
        "idx",
        "reply bytes",
    ),
    "query candidates over max_pairs": (  # 9 x 2 heads x 16² candidates > 4096
        "Query",
        pb.QueryRequest(
            table="edge", q=tensor(np.ones((9, 2, 8), np.float32)), k=16, return_values=False
        ),
        "q",
        "max_pairs",
    ),
    "query over max_batch": ("Query", _query(batch=513), "q", "max_batch"),
    "push over max_batch": (
        "ApplyGradients",
        pb.ApplyGradientsRequest(
            table="edge",
            idx=tensor(np.zeros((513, 1), np.int64)),
            w=tensor(np.ones((513, 1), np.float32)),
            dy=tensor(np.ones((513, DIM), np.float32)),
            step=10**6,
        ),
        "idx",
        "max_batch",
    ),
}


@pytest.mark.parametrize("case", sorted(CAPPED))
def test_every_method_bounds_its_work_before_calling_a_shard(edge, case):
    method, request, field, cap = CAPPED[case]
    table = edge[request.table]
    before = (_lookups(table), table.fingerprints())
    channel, s = stub(edge["address"])
    with channel:
        code, details = code_of(getattr(s, method), request, metadata=auth(ADMIN), timeout=60)
    assert (code, field in details, cap in details) == (C.INVALID_ARGUMENT, True, True), details
    assert (_lookups(table), table.fingerprints()) == before


def test_the_client_splits_to_the_tables_caps(edge):
    """A gather of 1500 rows from a table of max_batch 512 is three calls, equal to
    the rows read in process."""
    rows = np.random.default_rng(5).integers(0, N * N, 1500)
    with MemoryClient(edge["address"], token=READER, max_message_bytes=LIMIT) as c:
        assert c.describe("edge")["max_batch"] == 512
        got = c.gather("edge", rows)
    np.testing.assert_array_equal(got, edge["edge"].gather(torch.from_numpy(rows)).numpy())


# ---- scopes: per verb and per table --------------------------------------------------
def test_token_file_lines_with_and_without_tables():
    tokens = parse_tokens(
        f"# comment\n{'a' * 16}\n{'b' * 16} read\n{'c' * 16} read,write tables=facts,text\n"
        f"{'d' * 16} tables=facts\n",
        "f",
    )
    assert tokens == {
        "a" * 16: Grant(frozenset({"read", "write", "admin"})),
        "b" * 16: Grant(frozenset({"read"})),
        "c" * 16: Grant(frozenset({"read", "write"}), frozenset({"facts", "text"})),
        "d" * 16: Grant(frozenset({"read", "write", "admin"}), frozenset({"facts"})),
    }
    for bad in (f"{'c' * 16} read tables=", f"{'c' * 16} read tables=a,,b", f"{'c' * 16} r w"):
        with pytest.raises(memstore.InvalidArgument, match="line 1"):
            parse_tokens(bad, "f")


# Which scope each method needs, written out here (not read from the server's table).
NEEDS = {
    "ListTables": "read",
    "DescribeTable": "read",
    "Query": "read",
    "Lookup": "read",
    "Gather": "read",
    "Stats": "read",
    "ApplyGradients": "write",
    "Step": "write",
    "PublishKeys": "write",
    "Save": "admin",
}
REQUESTS = {
    "ListTables": pb.ListTablesRequest(),
    "DescribeTable": pb.DescribeTableRequest(table="edge"),
    "Query": _query(),
    "Lookup": pb.LookupRequest(table="edge"),
    "Gather": pb.GatherRequest(table="edge"),
    "Stats": pb.StatsRequest(table="edge"),
    # Let in, then refused on their arguments (no tensors; step 0 is past): none changes
    # the table.
    "ApplyGradients": pb.ApplyGradientsRequest(table="edge", step=0),
    "Step": pb.StepRequest(table="edge", step=0),
    "PublishKeys": pb.PublishKeysRequest(table="edge"),
    "Save": pb.SaveRequest(table="edge", path="x"),
}


def test_each_method_needs_its_scope(edge):
    assert set(NEEDS) == set(pb.DESCRIPTOR.services_by_name["MemoryStore"].methods_by_name)
    holders = {"read": READER, "write": WRITER, "admin": ADMIN}
    rank = {"read": 0, "write": 1, "admin": 2}
    channel, s = stub(edge["address"])
    with channel:
        for method, need in NEEDS.items():
            for has, token in holders.items():
                code, details = code_of(
                    getattr(s, method), REQUESTS[method], metadata=auth(token), timeout=60
                )
                if rank[has] < rank[need]:
                    assert code == C.PERMISSION_DENIED and need in details, (method, has)
                else:  # let in (it may still fail on its arguments)
                    assert code != C.PERMISSION_DENIED, (method, has, details)


def test_a_token_reaches_only_its_tables(edge):
    channel, s = stub(edge["address"])
    rows = pb.GatherRequest(table="wide", rows=tensor(np.arange(2)))
    step_wide = pb.StepRequest(table="wide", step=10**6)
    with channel:
        listed = s.ListTables(pb.ListTablesRequest(), metadata=auth(ONLY_EDGE), timeout=60)
        assert [t.name for t in listed.tables] == ["edge"]
        everyone = s.ListTables(pb.ListTablesRequest(), metadata=auth(READER), timeout=60)
        assert {"edge", "wide"} <= {t.name for t in everyone.tables}
        answer = s.Gather(
            pb.GatherRequest(table="edge", rows=tensor(np.arange(2))),
            metadata=auth(ONLY_EDGE),
            timeout=60,
        )
        assert list(answer.values.shape) == [2, DIM]
        for token, request, method in (
            (ONLY_EDGE, rows, s.Gather),
            (EDGE_WRITER, step_wide, s.Step),
            (ONLY_EDGE, pb.DescribeTableRequest(table="wide"), s.DescribeTable),
        ):
            code, details = code_of(method, request, metadata=auth(token), timeout=60)
            assert code == C.PERMISSION_DENIED and "wide" in details, details
        code, _ = code_of(s.Step, pb.StepRequest(table="edge"), metadata=auth(ONLY_EDGE))
        assert code == C.PERMISSION_DENIED  # its table, not its verb


# ---- defaults, deadlines, status codes -----------------------------------------------
def test_the_server_binds_loopback_by_default():
    assert ms.ServerOptions().address.rpartition(":")[0] == "127.0.0.1"
    assert build_parser({}).parse_args(["serve"]).address.rpartition(":")[0] == "127.0.0.1"


def test_a_call_past_the_servers_call_timeout_is_deadline_exceeded(edge):
    """The server cuts every call to its call timeout, whatever deadline the caller
    gave; the server keeps serving."""
    server = ms.start(ms.ServerOptions(address="127.0.0.1:0", tokens=TOKENS, call_timeout_s=1e-6))
    try:
        channel, s = stub(server.address)
        with channel:
            code, details = code_of(
                s.ListTables, pb.ListTablesRequest(), metadata=auth(READER), timeout=60
            )
            probe = health_pb2_grpc.HealthStub(channel)
            assert probe.Check(health_pb2.HealthCheckRequest(), timeout=30).status == 1
        assert code == C.DEADLINE_EXCEEDED and "ListTables" in details
    finally:
        server.stop()


def test_each_error_maps_to_its_status():
    from memstore import errors
    from memstore._internal.grpc_errors import status_for

    expected = [
        (errors.StoreRolledBack(3, "0-0"), C.ABORTED),
        (errors.ShardUnavailable("t/0-0", 1.0, "gone"), C.UNAVAILABLE),
        (errors.StepOutOfOrder(2, 5), C.FAILED_PRECONDITION),
        (errors.InvalidArgument("idx", "ints", "floats"), C.INVALID_ARGUMENT),
        (errors.TableNotFound("t", []), C.NOT_FOUND),
        (errors.TableExists("t"), C.ALREADY_EXISTS),
        (errors.MemoryBudgetExceeded(10, 5, "here"), C.RESOURCE_EXHAUSTED),
        (RuntimeError("secret detail"), C.INTERNAL),
    ]
    for error, code in expected:
        assert status_for(error)[0] == code, error
    assert "secret detail" not in status_for(RuntimeError("secret detail"))[1]


# ---- the detached server's tokens, and tokens in clear -------------------------------
def test_the_detached_server_keeps_no_token_a_driver_can_fetch(edge, tmp_path, monkeypatch):
    import ray

    from memstore.table import NAMESPACE

    def _strings_in(root, limit: int = 200_000) -> list:
        """Every str and bytes reachable from ``root`` (modules, classes and functions
        not followed: they lead to the whole program)."""
        import types

        skip = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType)
        seen, todo, found = set(), [root], []
        while todo and len(seen) < limit:
            obj = todo.pop()
            if id(obj) in seen or isinstance(obj, skip):
                continue
            seen.add(id(obj))
            if isinstance(obj, (str, bytes)):
                found.append(obj)
            else:
                todo.extend(gc.get_referents(obj))
        return found

    token_file = tmp_path / "tokens"
    token_file.write_text(f"{ADMIN} read,write,admin\n")
    token_file.chmod(0o600)
    options = ms.ServerOptions(address="127.0.0.1:0", token_file=str(token_file))
    with pytest.raises(memstore.InvalidArgument, match="tokens"):
        ms.detached_options(ms.ServerOptions(tokens=TOKENS))
    monkeypatch.setenv("MEMSTORE_TOKEN", ADMIN)
    with pytest.raises(memstore.InvalidArgument, match="token_file"):
        ms.detached_options(ms.ServerOptions(generated_token_file=str(tmp_path / "none")))
    address = ms.start_detached(options)
    try:
        actor = ray.get_actor(ms.DETACHED_NAME, namespace=NAMESPACE)
        strings = ray.get(actor.__ray_call__.remote(lambda self: _strings_in(self)))
        assert len(strings) > 10  # the walk reached into the server
        assert not [
            x for x in strings if ADMIN in (x if isinstance(x, str) else x.decode("latin1"))
        ]
        with MemoryClient(address, token=ADMIN) as c:  # and it serves with that token
            assert "edge" in [t["name"] for t in c.tables()]
    finally:
        assert ms.stop_detached()


@pytest.mark.parametrize("address", ["10.1.2.3:50051", "memstore.example:50051", "[::2]:1"])
def test_no_token_in_clear_beyond_loopback(address, caplog, tmp_path, capsys):
    with pytest.raises(memstore.InvalidArgument, match="address"):
        MemoryClient(address, token=READER)
    with caplog.at_level(logging.WARNING, logger="memstore.client"):
        MemoryClient(address, token=READER, insecure=True).close()  # connects lazily
    assert "without TLS" in caplog.text
    for loopback in ("127.0.0.1:1", "localhost:1", "[::1]:1", "127.0.0.9:1"):
        MemoryClient(loopback, token=READER).close()
    token_file = tmp_path / "t"
    token_file.write_text(f"{READER} read\n")
    token_file.chmod(0o600)
    from memstore.cli import main

    rc = main(["tables", "--address", address, "--token-file", str(token_file)])
    err = capsys.readouterr().err
    assert rc == 1 and "--insecure" in err and "--tls-ca" in err
