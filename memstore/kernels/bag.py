"""Weighted bags of value rows: y[b] = Σ_m w[b, m] · values[idx[b, m]], and its gradients.

Bags are given either as a (B, M) index matrix (the public ops) or, inside the store,
in CSR form: flat rows (P,), weights (P,) and offsets (B+1,), so that a shard can take
a ragged share of each token's slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _native
from ._dispatch import TRITON_DTYPES, cuda_impl, force_triton, native_ok, record
from .reference import accumulation_dtype, bag_forward_reference
from .row_grads import SparseRowGrads

__all__ = [
    "bag_forward",
    "bag_backward",
    "bag_backward_rows",
    "bag_forward_csr",
    "bag_backward_csr",
    "bag_backward_sparse",
    "BagFunction",
]


def _check_bag_args(values: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
    if values.dim() != 2:
        raise ValueError(
            f"values: expected a 2-d (rows, dim) tensor, got shape {tuple(values.shape)}"
        )
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx: expected int64 or int32, got {idx.dtype}")
    if not w.is_floating_point():
        raise TypeError(f"w: expected a floating tensor, got {w.dtype}")
    if idx.shape != w.shape:
        raise ValueError(
            f"w: expected shape {tuple(idx.shape)} (same as idx), got {tuple(w.shape)}"
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= values.shape[0]):
        raise IndexError(
            f"idx: expected every index in [0, {values.shape[0]}), "
            f"got range [{int(idx.min())}, {int(idx.max())}]"
        )


def _row_major(values: torch.Tensor) -> torch.Tensor:
    return values if values.stride(1) == 1 else values.contiguous()


def _slot_offsets(B: int, M: int) -> torch.Tensor:
    return torch.arange(B + 1, dtype=torch.int64) * M


def _native_bag(values, w) -> bool:
    """The C path accumulates in float32: it takes the inputs that ask for no more."""
    return native_ok(values) and accumulation_dtype(values, w) == torch.float32


def _triton_impl(name: str, values, w, *tensors):
    """The Triton implementation for these tensors (the kernels accumulate in float32)."""
    if values.dtype in TRITON_DTYPES and accumulation_dtype(values, w) == torch.float32:
        return cuda_impl(name, values, w, *tensors)
    return None


def _library_bag(values, w) -> bool:
    """float32 CPU bags go to ``F.embedding_bag`` unless the C forward was measured
    faster on this kind of CPU (:func:`_native.prefer_c_forward`). On bfloat16 values
    the library returns bfloat16 sums, and the store returns float32 sums accumulated in
    float32: bfloat16 stays on the C path."""
    return (
        values.device.type == "cpu"
        and values.dtype == torch.float32
        and w.dtype != torch.float64
        and not force_triton()
        and not (native_ok(values) and _native.prefer_c_forward())
    )


def bag_forward_csr(values, rows, w, offsets) -> torch.Tensor:
    """CSR bags: out[b] = Σ_{p in [offsets[b], offsets[b+1])} w[p] · values[rows[p]]."""
    B = offsets.numel() - 1
    impl = _triton_impl("bag_forward_csr", values, w, rows, offsets)
    if impl is not None:
        record("bag_forward_csr", "triton")
        return impl(values, rows, w, offsets)
    if _library_bag(values, w):
        record("bag_forward_csr", "library")
        rows = rows.to(torch.int64)
        return F.embedding_bag(
            rows,
            values,
            offsets.to(torch.int64),
            mode="sum",
            per_sample_weights=w.to(torch.float32),
            include_last_offset=True,
        )
    if _native_bag(values, w):
        record("bag_forward_csr", "native")
        return bag_forward_csr_native(values, rows, w, offsets)
    record("bag_forward_csr", "composite")
    acc = accumulation_dtype(values, w)
    bag_of_slot = torch.repeat_interleave(torch.arange(B, device=rows.device), offsets.diff())
    out = torch.zeros(B, values.shape[1], dtype=acc, device=values.device)
    return out.index_add_(0, bag_of_slot, values[rows].to(acc) * w.to(acc)[:, None])


def bag_forward_csr_native(values, rows, w, offsets) -> torch.Tensor:
    """The C forward (float32 or bfloat16 values, float32 accumulation), whatever the
    dispatch prefers: ``benchmarks/ops.py`` times it against ``F.embedding_bag``."""
    values = _row_major(values)
    rows = rows.to(torch.int64).contiguous()
    w = w.to(torch.float32).contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    out = torch.empty(offsets.numel() - 1, values.shape[1], dtype=torch.float32)
    fn = _native.typed("bag_forward", values.dtype)
    _native.parallel_for(
        fn,
        out.shape[0],
        values.data_ptr(),
        values.stride(0),
        rows.data_ptr(),
        w.data_ptr(),
        offsets.data_ptr(),
        values.shape[1],
        out.data_ptr(),
    )
    return out


def bag_forward(values: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, dim) = Σ_m w[b, m] · values[idx[b, m]], accumulated and returned in float32
    (float64 when values or w are float64)."""
    _check_bag_args(values, idx, w)
    if idx.dim() != 2:
        raise ValueError(f"idx: expected a 2-d (B, M) tensor, got shape {tuple(idx.shape)}")
    impl = _triton_impl("bag_forward", values, w, idx)
    if impl is not None:
        record("bag_forward", "triton")
        return impl(values, idx, w)
    if _library_bag(values, w) or _native_bag(values, w):
        B, M = idx.shape
        return bag_forward_csr(values, idx.reshape(-1), w.reshape(-1), _slot_offsets(B, M))
    record("bag_forward", "composite")
    return bag_forward_reference(values, idx, w)


def native_bag_dw(values, rows, offsets, dy) -> torch.Tensor:
    """dw (P,) float32 by the C kernel: dw[p] = <values[rows[p]], dy[b]> for the slots p
    of bag b. The caller has checked :func:`_native_bag`."""
    values = _row_major(values)
    rows = rows.to(torch.int64).contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    dy = dy.to(torch.float32).contiguous()
    dw = torch.empty(rows.numel(), dtype=torch.float32)
    _native.parallel_for(
        _native.typed("bag_dw", values.dtype),
        offsets.numel() - 1,
        values.data_ptr(),
        values.stride(0),
        rows.data_ptr(),
        offsets.data_ptr(),
        dy.data_ptr(),
        values.shape[1],
        dw.data_ptr(),
    )
    return dw


def bag_backward_sparse(values, rows, w, offsets, dy) -> tuple[torch.Tensor, SparseRowGrads]:
    """CSR bag backward: dw (P,) and the row gradients in factored form (no (U, dim) tensor)."""
    impl = _triton_impl("bag_backward_sparse", values, w, rows, offsets, dy)
    if impl is not None:
        record("bag_backward_sparse", "triton")
        return impl(values, rows, w, offsets, dy)
    B = offsets.numel() - 1
    bag_of_slot = torch.repeat_interleave(torch.arange(B, device=rows.device), offsets.diff())
    if _native_bag(values, w):
        record("bag_backward_sparse", "native")
        rows = rows.to(torch.int64).contiguous()
        w = w.to(torch.float32).contiguous()
        dy = dy.to(torch.float32).contiguous()
        dw = native_bag_dw(values, rows, offsets, dy)
        return dw, SparseRowGrads.from_slots(rows, w, bag_of_slot, dy, values.shape[0])
    record("bag_backward_sparse", "composite")
    acc = accumulation_dtype(values, w)
    slot_dy = dy.to(acc)[bag_of_slot]
    dw = (values[rows].to(acc) * slot_dy).sum(dim=1)
    return dw, SparseRowGrads.from_slots(rows, w.to(acc), bag_of_slot, dy.to(acc))


def bag_backward_csr(values, rows, w, offsets, dy):
    """CSR form of :func:`bag_backward`: dw (P,) and (unique rows, grads)."""
    dw, grads = bag_backward_sparse(values, rows, w, offsets, dy)
    return dw, (grads.rows, grads.dense())


def bag_backward_rows(values, idx, w, dy) -> tuple[torch.Tensor, SparseRowGrads]:
    """:func:`bag_backward` with the row gradients left in factored form.

    This is what a table keeps pending until its optimizer step, which then fuses the
    per-row reduction with the update.
    """
    _check_bag_args(values, idx, w)
    if idx.dim() != 2:
        raise ValueError(f"idx: expected a 2-d (B, M) tensor, got shape {tuple(idx.shape)}")
    if dy.shape != (idx.shape[0], values.shape[1]):
        raise ValueError(
            f"dy: expected shape {(idx.shape[0], values.shape[1])} (B, dim), got {tuple(dy.shape)}"
        )
    impl = _triton_impl("bag_backward", values, w, idx, dy)
    if impl is not None:
        record("bag_backward", "triton")
        dw, (rows, grads) = impl(values, idx, w, dy)
        return dw, SparseRowGrads.from_dense(rows, grads)
    B, M = idx.shape
    dw, grads = bag_backward_sparse(values, idx.reshape(-1), w.reshape(-1), _slot_offsets(B, M), dy)
    return dw.reshape(B, M), grads


def bag_backward(values, idx, w, dy):
    """Gradients of :func:`bag_forward`.

    Returns dw (B, M) float32 and (rows, grads): the sorted unique rows (U,) int64 and
    their summed gradients (U, dim) float32 (float64 when an input is float64).
    """
    dw, grads = bag_backward_rows(values, idx, w, dy)
    return dw, (grads.rows, grads.dense())


class BagFunction(torch.autograd.Function):
    """Autograd for bag_forward: dense gradient to w, sparse COO gradient to values."""

    @staticmethod
    def forward(ctx, values, idx, w):
        ctx.save_for_backward(values, idx, w)
        return bag_forward(values, idx, w).to(torch.promote_types(values.dtype, w.dtype))

    @staticmethod
    def backward(ctx, dy):
        values, idx, w = ctx.saved_tensors
        dw, (rows, grads) = bag_backward(values, idx, w, dy)
        dvalues = None
        if ctx.needs_input_grad[0]:
            dvalues = torch.sparse_coo_tensor(
                rows[None],
                grads.to(values.dtype),
                values.shape,
                is_coalesced=True,
                check_invariants=False,
            )
        return dvalues, None, dw.to(w.dtype)
