"""The bag backward with its slots grouped by row beforehand, by whoever sends them.

A table cut into column blocks hands every block of a row block the same (row, weight)
slots. Grouping the slots by row, which the factored row gradients need, is then the
same work on every block; the sender does it once (:func:`group_rows`) and each block
takes the grouping with its share of the columns (:func:`bag_backward_grouped`). Both
are made of the existing kernels: the C grouping of :meth:`SparseRowGrads.from_slots`
and the dw kernel (Triton on CUDA, C on CPU, else its torch composite).
"""

from __future__ import annotations

import torch

from ._dispatch import record
from .bag import _native_bag, _triton_impl, native_bag_dw
from .reference import accumulation_dtype
from .row_grads import SparseRowGrads

__all__ = ["group_rows", "bag_dw", "bag_backward_grouped"]


def group_rows(
    rows: torch.Tensor, num_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uniq (U,), seg (U+1,), order (P,)), all int64: slot ``order[q]`` is the q-th in row
    order (stable), and the slots of row ``uniq[u]`` are ``order[seg[u]:seg[u+1]]``.
    Rows must lie in [0, num_rows) when ``num_rows`` is given (it allows the C grouping)."""
    P = rows.numel()
    slots = torch.arange(P, dtype=torch.int64, device=rows.device)
    g = SparseRowGrads.from_slots(
        rows,
        torch.empty(P, device=rows.device),
        slots,
        torch.empty(0, 1, device=rows.device),
        num_rows,
    )
    return g.rows, g.seg, g.slot_bag


def bag_dw(values, rows, offsets, dy) -> torch.Tensor:
    """dw (P,): dw[p] = <values[rows[p]], dy[b]> for the slots p of bag b, in float32."""
    B = offsets.numel() - 1
    impl = _triton_impl("bag_dw_csr", values, dy, rows, offsets)
    if impl is not None:
        record("bag_dw_csr", "triton")
        return impl(values, rows, offsets, dy)
    if _native_bag(values, dy):
        record("bag_dw_csr", "native")
        return native_bag_dw(values, rows, offsets, dy)
    record("bag_dw_csr", "composite")
    acc = accumulation_dtype(values, dy)
    bag_of_slot = torch.repeat_interleave(torch.arange(B, device=rows.device), offsets.diff())
    return (values[rows].to(acc) * dy.to(acc)[bag_of_slot]).sum(dim=1).to(torch.float32)


def bag_backward_grouped(
    values, rows, w, offsets, dy, uniq, seg, order
) -> tuple[torch.Tensor, SparseRowGrads]:
    """:func:`kernels.bag.bag_backward_sparse` with the grouping of ``rows`` given:
    ``uniq`` (block-local rows), ``seg`` and ``order`` as :func:`group_rows` makes them."""
    B = offsets.numel() - 1
    dw = bag_dw(values, rows, offsets, dy)
    bag_of_slot = torch.repeat_interleave(torch.arange(B, device=rows.device), offsets.diff())
    dy = dy.to(torch.float32).contiguous()
    grads = SparseRowGrads(
        uniq.to(torch.int64),
        seg.to(torch.int64),
        bag_of_slot[order].contiguous(),
        w.to(torch.float32)[order].contiguous(),
        dy,
    )
    return dw, grads
