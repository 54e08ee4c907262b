"""Triton bag_forward / bag_backward against F.embedding_bag and its autograd in float64
(interpreter on CPU, or CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memstore.kernels import _dispatch

from ._triton_util import DEVICE, assert_close, generator, triton_dispatch, triton_kernels  # noqa: F401

bag_forward_triton = triton_kernels.bag_forward_triton
bag_backward_triton = triton_kernels.bag_backward_triton

# (B, M, rows, dim): single slot and row, odd dims, M above the 16-slot tile, dim above
# the 256-column tile, and few rows so that indices repeat within and across bags.
SHAPES = [
    (1, 1, 1, 1),
    (3, 5, 4, 9),
    (7, 17, 50, 41),
    (2, 3, 6, 300),
    (20, 4, 1000, 16),
]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(B, M, R, dim, dtype, seed=0, idx=None):
    g = generator(seed)
    values = torch.randn(R, dim, generator=g).to(dtype)
    if idx is None:
        idx = torch.randint(0, R, (B, M), generator=g)
    w = torch.randn(B, M, generator=g)
    dy = torch.randn(B, dim, generator=g)
    return values, idx, w, dy


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def bag_forward_oracle(values, idx, w):
    """Oracle: y[b] = sum_m w[b, m] values[idx[b, m]] by F.embedding_bag in float64."""
    return F.embedding_bag(idx.long(), values.double(), per_sample_weights=w.double(), mode="sum")


def bag_backward_oracle(values, idx, w, dy):
    """Oracle: autograd of F.embedding_bag in float64. Returns dw (B, M) and the value
    gradient at the rows the slots touch, (sorted unique rows, their gradient rows)."""
    v = values.double().requires_grad_()
    w64 = w.double().requires_grad_()
    y = F.embedding_bag(idx.long(), v, per_sample_weights=w64, mode="sum")
    y.backward(dy.double())
    rows = torch.unique(idx.long())
    return w64.grad, (rows, v.grad[rows])


def _check_forward(values, idx, w):
    expected = bag_forward_oracle(values, idx, w)
    out = bag_forward_triton(*_on_device(values, idx, w))
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert_close(out.double(), expected, torch.float32)


def _check_backward(values, idx, w, dy):
    dw_ref, (rows_ref, grads_ref) = bag_backward_oracle(values, idx, w, dy)
    dw, (rows, grads) = bag_backward_triton(*_on_device(values, idx, w, dy))
    assert dw.dtype == torch.float32 and grads.dtype == torch.float32
    assert rows.dtype == torch.int64
    assert torch.equal(rows.cpu(), rows_ref)
    assert_close(dw.double(), dw_ref, torch.float32)
    assert_close(grads.double(), grads_ref, torch.float32)


def test_registered_for_cuda():
    for name in ("bag_forward", "bag_backward"):
        assert _dispatch._CUDA_IMPLS[name].__name__ == f"{name}_triton"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_embedding_bag(shape, dtype):
    _check_forward(*_inputs(*shape, dtype)[:3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_embedding_bag_autograd(shape, dtype):
    _check_backward(*_inputs(*shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_slots_on_one_row(dtype):
    # 40 slots on one row: the segment spans several 8-slot tiles of one program.
    idx = torch.full((8, 5), 3, dtype=torch.int64)
    values, idx, w, dy = _inputs(8, 5, 6, 41, dtype, idx=idx)
    _check_forward(values, idx, w)
    _check_backward(values, idx, w, dy)


def test_duplicates_within_a_bag():
    idx = torch.tensor([[2, 2, 2, 0], [0, 1, 2, 2], [1, 1, 1, 1]])
    values, idx, w, dy = _inputs(3, 4, 3, 9, torch.float32, idx=idx)
    _check_forward(values, idx, w)
    _check_backward(values, idx, w, dy)


def test_int32_indices_and_strided_values():
    values, idx, w, dy = _inputs(6, 5, 30, 9, torch.float32, seed=1)
    strided = torch.randn(9, 30, generator=generator(2)).t()  # column stride != 1
    idx32 = idx.to(torch.int32)
    out = bag_forward_triton(*_on_device(strided, idx32, w))
    assert_close(out.double(), bag_forward_oracle(strided, idx, w), torch.float32)
    dw, (rows, grads) = bag_backward_triton(*_on_device(values, idx32, w, dy))
    dw_ref, (rows_ref, grads_ref) = bag_backward_oracle(values, idx, w, dy)
    assert rows.dtype == torch.int64 and torch.equal(rows.cpu(), rows_ref)
    assert_close(dw.double(), dw_ref, torch.float32)
    assert_close(grads.double(), grads_ref, torch.float32)


def test_empty_batch():
    values, idx, w, dy = _inputs(0, 3, 5, 9, torch.float32)
    assert bag_forward_triton(*_on_device(values, idx, w)).shape == (0, 9)
    dw, (rows, grads) = bag_backward_triton(*_on_device(values, idx, w, dy))
    assert dw.shape == (0, 3) and rows.numel() == 0 and grads.shape == (0, 9)


@pytest.mark.parametrize(
    "values_dtype, w_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)]
)
def test_float64_inputs_stay_in_torch(values_dtype, w_dtype, triton_dispatch):
    # The kernels accumulate in float32: the launchers refuse float64 (gradcheck) inputs,
    # and the public ops keep them on the torch composite, in float64.
    values, idx, w, dy = _inputs(4, 3, 7, 5, torch.float32)
    values, w = values.to(values_dtype), w.to(w_dtype)
    dev = _on_device(values, idx, w, dy)
    with pytest.raises(TypeError, match="float32 accumulation"):
        bag_forward_triton(*dev[:3])
    with pytest.raises(TypeError, match="float32 accumulation"):
        bag_backward_triton(*dev)
    from memstore.kernels import bag_forward

    out = bag_forward(*dev[:3])
    assert out.dtype == torch.float64
    assert triton_dispatch() == {("bag_forward", "composite"): 1}
    # Independent float64 loop over the slots.
    expected = torch.zeros(4, 5, dtype=torch.float64)
    for b in range(4):
        for m in range(3):
            expected[b] += w[b, m].double() * values[idx[b, m]].double()
    torch.testing.assert_close(out.cpu(), expected)


def test_public_ops_dispatch_to_triton(triton_dispatch):
    from memstore.kernels import bag_backward, bag_forward

    inputs = _inputs(9, 16, 200, 41, torch.float32)
    values, idx, w, dy = _on_device(*inputs)
    out = bag_forward(values, idx, w)
    assert out.dtype == torch.float32
    assert_close(out.double(), bag_forward_oracle(*inputs[:3]), torch.float32)
    dw, (rows, grads) = bag_backward(values, idx, w, dy)
    dw_ref, (rows_ref, grads_ref) = bag_backward_oracle(*inputs)
    assert torch.equal(rows.cpu(), rows_ref)
    assert_close(dw.double(), dw_ref, torch.float32)
    assert_close(grads.double(), grads_ref, torch.float32)
    assert triton_dispatch() == {("bag_forward", "triton"): 1, ("bag_backward", "triton"): 1}


def test_all_kernels_compile_for_sm90_without_a_gpu():
    """Compiled mode (which the interpreter does not exercise): every Triton kernel of the
    package goes through Triton's compiler and bundled ptxas for sm_90, in a subprocess
    without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu.py"), "--compile-only"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("\nok ") + proc.stdout.startswith("ok ") == 22
