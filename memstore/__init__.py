"""memstore: a sharded memory-parameter service for memory-layer language models."""

from .errors import (
    CheckpointError,
    InvalidArgument,
    MemoryBudgetExceeded,
    MemstoreError,
    ShardUnavailable,
    StepOutOfOrder,
    StoreRolledBack,
    TableExists,
    TableNotFound,
)
from .memory_layer import MemoryLayer, MemoryLayerArgs
from .optim import SGD, Adagrad, Adam, AdamW, OptimizerKind, RowWiseAdagrad
from .shard_table import ShardTable

__all__ = [
    "MemoryLayer",
    "MemoryLayerArgs",
    "ShardTable",
    "SGD",
    "Adagrad",
    "RowWiseAdagrad",
    "Adam",
    "AdamW",
    "OptimizerKind",
    "MemstoreError",
    "InvalidArgument",
    "StepOutOfOrder",
    "TableNotFound",
    "TableExists",
    "StoreRolledBack",
    "ShardUnavailable",
    "MemoryBudgetExceeded",
    "CheckpointError",
]
