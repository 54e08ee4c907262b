"""The one error hierarchy of memstore.

Every error carries its data as attributes, survives pickling (errors cross Ray
process boundaries), and says what to do about it.
"""

from __future__ import annotations

import inspect

__all__ = [
    "MemstoreError",
    "InvalidArgument",
    "StepOutOfOrder",
    "TableNotFound",
    "TableExists",
    "StoreRolledBack",
    "ShardRestarted",
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


# ---- errors on the data channel: JSON, never pickle ------------------------------------
_WIRE_MESSAGE_CHARS = 4096


def _wire_value(value):
    """A field as JSON: scalars as they are, sequences of scalars as lists, others as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(
        v is None or isinstance(v, (bool, int, float, str)) for v in value
    ):
        return list(value)
    return str(value)[:_WIRE_MESSAGE_CHARS]


def to_wire(error: BaseException) -> dict:
    """``{"class", "message", "fields"}`` of an error, for :func:`from_wire` in another
    process. Errors outside memstore's hierarchy travel as a MemstoreError with their
    class name in the message."""
    if isinstance(error, MemstoreError) and _wire_class(type(error).__name__) is type(error):
        fields = {k: _wire_value(v) for k, v in vars(error).items() if k != "message"}
        return {"class": type(error).__name__, "message": error.message, "fields": fields}
    return {"class": "MemstoreError", "message": f"{type(error).__name__}: {error}", "fields": {}}


def _wire_class(name) -> type | None:
    """The memstore error class ``name`` if it is public here, else None: the allow-list
    of classes a peer may name."""
    cls = globals().get(name) if isinstance(name, str) and name in __all__ else None
    return cls if isinstance(cls, type) and issubclass(cls, MemstoreError) else None


def from_wire(data) -> MemstoreError:
    """The error :func:`to_wire` described, rebuilt by calling its class's constructor
    with the fields it names. A class outside the allow-list, or fields the constructor
    does not take, give a plain MemstoreError carrying the message."""
    data = data if isinstance(data, dict) else {}
    message = str(data.get("message", "an error without a message"))[:_WIRE_MESSAGE_CHARS]
    cls, fields = _wire_class(data.get("class")), data.get("fields")
    if cls is None or cls is MemstoreError or not isinstance(fields, dict):
        return MemstoreError(message)
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    try:
        return cls(**{p.name: fields[p.name] for p in params if p.name in fields})
    except Exception:  # noqa: BLE001 - fields that do not fit the class: keep the message
        return MemstoreError(message)


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
        super().__init__("step", f"a step after the last applied step {last_applied}", step)
        self.step = step
        self.last_applied = last_applied


class TableNotFound(MemstoreError, KeyError):
    """No table of this name exists on the cluster; ``known`` lists the ones that do."""

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
    """A table of this name exists already: connect to it, or drop it first."""

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


class ShardRestarted(MemstoreError):
    """A shard refused a call addressed to an earlier incarnation of itself (fencing):
    nothing changed. The table handle answers it by rolling the table back."""

    def __init__(self, shard: str, expected: str, incarnation: str):
        self.shard = shard
        self.expected = expected
        self.incarnation = incarnation
        super().__init__(
            f"shard {shard} restarted (incarnation {incarnation}, the call expected "
            f"{expected}); the call was refused and nothing changed"
        )


class ShardUnavailable(MemstoreError):
    """A shard did not answer within ``timeout_s`` (down, or not yet restarted)."""

    def __init__(self, shard: str, timeout_s: float, cause: str = ""):
        self.shard = shard
        self.timeout_s = timeout_s
        self.cause = cause
        super().__init__(
            f"shard {shard} is unavailable ({cause or 'no answer'}; waited at most "
            f"{timeout_s:g} s); check the Ray cluster (ray status) and the shard's logs"
        )


class MemoryBudgetExceeded(MemstoreError):
    """A block (values + optimizer state) is larger than ``max_shard_bytes``, a node's
    memory or a GPU's free memory allow; nothing was placed."""

    def __init__(self, bytes_per_shard: int, budget_bytes: int, where: str):
        self.bytes_per_shard = bytes_per_shard
        self.budget_bytes = budget_bytes
        self.where = where
        super().__init__(
            f"a shard needs {bytes_per_shard:,} bytes (values + optimizer state) but {where} "
            f"allows {budget_bytes:,}; use more shards or a smaller dtype"
        )


class CheckpointError(MemstoreError):
    """A checkpoint could not be written or read (``reason`` says why); a failed save
    leaves the previous checkpoint the newest."""

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
