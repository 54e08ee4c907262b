"""Triton kernels for the fused sparse optimizer steps, in place on unique touched rows.

One program per (unique row, column block) reads the row of values, its gradient and
its optimizer state once, and writes values and state once; arithmetic is float32 and
values are rounded to their storage dtype (round-to-nearest-even) only on the write.
``bag_backward_adam_step`` additionally fuses the row-gradient reduction of
``bag_backward`` into the Adam update, so the (U, dim) gradients never reach memory.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._dispatch import register_cuda
from ..reference import (
    adagrad_step_reference,
    adam_step_reference,
    rowwise_adagrad_step_reference,
    sgd_step_reference,
)
from .bag import (
    _BLOCK_M,
    KERNEL_DTYPES,
    _bag_dw_kernel,
    _block_d,
    segment_row_grad,
    sort_slots_by_row,
)

__all__ = [
    "sgd_step_triton",
    "adagrad_step_triton",
    "rowwise_adagrad_step_triton",
    "adam_step_triton",
    "bag_backward_adam_step",
]


def _kernel_ok(values: torch.Tensor) -> bool:
    # In-place updates must write the caller's tensor, so no contiguous() copy is allowed.
    return values.dtype in KERNEL_DTYPES and values.stride(1) == 1


def _grid(rows: torch.Tensor, dim: int):
    # Callers pass rows.contiguous(): the kernels index rows by position (rows[::2] has stride 2).
    return (rows.numel(), triton.cdiv(dim, _block_d(dim)))


@triton.jit
def _row_tile(rows_ptr, dim, stride_v, BLOCK_D: tl.constexpr):
    """(u, row, offsets into values, column offsets, column mask) of this program."""
    u = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + u)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return u, row, row * stride_v + cols, cols, cols < dim


@triton.jit
def _sgd_fwd_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16, row stride stride_v
    rows_ptr,  # (U,) int64 unique
    grads_ptr,  # (U, dim) float32 contiguous
    dim,
    stride_v,
    lr,
    weight_decay,
    BLOCK_D: tl.constexpr,
):
    u, row, voffs, cols, cmask = _row_tile(rows_ptr, dim, stride_v, BLOCK_D)
    v = tl.load(values_ptr + voffs, mask=cmask, other=0.0).to(tl.float32)
    g = tl.load(grads_ptr + u * dim + cols, mask=cmask, other=0.0) + weight_decay * v
    tl.store(values_ptr + voffs, (v - lr * g).to(values_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _adagrad_fwd_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16
    state_ptr,  # (R, dim) float32 contiguous: sum of squared gradients
    rows_ptr,  # (U,) int64 unique
    grads_ptr,  # (U, dim) float32
    dim,
    stride_v,
    clr,
    eps,
    BLOCK_D: tl.constexpr,
):
    u, row, voffs, cols, cmask = _row_tile(rows_ptr, dim, stride_v, BLOCK_D)
    g = tl.load(grads_ptr + u * dim + cols, mask=cmask, other=0.0)
    s = tl.load(state_ptr + row * dim + cols, mask=cmask, other=0.0) + g * g
    tl.store(state_ptr + row * dim + cols, s, mask=cmask)
    v = tl.load(values_ptr + voffs, mask=cmask, other=0.0).to(tl.float32)
    v = v - clr * g / (tl.sqrt(s) + eps)
    tl.store(values_ptr + voffs, v.to(values_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _rowwise_adagrad_fwd_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16
    state_ptr,  # (R,) float32: one accumulator per row
    rows_ptr,  # (U,) int64 unique
    grads_ptr,  # (U, dim) float32
    dim,
    stride_v,
    lr,
    eps,
    BLOCK_D: tl.constexpr,
):
    # One program per row: the accumulator needs the mean of g² over the whole row
    # before any column is updated, so the row is read twice (the second pass hits L2).
    u = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + u)
    sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        g = tl.load(grads_ptr + u * dim + cols, mask=cols < dim, other=0.0)
        sq += g * g
    s = tl.load(state_ptr + row) + tl.sum(sq, axis=0) / dim
    tl.store(state_ptr + row, s)
    scale = lr / (tl.sqrt(s) + eps)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < dim
        g = tl.load(grads_ptr + u * dim + cols, mask=cmask, other=0.0)
        v = tl.load(values_ptr + row * stride_v + cols, mask=cmask, other=0.0).to(tl.float32)
        out = (v - scale * g).to(values_ptr.dtype.element_ty)
        tl.store(values_ptr + row * stride_v + cols, out, mask=cmask)


@triton.jit
def _adam_update(
    values_ptr,  # (R, dim) float32 | bfloat16
    m_ptr,  # (R, dim) float32 first moment
    s_ptr,  # (R, dim) float32 second moment
    row,
    voffs,
    cols,
    cmask,
    g,  # (BLOCK_D,) float32 gradient of this row tile
    dim,
    beta1,
    beta2,
    omb1,  # 1 - beta1, rounded once from float64 as the reference's (1 - beta1) * g
    omb2,
    step_size,
    eps_term,
    shrink,
):
    v = tl.load(values_ptr + voffs, mask=cmask, other=0.0).to(tl.float32) * shrink
    m = tl.load(m_ptr + row * dim + cols, mask=cmask, other=0.0) * beta1 + omb1 * g
    s = tl.load(s_ptr + row * dim + cols, mask=cmask, other=0.0) * beta2 + omb2 * g * g
    tl.store(m_ptr + row * dim + cols, m, mask=cmask)
    tl.store(s_ptr + row * dim + cols, s, mask=cmask)
    v = v - step_size * m / (tl.sqrt(s) + eps_term)
    tl.store(values_ptr + voffs, v.to(values_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _adam_fwd_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16
    m_ptr,  # (R, dim) float32
    s_ptr,  # (R, dim) float32
    rows_ptr,  # (U,) int64 unique
    grads_ptr,  # (U, dim) float32
    dim,
    stride_v,
    beta1,
    beta2,
    omb1,
    omb2,
    step_size,
    eps_term,
    shrink,
    BLOCK_D: tl.constexpr,
):
    u, row, voffs, cols, cmask = _row_tile(rows_ptr, dim, stride_v, BLOCK_D)
    g = tl.load(grads_ptr + u * dim + cols, mask=cmask, other=0.0)
    _adam_update(values_ptr, m_ptr, s_ptr, row, voffs, cols, cmask, g, dim,
                 beta1, beta2, omb1, omb2, step_size, eps_term, shrink)


@triton.jit
def _bag_bwd_adam_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16
    m_ptr,  # (R, dim) float32
    s_ptr,  # (R, dim) float32
    rows_ptr,  # (U,) int64 sorted unique rows
    order_ptr,  # (B·M,) int64 slot ids sorted by row
    seg_ptr,  # (U + 1,) int64 segment offsets into order
    w_ptr,  # (B·M,) floating slot weights
    dy_ptr,  # (B, dim) float32
    M,
    dim,
    stride_v,
    beta1,
    beta2,
    omb1,
    omb2,
    step_size,
    eps_term,
    shrink,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    u, row, voffs, cols, cmask = _row_tile(rows_ptr, dim, stride_v, BLOCK_D)
    start = tl.load(seg_ptr + u)
    end = tl.load(seg_ptr + u + 1)
    g = segment_row_grad(order_ptr, w_ptr, dy_ptr, start, end, M, dim, cols, cmask,
                         BLOCK_P, BLOCK_D)
    _adam_update(values_ptr, m_ptr, s_ptr, row, voffs, cols, cmask, g, dim,
                 beta1, beta2, omb1, omb2, step_size, eps_term, shrink)


@register_cuda("sgd_step")
def sgd_step_triton(values, rows, grads, *, lr: float, weight_decay: float = 0.0) -> None:
    if not _kernel_ok(values):
        return sgd_step_reference(values, rows, grads, lr=lr, weight_decay=weight_decay)
    dim = values.shape[1]
    if rows.numel() == 0 or dim == 0:
        return None
    _sgd_fwd_kernel[_grid(rows, dim)](
        values, rows.contiguous(), grads.contiguous(), dim, values.stride(0), float(lr),
        float(weight_decay),
        BLOCK_D=_block_d(dim),
    )
    return None


@register_cuda("adagrad_step")
def adagrad_step_triton(values, state_sum, rows, grads, *, lr, eps, lr_decay=0.0, step=1) -> None:
    if not _kernel_ok(values):
        return adagrad_step_reference(
            values, state_sum, rows, grads, lr=lr, eps=eps, lr_decay=lr_decay, step=step
        )
    dim = values.shape[1]
    if rows.numel() == 0 or dim == 0:
        return None
    clr = lr / (1 + (step - 1) * lr_decay)
    _adagrad_fwd_kernel[_grid(rows, dim)](
        values, state_sum, rows.contiguous(), grads.contiguous(), dim, values.stride(0), float(clr),
        float(eps), BLOCK_D=_block_d(dim),
    )
    return None


@register_cuda("rowwise_adagrad_step")
def rowwise_adagrad_step_triton(values, state_sum, rows, grads, *, lr, eps) -> None:
    if not _kernel_ok(values):
        return rowwise_adagrad_step_reference(values, state_sum, rows, grads, lr=lr, eps=eps)
    dim = values.shape[1]
    if rows.numel() == 0 or dim == 0:
        return None
    _rowwise_adagrad_fwd_kernel[(rows.numel(),)](
        values, state_sum, rows.contiguous(), grads.contiguous(), dim, values.stride(0), float(lr),
        float(eps), BLOCK_D=_block_d(dim),
    )
    return None


def _adam_scalars(step, lr, beta1, beta2, eps, weight_decay, decoupled):
    """Host-side bias corrections, exactly as the reference (float64, then to the kernel)."""
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    step_size = lr * math.sqrt(bc2) / bc1
    eps_term = eps * math.sqrt(bc2) if decoupled else eps
    shrink = 1 - lr * weight_decay if decoupled else 1.0
    return (float(beta1), float(beta2), 1.0 - beta1, 1.0 - beta2, float(step_size),
            float(eps_term), float(shrink))


@register_cuda("adam_step")
def adam_step_triton(
    values, exp_avg, exp_avg_sq, rows, grads, *, step, lr, beta1, beta2, eps,
    weight_decay=0.0, decoupled=False,
) -> None:
    """Lazy Adam (SparseAdam) or, with ``decoupled``, AdamW on the touched rows."""
    if not _kernel_ok(values):
        return adam_step_reference(
            values, exp_avg, exp_avg_sq, rows, grads, step=step, lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
        )
    dim = values.shape[1]
    if rows.numel() == 0 or dim == 0:
        return None
    scalars = _adam_scalars(step, lr, beta1, beta2, eps, weight_decay, decoupled)
    _adam_fwd_kernel[_grid(rows, dim)](
        values, exp_avg, exp_avg_sq, rows.contiguous(), grads.contiguous(), dim, values.stride(0),
        *scalars, BLOCK_D=_block_d(dim),
    )
    return None


def bag_backward_adam_step(
    values, exp_avg, exp_avg_sq, idx, w, dy, *, step, lr, beta1, beta2, eps,
    weight_decay=0.0, decoupled=False,
):
    """bag_backward followed by adam_step on its rows, with the row gradients kept on chip.

    values (R, dim) float32|bfloat16 with unit column stride, exp_avg/exp_avg_sq (R, dim)
    float32 contiguous, idx (B, M) int, w (B, M) float, dy (B, dim). Updates values and
    the moments in place; returns dw (B, M) float32 (computed from the values before the
    update, as bag_backward would) and the sorted unique rows (U,) int64 that were updated.
    """
    if not _kernel_ok(values):
        raise ValueError("values: expected float32/bfloat16/float16 with unit column stride")
    for name, state in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if state.dtype != torch.float32 or not state.is_contiguous() or state.shape != values.shape:
            raise ValueError(
                f"{name}: expected a contiguous float32 tensor of shape {tuple(values.shape)}"
            )
    B, M = idx.shape
    dim = values.shape[1]
    idx, w = idx.contiguous(), w.contiguous()
    dy = dy.to(torch.float32).contiguous()
    dw = torch.empty(B, M, dtype=torch.float32, device=values.device)
    rows, order, seg = sort_slots_by_row(idx)
    if B == 0 or M == 0 or dim == 0:
        return dw, rows
    BLOCK_D = _block_d(dim)
    # dw reads the old values, so it must run before the update rewrites them.
    _bag_dw_kernel[(B, triton.cdiv(M, _BLOCK_M))](
        values, idx, dy, dw, M, dim, values.stride(0), BLOCK_M=_BLOCK_M, BLOCK_D=BLOCK_D,
    )
    scalars = _adam_scalars(step, lr, beta1, beta2, eps, weight_decay, decoupled)
    _bag_bwd_adam_kernel[_grid(rows, dim)](
        values, exp_avg, exp_avg_sq, rows, order, seg, w, dy, M, dim, values.stride(0),
        *scalars, BLOCK_P=8, BLOCK_D=BLOCK_D,
    )
    return dw, rows
