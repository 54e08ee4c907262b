"""The data path of lookups and pushes: one TCP connection per (client, shard).

A Ray actor call costs about a millisecond of CPU on each side (task submission,
argument serialization, the reply through the core worker), which is more than a
shard needs to answer a lookup of a few hundred tokens. A training step makes two
such rounds per shard and worker, so on a small machine Ray's overhead, not the
table, set the step time. Lookups and pushes therefore travel over a plain socket that
each shard opens next to its actor: a frame is a JSON header plus the arrays' raw
bytes, sent with one scatter-gather write and received straight into numpy arrays.

Everything else (creation, steps, checkpoints, restarts, the incarnation protocol)
stays on Ray. A client that loses its connection (shard died, restarted, or the
socket failed) raises :class:`ChannelBroken` and the table handle repeats that call
over Ray, where dead and restarted shards are detected and handled.

Frame: ``<I header bytes><Q data bytes>``, the UTF-8 JSON header, then the arrays
back to back. A request header is ``{"op", "args", "arrays": [[dtype, shape], ...]}``;
a reply is ``{"ok": true, "incarnation", "arrays"}`` or ``{"ok": false}`` with the
pickled exception as data.
"""

from __future__ import annotations

import json
import math
import pickle
import socket
import struct
import threading

import numpy as np

from ..errors import MemstoreError

_PREFIX = struct.Struct("<IQ")
MAX_HEADER_BYTES = 1 << 20
MAX_DATA_BYTES = 1 << 34  # 16 GiB: larger frames are refused as malformed
_DTYPES = {"int32", "int64", "float32", "float64", "uint16"}


class ChannelBroken(ConnectionError):
    """The connection failed; the caller repeats the call over Ray."""


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        n = sock.recv_into(view)
        if n == 0:
            raise ChannelBroken("the peer closed the connection")
        view = view[n:]


def _describe(arrays) -> list:
    return [[a.dtype.name, list(a.shape)] for a in arrays]


def send_frame(sock: socket.socket, header: dict, arrays=(), data: bytes = b"") -> None:
    """One frame with a single scatter-gather write loop (the arrays are not copied)."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    head = json.dumps({**header, "arrays": _describe(arrays)}).encode()
    size = len(data) + sum(a.nbytes for a in arrays)
    views = [memoryview(_PREFIX.pack(len(head), size) + head + data)]
    views += [memoryview(a).cast("B") for a in arrays if a.nbytes]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def recv_frame(sock: socket.socket) -> tuple[dict, list[np.ndarray], bytes]:
    """(header, arrays, leftover data) of the next frame; arrays are fresh and writable."""
    prefix = bytearray(_PREFIX.size)
    _recv_exact(sock, memoryview(prefix))
    head_len, data_len = _PREFIX.unpack(prefix)
    if head_len > MAX_HEADER_BYTES or data_len > MAX_DATA_BYTES:
        raise ChannelBroken(f"malformed frame: header {head_len} B, data {data_len} B")
    head = bytearray(head_len)
    _recv_exact(sock, memoryview(head))
    header = json.loads(head)
    described = header.pop("arrays")
    if any(dtype not in _DTYPES for dtype, _ in described):
        raise ChannelBroken(f"malformed frame: dtypes {[d for d, _ in described]}")
    if sum(np.dtype(d).itemsize * math.prod(shape) for d, shape in described) > data_len:
        raise ChannelBroken("malformed frame: arrays larger than its data")
    arrays = []
    for dtype, shape in described:
        a = np.empty(shape, dtype=dtype)
        if a.nbytes:
            _recv_exact(sock, memoryview(a).cast("B"))
        arrays.append(a)
    rest = bytearray(data_len - sum(a.nbytes for a in arrays))
    if rest:
        _recv_exact(sock, memoryview(rest))
    return header, arrays, bytes(rest)


class DataServer:
    """Serves ``handlers[op](*arrays, *args) -> (incarnation, array)`` to any number of
    connections, one thread each. The handlers do their own locking."""

    def __init__(self, host: str, handlers: dict):
        self.handlers = handlers
        self.sock = socket.create_server((host, 0), backlog=64)
        self.address = (host, self.sock.getsockname()[1])
        threading.Thread(target=self._accept, name="memstore-data-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="memstore-data",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    header, arrays, _ = recv_frame(conn)
                except (ChannelBroken, OSError, ValueError):
                    return
                try:
                    handler = self.handlers[header["op"]]
                    incarnation, result = handler(*arrays, *header.get("args", ()))
                    reply = ({"ok": True, "incarnation": incarnation}, [result], b"")
                except Exception as e:  # noqa: BLE001 - every error goes back to the caller
                    reply = ({"ok": False}, [], _pickled(e))
                try:
                    send_frame(conn, *reply)
                except OSError:
                    return

    def close(self) -> None:
        self.sock.close()


def _pickled(error: Exception) -> bytes:
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
        return data
    except Exception:  # noqa: BLE001 - an error that does not pickle still gets reported
        return pickle.dumps(MemstoreError(f"{type(error).__name__}: {error}"))


class DataClient:
    """One connection per shard, opened on first use; calls to several shards are all
    sent before any reply is read, so the shards work in parallel."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.socks: dict = {}
        self.lock = threading.Lock()

    def _sock(self, address) -> socket.socket:
        sock = self.socks.get(address)
        if sock is None:
            try:
                sock = socket.create_connection(tuple(address), timeout=self.timeout_s)
            except OSError as e:
                raise ChannelBroken(f"cannot connect to {address}: {e}") from e
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks[address] = sock
        return sock

    def call_all(self, requests: dict) -> tuple[dict, list]:
        """{key: (address, op, arrays, args)} -> ({key: (incarnation, array)}, broken keys).

        A key is broken when its connection failed (the caller repeats that call over
        Ray); the others' replies are read either way, so every connection stays in
        step. An error a shard raised is re-raised here, after all replies are read.
        A shard that does not answer within the timeout raises TimeoutError.
        """
        with self.lock:
            sent, broken, replies = {}, [], {}
            for key, (address, op, arrays, args) in requests.items():
                try:
                    send_frame(self._sock(address), {"op": op, "args": list(args)}, arrays)
                    sent[key] = address
                except (ChannelBroken, OSError):
                    self._drop(address)
                    broken.append(key)
            timed_out = None
            for key, address in sent.items():
                try:
                    replies[key] = recv_frame(self.socks[address])
                except TimeoutError as e:
                    self._drop(address)
                    timed_out = e
                except (ChannelBroken, OSError, ValueError):
                    self._drop(address)
                    broken.append(key)
        if timed_out is not None:
            raise timed_out
        out, error = {}, None
        for key, (header, arrays, data) in replies.items():
            if header.get("ok"):
                out[key] = (header["incarnation"], arrays[0])
            elif error is None:
                error = pickle.loads(data)
        if error is not None:
            raise error
        return out, broken

    def _drop(self, address) -> None:
        sock = self.socks.pop(address, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for sock in self.socks.values():
            try:
                sock.close()
            except OSError:
                pass
        self.socks.clear()
