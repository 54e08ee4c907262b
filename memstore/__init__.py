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
from .api import connect, create_table, drop_table, load_table
from .memory_layer import MemoryLayer, MemoryLayerArgs
from .optim import SGD, Adagrad, Adam, AdamW, OptimizerKind, RowWiseAdagrad
from .shard_table import ShardTable
from .table import Table

__all__ = [
    "create_table",
    "connect",
    "load_table",
    "drop_table",
    "Table",
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
