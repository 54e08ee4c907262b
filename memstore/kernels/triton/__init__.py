"""Triton kernels for CUDA tensors, registered with :func:`kernels._dispatch.register_cuda`.

Importing this package registers every implementation (each module decorates its
launchers with ``register_cuda``); :func:`kernels._dispatch.cuda_impl`
does so the first time it sees CUDA tensors. The host launchers (``*_triton``) take any
tensors Triton can launch on: CUDA tensors normally, CPU tensors when the process runs
under the Triton interpreter (``TRITON_INTERPRET=1`` set before this package is
imported), which is how the CPU-only CI checks the kernels.
"""

import triton  # noqa: F401  (ImportError here means "no Triton path"; the dispatcher skips it)

from .bag import bag_backward_triton, bag_forward_triton
from .csr import bag_backward_sparse_triton, bag_dw_csr_triton, bag_forward_csr_triton
from .product_key import product_key_topk_triton
from .sparse_optim import (
    adagrad_step_triton,
    adam_step_triton,
    bag_backward_adam_step,
    rowwise_adagrad_step_triton,
    sgd_step_triton,
)

__all__ = [
    "bag_forward_triton",
    "bag_backward_triton",
    "bag_forward_csr_triton",
    "bag_backward_sparse_triton",
    "bag_dw_csr_triton",
    "product_key_topk_triton",
    "sgd_step_triton",
    "adagrad_step_triton",
    "rowwise_adagrad_step_triton",
    "adam_step_triton",
    "bag_backward_adam_step",
]
