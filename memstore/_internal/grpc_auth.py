"""Bearer tokens with scopes and tables for the gRPC server, checked before a payload
is read.

A token file holds one token per line, ``<token> [<scope>,...] [tables=<name>,...]``
(scopes: read, write, admin; without scopes a token has all three; without
``tables=`` it reaches every table); blank lines and lines starting with ``#`` are
skipped. Files must be readable by their owner only. The environment variable
``MEMSTORE_TOKEN`` gives one token with all scopes and every table.

The interceptor looks only at the method name and the call's metadata. A refused
call is answered by a handler that takes the request as a stream it never reads, so
the server neither waits for the request's bytes nor parses them: an unauthenticated
call holds nothing once its headers are answered. A token limited to some tables is
checked against the request's ``table`` once the (authenticated) request is parsed,
before the servicer runs; ``ListTables`` shows it only its tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import stat

import grpc

from ..errors import InvalidArgument

log = logging.getLogger(__name__)

SCOPES = ("read", "write", "admin")
TOKEN_ENV = "MEMSTORE_TOKEN"
DEFAULT_TOKEN_FILE = os.path.join("~", ".memstore", "grpc-token")
_SERVICE = "/memstore.v1.MemoryStore/"
READ_METHODS = ("ListTables", "DescribeTable", "Query", "Lookup", "Gather", "Stats")
WRITE_METHODS = ("ApplyGradients", "Step", "PublishKeys")
ADMIN_METHODS = ("Save",)
METHOD_SCOPES = {
    **{_SERVICE + m: "read" for m in READ_METHODS},
    **{_SERVICE + m: "write" for m in WRITE_METHODS},
    **{_SERVICE + m: "admin" for m in ADMIN_METHODS},
}
LIST_TABLES = _SERVICE + "ListTables"
# Reachable without a token: load balancers and orchestrators probe health.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclasses.dataclass(frozen=True)
class Grant:
    """What one token may do: its scopes, and the tables it reaches (None: all)."""

    scopes: frozenset
    tables: frozenset | None = None

    def reaches(self, table: str) -> bool:
        return self.tables is None or table in self.tables


def as_grant(value) -> Grant:
    """A Grant, or a set of scopes (every table)."""
    return value if isinstance(value, Grant) else Grant(frozenset(value))


def is_loopback(host: str) -> bool:
    """Whether HOST (an IP, a bracketed IPv6, or ``localhost``) is this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _check_private(path: str) -> None:
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or st.st_uid != os.getuid():
        raise InvalidArgument(
            "token_file",
            f"{path} owned by you and readable by you only (chmod 600)",
            oct(stat.S_IMODE(st.st_mode)),
        )


_LINE = "'<token of 16+ characters> [read,write,admin] [tables=NAME,...]'"


def _parse_line(line: str, field: str) -> tuple[str, Grant]:
    token, *rest = line.split()
    tables = None
    if rest and rest[-1].startswith("tables="):
        tables = frozenset(rest.pop()[len("tables=") :].split(","))
    scopes = frozenset(rest[0].split(",")) if rest else frozenset(SCOPES)
    if (
        len(rest) > 1
        or not scopes <= set(SCOPES)
        or len(token) < 16
        or (tables is not None and not all(tables))
    ):
        raise InvalidArgument(field, _LINE, "a malformed line")
    return token, Grant(scopes, tables)


def parse_tokens(text: str, where: str) -> dict[str, Grant]:
    tokens = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            token, grant = _parse_line(line, f"{where} line {n}")
            tokens[token] = grant
    if not tokens:
        raise InvalidArgument(where, "at least one token", "none")
    return tokens


def read_token_file(path: str) -> dict[str, Grant]:
    path = os.path.expanduser(path)
    _check_private(path)
    with open(path, encoding="utf-8") as f:
        return parse_tokens(f.read(), path)


def write_new_token(path: str) -> str:
    """A fresh all-scope token written to ``path`` (mode 0600, directory 0700)."""
    path = os.path.expanduser(path)
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"# memstore gRPC token (scopes: read, write, admin)\n{token} read,write,admin\n")
    os.replace(tmp, path)
    return token


def server_tokens(
    token_file: str | None, generated_file: str = DEFAULT_TOKEN_FILE
) -> tuple[dict[str, Grant], str]:
    """The tokens a server accepts and where they came from: ``token_file``, else
    $MEMSTORE_TOKEN, else ``generated_file`` (reused when present and private, made
    with a new token otherwise)."""
    if token_file:
        return read_token_file(token_file), token_file
    if os.environ.get(TOKEN_ENV):
        return parse_tokens(os.environ[TOKEN_ENV], TOKEN_ENV), f"${TOKEN_ENV}"
    path = os.path.expanduser(generated_file)
    if not os.path.exists(path):
        write_new_token(path)
        log.warning(
            "no token configured: wrote a new token (scopes read, write, admin) to %s", path
        )
    return read_token_file(path), path


def client_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """The token a client sends: given, else from ``token_file``, $MEMSTORE_TOKEN, or
    the file a local server generates."""
    if token:
        return token
    if os.environ.get(TOKEN_ENV) and not token_file:
        return os.environ[TOKEN_ENV].split()[0]
    path = os.path.expanduser(token_file or DEFAULT_TOKEN_FILE)
    if token_file is None and not os.path.exists(path):
        return None
    return next(iter(read_token_file(path)))


def bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _refusal(code: grpc.StatusCode, message: str):
    """A handler that answers ``code`` at once. It takes the request as a stream and
    never reads it, so neither the request's bytes nor their arrival are waited for."""

    async def abort(_request_stream, context):
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(abort)


def _table_checked(handler, grant: Grant, method: str):
    """``handler`` refusing a request whose table the grant does not reach (and, for
    ListTables, showing only the tables it reaches)."""
    behavior = handler.unary_unary

    async def checked(request, context):
        if method == LIST_TABLES:
            reply = await behavior(request, context)
            keep = [t for t in reply.tables if grant.reaches(t.name)]
            del reply.tables[:]
            reply.tables.extend(keep)
            return reply
        if not grant.reaches(request.table):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token does not reach table {request.table!r} "
                f"(it reaches {sorted(grant.tables)})",
            )
        return await behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(
        checked, handler.request_deserializer, handler.response_serializer
    )


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without a known token (UNAUTHENTICATED) or without the scope of
    the method (PERMISSION_DENIED); any other method (reflection) needs a valid token.
    Only the tokens' SHA-256 digests are kept."""

    def __init__(self, tokens: dict):
        self._grants = [(_digest(t), as_grant(g)) for t, g in tokens.items()]

    def grant_of(self, token: str | None) -> Grant | None:
        found = None
        given = _digest(token or "")
        for known, grant in self._grants:  # no early exit: time does not depend on which
            if hmac.compare_digest(given, known) and token:
                found = grant
        return found

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        grant = self.grant_of(bearer(handler_call_details.invocation_metadata))
        need = METHOD_SCOPES.get(method)
        if grant is None:
            return _refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid token is needed: metadata 'authorization: Bearer <token>'",
            )
        if need is not None and need not in grant.scopes:
            return _refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs a token with scope {need!r}; this one has {sorted(grant.scopes)}",
            )
        handler = await continuation(handler_call_details)
        if need is None or grant.tables is None or handler is None:
            return handler
        return _table_checked(handler, grant, method)
