"""Triton kernels for the CSR bags a table block serves: ragged bags of (row, weight) slots.

Bag b is the slots [offsets[b], offsets[b+1]) of the flat rows (P,) and weights (P,);
a shard gets a ragged share of each token's slots, so bags have any length, empty
included. The forward is one program per (bag, column block); the backward computes
dw (one program per (bag, slot tile)) and leaves the row gradients in factored form
(:class:`kernels.SparseRowGrads`: slots grouped by row with ``torch.sort``), which the
fused optimizer kernels of :mod:`.sparse_optim` reduce row by row inside the update.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import register_cuda
from ..row_grads import SparseRowGrads
from .bag import _block_d, _check_kernel_dtypes

__all__ = ["bag_forward_csr_triton", "bag_dw_csr_triton", "bag_backward_sparse_triton"]

# Slot tile: BLOCK_P gathered rows in flight per program. Store bags hold 16-128 slots.
_BLOCK_P = 16


@triton.jit
def _bag_csr_fwd_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16 | float16, strides (stride_v, stride_c)
    rows_ptr,  # (P,) int64 row of each slot
    w_ptr,  # (P,) float32 weight of each slot
    offsets_ptr,  # (B + 1,) int64: bag b is slots [offsets[b], offsets[b + 1])
    out_ptr,  # (B, dim) float32, contiguous
    dim,
    stride_v,
    stride_c,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 ids: row * stride_v overflows int32 on large tables.
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < dim
    start = tl.load(offsets_ptr + b)
    end = tl.load(offsets_ptr + b + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < end
        rows = tl.load(rows_ptr + p, mask=pmask, other=0)
        w = tl.load(w_ptr + p, mask=pmask, other=0.0)
        v_ptrs = values_ptr + rows[:, None] * stride_v + cols[None, :] * stride_c
        v = tl.load(v_ptrs, mask=pmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * w[:, None], axis=0)
    tl.store(out_ptr + b * dim + cols, acc, mask=cmask)


@triton.jit
def _bag_csr_dw_kernel(
    values_ptr,  # (R, dim) float32 | bfloat16 | float16, strides (stride_v, stride_c)
    rows_ptr,  # (P,) int64
    offsets_ptr,  # (B + 1,) int64
    dy_ptr,  # (B, dim) float32, contiguous
    dw_ptr,  # (P,) float32: dw[p] = <values[rows[p]], dy[bag of p]>
    dim,
    stride_v,
    stride_c,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Program (b, t) takes slot tile t of bag b; tiles past a short bag's end do nothing.
    b = tl.program_id(0).to(tl.int64)
    end = tl.load(offsets_ptr + b + 1)
    p = tl.load(offsets_ptr + b) + tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < end
    rows = tl.load(rows_ptr + p, mask=pmask, other=0)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < dim
        g = tl.load(dy_ptr + b * dim + cols, mask=cmask, other=0.0)
        v_ptrs = values_ptr + rows[:, None] * stride_v + cols[None, :] * stride_c
        v = tl.load(v_ptrs, mask=pmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * g[None, :], axis=1)
    tl.store(dw_ptr + p, acc, mask=pmask)


def _csr_args(rows, w, offsets):
    return (
        rows.to(torch.int64).contiguous(),
        w.to(torch.float32).contiguous(),
        offsets.to(torch.int64).contiguous(),
    )


@register_cuda("bag_forward_csr")
def bag_forward_csr_triton(values, rows, w, offsets) -> torch.Tensor:
    """(B, dim) float32: out[b] = Σ_{p in bag b} w[p] · values[rows[p]] (arguments checked
    by the caller: rows in range, offsets non-decreasing from 0 to P)."""
    _check_kernel_dtypes(values, w)
    rows, w, offsets = _csr_args(rows, w, offsets)
    B, dim = offsets.numel() - 1, values.shape[1]
    # empty, not zeros: the grid writes every element, empty bags included.
    out = torch.empty(B, dim, dtype=torch.float32, device=values.device)
    if B == 0 or dim == 0:
        return out  # an empty grid is not a valid launch
    BLOCK_D = _block_d(dim)
    _bag_csr_fwd_kernel[(B, triton.cdiv(dim, BLOCK_D))](
        values,
        rows,
        w,
        offsets,
        out,
        dim,
        values.stride(0),
        values.stride(1),
        BLOCK_P=_BLOCK_P,
        BLOCK_D=BLOCK_D,
    )
    return out


@register_cuda("bag_dw_csr")
def bag_dw_csr_triton(values, rows, offsets, dy) -> torch.Tensor:
    """dw (P,) float32: dw[p] = <values[rows[p]], dy[b]> for the slots p of bag b."""
    _check_kernel_dtypes(values, dy)
    rows = rows.to(torch.int64).contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    B, dim, P = offsets.numel() - 1, values.shape[1], rows.numel()
    dy = dy.to(torch.float32).contiguous()
    dw = torch.empty(P, dtype=torch.float32, device=values.device)
    if B and P and dim:
        longest = int(offsets.diff().max())  # sizes the grid: one program per slot tile
        _bag_csr_dw_kernel[(B, triton.cdiv(longest, _BLOCK_P))](
            values,
            rows,
            offsets,
            dy,
            dw,
            dim,
            values.stride(0),
            values.stride(1),
            BLOCK_P=_BLOCK_P,
            BLOCK_D=_block_d(dim),
        )
    elif P:
        dw.zero_()  # dim == 0: every dot product is empty
    return dw


@register_cuda("bag_backward_sparse")
def bag_backward_sparse_triton(values, rows, w, offsets, dy) -> tuple[torch.Tensor, SparseRowGrads]:
    """dw (P,) float32 and the row gradients in factored form, slots grouped by row."""
    _check_kernel_dtypes(values, w)
    rows, w, offsets = _csr_args(rows, w, offsets)
    dy = dy.to(torch.float32).contiguous()
    dw = bag_dw_csr_triton(values, rows, offsets, dy)
    # output_size: no device-to-host sync to size the result.
    bag_of_slot = torch.repeat_interleave(
        torch.arange(offsets.numel() - 1, device=rows.device),
        offsets.diff(),
        output_size=rows.numel(),
    )
    return dw, SparseRowGrads.from_slots(rows, w, bag_of_slot, dy)
