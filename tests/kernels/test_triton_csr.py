"""Triton CSR bag kernels and the factored-gradient optimizer steps (interpreter on CPU, or CUDA).

Expected values come from float64 loops over the slots written here, and from
``torch.optim`` for the optimizer steps, never from the code under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memstore.kernels import SparseRowGrads

from ._triton_util import DEVICE, assert_close, generator, triton_dispatch, triton_kernels  # noqa: F401

bag_forward_csr_triton = triton_kernels.bag_forward_csr_triton
bag_backward_sparse_triton = triton_kernels.bag_backward_sparse_triton

# (bag lengths, rows, dim): empty bags, a bag longer than the 16-slot tile, dim above
# the 256-column tile, and few rows so that rows repeat within and across bags.
CASES = [
    ([1], 1, 1),
    ([3, 0, 5, 1, 0, 2, 4, 1, 2], 9, 41),
    ([37, 2, 0, 9], 41, 9),
    ([5, 3], 6, 300),
]
DTYPES = [torch.float32, torch.bfloat16]
_ONE_ULP = {torch.bfloat16: dict(rtol=2**-7, atol=1e-6)}


def _bags(lengths, R, dim, dtype, seed=0):
    g = generator(seed)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths).cumsum(0)
    P = int(offsets[-1])
    values = torch.randn(R, dim, generator=g).to(dtype)
    rows = torch.randint(0, R, (P,), generator=g)
    w = torch.randn(P, generator=g)
    dy = torch.randn(len(lengths), dim, generator=g)
    return values, rows, w, offsets, dy


def _loop_forward(values, rows, w, offsets):
    out = torch.zeros(offsets.numel() - 1, values.shape[1], dtype=torch.float64)
    for b in range(offsets.numel() - 1):
        for p in range(int(offsets[b]), int(offsets[b + 1])):
            out[b] += float(w[p]) * values[rows[p]].double()
    return out


def _loop_backward(values, rows, w, offsets, dy):
    """dw (P,) and {row: gradient} in float64."""
    dw = torch.zeros(rows.numel(), dtype=torch.float64)
    grads: dict[int, torch.Tensor] = {}
    for b in range(offsets.numel() - 1):
        for p in range(int(offsets[b]), int(offsets[b + 1])):
            r = int(rows[p])
            dw[p] = values[r].double() @ dy[b].double()
            grads[r] = grads.get(r, 0) + float(w[p]) * dy[b].double()
    return dw, grads


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_loop(case, dtype):
    values, rows, w, offsets, _ = _bags(*case, dtype)
    out = bag_forward_csr_triton(*_on_device(values, rows, w, offsets))
    assert out.dtype == torch.float32 and out.shape == (offsets.numel() - 1, values.shape[1])
    assert_close(out, _loop_forward(values, rows, w, offsets).float(), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_backward_matches_loop(case, dtype):
    values, rows, w, offsets, dy = _bags(*case, dtype)
    dw, grads = bag_backward_sparse_triton(*_on_device(values, rows, w, offsets, dy))
    dw_ref, grads_ref = _loop_backward(values, rows, w, offsets, dy)
    assert isinstance(grads, SparseRowGrads) and dw.dtype == torch.float32
    assert_close(dw, dw_ref.float(), torch.float32)
    assert grads.rows.tolist() == sorted(grads_ref)
    expected = torch.stack([grads_ref[r] for r in sorted(grads_ref)]).float()
    assert_close(grads.dense(), expected, torch.float32)


def test_strided_values():
    # A column slice of a wider table (row stride 13, column stride 1) and a transposed
    # view (column stride 41): both read in place.
    values, rows, w, offsets, dy = _bags([3, 0, 4], 9, 41, torch.float32, seed=3)
    wide = torch.randn(9, 13, generator=generator(4))[:, 2:11]
    transposed = values.t().contiguous().t()
    for table in (wide, transposed):
        out = bag_forward_csr_triton(*_on_device(table, rows, w, offsets))
        assert_close(out, _loop_forward(table, rows, w, offsets).float(), torch.float32)
    dw, _ = bag_backward_sparse_triton(*_on_device(transposed, rows, w, offsets, dy))
    assert_close(dw, _loop_backward(values, rows, w, offsets, dy)[0].float(), torch.float32)


def test_launchers_refuse_float64():
    values, rows, w, offsets, dy = _bags([2, 1], 4, 9, torch.float64)
    with pytest.raises(TypeError, match="float32 accumulation"):
        bag_forward_csr_triton(*_on_device(values, rows, w, offsets))
    with pytest.raises(TypeError, match="float32 accumulation"):
        bag_backward_sparse_triton(*_on_device(values, rows, w, offsets, dy))


def _torch_optimizer(name, param, lr):
    return {
        "sgd": lambda: torch.optim.SGD([param], lr=lr),
        "adagrad": lambda: torch.optim.Adagrad([param], lr=lr, eps=1e-10),
        "adam": lambda: torch.optim.SparseAdam([param], lr=lr),
        "adamw": lambda: torch.optim.AdamW([param], lr=lr, weight_decay=0.1),
    }[name]()


def _kernel_step(name, values, state, grads, lr):
    rows = grads.rows
    if name == "sgd":
        triton_kernels.sgd_step_triton(values, rows, grads, lr=lr)
    elif name == "adagrad":
        triton_kernels.adagrad_step_triton(values, state[0], rows, grads, lr=lr, eps=1e-10)
    else:
        triton_kernels.adam_step_triton(
            values,
            *state,
            rows,
            grads,
            step=1,
            lr=lr,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.1 if name == "adamw" else 0.0,
            decoupled=name == "adamw",
        )


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam", "adamw"])
def test_factored_steps_match_torch_optim(name):
    """The fused steps on factored gradients (several slots per row, several bags per
    row) against torch.optim stepping the touched rows with their summed gradients."""
    lr = 0.05
    values, rows, w, offsets, dy = _bags([3, 0, 5, 1, 0, 2, 4, 1, 2], 9, 41, torch.float32, seed=5)
    _, grads_ref = _loop_backward(values, rows, w, offsets, dy)
    touched = sorted(grads_ref)
    param = torch.nn.Parameter(values[touched].clone())
    opt = _torch_optimizer(name, param, lr)
    g = torch.stack([grads_ref[r] for r in touched]).float()
    param.grad = g.to_sparse() if name == "adam" else g
    opt.step()

    dev_values = values.clone().to(DEVICE)
    _, grads = bag_backward_sparse_triton(*_on_device(values, rows, w, offsets, dy))
    state = [torch.zeros_like(dev_values) for _ in range(2 if "adam" in name else 1)]
    _kernel_step(name, dev_values, state, grads, lr)
    assert_close(dev_values.cpu()[touched], param.detach(), torch.float32)
    untouched = [r for r in range(9) if r not in grads_ref]
    assert torch.equal(dev_values.cpu()[untouched], values[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rowwise_adagrad_factored_matches_loop(dtype):
    # No torch.optim counterpart: one accumulator per row fed by mean(g²), in float64.
    values, rows, w, offsets, dy = _bags([37, 2, 0, 9], 41, 9, dtype, seed=6)
    state = torch.rand(41, generator=generator(7))
    _, grads_ref = _loop_backward(values, rows, w, offsets, dy)
    expected_values, expected_state = values.double(), state.double()
    for r, g in grads_ref.items():
        expected_state[r] += (g * g).mean()
        expected_values[r] -= 0.1 * g / (expected_state[r].sqrt() + 1e-8)
    dev_values, dev_state = _on_device(values.clone(), state.clone())
    _, grads = bag_backward_sparse_triton(*_on_device(values, rows, w, offsets, dy))
    triton_kernels.rowwise_adagrad_step_triton(
        dev_values, dev_state, grads.rows, grads, lr=0.1, eps=1e-8
    )
    assert_close(dev_state, expected_state.float(), torch.float32)
    assert_close(dev_values, expected_values.to(dtype), dtype, **_ONE_ULP.get(dtype, {}))


def test_interpreter_works_whatever_the_import_order():
    """triton imported before TRITON_INTERPRET is set (as another test module or a
    library might do): the helper still runs the interpreted kernels."""
    if DEVICE == "cuda":
        pytest.skip("compiled kernels on CUDA: the interpreter is not used")
    root = Path(__file__).resolve().parents[2]
    code = (
        "import triton, torch\n"
        "from tests.kernels import _triton_util as u\n"
        "values = torch.arange(12.).reshape(4, 3)\n"
        "out = u.triton_kernels.bag_forward_csr_triton(values, torch.tensor([1, 3]),"
        " torch.tensor([2., 1.]), torch.tensor([0, 2]))\n"
        "print(out.tolist())\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRITON_INTERPRET", "MEMSTORE_FORCE_TRITON")
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[[15.0, 18.0, 21.0]]"


def test_gpu_benchmark_store_check_runs(triton_dispatch):
    """benchmarks/gpu.py's store-level check (a ShardTable round against EmbeddingBag +
    SparseAdam) at tiny sizes, on the Triton path; the benchmark itself is not run."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_benchmark", path)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    gpu.check_store_round(DEVICE)
    taken = triton_dispatch()
    assert {path for (_, path) in taken} == {"triton"}, taken
    assert taken[("adam_step", "triton")] == 2
