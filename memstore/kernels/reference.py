"""Plain-torch references: the specification of every op in ``kernels``.

Each function here is written for clarity, not speed. The fast paths (CPU native,
Triton) are tested against these on random inputs; when they disagree, these win.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "product_key_topk_reference",
    "accumulation_dtype",
    "bag_forward_reference",
    "bag_backward_reference",
    "sgd_step_reference",
    "adagrad_step_reference",
    "rowwise_adagrad_step_reference",
    "adam_step_reference",
]


def _product_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Half scores (B, H, 2, n) of q (B, H, Dk) against keys (H, 2, n, Dk/2)."""
    B, H, Dk = q.shape
    halves = q.reshape(B, H, 2, Dk // 2)
    return torch.einsum("bhpd,hpnd->bhpn", halves, keys)


def product_key_topk_reference(q: torch.Tensor, keys: torch.Tensor, k: int):
    """Exact top-k over all n² product scores s1[i] + s2[j], by brute force.

    Returns scores (B, H, k) sorted descending and indices (B, H, k) int64 with
    index = i·n + j; equal scores are ordered by the smaller index.
    """
    half = _product_scores(q, keys)
    full = half[:, :, 0, :, None] + half[:, :, 1, None, :]  # (B, H, n, n)
    flat = full.flatten(2)
    # A stable sort of the negated scores keeps equal scores in index order.
    order = torch.sort(-flat.detach(), dim=-1, stable=True).indices[..., :k]
    scores = flat.gather(-1, order)
    return scores, order


def accumulation_dtype(values: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (so gradcheck sees full precision)."""
    return torch.promote_types(torch.promote_types(values.dtype, w.dtype), torch.float32)


def bag_forward_reference(values: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y[b] = Σ_m w[b, m] · values[idx[b, m]], accumulated in float32 (or float64)."""
    acc = accumulation_dtype(values, w)
    return torch.einsum("bm,bmd->bd", w.to(acc), values.to(acc)[idx])


def bag_backward_reference(values, idx, w, dy):
    """Gradients of bag_forward.

    Returns dw (B, M) = <values[idx[b, m]], dy[b]> and the deduplicated value
    gradient as (rows, grads): rows sorted unique int64 (U,), grads (U, dim) float32
    where grads[u] = Σ over slots with idx == rows[u] of w · dy[b]
    (float64 instead of float32 when an input is float64).
    """
    acc = accumulation_dtype(values, w)
    dy = dy.to(acc)
    dw = torch.einsum("bmd,bd->bm", values.to(acc)[idx], dy)
    rows, inverse = torch.unique(idx.flatten(), sorted=True, return_inverse=True)
    slot_grads = w.to(acc).reshape(-1, 1) * dy.repeat_interleave(idx.shape[1], dim=0)
    grads = torch.zeros(rows.numel(), dy.shape[1], dtype=acc, device=dy.device)
    grads.index_add_(0, inverse, slot_grads)
    return dw, (rows.to(torch.int64), grads)


def _write_rows(values, rows, new_rows_f32):
    values[rows] = new_rows_f32.to(values.dtype)


def sgd_step_reference(values, rows, grads, *, lr, weight_decay=0.0):
    """values[rows] -= lr · (g + weight_decay · values[rows])."""
    v = values[rows].float()
    g = grads + weight_decay * v
    _write_rows(values, rows, v - lr * g)


def adagrad_step_reference(values, state_sum, rows, grads, *, lr, eps, lr_decay=0.0, step=1):
    """torch.optim.Adagrad for a sparse gradient, restricted to the touched rows."""
    clr = lr / (1 + (step - 1) * lr_decay)
    s = state_sum[rows] + grads * grads
    state_sum[rows] = s
    v = values[rows].float()
    _write_rows(values, rows, v - clr * grads / (s.sqrt() + eps))


def rowwise_adagrad_step_reference(values, state_sum, rows, grads, *, lr, eps):
    """Row-wise Adagrad: one accumulator per row, fed by the mean of g² over the row."""
    s = state_sum[rows] + (grads * grads).mean(dim=1)
    state_sum[rows] = s
    v = values[rows].float()
    _write_rows(values, rows, v - lr * grads / (s.sqrt() + eps)[:, None])


def adam_scalars(step, lr, beta1, beta2, eps, weight_decay, decoupled) -> tuple[float, ...]:
    """The per-step scalars of lazy Adam, computed once on the host in float64 and shared
    by every implementation: (beta1, beta2, 1 - beta1, 1 - beta2, step size with both
    bias corrections, eps term, decoupled weight-decay shrink)."""
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    step_size = lr * math.sqrt(bc2) / bc1
    eps_term = eps * math.sqrt(bc2) if decoupled else eps
    shrink = 1 - lr * weight_decay if decoupled else 1.0
    return (
        float(beta1),
        float(beta2),
        1.0 - beta1,
        1.0 - beta2,
        float(step_size),
        float(eps_term),
        float(shrink),
    )


def adam_step_reference(
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
):
    """Lazy Adam on the touched rows; untouched rows keep their moments.

    ``decoupled=False`` is torch.optim.SparseAdam (denominator sqrt(v) + eps).
    ``decoupled=True`` is torch.optim.AdamW restricted to the touched rows: values
    first shrink by lr·weight_decay, and eps is scaled by sqrt(1 - beta2^step) as
    AdamW does. ``step`` is the 1-based count of optimizer steps of the table.
    """
    _, _, omb1, omb2, step_size, eps_term, shrink = adam_scalars(
        step, lr, beta1, beta2, eps, weight_decay, decoupled
    )
    v = values[rows].float()
    if decoupled:
        v = v * shrink
    m = exp_avg[rows] * beta1 + omb1 * grads
    s = exp_avg_sq[rows] * beta2 + omb2 * grads * grads
    exp_avg[rows] = m
    exp_avg_sq[rows] = s
    _write_rows(values, rows, v - step_size * m / (s.sqrt() + eps_term))
