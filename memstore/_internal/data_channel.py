"""The data path of lookups, pushes and steps: ZeroMQ between a table handle and its
shards.

A Ray actor call costs about a millisecond of CPU on each side, more than a shard needs
to answer a lookup of a few hundred tokens, so lookups, pushes and steps travel over a
ZeroMQ socket that each shard opens next to its actor (everything else stays on Ray). The
shard binds one ROUTER socket served by one thread with a poller; each client holds one
DEALER socket per shard. A message is a JSON header frame plus one frame per array,
sent and received without copies (numpy arrays are views of the received frames).

Security and bounds, all enforced before a payload reaches a handler:

* **Authentication at connect, both ways.** Every connection passes the ZMTP handshake
  through a ZAP handler in the shard's process. With CURVE (the default wherever a shard
  listens on, or a client connects to, an address that is not loopback) every message is
  encrypted; the client proves the table's secret with a key pair derived from it, and
  the shard proves its identity with a key pair of its own, made fresh by each shard
  process and published with its address through Ray (``DataServer.address``), so a
  peer that took over a shard's port cannot finish the handshake. PLAIN (the secret as
  password, in clear) is used only on loopback, or where the table asks for it
  (``encrypt=False``, logged as a warning off loopback). A peer that fails never gets a
  message delivered.
* **Sizes.** ``MAXMSGSIZE`` makes ZeroMQ drop a peer that announces a frame larger than
  the table allows, before the frame is allocated; each request is then checked against
  its operation's caps (derived from the table's ``max_batch``, ``max_pairs`` and block
  width) from the header before any array view is made. Receive high-water marks bound
  what one connection can queue; a connection limit bounds the authenticated
  connections (a TCP connection that never passes the handshake takes no part of it,
  and is dropped after ``HANDSHAKE_S``).
* **Liveness.** ZMTP heartbeats drop dead peers; a handshake must finish within
  ``HANDSHAKE_S``. The server loop survives any error (running out of descriptors
  included: libzmq's listener retries accepting).
* **Exactly the reply asked for.** Every request carries an id the reply echoes; a
  reply with another id is discarded. A client closes a shard's socket on any failure
  mid-call, so nothing of an abandoned call is read later.
* **No pickle.** Errors cross as JSON (:func:`memstore.errors.to_wire`), rebuilt by
  constructor from an allow-list of memstore error classes.

A client that loses its connection (shard died, restarted, refused the handshake)
reports the call broken and the table handle repeats it over Ray, where dead and
restarted shards are detected and handled.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import json
import logging
import math
import secrets
import threading
import time

import numpy as np
import zmq
import zmq.utils.monitor
import zmq.utils.z85

from ..errors import InvalidArgument, from_wire, to_wire

log = logging.getLogger(__name__)

PROTOCOL = "memstore-data/1"
DTYPES = frozenset({"int32", "int64", "float32", "float64", "uint16"})
MAX_ITEMSIZE = 8
MAX_HEADER_BYTES = 1 << 16
MAX_ARGS = 16
DEFAULT_MAX_BATCH = 1 << 16
DEFAULT_MAX_PAIRS = 1 << 22
DEFAULT_MAX_CONNECTIONS = 256
HEARTBEAT_S = 2.0
HEARTBEAT_TIMEOUT_S = 20.0
HANDSHAKE_S = 5.0
CONNECT_S = 10.0
# Messages one connection may have queued on either side; a client has one request in
# flight per shard, so anything beyond this is a misbehaving peer, held back by TCP.
QUEUED_MESSAGES = 64
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_BROKEN_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CLOSED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_MONITOR_STOPPED
)


class ChannelBroken(ConnectionError):
    """The connection failed; the caller repeats the call over Ray."""


class ProtocolError(ValueError):
    """A message that does not follow the protocol or exceeds its caps."""


# ---- settings ------------------------------------------------------------------------
def channel_config(
    bind: str | None = None,
    encrypt: bool | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> dict:
    """A new table's config entries for its data channel, validated, with a fresh secret:
    ``bind`` the IPv4 address shards listen on (None: their node's IP; "0.0.0.0": every
    interface), ``encrypt`` (None: CURVE wherever an end is not on loopback; True: CURVE
    everywhere; False: PLAIN everywhere, the secret in clear), and the most rows
    (``max_batch``) and (row, weight) pairs (``max_pairs``) one call may bring to one
    shard."""
    if bind is not None:
        try:
            ipaddress.IPv4Address(bind)
        except (ipaddress.AddressValueError, TypeError):
            raise InvalidArgument(
                "data_bind",
                "an IPv4 address of the shards' nodes, or None for each node's IP",
                bind,
            ) from None
    if encrypt is not None and not isinstance(encrypt, bool):
        raise InvalidArgument("data_encrypt", "None, True or False", encrypt)
    for field, value in (("max_batch", max_batch), ("max_pairs", max_pairs)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 30:
            raise InvalidArgument(field, "an int in [1, 2**30]", value)
    return {
        "data_secret": secrets.token_hex(32),
        "data_bind": bind,
        "data_encrypt": encrypt,
        "max_batch": max_batch,
        "max_pairs": max_pairs,
    }


@dataclasses.dataclass(frozen=True)
class OpCaps:
    """Most elements of each array of one operation's request, and of its reply."""

    arrays: tuple[tuple[str, str, int], ...]  # (array name, table setting, most elements)
    reply: int


def table_caps(max_batch: int, max_pairs: int, cols: int) -> dict[str, OpCaps]:
    """The ops a shard serves: lookup(rows, w, offsets) -> y (B, cols),
    backward(rows, w, offsets, dy (B, cols)) -> dw (pairs) and step([rows]) -> the rows
    updated (a sparse step's rows of the block, else scalars only)."""
    # Named by the caller's argument each array comes from: a refusal names that.
    pairs = (
        ("idx", "max_pairs", max_pairs),
        ("w", "max_pairs", max_pairs),
        ("idx", "max_batch", max_batch + 1),
    )
    return {
        "lookup": OpCaps(pairs, max_batch * cols),
        "backward": OpCaps(pairs + (("dy", "max_batch", max_batch * cols),), max_pairs),
        "step": OpCaps((("rows", "max_pairs", max_pairs),), 1),
    }


@dataclasses.dataclass(frozen=True)
class ChannelSettings:
    """What both ends of a table's data channel agree on. The secret never shows in a
    repr, log or stats."""

    secret: str = dataclasses.field(repr=False)
    caps: dict = dataclasses.field(default_factory=dict)
    encrypt: bool | None = None  # None: CURVE wherever an end is not on loopback
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    @classmethod
    def from_config(cls, config: dict) -> ChannelSettings:
        bounds = config["grid"]["col_bounds"]
        cols = max(b - a for a, b in zip(bounds, bounds[1:]))
        caps = table_caps(
            int(config.get("max_batch") or DEFAULT_MAX_BATCH),
            int(config.get("max_pairs") or DEFAULT_MAX_PAIRS),
            cols,
        )
        return cls(secret=config["data_secret"], caps=caps, encrypt=config.get("data_encrypt"))

    def request_bytes(self) -> int:
        """The largest frame a server accepts (ZeroMQ's MAXMSGSIZE)."""
        most = max((n for c in self.caps.values() for _, _, n in c.arrays), default=0)
        return max(MAX_HEADER_BYTES, most * MAX_ITEMSIZE)

    def reply_bytes(self) -> int:
        most = max((c.reply for c in self.caps.values()), default=0)
        return max(MAX_HEADER_BYTES, most * MAX_ITEMSIZE)

    def client_keys(self) -> tuple[bytes, bytes]:
        """(public, secret) Z85 CURVE keys of the table's clients, derived from the table
        secret and the protocol version: holding the secret is the client's credential.
        A shard's keys are its own (:class:`DataServer`), never derived from the secret,
        which every client holds."""
        seed = hmac.new(self.secret.encode(), f"{PROTOCOL}|client".encode(), hashlib.sha256)
        secret_key = zmq.utils.z85.encode(seed.digest())
        return zmq.curve_public(secret_key), secret_key


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1). Names and 0.0.0.0
    (every interface) are not: what they reach is not known to stay on the machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def uses_curve(encrypt: bool | None, host: str) -> bool:
    """Whether a shard listening on ``host`` encrypts its channel: the table's
    ``encrypt`` where it set one, else whenever ``host`` is not loopback."""
    return not is_loopback(host) if encrypt is None else encrypt


def client_mechanism(encrypt: bool | None, host: str, server_key: str | None) -> str:
    """The client's mechanism: "CURVE" towards a shard that published its key; "PLAIN"
    towards one that did not, only where the table allows it (``host`` on loopback with
    ``encrypt`` None, or ``encrypt`` False). Raises ChannelBroken otherwise: the secret is
    never sent in clear off the machine unless the table asked for it, and the call goes
    over Ray instead."""
    if server_key:
        return "CURVE"
    if encrypt is False or (encrypt is None and is_loopback(host)):
        return "PLAIN"
    raise ChannelBroken(f"the shard at {host} published no CURVE key; PLAIN refused off loopback")


def split_address(address) -> tuple[str, int, str | None]:
    """(host, port, the shard's Z85 CURVE public key or None) of a shard's published
    address, (host, port[, key])."""
    host, port, *key = address
    return str(host), int(port), (str(key[0]) if key and key[0] else None)


def _common_options(sock: zmq.Socket, max_bytes: int) -> None:
    sock.linger = 0
    sock.maxmsgsize = max_bytes
    sock.rcvhwm = QUEUED_MESSAGES
    sock.sndhwm = QUEUED_MESSAGES
    sock.heartbeat_ivl = int(HEARTBEAT_S * 1000)
    sock.heartbeat_timeout = int(HEARTBEAT_TIMEOUT_S * 1000)
    sock.heartbeat_ttl = int(HEARTBEAT_TIMEOUT_S * 1000)
    sock.handshake_ivl = int(HANDSHAKE_S * 1000)


# ---- messages --------------------------------------------------------------------------
def encode(header: dict, arrays=()) -> list:
    """[header, *arrays] frames; the arrays are sent from their own memory."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    head = {**header, "v": PROTOCOL, "arrays": [[a.dtype.name, list(a.shape)] for a in arrays]}
    return [json.dumps(head).encode()] + [a if a.nbytes else b"" for a in arrays]


def _buffer(frame) -> memoryview:
    """The bytes of a received frame (or of a buffer, for messages built in-process)."""
    view = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def decode(frames: list, caps_of) -> tuple[dict, list[np.ndarray]]:
    """(header, arrays) of a message, checked against the protocol and the caps that
    ``caps_of(header)`` returns (a list of most elements per array) before any array is
    made; the arrays are read-only views of the frames. Raises ProtocolError."""
    if not frames:
        raise ProtocolError("an empty message")
    head = _buffer(frames[0])
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(f"a header of {len(head)} bytes (at most {MAX_HEADER_BYTES})")
    try:
        header = json.loads(bytes(head))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"a header that is not JSON: {e}") from None
    if not isinstance(header, dict) or header.get("v") != PROTOCOL:
        raise ProtocolError(f"a header of protocol {PROTOCOL!r}")
    rid = header.get("id")
    if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid < 1 << 63:
        raise ProtocolError("a request id in [0, 2**63)")
    described = header.get("arrays")
    caps = caps_of(header)
    if (
        not isinstance(described, list)
        or len(described) != len(frames) - 1
        or len(described) > len(caps)
    ):
        raise ProtocolError(f"at most {len(caps)} arrays, one frame each")
    return header, [_view(d, _buffer(f), cap) for d, f, cap in zip(described, frames[1:], caps)]


def _view(described, buf: memoryview, cap: int) -> np.ndarray:
    if not (
        isinstance(described, list)
        and len(described) == 2
        and described[0] in DTYPES
        and isinstance(described[1], list)
        and len(described[1]) <= 4
        and all(type(n) is int and n >= 0 for n in described[1])
    ):
        raise ProtocolError(f"an array described as [dtype, shape], got {described!r:.200}")
    dtype, shape = np.dtype(described[0]), described[1]
    count = math.prod(shape)
    if count > cap:
        raise ProtocolError(f"an array of at most {cap} elements, got {count}")
    if count * dtype.itemsize != len(buf):
        raise ProtocolError(f"a frame of {count * dtype.itemsize} bytes, got {len(buf)}")
    if count == 0:
        return np.empty(shape, dtype=dtype)
    a = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return a if a.flags.aligned else a.copy()


# ---- server ----------------------------------------------------------------------------
class ReplyFaults:
    """Test hook of a DataServer: lose or delay the replies of the next calls of an op.
    The handler runs either way, so a dropped reply is a call that took effect and whose
    answer was lost."""

    def __init__(self):
        self._lock = threading.Lock()
        self._plans: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.handled: collections.Counter = collections.Counter()  # op -> handler calls
        self.dropped: collections.Counter = collections.Counter()

    def drop_replies(self, op: str, n: int = 1) -> None:
        with self._lock:
            self._plans[op].extend([None] * n)

    def delay_replies(self, op: str, n: int = 1, seconds: float = 1.0) -> None:
        with self._lock:
            self._plans[op].extend([float(seconds)] * n)

    def _next(self, op: str):
        """ "send", "drop", or a delay in seconds for the reply of a call of ``op``."""
        with self._lock:
            self.handled[op] += 1
            if not self._plans.get(op):
                return "send"
            plan = self._plans[op].popleft()
            if plan is None:
                self.dropped[op] += 1
                return "drop"
            return plan


class DataServer:
    """Serves ``handlers[op](*arrays, *args) -> (incarnation, array[, seen])`` to
    authenticated clients from one thread; the handlers do their own locking. ``seen``
    (a small JSON value) travels in the reply's header.

    ``address`` is (host, port, public key) for clients: ``host``, or ``advertised_host``
    when ``host`` is 0.0.0.0 (every interface), and the Z85 CURVE public key of this
    server, made fresh for it (None with PLAIN); the shard publishes it through Ray, and a
    client accepts no other key. ``faults`` is the test hook (:class:`ReplyFaults`);
    ``counters`` counts refused handshakes and malformed requests.
    """

    def __init__(
        self,
        host: str,
        handlers: dict,
        settings: ChannelSettings,
        advertised_host: str | None = None,
    ):
        self.handlers = handlers
        self.settings = settings
        self.faults = ReplyFaults()
        self.counters: collections.Counter = collections.Counter()
        # The connection limit counts authenticated connections only: those seen sending
        # (by descriptor, until they disconnect), and handshakes granted within the last
        # HANDSHAKE_S whose connection has not sent yet.
        self._authenticated: set[int] = set()
        self._grants: collections.deque[float] = collections.deque()
        self._delayed: list = []  # heap of (due, seq, frames)
        self._seq = itertools.count()
        self._ctx = zmq.Context(io_threads=1)
        self._zap = self._ctx.socket(zmq.REP)
        self._zap.linger = 0
        self._zap.bind(_ZAP_ENDPOINT)
        self._router = self._ctx.socket(zmq.ROUTER)
        _common_options(self._router, settings.request_bytes())
        self._router.router_mandatory = 1
        self._router.zap_domain = b"memstore"
        self.curve = uses_curve(settings.encrypt, host)
        public_key = None
        if self.curve:
            public, self._router.curve_secretkey = zmq.curve_keypair()
            self._router.curve_publickey, public_key = public, public.decode("ascii")
            self._router.curve_server = True
        else:
            self._router.plain_server = True
            if not is_loopback(host):
                log.warning(
                    "data channel on %s uses PLAIN (data_encrypt=False): the table's secret "
                    "and its data cross the network in clear",
                    host,
                )
        self._monitor = self._router.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPT_FAILED
        )
        port = self._router.bind_to_random_port(f"tcp://{host}")
        self.address = (
            advertised_host if host == "0.0.0.0" and advertised_host else host,
            port,
            public_key,
        )
        self._thread = threading.Thread(target=self._serve, name="memstore-data", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        for sock in (self._monitor, self._zap, self._router):
            poller.register(sock, zmq.POLLIN)
        try:
            while True:
                try:
                    ready = dict(poller.poll(self._poll_timeout_ms()))
                    if self._monitor in ready:
                        self._note_connection_events()
                    if self._zap in ready:
                        self._answer_zap()
                    if self._router in ready:
                        self._serve_request()
                    self._send_due()
                except zmq.ContextTerminated:
                    raise
                except Exception:  # noqa: BLE001 - the listener outlives any one failure
                    self.counters["loop_errors"] += 1
                    log.exception("data channel server: an iteration failed; serving on")
                    time.sleep(0.01)
        except zmq.ContextTerminated:
            pass
        finally:
            for sock in (self._monitor, self._zap, self._router):
                sock.close(linger=0)

    def _poll_timeout_ms(self):
        if not self._delayed:
            return None
        return max(0, int(1000 * (self._delayed[0][0] - time.monotonic())) + 1)

    def _note_connection_events(self) -> None:
        """Every queued monitor event, before the messages of this iteration: a
        descriptor closed and reused is then forgotten before its new connection sends."""
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._authenticated.discard(event["value"])
            else:  # ACCEPT_FAILED: out of descriptors, say; libzmq's listener keeps accepting
                self.counters["accept_failed"] += 1

    def _note_sender(self, frame: zmq.Frame) -> None:
        """Count the connection a message came from (its descriptor, which libzmq
        attaches to every message) as authenticated: only a peer that passed ZAP can
        send one. It takes the place of the oldest outstanding grant."""
        fd = frame.get(zmq.SRCFD)
        if fd not in self._authenticated:
            self._authenticated.add(fd)
            if self._grants:
                self._grants.popleft()

    def authenticated_connections(self) -> int:
        """Authenticated connections open, and handshakes granted in the last
        ``HANDSHAKE_S`` whose connection has not sent yet."""
        expired = time.monotonic() - HANDSHAKE_S
        while self._grants and self._grants[0] < expired:
            self._grants.popleft()
        return len(self._authenticated) + len(self._grants)

    def _answer_zap(self) -> None:
        """One ZAP request (RFC 27): 200 for the table's credentials while the
        connection limit allows, 400 otherwise. Only ZAP requests reach here: a TCP
        connection that never completes a greeting costs the limit nothing."""
        frames = self._zap.recv_multipart(zmq.NOBLOCK)
        if len(frames) < 6:
            return
        request_id, mechanism, credentials = frames[1], frames[5], frames[6:]
        ok = self._credentials_ok(mechanism, credentials)
        if ok and self.authenticated_connections() >= self.settings.max_connections:
            ok, reason = False, b"too many connections"
        else:
            reason = b"OK" if ok else b"bad credentials"
        if ok:
            self._grants.append(time.monotonic())
        else:
            self.counters["refused"] += 1
        self._zap.send_multipart(
            [b"1.0", request_id, b"200" if ok else b"400", reason, b"memstore" if ok else b"", b""]
        )

    def _credentials_ok(self, mechanism: bytes, credentials: list) -> bool:
        if self.curve:
            if mechanism != b"CURVE" or len(credentials) != 1:
                return False
            public, _ = self.settings.client_keys()
            return hmac.compare_digest(credentials[0], zmq.utils.z85.decode(public))
        if mechanism != b"PLAIN" or len(credentials) != 2:
            return False
        version_ok = hmac.compare_digest(credentials[0], PROTOCOL.encode())
        return hmac.compare_digest(credentials[1], self.settings.secret.encode()) and version_ok

    def _caps_of(self, header: dict) -> list[int]:
        caps = self.settings.caps.get(header.get("op"))
        if caps is None or header.get("op") not in self.handlers:
            raise ProtocolError(f"an op among {sorted(self.handlers)}")
        return [n for _, _, n in caps.arrays]

    def _serve_request(self) -> None:
        try:
            identity, *frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        self._note_sender(identity)
        op, header = None, {}
        try:
            header, arrays = decode(frames, self._caps_of)
            op, args = header["op"], header.get("args", [])
            if (
                not isinstance(args, list)
                or len(args) > MAX_ARGS
                or not all(a is None or isinstance(a, (bool, int, float, str)) for a in args)
            ):
                raise ProtocolError(f"args: a list of at most {MAX_ARGS} JSON scalars")
        except ProtocolError as e:
            self.counters["malformed"] += 1
            rid = header.get("id") if isinstance(header, dict) else None
            self._send(
                [
                    identity,
                    *encode(
                        {
                            "id": rid,
                            "ok": False,
                            "error": to_wire(
                                InvalidArgument("frame", str(e), "a malformed request")
                            ),
                        }
                    ),
                ]
            )
            return
        reply = self._run(op, arrays, args)
        action = self.faults._next(op)
        frames = [identity, *encode({"id": header["id"], **reply[0]}, reply[1])]
        if action == "send":
            self._send(frames)
        elif action != "drop":
            heapq.heappush(self._delayed, (time.monotonic() + action, next(self._seq), frames))

    def _run(self, op: str, arrays: list, args: list) -> tuple[dict, list]:
        try:
            incarnation, result, *seen = self.handlers[op](*arrays, *args)
            result = np.asarray(result)
            if result.dtype.name not in DTYPES:
                raise TypeError(f"handler {op} returned dtype {result.dtype}")
            head = {"ok": True, "incarnation": str(incarnation)}
            if seen:
                head["seen"] = seen[0]
            return head, [result]
        except Exception as e:  # noqa: BLE001 - every error goes back to the caller
            return {"ok": False, "error": to_wire(e)}, []

    def _send(self, frames: list) -> None:
        try:
            self._router.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the peer left (EHOSTUNREACH) or is not reading
            self.counters["unsent"] += 1
            log.debug("data channel server: reply not sent: %s", e)

    def _send_due(self) -> None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            self._send(heapq.heappop(self._delayed)[2])

    def close(self) -> None:
        """Stop serving: the thread closes its sockets as the context ends."""
        self._ctx.term()
        self._thread.join(timeout=10)


# ---- client ----------------------------------------------------------------------------
class _Peer:
    """One authenticated DEALER connection to a shard, and the monitor that says when it
    breaks."""

    def __init__(self, ctx: zmq.Context, address, settings: ChannelSettings, wait_s: float):
        self.sock = ctx.socket(zmq.DEALER)
        _common_options(self.sock, settings.reply_bytes())
        self.sock.immediate = 1
        self.sock.reconnect_ivl = -1
        host, port, server_key = split_address(address)
        try:
            self._set_credentials(settings, host, server_key)
        except (ChannelBroken, zmq.ZMQError) as e:
            self.sock.close(linger=0)
            raise ChannelBroken(f"cannot connect to {address}: {e}") from e
        self.monitor = self.sock.get_monitor_socket()
        try:
            self.sock.connect(f"tcp://{host}:{port}")
            self._await_handshake(address, wait_s)
        except (ChannelBroken, zmq.ZMQError) as e:
            self.close()
            raise ChannelBroken(f"cannot connect to {address}: {e}") from e

    def _set_credentials(self, settings: ChannelSettings, host: str, server_key) -> None:
        if client_mechanism(settings.encrypt, host, server_key) == "CURVE":
            # The key the shard published through Ray: a peer holding any other key (one
            # that took over the port, or derived a key from the table secret) fails the
            # handshake before the client sends anything of its own.
            self.sock.curve_serverkey = server_key.encode("ascii")
            self.sock.curve_publickey, self.sock.curve_secretkey = settings.client_keys()
            return
        if not is_loopback(host):
            log.warning("data channel to %s uses PLAIN (data_encrypt=False)", host)
        self.sock.plain_username = PROTOCOL.encode()
        self.sock.plain_password = settings.secret.encode()

    def _await_handshake(self, address, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.monitor.poll(int(left * 1000) + 1):
                raise ChannelBroken(f"no handshake with {address} within {wait_s:g} s")
            event = zmq.utils.monitor.recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return
            if event & _BROKEN_EVENTS:
                raise ChannelBroken(f"handshake with {address} failed (event {event})")

    def broke(self) -> bool:
        """Whether the monitor reported the connection gone since the last look."""
        while self.monitor.poll(0):
            event = zmq.utils.monitor.recv_monitor_message(self.monitor)["event"]
            if event & _BROKEN_EVENTS:
                return True
        return False

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class DataClient:
    """One DEALER socket per shard, connected and authenticated on first use; calls to
    several shards are all sent before any reply is read, so the shards work in parallel."""

    def __init__(self, timeout_s: float, settings: ChannelSettings):
        self.timeout_s = timeout_s
        self.settings = settings
        # The process's shared context, never terminated: a context of its own would
        # have to be terminated when the handle goes, and terminating from a garbage
        # collection can block on sockets still open.
        self.ctx = zmq.Context.instance()
        self.socks: dict = {}
        self.ids = itertools.count(1)
        self.discarded = 0  # replies whose id was not the one awaited
        self.lock = threading.Lock()

    def _peer(self, address) -> _Peer:
        address = tuple(address)
        peer = self.socks.get(address)
        if peer is not None and peer.broke():
            self._drop(address)
            peer = None
        if peer is None:
            peer = _Peer(self.ctx, address, self.settings, min(self.timeout_s, CONNECT_S))
            self.socks[address] = peer
        return peer

    def check(self, requests: dict) -> None:
        """Raise InvalidArgument for a request beyond the table's caps, before any is sent."""
        for _address, op, arrays, _args in requests.values():
            caps = self.settings.caps.get(op)
            if caps is None:
                raise InvalidArgument("op", f"one of {sorted(self.settings.caps)}", op)
            if len(arrays) > len(caps.arrays):
                raise InvalidArgument(op, f"at most {len(caps.arrays)} arrays", len(arrays))
            for a, (name, setting, most) in zip(arrays, caps.arrays):
                if np.size(a) > most:
                    raise InvalidArgument(
                        name,
                        f"at most {most} elements per shard and call (the table's {setting})",
                        np.size(a),
                    )

    def call_all(self, requests: dict) -> tuple[dict, list]:
        """{key: (address, op, arrays, args)} -> ({key: (incarnation, array[, seen])},
        broken keys); ``seen`` where the handler returned one.

        A key is broken when its connection failed (the caller repeats that call over
        Ray). An error a shard raised is re-raised here, after all replies are read. A
        shard that does not answer within the timeout raises TimeoutError. On any
        failure the sockets involved are closed, so no late reply is ever read.
        """
        self.check(requests)
        with self.lock:
            pending, broken = {}, []
            try:
                for key, (address, op, arrays, args) in requests.items():
                    try:
                        peer = self._peer(address)
                        rid = next(self.ids)
                        peer.sock.send_multipart(
                            encode({"id": rid, "op": op, "args": list(args)}, arrays),
                            copy=False,
                            flags=zmq.NOBLOCK,
                        )
                        pending[rid] = (key, tuple(address), op)
                    except (ChannelBroken, zmq.ZMQError) as e:
                        log.debug("data channel: %s", e)
                        self._drop(address)
                        broken.append(key)
                replies, timed_out = self._collect(pending, broken)
            except BaseException:
                for _, address, _ in pending.values():
                    self._drop(address)
                raise
        if timed_out:
            raise TimeoutError(f"no reply from {timed_out} within {self.timeout_s:g} s")
        out, error = {}, None
        for key, header, arrays in replies:
            if header.get("ok") is True and len(arrays) == 1:
                seen = header.get("seen")
                out[key] = (
                    (header.get("incarnation"), arrays[0])
                    if seen is None
                    else (header.get("incarnation"), arrays[0], seen)
                )
            elif error is None:
                error = from_wire(header.get("error"))
        if error is not None:
            raise error
        return out, broken

    def _collect(self, pending: dict, broken: list) -> tuple[list, list]:
        """Replies of the pending requests until each is answered, broken or late."""
        replies = []
        deadline = time.monotonic() + self.timeout_s
        poller = zmq.Poller()
        waiting = {address for _, address, _ in pending.values()}
        for address in waiting:
            poller.register(self.socks[address].sock, zmq.POLLIN)
            poller.register(self.socks[address].monitor, zmq.POLLIN)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready = dict(poller.poll(int(left * 1000) + 1))
            for address in list(waiting):
                peer = self.socks[address]
                if peer.sock in ready:
                    replies += self._receive(peer, address, pending)
                if peer.monitor in ready and peer.broke():
                    replies += self._receive(peer, address, pending)
                    lost = [rid for rid, (_, a, _) in pending.items() if a == address]
                    broken += [pending.pop(rid)[0] for rid in lost]
                    poller.unregister(peer.sock)
                    poller.unregister(peer.monitor)
                    waiting.discard(address)
                    self._drop(address)
        late = sorted({address for _, address, _ in pending.values()})
        for address in late:
            self._drop(address)
        return replies, late

    def _receive(self, peer: _Peer, address, pending: dict) -> list:
        """Every reply queued on ``peer``: those awaited as (key, header, arrays); any
        other (stale, unknown id, malformed) is discarded and counted."""
        out = []
        while peer.sock.get(zmq.EVENTS) & zmq.POLLIN:  # cheaper than a raised zmq.Again
            frames = peer.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                header, arrays = decode(frames, lambda h: self._reply_caps(h, address, pending))
            except ProtocolError as e:
                self.discarded += 1
                log.warning("data channel: discarded a reply from %s: %s", address, e)
                continue
            key = pending[header["id"]][0]
            del pending[header["id"]]
            out.append((key, header, arrays))
        return out

    def _reply_caps(self, header: dict, address, pending: dict) -> list[int]:
        """The caps of the reply awaited under the header's id from ``address``; a reply
        with another id (stale, or never asked for) is refused."""
        awaited = pending.get(header.get("id"))
        if awaited is None or awaited[1] != address:
            raise ProtocolError(f"a reply to a pending request, got id {header.get('id')!r}")
        return [self.settings.caps[awaited[2]].reply]

    def _drop(self, address) -> None:
        peer = self.socks.pop(tuple(address), None)
        if peer is not None:
            peer.close()

    def close(self) -> None:
        for address in list(self.socks):
            self._drop(address)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the sockets go anyway
            pass
