"""The one mapping of memstore errors to gRPC status codes."""

from __future__ import annotations

import grpc

from ..errors import (
    CheckpointError,
    InvalidArgument,
    MemoryBudgetExceeded,
    MemstoreError,
    PreconditionFailed,
    ShardUnavailable,
    StepOutOfOrder,
    StoreRolledBack,
    TableExists,
    TableNotFound,
)

# Most specific class first: StepOutOfOrder is an InvalidArgument.
_CODES = (
    (StepOutOfOrder, grpc.StatusCode.FAILED_PRECONDITION),
    (PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (TableNotFound, grpc.StatusCode.NOT_FOUND),
    (TableExists, grpc.StatusCode.ALREADY_EXISTS),
    (StoreRolledBack, grpc.StatusCode.ABORTED),
    (ShardUnavailable, grpc.StatusCode.UNAVAILABLE),
    (MemoryBudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """(status code, message) for an error raised while serving a call. Errors that
    memstore does not raise on purpose are INTERNAL, without their text (it may
    describe the server's internals); the server logs them."""
    # An error raised in a shard actor arrives wrapped by Ray, its text carrying the
    # actor's traceback, pid and address: the message is the cause's own.
    cause = getattr(error, "cause", None)
    wrapped = isinstance(cause, MemstoreError) and isinstance(error, type(cause))
    text = str(cause if wrapped else error)
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code, text
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"
