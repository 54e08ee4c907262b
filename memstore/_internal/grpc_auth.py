"""Bearer tokens with scopes for the gRPC server, checked before a payload is read.

A token file holds one token per line, ``<token> <scope>[,<scope>...]`` (scopes:
read, write, admin; a line with only a token has all three); blank lines and lines
starting with ``#`` are skipped. Files must be readable by their owner only. The
environment variable ``MEMSTORE_TOKEN`` gives one token with all scopes.

The interceptor looks only at the method name and the call's metadata: a refused
call is answered by a handler without a request deserializer, so the request bytes
are never parsed.
"""

from __future__ import annotations

import hmac
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
METHOD_SCOPES = {
    **{
        _SERVICE + m: "read"
        for m in ("ListTables", "DescribeTable", "Query", "Lookup", "Gather", "Stats")
    },
    **{_SERVICE + m: "write" for m in ("ApplyGradients", "Step", "PublishKeys")},
    _SERVICE + "Save": "admin",
}
# Reachable without a token: load balancers and orchestrators probe health.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _check_private(path: str) -> None:
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or st.st_uid != os.getuid():
        raise InvalidArgument(
            "token_file",
            f"{path} owned by you and readable by you only (chmod 600)",
            oct(stat.S_IMODE(st.st_mode)),
        )


def parse_tokens(text: str, where: str) -> dict[str, frozenset[str]]:
    tokens = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        scopes = frozenset(parts[1].split(",")) if len(parts) > 1 else frozenset(SCOPES)
        if len(parts) > 2 or not scopes <= set(SCOPES) or len(parts[0]) < 16:
            raise InvalidArgument(
                f"{where} line {n}",
                "'<token of 16+ characters> [read,write,admin]'",
                "a malformed line",
            )
        tokens[parts[0]] = scopes
    if not tokens:
        raise InvalidArgument(where, "at least one token", "none")
    return tokens


def read_token_file(path: str) -> dict[str, frozenset[str]]:
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
) -> tuple[dict[str, frozenset[str]], str]:
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


def _refusal(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as ``handler`` that aborts without reading the request."""

    def abort(_request, context):
        context.abort(code, message)

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuth(grpc.ServerInterceptor):
    """Refuses calls without a known token (UNAUTHENTICATED) or without the scope of
    the method (PERMISSION_DENIED); any other method (reflection) needs a valid token."""

    def __init__(self, tokens: dict[str, frozenset[str]]):
        self._tokens = [(t.encode(), scopes) for t, scopes in tokens.items()]

    def _scopes_of(self, token: str | None) -> frozenset[str] | None:
        found = None
        given = (token or "").encode()
        for known, scopes in self._tokens:  # no early exit: time does not depend on which
            if hmac.compare_digest(given, known) and token:
                found = scopes
        return found

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        scopes = self._scopes_of(bearer(handler_call_details.invocation_metadata))
        need = METHOD_SCOPES.get(method)
        if scopes is None:
            return _refusal(
                continuation(handler_call_details),
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid token is needed: metadata 'authorization: Bearer <token>'",
            )
        if need is not None and need not in scopes:
            return _refusal(
                continuation(handler_call_details),
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs a token with scope {need!r}; this one has {sorted(scopes)}",
            )
        return continuation(handler_call_details)
