"""CPU kernel benchmark: for every op of the store, our kernel against the library alternative.

Every row is measured in this run, on the same inputs: B = 2048 tokens, H = 4 heads,
k = 32 (H·k = 128 rows per token), n = 1024 sub-keys (1M rows), dim = 256, float32,
all CPU threads. Each row shows both candidates side by side, timed alternately, and
which one the store's dispatch (``kernels._dispatch``) uses for it; a hand-written
kernel is only worth using where this table shows it faster. Prints one markdown table.

    python -m benchmarks.ops [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks._results import command_line, write_result
from memstore import MemoryLayer, MemoryLayerArgs, kernels

B, H, K, N, DIM, DK = 2048, 4, 32, 1024, 256, 256
ROWS = N * N


def timed(fn, repeats: int, setup=None) -> float:
    """Median seconds of ``fn()`` after one warm-up; ``setup()`` runs untimed before each."""
    return timed_pair(fn, None, repeats, setup_a=setup)[0]


def timed_pair(a, b, repeats: int, setup_a=None, setup_b=None) -> tuple[float, float]:
    """Median seconds of ``a()`` and ``b()``, run alternately so that drift in the
    machine (other tenants, memory placement) hits both sides alike."""
    samples: dict[int, list[float]] = {0: [], 1: []}
    for i in range(repeats + 1):
        for side, fn, setup in ((0, a, setup_a), (1, b, setup_b)):
            if fn is None:
                continue
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            if i:
                samples[side].append(time.perf_counter() - start)
    return tuple(statistics.median(v) if v else float("nan") for v in samples.values())


def copy_bandwidth(repeats: int) -> float:
    """GB/s of a 512 MiB tensor copy (bytes read + written): the machine's ceiling."""
    src = torch.randn(128 << 20)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), repeats)
    return 2 * src.nbytes / t / 1e9


def table_copy(values: torch.Tensor) -> torch.Tensor:
    """A copy of the values allocated the way a ShardTable allocates its block."""
    table = kernels.empty_table(tuple(values.shape), values.dtype)
    return table.copy_(values)


def csr(idx, w):
    """The (B, M) bags in the CSR form a table block receives: rows, weights, offsets."""
    Bq, Mq = idx.shape
    return idx.reshape(-1), w.reshape(-1), torch.arange(Bq + 1) * Mq


def bench_bag_forward(values, idx, w, repeats):
    """The store's lookup: the C forward, F.embedding_bag, and the store's dispatch."""
    table = table_copy(values)
    rows, flat_w, offsets = csr(idx, w)

    def library(vals, weights):
        return lambda: F.embedding_bag(
            rows, vals, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
        )

    native, lib = timed_pair(
        lambda: kernels.bag.bag_forward_csr_native(table, rows, flat_w, offsets),
        library(table, flat_w),
        repeats,
    )
    store, lib2 = timed_pair(
        lambda: kernels.bag.bag_forward_csr(table, rows, flat_w, offsets),
        library(table, flat_w),
        repeats,
    )
    half = table.to(torch.bfloat16)
    lib_half = library(half, flat_w.to(torch.bfloat16))
    native16, lib16 = timed_pair(
        lambda: kernels.bag.bag_forward_csr_native(half, rows, flat_w, offsets),
        lambda: lib_half().float(),
        repeats,
    )
    return dict(
        native=native, library=lib, store=store, library2=lib2, native16=native16, library16=lib16
    )


def bench_backward_and_step(values, idx, w, dy, repeats):
    """The store's backward (dw + row gradients grouped by row) and lazy Adam step,
    each against its library counterpart: EmbeddingBag(sparse=True)'s autograd
    backward, and SparseAdam.step on the sparse gradient it leaves."""
    table = table_copy(values)
    m = kernels.empty_table(tuple(values.shape), torch.float32).zero_()
    v = kernels.empty_table(tuple(values.shape), torch.float32).zero_()
    rows, flat_w, offsets = csr(idx, w)
    step, pending = [0], {}

    def our_backward():
        pending["grads"] = kernels.bag.bag_backward_sparse(table, rows, flat_w, offsets, dy)[1]

    def our_step():
        step[0] += 1
        g = pending["grads"]
        kernels.adam_step(
            table, m, v, g.rows, g, step=step[0], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8
        )

    bag = torch.nn.EmbeddingBag(ROWS, DIM, mode="sum", sparse=True)
    with torch.no_grad():
        bag.weight.copy_(values)
    opt = torch.optim.SparseAdam(bag.parameters(), lr=1e-3)
    w_leaf = w.clone().requires_grad_(True)
    out = {}

    def lib_forward():
        opt.zero_grad(set_to_none=True)
        out["y"] = bag(idx, per_sample_weights=w_leaf)

    def lib_backward():
        out["y"].backward(dy)

    def lib_forward_backward():
        lib_forward()
        lib_backward()

    backward = timed_pair(our_backward, lib_backward, repeats, setup_b=lib_forward)
    adam = timed_pair(
        our_step, opt.step, repeats, setup_a=our_backward, setup_b=lib_forward_backward
    )

    def ours_fused():
        our_backward()
        our_step()

    def lib_fused():
        lib_backward()
        opt.step()

    fused = timed_pair(ours_fused, lib_fused, repeats, setup_b=lib_forward)
    return backward, adam, fused


def composite_topk(q, keys, k):
    """The plain-torch composition: einsum, top-k per half, k×k combine, top-k."""
    Bq, Hq, Dk = q.shape
    s = torch.einsum("bhpd,hpnd->bhpn", q.view(Bq, Hq, 2, Dk // 2), keys)
    s1, i1 = s[:, :, 0].topk(k)
    s2, i2 = s[:, :, 1].topk(k)
    sums = (s1[..., :, None] + s2[..., None, :]).flatten(-2)
    index = (i1[..., :, None] * keys.shape[2] + i2[..., None, :]).flatten(-2)
    scores, pos = sums.topk(k)
    return scores, index.gather(-1, pos)


def bench_topk(repeats):
    q = torch.randn(B, H, DK)
    keys = torch.randn(H, 2, N, DK // 2)
    with torch.no_grad():
        return timed_pair(
            lambda: kernels.product_key_topk(q, keys, K),
            lambda: composite_topk(q, keys, K),
            repeats,
        )


def _layer_step_seconds(x, target, repeats):
    """Our layer's training step; the layer and its table live only while timed."""
    layer = MemoryLayer(MemoryLayerArgs(dim=DIM, heads=H, k=K, n_keys=N, key_dim=DK))
    dense = torch.optim.Adam(layer.parameters(), lr=1e-3)

    def ours():
        loss = F.mse_loss(layer(x), target)
        dense.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()
        layer.table.step()

    return timed(ours, repeats)


def bench_layer_step(repeats):
    """One training step of a whole memory layer: forward, backward, all updates."""
    x = torch.randn(8, B // 8, DIM)
    target = torch.randn_like(x)
    ours_t = _layer_step_seconds(x, target, repeats)
    gc.collect()  # the layer's table is gone before the peer allocates its own
    from product_key_memory import PKM

    pkm = PKM(DIM, heads=H, num_keys=N, topk=K, dim_head=DK // 2)
    opt = torch.optim.Adam(pkm.parameters(), lr=1e-3)

    def baseline():
        loss = F.mse_loss(pkm(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return ours_t, timed(baseline, max(2, repeats // 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    values = torch.randn(ROWS, DIM) * DIM**-0.5
    idx = torch.randint(0, ROWS, (B, H * K))
    w = torch.softmax(torch.randn(B, H * K), -1)
    dy = torch.randn(B, DIM)
    lib_bag = "F.embedding_bag(per_sample_weights)"
    load_before = os.getloadavg()[0]
    rows = []
    with tqdm(total=5, desc="benchmarks", unit="case") as bar:
        copy_gbs = copy_bandwidth(args.repeats)
        bar.update()
        f = bench_bag_forward(values, idx, w, args.repeats)
        fwd_gbs = idx.numel() * (DIM * 4 + 8 + 4) / f["store"] / 1e9
        f32_choice = "ours" if kernels._native.prefer_c_forward() else "library"
        callee = "C" if f32_choice == "ours" else "the library"
        rows += [
            (
                "bag forward f32",
                "C bag_forward",
                f["native"],
                lib_bag,
                f["library"],
                f32_choice,
                "",
            ),
            (
                "bag forward f32, through the store's dispatch",
                f"memstore.kernels.bag.bag_forward_csr (calls {callee})",
                f["store"],
                lib_bag,
                f["library2"],
                f32_choice,
                f"{fwd_gbs:.1f} GB/s = {100 * fwd_gbs / copy_gbs:.0f}% of copy",
            ),
            (
                "bag forward bf16",
                "C bag_forward (f32 accumulation, f32 out)",
                f["native16"],
                lib_bag + " on bf16, then .float()",
                f["library16"],
                "ours",
                "the library rounds each sum to bf16; the store's contract is f32 sums",
            ),
        ]
        bar.update()
        backward, adam, fused = bench_backward_and_step(values, idx, w, dy, args.repeats)
        rows += [
            (
                "bag backward (dw + row grads)",
                "C dw + rows grouped by a counting or radix sort",
                backward[0],
                "EmbeddingBag(sparse) autograd backward",
                backward[1],
                "ours",
                "",
            ),
            (
                "lazy Adam step",
                "C: row grads summed inside the update",
                adam[0],
                "SparseAdam.step",
                adam[1],
                "ours",
                "",
            ),
            (
                "bag backward + lazy Adam",
                "both of the above",
                fused[0],
                "EmbeddingBag(sparse) backward + SparseAdam",
                fused[1],
                "ours",
                "target ≥ 10×",
            ),
        ]
        bar.update()
        del values
        gc.collect()
        topk, base = bench_topk(args.repeats)
        rows.append(
            (
                "product_key_topk",
                "C selection",
                topk,
                "einsum, topk, k×k combine, topk",
                base,
                "ours",
                "",
            )
        )
        bar.update()
        try:
            layer, pkm = bench_layer_step(max(3, args.repeats // 2))
            rows.append(
                (
                    "MemoryLayer train step",
                    "memstore MemoryLayer",
                    layer,
                    "product-key-memory PKM + dense Adam",
                    pkm,
                    "ours",
                    "target ≥ 10×",
                )
            )
        except ImportError:
            rows.append(
                (
                    "MemoryLayer train step",
                    "memstore MemoryLayer",
                    float("nan"),
                    "product-key-memory PKM (not installed: pip install .[bench])",
                    float("nan"),
                    "ours",
                    "",
                )
            )
        bar.update()
    print(
        f"\nmachine: {os.cpu_count()} CPU threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}; copy {copy_gbs:.1f} GB/s (read + write); load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other processes share the CPUs)"
    )
    print(f"B={B}, H={H}, k={K}, n={N} ({ROWS:,} rows), dim={DIM}, Dk={DK}, float32\n")
    print(
        "| op | ours | ours ms | library alternative | library ms | library / ours "
        "| faster in this run | store uses | note |"
    )
    print("|---|---|---:|---|---:|---:|---|---|---|")
    for name, ours_name, ours, base_name, base, uses, note in rows:
        faster = "ours" if ours < base else "library" if base < ours else "-"
        print(
            f"| {name} | {ours_name} | {1e3 * ours:.1f} | {base_name} | {1e3 * base:.1f} | "
            f"{base / ours:.2f}× | {faster} | {uses} | {note} |"
        )
    write_result(
        "kernels",
        {
            f"{name} ({ours_name})": {
                "ours ms": 1e3 * ours,
                "baseline ms": 1e3 * base,
                "baseline / ours": base / ours,
                "baseline": base_name,
            }
            for name, ours_name, ours, base_name, base, uses, note in rows
        },
        command_line("benchmarks.ops"),
        title="Kernels: ours against the library",
    )


if __name__ == "__main__":
    main()
