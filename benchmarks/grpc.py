"""gRPC benchmark: Lookup throughput of 1, 4 and 16 concurrent gRPC clients against the
same lookups through the Ray table handle in one process, and Query latency.

A table of 65,536 rows × 128 float32 (2 row shards, lookups over each shard's data
channel) serves lookups of B = 256 tokens × M = 32 slots (random rows, random
weights). The server is `memstore serve` in its own process; each gRPC client is a
process of its own (no shared GIL) running lookups back to back for --seconds. The
baseline is one process calling ``table.lookup`` on the Ray handle for the same
time, measured right before each gRPC row, so drift of the shared machine hits both.
Bytes are the arrays' payload per lookup: idx (int64) and w (float32) in, y out.

Query latency: one client, --queries sequential calls of 1 and of 256 query
vectors (H = 4 heads, Dk = 64, k = 32, values returned), p50 and p99, beside the
same queries through ``table.query`` on the Ray handle in this process.

    python -m benchmarks.grpc [--seconds 3] [--queries 300] [--query-only]

Prints one markdown table.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks._results import command_line, write_result  # noqa: E402

N_KEYS, DIM, B, M, HEADS, DK, K = 256, 128, 256, 32, 4, 64, 32
ROWS = N_KEYS * N_KEYS
TABLE = "bench-grpc"
BYTES_PER_LOOKUP = B * M * (8 + 4) + B * DIM * 4


def _batches(seed: int, count: int = 8):
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, ROWS, (B, M)), rng.random((B, M), dtype=np.float32)) for _ in range(count)
    ]


def _grpc_worker(address: str, token: str, seconds: float, seed: int, start, out) -> None:
    from memstore.client import MemoryClient

    batches = _batches(seed)
    with MemoryClient(address, token=token) as client:
        client.lookup(TABLE, *batches[0])  # connect and learn the table's dim
        start.wait()
        done, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            client.lookup(TABLE, *batches[done % len(batches)])
            done += 1
    out.put(done)


def grpc_rate(address: str, token: str, clients: int, seconds: float) -> float:
    """Lookups per second of ``clients`` processes together."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_grpc_worker, args=(address, token, seconds, i, start, out))
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    time.sleep(2.0 + 0.2 * clients)  # every client connected before the clock starts
    start.set()
    total = sum(out.get(timeout=120 + seconds) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def handle_rate(table, seconds: float) -> float:
    import torch

    batches = [(torch.from_numpy(i), torch.from_numpy(w)) for i, w in _batches(99)]
    table.lookup(*batches[0])
    done, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        table.lookup(*batches[done % len(batches)])
        done += 1
    return done / seconds


def _percentiles(call, qs: list, count: int) -> tuple[float, float]:
    times = []
    for i in range(count + 10):
        t0 = time.perf_counter()
        call(qs[i % len(qs)])
        if i >= 10:  # warm-up calls not counted
            times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def query_latency(address: str, token: str, table, batch: int, count: int) -> tuple:
    """(p50, p99) in ms of Query over gRPC, then of table.query on the Ray handle."""
    import torch

    from memstore.client import MemoryClient

    rng = np.random.default_rng(batch)
    qs = [rng.standard_normal((batch, HEADS, DK)).astype(np.float32) for _ in range(16)]
    with MemoryClient(address, token=token) as client:
        remote = _percentiles(lambda q: client.query(TABLE, q, k=K), qs, count)
    local = _percentiles(lambda q: table.query(torch.from_numpy(q), k=K), qs, count)
    return remote, local


def start_server(gcs: str, token_file: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memstore.cli",
            "serve",
            "--address",
            "127.0.0.1:0",
            "--ray-address",
            gcs,
            "--token-file",
            token_file,
            "--threads",
            "16",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    match = re.search(r"serving on (\S+);", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"memstore serve did not start: {line!r}")
    return proc, match.group(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--query-only", action="store_true", help="skip the Lookup rates")
    ns = parser.parse_args(argv)
    import ray
    import torch

    import memstore

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    load_start = os.getloadavg()[0]
    table = memstore.create_table(TABLE, ROWS, DIM, shards=(2, 1), seed=0)
    table.publish_keys(torch.randn(HEADS, 2, N_KEYS, DK // 2))
    token = "bench-" + os.urandom(16).hex()
    with tempfile.TemporaryDirectory() as d:
        token_file = os.path.join(d, "tokens")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, f"{token} read\n".encode())
        os.close(fd)
        server, address = start_server(ray.get_runtime_context().gcs_address, token_file)
    try:
        rows = []
        for clients in () if ns.query_only else (1, 4, 16):
            base = handle_rate(table, ns.seconds)
            rate = grpc_rate(address, token, clients, ns.seconds)
            rows.append((clients, rate, base))
        latency = {b: query_latency(address, token, table, b, ns.queries) for b in (1, 256)}
    finally:
        server.terminate()
        server.wait(timeout=60)
        memstore.drop_table(TABLE)
    _report(rows, latency, load_start)
    if ns.query_only:  # without the Lookup rows the page's table would be incomplete
        print("--query-only: not written to benchmarks/results")
        return 0
    _write_result(rows, latency, ns.queries)
    return 0


def _write_result(rows, latency, queries: int) -> None:
    """benchmarks/results/grpc.json from the Lookup rates and the Query latencies."""
    figures = {
        f"Lookup, {clients} client{'s' if clients > 1 else ''}": {
            "gRPC tokens/s": rate * B,
            "Ray handle tokens/s": base * B,
            "gRPC / handle": rate / base,
        }
        for clients, rate, base in rows
    }
    for batch, ((p50, p99), (h50, h99)) in latency.items():
        figures[f"Query, {batch} vector{'s' if batch > 1 else ''}"] = {
            "gRPC p50 ms": p50,
            "gRPC p99 ms": p99,
            "handle p50 ms": h50,
            "handle p99 ms": h99,
        }
    write_result(
        "grpc",
        figures,
        command_line("benchmarks.grpc"),
        title="gRPC: memstore serve against the Ray handle",
        notes=(
            f"Lookups of {B} tokens × {M} slots on a {ROWS:,} × {DIM} float32 table, 2 "
            f"shards; each gRPC client is a process of its own. Query: H = {HEADS}, "
            f"Dk = {DK}, k = {K}, values returned, {queries} calls."
        ),
    )


def _report(rows, latency, load_start: float) -> None:
    mb = BYTES_PER_LOOKUP / 1e6
    print(
        f"Lookup of {B} tokens x {M} slots on a {ROWS:,} x {DIM} float32 table, 2 shards; "
        f"{BYTES_PER_LOOKUP / 1e3:.0f} kB per lookup\n"
    )
    print("| gRPC clients | gRPC tokens/s | gRPC MB/s | Ray handle tokens/s (1 process) | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for clients, rate, base in rows:
        print(
            f"| {clients} | {rate * B:,.0f} | {rate * mb:,.1f} | {base * B:,.0f} | "
            f"{rate / base:.2f} |"
        )
    print(
        "\n| Query (H=4, Dk=64, k=32, values) | gRPC p50 ms | gRPC p99 ms | "
        "Ray handle p50 ms | Ray handle p99 ms |\n|---|---:|---:|---:|---:|"
    )
    for batch, ((p50, p99), (h50, h99)) in latency.items():
        print(
            f"| {batch} vector{'s' if batch > 1 else ''} | {p50:.2f} | {p99:.2f} | "
            f"{h50:.2f} | {h99:.2f} |"
        )
    import grpc
    import ray

    from benchmarks.store import cpu_model

    print(
        f"\nmachine: {os.cpu_count()} CPU threads, {cpu_model()}, "
        f"python {platform.python_version()}, grpcio {grpc.__version__}, ray {ray.__version__}; "
        f"1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    sys.exit(main())
