"""The memory-layer math as pure tensor functions, dispatched by device.

Every op has a plain-torch reference in :mod:`kernels.reference` (its specification),
a C fast path for CPU tensors, and a dispatch point for CUDA tensors that the Triton
kernels plug into.
"""

from .bag import BagFunction, bag_backward, bag_forward
from .product_key import product_key_topk
from .sparse_optim import adagrad_step, adam_step, rowwise_adagrad_step, sgd_step

__all__ = [
    "product_key_topk",
    "bag_forward",
    "bag_backward",
    "BagFunction",
    "sgd_step",
    "adagrad_step",
    "rowwise_adagrad_step",
    "adam_step",
]
