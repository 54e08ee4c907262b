"""Data-channel benchmark: ZeroMQ against the earlier hand-written TCP channel.

Two measurements, each side by side in one run:

* **transport**: one client calling one server process with a trivial handler, on the
  payloads of a lookup (rows int64 + weights float32 + offsets in, a (B, dim) float32 y
  out) at two sizes. The baseline is the hand-written socket channel as it was at
  ``--baseline-ref`` (read from git, never imported from the tree); the candidates are
  the tree's ZeroMQ channel with PLAIN authentication (the default on loopback) and
  with CURVE encryption (the default wherever the channel leaves the host). Reports the
  median round trip and the client's CPU per call; ``--transports`` picks some of them.
* **train step** (``--train-trees BASE CAND``): ``benchmarks.train_step``'s data-channel
  setting (a 2-shard store, 2 Ray workers, step on last push) run from two source trees
  in turn, ``--passes`` times: the median ms per step of each.

    python -m benchmarks.channel [--calls 400] [--baseline-ref REF] [--transports plain curve]
    python -m benchmarks.channel --train-trees /tmp/base /tmp/cand [--steps 150 --passes 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import multiprocessing as mp  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks._results import command_line, write_result  # noqa: E402
from benchmarks.train_step import step_ms  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASELINE_REF = "5981334"  # the last commit with the hand-written socket channel
# (batch rows B, pairs per row M, dim): ~133 KB and ~1 MB of request plus reply.
PAYLOADS = {"133 KB": (256, 32, 64), "1 MB": (512, 64, 256)}
TRAIN_SETTING = ("facts-small-memory.yaml", [])


def baseline_module(ref: str):
    """The hand-written channel of commit ``ref``, loaded from git as a module of the
    memstore._internal package (its relative imports resolve against the tree)."""
    source = subprocess.run(
        ["git", "show", f"{ref}:memstore/_internal/data_channel.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = "memstore._internal._baseline_data_channel"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__package__ = "memstore._internal"
    exec(compile(source, f"{ref}:data_channel.py", "exec"), module.__dict__)  # noqa: S102
    return module


def settings():
    from memstore._internal.data_channel import ChannelSettings, table_caps

    caps = table_caps(max_batch=1024, max_pairs=1 << 16, cols=256)
    secret = "b" * 64
    return {
        "zmq PLAIN": ChannelSettings(secret, caps, encrypt=False),
        "zmq CURVE": ChannelSettings(secret, caps, encrypt=True),
    }


def make_handler(out: np.ndarray):
    def lookup(rows, w, offsets):
        return "inc", out

    return lookup


def serve(kind: str, ref: str, conn) -> None:
    """Server process: one channel server whose lookup answers with a fixed y."""
    outs = {n: np.ones((b, d), np.float32) for n, (b, _, d) in PAYLOADS.items()}
    handlers = {f"lookup-{n}": make_handler(o) for n, o in outs.items()}
    if kind == "socket (hand-written)":
        server = baseline_module(ref).DataServer("127.0.0.1", handlers)
    else:
        from memstore._internal.data_channel import DataServer, OpCaps

        base = settings()[kind]
        caps = {
            op: OpCaps(base.caps["lookup"].arrays, base.caps["lookup"].reply) for op in handlers
        }
        server = DataServer("127.0.0.1", handlers, type(base)(base.secret, caps, base.encrypt))
    conn.send(server.address)
    conn.recv()  # until the parent is done
    server.close()


def client_for(kind: str, ref: str):
    if kind == "socket (hand-written)":
        return baseline_module(ref).DataClient(30)
    from memstore._internal.data_channel import DataClient, OpCaps

    base = settings()[kind]
    caps = {
        f"lookup-{n}": OpCaps(base.caps["lookup"].arrays, base.caps["lookup"].reply)
        for n in PAYLOADS
    }
    return DataClient(30, type(base)(base.secret, caps, base.encrypt))


def time_transport(kind: str, ref: str, calls: int) -> dict:
    """{payload: (median ms per round trip, client CPU ms per call)} for one transport."""
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=serve, args=(kind, ref, child), daemon=True)
    proc.start()
    address = parent.recv()
    client = client_for(kind, ref)
    rng = np.random.default_rng(0)
    out = {}
    for name, (b, m, _) in PAYLOADS.items():
        arrays = (
            rng.integers(0, 1 << 20, b * m),
            rng.random(b * m, dtype=np.float32),
            np.arange(b + 1, dtype=np.int64) * m,
        )
        request = {0: (address, f"lookup-{name}", arrays, ())}
        for _ in range(20):
            client.call_all(request)
        seconds, cpu0 = [], time.process_time()
        for _ in range(calls):
            t0 = time.perf_counter()
            client.call_all(request)
            seconds.append(time.perf_counter() - t0)
        out[name] = (1e3 * statistics.median(seconds), 1e3 * (time.process_time() - cpu0) / calls)
    client.close()
    parent.send("done")
    proc.join(timeout=30)
    return out


TRANSPORTS = {"socket": "socket (hand-written)", "plain": "zmq PLAIN", "curve": "zmq CURVE"}


def transport_table(ref: str, calls: int, rounds: int, kinds: list[str]) -> dict:
    """Print the table of ``kinds`` and return it as {"kind, payload": {column: value}}."""
    runs = {k: [] for k in kinds}
    for _ in range(rounds):  # interleaved, so drift of the machine hits every transport
        for kind in kinds:
            runs[kind].append(time_transport(kind, ref, calls))
    base = {n: statistics.median(r[n][0] for r in runs[kinds[0]]) for n in PAYLOADS}
    print(
        f"\n| transport ({rounds} rounds x {calls} calls) | payload | median round trip ms "
        f"| client CPU ms / call | vs {kinds[0]} |"
    )
    print("|---|---|---:|---:|---:|")
    figures = {}
    for kind in kinds:
        for name in PAYLOADS:
            ms = statistics.median(r[name][0] for r in runs[kind])
            cpu = statistics.median(r[name][1] for r in runs[kind])
            print(f"| {kind} | {name} | {ms:.3f} | {cpu:.3f} | {ms / base[name]:.2f}x |")
            figures[f"{kind}, {name}"] = {
                "median round trip ms": ms,
                "client CPU ms / call": cpu,
                f"vs {kinds[0]}": ms / base[name],
            }
    return figures


def train_table(trees: list[Path], steps: int, passes: int) -> None:
    config, overrides = TRAIN_SETTING
    samples = {str(t): [] for t in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(passes):
            for i, tree in enumerate(trees):
                samples[str(tree)].append(
                    step_ms(config, overrides, steps, Path(tmp) / f"{p}-{i}", root=tree)
                )
    base = samples[str(trees[0])]
    print(
        f"\n| source tree (train step: 2-shard store, 2 Ray workers, step on last push) "
        f"| ms / step, median of {passes} | fastest run | runs | vs first (median, fastest) |"
    )
    print("|---|---:|---:|---|---:|")
    for tree, values in samples.items():
        ms, best = statistics.median(values), min(values)
        print(
            f"| {tree} | {ms:.1f} | {best:.1f} | {', '.join(f'{v:.1f}' for v in values)} "
            f"| {ms / statistics.median(base):.3f}x, {best / min(base):.3f}x |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.channel", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--calls", type=int, default=400, help="timed calls per payload")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument(
        "--transports",
        nargs="+",
        choices=list(TRANSPORTS),
        default=list(TRANSPORTS),
        help="transports to time; the first is the one the others are compared with",
    )
    parser.add_argument("--train-trees", nargs=2, type=Path, metavar=("BASE", "CAND"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--passes", type=int, default=3)
    ns = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPU threads; 1-min load average {os.getloadavg()[0]:.1f}")
    print(f"command: python -m benchmarks.channel {' '.join(sys.argv[1:])}".rstrip())
    if ns.train_trees:
        # Two source trees given on the command line: not a figure of this tree.
        train_table(ns.train_trees, ns.steps, ns.passes)
        return 0
    kinds = [TRANSPORTS[t] for t in ns.transports]
    figures = transport_table(ns.baseline_ref, ns.calls, ns.rounds, kinds)
    if len(kinds) < 2:  # nothing to compare with: not the page's table
        print("one transport only: not written to benchmarks/results")
        return 0
    write_result(
        "channel",
        figures,
        command_line("benchmarks.channel"),
        title=f"Data channel: {', '.join(kinds[1:])} against {kinds[0]}",
        notes=(
            f"One client, one server process with a trivial handler, lookup-shaped "
            f"payloads; median of {ns.rounds} interleaved rounds of {ns.calls} calls. "
            f'"vs {kinds[0]}" is the round trip\'s ratio (higher: slower).'
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
