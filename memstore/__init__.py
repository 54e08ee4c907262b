"""memstore: a sharded memory-parameter service for memory-layer language models.

The names below are imported on first use (PEP 562), so that light modules such as
``memstore.client`` and ``memstore.errors`` load without torch or Ray.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "create_table": ".api",
    "connect": ".api",
    "load_table": ".api",
    "drop_table": ".api",
    "Table": ".table",
    "MemoryLayer": ".memory_layer",
    "MemoryLayerArgs": ".memory_layer",
    "EngramLayer": ".engram",
    "EngramArgs": ".engram",
    "ShardTable": ".shard_table",
    "SGD": ".optim",
    "Adagrad": ".optim",
    "RowWiseAdagrad": ".optim",
    "Adam": ".optim",
    "AdamW": ".optim",
    "OptimizerKind": ".optim",
    "MemstoreError": ".errors",
    "InvalidArgument": ".errors",
    "StepOutOfOrder": ".errors",
    "TableNotFound": ".errors",
    "TableExists": ".errors",
    "StoreRolledBack": ".errors",
    "ShardUnavailable": ".errors",
    "MemoryBudgetExceeded": ".errors",
    "CheckpointError": ".errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'memstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
