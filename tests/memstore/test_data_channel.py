"""The lookup/push transport on its own: arrays, errors as JSON, request ids, caps, peers.

Servers and clients here are the real ZeroMQ channel on 127.0.0.1 with a trivial handler;
the attacks on a live shard are in test_channel_security.py.
"""

import json
import socket
from threading import Thread

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstore import InvalidArgument, MemstoreError, ShardUnavailable, StepOutOfOrder
from memstore._internal.data_channel import (
    PROTOCOL,
    ChannelBroken,
    ChannelSettings,
    DataClient,
    DataServer,
    OpCaps,
    ProtocolError,
    channel_config,
    client_mechanism,
    decode,
    encode,
    uses_curve,
)
from memstore.errors import from_wire, to_wire

CAP = 1 << 17
SECRET = "a5" * 32
CAPS = {
    "scale": OpCaps((("a", "max_pairs", CAP), ("b", "max_pairs", CAP)), CAP),
    "fail": OpCaps((), 1),
}


def _scale(a, b, factor):
    """A handler like the shard's: arrays then scalars in, (incarnation, array) out."""
    if factor < 0:
        raise InvalidArgument("factor", "a number >= 0", factor)
    return "inc-1", (a.astype(np.float64) + b) * factor


def _fail(kind):
    raise {
        "step": StepOutOfOrder(3, 7),
        "shard": ShardUnavailable("t/shard-0-0", 2.5, "x"),
        "other": KeyError("secret-key"),
    }[kind]


@pytest.fixture(scope="module")
def server():
    s = DataServer("127.0.0.1", {"scale": _scale, "fail": _fail}, ChannelSettings(SECRET, CAPS))
    yield s
    s.close()


def client(timeout_s=10.0, **overrides):
    return DataClient(
        timeout_s, ChannelSettings(overrides.pop("secret", SECRET), CAPS, **overrides)
    )


def _pair(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(-5, 5, n).astype(np.int32), rng.standard_normal(n).astype(np.float32)


@pytest.mark.parametrize("n", [0, 1, 9, 341, 100_000])
def test_arrays_cross_both_ways_exactly(server, n):
    a, b = _pair(n, n)
    out, broken = client().call_all({0: (server.address, "scale", (a, b), (2.5,))})
    assert broken == []
    incarnation, result = out[0]
    assert incarnation == "inc-1" and result.dtype == np.float64
    np.testing.assert_array_equal(result, (a.astype(np.float64) + b) * 2.5)


def test_calls_to_several_keys_of_one_server_pair_with_their_replies(server):
    c = client()
    requests = {k: (server.address, "scale", _pair(50, k), (float(k),)) for k in range(6)}
    out, broken = c.call_all(requests)
    assert broken == []
    for k, (_, _, (a, b), _) in requests.items():
        np.testing.assert_array_equal(out[k][1], (a.astype(np.float64) + b) * k)


def test_a_handlers_error_is_raised_in_the_caller_and_the_connection_lives(server):
    c = client()
    a = np.arange(3, dtype=np.int32)
    with pytest.raises(InvalidArgument) as e:
        c.call_all({0: (server.address, "scale", (a, a), (-1,))})
    assert (e.value.field, e.value.got) == ("factor", -1)
    out, _ = c.call_all({0: (server.address, "scale", (a, a), (1,))})
    np.testing.assert_array_equal(out[0][1], 2 * a)


def test_error_classes_cross_as_json_and_others_become_memstore_errors(server):
    c = client()
    with pytest.raises(StepOutOfOrder) as e:
        c.call_all({0: (server.address, "fail", (), ("step",))})
    assert (e.value.step, e.value.last_applied) == (3, 7)
    with pytest.raises(ShardUnavailable) as e:
        c.call_all({0: (server.address, "fail", (), ("shard",))})
    assert (e.value.shard, e.value.timeout_s, e.value.cause) == ("t/shard-0-0", 2.5, "x")
    with pytest.raises(MemstoreError) as e:
        c.call_all({0: (server.address, "fail", (), ("other",))})
    assert type(e.value) is MemstoreError and "KeyError" in str(e.value)


def test_an_error_payload_naming_any_other_class_builds_nothing_but_a_memstore_error():
    touched = []
    for name in [
        "os.system",
        "subprocess.Popen",
        "_rebuild",
        "to_wire",
        "Exception",
        "builtins.eval",
        "__import__",
        "MemstoreError",
        None,
        3,
    ]:
        err = from_wire(
            {"class": name, "message": "m", "fields": {"cmd": "touch /tmp/x", "args": ["id"]}}
        )
        touched.append(type(err))
    assert touched == [MemstoreError] * 10
    # Fields a class's constructor does not accept or cannot format: the message survives.
    err = from_wire(
        {
            "class": "ShardUnavailable",
            "message": "kept",
            "fields": {"shard": "s", "timeout_s": "not a number"},
        }
    )
    assert type(err) is MemstoreError and err.message == "kept"


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_any_json_error_payload_rebuilds_as_a_memstore_error(payload):
    assert isinstance(from_wire(payload), MemstoreError)
    assert isinstance(from_wire({"class": "InvalidArgument", "fields": payload}), MemstoreError)


def test_to_wire_round_trips_every_public_error_it_can_describe():
    for err in [
        InvalidArgument("idx", "ints", (3, 4)),
        StepOutOfOrder(1, 2),
        ShardUnavailable("s", 1.0, "c"),
    ]:
        back = from_wire(json.loads(json.dumps(to_wire(err))))
        assert type(back) is type(err) and str(back).replace("[", "(").replace("]", ")") == str(err)


def test_an_unreachable_peer_is_reported_broken_and_the_others_answer(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()
    a = np.ones(4, dtype=np.float32)
    out, broken = client().call_all(
        {"up": (server.address, "scale", (a, a), (1,)), "down": (dead, "scale", (a, a), (1,))}
    )
    assert broken == ["down"] and set(out) == {"up"}


def test_a_call_beyond_the_caps_is_refused_before_anything_is_sent(server):
    before = server.faults.handled["scale"]
    big = np.zeros(CAP + 1, dtype=np.float32)
    with pytest.raises(InvalidArgument) as e:
        client().call_all(
            {
                0: (server.address, "scale", (big[:4], big[:4]), (1,)),
                1: (server.address, "scale", (big[:4], big), (1,)),
            }
        )
    assert e.value.field == "b" and e.value.got == CAP + 1
    with pytest.raises(InvalidArgument, match="op"):
        client().call_all({0: (server.address, "nope", (), ())})
    assert server.faults.handled["scale"] == before


def test_a_late_reply_is_never_returned_for_a_later_call(server):
    """The hook delays one reply past the client's timeout: the call raises, the socket
    is closed, and the next call gets its own answer, not the late one."""
    c = client(timeout_s=0.5)
    a = np.arange(4, dtype=np.int32)
    server.faults.delay_replies("scale", n=1, seconds=1.5)
    with pytest.raises(TimeoutError):
        c.call_all({0: (server.address, "scale", (a, a), (10,))})
    assert c.socks == {}
    c.timeout_s = 10
    out, _ = c.call_all({0: (server.address, "scale", (a, a), (1,))})
    np.testing.assert_array_equal(out[0][1], 2 * a)  # factor 1, not 10


def test_a_dropped_reply_ran_its_handler_and_times_out(server):
    c = client(timeout_s=0.5)
    a = np.arange(4, dtype=np.int32)
    before = server.faults.handled["scale"]
    server.faults.drop_replies("scale", n=1)
    with pytest.raises(TimeoutError):
        c.call_all({0: (server.address, "scale", (a, a), (1,))})
    assert server.faults.handled["scale"] == before + 1 and server.faults.dropped["scale"] >= 1


@pytest.fixture
def rogue():
    """A peer on the shard's wire that passes the handshake (its ZAP handler, zmq.auth's,
    knows the secret) and answers whatever the test sends; the test's thread gets each
    request from ``next_request``."""
    from zmq.auth.thread import ThreadAuthenticator

    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_plain(domain="*", passwords={PROTOCOL: SECRET})
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.plain_server = True
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    def next_request():
        assert sock.poll(10_000), "no request reached the rogue peer"
        identity, head, *_ = sock.recv_multipart()
        return identity, json.loads(head)["id"]

    yield sock, ("127.0.0.1", port), next_request
    auth.stop()
    sock.close()
    ctx.term()


def _answer_in_thread(sock, next_request, ids_and_values):
    """Answer the next request with one reply per (id offset or literal, value)."""

    def answer():
        identity, rid = next_request()
        for wrong, value in ids_and_values:
            rid_sent = rid + wrong if isinstance(wrong, int) else wrong
            sock.send_multipart(
                [identity, *encode({"id": rid_sent, "ok": True, "incarnation": "x"}, [value])]
            )

    t = Thread(target=answer)
    t.start()
    return t


def test_a_reply_with_the_wrong_request_id_is_discarded(rogue):
    sock, address, next_request = rogue
    c = client(timeout_s=5)
    a = np.arange(3, dtype=np.int32)
    t = _answer_in_thread(sock, next_request, [(1, np.full(3, 666.0)), (0, np.ones(3))])
    out, _ = c.call_all({0: (address, "scale", (a, a), (1,))})
    t.join(timeout=10)
    np.testing.assert_array_equal(out[0][1], np.ones(3))
    assert c.discarded == 1


def test_only_wrong_ids_from_a_peer_time_out_and_return_nothing(rogue):
    sock, address, next_request = rogue
    c = client(timeout_s=1)
    a = np.arange(3, dtype=np.int32)
    t = _answer_in_thread(
        sock,
        next_request,
        [(-1, np.zeros(3)), (7, np.zeros(3)), (None, np.zeros(3)), ("1", np.zeros(3))],
    )
    with pytest.raises(TimeoutError):
        c.call_all({0: (address, "scale", (a, a), (1,))})
    t.join(timeout=10)
    assert c.discarded == 4 and c.socks == {}


def test_the_header_is_checked_against_the_caps_before_any_array_is_made():
    head = json.dumps({"v": PROTOCOL, "id": 1, "arrays": [["float32", [1 << 40]]]}).encode()
    with pytest.raises(ProtocolError, match="at most 1024 elements"):
        decode([head, b"\0" * 16], lambda h: [1024])
    head = json.dumps({"v": PROTOCOL, "id": 1, "arrays": [["float32", [8]]]}).encode()
    with pytest.raises(ProtocolError, match="frame of 32 bytes"):
        decode([head, b"\0" * 16], lambda h: [1024])
    with pytest.raises(ProtocolError, match="protocol"):
        decode([json.dumps({"v": "memstore-data/0", "id": 1, "arrays": []}).encode()], lambda h: [])
    frames = encode({"id": 5}, [np.arange(6.0).reshape(2, 3)])
    header, arrays = decode(frames, lambda h: [6])
    assert header["id"] == 5 and arrays[0].shape == (2, 3)
    assert np.shares_memory(arrays[0], frames[1])  # a view of the frame, not a copy


def test_channel_config_validates_its_fields_and_makes_a_fresh_secret():
    a, b = channel_config(), channel_config("127.0.0.1", True, 10, 20)
    assert len(a["data_secret"]) == 64 and a["data_secret"] != b["data_secret"]
    assert (b["data_bind"], b["data_encrypt"], b["max_batch"], b["max_pairs"]) == (
        "127.0.0.1",
        True,
        10,
        20,
    )
    for args, field in [
        (("localhost",), "data_bind"),
        ((None, 1), "data_encrypt"),
        ((None, False, 0), "max_batch"),
        ((None, False, 8, True), "max_pairs"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            channel_config(*args)
        assert e.value.field == field
    assert SECRET not in repr(ChannelSettings(SECRET, CAPS))


def test_encrypted_channel_serves_its_own_clients_only():
    enc = ChannelSettings(SECRET, CAPS, encrypt=True)
    s = DataServer("127.0.0.1", {"scale": _scale}, enc)
    try:
        host, port, key = s.address
        assert len(key) == 40  # the server's own Z85 public key, published with its address
        a, b = _pair(100, 3)
        out, _ = DataClient(10, enc).call_all({0: (s.address, "scale", (a, b), (1.0,))})
        np.testing.assert_array_equal(out[0][1], a.astype(np.float64) + b)
        for wrong, address in (
            (ChannelSettings("b" * 64, CAPS, encrypt=True), s.address),  # another secret
            (ChannelSettings(SECRET, CAPS, encrypt=False), (host, port)),  # PLAIN
        ):
            out, broken = DataClient(3, wrong).call_all({0: (address, "scale", (a, b), (1,))})
            assert broken == [0] and out == {}
        assert s.faults.handled["scale"] == 1 and s.counters["refused"] >= 1
    finally:
        s.close()


# The rule, spelled out: loopback is 127.0.0.0/8 and ::1; anything else (another
# interface, every interface, a name) may leave the machine.
OFF_LOOPBACK = ["10.0.0.5", "192.168.1.20", "172.16.0.1", "8.8.8.8", "0.0.0.0", "localhost"]
ON_LOOPBACK = ["127.0.0.1", "127.0.0.2", "127.255.255.254", "::1"]


def test_curve_is_the_default_wherever_an_end_is_off_loopback():
    for host in OFF_LOOPBACK:
        assert uses_curve(None, host) is True, host
        assert uses_curve(False, host) is False, host  # PLAIN only when the table asks
    for host in ON_LOOPBACK:
        assert uses_curve(None, host) is False, host
        assert uses_curve(True, host) is True, host


def test_a_client_sends_the_secret_in_clear_only_on_loopback_or_when_asked():
    key = zmq.curve_keypair()[0].decode()
    for host in OFF_LOOPBACK + ON_LOOPBACK:
        for encrypt in (None, True, False):
            assert client_mechanism(encrypt, host, key) == "CURVE"
    for host in OFF_LOOPBACK:
        assert client_mechanism(False, host, None) == "PLAIN"
        for encrypt in (None, True):
            with pytest.raises(ChannelBroken):
                client_mechanism(encrypt, host, None)
    for host in ON_LOOPBACK:
        assert client_mechanism(None, host, None) == client_mechanism(False, host, None) == "PLAIN"
        with pytest.raises(ChannelBroken):
            client_mechanism(True, host, None)


def test_a_shard_publishes_a_key_of_its_own_exactly_when_it_encrypts():
    """Loopback with the default: PLAIN, no key. Encrypted: a fresh key per server, never
    one a holder of the table secret could derive."""
    servers = [
        DataServer("127.0.0.1", {"scale": _scale}, ChannelSettings(SECRET, CAPS, encrypt=e))
        for e in (None, True, True)
    ]
    try:
        plain, first, second = (s.address for s in servers)
        assert len(plain) == 3 and plain[2] is None
        assert first[2] and second[2] and first[2] != second[2]
        assert zmq.curve_public(ChannelSettings(SECRET, CAPS).client_keys()[1]).decode() not in (
            first[2],
            second[2],
        )
    finally:
        for s in servers:
            s.close()


def test_the_connection_limit_refuses_handshakes_beyond_it():
    s = DataServer("127.0.0.1", {"scale": _scale}, ChannelSettings(SECRET, CAPS, max_connections=2))
    a = np.ones(2, dtype=np.float32)
    raw = []
    try:
        # Connections that never pass the handshake take no part of the limit.
        for _ in range(10):
            raw.append(socket.create_connection(s.address[:2], timeout=5))
            assert len(raw[-1].recv(10)) > 0  # the server's greeting: it accepted this one
        held = [client() for _ in range(2)]
        for c in held:
            assert c.call_all({0: (s.address, "scale", (a, a), (1,))})[1] == []
        assert client(timeout_s=3).call_all({0: (s.address, "scale", (a, a), (1,))})[1] == [0]
        assert s.counters["refused"] == 1
        held[0].close()
        for _ in range(50):  # the server learns of the closed connection asynchronously
            out, broken = client(timeout_s=3).call_all({0: (s.address, "scale", (a, a), (1,))})
            if not broken:
                break
        assert broken == [] and 0 in out
    finally:
        for r in raw:
            r.close()
        s.close()


@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.integers(0, 3000))
def test_random_sizes_cross_exactly(server, n):
    a, b = _pair(n, n)
    out, _ = client().call_all({0: (server.address, "scale", (a, b), (0.5,))})
    np.testing.assert_array_equal(out[0][1], (a.astype(np.float64) + b) * 0.5)
