"""Multi-head product-key top-k (Lample et al. 2019).

Each head splits its query in two halves and scores them against n sub-keys each;
the candidates are all n² sums s1[i] + s2[j], and the result is their exact top-k.
The selection is not differentiable; the returned scores are, through
:class:`SelectedScores`, which sends gradients to the k selected sub-key pairs only.
"""

from __future__ import annotations

import torch

from . import _native
from ._dispatch import TRITON_DTYPES, cuda_impl, native_ok, record

__all__ = ["product_key_topk", "half_scores"]


def _check_args(q: torch.Tensor, keys: torch.Tensor, k: int) -> None:
    if keys.dim() != 4 or keys.shape[1] != 2:
        raise ValueError(f"keys: expected shape (H, 2, n, Dk/2), got {tuple(keys.shape)}")
    H, _, n, half = keys.shape
    if q.dim() != 3 or q.shape[1] != H or q.shape[2] != 2 * half:
        raise ValueError(f"q: expected shape (B, {H}, {2 * half}), got {tuple(q.shape)}")
    if q.dtype != keys.dtype or not q.is_floating_point():
        raise TypeError(f"q: expected the floating dtype of keys ({keys.dtype}), got {q.dtype}")
    if not isinstance(k, int) or not 1 <= k <= n * n:
        raise ValueError(f"k: expected an int in [1, n² = {n * n}], got {k!r}")


def half_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(H, 2, B, n): each query half of q (B, H, Dk) against its n sub-keys."""
    B, H, Dk = q.shape
    halves = q.reshape(B, H, 2, Dk // 2).permute(1, 2, 0, 3)
    return torch.matmul(halves, keys.transpose(-1, -2))


def _select_native(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    H, _, B, n = s.shape
    scores = torch.empty(B, H, k, dtype=torch.float32)
    index = torch.empty(B, H, k, dtype=torch.int64)
    _native.parallel_for(
        _native.library().pk_topk,
        B * H,
        s.data_ptr(),
        H,
        s.stride(2),
        s.stride(0),
        s.stride(1),
        n,
        k,
        scores.data_ptr(),
        index.data_ptr(),
    )
    return scores, index


def _sorted_topk(x: torch.Tensor, index: torch.Tensor, k: int):
    """Top-k along the last dim, ordered by (value desc, index asc)."""
    by_index = torch.argsort(index, dim=-1)
    x, index = x.gather(-1, by_index), index.gather(-1, by_index)
    order = torch.sort(-x, dim=-1, stable=True).indices[..., :k]
    return x.gather(-1, order), index.gather(-1, order)


def _select_composite(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact selection with torch ops for dtypes or devices without a fast path."""
    H, _, B, n = s.shape
    kk = min(k, n)
    arange = torch.arange(n, device=s.device).expand(H, 2, B, n)
    top, pos = _sorted_topk(s, arange, kk)  # (H, 2, B, kk)
    sums = top[:, 0, :, :, None] + top[:, 1, :, None, :]
    index = pos[:, 0, :, :, None] * n + pos[:, 1, :, None, :]
    scores, best = _sorted_topk(sums.flatten(-2), index.flatten(-2), k)
    return scores.permute(1, 0, 2), best.permute(1, 0, 2)


class SelectedScores(torch.autograd.Function):
    """Scores of the selected pairs, differentiable in q and keys.

    The forward takes the scores the selection already computed; the backward sends
    each score's gradient only to the two sub-keys it used (and to the query), which
    is O(B·H·k·Dk) instead of the two dense matmuls of autograd through half_scores.
    """

    @staticmethod
    def forward(ctx, q, keys, index, scores):
        ctx.save_for_backward(q, keys, index)
        return scores.clone()

    @staticmethod
    def backward(ctx, ds):
        q, keys, index = ctx.saved_tensors
        if native_ok(q, keys, dtypes=(torch.float32,)):
            dq, dkeys = _scores_backward_native(q, keys, index, ds)
        else:
            dq, dkeys = _scores_backward_composite(q, keys, index, ds)
        return dq, dkeys, None, None


def _scores_backward_native(q, keys, index, ds):
    H, _, n, hd = keys.shape
    q, keys = q.contiguous(), keys.contiguous()
    index, ds = index.contiguous(), ds.to(torch.float32).contiguous()
    dq = torch.empty_like(q)
    dkeys = torch.empty_like(keys)
    _native.parallel_for(
        _native.library().pk_scores_backward,
        q.shape[0] * H,
        q.data_ptr(),
        keys.data_ptr(),
        index.data_ptr(),
        ds.data_ptr(),
        H,
        n,
        hd,
        index.shape[-1],
        dq.data_ptr(),
        dkeys.data_ptr(),
    )
    return dq, dkeys


def _scores_backward_composite(q, keys, index, ds):
    B, H, Dk = q.shape
    n, hd = keys.shape[2], keys.shape[3]
    heads = torch.arange(H, device=q.device)[None, :, None]
    parts = (index // n, index % n)
    q_halves = q.reshape(B, H, 2, hd)
    dq = torch.empty_like(q_halves)
    dkeys = torch.empty_like(keys)
    for p, sub in enumerate(parts):
        rows = keys[heads, p, sub]  # (B, H, k, hd)
        dq[:, :, p] = torch.einsum("bhk,bhkd->bhd", ds.to(q.dtype), rows)
        flat = (heads * n + sub).reshape(-1)
        contrib = (ds.to(q.dtype)[..., None] * q_halves[:, :, p, None, :]).reshape(-1, hd)
        dkeys[:, p] = (
            torch.zeros(H * n, hd, dtype=q.dtype, device=q.device)
            .index_add_(0, flat, contrib)
            .view(H, n, hd)
        )
    return dq.reshape(B, H, Dk), dkeys


def product_key_topk(q: torch.Tensor, keys: torch.Tensor, k: int):
    """Exact multi-head product-key top-k.

    q (B, H, Dk), keys (H, 2, n, Dk/2) -> scores (B, H, k) sorted descending and
    indices (B, H, k) int64 in [0, n²) with index = i·n + j; equal scores are ordered
    by the smaller index. Scores are differentiable with respect to q and keys.
    """
    _check_args(q, keys, k)
    impl = cuda_impl("product_key_topk", q, keys) if q.dtype in TRITON_DTYPES else None
    if impl is not None:
        record("product_key_topk", "triton")
        return impl(q, keys, k)
    native = native_ok(q, dtypes=(torch.float32,))
    record("product_key_topk", "native" if native else "composite")
    selector = _select_native if native else _select_composite
    with torch.no_grad():
        scores, index = selector(half_scores(q, keys), k)
    scores = scores.to(q.dtype)
    if torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad):
        scores = SelectedScores.apply(q, keys, index, scores)
    return scores, index
