"""product_key_topk against the brute-force reference (kernels.reference).

The reference scores all n² pairs and sorts them; neither the C selection nor the
composite (``_select_composite``: top-k of each half, then of the k×k sums) shares
that code, and gradients are checked against autograd through the reference's
einsum. Tests taking ``path`` assert which selection ran.
"""

from __future__ import annotations

import pytest
import torch

from memstore.kernels import product_key_topk
from memstore.kernels.reference import product_key_topk_reference

from .conftest import assert_close

# (B, H, n, Dk, k): k=1, n=1, k > n, k = n², odd Dk/2, odd sizes, >= 128 (b, h) rows
# (so the C path splits over threads).
SHAPES = [
    (1, 1, 1, 2, 1),
    (2, 1, 3, 4, 7),
    (3, 2, 3, 6, 9),
    (4, 3, 2, 2, 3),
    (9, 4, 16, 32, 8),
    (41, 4, 9, 18, 1),
    (5, 3, 41, 10, 32),
    (7, 2, 64, 64, 41),
    (3, 2, 8, 14, 64),
    (2, 1, 341, 6, 16),
    (2, 1, 11, 2, 100),
]


def _inputs(B, H, n, Dk, dtype=torch.float32, integer=False, requires_grad=False):
    if integer:
        q = torch.randint(-2, 3, (B, H, Dk)).to(dtype)
        keys = torch.randint(-2, 3, (H, 2, n, Dk // 2)).to(dtype)
    else:
        q = torch.randn(B, H, Dk, dtype=dtype)
        keys = torch.randn(H, 2, n, Dk // 2, dtype=dtype)
    return q.requires_grad_(requires_grad), keys.requires_grad_(requires_grad)


def _check_against_reference(q, keys, k):
    scores, index = product_key_topk(q, keys, k)
    ref_scores, ref_index = product_key_topk_reference(q, keys, k)
    B, H, _ = q.shape
    n = keys.shape[2]
    assert scores.shape == index.shape == (B, H, k)
    assert index.dtype == torch.int64
    assert scores.dtype == q.dtype
    assert int(index.min()) >= 0 and int(index.max()) < n * n
    torch.testing.assert_close(index, ref_index, rtol=0, atol=0)
    assert_close(scores, ref_scores)
    assert (scores[..., :-1] >= scores[..., 1:]).all(), "scores must be sorted descending"
    return scores, index


@pytest.mark.parametrize("B, H, n, Dk, k", SHAPES)
def test_topk_matches_brute_force(path, B, H, n, Dk, k):
    q, keys = _inputs(B, H, n, Dk)
    _check_against_reference(q, keys, k)
    path.took(product_key_topk="native")


@pytest.mark.parametrize("B, H, n, Dk, k", SHAPES)
def test_topk_ties_break_by_smaller_index(path, B, H, n, Dk, k):
    # Small integers: the half scores and their sums are exact and tie often.
    q, keys = _inputs(B, H, n, Dk, integer=True)
    _check_against_reference(q, keys, k)
    path.took(product_key_topk="native")


@pytest.mark.parametrize("k", [1, 5, 16])
def test_topk_all_scores_equal(path, k):
    # Every one of the n² candidates ties: the answer is 0, 1, ..., k-1.
    B, H, n, Dk = 3, 2, 4, 6
    q = torch.ones(B, H, Dk)
    keys = torch.ones(H, 2, n, Dk // 2)
    scores, index = _check_against_reference(q, keys, k)
    assert torch.equal(index, torch.arange(k).expand(B, H, k))
    path.took(product_key_topk="native")


def test_topk_ties_on_one_half(path):
    # One half constant, the other with repeated values: ties inside each half list.
    B, H, n, Dk, k = 5, 2, 7, 4, 20
    q = torch.ones(B, H, Dk)
    keys = torch.zeros(H, 2, n, Dk // 2)
    keys[:, 1] = torch.tensor([1.0, 3.0, 3.0, 0.0, 1.0, 3.0, 2.0])[:, None]
    _check_against_reference(q, keys, k)
    path.took(product_key_topk="native")


def test_topk_rounding_ties(path):
    # s1 = [1e8, 0], s2 = [0.5, 1.0]: in float32 1e8 + 0.5 == 1e8 + 1.0 == 1e8, so
    # indices 0 and 1 tie and the spec orders them 0, 1.
    q = torch.tensor([[[1e8, 1.0]]])
    keys = torch.tensor([[[[1.0], [0.0]], [[0.5], [1.0]]]])
    _check_against_reference(q, keys, 2)
    assert torch.equal(product_key_topk(q, keys, 2)[1], torch.tensor([[[0, 1]]]))
    path.took(product_key_topk="native")


def test_topk_non_contiguous_query(path):
    B, H, n, Dk, k = 6, 3, 10, 8, 12
    q = torch.randn(H, B, Dk).transpose(0, 1)
    assert not q.is_contiguous()
    keys = torch.randn(H, n, 2, Dk // 2).transpose(1, 2)
    _check_against_reference(q, keys, k)
    path.took(product_key_topk="native")


@pytest.mark.parametrize(
    "B, H, n, Dk, k",
    [(1, 1, 1, 2, 1), (2, 1, 3, 4, 7), (9, 4, 16, 32, 8), (5, 3, 41, 10, 32), (3, 2, 8, 14, 64)],
)
def test_topk_gradients_match_reference(path, B, H, n, Dk, k):
    q, keys = _inputs(B, H, n, Dk, requires_grad=True)
    q_ref, keys_ref = (t.detach().clone().requires_grad_() for t in (q, keys))
    dscores = torch.randn(B, H, k)

    scores, _ = product_key_topk(q, keys, k)
    (scores * dscores).sum().backward()
    ref_scores, _ = product_key_topk_reference(q_ref, keys_ref, k)
    (ref_scores * dscores).sum().backward()

    assert_close(scores, ref_scores.detach())
    assert_close(q.grad, q_ref.grad)
    assert_close(keys.grad, keys_ref.grad)
    path.took(product_key_topk="native")
    if path.name == "fast":  # the backward of the selected scores runs in C too
        assert "pk_scores_backward" in path.symbols


@pytest.mark.parametrize("B, H, n, Dk, k", [(2, 1, 3, 4, 7), (3, 2, 4, 6, 3), (2, 2, 5, 2, 1)])
def test_topk_gradcheck_float64(B, H, n, Dk, k):
    # float64 runs the torch composite whatever the native library does.
    q, keys = _inputs(B, H, n, Dk, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, keys: product_key_topk(q, keys, k)[0], (q, keys))


def test_topk_float64_matches_reference():
    q, keys = _inputs(5, 3, 41, 10, dtype=torch.float64)
    _check_against_reference(q, keys, 32)


# ---- input validation -------------------------------------------------------------


def _valid():
    return torch.randn(2, 3, 8), torch.randn(3, 2, 5, 4)


@pytest.mark.parametrize(
    "make, error, field",
    [
        (lambda q, keys: (q, keys[0], 3), ValueError, "keys"),  # 3-d keys
        (lambda q, keys: (q, keys.reshape(3, 1, 10, 4), 3), ValueError, "keys"),  # no 2 halves
        (lambda q, keys: (q, torch.randn(3, 3, 5, 4), 3), ValueError, "keys"),
        (lambda q, keys: (q[:, :2], keys, 3), ValueError, "q"),  # H mismatch
        (lambda q, keys: (q[..., :6], keys, 3), ValueError, "q"),  # Dk mismatch
        (lambda q, keys: (q[0], keys, 3), ValueError, "q"),  # 2-d q
        (lambda q, keys: (q.double(), keys, 3), TypeError, "q"),  # dtype mismatch
        (lambda q, keys: (q.long(), keys.long(), 3), TypeError, "q"),  # not floating
        (lambda q, keys: (q, keys, 0), ValueError, "k"),
        (lambda q, keys: (q, keys, -1), ValueError, "k"),
        (lambda q, keys: (q, keys, 26), ValueError, "k"),  # > n² = 25
        (lambda q, keys: (q, keys, 2.0), ValueError, "k"),
    ],
)
def test_topk_validation(make, error, field):
    args = make(*_valid())
    with pytest.raises(error, match=rf"^{field}:"):
        product_key_topk(*args)


def test_topk_accepts_k_equal_n_squared():
    q, keys = _valid()
    scores, index = product_key_topk(q, keys, 25)
    assert torch.equal(index.sort(-1).values, torch.arange(25).expand(2, 3, 25))
