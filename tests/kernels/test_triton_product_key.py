"""Triton product-key top-k against kernels.reference (interpreter on CPU, or CUDA).

The reference scores all n² pairs and sorts them, sharing no code with the Triton
selection: exact and rounding ties order by the smaller index, random scores give the
exact top-k, gradients reach q and keys as autograd through the reference does,
bfloat16 inputs select on float32 sums, float64 stays in torch, and the public op
dispatches to Triton.
"""

from __future__ import annotations

import pytest
import torch

from memstore.kernels import _dispatch
from memstore.kernels.reference import product_key_topk_reference

from ._triton_util import DEVICE, assert_close, generator, triton_dispatch, triton_kernels  # noqa: F401

product_key_topk_triton = triton_kernels.product_key_topk_triton

# (B, H, Dk, n, k): n = 1; k = 1; k = n² (k > n: the half lists are truncated to n);
# B above the 16-query block; n above the 32-key chunk and Dk/2 above the 16-wide tile.
SHAPES = [
    (1, 1, 2, 1, 1),
    (5, 2, 18, 7, 3),
    (4, 3, 8, 7, 49),
    (3, 1, 6, 5, 1),
    (17, 2, 64, 40, 16),
    (18, 1, 140, 300, 5),
]


def _random(B, H, Dk, n, seed=0, integer=False, dtype=torch.float32):
    g = generator(seed)
    if integer:
        # Few distinct integer values: exact sums and many tied scores.
        q = torch.randint(-2, 3, (B, H, Dk), generator=g).to(dtype)
        keys = torch.randint(-1, 2, (H, 2, n, Dk // 2), generator=g).to(dtype)
    else:
        q = torch.randn(B, H, Dk, generator=g).to(dtype)
        keys = torch.randn(H, 2, n, Dk // 2, generator=g).to(dtype)
    return q, keys


def _all_scores(q, keys):
    """Every product score (B, H, n²) in float32, as the reference combines them."""
    B, H, Dk = q.shape
    half = torch.einsum("bhpd,hpnd->bhpn", q.float().reshape(B, H, 2, Dk // 2), keys.float())
    return (half[:, :, 0, :, None] + half[:, :, 1, None, :]).flatten(2)


def test_registered_for_cuda():
    assert _dispatch._CUDA_IMPLS["product_key_topk"] is product_key_topk_triton


@pytest.mark.parametrize("shape", SHAPES)
def test_ties_match_reference_exactly(shape):
    B, H, Dk, n, k = shape
    q, keys = _random(B, H, Dk, n, integer=True)
    scores_ref, index_ref = product_key_topk_reference(q, keys, k)
    scores, index = product_key_topk_triton(q.to(DEVICE), keys.to(DEVICE), k)
    assert index.dtype == torch.int64 and index.shape == (B, H, k)
    assert torch.equal(index.cpu(), index_ref)
    assert torch.equal(scores.cpu(), scores_ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_random_scores_are_the_top_k(shape):
    B, H, Dk, n, k = shape
    q, keys = _random(B, H, Dk, n, seed=1)
    scores_ref, _ = product_key_topk_reference(q, keys, k)
    scores, index = product_key_topk_triton(q.to(DEVICE), keys.to(DEVICE), k)
    index = index.cpu()
    assert int(index.min()) >= 0 and int(index.max()) < n * n
    assert all(row.unique().numel() == k for row in index.reshape(-1, k))
    # Robust to near-ties that a different dot-product order may swap: the scores the
    # reference gives to the chosen pairs are the reference's top-k scores, in order.
    chosen = _all_scores(q, keys).gather(-1, index)
    assert_close(chosen, scores_ref, torch.float32)
    assert_close(scores, scores_ref, torch.float32)


def test_rounding_ties_order_by_index():
    # float32: 1e8 + 0.5 == 1e8 + 1.0, so indices 0 and 1 tie and the spec orders them 0, 1.
    q = torch.tensor([[[1e8, 1.0]]])
    keys = torch.tensor([[[[1.0], [0.0]], [[0.5], [1.0]]]])
    _, index = product_key_topk_triton(q.to(DEVICE), keys.to(DEVICE), 2)
    assert index.cpu().tolist() == [[[0, 1]]]


def test_gradients_reach_q_and_keys():
    B, H, Dk, n, k = 6, 2, 12, 9, 4
    q, keys = _random(B, H, Dk, n, seed=2)
    weights = torch.randn(B, H, k, generator=generator(3))
    q_ref, keys_ref = q.clone().requires_grad_(), keys.clone().requires_grad_()
    scores_ref, index_ref = product_key_topk_reference(q_ref, keys_ref, k)
    (scores_ref * weights).sum().backward()
    q_dev = q.to(DEVICE).requires_grad_()
    keys_dev = keys.to(DEVICE).requires_grad_()
    scores, index = product_key_topk_triton(q_dev, keys_dev, k)
    assert scores.requires_grad
    (scores * weights.to(DEVICE)).sum().backward()
    assert torch.equal(index.cpu(), index_ref)
    assert_close(scores.detach(), scores_ref.detach(), torch.float32)
    assert_close(q_dev.grad, q_ref.grad, torch.float32)
    assert_close(keys_dev.grad, keys_ref.grad, torch.float32)


def test_bfloat16_inputs_select_on_float32_sums():
    B, H, Dk, n, k = 5, 2, 16, 6, 7
    q, keys = _random(B, H, Dk, n, seed=4, integer=True, dtype=torch.bfloat16)
    scores_ref, index_ref = product_key_topk_reference(q.float(), keys.float(), k)
    scores, index = product_key_topk_triton(q.to(DEVICE), keys.to(DEVICE), k)
    assert scores.dtype == torch.bfloat16
    assert torch.equal(index.cpu(), index_ref)
    assert torch.equal(scores.cpu().float(), scores_ref)


def test_float64_stays_in_torch(triton_dispatch):
    # The float32 kernel could order near-ties differently: the launcher refuses float64
    # and the public op keeps it on the torch path, against the brute-force reference.
    from memstore.kernels import product_key_topk

    q, keys = _random(4, 2, 10, 6, seed=5, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        product_key_topk_triton(q.to(DEVICE), keys.to(DEVICE), 5)
    scores_ref, index_ref = product_key_topk_reference(q, keys, 5)
    scores, index = product_key_topk(q.to(DEVICE), keys.to(DEVICE), 5)
    assert torch.equal(index.cpu(), index_ref)
    torch.testing.assert_close(scores.cpu(), scores_ref)
    assert triton_dispatch() == {("product_key_topk", "composite"): 1}


def test_public_op_dispatches_to_triton(triton_dispatch):
    from memstore.kernels import product_key_topk

    B, H, Dk, n, k = (300, 4, 256, 1024, 32) if DEVICE == "cuda" else (9, 2, 18, 41, 7)
    q, keys = _random(B, H, Dk, n, seed=6)
    scores_ref, _ = product_key_topk_reference(q, keys, k)
    scores, index = product_key_topk(q.to(DEVICE), keys.to(DEVICE), k)
    chosen = _all_scores(q, keys).gather(-1, index.cpu())
    assert_close(chosen, scores_ref, torch.float32)
    assert_close(scores, scores_ref, torch.float32)
    assert triton_dispatch() == {("product_key_topk", "triton"): 1}
