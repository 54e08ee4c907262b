"""Store benchmark: one training round through the Ray table against the in-process table.

A round is what a trainer does per batch and memory layer: ``y = t.lookup(idx, w)``,
``dw = t.backward(idx, w, dy, step=s)``, ``t.step(s)``, at B = 2048 tokens, H·k = 128
slots per token (random rows, w = softmax of random scores, dy random), on a
1M × 256 float32 table with lazy Adam. It runs through

* ``memstore.ShardTable`` in this process (the baseline), and
* ``memstore.create_table`` with 1, 2 and 4 shards (``shards=N`` cuts column blocks
  first) and, unless ``--no-row-grids``, the (2, 1) and (4, 1) row grids, lookups and
  pushes over each shard's TCP data channel (the default), and 2 shards once more with
  ``data_channel="ray"`` (every call an actor call) for comparison, with the pushed slots
  grouped by row by each shard (the default) and once by the client for all shards.

Each Ray round is timed alternately with an in-process round on the same inputs, so
that drift in the machine (other tenants) hits both sides alike; the ratio is taken
within that pair of series. Wire bytes are the array payloads the handle sends
(indices, weights, offsets, dy slices) and gets back (y and dw parts) in one round,
counted from the arrays themselves, per token (the same arrays on either channel; the
channel adds a JSON header of about 150 B per call). Prints one markdown table.

    python -m benchmarks.store [--rounds 9] [--latency 200] [--no-row-grids]
                               [--only "2 shards" ...]
    python -m benchmarks.store --row-counting [--rounds 9]

``--row-counting`` measures what the per-row statistics cost instead: the same rounds
with counting on and off (``ShardTable.count_rows``, ``Table.set_row_counting``), on
the in-process table and a (2, 1) row grid, alternating on and off round by round so
that both see the same machine; its rows are added to benchmarks/results/store.json,
whose other figures, command and machine stay as they were.

Run it as a module from the repository root.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import memstore  # noqa: E402
from benchmarks._results import RESULTS, command_line, write_result  # noqa: E402

B, M, ROWS, DIM = 2048, 128, 1 << 20, 256
LR = 1e-3
TARGET_2_SHARDS = 0.8  # 2 shards at >= 0.8x the in-process throughput
BATCHES = 4  # distinct random batches, cycled, the same for both sides


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, ROWS, (B, M), generator=gen),
            torch.softmax(torch.randn(B, M, generator=gen), -1),
            torch.randn(B, DIM, generator=gen),
        )
        for _ in range(BATCHES)
    ]


class Round:
    """lookup + backward + step on one table; records the time of each part."""

    def __init__(self, table, batches):
        self.table = table
        self.batches = batches
        self.step = table.last_step
        self.parts: list[tuple[float, float, float]] = []

    def __call__(self, record: bool = True) -> None:
        idx, w, dy = self.batches[self.step % len(self.batches)]
        self.step += 1
        t0 = time.perf_counter()
        self.table.lookup(idx, w)
        t1 = time.perf_counter()
        self.table.backward(idx, w, dy, step=self.step)
        t2 = time.perf_counter()
        self.table.step(self.step)
        t3 = time.perf_counter()
        if record:
            self.parts.append((t1 - t0, t2 - t1, t3 - t2))

    def median_ms(self) -> tuple[float, float, float, float]:
        """Median (round, lookup, backward, step) in ms."""
        med = [1e3 * statistics.median(p[i] for p in self.parts) for i in range(3)]
        return 1e3 * statistics.median(sum(p[:3]) for p in self.parts), *med


def one_token_ms(table, iters: int) -> float:
    idx, w, _ = make_batches(seed=1)[0]
    idx, w = idx[:1].clone(), w[:1].clone()
    table.lookup(idx, w)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        table.lookup(idx, w)
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


# ---- wire accounting ---------------------------------------------------------------
def _payload(obj, seen: set | None = None) -> int:
    """Array bytes in ``obj``; an ObjectRef (an array put once for several shards) counts
    its array the first time it is seen."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (tuple, list)):
        return sum(_payload(o, seen) for o in obj)
    if isinstance(obj, ray.ObjectRef) and seen is not None:
        if obj in seen:
            return 0
        seen.add(obj)
        return _payload(ray.get(obj))
    return 0


class _CountingMethod:
    def __init__(self, method, log):
        self.method, self.log = method, log

    def remote(self, *args):
        ref = self.method.remote(*args)
        self.log["sent"] += _payload(args, self.log["seen"])
        self.log["refs"].append(ref)
        return ref


class _CountingShard:
    """Stands in for a shard's actor handle: counts the arrays of each call both ways."""

    def __init__(self, actor, log):
        self.actor, self.log = actor, log

    def __getattr__(self, name):
        return _CountingMethod(getattr(self.actor, name), self.log)


def wire_bytes(table, batches) -> tuple[float, float]:
    """(sent, received) array bytes per token of one untimed round through ``table``."""
    log = {"sent": 0, "refs": [], "seen": set()}
    real, addresses = table.shards, table._addresses
    table.shards = {block: _CountingShard(a, log) for block, a in real.items()}
    table._addresses = {block: None for block in real}  # every call through the counters
    try:
        Round(table, batches)(record=False)
    finally:
        table.shards, table._addresses = real, addresses
    received = sum(_payload(ray.get(ref)) for ref in log["refs"])
    return log["sent"] / B, received / B


def route_seconds(table, batch) -> float:
    """Seconds the handle spends routing one batch and slicing dy, done twice a round (lookup
    and backward each route; the slices are made once), plus grouping the pushed slots by
    row once for the column blocks (when the grid has several)."""
    idx, w, dy = batch
    start = time.perf_counter()
    for _ in range(2):
        routes = table.grid.route(idx, w)
        for route in routes:
            route.rows.numpy(), route.w.numpy(), route.offsets.numpy()
    table._grouped_slots(routes)
    for c in range(table.grid.shape[1]):
        dy[:, table.grid.col_bounds[c] : table.grid.col_bounds[c + 1]].contiguous()
    return time.perf_counter() - start


def shard_seconds(table) -> list[float]:
    return [s["lookup_s"] + s["backward_s"] + s["step_s"] for s in table.stats()["shards"]]


# ---- the run -----------------------------------------------------------------------
def bench_ray(label, shards, threads, channel, local_round, batches, args, bar) -> dict:
    name = "bench-store-" + "".join(ch for ch in label if ch.isalnum())
    try:
        memstore.drop_table(name)  # left over from an interrupted run
    except memstore.TableNotFound:
        pass
    bar.set_postfix_str(f"{label}: create")
    start = time.perf_counter()
    table = memstore.create_table(
        name,
        ROWS,
        DIM,
        shards=shards,
        optimizer=memstore.Adam(lr=LR),
        threads_per_shard=threads,
        data_channel=channel,
    )
    # Each shard groups its pushed slots by row, unless the label asks the client to group
    # them once for all column blocks (the comparison of what that saves).
    table._group_slots = "client groups" in label
    create_s = time.perf_counter() - start
    bar.update()
    try:
        remote = Round(table, batches)
        local_round.parts = []
        bar.set_postfix_str(f"{label}: rounds")
        for i in range(args.warmup + args.rounds):
            record = i >= args.warmup
            local_round(record)
            if record:
                before = shard_seconds(table)
            remote(record)
            if record:
                after = shard_seconds(table)
                batch = batches[(remote.step - 1) % len(batches)]
                remote.parts[-1] += (
                    max(a - b for a, b in zip(after, before)),
                    route_seconds(table, batch),
                )
            bar.update()
        bar.set_postfix_str(f"{label}: wire, latency")
        sent, received = wire_bytes(table, batches)
        latency = one_token_ms(table, args.latency)
        bar.update()
        rnd, lookup, backward, step = remote.median_ms()
        local = local_round.median_ms()[0]
        return {
            "label": label,
            "grid": table.grid.shape,
            "threads": threads,
            "round": rnd,
            "parts": (lookup, backward, step),
            "ratio": local / rnd,
            "local": local,
            "sent": sent,
            "received": received,
            "latency": latency,
            "create": create_s,
            "shard": 1e3 * statistics.median(p[3] for p in remote.parts),
            "route": 1e3 * statistics.median(p[4] for p in remote.parts),
            "rest": 1e3 * statistics.median(sum(p[:3]) - p[3] - p[4] for p in remote.parts),
        }
    finally:
        memstore.drop_table(name)
        del table
        gc.collect()


# ---- the cost of row counting ------------------------------------------------------
def counting_pair(make_table, switch, batches, args) -> dict:
    """Median round and step ms with row counting on and off on one table, the two
    alternating round by round; ``switch(table, on)`` turns counting on or off."""
    table = make_table()
    rounds = {True: Round(table, batches), False: Round(table, batches)}
    step = table.last_step
    for i in range(2 * (args.warmup + args.rounds)):
        on = i % 2 == 0
        switch(table, on)
        rnd = rounds[on]
        rnd.step = step  # one sequence of steps, whichever side takes it
        rnd(record=i >= 2 * args.warmup)
        step = rnd.step
    out = {}
    for on, rnd in rounds.items():
        total, _, _, step_ms = rnd.median_ms()
        out[on] = (total, step_ms)
    return out


def counting_ms(batches, repeats: int = 21) -> float:
    """Median ms of counting one step alone (``ShardTable._count_rows`` on the merged
    gradients of a round's push): the part of a step that counting adds, free of the
    noise of a whole round on a loaded machine."""
    table = memstore.ShardTable(ROWS, DIM, optimizer=memstore.Adam(lr=LR))
    idx, w, dy = batches[0]
    table.backward(idx, w, dy, step=1)
    grads = table._pending[1][0]
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        table._count_rows(grads)
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def bench_row_counting(args) -> None:
    """Row counting on against off, in process and on a (2, 1) grid; rows added to
    store.json beside its figures."""
    load_start = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    batches = make_batches()
    pairs = {
        "in-process ShardTable": counting_pair(
            lambda: memstore.ShardTable(ROWS, DIM, optimizer=memstore.Adam(lr=LR)),
            lambda t, on: setattr(t, "count_rows", on),
            batches,
            args,
        )
    }
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    name = "bench-store-row-counting"

    def make_grid():
        return memstore.create_table(
            name,
            ROWS,
            DIM,
            shards=(2, 1),
            optimizer=memstore.Adam(lr=LR),
            threads_per_shard=max(1, cores // 2),
        )

    try:
        pairs["Ray, (2,1) rows"] = counting_pair(
            make_grid, lambda t, on: t.set_row_counting(on), batches, args
        )
    finally:
        memstore.drop_table(name)
        ray.shutdown()
    count_ms = counting_ms(batches)
    load_end = os.getloadavg()[0]
    print(f"counting one step alone (in process): {count_ms:.2f} ms")
    print("| table | row counting | round ms | step ms | round cost of counting |")
    print("|---|---|---:|---:|---:|")
    figures = {}
    for label, pair in pairs.items():
        for on in (False, True):
            total, step_ms = pair[on]
            cost = pair[True][0] / pair[False][0] - 1
            print(
                f"| {label} | {'on' if on else 'off'} | {total:.0f} | {step_ms:.1f} | "
                f"{f'{100 * cost:+.1f}%' if on else ''} |"
            )
            figures[f"{label}, row counting {'on' if on else 'off'}"] = {
                "round ms": total,
                "step ms": step_ms,
                **({"counting cost %": 100 * cost} if on else {}),
            }
    figures["in-process ShardTable, counting one step alone"] = {"step ms": count_ms}
    print(f"1-min load average {load_start:.1f} at the start, {load_end:.1f} at the end")
    if ROWS == 1 << 20:
        add_to_store_results(figures, args, load_start, load_end)


def add_to_store_results(figures: dict, args, load_start: float, load_end: float) -> None:
    """The counting rows added to store.json through write_result, the file's own
    figures, date, command and machine kept; this run's command and load in its notes."""
    path = RESULTS / "store.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    kept = {k: v for k, v in old.get("figures", {}).items() if "counting" not in k}
    note = (
        f"Row counting rows: `{command_line('benchmarks.store')}`, "
        f"median of {args.rounds} rounds a side after {args.warmup} warm-up, counting on "
        f"and off alternating round by round on one table; 1-min load average "
        f"{load_start:.1f}–{load_end:.1f}; measured "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )
    notes = old.get("notes", "").split(" Row counting rows:")[0]
    write_result(
        "store",
        {**kept, **figures},
        old.get("command", command_line("benchmarks.store")),
        title=old.get("title", "Store round: Ray shards against in-process"),
        notes=f"{notes} {note}".strip(),
    )
    written = json.loads(path.read_text())
    for key in ("date", "machine", "source"):  # the main figures' own
        if key in old:
            written[key] = old[key]
    path.write_text(json.dumps(written, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per table")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--latency", type=int, default=200, help="1-token lookups timed")
    parser.add_argument("--no-row-grids", action="store_true", help="skip (2, 1) and (4, 1)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="LABEL",
        help='run only the tables of this label (e.g. "2 shards"); repeatable',
    )
    parser.add_argument(
        "--row-counting",
        action="store_true",
        help="measure row counting on against off instead (added to store.json)",
    )
    parser.add_argument("--rows", type=int, default=ROWS, help=argparse.SUPPRESS)  # smoke tests
    args = parser.parse_args()
    globals()["ROWS"] = args.rows
    if args.row_counting:
        bench_row_counting(args)
        return
    wall = time.perf_counter()
    load_start = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    # (label, shards, threads per shard, data channel): shards x threads <= cores where
    # integers allow
    half, quarter = max(1, cores // 2), max(1, cores // 4)
    configs = [
        ("1 shard", 1, cores, "socket"),
        ("2 shards", 2, half, "socket"),
        ("2 shards, all calls over Ray", 2, half, "ray"),
        ("2 shards, all calls over Ray, client groups", 2, half, "ray"),
        ("4 shards", 4, quarter, "socket"),
    ]
    if not args.no_row_grids:
        configs += [
            ("(2,1) rows", (2, 1), half, "socket"),
            ("(4,1) rows", (4, 1), quarter, "socket"),
        ]
    if args.only:
        configs = [c for c in configs if c[0] in args.only]
    # Ray places each shard in a bundle of threads_per_shard CPUs: a 4-shard grid on
    # fewer cores needs that many logical CPUs, or create_table waits for placement.
    ray_cpus = max(
        cores, max((s if isinstance(s, int) else s[0] * s[1]) * t for _, s, t, _ in configs)
    )
    # address="local": a fresh instance of our own, even when another job on this machine
    # has started a cluster that a bare ray.init() would join.
    ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False)
    batches = make_batches()
    steps_per_config = 1 + args.warmup + args.rounds + 1
    rows = []
    with tqdm(total=1 + len(configs) * steps_per_config, desc="store", unit="step") as bar:
        bar.set_postfix_str("in-process: create")
        start = time.perf_counter()
        local = memstore.ShardTable(ROWS, DIM, optimizer=memstore.Adam(lr=LR))
        local_create = time.perf_counter() - start
        local_round = Round(local, batches)
        for _ in range(args.warmup):
            local_round(record=False)
        local_latency = one_token_ms(local, args.latency)
        bar.update()
        all_local = []
        for label, shards, threads, channel in configs:
            rows.append(bench_ray(label, shards, threads, channel, local_round, batches, args, bar))
            all_local += local_round.parts
    local_round.parts = all_local
    local_ms, l_lookup, l_backward, l_step = local_round.median_ms()
    ray.shutdown()
    runtime = time.perf_counter() - wall

    print(
        f"\nmachine: {cores} CPU threads, {cpu_model()}, torch {torch.__version__}, "
        f"ray {ray.__version__}, python {platform.python_version()}; "
        f"ray.init(num_cpus={ray_cpus}); 1-min load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    print(f"command: python -m benchmarks.store {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"B={B} tokens, H·k={M} slots/token, {ROWS:,} x {DIM} float32, Adam (lazy), random "
        f"rows; median of {args.rounds} rounds after {args.warmup} warm-up, each Ray round "
        f"paired with an in-process round; runtime {runtime:.0f} s\n"
    )
    print(
        "| table (data channel: socket unless said) | grid (R, C) | threads/shard | "
        "tokens/s | vs in-process (paired "
        "in-process round ms) | wire B/token (sent + received) | 1-token lookup ms | "
        "round ms = lookup + backward + step | slowest shard compute ms | client routing ms "
        "| transport + rest ms | create s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    print(
        f"| in-process ShardTable | (1, 1) | {cores} (torch) | {B / local_ms * 1e3:,.0f} | "
        f"1.00× | 0 | {local_latency:.3f} | {local_ms:.0f} = {l_lookup:.0f} + "
        f"{l_backward:.0f} + {l_step:.0f} | {local_ms:.0f} | 0 | 0 | {local_create:.1f} |"
    )
    for r in rows:
        lookup, backward, step = r["parts"]
        target = ""
        if r["label"] == "2 shards":
            target = (
                " ✓" if r["ratio"] >= TARGET_2_SHARDS else f" ✗ target ≥ {TARGET_2_SHARDS:.2f}×"
            )
        print(
            f"| Ray, {r['label']} | {r['grid']} | {r['threads']} | "
            f"{B / r['round'] * 1e3:,.0f} | {r['ratio']:.2f}× ({r['local']:.0f}){target} | "
            f"{r['sent'] + r['received']:,.0f} ({r['sent']:,.0f} + {r['received']:,.0f}) | "
            f"{r['latency']:.3f} | {r['round']:.0f} = {lookup:.0f} + {backward:.0f} + "
            f"{step:.0f} | {r['shard']:.0f} | {r['route']:.0f} | {r['rest']:.0f} | "
            f"{r['create']:.1f} |"
        )
    print(
        "\nvs in-process: median in-process round / median Ray round, from the rounds "
        "paired with that table. Slowest shard compute: the shard's own lookup + "
        "backward + step timers (ShardTable stats), the largest over shards. Client "
        "routing: grid.route + dy slices, twice a round, and the pushed slots grouped "
        "by row once for column blocks. Transport + rest: the remainder "
        "(the data channel or Ray: serialization, scheduling; shard-side input checks and "
        "conversions, assembling the result). Shards beyond the cores share them (logical "
        "CPUs)."
    )
    figures = {
        f"Ray, {r['label']}, grid {r['grid']}": {
            "vs in-process": r["ratio"],
            "round ms": r["round"],
            "in-process round ms": r["local"],
            "slowest shard compute ms": r["shard"],
            "transport + rest ms": r["rest"],
            "tokens/s": B / r["round"] * 1e3,
        }
        for r in rows
    }
    if ROWS != 1 << 20:  # a smoke run at another size is not the page's benchmark
        return
    write_result(
        "store",
        figures,
        command_line("benchmarks.store"),
        title="Store round: Ray shards against in-process",
    )


if __name__ == "__main__":
    main()
