"""trainer: the memory-layer LM, its data sets, and its training on Ray Train.

``trainer.memory`` holds what any Ray Train job needs to train memory layers on a
store table (push ids, DDP beside the store); ``trainer.train`` wires the rest."""

from .data import Batch, ByteDataset, FactsCorpus, evaluate
from .model import ModelArgs, Transformer, dense_equivalent, table_specs

__all__ = [
    "ModelArgs",
    "Transformer",
    "dense_equivalent",
    "table_specs",
    "Batch",
    "FactsCorpus",
    "ByteDataset",
    "evaluate",
]
