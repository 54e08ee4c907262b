"""Triton kernel for the exact multi-head product-key top-k.

One program takes a block of BLOCK_B queries of one head and does the whole selection:
both half-scores (``tl.dot``), the top-kk of each half, the combination of the two
candidate lists, and the final top-k. Nothing of size n or n² reaches memory.

Ordering is by (score desc, index asc), as in :func:`kernels.reference.product_key_topk_reference`.
Scores and indices are packed into one int64 whose integer order is exactly that order
(``_pack``), so every "take the best" is a single ``tl.max`` and ties need no extra pass.

The selection is not differentiable. When autograd needs the scores, the host recomputes
them with torch from the selected sub-key rows, so gradients reach q and keys.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._dispatch import register_cuda

__all__ = ["product_key_topk_triton"]

# Tile sizes, checked without a GPU by compiling for sm_90 (cuobjdump --dump-resource-usage):
# 16 queries (tl.dot needs 16 rows) x 32 sub-keys x 16 dims at 4 warps needs 110 registers
# and no spills; 128-key or 64-dim tiles spill. Small key chunks are also cheaper to
# select from: each insertion round scans the chunk plus the kk-entry list.
_BLOCK_B = 16
_MAX_BLOCK_N = 32
_BLOCK_D = 16
_NUM_WARPS = 4
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Below every packed (score, index): the sentinel for empty or removed entries.
_EMPTY: tl.constexpr = tl.constexpr(-(2**63))


@triton.jit
def _pack(score, index):
    """int64 key ordered like (score desc, index asc) for index in [0, 2³²)."""
    # torch.sort sees -0.0 == 0.0, so they must tie here too (their bit patterns differ).
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    # Flip the magnitude bits of negatives: signed int order then equals float order.
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    # Low word 2³² - 1 - index: among equal keys the smaller index is the larger int.
    return ((key.to(tl.int64) + 1) << 32) - (index.to(tl.int64) + 1)


@triton.jit
def _unpack(packed):
    key = packed >> 32
    index = ((key + 1) << 32) - packed - 1
    k32 = key.to(tl.int32)
    bits = k32 ^ ((k32 >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), index


@triton.jit
def _half_scores(
    q_ptr,  # (B, H, Dk) contiguous
    keys_ptr,  # (H, 2, n, D2) contiguous
    b_offs,  # (BLOCK_B,) int64 query rows
    bmask,
    h,
    half,
    n0,
    H,
    n,
    D2,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(BLOCK_B, BLOCK_N) float32 scores of query half `half` against sub-keys n0 + [0, BLOCK_N)."""
    ncols = n0 + tl.arange(0, BLOCK_N)
    nmask = ncols < n
    q_base = q_ptr + b_offs[:, None] * (H * 2 * D2) + (h * 2 + half) * D2
    k_base = keys_ptr + (h * 2 + half) * n * D2
    s = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D2, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D2
        qt = tl.load(q_base + d[None, :], mask=bmask[:, None] & dmask[None, :], other=0.0)
        kt = tl.load(
            k_base + ncols[None, :] * D2 + d[:, None],
            mask=dmask[:, None] & nmask[None, :],
            other=0.0,
        )
        # ieee: TF32 would reorder near-equal candidates against the float32 reference.
        s += tl.dot(qt.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    return s


@triton.jit
def _half_topk(
    q_ptr,  # (B, H, Dk)
    keys_ptr,  # (H, 2, n, D2)
    b_offs,
    bmask,
    h,
    half,
    H,
    n,
    D2,
    kk,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_P: tl.constexpr,
):
    """Unordered packed top-kk (BLOCK_B, K_P) of one half; columns >= kk are _EMPTY."""
    tcols = tl.arange(0, K_P)[None, :]
    # Distinct placeholders (_EMPTY + t) so that each insertion replaces exactly one.
    # Columns >= kk hold the int64 maximum so that they are never the minimum.
    big = tl.where(tcols < kk, _EMPTY + 1 + tcols.to(tl.int64), -(_EMPTY + 1))
    big = tl.broadcast_to(big, (BLOCK_B, K_P))
    thr = tl.min(big, axis=1)
    for n0 in range(0, n, BLOCK_N):
        s = _half_scores(
            q_ptr, keys_ptr, b_offs, bmask, h, half, n0, H, n, D2, BLOCK_B, BLOCK_N, BLOCK_D
        )
        ncols = n0 + tl.arange(0, BLOCK_N)[None, :]
        chunk = tl.where(ncols < n, _pack(s, ncols), _EMPTY)
        # Only chunk entries above the current kk-th best can enter: insert them best
        # first, as many rounds as the row with most such entries needs (few after the
        # first chunk), instead of re-selecting kk entries per chunk.
        rounds = tl.max(tl.sum((chunk > thr[:, None]).to(tl.int32), axis=1), axis=0)
        for _ in range(rounds):
            m = tl.max(chunk, axis=1)
            chunk = tl.where(chunk == m[:, None], _EMPTY, chunk)
            replace = (big == thr[:, None]) & (m > thr)[:, None]
            big = tl.where(replace, m[:, None], big)
            thr = tl.min(big, axis=1)
    return tl.where(tcols < kk, big, _EMPTY)


@triton.jit
def _store_sorted(
    top,  # (BLOCK_B, K_P) packed, unordered
    out_ptrs,  # (BLOCK_B,) pointers to the first of kk int64 slots
    bmask,
    kk,
):
    """Write the kk entries of each row best first (so that rank = position)."""
    for t in range(kk):
        m = tl.max(top, axis=1)
        top = tl.where(top == m[:, None], _EMPTY, top)
        tl.store(out_ptrs + t, m, mask=bmask)


@triton.jit
def _pk_topk_fwd_kernel(
    q_ptr,  # (B, H, Dk) contiguous
    keys_ptr,  # (H, 2, n, D2) contiguous
    pair_a_ptr,  # (C,) int32 rank in the first half's list of candidate pair c
    pair_b_ptr,  # (C,) int32 rank in the second half's list
    scratch_ptr,  # (B, H, 2, kk) int64 packed half top lists, best first
    index_ptr,  # (B, H, k) int64 out
    score_ptr,  # (B, H, k) float32 out
    B,
    H,
    n,
    D2,
    k,
    kk,
    C,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_P: tl.constexpr,
    C_P: tl.constexpr,
):
    h = tl.program_id(1).to(tl.int64)
    b_offs = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = b_offs < B
    half_base = scratch_ptr + ((b_offs * H + h) * 2) * kk
    for half in range(2):
        top = _half_topk(
            q_ptr, keys_ptr, b_offs, bmask, h, half, H, n, D2, kk, BLOCK_B, BLOCK_N, BLOCK_D, K_P
        )
        _store_sorted(top, half_base + half * kk, bmask, kk)
    # Other threads of this program wrote the lists; make them visible before gathering.
    tl.debug_barrier()
    # Candidate pairs are the rank pairs (a, b) with (a+1)(b+1) <= k: any other pair has
    # at least k pairs ahead of it. That is ~k·ln k candidates instead of kk².
    c = tl.arange(0, C_P)
    cmask = c < C
    pa = tl.load(pair_a_ptr + c, mask=cmask, other=0)
    pb = tl.load(pair_b_ptr + c, mask=cmask, other=0)
    lmask = bmask[:, None] & cmask[None, :]
    s1, i1 = _unpack(tl.load(half_base[:, None] + pa[None, :], mask=lmask, other=0))
    s2, i2 = _unpack(tl.load(half_base[:, None] + kk + pb[None, :], mask=lmask, other=0))
    cand = tl.where(cmask[None, :], _pack(s1 + s2, i1 * n + i2), _EMPTY)
    out_base = (b_offs * H + h) * k
    for t in range(k):
        m = tl.max(cand, axis=1)
        cand = tl.where(cand == m[:, None], _EMPTY, cand)
        score, index = _unpack(m)
        tl.store(index_ptr + out_base + t, index, mask=bmask)
        tl.store(score_ptr + out_base + t, score, mask=bmask)


@functools.lru_cache(maxsize=64)
def _rank_pairs(k: int, kk: int, device: str):
    """(a, b) ranks with (a+1)(b+1) <= k, a, b < kk, as two int32 tensors on device."""
    pairs = [(a, b) for a in range(kk) for b in range(min(kk, k // (a + 1)))]
    a = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=device)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=device)
    return a, b


def product_key_select_triton(q: torch.Tensor, keys: torch.Tensor, k: int):
    """Kernel-only selection: (indices (B, H, k) int64, float32 scores (B, H, k)), no autograd."""
    B, H, _ = q.shape
    n, D2 = keys.shape[2], keys.shape[3]
    kk = min(k, n)
    if n * n > 2**32:
        raise ValueError(
            f"keys: n = {n} sub-keys per half exceeds the packed index range (n² <= 2³²)"
        )
    index = torch.empty(B, H, k, dtype=torch.int64, device=q.device)
    scores = torch.empty(B, H, k, dtype=torch.float32, device=q.device)
    if B == 0 or H == 0:
        return index, scores
    pair_a, pair_b = _rank_pairs(k, kk, str(q.device))
    scratch = torch.empty(B, H, 2, kk, dtype=torch.int64, device=q.device)
    grid = (triton.cdiv(B, _BLOCK_B), H)
    _pk_topk_fwd_kernel[grid](
        q.contiguous(),
        keys.contiguous(),
        pair_a,
        pair_b,
        scratch,
        index,
        scores,
        B,
        H,
        n,
        D2,
        k,
        kk,
        pair_a.numel(),
        BLOCK_B=_BLOCK_B,
        BLOCK_N=min(_MAX_BLOCK_N, max(16, triton.next_power_of_2(n))),
        BLOCK_D=_BLOCK_D,
        K_P=triton.next_power_of_2(kk),
        C_P=triton.next_power_of_2(pair_a.numel()),
        num_warps=_NUM_WARPS,
    )
    return index, scores


def _gathered_scores(q: torch.Tensor, keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Differentiable scores of the selected pairs: q halves · the gathered sub-key rows."""
    B, H, Dk = q.shape
    n = keys.shape[2]
    halves = q.reshape(B, H, 2, Dk // 2)
    heads = torch.arange(H, device=q.device)[None, :, None]
    rows1 = keys[heads, 0, index // n]  # (B, H, k, D2)
    rows2 = keys[heads, 1, index % n]
    s1 = torch.einsum("bhd,bhkd->bhk", halves[:, :, 0], rows1)
    s2 = torch.einsum("bhd,bhkd->bhk", halves[:, :, 1], rows2)
    return s1 + s2


@register_cuda("product_key_topk")
def product_key_topk_triton(q: torch.Tensor, keys: torch.Tensor, k: int):
    """Exact top-k, as :func:`kernels.product_key.product_key_topk` (arguments checked there)."""
    if q.dtype not in _KERNEL_DTYPES:
        # float64 (gradcheck): the float32 kernel could order near-ties differently, so
        # the dispatcher keeps float64 on the torch path.
        raise TypeError(f"q: the Triton top-k takes {_KERNEL_DTYPES}, got {q.dtype}")
    with torch.no_grad():
        index, scores = product_key_select_triton(q.detach(), keys.detach(), k)
    if torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad):
        return _gathered_scores(q, keys, index), index
    # Without autograd the kernel's float32 sums are the scores (no (B, H, k, D2) gather).
    return scores.to(q.dtype), index
