"""The gRPC server of memstore: every table of the cluster, to jobs outside Ray.

    server = memstore.server.start(ServerOptions(address="127.0.0.1:50051"))
    ...
    server.stop()

``memstore serve`` runs it in the foreground, or (``--detach``) as a named detached
Ray actor that lives with the cluster (``memstore serve --stop`` ends it). Calls need
a bearer token (see :mod:`memstore._internal.grpc_auth`); with none configured, a
token is generated into a file readable by its owner only. TLS when given a
certificate and key. The service is ``memstore.v1.MemoryStore`` (protos/), next to
the standard ``grpc.health.v1`` health service and server reflection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ._internal.grpc_auth import (
    DEFAULT_TOKEN_FILE,
    TOKEN_ENV,
    TokenAuth,
    is_loopback,
    read_token_file,
    server_tokens,
)
from ._internal.grpc_service import MemoryStoreServicer, on_threads
from .errors import InvalidArgument
from .v1 import memstore_pb2 as pb
from .v1 import memstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = ["ServerOptions", "Server", "start", "DEFAULT_ADDRESS", "DETACHED_NAME"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_CALL_TIMEOUT_S = 60.0
DETACHED_NAME = "grpc-server"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryStore"].full_name


@dataclasses.dataclass
class ServerOptions:
    address: str = DEFAULT_ADDRESS  # HOST:PORT; port 0 picks a free one
    token_file: str | None = None  # else $MEMSTORE_TOKEN, else a generated token
    generated_token_file: str = DEFAULT_TOKEN_FILE
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    save_root: str | None = None  # Save writes only under this directory
    threads: int = 16  # calls running on shards at once; more wait (within their deadline)
    timeout_s: float | None = None  # per shard call (default: the call timeout)
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S  # longest a call runs, whatever its deadline
    tokens: dict | None = None  # token -> Grant or scopes, instead of a file (in-process only)


class Server:
    """A running server: ``address`` (with the bound port), ``token_source``, ``stop()``.

    The grpc.aio server runs on an event loop of its own thread; methods run on a
    thread pool."""

    def __init__(self, loop, thread, grpc_server, address, token_source, health_servicer, pool):
        self._loop = loop
        self._thread = thread
        self._server = grpc_server
        self.address = address
        self.token_source = token_source
        self._health = health_servicer
        self._pool = pool

    def stop(self, grace_s: float = 1.0) -> None:
        if not self._thread.is_alive():
            return

        async def stop():
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace_s)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wait(self) -> None:
        self._thread.join()


def _check(options: ServerOptions) -> None:
    host, sep, port = options.address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument("address", "HOST:PORT", options.address)
    if (options.tls_cert is None) != (options.tls_key is None):
        raise InvalidArgument(
            "tls_cert", "both --tls-cert and --tls-key, or neither", "only one of them"
        )
    if (
        isinstance(options.max_message_bytes, bool)
        or not isinstance(options.max_message_bytes, int)
        or not 1 << 16 <= options.max_message_bytes <= (1 << 31) - 1
    ):
        raise InvalidArgument(
            "max_message_bytes", "an int in [65536, 2^31)", options.max_message_bytes
        )
    if isinstance(options.threads, bool) or not isinstance(options.threads, int):
        raise InvalidArgument("threads", "an int in [1, 1024]", options.threads)
    if not 1 <= options.threads <= 1024:
        raise InvalidArgument("threads", "an int in [1, 1024]", options.threads)
    if not isinstance(options.call_timeout_s, (int, float)) or not options.call_timeout_s > 0:
        raise InvalidArgument("call_timeout_s", "seconds > 0", options.call_timeout_s)


def _credentials(options: ServerOptions):
    with open(options.tls_key, "rb") as f:
        key = f.read()
    with open(options.tls_cert, "rb") as f:
        cert = f.read()
    return grpc.ssl_server_credentials([(key, cert)])


async def _serve(options: ServerOptions, tokens: dict, pool) -> tuple:
    """The started aio server, its health servicer and bound port (on the loop)."""
    limit = options.max_message_bytes
    server = grpc.aio.server(
        interceptors=[TokenAuth(tokens)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
        maximum_concurrent_rpcs=options.threads * 8,
    )
    servicer = MemoryStoreServicer(
        options.timeout_s or options.call_timeout_s, options.save_root, limit
    )
    pb_grpc.add_MemoryStoreServicer_to_server(
        on_threads(servicer, pool, options.call_timeout_s), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    host = options.address.rpartition(":")[0]
    if options.tls_cert:
        port = server.add_secure_port(options.address, _credentials(options))
    else:
        if not is_loopback(host):
            log.warning(
                "serving %s without TLS: tokens cross the network in the clear; "
                "give --tls-cert and --tls-key",
                options.address,
            )
        port = server.add_insecure_port(options.address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port


def _loop_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="memstore-grpc-loop", daemon=True)
    thread.start()
    return loop, thread


def start(options: ServerOptions | None = None) -> Server:
    """Start serving (returns at once); Ray must be initialised or reachable."""
    options = options or ServerOptions()
    _check(options)
    if options.tokens is not None:
        tokens, source = options.tokens, "the tokens given"
    else:
        tokens, source = server_tokens(options.token_file, options.generated_token_file)
    pool = futures.ThreadPoolExecutor(options.threads, thread_name_prefix="memstore-grpc")
    loop, thread = _loop_thread()
    try:
        server, health_servicer, port = asyncio.run_coroutine_threadsafe(
            _serve(options, tokens, pool), loop
        ).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        pool.shutdown(wait=False)
        raise
    address = f"{options.address.rpartition(':')[0]}:{port}"
    log.info(
        "memstore gRPC on %s (%s), tokens from %s",
        address,
        "TLS" if options.tls_cert else "plaintext",
        source,
    )
    return Server(loop, thread, server, address, source, health_servicer, pool)


def use_one_torch_thread() -> None:
    """Give each request one torch thread in a process that only serves.

    The server already answers requests concurrently from its thread pool; torch's own
    intra-op threads on the tiny tensors of a query only contend with those for the
    cores (a 1-vector Query took 9 ms with two torch threads and 3.6 ms with one, on
    the 2-core machine). Process-wide, so only for a process that is the server."""
    import torch

    torch.set_num_threads(1)


class DetachedServer:
    """The server as a Ray actor (named DETACHED_NAME in the memstore namespace). It
    reads its tokens from a file on its node and keeps only their digests: no token
    travels through Ray (in the actor's arguments or any method's answer)."""

    def __init__(self, options: ServerOptions):
        use_one_torch_thread()
        self.server = start(options)

    def address(self) -> str:
        return self.server.address

    def stop(self) -> None:
        self.server.stop()


def detached_options(options: ServerOptions) -> ServerOptions:
    """The options a detached server is given: an absolute token file path on this
    node (checked here, or generated here when none is configured), never tokens."""
    if options.tokens is not None:
        raise InvalidArgument(
            "tokens", "none for a detached server (it reads --token-file)", "tokens given"
        )
    if options.token_file:
        path = os.path.abspath(os.path.expanduser(options.token_file))
        read_token_file(path)  # exists, private, parses
    elif os.environ.get(TOKEN_ENV):
        raise InvalidArgument(
            "token_file",
            f"a token file for --detach (${TOKEN_ENV} is not handed to the Ray actor)",
            f"${TOKEN_ENV}",
        )
    else:
        path = os.path.abspath(os.path.expanduser(options.generated_token_file))
        server_tokens(None, path)  # generated when missing; private and parses
    return dataclasses.replace(options, token_file=path, generated_token_file=path)


def start_detached(options: ServerOptions) -> str:
    """Start the server as a detached actor on this node of the cluster (where its
    token file is); returns its address."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .table import NAMESPACE

    options = detached_options(options)
    log.info("detached server tokens from %s", options.token_file)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = (
        ray.remote(DetachedServer)
        .options(
            name=DETACHED_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=4,
            scheduling_strategy=here,
        )
        .remote(options)
    )
    return ray.get(actor.address.remote())


def stop_detached() -> bool:
    """End the detached server; False when there is none."""
    import ray

    from .table import NAMESPACE

    try:
        actor = ray.get_actor(DETACHED_NAME, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(actor.stop.remote(), timeout=30)
    finally:
        ray.kill(actor, no_restart=True)
    return True
