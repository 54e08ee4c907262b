"""Fused sparse optimizer steps, in place on the unique touched rows of a block.

Every step reads and writes each touched row of the values and of its state once.
``rows`` must be unique (``bag_backward`` returns them so); untouched rows, and
their optimizer state, are left alone (the "lazy" semantics of SparseAdam).
"""

from __future__ import annotations

import ctypes

import torch

from . import _native
from ._dispatch import TRITON_DTYPES, cuda_impl, native_ok, record
from .reference import (
    adagrad_step_reference,
    adam_scalars,
    adam_step_reference,
    rowwise_adagrad_step_reference,
    sgd_step_reference,
)
from .row_grads import SparseRowGrads, c_view

__all__ = ["sgd_step", "adagrad_step", "rowwise_adagrad_step", "adam_step"]


def _check(values, rows, grads, states=()):
    """``states``: (name, tensor, expected shape) triples."""
    if values.dim() != 2:
        raise ValueError(f"values: expected a 2-d tensor, got shape {tuple(values.shape)}")
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise TypeError(f"rows: expected a 1-d int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        # Sorted rows (what bag_backward returns) pass the cheap check above.
        if torch.unique(rows).numel() != rows.numel():
            raise ValueError("rows: expected unique rows (a duplicate would be applied twice)")
    if isinstance(grads, SparseRowGrads):
        shape, dtype = (grads.rows.numel(), grads.dim), grads.dy.dtype
    else:
        shape, dtype = tuple(grads.shape), grads.dtype
    if shape != (rows.numel(), values.shape[1]) or dtype != torch.float32:
        raise ValueError(
            f"grads: expected float32 of shape {(rows.numel(), values.shape[1])}, "
            f"got {dtype} {shape}"
        )
    for name, state, shape in states:
        if state.dtype != torch.float32 or not state.is_contiguous():
            raise TypeError(f"{name}: expected a contiguous float32 state tensor")
        if tuple(state.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(state.shape)}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= values.shape[0]):
        raise IndexError(f"rows: expected indices in [0, {values.shape[0]})")


def _native_ready(values, rows, grads) -> bool:
    if isinstance(grads, SparseRowGrads):
        grads_ok = grads.native()
    else:
        grads_ok = grads.is_contiguous()
    return native_ok(values) and values.stride(1) == 1 and grads_ok and rows.is_contiguous()


def _dense(grads) -> torch.Tensor:
    return grads.dense() if isinstance(grads, SparseRowGrads) else grads


def _triton_impl(name: str, values, rows, grads):
    """The Triton step for these tensors; it takes factored or dense gradients."""
    if values.dtype not in TRITON_DTYPES:
        return None
    dy = grads.dy if isinstance(grads, SparseRowGrads) else grads
    impl = cuda_impl(name, values, rows, dy)
    if impl is not None:
        record(name, "triton")
    return impl


def _cpu_path(name: str, values, rows, grads) -> bool:
    """True for the C step (recorded), False for the torch reference (recorded)."""
    ready = _native_ready(values, rows, grads)
    record(name, "native" if ready else "composite")
    return ready


def sgd_step(values, rows, grads, *, lr: float, weight_decay: float = 0.0) -> None:
    _check(values, rows, grads)
    impl = _triton_impl("sgd_step", values, rows, grads)
    if impl is not None:
        return impl(values, rows, grads, lr=lr, weight_decay=weight_decay)
    if not _cpu_path("sgd_step", values, rows, grads):
        return sgd_step_reference(values, rows, _dense(grads), lr=lr, weight_decay=weight_decay)
    view = c_view(grads)
    _native.parallel_for(
        _native.typed("sgd", values.dtype),
        rows.numel(),
        values.data_ptr(),
        values.stride(0),
        rows.data_ptr(),
        ctypes.addressof(view),
        values.shape[1],
        lr,
        weight_decay,
    )


def adagrad_step(values, state_sum, rows, grads, *, lr, eps, lr_decay=0.0, step=1) -> None:
    """torch.optim.Adagrad on a sparse gradient; ``step`` is the 1-based step count."""
    _check(values, rows, grads, [("state_sum", state_sum, tuple(values.shape))])
    impl = _triton_impl("adagrad_step", values, rows, grads)
    if impl is not None:
        return impl(values, state_sum, rows, grads, lr=lr, eps=eps, lr_decay=lr_decay, step=step)
    if not _cpu_path("adagrad_step", values, rows, grads):
        return adagrad_step_reference(
            values, state_sum, rows, _dense(grads), lr=lr, eps=eps, lr_decay=lr_decay, step=step
        )
    clr = lr / (1 + (step - 1) * lr_decay)
    view = c_view(grads)
    _native.parallel_for(
        _native.typed("adagrad", values.dtype),
        rows.numel(),
        values.data_ptr(),
        values.stride(0),
        state_sum.data_ptr(),
        rows.data_ptr(),
        ctypes.addressof(view),
        values.shape[1],
        clr,
        eps,
    )


def rowwise_adagrad_step(values, state_sum, rows, grads, *, lr, eps) -> None:
    """Adagrad with one accumulator per row (state_sum (R,)), fed by mean(g²)."""
    _check(values, rows, grads, [("state_sum", state_sum, (values.shape[0],))])
    impl = _triton_impl("rowwise_adagrad_step", values, rows, grads)
    if impl is not None:
        return impl(values, state_sum, rows, grads, lr=lr, eps=eps)
    if not _cpu_path("rowwise_adagrad_step", values, rows, grads):
        return rowwise_adagrad_step_reference(
            values, state_sum, rows, _dense(grads), lr=lr, eps=eps
        )
    view = c_view(grads)
    _native.parallel_for(
        _native.typed("rowwise_adagrad", values.dtype),
        rows.numel(),
        values.data_ptr(),
        values.stride(0),
        state_sum.data_ptr(),
        rows.data_ptr(),
        ctypes.addressof(view),
        values.shape[1],
        lr,
        eps,
    )


def adam_step(
    values,
    exp_avg,
    exp_avg_sq,
    rows,
    grads,
    *,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay=0.0,
    decoupled=False,
) -> None:
    """Lazy Adam (SparseAdam) or, with ``decoupled``, AdamW on the touched rows."""
    _check(
        values,
        rows,
        grads,
        [
            ("exp_avg", exp_avg, tuple(values.shape)),
            ("exp_avg_sq", exp_avg_sq, tuple(values.shape)),
        ],
    )
    kwargs = dict(
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled=decoupled,
    )
    impl = _triton_impl("adam_step", values, rows, grads)
    if impl is not None:
        return impl(values, exp_avg, exp_avg_sq, rows, grads, **kwargs)
    if not _cpu_path("adam_step", values, rows, grads):
        return adam_step_reference(values, exp_avg, exp_avg_sq, rows, _dense(grads), **kwargs)
    view = c_view(grads)
    _native.parallel_for(
        _native.typed("adam", values.dtype),
        rows.numel(),
        values.data_ptr(),
        values.stride(0),
        exp_avg.data_ptr(),
        exp_avg_sq.data_ptr(),
        rows.data_ptr(),
        ctypes.addressof(view),
        values.shape[1],
        *adam_scalars(step, lr, beta1, beta2, eps, weight_decay, decoupled),
    )
