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

import dataclasses
import ipaddress
import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ._internal.grpc_auth import DEFAULT_TOKEN_FILE, TokenAuth, server_tokens
from ._internal.grpc_service import MemoryStoreServicer, guarded
from .errors import InvalidArgument
from .v1 import memstore_pb2 as pb
from .v1 import memstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

__all__ = ["ServerOptions", "Server", "start", "DEFAULT_ADDRESS", "DETACHED_NAME"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
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
    threads: int = 16
    timeout_s: float | None = None  # per shard call (default: the table handle's)
    tokens: dict | None = None  # token -> scopes, instead of a file (the detached actor)


class Server:
    """A running server: ``address`` (with the bound port), ``token_source``, ``stop()``."""

    def __init__(self, grpc_server, address: str, token_source: str, health_servicer):
        self._server = grpc_server
        self.address = address
        self.token_source = token_source
        self._health = health_servicer

    def stop(self, grace_s: float = 1.0) -> None:
        self._health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait()

    def wait(self) -> None:
        self._server.wait_for_termination()


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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _credentials(options: ServerOptions):
    with open(options.tls_key, "rb") as f:
        key = f.read()
    with open(options.tls_cert, "rb") as f:
        cert = f.read()
    return grpc.ssl_server_credentials([(key, cert)])


def start(options: ServerOptions | None = None) -> Server:
    """Start serving (returns at once); Ray must be initialised or reachable."""
    options = options or ServerOptions()
    _check(options)
    if options.tokens is not None:
        tokens, source = options.tokens, "the tokens given"
    else:
        tokens, source = server_tokens(options.token_file, options.generated_token_file)
    limit = options.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="memstore-grpc"),
        interceptors=[TokenAuth(tokens)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
        maximum_concurrent_rpcs=options.threads * 8,
    )
    pb_grpc.add_MemoryStoreServicer_to_server(
        guarded(MemoryStoreServicer(options.timeout_s, options.save_root)), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    host = options.address.rpartition(":")[0]
    if options.tls_cert:
        port = server.add_secure_port(options.address, _credentials(options))
    else:
        if not _is_loopback(host):
            log.warning(
                "serving %s without TLS: tokens cross the network in the clear; "
                "give --tls-cert and --tls-key",
                options.address,
            )
        port = server.add_insecure_port(options.address)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{host}:{port}"
    log.info(
        "memstore gRPC on %s (%s), tokens from %s",
        address,
        "TLS" if options.tls_cert else "plaintext",
        source,
    )
    return Server(server, address, source, health_servicer)


def use_one_torch_thread() -> None:
    """Give each request one torch thread in a process that only serves.

    The server already answers requests concurrently from its thread pool; torch's own
    intra-op threads on the tiny tensors of a query only contend with those for the
    cores (a 1-vector Query took 9 ms with two torch threads and 3.6 ms with one, on
    the 2-core machine). Process-wide, so only for a process that is the server."""
    import torch

    torch.set_num_threads(1)


class DetachedServer:
    """The server as a Ray actor (named DETACHED_NAME in the memstore namespace)."""

    def __init__(self, options: ServerOptions):
        use_one_torch_thread()
        self.server = start(options)

    def address(self) -> str:
        return self.server.address

    def stop(self) -> None:
        self.server.stop()


def start_detached(options: ServerOptions) -> str:
    """Start the server as a detached actor on this cluster; returns its address."""
    import ray

    from .table import NAMESPACE

    if options.tokens is None:
        options.tokens, source = server_tokens(options.token_file, options.generated_token_file)
        log.info("detached server tokens from %s", source)
    actor = (
        ray.remote(DetachedServer)
        .options(
            name=DETACHED_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=4,
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
