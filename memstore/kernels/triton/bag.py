"""Triton kernels for weighted bags: y[b] = Σ_m w[b, m] · values[idx[b, m]] and its gradients.

The value-row gradient is reduced without atomics: the host sorts the (token, slot)
pairs by row (``torch.sort``), and one program per unique row (and column block) sums
its contiguous segment of the sorted order. Each row is therefore written exactly once,
the result is deterministic, and the fused optimizer in :mod:`.sparse_optim` can apply
the update in the same program without the row gradients ever reaching memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import register_cuda
from ..reference import accumulation_dtype

__all__ = ["bag_forward_triton", "bag_backward_triton", "sort_slots_by_row"]

# Column tile: wide enough to give each warp 128-byte row segments, small enough that a
# (BLOCK_M, BLOCK_D) tile of gathered rows stays in registers.
_MAX_BLOCK_D = 256
_BLOCK_M = 16


def _block_d(dim: int) -> int:
    return min(_MAX_BLOCK_D, max(16, triton.next_power_of_2(dim)))


# Value dtypes the kernels read (and accumulate in float32).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _row_major(values: torch.Tensor) -> torch.Tensor:
    return values if values.stride(1) == 1 else values.contiguous()


def _check_kernel_dtypes(values: torch.Tensor, w: torch.Tensor) -> None:
    """The kernels accumulate in float32: the dispatcher keeps float64 (gradcheck) in torch."""
    if values.dtype not in KERNEL_DTYPES or accumulation_dtype(values, w) != torch.float32:
        raise TypeError(
            f"values, w: the Triton bag kernels take {KERNEL_DTYPES} values and "
            f"float32 accumulation, got {values.dtype} and {w.dtype}"
        )


@triton.jit
def _bag_fwd_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16, row stride stride_v, unit column stride
    idx_ptr,  # (B, M) int64 | int32, contiguous
    w_ptr,  # (B, M) floating, contiguous
    out_ptr,  # (B, dim) float32, contiguous
    M,
    dim,
    stride_v,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 program ids: b * M and row * stride_v overflow int32 on large tables.
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < dim
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # BLOCK_M slots at a time so that BLOCK_M row loads are in flight together.
    for m0 in range(0, M, BLOCK_M):
        slots = m0 + tl.arange(0, BLOCK_M)
        smask = slots < M
        rows = tl.load(idx_ptr + b * M + slots, mask=smask, other=0).to(tl.int64)
        w = tl.load(w_ptr + b * M + slots, mask=smask, other=0.0).to(tl.float32)
        v_ptrs = values_ptr + rows[:, None] * stride_v + cols[None, :]
        v = tl.load(v_ptrs, mask=smask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * w[:, None], axis=0)
    tl.store(out_ptr + b * dim + cols, acc, mask=cmask)


@triton.jit
def _bag_dw_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16, row stride stride_v
    idx_ptr,  # (B, M) int64 | int32, contiguous
    dy_ptr,  # (B, dim) float32, contiguous
    dw_ptr,  # (B, M) float32, contiguous
    M,
    dim,
    stride_v,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    smask = slots < M
    rows = tl.load(idx_ptr + b * M + slots, mask=smask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < dim
        g = tl.load(dy_ptr + b * dim + cols, mask=cmask, other=0.0)
        v_ptrs = values_ptr + rows[:, None] * stride_v + cols[None, :]
        v = tl.load(v_ptrs, mask=smask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * g[None, :], axis=1)
    tl.store(dw_ptr + b * M + slots, acc, mask=smask)


@triton.jit
def segment_row_grad(
    order_ptr,  # (P,) int64: slot ids (b * M + m) sorted by row
    w_ptr,  # (P,) floating: slot weights, flat (B, M)
    dy_ptr,  # (B, dim) float32, contiguous
    start,
    end,
    M,
    dim,
    cols,
    cmask,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Σ over the slots order[start:end] of w[slot] · dy[slot // M, cols], in float32."""
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < end
        slot = tl.load(order_ptr + p, mask=pmask, other=0)
        w = tl.load(w_ptr + slot, mask=pmask, other=0.0).to(tl.float32)
        bag = slot // M
        g_ptrs = dy_ptr + bag[:, None] * dim + cols[None, :]
        g = tl.load(g_ptrs, mask=pmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(g * w[:, None], axis=0)
    return acc


@triton.jit
def _bag_row_grad_kernel(
    order_ptr,  # (P,) int64: slot ids sorted by row
    seg_ptr,  # (U + 1,) int64: segment u of order is [seg[u], seg[u + 1])
    w_ptr,  # (P,) floating
    dy_ptr,  # (B, dim) float32
    grads_ptr,  # (U, dim) float32, contiguous
    M,
    dim,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < dim
    start = tl.load(seg_ptr + u)
    end = tl.load(seg_ptr + u + 1)
    acc = segment_row_grad(
        order_ptr, w_ptr, dy_ptr, start, end, M, dim, cols, cmask, BLOCK_P, BLOCK_D
    )
    tl.store(grads_ptr + u * dim + cols, acc, mask=cmask)


@register_cuda("bag_forward")
def bag_forward_triton(values: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, dim) float32 = Σ_m w[b, m] · values[idx[b, m]], float32 accumulation."""
    _check_kernel_dtypes(values, w)
    values = _row_major(values)
    B, M = idx.shape
    dim = values.shape[1]
    # empty, not zeros: the grid writes every element (benchmarks/gpu.py checks this
    # by poisoning the allocator with NaN), and a memset would cost a full extra write.
    out = torch.empty(B, dim, dtype=torch.float32, device=values.device)
    if B == 0 or dim == 0:
        return out  # an empty grid is not a valid launch
    BLOCK_D = _block_d(dim)
    grid = (B, triton.cdiv(dim, BLOCK_D))
    _bag_fwd_kernel[grid](
        values,
        idx.contiguous(),
        w.contiguous(),
        out,
        M,
        dim,
        values.stride(0),
        BLOCK_M=_BLOCK_M,
        BLOCK_D=BLOCK_D,
    )
    return out


def sort_slots_by_row(idx: torch.Tensor):
    """Group the flat slots of idx (B, M) by row, for the atomic-free row reduction.

    Returns (rows, order, seg): rows (U,) int64 sorted unique, order (B·M,) int64 slot
    ids sorted by row (stable, so slots of one row stay in token order), and seg (U+1,)
    int64 with row u's slots at order[seg[u]:seg[u+1]].
    """
    flat = idx.reshape(-1).to(torch.int64)
    sorted_rows, order = torch.sort(flat, stable=True)
    rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    seg = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=seg[1:])
    return rows, order, seg


@register_cuda("bag_backward")
def bag_backward_triton(values, idx, w, dy):
    """dw (B, M) float32 = <values[idx], dy> and (rows (U,) int64, grads (U, dim) float32)."""
    _check_kernel_dtypes(values, w)
    values = _row_major(values)
    B, M = idx.shape
    dim = values.shape[1]
    dev = values.device
    idx, w = idx.contiguous(), w.contiguous()
    dy = dy.to(torch.float32).contiguous()
    dw = torch.empty(B, M, dtype=torch.float32, device=dev)
    rows, order, seg = sort_slots_by_row(idx)
    grads = torch.empty(rows.numel(), dim, dtype=torch.float32, device=dev)
    if B == 0 or M == 0 or dim == 0:
        return dw, (rows, grads)
    BLOCK_D = _block_d(dim)
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
    # Random lookups put ~1-2 slots on a row, so a small slot tile wastes few lanes.
    _bag_row_grad_kernel[(rows.numel(), triton.cdiv(dim, BLOCK_D))](
        order,
        seg,
        w,
        dy,
        grads,
        M,
        dim,
        BLOCK_P=8,
        BLOCK_D=BLOCK_D,
    )
    return dw, (rows, grads)
