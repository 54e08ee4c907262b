"""Triton kernels for the fused sparse optimizer steps, in place on unique touched rows.

One program per (unique row, column block) sums the row's gradient from its factored
form (:class:`kernels.SparseRowGrads`: the row's slots, their weights and the output
gradients dy of their bags) in registers, then reads the row of values and its
optimizer state once and writes both once; the (U, dim) gradient never reaches memory.
Arithmetic is float32 and values are rounded to their storage dtype
(round-to-nearest-even) only on the write. Dense (U, dim) gradients are taken too, as
one slot of weight 1 per row.
``bag_backward_adam_step`` additionally fuses the row-gradient reduction of
``bag_backward`` into the Adam update, so the (U, dim) gradients never reach memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import register_cuda
from ..reference import adam_scalars
from ..row_grads import SparseRowGrads
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


def _check_values(values: torch.Tensor) -> None:
    if values.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"values: the Triton optimizer kernels take {KERNEL_DTYPES}, got {values.dtype}"
        )


def _factored(rows: torch.Tensor, grads) -> tuple[torch.Tensor, ...]:
    """(seg, slot_bag, slot_w, dy) of factored gradients; dense (U, dim) gradients
    become one slot of weight 1 per row (exact: the kernels multiply by 1.0)."""
    if not isinstance(grads, SparseRowGrads):
        grads = SparseRowGrads.from_dense(rows, grads.to(torch.float32).contiguous())
    return (
        grads.seg.contiguous(),
        grads.slot_bag.contiguous(),
        grads.slot_w.to(torch.float32).contiguous(),
        grads.dy.to(torch.float32).contiguous(),
    )


def _grid(rows: torch.Tensor, dim: int):
    return (rows.numel(), triton.cdiv(dim, _block_d(dim)))


@triton.jit
def round_to_storage(x, dtype: tl.constexpr):
    """float32 x in the values' storage dtype, rounded to nearest even.

    Compiled Triton rounds float32 -> bfloat16 to nearest even, but the interpreter
    truncates; rounding the bits by hand gives both the same result (and torch's).
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _row_tile(rows_ptr, dim, stride_v, stride_c, BLOCK_D: tl.constexpr):
    """(u, row, offsets into values, column offsets, column mask) of this program."""
    u = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + u)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return u, row, row * stride_v + cols * stride_c, cols, cols < dim


@triton.jit
def factored_row_grad(
    seg_ptr,  # (U + 1,) int64: row u's slots are [seg[u], seg[u + 1])
    slot_bag_ptr,  # (P,) int64 bag of each slot, slots grouped by row
    slot_w_ptr,  # (P,) float32 weight of each slot
    dy_ptr,  # (B, dim) float32, contiguous
    u,
    dim,
    cols,
    cmask,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """g_u[cols] = Σ over row u's slots q of slot_w[q] · dy[slot_bag[q], cols], float32."""
    start = tl.load(seg_ptr + u)
    end = tl.load(seg_ptr + u + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < end
        bag = tl.load(slot_bag_ptr + p, mask=pmask, other=0)
        w = tl.load(slot_w_ptr + p, mask=pmask, other=0.0)
        g = tl.load(
            dy_ptr + bag[:, None] * dim + cols[None, :],
            mask=pmask[:, None] & cmask[None, :],
            other=0.0,
        )
        acc += tl.sum(g * w[:, None], axis=0)
    return acc


@triton.jit
def _sgd_fwd_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16, strides (stride_v, stride_c)
    rows_ptr,  # (U,) int64 unique
    seg_ptr,  # (U + 1,) int64 } factored gradient of each row
    slot_bag_ptr,  # (P,) int64 }
    slot_w_ptr,  # (P,) float32 }
    dy_ptr,  # (B, dim) float32 }
    dim,
    stride_v,
    stride_c,
    lr,
    weight_decay,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    u, row, voffs, cols, cmask = _row_tile(rows_ptr, dim, stride_v, stride_c, BLOCK_D)
    g = factored_row_grad(
        seg_ptr, slot_bag_ptr, slot_w_ptr, dy_ptr, u, dim, cols, cmask, BLOCK_P, BLOCK_D
    )
    v = tl.load(values_ptr + voffs, mask=cmask, other=0.0).to(tl.float32)
    g = g + weight_decay * v
    out = round_to_storage(v - lr * g, values_ptr.dtype.element_ty)
    tl.store(values_ptr + voffs, out, mask=cmask)


@triton.jit
def _adagrad_fwd_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16
    state_ptr,  # (R, dim) float32 contiguous: sum of squared gradients
    rows_ptr,  # (U,) int64 unique
    seg_ptr,
    slot_bag_ptr,
    slot_w_ptr,
    dy_ptr,
    dim,
    stride_v,
    stride_c,
    clr,
    eps,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    u, row, voffs, cols, cmask = _row_tile(rows_ptr, dim, stride_v, stride_c, BLOCK_D)
    g = factored_row_grad(
        seg_ptr, slot_bag_ptr, slot_w_ptr, dy_ptr, u, dim, cols, cmask, BLOCK_P, BLOCK_D
    )
    s = tl.load(state_ptr + row * dim + cols, mask=cmask, other=0.0) + g * g
    tl.store(state_ptr + row * dim + cols, s, mask=cmask)
    v = tl.load(values_ptr + voffs, mask=cmask, other=0.0).to(tl.float32)
    v = v - clr * g / (tl.sqrt(s) + eps)
    tl.store(values_ptr + voffs, round_to_storage(v, values_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _rowwise_adagrad_fwd_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16
    state_ptr,  # (R,) float32: one accumulator per row
    rows_ptr,  # (U,) int64 unique
    seg_ptr,
    slot_bag_ptr,
    slot_w_ptr,
    dy_ptr,
    dim,
    stride_v,
    stride_c,
    lr,
    eps,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per row: the accumulator needs the mean of g² over the whole row
    # before any column is updated, so the row's slots are summed twice (the second
    # pass reads dy from L2).
    u = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + u)
    sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        g = factored_row_grad(
            seg_ptr, slot_bag_ptr, slot_w_ptr, dy_ptr, u, dim, cols, cols < dim, BLOCK_P, BLOCK_D
        )
        sq += g * g
    s = tl.load(state_ptr + row) + tl.sum(sq, axis=0) / dim
    tl.store(state_ptr + row, s)
    scale = lr / (tl.sqrt(s) + eps)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < dim
        g = factored_row_grad(
            seg_ptr, slot_bag_ptr, slot_w_ptr, dy_ptr, u, dim, cols, cmask, BLOCK_P, BLOCK_D
        )
        voffs = row * stride_v + cols * stride_c
        v = tl.load(values_ptr + voffs, mask=cmask, other=0.0).to(tl.float32)
        out = round_to_storage(v - scale * g, values_ptr.dtype.element_ty)
        tl.store(values_ptr + voffs, out, mask=cmask)


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
    tl.store(values_ptr + voffs, round_to_storage(v, values_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _adam_fwd_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16
    m_ptr,  # (R, dim) float32
    s_ptr,  # (R, dim) float32
    rows_ptr,  # (U,) int64 unique
    seg_ptr,
    slot_bag_ptr,
    slot_w_ptr,
    dy_ptr,
    dim,
    stride_v,
    stride_c,
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
    u, row, voffs, cols, cmask = _row_tile(rows_ptr, dim, stride_v, stride_c, BLOCK_D)
    g = factored_row_grad(
        seg_ptr, slot_bag_ptr, slot_w_ptr, dy_ptr, u, dim, cols, cmask, BLOCK_P, BLOCK_D
    )
    _adam_update(
        values_ptr,
        m_ptr,
        s_ptr,
        row,
        voffs,
        cols,
        cmask,
        g,
        dim,
        beta1,
        beta2,
        omb1,
        omb2,
        step_size,
        eps_term,
        shrink,
    )


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
    u, row, voffs, cols, cmask = _row_tile(rows_ptr, dim, stride_v, 1, BLOCK_D)
    start = tl.load(seg_ptr + u)
    end = tl.load(seg_ptr + u + 1)
    g = segment_row_grad(
        order_ptr, w_ptr, dy_ptr, start, end, M, dim, cols, cmask, BLOCK_P, BLOCK_D
    )
    _adam_update(
        values_ptr,
        m_ptr,
        s_ptr,
        row,
        voffs,
        cols,
        cmask,
        g,
        dim,
        beta1,
        beta2,
        omb1,
        omb2,
        step_size,
        eps_term,
        shrink,
    )


# Slot tile of the row reduction: random lookups put 1-2 slots on most rows.
_BLOCK_P = 8


def _launch(kernel, values, states, rows, grads, scalars, grid=None) -> None:
    """Launch an optimizer kernel on the touched rows (no launch when there are none)."""
    _check_values(values)
    dim = values.shape[1]
    if rows.numel() == 0 or dim == 0:
        return
    # rows.contiguous(): the kernels index rows by position (rows[::2] has stride 2).
    kernel[grid or _grid(rows, dim)](
        values,
        *states,
        rows.contiguous(),
        *_factored(rows, grads),
        dim,
        values.stride(0),
        values.stride(1),
        *[float(x) for x in scalars],
        BLOCK_P=_BLOCK_P,
        BLOCK_D=_block_d(dim),
    )


@register_cuda("sgd_step")
def sgd_step_triton(values, rows, grads, *, lr: float, weight_decay: float = 0.0) -> None:
    """grads: (U, dim) float32 or :class:`~kernels.SparseRowGrads` of the rows."""
    _launch(_sgd_fwd_kernel, values, (), rows, grads, (lr, weight_decay))


@register_cuda("adagrad_step")
def adagrad_step_triton(values, state_sum, rows, grads, *, lr, eps, lr_decay=0.0, step=1) -> None:
    clr = lr / (1 + (step - 1) * lr_decay)
    _launch(_adagrad_fwd_kernel, values, (state_sum,), rows, grads, (clr, eps))


@register_cuda("rowwise_adagrad_step")
def rowwise_adagrad_step_triton(values, state_sum, rows, grads, *, lr, eps) -> None:
    _launch(
        _rowwise_adagrad_fwd_kernel,
        values,
        (state_sum,),
        rows,
        grads,
        (lr, eps),
        grid=(rows.numel(),),
    )


@register_cuda("adam_step")
def adam_step_triton(
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
    scalars = adam_scalars(step, lr, beta1, beta2, eps, weight_decay, decoupled)
    _launch(_adam_fwd_kernel, values, (exp_avg, exp_avg_sq), rows, grads, scalars)


def bag_backward_adam_step(
    values,
    exp_avg,
    exp_avg_sq,
    idx,
    w,
    dy,
    *,
    step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay=0.0,
    decoupled=False,
):
    """bag_backward followed by adam_step on its rows, with the row gradients kept on chip.

    values (R, dim) float32|bfloat16 with unit column stride, exp_avg/exp_avg_sq (R, dim)
    float32 contiguous, idx (B, M) int, w (B, M) float, dy (B, dim). Updates values and
    the moments in place; returns dw (B, M) float32 (computed from the values before the
    update, as bag_backward would) and the sorted unique rows (U,) int64 that were updated.
    """
    _check_values(values)
    if values.stride(1) != 1:
        raise ValueError("values: expected unit column stride")
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
        values,
        idx,
        dy,
        dw,
        M,
        dim,
        values.stride(0),
        BLOCK_M=_BLOCK_M,
        BLOCK_D=BLOCK_D,
    )
    scalars = adam_scalars(step, lr, beta1, beta2, eps, weight_decay, decoupled)
    _bag_bwd_adam_kernel[_grid(rows, dim)](
        values,
        exp_avg,
        exp_avg_sq,
        rows,
        order,
        seg,
        w,
        dy,
        M,
        dim,
        values.stride(0),
        *scalars,
        BLOCK_P=8,
        BLOCK_D=BLOCK_D,
    )
    return dw, rows
