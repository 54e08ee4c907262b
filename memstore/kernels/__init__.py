"""The memory-layer math as pure tensor functions, dispatched by device.

Every op has a plain-torch reference in :mod:`kernels.reference` (its specification),
the fastest CPU implementation measured for it (the C fast path, or the library kernel
where that wins: ``F.embedding_bag`` for the float32 bag forward), and a Triton
implementation for CUDA tensors (:mod:`kernels.triton`). :mod:`kernels._dispatch` picks
one per call and counts the choice.
"""

from ._native import empty_hugepages as empty_table
from .bag import BagFunction, bag_backward, bag_backward_rows, bag_forward
from .product_key import product_key_topk
from .row_grads import SparseRowGrads
from .sparse_optim import adagrad_step, adam_step, rowwise_adagrad_step, sgd_step

__all__ = [
    "product_key_topk",
    "empty_table",
    "bag_forward",
    "bag_backward",
    "bag_backward_rows",
    "SparseRowGrads",
    "BagFunction",
    "sgd_step",
    "adagrad_step",
    "rowwise_adagrad_step",
    "adam_step",
]
