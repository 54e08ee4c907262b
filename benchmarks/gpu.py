"""Check and time the Triton kernels and the store on a CUDA GPU against torch baselines.

    PYTHONPATH=. python benchmarks/gpu.py            # checks, op table, store table
    PYTHONPATH=. python benchmarks/gpu.py --no-check # timings only
    PYTHONPATH=. python benchmarks/gpu.py --compile-only  # no GPU needed: compile for sm_90
    PYTHONPATH=. python benchmarks/gpu.py --dry-run  # no GPU needed: store rows, tiny, interpreted

1. Checks every kernel against ``kernels.reference`` on fresh random data at several
   shapes, with the allocator poisoned with NaN first so that an output element the
   kernel forgets to write shows up.
2. Measures a large device-to-device copy: the memory bandwidth ceiling.
3. Times (median of CUDA-event timings after warm-up) each Triton kernel and its torch
   equivalent at B tokens, H heads, k per head (M = H·k slots per token), n sub-keys
   (N = n² value rows), dim, and Dk for the top-k; prints one table.
4. The store level, in tokens/s with the targets beside them: a ``ShardTable`` round
   (lookup + backward + lazy Adam) against ``nn.EmbeddingBag(sparse=True)`` +
   ``SparseAdam`` (checked equal first), a ``MemoryLayer`` train step against lucidrains'
   PKM (when ``product-key-memory`` is installed), and a 2-shard Ray table round on this
   node against one in-process table (the row names the device its shards ran on: a
   table gets GPU shards only when the node has a GPU per shard).

"GB/s" counts the bytes an op must move at least once (the gathered value rows once
per slot, as random rows do not stay in L2), so it is comparable to the copy figure.
Exits with status 1 if a check fails, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from memstore.kernels import reference as ref

NAN = float("nan")
DEVICE = "cuda"  # a module constant so that the script logic can be dry-run elsewhere


def require_gpu():
    """Import the Triton kernels, or exit with a message saying why nothing ran."""
    if not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False); "
            "nothing was checked or measured.",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        import memstore.kernels.triton as tk
    except ImportError as exc:
        print(f"benchmarks/gpu.py: Triton is not importable ({exc}).", file=sys.stderr)
        sys.exit(2)
    return tk


def cuda_ms(fn, warmup: int = 2, iters: int = 7) -> float:
    """Median milliseconds of fn() over iters CUDA-event-timed runs after warmup runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def poison(*nbytes: int) -> None:
    """Fill freshly allocated blocks of these sizes with NaN and free them: the caching
    allocator hands the same blocks to the kernel's torch.empty outputs next."""
    blocks = [torch.full((math.ceil(b / 4),), NAN, device=DEVICE) for b in nbytes]
    del blocks


def close(actual, expected, atol=1e-4, rtol=1e-5) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- checks


def check_bag(tk, B, M, R, dim, dtype):
    values = torch.randn(R, dim, device=DEVICE).to(dtype)
    idx = torch.randint(0, R, (B, M), device=DEVICE)
    w, dy = torch.randn(B, M, device=DEVICE), torch.randn(B, dim, device=DEVICE)
    cpu = [t.cpu() for t in (values, idx, w, dy)]
    poison(B * dim * 4)
    close(tk.bag_forward_triton(values, idx, w), ref.bag_forward_reference(*cpu[:3]))
    dw_ref, (rows_ref, grads_ref) = ref.bag_backward_reference(*cpu)
    poison(B * M * 4, rows_ref.numel() * dim * 4)
    dw, (rows, grads) = tk.bag_backward_triton(values, idx, w, dy)
    assert torch.equal(rows.cpu(), rows_ref), "bag_backward rows differ"
    close(dw, dw_ref)
    close(grads, grads_ref)


def _all_scores(q, keys):
    B, H, Dk = q.shape
    half = torch.einsum("bhpd,hpnd->bhpn", q.reshape(B, H, 2, Dk // 2), keys)
    return (half[:, :, 0, :, None] + half[:, :, 1, None, :]).flatten(2)


def check_topk(tk, B, H, Dk, n, k):
    q, keys = torch.randn(B, H, Dk), torch.randn(H, 2, n, Dk // 2)
    poison(B * H * k * 8, B * H * k * 4)
    with torch.no_grad():
        scores, index = tk.product_key_topk_triton(q.to(DEVICE), keys.to(DEVICE), k)
    scores_ref, _ = ref.product_key_topk_reference(q, keys, k)
    index = index.cpu()
    assert int(index.min()) >= 0 and int(index.max()) < n * n, "top-k index out of range"
    close(_all_scores(q, keys).gather(-1, index), scores_ref)  # robust to near-ties
    close(scores, scores_ref)
    qi = torch.randint(-2, 3, (B, H, Dk)).float()  # integer inputs: exact sums, many ties
    ki = torch.randint(-1, 2, (H, 2, n, Dk // 2)).float()
    s_i, i_i = tk.product_key_topk_triton(qi.to(DEVICE), ki.to(DEVICE), k)
    s_ref, i_ref = ref.product_key_topk_reference(qi, ki, k)
    assert torch.equal(i_i.cpu(), i_ref), "top-k tie order differs from the reference"
    assert torch.equal(s_i.cpu(), s_ref), "top-k scores differ on integer inputs"


def _optim_case(name, R, dim, U, dtype):
    values = torch.randn(R, dim).to(dtype)
    rows = torch.randperm(R)[:U]
    grads = torch.randn(U, dim)
    if name == "sgd":
        return [values, rows, grads], dict(lr=0.1, weight_decay=0.01), 1
    if name == "adagrad":
        return (
            [values, torch.rand(R, dim), rows, grads],
            dict(lr=0.05, eps=1e-10, lr_decay=0.01, step=3),
            2,
        )
    if name == "rowwise_adagrad":
        return [values, torch.rand(R), rows, grads], dict(lr=0.05, eps=1e-8), 2
    state = [torch.randn(R, dim) * 0.1, torch.rand(R, dim) * 0.01]
    kwargs = dict(
        step=5,
        lr=0.1,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.1,
        decoupled=name == "adamw",
    )
    return [values, *state, rows, grads], kwargs, 3


def check_optim(tk, name, R, dim, U, dtype):
    tensors, kwargs, n_inplace = _optim_case(name, R, dim, U, dtype)
    op = "adam" if name == "adamw" else name
    expected = [t.clone() for t in tensors]
    getattr(ref, f"{op}_step_reference")(*expected, **kwargs)
    actual = [t.to(DEVICE) for t in tensors]
    getattr(tk, f"{op}_step_triton")(*actual, **kwargs)
    for e, a in zip(expected[:n_inplace], actual[:n_inplace]):
        # bfloat16: one rounding flip (rtol 2⁻⁷ is one bfloat16 ulp).
        close(a, e, **(dict(rtol=2**-7, atol=1e-6) if a.dtype == torch.bfloat16 else {}))


def check_fused(tk, B, M, R, dim, dtype):
    values = torch.randn(R, dim).to(dtype)
    moments = [torch.randn(R, dim) * 0.1, torch.rand(R, dim) * 0.01]
    idx, w, dy = torch.randint(0, R, (B, M)), torch.randn(B, M), torch.randn(B, dim)
    kwargs = dict(step=3, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    expected = [values.clone(), *[m.clone() for m in moments]]
    dw_ref, (rows_ref, grads_ref) = ref.bag_backward_reference(expected[0], idx, w, dy)
    ref.adam_step_reference(*expected, rows_ref, grads_ref, **kwargs)
    actual = [t.to(DEVICE) for t in (values, *moments)]
    poison(B * M * 4)
    dw, rows = tk.bag_backward_adam_step(
        *actual, idx.to(DEVICE), w.to(DEVICE), dy.to(DEVICE), **kwargs
    )
    assert torch.equal(rows.cpu(), rows_ref), "fused rows differ"
    close(dw, dw_ref)
    for e, a in zip(expected, actual):
        close(a, e, **(dict(rtol=2**-7, atol=1e-6) if a.dtype == torch.bfloat16 else {}))


def run_checks(tk) -> bool:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in [
            (1, 1, 1, 1),
            (257, 33, 5000, 341),
            (2048, 128, 100_000, 1024),
            (64, 16, 3, 41),
        ]:
            cases.append((f"bag {tuple(shape)} {dtype}", check_bag, (*shape, dtype)))
        for name in ("sgd", "adagrad", "rowwise_adagrad", "adam", "adamw"):
            for shape in [(1, 1, 1), (5000, 341, 1200), (20_000, 1024, 20_000)]:
                cases.append((f"{name} {shape} {dtype}", check_optim, (name, *shape, dtype)))
        for shape in [(257, 33, 5000, 341), (64, 16, 3, 41)]:
            cases.append((f"bag_backward_adam_step {shape} {dtype}", check_fused, (*shape, dtype)))
    for shape in [(1, 1, 2, 1, 1), (300, 4, 256, 128, 32), (77, 2, 18, 7, 49), (40, 3, 64, 300, 5)]:
        cases.append((f"product_key_topk {shape}", check_topk, shape))
    failed = 0
    for label, fn, args in cases:
        try:
            fn(tk, *args)
        except AssertionError as exc:
            failed += 1
            print(f"FAIL  {label}: {str(exc).splitlines()[0]}")
    print(f"checks: {len(cases) - failed} passed, {failed} failed")
    return failed == 0


# ----------------------------------------------------------------------------- timings


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy (read + write): the ceiling for the table."""
    src = torch.empty(1 << 29, device=DEVICE)
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), iters=10)
    return 2 * src.numel() * 4 / ms / 1e6


def torch_topk(q, keys, k):
    """The usual composition: einsum half scores, top-k per half, k x k sums, top-k."""
    B, H, Dk = q.shape
    n = keys.shape[2]
    half = torch.einsum("bhpd,hpnd->bhpn", q.reshape(B, H, 2, Dk // 2), keys)
    s, i = half.topk(k, dim=-1)
    cand = (s[:, :, 0, :, None] + s[:, :, 1, None, :]).flatten(2)
    cidx = (i[:, :, 0, :, None] * n + i[:, :, 1, None, :]).flatten(2)
    top, pos = cand.topk(k, dim=-1)
    return top, cidx.gather(-1, pos)


def time_topk(tk, a):
    q = torch.randn(a.tokens, a.heads, a.dk, device=DEVICE)
    keys = torch.randn(a.heads, 2, a.n, a.dk // 2, device=DEVICE)
    nbytes = q.numel() * 4 + keys.numel() * 4 + a.tokens * a.heads * a.k * 12
    with torch.no_grad():
        t_ms = cuda_ms(lambda: tk.product_key_topk_triton(q, keys, a.k))
        b_ms = cuda_ms(lambda: torch_topk(q, keys, a.k))
    return [("product_key_topk", nbytes, t_ms, b_ms, "einsum+topk+kxk+topk")]


def time_forward(tk, a, values, idx, w):
    es = values.element_size()
    nbytes = idx.numel() * (values.shape[1] * es + 12) + idx.shape[0] * values.shape[1] * 4
    t_ms = cuda_ms(lambda: tk.bag_forward_triton(values, idx, w))
    b_ms = cuda_ms(
        lambda: F.embedding_bag(idx, values, per_sample_weights=w.to(values.dtype), mode="sum")
    )
    name = f"bag_forward {str(values.dtype).replace('torch.', '')}"
    return [(name, nbytes, t_ms, b_ms, "F.embedding_bag")]


def time_backward(tk, a, values, idx, w, dy, U):
    dim = values.shape[1]
    nbytes = idx.numel() * (dim * 4 + 12) + dy.numel() * 4 + U * (dim * 4 + 8)
    t_ms = cuda_ms(lambda: tk.bag_backward_triton(values, idx, w, dy))
    weight = values.detach().clone().requires_grad_()
    psw = w.detach().clone().requires_grad_()
    out = F.embedding_bag(idx, weight, per_sample_weights=psw, mode="sum", sparse=True)

    def torch_backward():
        g_weight, g_w = torch.autograd.grad(out, (weight, psw), dy, retain_graph=True)
        return g_weight.coalesce(), g_w

    b_ms = cuda_ms(torch_backward, iters=5)
    return [("bag_backward", nbytes, t_ms, b_ms, "embedding_bag bwd (sparse) + coalesce")]


def _adam_args():
    return dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def _triton_adam_ms(tk, values, rows, grads) -> float:
    """The moments live only while it is timed: the baseline needs their memory."""
    m, v = torch.zeros_like(values), torch.zeros_like(values)
    return cuda_ms(lambda: tk.adam_step_triton(values, m, v, rows, grads, **_adam_args()))


def _triton_train_step_ms(tk, values, idx, w, dy) -> float:
    """Forward and fused backward + Adam; the moments live only while it is timed."""
    m, v = torch.zeros_like(values), torch.zeros_like(values)

    def triton_step():
        tk.bag_forward_triton(values, idx, w)
        tk.bag_backward_adam_step(values, m, v, idx, w, dy, **_adam_args())

    return cuda_ms(triton_step, iters=5)


def time_adam(tk, a, values, rows, grads):
    U, dim = grads.shape
    nbytes = U * dim * (2 * values.element_size() + 16 + 4) + U * 8
    t_ms = _triton_adam_ms(tk, values, rows, grads)
    param = torch.nn.Parameter(values.detach().clone())
    opt = torch.optim.SparseAdam([param], lr=1e-3)
    param.grad = torch.sparse_coo_tensor(
        rows[None], grads, values.shape, is_coalesced=True, check_invariants=False
    )
    b_ms = cuda_ms(opt.step, iters=5)
    return [("adam_step", nbytes, t_ms, b_ms, "torch.optim.SparseAdam.step")]


def time_train_step(tk, a, values, idx, w, dy, U):
    """Forward + backward + Adam: Triton (forward, fused backward/Adam) against
    nn.EmbeddingBag(sparse) + SparseAdam."""
    dim, es = values.shape[1], values.element_size()
    nbytes = 2 * idx.numel() * (dim * es + 12) + dy.numel() * 4 + U * dim * (2 * es + 16)
    t_ms = _triton_train_step_ms(tk, values, idx, w, dy)
    bag = torch.nn.EmbeddingBag.from_pretrained(
        values.detach().clone(), freeze=False, mode="sum", sparse=True
    )
    opt = torch.optim.SparseAdam(bag.parameters(), lr=1e-3)

    def torch_step():
        bag(idx, per_sample_weights=w).backward(dy)
        opt.step()
        opt.zero_grad(set_to_none=True)

    b_ms = cuda_ms(torch_step, iters=5)
    return [("train step (fwd+bwd+adam)", nbytes, t_ms, b_ms, "nn.EmbeddingBag(sparse)+SparseAdam")]


def run_timings(tk, a, ceiling):
    rows = []
    rows += time_topk(tk, a)
    torch.cuda.empty_cache()
    N, M = a.n * a.n, a.heads * a.k
    values = torch.randn(N, a.dim, device=DEVICE)
    idx = torch.randint(0, N, (a.tokens, M), device=DEVICE)
    w = torch.softmax(torch.randn(a.tokens, M, device=DEVICE), dim=-1)
    dy = torch.randn(a.tokens, a.dim, device=DEVICE)
    rows += time_forward(tk, a, values, idx, w)
    rows += time_forward(tk, a, values.to(torch.bfloat16), idx, w)
    _, (uniq, grads) = tk.bag_backward_triton(values, idx, w, dy)
    rows += time_backward(tk, a, values, idx, w, dy, uniq.numel())
    torch.cuda.empty_cache()
    rows += time_adam(tk, a, values, uniq, grads)
    del grads
    torch.cuda.empty_cache()
    rows += time_train_step(tk, a, values, idx, w, dy, uniq.numel())
    return rows


OP_TARGETS = {"bag_forward float32": ">= 70% of copy", "bag_forward bfloat16": ">= 70% of copy"}


def print_table(results, ceiling, a) -> None:
    print(
        f"\n{torch.cuda.get_device_name()}: B={a.tokens} tokens, H={a.heads}, k={a.k}, "
        f"n={a.n} (N={a.n * a.n} rows), dim={a.dim}, Dk={a.dk}; copy {ceiling:.0f} GB/s"
    )
    head = (
        f"{'op':26s} {'impl':44s} {'ms':>9s} {'GB/s':>8s} {'% copy':>7s} {'vs torch':>9s}  target"
    )
    print(head)
    print("-" * len(head))
    for name, nbytes, t_ms, b_ms, baseline in results:
        for impl, ms in (("triton", t_ms), (f"torch: {baseline}", b_ms)):
            gbs = nbytes / ms / 1e6
            speedup = f"{b_ms / t_ms:8.2f}x" if impl == "triton" else ""
            target = OP_TARGETS.get(name, "") if impl == "triton" else ""
            print(
                f"{name:26s} {impl:44s} {ms:9.3f} {gbs:8.0f} {100 * gbs / ceiling:6.1f}% "
                f"{speedup:>9s}  {target}"
            )


# ------------------------------------------------------------------------ store level
# The store's own operations, as a trainer calls them, against the torch path, in tokens/s.
# Targets are printed beside the figures.

STORE_TARGETS = {"ShardTable round": 5.0, "MemoryLayer train step": 10.0}


def wall_ms(fn, device: str, warmup: int = 1, iters: int = 3) -> float:
    """Median milliseconds of fn(), synchronised with the GPU when there is one."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def store_batch(tokens: int, slots: int, rows: int, dim: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, rows, (tokens, slots), generator=g)
    w = torch.softmax(torch.randn(tokens, slots, generator=g), -1)
    dy = torch.randn(tokens, dim, generator=g)
    return idx.to(device), w.to(device), dy.to(device)


def torch_store_path(values: torch.Tensor, lr: float = 1e-3):
    """nn.EmbeddingBag(sparse=True) + SparseAdam from the same values: (bag, one_round)."""
    bag = torch.nn.EmbeddingBag.from_pretrained(
        values.float().clone(), freeze=False, mode="sum", sparse=True
    )
    opt = torch.optim.SparseAdam(bag.parameters(), lr=lr)

    def one_round(idx, w, dy):
        y = bag(idx, per_sample_weights=w)
        y.backward(dy)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return y.detach()

    return bag, one_round


def check_store_round(device: str, rows=41, dim=9, tokens=9, slots=5) -> None:
    """One ShardTable round (lookup, backward, lazy Adam) against EmbeddingBag + SparseAdam
    from the same values: lookups and updated values must agree."""
    from memstore import Adam, ShardTable

    table = ShardTable(rows, dim, optimizer=Adam(lr=1e-2), seed=1, device=device)
    bag, torch_round = torch_store_path(table.values, lr=1e-2)
    for seed in (0, 1):
        idx, w, dy = store_batch(tokens, slots, rows, dim, device, seed)
        close(table.lookup(idx, w), bag(idx, per_sample_weights=w).detach(), atol=1e-5, rtol=1e-5)
        table.backward(idx, w, dy)
        table.step()
        torch_round(idx, w, dy)
    close(table.values, bag.weight.detach(), atol=1e-5, rtol=1e-5)


def _store_round_ms(s, device: str, idx, w, dy):
    """ms of a ShardTable round, and its values; the rest of the table (the Adam
    moments) lives only while it is timed."""
    from memstore import Adam, ShardTable

    table = ShardTable(s.rows, s.dim, optimizer=Adam(lr=1e-3), device=device)

    def ours():
        table.lookup(idx, w)
        table.backward(idx, w, dy)
        table.step()

    return wall_ms(ours, device), table.values


def time_store_round(s, device: str):

    idx, w, dy = store_batch(s.tokens, s.slots, s.rows, s.dim, device)
    ours_ms, values = _store_round_ms(s, device, idx, w, dy)
    _, torch_round = torch_store_path(values)
    del values  # the baseline holds its own copy
    torch_ms = wall_ms(lambda: torch_round(idx, w, dy), device)
    return (
        "ShardTable round",
        "lookup + backward + lazy Adam",
        ours_ms,
        "nn.EmbeddingBag(sparse) + SparseAdam",
        torch_ms,
        s.tokens,
    )


def time_layer_step(s, device: str):
    import torch.nn.functional as F_

    from memstore import Adam, MemoryLayer, MemoryLayerArgs, ShardTable

    args = MemoryLayerArgs(dim=s.dim, heads=s.heads, k=s.k, n_keys=s.n, key_dim=s.dk)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, s.tokens, s.dim, generator=g).to(device)
    target = torch.randn(1, s.tokens, s.dim, generator=g).to(device)
    table = ShardTable(s.n**2, s.dim, optimizer=Adam(lr=1e-3), device=device)
    layer = MemoryLayer(args, table=table).to(device)

    def step(model, opt, after=None):
        def run():
            loss = F_.mse_loss(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after is not None:
                after()

        return run

    ours_ms = wall_ms(
        step(layer, torch.optim.Adam(layer.parameters(), lr=1e-3), layer.table.step), device
    )
    del layer, table
    try:
        from product_key_memory import PKM
    except ImportError:
        return (
            "MemoryLayer train step",
            "memstore MemoryLayer",
            ours_ms,
            "lucidrains PKM: not installed (pip install product-key-memory)",
            NAN,
            s.tokens,
        )
    pkm = PKM(s.dim, heads=s.heads, num_keys=s.n, topk=s.k, dim_head=s.dk // 2).to(device)
    pkm_ms = wall_ms(step(pkm, torch.optim.Adam(pkm.parameters(), lr=1e-3)), device)
    return (
        "MemoryLayer train step",
        "memstore MemoryLayer",
        ours_ms,
        "lucidrains PKM + Adam",
        pkm_ms,
        s.tokens,
    )


def time_ray_round(s, device: str):
    """A 2-shard table over Ray on this node against one in-process ShardTable."""
    import ray

    import memstore
    from memstore import Adam, ShardTable

    env = {}
    if device == "cpu":  # dry run: the shard actors take the Triton path in the interpreter
        env = {"MEMSTORE_FORCE_TRITON": "1", "TRITON_INTERPRET": "1"}
    ray.init(
        address="local", include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env}
    )
    try:
        table = memstore.create_table(
            "gpu-bench", s.ray_rows, s.dim, shards=2, optimizer=Adam(lr=1e-3), timeout_s=600
        )
        idx, w, dy = store_batch(s.ray_tokens, s.slots, s.ray_rows, s.dim, "cpu")

        def remote_round():
            table.lookup(idx, w)
            table.backward(idx, w, dy)
            table.step()

        ray_ms = wall_ms(remote_round, "cpu")
        paths = sorted(
            {
                p.split("/")[1]
                for shard in table.stats()["shards"]
                for p in shard.get("kernel_paths", {})
            }
        )
        table.drop()
    finally:
        ray.shutdown()
    local = ShardTable(s.ray_rows, s.dim, optimizer=Adam(lr=1e-3), device=device)
    dev_batch = [t.to(device) for t in (idx, w, dy)]

    def local_round():
        local.lookup(*dev_batch[:2])
        local.backward(*dev_batch)
        local.step()

    local_ms = wall_ms(local_round, device)
    return (
        f"2-shard Ray table round (shards on: {'/'.join(paths)})",
        "memstore.create_table",
        ray_ms,
        "one in-process ShardTable",
        local_ms,
        s.ray_tokens,
    )


def print_store_table(results) -> None:
    print(
        "\n| store op | ours | ours ms | ours tokens/s | baseline | baseline ms | "
        "baseline tokens/s | speedup | target |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---|")
    for name, ours_name, ours_ms, base_name, base_ms, tokens in results:
        target = STORE_TARGETS.get(name)
        print(
            f"| {name} | {ours_name} | {ours_ms:.1f} | {1e3 * tokens / ours_ms:,.0f} | "
            f"{base_name} | {base_ms:.1f} | {1e3 * tokens / base_ms:,.0f} | "
            f"{base_ms / ours_ms:.2f}× | {f'≥ {target:g}×' if target else '-'} |"
        )


def run_store(s, device: str) -> None:
    check_store_round(device)
    print("store check: ShardTable round = EmbeddingBag + SparseAdam (lookups, values)")
    results = [time_store_round(s, device)]
    if device == "cuda":
        torch.cuda.empty_cache()
    results.append(time_layer_step(s, device))
    if device == "cuda":
        torch.cuda.empty_cache()
    results.append(time_ray_round(s, device))
    print_store_table(results)


# ----------------------------------------------------------------------- compile only

_I64_PTRS = (
    "idx_ptr",
    "rows_ptr",
    "order_ptr",
    "seg_ptr",
    "scratch_ptr",
    "index_ptr",
    "offsets_ptr",
    "slot_bag_ptr",
)
_F32_SCALARS = (
    "lr",
    "weight_decay",
    "clr",
    "eps",
    "beta1",
    "beta2",
    "omb1",
    "omb2",
    "step_size",
    "eps_term",
    "shrink",
)


def _signature(fn, dtype: str, consts: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("values_ptr", "q_ptr", "keys_ptr"):
            sig[name] = "*" + dtype
        elif name.endswith("_ptr"):
            sig[name] = (
                "*i64" if name in _I64_PTRS else "*i32" if name.startswith("pair") else "*fp32"
            )
        else:
            sig[name] = (
                "fp32"
                if name in _F32_SCALARS
                else "i64"
                if name in ("stride_v", "stride_c")
                else "i32"
            )
    return sig


def compile_report() -> int:
    """Compile every kernel for sm_90 with Triton's bundled ptxas; no GPU needed."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from memstore.kernels.triton import bag, csr, product_key, sparse_optim

    rows_d = dict(BLOCK_P=8, BLOCK_D=256)
    kernels = [
        (bag._bag_fwd_kernel, dict(BLOCK_M=16, BLOCK_D=256), 4),
        (csr._bag_csr_fwd_kernel, dict(BLOCK_P=16, BLOCK_D=256), 4),
        (csr._bag_csr_dw_kernel, dict(BLOCK_P=16, BLOCK_D=256), 4),
        (bag._bag_dw_kernel, dict(BLOCK_M=16, BLOCK_D=256), 4),
        (bag._bag_row_grad_kernel, dict(BLOCK_P=8, BLOCK_D=256), 4),
        (
            product_key._pk_topk_fwd_kernel,
            dict(BLOCK_B=16, BLOCK_N=32, BLOCK_D=16, K_P=32, C_P=128),
            4,
        ),
    ]
    kernels += [
        (getattr(sparse_optim, f"_{op}_fwd_kernel"), rows_d, 4)
        for op in ("sgd", "adagrad", "rowwise_adagrad", "adam")
    ]
    kernels.append((sparse_optim._bag_bwd_adam_kernel, dict(BLOCK_P=8, BLOCK_D=256), 4))
    cuobjdump = os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"
    )
    failed = 0
    for fn, consts, warps in kernels:
        for dtype in ("fp32", "bf16"):
            try:
                src = ASTSource(fn=fn, signature=_signature(fn, dtype, consts), constexprs=consts)
                binary = triton.compile(
                    src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps)
                )
            except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
                failed += 1
                print(f"FAIL  {fn.__name__} {dtype}: {type(exc).__name__}: {str(exc)[:500]}")
                continue
            usage = ""
            if os.path.exists(cuobjdump):
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(binary.asm["cubin"])
                    f.flush()
                    out = subprocess.run(
                        [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True
                    ).stdout
                usage = " ".join(
                    w
                    for line in out.splitlines()
                    if "REG:" in line
                    for w in line.split()
                    if w.startswith(("REG:", "STACK:", "LOCAL:"))
                )
            print(f"ok    {fn.__name__:30s} {dtype}  {usage}")
    print(f"triton {triton.__version__}: {failed} kernel(s) failed to compile")
    return 1 if failed else 0


def store_sizes(a, dry_run: bool) -> argparse.Namespace:
    """Sizes of the store-level rows: the arguments, or tiny odd ones for a dry run."""
    if dry_run:
        return argparse.Namespace(
            tokens=9, heads=2, k=3, n=7, dim=41, dk=8, slots=6, rows=49, ray_rows=49, ray_tokens=9
        )
    return argparse.Namespace(
        tokens=a.tokens,
        heads=a.heads,
        k=a.k,
        n=a.n,
        dim=a.dim,
        dk=a.dk,
        slots=a.heads * a.k,
        rows=a.n * a.n,
        ray_rows=a.ray_rows,
        ray_tokens=a.ray_tokens,
    )


def dry_run(a) -> int:
    """The store-level rows at tiny sizes on CPU, through the Triton kernels in the
    interpreter: checks the script's logic and the kernels' results, not their speed."""
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["MEMSTORE_FORCE_TRITON"] = "1"
    from memstore.kernels import _dispatch

    started = time.perf_counter()
    run_store(store_sizes(a, dry_run=True), "cpu")
    used = sorted({path for (_, path) in _dispatch.COUNTS})
    print(
        f"\ndry run: paths taken in this process {used}; "
        f"{time.perf_counter() - started:.0f} s; timings are the interpreter's, not a GPU's"
    )
    return 0 if used == ["triton"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--dk", type=int, default=256)
    p.add_argument("--ray-rows", type=int, default=1 << 18, help="rows of the 2-shard Ray table")
    p.add_argument("--ray-tokens", type=int, default=4096, help="tokens of a Ray table round")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-store", action="store_true", help="skip the store-level rows")
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="compile every kernel for sm_90 and report registers/spills (no GPU needed)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU needed: the store-level rows at tiny sizes under the Triton "
        "interpreter (checks the script and the kernels, times nothing useful)",
    )
    a = p.parse_args(argv)
    if a.compile_only:
        return compile_report()
    if a.dry_run:
        return dry_run(a)
    tk = require_gpu()
    torch.manual_seed(0)
    started = time.perf_counter()
    ok = True if a.no_check else run_checks(tk)
    ceiling = copy_bandwidth()
    print_table(run_timings(tk, a, ceiling), ceiling, a)
    torch.cuda.empty_cache()
    if not a.no_store:
        run_store(store_sizes(a, dry_run=False), DEVICE)
    print(f"\ntotal {time.perf_counter() - started:.0f} s (including compiles)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
