"""Attacks on a live shard's data channel, on loopback: a fuzzer on the frames and the
handshake, peers without the secret, oversized frames, running out of descriptors, a
peer impersonating a shard, an eavesdropper, and a flood of idle connections.

The shard is a real ShardWorker (a ShardTable behind the channel's DataServer), in this
process for the fuzzers (their counters are read directly) and in a child process where
its memory or descriptors are measured.
"""

import contextlib
import hashlib
import hmac
import inspect
import json
import multiprocessing as mp
import resource
import socket
import threading
import time

import numpy as np
import pytest
import torch
import zmq
import zmq.auth
import zmq.utils.z85
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstore._internal.data_channel import (
    DEFAULT_MAX_CONNECTIONS,
    PROTOCOL,
    ChannelSettings,
    DataClient,
    channel_config,
)
from memstore._internal.shard_actor import ShardWorker
from memstore.grid import ShardGrid
from memstore.optim import Adam

ROWS, DIM = 4096, 32
FUZZ_FRAMES, FUZZ_HANDSHAKES = 400, 200  # examples, reported in the reliability table


def shard_config(**channel) -> dict:
    """The config create_table makes for a 1-shard table, listening on loopback."""
    return {
        "name": "sec",
        "rows": ROWS,
        "dim": DIM,
        "dtype": "float32",
        "seed": 3,
        "optimizer": Adam().to_dict(),
        "mode": "sync",
        "max_staleness": None,
        "pushes_per_step": None,
        "step_on_push": False,
        "data_channel": "socket",
        "checkpoint_root": None,
        "save_every": None,
        "threads": 1,
        "restore_from": None,
        "grid": ShardGrid.make(ROWS, DIM, 1).to_dict(),
        "device": "cpu",
        **channel_config("127.0.0.1", **channel),
    }


def lookup_request(address, incarnation, seed=0):
    """A valid lookup of 8 bags of 4 rows, and its expected y computed with numpy from
    the rows' values (independent of the shard's kernels)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, ROWS, 32).astype(np.int64)
    w = rng.random(32, dtype=np.float32)
    offsets = np.arange(9, dtype=np.int64) * 4
    return (address, "lookup", (rows, w, offsets), fence(ShardWorker.lookup, incarnation))


def fence(method, incarnation) -> tuple:
    """The incarnation argument of a fenced shard method (one that takes ``expected``)."""
    return (incarnation,) if "expected" in inspect.signature(method).parameters else ()


def expected_y(worker, request) -> np.ndarray:
    rows, w, _ = request[2]
    values = worker.table.gather(torch.from_numpy(rows)).float().numpy()
    return (values * w[:, None]).reshape(8, 4, DIM).sum(axis=1)


@pytest.fixture(scope="module")
def shard():
    worker = ShardWorker(shard_config(), 0, 0)
    yield worker
    worker.data_server.close()


def client_of(config: dict, timeout_s=10.0) -> DataClient:
    return DataClient(timeout_s, ChannelSettings.from_config(config))


def assert_serves(worker, client=None):
    """A valid call answers exactly what the table holds."""
    request = lookup_request(worker.data_server.address, worker.incarnation, seed=7)
    out, broken = (client or client_of(worker.config)).call_all({0: request})
    assert broken == []
    np.testing.assert_allclose(out[0][1], expected_y(worker, request), rtol=1e-5, atol=1e-6)


# ---- fuzzers ---------------------------------------------------------------------------
_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
)
_described = st.lists(
    st.one_of(
        st.sampled_from(["int64", "float32", "float64", "object", "<U4", "", "bool"]),
        st.lists(st.integers(-3, 2**41), max_size=5),
        _scalars,
    ),
    max_size=3,
)
_headers = st.one_of(
    st.binary(max_size=120),
    st.fixed_dictionaries(
        {
            "v": st.sampled_from([PROTOCOL, "memstore-data/0", 1, None]),
            "id": st.one_of(st.integers(-5, 2**64), st.text(max_size=3), st.none()),
            "op": st.sampled_from(["lookup", "backward", "step", "save", "", "__init__"]),
            "args": st.one_of(st.lists(_scalars, max_size=20), _scalars),
            "arrays": st.one_of(st.lists(_described, max_size=6), _scalars),
        }
    ).map(lambda h: json.dumps(h).encode()),
)
_frames = st.lists(st.one_of(st.binary(max_size=64), st.integers(0, 2048).map(bytes)), max_size=6)


def test_fuzzed_frames_get_an_error_reply_and_change_nothing(shard):
    before = shard.fingerprint()
    handled = dict(shard.data_server.faults.handled)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.plain_username, sock.plain_password = (
        PROTOCOL.encode(),
        shard.config["data_secret"].encode(),
    )
    sock.connect("tcp://{}:{}".format(*shard.data_server.address[:2]))
    sent = []

    @settings(
        max_examples=FUZZ_FRAMES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(_headers, _frames)
    def fuzz(header, frames):
        sock.send_multipart([header, *frames])
        assert sock.poll(10_000), "the shard sent no reply to a malformed message"
        reply = json.loads(sock.recv_multipart()[0])
        assert reply["ok"] is False and reply["error"]["class"] in (
            "InvalidArgument",
            "ShardRestarted",
            "MemstoreError",
        )
        sent.append(1)

    try:
        fuzz()
    finally:
        sock.close()
    assert len(sent) >= FUZZ_FRAMES * 0.9
    assert shard.data_server.counters["loop_errors"] == 0
    assert shard.fingerprint() == before
    assert shard.data_server.faults.handled.get("backward", 0) == handled.get("backward", 0)
    assert_serves(shard)


def _greeting(mechanism: bytes, as_server: int = 0, minor: int = 0) -> bytes:
    """A ZMTP 3 greeting (64 bytes)."""
    return (
        b"\xff"
        + b"\0" * 8
        + b"\x7f"
        + bytes([3, minor])
        + mechanism.ljust(20, b"\0")
        + bytes([as_server])
        + b"\0" * 31
    )


def _hello(username: bytes, password: bytes) -> bytes:
    body = b"\x05HELLO" + bytes([len(username)]) + username + bytes([len(password)]) + password
    return b"\x04" + bytes([len(body)]) + body


_handshakes = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda m, s, tail: _greeting(m, s) + tail,
        st.sampled_from([b"PLAIN", b"NULL", b"CURVE", b"GSSAPI", b"\xff" * 20]),
        st.integers(0, 255),
        st.binary(max_size=200),
    ),
    st.builds(
        lambda u, p, tail: _greeting(b"PLAIN") + _hello(u, p) + tail,
        st.sampled_from([PROTOCOL.encode(), b"", b"memstore-data/0"]),
        st.binary(min_size=0, max_size=80),
        st.binary(max_size=200),
    ),
)


def test_fuzzed_handshakes_are_refused_and_the_shard_serves_on(shard):
    before = shard.fingerprint()
    handled = sum(shard.data_server.faults.handled.values())
    host, port, _ = shard.data_server.address
    tried = []

    @settings(max_examples=FUZZ_HANDSHAKES, derandomize=True, deadline=None, database=None)
    @given(_handshakes)
    def fuzz(data):
        with socket.create_connection((host, port), timeout=5) as s:
            try:
                s.sendall(data)
            except OSError:  # the shard may hang up mid-send: that is a refusal too
                pass
        tried.append(1)

    fuzz()
    assert len(tried) == FUZZ_HANDSHAKES
    assert shard.data_server.counters["loop_errors"] == 0
    assert sum(shard.data_server.faults.handled.values()) == handled  # no payload got through
    assert shard.fingerprint() == before
    assert_serves(shard)


# ---- a shard in a child process, measured ---------------------------------------------
def _vm_kib(status, field: str) -> int:
    """A memory figure of this process from its open /proc/self/status (opened before
    the descriptor limit is lowered, so that reading it needs no new descriptor)."""
    status.seek(0)
    return next(
        int(line.split()[1]) for line in status.read().splitlines() if line.startswith(field + ":")
    )


def _serve_shard(conn, config: dict, spare_fds: int | None) -> None:
    """Child process: a ShardWorker whose channel answers until the parent says stop;
    ``spare_fds``: the descriptor limit is set this far above those open now."""
    import os

    worker = ShardWorker(config, 0, 0)
    status = open("/proc/self/status", encoding="ascii")  # noqa: SIM115 - read to the end
    if spare_fds is not None:
        limit = len(os.listdir("/proc/self/fd")) + spare_fds
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    conn.send((worker.data_server.address, worker.incarnation, worker.fingerprint()))
    while conn.recv() == "stats":
        conn.send(
            {
                "handled": dict(worker.data_server.faults.handled),
                "counters": dict(worker.data_server.counters),
                "fingerprint": worker.fingerprint(),
                "hwm_kib": _vm_kib(status, "VmHWM"),
            }
        )


@pytest.fixture
def child_shard(request):
    """(config, address, incarnation, fingerprint, stats()) of a shard in a child process."""
    channel, spare = getattr(request, "param", ({}, None))
    config = shard_config(**channel)
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(
        target=_serve_shard, args=(child, config, spare), daemon=True
    )
    proc.start()
    assert parent.poll(120), "the child shard did not start"
    address, incarnation, fingerprint = parent.recv()

    def stats():
        parent.send("stats")
        assert parent.poll(30), "the child shard stopped answering"
        return parent.recv()

    yield config, address, incarnation, fingerprint, stats
    parent.send("stop")
    proc.join(timeout=20)
    if proc.is_alive():
        proc.kill()


def _wait_for(condition, tries=100) -> bool:
    for _ in range(tries):
        if condition():
            return True
        time.sleep(0.1)
    return False


def _valid_call(config, address, incarnation, timeout_s=10.0):
    return client_of(config, timeout_s).call_all({0: lookup_request(address, incarnation)})


def test_a_peer_without_the_secret_reads_nothing_writes_nothing_and_costs_no_memory(child_shard):
    config, address, incarnation, fingerprint, stats = child_shard
    hwm = stats()["hwm_kib"]
    big = np.zeros(1 << 20, dtype=np.float32)  # 4 MiB per array
    for secret in ["", "0" * 64, config["data_secret"][:-1] + "x", config["data_secret"] + "0"]:
        wrong = dict(config, data_secret=secret)
        for _ in range(5):
            out, broken = client_of(wrong, timeout_s=3).call_all(
                {
                    0: (
                        address,
                        "backward",
                        (big, big, big[:9].astype(np.int64), big.reshape(-1, DIM)),
                        (1, 0, None, incarnation),
                    )
                }
            )
            assert (out, broken) == ({}, [0])
    junk = bytes(8 << 20)  # 8 MiB of zeros, a frame length of 0 and then nothing valid
    for _ in range(8):
        with socket.create_connection(address[:2], timeout=5) as s:
            try:
                s.sendall(_greeting(b"PLAIN") + _hello(PROTOCOL.encode(), b"guess") + junk)
            except OSError:
                pass
    # The shard counts a refusal when its ZAP handler answers, which can trail the
    # client giving up: wait for the count rather than read it once.
    assert _wait_for(lambda: stats()["counters"].get("refused", 0) >= 20), stats()["counters"]
    after = stats()
    assert after["handled"] == {} and after["fingerprint"] == fingerprint
    assert after["hwm_kib"] - hwm < 16 << 10  # 64 MiB were sent; under 16 MiB were kept
    out, broken = _valid_call(config, address, incarnation)
    assert broken == [] and out[0][1].shape == (8, DIM)


@pytest.mark.parametrize(
    "child_shard", [({"max_batch": 64, "max_pairs": 1024}, None)], indirect=True
)
def test_an_oversized_frame_is_refused_before_it_is_allocated(child_shard):
    config, address, incarnation, fingerprint, stats = child_shard
    hwm = stats()["hwm_kib"]
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.plain_username, sock.plain_password = PROTOCOL.encode(), config["data_secret"].encode()
    sock.connect("tcp://{}:{}".format(*address[:2]))
    header = (
        b'{"v": "%s", "id": 1, "op": "lookup", "args": [], "arrays": [["float32", [16777216]]]}'
        % PROTOCOL.encode()
    )
    try:
        for _ in range(4):  # 64 MiB each, where the table's cap is 64 KiB
            sock.send_multipart([header, bytes(64 << 20)])
        assert not sock.poll(3000)  # the shard dropped the connection without a reply
    finally:
        sock.close()
    after = stats()
    assert after["handled"] == {} and after["fingerprint"] == fingerprint
    assert after["hwm_kib"] - hwm < 16 << 10
    assert _valid_call(config, address, incarnation)[1] == []


@pytest.mark.parametrize("child_shard", [({}, 24)], indirect=True)
def test_the_listener_serves_again_after_running_out_of_descriptors(child_shard):
    config, address, incarnation, fingerprint, stats = child_shard
    hogs = []
    try:
        for _ in range(64):  # far more than the 24 descriptors the shard has to spare
            hogs.append(socket.create_connection(address[:2], timeout=5))
        assert _wait_for(lambda: stats()["counters"].get("accept_failed", 0) > 0)
    finally:
        for s in hogs:
            s.close()
    for _ in range(40):  # the shard learns of the closed connections asynchronously
        out, broken = _valid_call(config, address, incarnation, timeout_s=3)
        if not broken:
            break
    assert broken == [] and out[0][1].shape == (8, DIM)
    assert stats()["handled"] == {"lookup": 1}


def test_the_secret_shows_in_no_stats_repr_log_or_checkpoint_file(shard, tmp_path, caplog):
    secret = shard.config["data_secret"]
    with caplog.at_level("DEBUG"):
        assert_serves(shard)
        wrong = client_of(dict(shard.config, data_secret="f" * 64), timeout_s=3)
        assert wrong.call_all({0: lookup_request(shard.data_server.address, "x")})[1] == [0]
        entry = shard.save(str(tmp_path / "ckpt"), *fence(ShardWorker.save, shard.incarnation))
    texts = [
        json.dumps(shard.stats()),
        json.dumps(entry, default=str),
        caplog.text,
        repr(shard.data_server.settings),
        repr(ChannelSettings.from_config(shard.config)),
    ]
    texts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert len(texts) > 5 and not any(secret in t for t in texts)


def test_a_batch_beyond_the_tables_caps_is_refused_before_anything_is_sent(shard):
    from memstore import InvalidArgument

    handled = dict(shard.data_server.faults.handled)
    request = lookup_request(shard.data_server.address, shard.incarnation)  # 8 bags, 32 pairs
    for caps, setting in [
        (dict(max_batch=64, max_pairs=16), "max_pairs"),
        (dict(max_batch=4, max_pairs=64), "max_batch"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            client_of(dict(shard.config, **caps)).call_all({0: request})
        assert e.value.field == "idx" and setting in e.value.expected
    assert dict(shard.data_server.faults.handled) == handled


# ---- an impostor, an eavesdropper, a flood of idle connections ------------------------
def _key_from_the_secret(secret: str) -> tuple[bytes, bytes]:
    """A CURVE key pair that any holder of the table secret (every client) can compute:
    what a shard's key would be if it were derived from the secret."""
    seed = hmac.new(secret.encode(), f"{PROTOCOL}|server".encode(), hashlib.sha256).digest()
    secret_key = zmq.utils.z85.encode(seed)
    return zmq.curve_public(secret_key), secret_key


@contextlib.contextmanager
def impostor(address, keys: tuple[bytes, bytes]):
    """A CURVE server with ``keys`` bound at a shard's host and port, admitting any client
    (zmq.auth's handler), so that only the client can refuse the handshake."""
    from zmq.auth.thread import ThreadAuthenticator

    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = keys
    sock.bind("tcp://{}:{}".format(*address[:2]))
    try:
        yield sock
    finally:
        auth.stop()
        sock.close()
        ctx.term()


def test_an_impersonating_shard_is_refused_by_the_client():
    """The shard's port taken over by a server with another key: one any client could
    derive from the table secret, or a fresh one. The client refuses the handshake and
    sends nothing. The control: the same server, its key the one the client was given,
    gets the request."""
    config = shard_config(encrypt=True)
    worker = ShardWorker(config, 0, 0)
    published, incarnation = worker.data_server.address, worker.incarnation
    assert_serves(worker)
    worker.data_server.close()  # the shard is gone; another process binds its port
    for keys in (_key_from_the_secret(config["data_secret"]), zmq.curve_keypair()):
        with impostor(published, keys) as sock:
            out, broken = client_of(config, timeout_s=3).call_all(
                {0: lookup_request(published, incarnation)}
            )
            assert (out, broken) == ({}, [0])
            assert not sock.poll(0)
    keys = zmq.curve_keypair()
    trusted = (*published[:2], keys[0].decode())
    with impostor(published, keys) as sock, pytest.raises(TimeoutError):
        try:
            client_of(config, timeout_s=2).call_all({0: lookup_request(trusted, incarnation)})
        finally:
            assert sock.poll(0)  # the request reached it (it never answers)


@contextlib.contextmanager
def recording_proxy(target):
    """A TCP proxy on loopback forwarding to ``target`` (host, port) and recording every
    byte that passes either way: what a passive observer of the wire sees."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    captured, lock, stop, open_sockets = bytearray(), threading.Lock(), threading.Event(), []

    def pump(src, dst):
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                with lock:
                    captured.extend(data)
                dst.sendall(data)

    def accept():
        while not stop.is_set():
            try:
                downstream, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(target, timeout=10)
            open_sockets.extend((downstream, upstream))
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=pump, args=(src, dst), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname(), captured
    finally:
        stop.set()
        acceptor.join(timeout=5)
        for s in (listener, *open_sockets):
            s.close()


def test_a_passive_capture_of_a_lookup_holds_no_secret_when_curve_is_on(shard):
    """One lookup through a recording proxy, PLAIN (loopback's default: the control, whose
    capture shows the secret and the data) and CURVE (neither)."""
    encrypted = ShardWorker(shard_config(encrypt=True), 0, 0)
    try:
        for worker, curve in ((shard, False), (encrypted, True)):
            host, port, key = worker.data_server.address
            assert (key is not None) == curve
            with recording_proxy((host, port)) as (proxy, captured):
                request = lookup_request((*proxy, key), worker.incarnation, seed=11)
                client = client_of(worker.config)
                out, broken = client.call_all({0: request})
                client.close()
                wire = bytes(captured)
            assert broken == []
            y = expected_y(worker, request)
            np.testing.assert_allclose(out[0][1], y, rtol=1e-5, atol=1e-6)
            secret = worker.config["data_secret"]
            rows, w, _ = request[2]
            shown = [x in wire for x in (secret.encode(), rows.tobytes(), w.tobytes())]
            assert shown == [not curve] * 3, (curve, shown)
            assert (out[0][1].tobytes() in wire) is not curve
            assert bytes.fromhex(secret) not in wire
    finally:
        encrypted.data_server.close()


IDLE_CONNECTIONS = 300


def test_idle_connections_without_the_secret_take_no_part_of_the_connection_limit(child_shard):
    """More idle TCP connections than the limit, each accepted by the shard (its greeting
    read back), never passing the handshake: a valid client still connects and its call
    goes over the channel, not the Ray fallback."""
    config, address, incarnation, fingerprint, stats = child_shard
    assert IDLE_CONNECTIONS > DEFAULT_MAX_CONNECTIONS
    idle = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection(address[:2], timeout=10))
        for s in idle:
            assert s.recv(10)  # the first bytes of the shard's ZMTP greeting
        out, broken = _valid_call(config, address, incarnation)
        assert broken == [] and out[0][1].shape == (8, DIM)
        after = stats()
        assert after["handled"] == {"lookup": 1} and after["counters"].get("refused", 0) == 0
    finally:
        for s in idle:
            s.close()


def test_a_restarted_shards_new_key_reaches_the_handle_through_ray(
    ray_start_16_cpus, table_names, tmp_path, caplog
):
    """A real table with CURVE: the killed shard's process comes back with a new key,
    published through Ray; the handle rolls back, learns it there, and its next lookup
    goes over the channel again (no call falls back to Ray)."""
    import os
    import signal

    import ray

    import memstore

    t = memstore.create_table(
        table_names("curve-restart"),
        ROWS,
        DIM,
        data_encrypt=True,
        checkpoint_root=str(tmp_path),
        max_restarts=2,
        timeout_s=120,
    )
    actor = t.shards[(0, 0)]
    gen = torch.Generator().manual_seed(5)
    idx, w = torch.randint(0, ROWS, (8, 4), generator=gen), torch.rand(8, 4, generator=gen)
    before = t.lookup(idx, w)
    t.save()
    info = ray.get(actor.info.remote())
    os.kill(info["pid"], signal.SIGKILL)
    with pytest.raises(memstore.StoreRolledBack):
        for _ in range(50):  # the next call that reaches the dead shard raises
            t.lookup(idx, w)
            time.sleep(0.2)
    restarted = ray.get(actor.info.remote())
    assert restarted["data_address"][2] not in (None, info["data_address"][2])
    with caplog.at_level("INFO", logger="memstore"):
        after = t.lookup(idx, w)
    assert not [r for r in caplog.records if "goes over Ray" in r.getMessage()]
    assert tuple(restarted["data_address"]) in t._channel.socks
    torch.testing.assert_close(after, before)
