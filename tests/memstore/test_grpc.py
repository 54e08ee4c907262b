"""The gRPC server and client against real tables on a local Ray instance.

Answers are checked against an in-process memstore.ShardTable of the same seed and
optimizer (the single-block table, no Ray, no gRPC) and against the brute-force
product-key reference of kernels.reference.
"""

from __future__ import annotations

import os
import stat

import grpc
import numpy as np
import pytest
import torch

import memstore
import memstore.server as ms
from memstore.client import MemoryClient
from memstore.errors import RemoteError
from memstore.kernels.reference import product_key_topk_reference
from memstore.v1 import memstore_pb2 as pb

from .grpc_util import ADMIN, READER, TOKENS, WRITER, auth, code_of, stub, tensor

N = 32  # product keys per half: rows = N²
ROWS, DIM, SEED = N * N, 16, 7


def reference():
    return memstore.ShardTable(ROWS, DIM, optimizer=memstore.Adam(lr=0.05), seed=SEED)


@pytest.fixture(scope="module")
def served(ray_start_16_cpus, tmp_path_factory):
    table = memstore.create_table(
        "grpc-t", ROWS, DIM, shards=2, seed=SEED, optimizer=memstore.Adam(lr=0.05)
    )
    save_root = tmp_path_factory.mktemp("saves")
    server = ms.start(
        ms.ServerOptions(address="127.0.0.1:0", tokens=TOKENS, save_root=str(save_root))
    )
    yield table, server, save_root
    server.stop()
    memstore.drop_table("grpc-t")


@pytest.fixture
def client(served):
    with MemoryClient(served[1].address, token=ADMIN) as c:
        yield c


def test_lookup_and_gather_match_the_in_process_table(served, client):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, ROWS, (5, 12))
    w = rng.random((5, 12), dtype=np.float32)
    y, seen = client.lookup("grpc-t", idx, w, with_seen=True)
    ref = reference()
    np.testing.assert_allclose(
        y, ref.lookup(torch.from_numpy(idx), torch.from_numpy(w)).numpy(), rtol=1e-5, atol=1e-6
    )
    assert seen.consistent and set(seen.shard_steps) == {"0-0", "1-0"}
    rows = torch.tensor([0, 5, ROWS - 1])
    out = client.gather("grpc-t", rows)  # torch in, torch out
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, ref.gather(rows).float())


def test_query_is_topk_over_published_keys_then_lookup(served, client):
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 2, N, 4, generator=g)
    q = torch.randn(3, 2, 8, generator=g)
    client.publish_keys("grpc-t", keys.numpy())
    result = client.query("grpc-t", q.numpy(), k=5)
    scores, indices = product_key_topk_reference(q.double(), keys.double(), 5)
    np.testing.assert_array_equal(result.indices, indices.numpy())
    np.testing.assert_allclose(result.scores, scores.numpy(), rtol=1e-5, atol=1e-5)
    # The store table may have been stepped by an earlier test: compare with its rows.
    rows = client.gather("grpc-t", np.arange(ROWS))
    # Each head's k scores are softmaxed; the heads' weighted rows are summed.
    weights = torch.softmax(torch.from_numpy(result.scores), dim=-1).flatten(1).numpy()
    expect = np.einsum("bm,bmd->bd", weights, rows[result.indices.reshape(3, -1)])
    np.testing.assert_allclose(result.values, expect, rtol=1e-5, atol=1e-6)
    info = client.describe("grpc-t")
    assert (info["keys_published"], info["key_heads"], info["key_dim"]) == (True, 2, 8)


def test_pushes_and_steps_update_like_the_in_process_table(served, client):
    table = served[0]
    rng = np.random.default_rng(2)
    ref = reference()
    ref.load_state_dict(_state_of(table))
    start = client.describe("grpc-t")["step"]
    for s in (start + 1, start + 2):
        idx = rng.integers(0, ROWS, (4, 6))
        w = rng.random((4, 6), dtype=np.float32)
        dy = rng.standard_normal((4, DIM)).astype(np.float32)
        dw = client.apply_gradients("grpc-t", idx, w, dy, step=s, push_id=0)
        ref_dw = ref.backward(
            torch.from_numpy(idx), torch.from_numpy(w), torch.from_numpy(dy), step=s
        )
        np.testing.assert_allclose(dw, ref_dw.numpy(), rtol=1e-5, atol=1e-5)
        assert client.step("grpc-t", s) == ref.step(s)
    np.testing.assert_allclose(
        client.gather("grpc-t", np.arange(ROWS)),
        ref.gather(torch.arange(ROWS)).numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    assert client.describe("grpc-t")["step"] == start + 2


def _state_of(table) -> dict:
    """The table's state through a checkpoint written by its shards, read back."""
    import tempfile

    from memstore import checkpoint
    from memstore.shard_table import BlockSpec

    with tempfile.TemporaryDirectory() as d:
        path = memstore.connect(table.name).save(os.path.join(d, "ck"))
        return checkpoint.load_block(path, BlockSpec.whole(ROWS, DIM))


def test_tables_created_after_the_server_started_are_served(served, client):
    assert "late" not in [t["name"] for t in client.tables()]
    late = memstore.create_table("late", 64, 8, shards=1, seed=3)
    try:
        listed = {t["name"]: t for t in client.tables()}
        assert listed["late"]["rows"] == 64 and listed["late"]["dim"] == 8
        info = client.describe("late")
        assert (info["grid"], info["optimizer"], info["mode"]) == ((1, 1), "adam", "sync")
        np.testing.assert_array_equal(
            client.gather("late", np.arange(64)), late.gather(torch.arange(64)).numpy()
        )
    finally:
        memstore.drop_table("late")
    # Dropped and created again under the same name: the new table is answered.
    again = memstore.create_table("late", 32, 4, shards=1, seed=4)
    try:
        assert client.describe("late")["rows"] == 32
        np.testing.assert_array_equal(
            client.gather("late", np.arange(32)), again.gather(torch.arange(32)).numpy()
        )
    finally:
        memstore.drop_table("late")
    with pytest.raises(RemoteError) as e:
        client.describe("late")
    assert e.value.code == "NOT_FOUND" and "late" in e.value.details


def test_describe_and_stats_never_show_secret_config(served, client):
    config = memstore.connect("grpc-t").config
    secrets = [str(v) for k, v in config.items() if "secret" in k or "key" in k.split("_")]
    channel, s = stub(served[1].address)
    with channel:
        replies = [
            s.DescribeTable(pb.DescribeTableRequest(table="grpc-t"), metadata=auth()),
            s.Stats(pb.StatsRequest(table="grpc-t"), metadata=auth()),
        ]
    for reply in replies:
        text = str(reply) + reply.SerializeToString().hex()
        for secret in secrets:
            assert secret not in text and secret.encode().hex() not in text
    assert replies[1].bytes > 0 and len(replies[1].shards) == 2


def test_scopes_and_missing_tokens(served):
    channel, s = stub(served[1].address)
    idx = tensor(np.zeros((1, 1), np.int64))
    push = pb.ApplyGradientsRequest(
        table="grpc-t",
        idx=idx,
        w=tensor(np.ones((1, 1), np.float32)),
        dy=tensor(np.ones((1, DIM), np.float32)),
        step=10**6,
    )
    with channel:
        assert code_of(s.ListTables, pb.ListTablesRequest())[0] == grpc.StatusCode.UNAUTHENTICATED
        assert (
            code_of(s.ListTables, pb.ListTablesRequest(), metadata=auth("x" * 30))[0]
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            code_of(s.ListTables, pb.ListTablesRequest(), metadata=auth(READER))[0]
            == grpc.StatusCode.OK
        )
        code, details = code_of(s.ApplyGradients, push, metadata=auth(READER))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "write" in details
        code, details = code_of(
            s.Save, pb.SaveRequest(table="grpc-t", path="x"), metadata=auth(WRITER)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details


def test_refused_before_the_payload_is_parsed(served):
    """Bytes that are no valid message: without a token the answer is UNAUTHENTICATED
    (the interceptor refused on metadata alone); with one, parsing them fails."""
    channel = grpc.insecure_channel(served[1].address)
    raw = channel.unary_unary("/memstore.v1.MemoryStore/Lookup")  # bytes in and out
    garbage = b"\xff\xff\xff\xff\x0f" * 8
    with channel:
        assert code_of(raw, garbage)[0] == grpc.StatusCode.UNAUTHENTICATED
        # grpc.aio answers a request it cannot deserialize with UNKNOWN.
        assert code_of(raw, garbage, metadata=auth())[0] == grpc.StatusCode.UNKNOWN


def test_health_without_token_and_reflection_with_one(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(served[1].address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="memstore.v1.MemoryStore"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as e:
            list(refl.ServerReflectionInfo(iter(ask)))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = list(refl.ServerReflectionInfo(iter(ask), metadata=auth(READER)))
        names = [s.name for s in answer[0].list_services_response.service]
        assert "memstore.v1.MemoryStore" in names


def test_save_only_under_the_save_root(served, client):
    save_root = served[2]
    written = client.save("grpc-t", "ck/one")
    assert written == os.path.join("ck", "one")
    assert (save_root / "ck" / "one" / "manifest.json").exists()
    for path in ("../outside", "/tmp/abs", "", "ck/../../x", "s3://bucket/x"):
        with pytest.raises(RemoteError) as e:
            client.save("grpc-t", path)
        assert e.value.code == "INVALID_ARGUMENT" and "path" in e.value.details
    assert sorted(p.name for p in save_root.iterdir()) == ["ck"]


def test_generated_token_file_is_private(tmp_path, monkeypatch):
    from memstore._internal.grpc_auth import client_token, server_tokens

    monkeypatch.delenv("MEMSTORE_TOKEN", raising=False)
    path = tmp_path / "conf" / "token"
    tokens, source = server_tokens(None, str(path))
    assert source == str(path) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    ((token, grant),) = tokens.items()
    assert grant.scopes == {"read", "write", "admin"} and grant.tables is None
    assert len(token) >= 32
    assert server_tokens(None, str(path))[0] == tokens  # reused, not replaced
    assert client_token(token_file=str(path)) == token
    path.chmod(0o644)
    with pytest.raises(memstore.InvalidArgument, match="token_file"):
        server_tokens(None, str(path))


def test_tls_with_a_self_signed_certificate(served, tmp_path):
    cert, key = _self_signed(tmp_path)
    server = ms.start(
        ms.ServerOptions(address="127.0.0.1:0", tokens=TOKENS, tls_cert=str(cert), tls_key=str(key))
    )
    try:
        with MemoryClient(
            server.address,
            token=READER,
            root_certificates=cert.read_bytes(),
            server_name="localhost",
        ) as c:
            assert "grpc-t" in [t["name"] for t in c.tables()]
        with MemoryClient(server.address, token=READER, read_retries=0, timeout_s=5) as plain:
            with pytest.raises(RemoteError) as e:
                plain.tables()
            assert e.value.code == "UNAVAILABLE"
    finally:
        server.stop()


def _self_signed(tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_large_requests_are_split_and_oversized_messages_refused(served):
    limit = 1 << 18  # 256 KiB
    server = ms.start(
        ms.ServerOptions(address="127.0.0.1:0", tokens=TOKENS, max_message_bytes=limit)
    )
    try:
        rng = np.random.default_rng(3)
        idx = rng.integers(0, ROWS, (3000, 16))  # 3000 x 16 x 12 B = 576 KB of request
        w = rng.random((3000, 16), dtype=np.float32)
        with MemoryClient(server.address, token=ADMIN, max_message_bytes=limit) as small:
            y = small.lookup("grpc-t", idx, w)
            rows = small.gather("grpc-t", np.arange(ROWS).repeat(5))  # 320 KB of reply
        with MemoryClient(served[1].address, token=ADMIN) as whole:  # 64 MiB: one message
            np.testing.assert_array_equal(y, whole.lookup("grpc-t", idx, w))
            np.testing.assert_array_equal(
                rows, np.repeat(whole.gather("grpc-t", np.arange(ROWS)), 5, axis=0)
            )
        with MemoryClient(server.address, token=ADMIN) as big:
            with pytest.raises(RemoteError) as e:
                big.lookup("grpc-t", idx, w)  # one message over the server's limit
            assert e.value.code == "RESOURCE_EXHAUSTED"
    finally:
        server.stop()


def test_reads_retry_while_unavailable_but_writes_do_not(served):
    import socket
    import threading

    with socket.socket() as s:  # a free port, nobody listening yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    writer = MemoryClient(address, token=ADMIN, timeout_s=5)
    with pytest.raises(RemoteError) as e:
        writer.step("grpc-t", 10**6)
    assert e.value.code == "UNAVAILABLE"
    started = {}
    timer = threading.Timer(
        0.5,
        lambda: started.setdefault(
            "server", ms.start(ms.ServerOptions(address=address, tokens=TOKENS))
        ),
    )
    timer.start()
    try:
        reader = MemoryClient(address, token=ADMIN, read_retries=8, backoff_s=0.1, timeout_s=5)
        assert "grpc-t" in [t["name"] for t in reader.tables()]
        assert "server" in started  # answered by the server that came up meanwhile
    finally:
        timer.join()
        started["server"].stop()


def test_a_reader_is_answered_from_the_checkpoint_after_a_shard_restarts(served, tmp_path):
    """A shard restart rolls the table back; the server's handle meets it on a read and
    answers that read from the restored rows instead of failing it (one server thread,
    so the handle that read before the restart is the one that meets it)."""
    import signal
    import time

    import ray

    table = memstore.create_table(
        "restarts",
        64,
        8,
        shards=(2, 1),
        seed=5,
        max_restarts=2,
        optimizer=memstore.SGD(lr=0.5),
        timeout_s=120,
        checkpoint_root=str(tmp_path),
    )
    server = ms.start(ms.ServerOptions(address="127.0.0.1:0", tokens=TOKENS, threads=1))
    try:
        with MemoryClient(server.address, token=READER) as reader:
            rng = np.random.default_rng(4)
            idx = torch.from_numpy(rng.integers(0, 64, (8, 4)))
            w, dy = torch.rand(8, 4), torch.randn(8, 8)
            table.backward(idx, w, dy, step=1)
            table.step(1)
            table.save()
            saved = table.gather(torch.arange(64)).numpy()
            np.testing.assert_array_equal(reader.gather("restarts", np.arange(64)), saved)
            table.backward(idx, w, -dy, step=2)
            table.step(2)
            assert not np.array_equal(table.gather(torch.arange(64)).numpy(), saved)
            os.kill(ray.get(table.shards[(1, 0)].info.remote())["pid"], signal.SIGKILL)
            for _ in range(50):  # until a read reaches the restarted shard; none fails
                got = reader.gather("restarts", np.arange(64))
                if np.array_equal(got, saved):
                    break
                time.sleep(0.2)
            np.testing.assert_array_equal(got, saved)  # every block back at step 1
    finally:
        server.stop()
        memstore.drop_table("restarts")
