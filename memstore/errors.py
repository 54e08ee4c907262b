"""The one error hierarchy of memstore.

Every error carries its data as attributes, survives pickling (errors cross Ray
process boundaries), and says what to do about it.
"""

from __future__ import annotations

__all__ = [
    "MemstoreError",
    "InvalidArgument",
    "StepOutOfOrder",
    "TableNotFound",
    "TableExists",
    "StoreRolledBack",
    "ShardUnavailable",
    "MemoryBudgetExceeded",
    "CheckpointError",
    "PreconditionFailed",
    "RemoteError",
]


class MemstoreError(Exception):
    """Base class of every error memstore raises on purpose."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (_rebuild, (type(self), self.__dict__))


def _rebuild(cls, state):
    err = cls.__new__(cls)
    Exception.__init__(err, state.get("message", ""))
    err.__dict__.update(state)
    return err


class InvalidArgument(MemstoreError, ValueError):
    """An argument has the wrong type, shape, dtype, range or value; nothing changed."""

    def __init__(self, field: str, expected: str, got: object):
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(f"{field}: expected {expected}, got {got}")


class StepOutOfOrder(InvalidArgument):
    """A push or step names a step the table has already applied."""

    def __init__(self, step: int, last_applied: int):
        super().__init__(
            "step", f"a step after the last applied step {last_applied}", step
        )
        self.step = step
        self.last_applied = last_applied


class TableNotFound(MemstoreError, KeyError):
    def __init__(self, name: str, known: list[str] | None = None):
        self.name = name
        self.known = list(known or [])
        super().__init__(
            f"table {name!r} does not exist (known tables: {self.known}); "
            "create it with memstore.create_table or load it with memstore.load_table"
        )

    def __str__(self) -> str:
        return self.message


class TableExists(MemstoreError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(
            f"table {name!r} already exists; connect to it with memstore.connect({name!r}) "
            "or drop it first"
        )


class StoreRolledBack(MemstoreError):
    """A shard restarted from a checkpoint: restore the trainer to ``step`` and go on."""

    def __init__(self, step: int, shard: str = ""):
        self.step = step
        self.shard = shard
        super().__init__(
            f"shard {shard or '?'} restarted and reloaded the checkpoint of step {step}; "
            f"restore the trainer's own state of step {step} and continue from there"
        )


class ShardUnavailable(MemstoreError):
    def __init__(self, shard: str, timeout_s: float, cause: str = ""):
        self.shard = shard
        self.timeout_s = timeout_s
        self.cause = cause
        super().__init__(
            f"shard {shard} is unavailable ({cause or 'no answer'}; waited at most "
            f"{timeout_s:g} s); check the Ray cluster (ray status) and the shard's logs"
        )


class MemoryBudgetExceeded(MemstoreError):
    def __init__(self, bytes_per_shard: int, budget_bytes: int, where: str):
        self.bytes_per_shard = bytes_per_shard
        self.budget_bytes = budget_bytes
        self.where = where
        super().__init__(
            f"a shard needs {bytes_per_shard:,} bytes (values + optimizer state) but {where} "
            f"allows {budget_bytes:,}; use more shards or a smaller dtype"
        )


class CheckpointError(MemstoreError):
    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"checkpoint {path}: {reason}")


class PreconditionFailed(MemstoreError):
    """The call is well formed but the store is not in a state to answer it."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class RemoteError(MemstoreError):
    """A memstore server answered a call with an error status (``code``: its name,
    e.g. "INVALID_ARGUMENT"; ``details``: the server's message)."""

    def __init__(self, method: str, code: str, details: str):
        self.method = method
        self.code = code
        self.details = details
        super().__init__(f"{method}: {code}: {details}")
