"""The compute ceiling of a column grid: its blocks in separate processes, no transport.

A table cut into C column blocks runs each block in its own shard process on one
thread, and every call waits for all blocks, so the blocks run the same phase (lookup,
backward, step) at the same moment. This script measures what that costs before any
transport: the same round as ``benchmarks.store`` (B = 2048 tokens, 128 slots, 1M × 256
float32, lazy Adam) through

* one in-process ``memstore.ShardTable`` on all cores (the baseline), and
* C ``ShardTable`` column blocks, each in its own process on one thread, fed the inputs
  a shard receives (the handle's route of the pairs, dy's column slice, values checked),
  once with each phase started together by a barrier (as a table's calls start them)
  and once free-running (each block at its own pace).

Each round of the blocks follows an in-process round on the same batch, one side at a
time, so that drift in the machine hits both alike. The aligned round is the sum over
phases of the slowest block's phase; the free-running round is the slowest block's
median round. Prints one markdown table.

    python -m benchmarks.column_blocks [--blocks 2] [--rounds 11]
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import torch
from tqdm import tqdm

import memstore
from benchmarks._results import command_line, write_result
from benchmarks.store import DIM, LR, ROWS, B, M, Round, cpu_model, make_batches
from memstore.grid import ShardGrid

WARMUP = 3


def _shard_inputs(grid: ShardGrid, c: int) -> list[tuple]:
    """Each batch as column block ``c`` receives it: the handle's route of the pairs
    and its slice of dy."""
    c0, c1 = grid.col_bounds[c], grid.col_bounds[c + 1]
    inputs = []
    for idx, w, dy in make_batches():
        (route,) = grid.route(idx, w)
        inputs.append((route.rows, route.w, route.offsets, dy[:, c0:c1].contiguous()))
    return inputs


def _block_worker(grid, c, first_batch, rounds, aligned, gates, results) -> None:
    """Column block ``c`` of ``grid`` on one thread, from batch ``first_batch`` on (the
    in-process side's next). Each round starts when the parent opens ``gates["start"]``
    and ends at ``gates["end"]``; ``aligned``: every phase starts together across blocks
    (``gates["phase"]``)."""
    torch.set_num_threads(1)
    spec = grid.block(0, c)
    table = memstore.ShardTable(
        ROWS,
        DIM,
        optimizer=memstore.Adam(lr=LR),
        col_range=(spec.col_start, spec.col_stop),
    )
    inputs = _shard_inputs(grid, c)
    phases = []
    for i in range(WARMUP + rounds):
        rows, w, offsets, dy = inputs[(first_batch + i) % len(inputs)]
        calls = (
            functools.partial(table.lookup_csr, rows, w, offsets, checked=True),
            functools.partial(table.backward_csr, rows, w, offsets, dy, step=i + 1, checked=True),
            functools.partial(table.step, i + 1),
        )
        gates["start"].wait()
        times = []
        for call in calls:
            if aligned:
                gates["phase"].wait()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        gates["end"].wait()
        if i >= WARMUP:
            phases.append(times)
    results.put(phases)


def run_paired(blocks: int, rounds: int, aligned: bool, local: Round) -> dict:
    """Rounds of the column blocks, each after a round of ``local`` (the in-process
    table) on the same batch; only one side runs at a time. Returns the medians (ms)
    of both sides: the blocks' round is the sum over phases of the slowest block's
    phase when aligned, else the slowest block's round."""
    ctx = mp.get_context("spawn")
    gates = {
        "start": ctx.Barrier(blocks + 1),
        "end": ctx.Barrier(blocks + 1),
        "phase": ctx.Barrier(blocks),
    }
    results = ctx.Queue()
    grid = ShardGrid.make(ROWS, DIM, (1, blocks))
    procs = [
        ctx.Process(
            target=_block_worker,
            args=(grid, c, local.step, rounds, aligned, gates, results),
        )
        for c in range(blocks)
    ]
    for p in procs:
        p.start()
    local.parts = []
    for i in range(WARMUP + rounds):
        local(record=i >= WARMUP)
        gates["start"].wait()
        gates["end"].wait()
    per_block = [results.get() for _ in procs]
    for p in procs:
        p.join()
    if aligned:
        slowest = [[max(b[r][k] for b in per_block) for k in range(3)] for r in range(rounds)]
    else:
        slowest = max(per_block, key=lambda b: statistics.median(sum(p) for p in b))
    return {
        "local": local.median_ms(),
        "blocks": (
            1e3 * statistics.median(sum(p) for p in slowest),
            *(1e3 * statistics.median(p[k] for p in slowest) for k in range(3)),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="column blocks (processes)")
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds per series")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    local = Round(memstore.ShardTable(ROWS, DIM, optimizer=memstore.Adam(lr=LR)), make_batches())
    series = {}
    for aligned in tqdm((True, False), desc="column blocks", unit="series"):
        series[aligned] = run_paired(args.blocks, args.rounds, aligned, local)
    print(
        f"\nmachine: {cores} CPU threads, {cpu_model()}, torch {torch.__version__}, "
        f"python {platform.python_version()}"
    )
    print(f"command: python -m benchmarks.column_blocks {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"B={B} tokens, {M} slots/token, {ROWS:,} x {DIM} float32, Adam (lazy); median of "
        f"{args.rounds} rounds after {WARMUP} warm-up, each paired with an in-process round\n"
    )
    print(
        "| column blocks, 1 thread each | round ms = lookup + backward + step | "
        f"paired in-process round ms ({cores} threads) | vs in-process |"
    )
    print("|---|---|---|---:|")
    for aligned, label in ((True, "phases aligned"), (False, "free-running")):
        blocks, local_ms = series[aligned]["blocks"], series[aligned]["local"]
        print(
            f"| {args.blocks}, {label} | {blocks[0]:.0f} = {blocks[1]:.0f} + {blocks[2]:.0f} + "
            f"{blocks[3]:.0f} | {local_ms[0]:.0f} = {local_ms[1]:.0f} + {local_ms[2]:.0f} + "
            f"{local_ms[3]:.0f} | {local_ms[0] / blocks[0]:.2f}× |"
        )
    figures = {}
    for aligned, label in ((True, "phases aligned"), (False, "free-running")):
        blocks, local_ms = series[aligned]["blocks"], series[aligned]["local"]
        figures[f"{args.blocks} blocks, {label}"] = {
            "round ms": blocks[0],
            "lookup ms": blocks[1],
            "backward ms": blocks[2],
            "step ms": blocks[3],
            "paired in-process round ms": local_ms[0],
            "vs in-process": local_ms[0] / blocks[0],
        }
    write_result(
        "column_blocks",
        figures,
        command_line("benchmarks.column_blocks"),
        title="Store round: the column grid's compute ceiling",
    )


if __name__ == "__main__":
    main()
