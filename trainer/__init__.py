"""trainer: the memory-layer LM, its data sets, and (issue 5) the training loop."""

from .data import Batch, ByteDataset, FactsCorpus, evaluate
from .model import ModelArgs, Transformer, dense_equivalent, table_specs

__all__ = ["ModelArgs", "Transformer", "dense_equivalent", "table_specs",
           "Batch", "FactsCorpus", "ByteDataset", "evaluate"]
