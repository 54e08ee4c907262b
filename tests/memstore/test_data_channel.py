"""The lookup/push transport on its own: frames, errors crossing it, broken peers."""

import socket

import numpy as np
import pytest

from memstore import InvalidArgument
from memstore._internal.data_channel import (
    ChannelBroken,
    DataClient,
    DataServer,
    recv_frame,
    send_frame,
)


def _scale(a, b, factor):
    """A handler like the shard's: arrays then scalars in, (incarnation, array) out."""
    if factor < 0:
        raise InvalidArgument("factor", "a number >= 0", factor)
    return "inc-1", (a.astype(np.float64) + b) * factor


@pytest.fixture
def server():
    s = DataServer("127.0.0.1", {"scale": _scale})
    yield s
    s.close()


@pytest.mark.parametrize("n", [0, 1, 9, 341, 100_000])
def test_arrays_cross_both_ways_exactly(server, n):
    rng = np.random.default_rng(n)
    a, b = rng.integers(-5, 5, n).astype(np.int32), rng.standard_normal(n).astype(np.float32)
    out, broken = DataClient(10).call_all({0: (server.address, "scale", (a, b), (2.5,))})
    assert broken == []
    incarnation, result = out[0]
    assert incarnation == "inc-1" and result.dtype == np.float64
    np.testing.assert_array_equal(result, (a.astype(np.float64) + b) * 2.5)


def test_a_handlers_error_is_raised_in_the_caller_and_the_connection_lives(server):
    client = DataClient(10)
    a = np.arange(3, dtype=np.int32)
    with pytest.raises(InvalidArgument) as e:
        client.call_all({0: (server.address, "scale", (a, a), (-1,))})
    assert e.value.field == "factor"
    out, _ = client.call_all({0: (server.address, "scale", (a, a), (1,))})
    np.testing.assert_array_equal(out[0][1], 2 * a)


def test_an_unreachable_peer_is_reported_broken_and_the_others_answer(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()
    a = np.ones(4, dtype=np.float32)
    out, broken = DataClient(10).call_all({"up": (server.address, "scale", (a, a), (1,)),
                                           "down": (dead, "scale", (a, a), (1,))})
    assert broken == ["down"] and set(out) == {"up"}


def test_a_malformed_frame_is_refused_before_allocating():
    left, right = socket.socketpair()
    with left, right:
        send_frame(left, {"op": "x"}, (np.zeros(4, dtype=np.float32),))
        header, arrays, _ = recv_frame(right)
        assert header["op"] == "x" and arrays[0].shape == (4,)
        # A header that claims 2**40 floats with no data behind them.
        head = b'{"arrays": [["float32", [1099511627776]]]}'
        left.sendall(len(head).to_bytes(4, "little") + (0).to_bytes(8, "little") + head)
        with pytest.raises(ChannelBroken, match="larger than its data"):
            recv_frame(right)
