"""bag_forward / bag_backward (dense and CSR forms) and BagFunction against
``F.embedding_bag`` in float64 and against autograd of plain torch expressions.

On CPU the composite of ``bag_forward`` is ``kernels.reference``, so the reference is
never the oracle here. Tests taking the ``path`` fixture assert which implementation
each op ran (``_took_bag``): on "fast" the one the dispatch picks, on "composite" no C
code and no library kernel at all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memstore.kernels import BagFunction, SparseRowGrads, _native, bag_backward, bag_forward
from memstore.kernels.bag import bag_backward_csr, bag_forward_csr

from .conftest import assert_close

# (B, M, rows, dim): B=1, M=1, a single row, odd dims, duplicates (rows < B·M), and
# sizes that the C path splits over threads (B >= 128 bags, >= 128 unique rows).
SHAPES = [
    (1, 1, 1, 1),
    (1, 7, 5, 9),
    (9, 1, 13, 41),
    (41, 8, 100, 9),
    (5, 3, 3, 341),
    (33, 16, 2000, 341),
    (130, 4, 400, 64),
]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(B, M, R, dim, dtype, idx=None):
    values = torch.randn(R, dim).to(dtype)
    if idx is None:
        idx = torch.randint(0, R, (B, M))
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.randn(B, M, dtype=w_dtype)
    dy = torch.randn(B, dim, dtype=w_dtype)
    return values, idx, w, dy


def embedding_bag64(values, rows, w, offsets, dy):
    """Oracle in float64: y (B, dim), dw (P,) and the dense value gradient (R, dim) of
    CSR bags, from F.embedding_bag and its autograd."""
    v = values.double().requires_grad_()
    w64 = w.double().requires_grad_()
    y = F.embedding_bag(
        rows.long(),
        v,
        offsets[:-1].long(),
        mode="sum",
        per_sample_weights=w64,
        include_last_offset=False,
    )
    y.backward(dy.double())
    return y.detach(), w64.grad, v.grad


def _dense_oracle(values, idx, w, dy):
    B, M = idx.shape
    offsets = torch.arange(B + 1) * M
    y, dw, dvalues = embedding_bag64(values, idx.reshape(-1), w.reshape(-1), offsets, dy)
    return y, dw.reshape(B, M), dvalues


def _composite(values, idx, w):
    """The bag as plain torch, for autograd."""
    return (values[idx] * w[..., None]).sum(dim=1)


def _check(values, idx, w, dy):
    """bag_forward and bag_backward against the float64 oracle."""
    acc = torch.float64 if torch.float64 in (values.dtype, w.dtype) else torch.float32
    ref_y, ref_dw, ref_dvalues = _dense_oracle(values, idx, w, dy)
    y = bag_forward(values, idx, w)
    assert y.dtype == acc and y.shape == (idx.shape[0], values.shape[1])
    assert_close(y, ref_y)

    dw, (rows, grads) = bag_backward(values, idx, w, dy)
    assert rows.dtype == torch.int64 and grads.dtype == acc
    assert torch.equal(rows, torch.unique(idx.flatten().long(), sorted=True))
    assert dw.shape == idx.shape
    assert_close(dw, ref_dw)
    assert_close(grads, ref_dvalues[rows])
    return y, dw, rows, grads


def _took_bag(path, values, forward=True, backward=True):
    """Assert the CPU dispatch: the forward of float32 values goes to the one measured
    faster on this CPU (F.embedding_bag or the C kernel), of bfloat16 values to the C
    kernel (embedding_bag would round the sums to bfloat16); the backward always to the C
    kernel."""
    expected = {}
    if forward:
        library = values.dtype == torch.float32 and not _native.prefer_c_forward()
        expected["bag_forward_csr"] = "library" if library else "native"
    if backward:
        expected["bag_backward_sparse"] = "native"
    path.took(**expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, M, R, dim", SHAPES)
def test_bag_matches_embedding_bag(path, B, M, R, dim, dtype):
    values, idx, w, dy = _inputs(B, M, R, dim, dtype)
    _check(values, idx, w, dy)
    _took_bag(path, values)


@pytest.mark.parametrize("B, M, R, dim", [(1, 7, 5, 9), (41, 8, 100, 41), (33, 16, 2000, 341)])
def test_bag_float64_takes_the_composite(native_calls, B, M, R, dim):
    """float64 inputs accumulate in float64, which only the composite does."""
    _check(*_inputs(B, M, R, dim, torch.float64))
    native_calls.took(bag_forward="composite", bag_backward_sparse="composite")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "make_idx",
    [
        pytest.param(lambda B, M, R: torch.full((B, M), R - 1), id="every-slot-one-row"),
        pytest.param(lambda B, M, R: torch.randint(0, 2, (B, M)), id="two-rows"),
        pytest.param(lambda B, M, R: torch.arange(M).repeat(B, 1) % 3, id="dup-in-and-across"),
        pytest.param(lambda B, M, R: torch.randint(0, R, (B, M)).sort(dim=0).values, id="sorted"),
    ],
)
def test_bag_duplicate_indices(path, make_idx, dtype):
    B, M, R, dim = 41, 9, 7, 41
    values, _, w, dy = _inputs(B, M, R, dim, dtype)
    idx = make_idx(B, M, R)
    _, _, rows, grads = _check(values, idx, w, dy)
    # Every slot pointing at one row: its gradient is Σ_b Σ_m w[b, m] dy[b].
    if rows.numel() == 1:
        assert_close(grads[0], (w.double().sum(1, keepdim=True) * dy.double()).sum(0))
    _took_bag(path, values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, M, R, dim", [(1, 1, 1, 1), (9, 5, 13, 41), (41, 8, 100, 341)])
def test_bag_gradients_match_autograd(path, B, M, R, dim, dtype):
    values, idx, w, dy = _inputs(B, M, R, dim, dtype)
    v_leaf = values.double().requires_grad_()
    w_leaf = w.double().requires_grad_()
    y_ref = _composite(v_leaf, idx, w_leaf)
    y_ref.backward(dy.double())

    y = bag_forward(values, idx, w)
    dw, (rows, grads) = bag_backward(values, idx, w, dy)
    assert_close(y, y_ref.detach())
    assert_close(dw, w_leaf.grad)
    dense = torch.zeros(R, dim).index_put_((rows,), grads)
    assert_close(dense, v_leaf.grad)
    _took_bag(path, values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bag_int32_idx(path, dtype):
    values, idx, w, dy = _inputs(
        17, 6, 30, 9, dtype, torch.randint(0, 30, (17, 6), dtype=torch.int32)
    )
    _check(values, idx, w, dy)
    _took_bag(path, values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bag_float64_w_accumulates_in_float64(dtype):
    values, idx, w, dy = _inputs(17, 6, 30, 9, dtype)
    _check(values, idx.int(), w.double(), dy.double())


@pytest.mark.parametrize("dtype", DTYPES)
def test_bag_strided_values(path, dtype):
    base = torch.randn(50, 60).to(dtype)
    idx = torch.randint(0, 50, (23, 5))
    w = torch.randn(23, 5)
    for values in (base[:, 7:48], base.t()[:, 3:40]):  # row stride != dim; column-major
        dy = torch.randn(23, values.shape[1])
        _check(values, idx, w, dy)
    _took_bag(path, base)


def test_bag_empty_batch(path):
    values, _, _, _ = _inputs(1, 1, 10, 9, torch.float32)
    idx = torch.zeros(0, 4, dtype=torch.int64)
    w = torch.zeros(0, 4)
    assert bag_forward(values, idx, w).shape == (0, 9)
    dw, (rows, grads) = bag_backward(values, idx, w, torch.zeros(0, 9))
    assert dw.shape == (0, 4) and rows.shape == (0,) and grads.shape == (0, 9)


def test_bag_forward_no_slots(path):
    values = torch.randn(5, 3)
    y = bag_forward(values, torch.zeros(4, 0, dtype=torch.int64), torch.zeros(4, 0))
    assert torch.equal(y, torch.zeros(4, 3))
    _took_bag(path, values, backward=False)


# ---- BagFunction --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, M, R, dim", [(1, 1, 1, 1), (9, 5, 7, 41), (41, 8, 100, 341)])
def test_bag_function_matches_torch_autograd(path, B, M, R, dim, dtype):
    values, idx, w, dy = _inputs(B, M, R, dim, dtype)
    v = values.clone().requires_grad_()
    w1 = w.clone().requires_grad_()
    y = BagFunction.apply(v, idx, w1)
    y.backward(dy)

    v_ref = values.clone().requires_grad_()
    w_ref = w.clone().requires_grad_()
    y_ref = _composite(v_ref.float(), idx, w_ref)
    y_ref.backward(dy)

    assert y.dtype == torch.promote_types(dtype, w.dtype)
    assert_close(y, y_ref.detach().to(y.dtype))
    assert_close(w1.grad, w_ref.grad)
    assert v.grad.is_sparse and v.grad.dtype == dtype and v.grad.shape == values.shape
    assert_close(v.grad.to_dense(), v_ref.grad)
    _took_bag(path, values)


def test_bag_function_bf16_weights(path):
    values, idx, w, dy = _inputs(9, 5, 7, 41, torch.bfloat16)
    w = w.bfloat16().requires_grad_()
    y = BagFunction.apply(values, idx, w)
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    w_ref = w.detach().float().requires_grad_()
    _composite(values.float(), idx, w_ref).backward(dy.bfloat16().float())
    assert w.grad.dtype == torch.bfloat16
    assert_close(w.grad, w_ref.grad.bfloat16())
    _took_bag(path, values)


def test_bag_function_no_value_grad(path):
    values, idx, w, dy = _inputs(9, 5, 7, 41, torch.float32)
    w = w.requires_grad_()
    BagFunction.apply(values, idx, w).backward(dy)
    w_ref = w.detach().clone().requires_grad_()
    _composite(values, idx, w_ref).backward(dy)
    assert values.grad is None
    assert_close(w.grad, w_ref.grad)
    _took_bag(path, values)


class _Densify(torch.autograd.Function):
    """Identity whose backward turns a sparse gradient dense, so gradcheck can read it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        assert g.is_sparse, "BagFunction should give values a sparse COO gradient"
        return g.to_dense()


def _bag_of(idx):
    return lambda v, w: BagFunction.apply(_Densify.apply(v), idx, w)


@pytest.mark.parametrize("B, M, R, dim", [(1, 1, 1, 1), (3, 4, 5, 9), (4, 3, 2, 3)])
def test_bag_function_gradcheck_linear(B, M, R, dim):
    """gradcheck of BagFunction for w and values in float64.

    The bag is linear in w and in values, so a large finite-difference step is exact and
    this check holds even though the float64 composite accumulates in float32.
    """
    values, idx, w, _ = _inputs(B, M, R, dim, torch.float64)
    values.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(_bag_of(idx), (values, w), eps=1e-1, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("B, M, R, dim", [(3, 4, 5, 9)])
def test_bag_function_gradcheck_float64_precision(B, M, R, dim):
    values, idx, w, _ = _inputs(B, M, R, dim, torch.float64)
    values.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(_bag_of(idx), (values, w))


# ---- validation ---------------------------------------------------------------------


def _valid():
    return torch.randn(10, 9), torch.randint(0, 10, (4, 3)), torch.randn(4, 3)


@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize(
    "make, error, field",
    [
        (lambda v, i, w: (v, torch.full_like(i, 10), w), IndexError, "idx"),
        (lambda v, i, w: (v, torch.full_like(i, -1), w), IndexError, "idx"),
        (lambda v, i, w: (v, i.float(), w), TypeError, "idx"),
        (lambda v, i, w: (v, i.short(), w), TypeError, "idx"),
        (lambda v, i, w: (v, i.flatten(), w.flatten()), ValueError, "idx"),
        (lambda v, i, w: (v, i, w[:, :2]), ValueError, "w"),
        (lambda v, i, w: (v, i, w.t()), ValueError, "w"),
        (lambda v, i, w: (v, i, w.long()), TypeError, "w"),
        (lambda v, i, w: (v[0], i, w), ValueError, "values"),
    ],
)
def test_bag_validation(op, make, error, field):
    values, idx, w = make(*_valid())
    with pytest.raises(error, match=rf"^{field}:"):
        if op == "forward":
            bag_forward(values, idx, w)
        else:
            dim = values.shape[-1]
            bag_backward(values, idx, w, torch.randn(idx.shape[0], dim))


@pytest.mark.parametrize("dy_shape", [(4, 8), (3, 9), (4,), (4, 9, 1)])
def test_bag_backward_validates_dy(dy_shape):
    values, idx, w = _valid()
    with pytest.raises(ValueError, match=r"^dy:"):
        bag_backward(values, idx, w, torch.randn(dy_shape))


# ---- CSR forms ----------------------------------------------------------------------


def _csr_inputs(counts, R, dim, dtype):
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    P = int(offsets[-1])
    values = torch.randn(R, dim).to(dtype)
    rows = torch.randint(0, R, (P,))
    w = torch.randn(P)
    dy = torch.randn(len(counts), dim)
    return values, rows, w, offsets, dy


CSR_CASES = [
    pytest.param([3], 5, 9, id="one-bag"),
    pytest.param([0], 5, 9, id="one-empty-bag"),
    pytest.param([0, 0, 0], 5, 41, id="all-empty"),
    pytest.param([0, 4, 0, 1, 7, 0], 6, 41, id="ragged-empty-first-mid-last"),
    pytest.param([1, 2, 3, 0, 5, 8, 13, 21, 0, 34], 40, 341, id="ragged-dups"),
    pytest.param([i % 7 for i in range(150)], 300, 9, id="ragged-threads"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts, R, dim", CSR_CASES)
def test_bag_csr_matches_embedding_bag(path, counts, R, dim, dtype):
    values, rows, w, offsets, dy = _csr_inputs(counts, R, dim, dtype)
    ref_y, ref_dw, ref_dvalues = embedding_bag64(values, rows, w, offsets, dy)

    y = bag_forward_csr(values, rows, w, offsets)
    assert y.shape == (len(counts), dim) and y.dtype == torch.float32
    assert_close(y, ref_y)

    dw, (urows, grads) = bag_backward_csr(values, rows, w, offsets, dy)
    assert dw.shape == rows.shape
    assert_close(dw, ref_dw)
    assert urows.dtype == torch.int64
    assert torch.equal(urows, torch.unique(rows, sorted=True))
    assert grads.shape == (urows.numel(), dim)
    assert_close(grads, ref_dvalues[urows])
    _took_bag(path, values)


def _slot_sums64(rows, w, bag, dy, unique_rows):
    """(U, dim) float64: Σ over the slots of each of ``unique_rows`` of w · dy[bag], by a
    loop over the slots."""
    position = {r: u for u, r in enumerate(unique_rows.tolist())}
    out = torch.zeros(len(position), dy.shape[1], dtype=torch.float64)
    for r, wt, b in zip(rows.tolist(), w.double().tolist(), bag.tolist()):
        out[position[r]] += wt * dy[b].double()
    return out


@pytest.mark.parametrize(
    "P, R",
    [
        (0, 10),
        (1, 1),
        (9, 5),
        (41, 1000),
        (341, 341),
        (4096, 7),
        (20000, 65536),
        (5000, 2**31 - 1),  # three radix passes of 11 bits
        (3000, 2**22 + 3),  # 23 bits: three passes of 8
    ],
)
def test_row_grads_c_grouping_equals_comparison_sort(native_calls, P, R):
    """from_slots with num_rows (the C counting sort for blocks of at most P rows, the
    radix sort beyond) groups exactly as torch.sort does; merge of two pushes sums them,
    as a float64 loop over the slots does."""
    rows = torch.randint(0, R, (P,))
    if P > 2:  # the largest and smallest rows, and a repeat, whatever the draw
        rows[:3] = torch.tensor([R - 1, 0, R - 1])
    w, bag, dy = torch.randn(P), torch.randint(0, 3, (P,)), torch.randn(3, 5)
    counted = SparseRowGrads.from_slots(rows, w, bag, dy, num_rows=R)
    if P:
        expected = "group_rows" if R <= P else "group_rows_radix"
        assert [s for s in native_calls.symbols if s.startswith("group_rows")] == [expected]
    sorted_ = SparseRowGrads.from_slots(rows, w, bag, dy)  # torch.sort
    for field in ("rows", "seg", "slot_bag", "slot_w"):
        assert torch.equal(getattr(counted, field), getattr(sorted_, field)), field
    assert torch.equal(counted.rows, torch.unique(rows))
    merged = SparseRowGrads.merge([counted, sorted_], num_rows=R)
    assert torch.equal(merged.rows, torch.unique(rows))
    expected = 2 * _slot_sums64(rows, w, bag, dy, merged.rows)
    assert_close(merged.dense(), expected)
