"""The store's GPU data path end to end, on any machine.

With a GPU, tables and layers run on CUDA tensors. Without one, ``MEMSTORE_FORCE_TRITON=1``
sends the CPU tensors through the same Triton implementations under the Triton
interpreter (``tests.kernels._triton_util`` sets ``TRITON_INTERPRET=1`` before triton is
imported). Each round is compared with the CPU path (C kernels and F.embedding_bag), and
the dispatch counts of ``kernels._dispatch`` prove that every op of the round took its
Triton implementation. Shapes are small and odd (9 tokens, 41 columns) to keep the
interpreter quick.
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
import torch.nn.functional as F

from memstore import (
    SGD,
    Adagrad,
    Adam,
    AdamW,
    MemoryLayer,
    MemoryLayerArgs,
    RowWiseAdagrad,
    ShardTable,
)
from memstore.kernels import _dispatch
from tests.kernels._triton_util import DEVICE, INTERPRETED
from tests.local_ray import local_ray

ROWS, DIM, B, M = 50, 41, 9, 5
OPTIMIZERS = {
    "sgd": SGD(lr=0.1, weight_decay=0.01),
    "adagrad": Adagrad(lr=0.1, lr_decay=0.01),
    "rowwise_adagrad": RowWiseAdagrad(lr=0.1),
    "adam": Adam(lr=0.05),
    "adamw": AdamW(lr=0.05, weight_decay=0.1),
}
OP_OF_STEP = {
    "sgd": "sgd_step",
    "adagrad": "adagrad_step",
    "rowwise_adagrad": "rowwise_adagrad_step",
    "adam": "adam_step",
    "adamw": "adam_step",
}


@pytest.fixture
def paths(monkeypatch):
    """Context switches between the Triton path and the CPU path of this process."""

    class Paths:
        def triton(self):
            if INTERPRETED:
                monkeypatch.setenv(_dispatch.FORCE_TRITON_ENV, "1")
            return DEVICE

        def cpu(self):
            monkeypatch.delenv(_dispatch.FORCE_TRITON_ENV, raising=False)
            return "cpu"

    return Paths()


def counts_since(start: collections.Counter) -> dict:
    return dict(collections.Counter(_dispatch.COUNTS) - start)


def batches(steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, ROWS, (B, M), generator=g)
        idx[0, :3] = 7  # a row repeated inside one bag, and across bags below
        idx[1, 0] = 7
        out.append((idx, torch.rand(B, M, generator=g), torch.randn(B, DIM, generator=g)))
    return out


def table_round(device: str, optimizer, dtype: str = "float32", steps: int = 2):
    """Lookups, backwards (two workers) and steps; returns every output and the state."""
    t = ShardTable(ROWS, DIM, optimizer=optimizer, dtype=dtype, seed=3, device=device)
    outputs = []
    for step, (idx, w, dy) in enumerate(batches(steps), start=1):
        outputs.append(t.lookup(idx, w).cpu())
        outputs.append(t.backward(idx, w, dy, step=step, push_id=0).cpu())
        outputs.append(t.backward(idx[2:], w[2:], dy[2:] * 0.5, step=step, push_id=1).cpu())
        t.step(step)
    return outputs, t.values.float().cpu(), {k: v.cpu() for k, v in t.state.items()}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_shard_table_round_on_triton_matches_cpu(name, paths):
    start = collections.Counter(_dispatch.COUNTS)
    out, values, state = table_round(paths.triton(), OPTIMIZERS[name])
    on_triton = counts_since(start)
    out_ref, values_ref, state_ref = table_round(paths.cpu(), OPTIMIZERS[name])
    for a, b in zip(out, out_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, values_ref, atol=1e-5, rtol=1e-5)
    for key in state_ref:
        torch.testing.assert_close(state[key], state_ref[key], atol=1e-5, rtol=1e-5)
    # Every op of the round went through Triton, and nothing else ran.
    assert on_triton == {
        ("bag_forward_csr", "triton"): 2,
        ("bag_backward_sparse", "triton"): 4,
        (OP_OF_STEP[name], "triton"): 2,
    }


def grouped_round(device: str):
    """A column block's push with the slots grouped by row by the sender."""
    from memstore.kernels.grouped import group_rows

    t = ShardTable(ROWS, DIM, optimizer=Adam(lr=0.05), seed=3, device=device, col_range=(4, DIM))
    idx, w, dy = batches(1)[0]
    rows, flat_w = idx.reshape(-1), w.reshape(-1)
    offsets = torch.arange(B + 1) * M
    dw = t.backward_csr(
        rows, flat_w, offsets, dy[:, 4:], step=1, grouping=group_rows(rows, ROWS)
    ).cpu()
    t.step(1)
    return dw, t.values.float().cpu()


def test_grouped_push_on_triton_matches_cpu(paths):
    start = collections.Counter(_dispatch.COUNTS)
    dw, values = grouped_round(paths.triton())
    on_triton = counts_since(start)
    dw_ref, values_ref = grouped_round(paths.cpu())
    torch.testing.assert_close(dw, dw_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, values_ref, atol=1e-5, rtol=1e-5)
    if INTERPRETED:  # a CPU block takes the sender's grouping; a GPU block groups itself
        assert on_triton == {("bag_dw_csr", "triton"): 1, ("adam_step", "triton"): 1}
    else:
        assert on_triton == {("bag_backward_sparse", "triton"): 1, ("adam_step", "triton"): 1}


def test_bfloat16_table_on_triton_matches_cpu(paths):
    out, values, state = table_round(paths.triton(), Adam(lr=0.05), dtype="bfloat16")
    out_ref, values_ref, state_ref = table_round(paths.cpu(), Adam(lr=0.05), dtype="bfloat16")
    for a, b in zip(out, out_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # One bfloat16 rounding flip at most (2⁻⁷ relative).
    torch.testing.assert_close(values, values_ref, atol=1e-6, rtol=2**-7)
    for key in state_ref:
        torch.testing.assert_close(state[key], state_ref[key], atol=1e-5, rtol=1e-4)


ARGS = MemoryLayerArgs(dim=16, heads=2, k=3, n_keys=7, key_dim=8, value_lr=0.05, seed=2)


def layer_step(device: str):
    """One training step of a MemoryLayer whose table and tensors live on ``device``."""
    torch.manual_seed(0)
    table = ShardTable(
        ARGS.n_keys**2, ARGS.dim, optimizer=Adam(lr=ARGS.value_lr), seed=ARGS.seed, device=device
    )
    layer = MemoryLayer(ARGS, table=table).to(device)
    dense = torch.optim.Adam(layer.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, ARGS.dim, generator=g).to(device)
    target = torch.randn(3, 3, ARGS.dim, generator=g).to(device)
    y = layer(x)
    loss = F.mse_loss(y, target)
    loss.backward()
    grads = {n: p.grad.cpu().clone() for n, p in layer.named_parameters()}
    dense.step()
    layer.table.step()
    return y.detach().cpu(), grads, table.values.cpu()


def test_memory_layer_train_step_on_triton_matches_cpu(paths):
    start = collections.Counter(_dispatch.COUNTS)
    y, grads, values = layer_step(paths.triton())
    on_triton = counts_since(start)
    y_ref, grads_ref, values_ref = layer_step(paths.cpu())
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(values, values_ref, atol=1e-5, rtol=1e-5)
    assert on_triton == {
        ("product_key_topk", "triton"): 1,
        ("bag_forward_csr", "triton"): 1,
        ("bag_backward_sparse", "triton"): 1,
        ("adam_step", "triton"): 1,
    }


def test_force_switch_refuses_an_op_without_a_triton_implementation(monkeypatch):
    if not INTERPRETED:
        pytest.skip("the switch is for machines without a GPU")
    monkeypatch.setenv(_dispatch.FORCE_TRITON_ENV, "1")
    with pytest.raises(RuntimeError, match="no Triton implementation"):
        _dispatch.cuda_impl("no_such_op", torch.zeros(1))


@pytest.fixture(scope="module")
def ray_on_triton_path():
    """A local Ray instance whose worker processes (the shard actors) take the Triton
    path: on CPU through the interpreter, via the environment of the job."""
    env = {_dispatch.FORCE_TRITON_ENV: "1", "TRITON_INTERPRET": "1"} if INTERPRETED else {}
    with local_ray(num_cpus=4, runtime_env={"env_vars": env}) as ray:
        yield ray


def test_two_shard_ray_table_on_triton_matches_cpu(ray_on_triton_path, paths):
    import memstore

    if not INTERPRETED and torch.cuda.device_count() < 2:
        pytest.skip("two GPU shards need two GPUs (one per shard)")

    name = f"triton-path-{os.getpid()}"
    table = memstore.create_table(
        name, ROWS, DIM, shards=2, optimizer=Adam(lr=0.05), seed=3, timeout_s=120
    )
    try:
        ref = ShardTable(ROWS, DIM, optimizer=Adam(lr=0.05), seed=3, device=paths.cpu())
        for step, (idx, w, dy) in enumerate(batches(2), start=1):
            torch.testing.assert_close(
                table.lookup(idx, w), ref.lookup(idx, w), atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                table.backward(idx, w, dy, step=step),
                ref.backward(idx, w, dy, step=step),
                atol=1e-5,
                rtol=1e-5,
            )
            table.step(step)
            ref.step(step)
        torch.testing.assert_close(
            table.gather(torch.arange(ROWS)).float(), ref.values, atol=1e-5, rtol=1e-5
        )
        for shard in table.stats()["shards"]:
            paths_taken = shard["kernel_paths"]
            assert {p.split("/")[1] for p in paths_taken} == {"triton"}, paths_taken
            for op in ("bag_forward_csr", "bag_backward_sparse", "adam_step"):
                assert paths_taken.get(f"{op}/triton", 0) >= 2, paths_taken
    finally:
        memstore.drop_table(name)
