"""Tensors on the Ray wire: numpy arrays, which Ray moves without copying."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor view of an array from the object store, without a copy.

    Such arrays are read-only views of shared memory. memstore only reads them (results
    are added into fresh tensors), so torch's warning about non-writable arrays does
    not apply and is silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)
