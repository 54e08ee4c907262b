"""Sizing on paper: the largest memory of the papers on 16 nodes, from measured figures.

    python -m benchmarks.sizing                       # prints docs/scaling.md
    python -m benchmarks.sizing --out docs/scaling.md

Nothing here runs a benchmark. Every input is in FIGURES below with its kind and its
source: "measured" figures come from this project's benchmark log (`git show
cfb8391:BENCHMARKS.md`, on the 2-core CPU VM named there), "spec" figures from
vendors' data sheets, "code" figures from what memstore sends and stores, and
"assumption" marks a choice of this sizing.
Change a figure when a new measurement lands and rerun; tests/cluster/test_sizing.py
fails while docs/scaling.md is not the output of this script.

The model, per memory layer and training step of T tokens, each token reading
slots = heads x k rows of a rows x dim table held by S = R x C shards (R row blocks,
C column blocks, as memstore.ShardGrid):

- wire: a lookup sends each shard the (row, weight) pairs of its row block (8 B each,
  every column block gets its own copy) plus 8 B of offsets per token and row block
  hit, and gets back dim/C float32 columns per token; backward sends the pairs again
  plus dy's columns, and gets back a float32 partial dw per pair and column block.
  A token hits E_R = R(1 - (1 - 1/R)^slots) row blocks.
- memory, per shard: the forward reads every pair's row slice, the backward reads it
  again for dw and gathers dy per pair into a row gradient, the optimizer reads and
  writes the U = rows(1 - exp(-T slots / rows)) unique rows touched (uniform random
  rows: skewed key usage touches fewer) with their state. Random-row reads run at the
  fraction of copy bandwidth that bag_forward reached, the backward and optimizer at
  the fraction that backward + lazy Adam reached, both measured on CPU.
- time: memory time of a shard, network time of a node's NIC, and two rounds of the
  data channel per step (lookup, backward). Fully overlapped, the step takes the
  largest; not at all, their sum. The largest is where it saturates first.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

GB = 1e9
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    kind: str  # measured | spec | code | assumption
    source: str


FIGURES = {
    # ---- measured: cfb8391:BENCHMARKS.md, 2-core AMD EPYC VM, torch 2.13 CPU --------
    "cpu_copy_gbs": Figure(
        28.8,
        "GB/s",
        "measured",
        "cfb8391:BENCHMARKS.md, Kernels run 1: large tensor copy, read + write "
        "(`python -m benchmarks.ops --repeats 7`)",
    ),
    "bag_forward_gbs": Figure(
        11.4,
        "GB/s",
        "measured",
        "cfb8391:BENCHMARKS.md, Kernels run 1: bag_forward, 262k random 1 KiB "
        "rows of a 1 GiB table, same run as the copy",
    ),
    "backward_optim_gbs": Figure(
        12.0,
        "GB/s",
        "measured",
        "cfb8391:BENCHMARKS.md, Kernels profile: fused lazy Adam over the touched "
        "rows, values + 2 moments read and written, 'about 12-13 GB/s' (lower end)",
    ),
    "channel_round_ms": Figure(
        0.76,
        "ms",
        "measured",
        "cfb8391:BENCHMARKS.md, Store: 1-token lookup over the data channel, 2 shards, "
        "slower of two runs (loopback, includes the shard's work)",
    ),
    # ---- spec sheets -------------------------------------------------------------------
    "h100_hbm_tbs": Figure(3.35, "TB/s", "spec", "NVIDIA H100 SXM5 data sheet: HBM3 bandwidth"),
    "h100_hbm_gb": Figure(80, "GB", "spec", "NVIDIA H100 SXM5 data sheet: HBM3 capacity"),
    "h200_hbm_tbs": Figure(4.8, "TB/s", "spec", "NVIDIA H200 SXM data sheet: HBM3e bandwidth"),
    "h200_hbm_gb": Figure(141, "GB", "spec", "NVIDIA H200 SXM data sheet: HBM3e capacity"),
    "host_dram_gbs": Figure(
        921.6,
        "GB/s",
        "spec",
        "2 x AMD EPYC 9004: 12 channels of DDR5-4800 per socket, 460.8 GB/s each",
    ),
    "host_dram_gb": Figure(1536, "GB", "assumption", "a host-memory node with 24 x 64 GB DIMMs"),
    "nic_gbps": Figure(
        400,
        "Gb/s",
        "spec",
        "one 400 Gb/s Ethernet NIC per node (e.g. ConnectX-7), peak per "
        "direction; the data channel is TCP, so this bounds it from above",
    ),
    # ---- the memory (the papers) and the training step ----------------------------------
    "rows": Figure(
        64 * 2**20,
        "rows",
        "assumption",
        "Memory Layers at Scale (Berges et al. 2024), largest memory: 64M keys "
        "(8192^2 product keys)",
    ),
    "dim": Figure(
        2048,
        "columns",
        "assumption",
        "value dimension: 64M x 2048 = 128B parameters, the papers' largest memory",
    ),
    "value_bytes": Figure(
        2, "B", "assumption", "bf16 values (memstore tables take dtype='bfloat16')"
    ),
    "slots": Figure(
        128, "rows/token", "assumption", "heads x k = 4 x 32, the PKM / Memory+ default"
    ),
    "tokens_per_step": Figure(
        2**20, "tokens", "assumption", "global batch: 8192 tokens per GPU on 128 GPUs"
    ),
    "gpus_per_node": Figure(8, "GPUs", "spec", "an 8-GPU HGX / p5.48xlarge node"),
    "nodes": Figure(16, "nodes", "assumption", "the cluster of the question"),
    # ---- what memstore sends and stores (memstore/table.py, grid.py, optim.py) --------
    "pair_bytes": Figure(8, "B", "code", "one (row, weight) pair: int32 row + float32 weight"),
    "offset_bytes": Figure(8, "B", "code", "offsets per token and row block hit"),
    "activation_bytes": Figure(
        4, "B", "code", "lookups return float32; dy and dw travel as float32"
    ),
    "state_bytes": Figure(
        4,
        "B",
        "code",
        "optimizer state is float32: Adam 2 per value, row-wise Adagrad 1 per row and column block",
    ),
}


def fig(name: str) -> float:
    return FIGURES[name].value


@dataclasses.dataclass(frozen=True)
class Deployment:
    name: str
    shards_per_node: int
    grid: tuple[int, int]
    shard_bandwidth: float  # bytes/s of the memory a shard's block lives in
    shard_capacity: float  # bytes of that memory
    colocated: bool  # trainers on the same nodes as the shards (else all traffic crosses)


def deployments() -> list[Deployment]:
    """One shard per GPU on GPU nodes, one shard per host-memory node."""
    gpus, nodes = int(fig("gpus_per_node")), int(fig("nodes"))
    return [
        Deployment(
            f"{nodes} x {gpus} H100 (HBM)",
            gpus,
            best_grid(nodes * gpus),
            fig("h100_hbm_tbs") * 1e12,
            fig("h100_hbm_gb") * GB,
            True,
        ),
        Deployment(
            f"{nodes} x {gpus} H200 (HBM)",
            gpus,
            best_grid(nodes * gpus),
            fig("h200_hbm_tbs") * 1e12,
            fig("h200_hbm_gb") * GB,
            True,
        ),
        Deployment(
            f"{nodes} host-memory nodes (DDR5)",
            1,
            best_grid(nodes),
            fig("host_dram_gbs") * GB,
            fig("host_dram_gb") * GB,
            False,
        ),
    ]


# ---- the arithmetic --------------------------------------------------------------------
def row_blocks_hit(R: int, slots: int) -> float:
    """Expected distinct row blocks among a token's slots (uniform random rows)."""
    return R * (1 - (1 - 1 / R) ** slots)


def wire_per_token(grid: tuple[int, int], slots: int, dim: int) -> dict[str, float]:
    """Bytes on the wire per token and memory layer, by direction and call."""
    R, C = grid
    hit = row_blocks_hit(R, slots)
    pairs = C * (slots * fig("pair_bytes") + hit * fig("offset_bytes"))
    act = fig("activation_bytes")
    parts = {
        "lookup_sent": pairs,
        "lookup_received": hit * dim * act,
        "backward_sent": pairs + hit * dim * act,
        "backward_received": C * slots * act,
    }
    parts["sent"] = parts["lookup_sent"] + parts["backward_sent"]
    parts["received"] = parts["lookup_received"] + parts["backward_received"]
    parts["total"] = parts["sent"] + parts["received"]
    return parts


def grids(shards: int) -> list[tuple[int, int]]:
    """The (R, C) grids of ``shards`` blocks that memstore accepts (>= 64 columns)."""
    dim = int(fig("dim"))
    return [(shards // c, c) for c in range(1, shards + 1) if shards % c == 0 and dim // c >= 64]


def best_grid(shards: int) -> tuple[int, int]:
    """The grid with the fewest bytes on the wire per token."""
    slots, dim = int(fig("slots")), int(fig("dim"))
    return min(grids(shards), key=lambda g: wire_per_token(g, slots, dim)["total"])


def unique_rows(rows: float, pairs: float) -> float:
    """Expected distinct rows among ``pairs`` uniform draws from ``rows``."""
    return rows * -math.expm1(-pairs / rows)


def bytes_per_shard(grid: tuple[int, int], optimizer: str) -> dict[str, float]:
    """Values and optimizer state of one block (the grid divides evenly here)."""
    R, C = grid
    rows, cols = fig("rows") / R, fig("dim") / C
    values = rows * cols * fig("value_bytes")
    per_value = {"adam": 2 * cols, "rowwise_adagrad": 1}[optimizer]
    state = rows * per_value * fig("state_bytes")
    return {"values": values, "state": state, "total": values + state}


def memory_seconds(d: Deployment, optimizer: str) -> dict[str, float]:
    """Per shard and step: bytes its memory moves, and the time at measured efficiency."""
    R, C = d.grid
    shards = R * C
    T, slots, dim = fig("tokens_per_step"), fig("slots"), fig("dim")
    vb, sb, act = fig("value_bytes"), fig("state_bytes"), fig("activation_bytes")
    pairs = T * slots / shards  # pairs per shard (every pair visits C shards, 1/C of a row)
    cols = dim / C
    touched = unique_rows(fig("rows"), T * slots) / R  # rows of one block touched
    read = pairs * cols * vb * 2  # forward and dw both read the row slice
    grads = pairs * cols * act + touched * cols * act  # dy gathered per pair, one row grad
    if optimizer == "adam":
        optim = touched * cols * (2 * vb + 4 * sb + act)  # values, 2 moments r/w, grad
    else:
        optim = touched * (cols * (2 * vb + act) + 2 * sb)  # values r/w, grad, row state
    fwd_eff = fig("bag_forward_gbs") / fig("cpu_copy_gbs")
    bwd_eff = fig("backward_optim_gbs") / fig("cpu_copy_gbs")
    seconds = read / (d.shard_bandwidth * fwd_eff) + (grads + optim) / (d.shard_bandwidth * bwd_eff)
    return {
        "bytes": read + grads + optim,
        "seconds": seconds,
        "pending_grads": touched * cols * act,
    }


def network_seconds(d: Deployment) -> dict[str, float]:
    """Bytes a node's NIC carries per step in its busier direction, and the time."""
    nodes = int(fig("nodes"))
    wire = wire_per_token(d.grid, int(fig("slots")), int(fig("dim")))
    T = fig("tokens_per_step")
    if d.colocated:  # each node sends and receives both kinds; 1/nodes stays on the node
        per_node = (wire["sent"] + wire["received"]) * T / nodes * (1 - 1 / nodes)
    else:  # trainers elsewhere: a memory node takes the sent bytes in, the received out
        per_node = max(wire["sent"], wire["received"]) * T / nodes
    return {"bytes": per_node, "seconds": per_node / (fig("nic_gbps") * 1e9 / 8)}


def size(d: Deployment, optimizer: str) -> dict:
    shard = bytes_per_shard(d.grid, optimizer)
    memory = memory_seconds(d, optimizer)
    network = network_seconds(d)
    latency = 2 * fig("channel_round_ms") / 1e3
    wire = wire_per_token(d.grid, int(fig("slots")), int(fig("dim")))
    parts = {"memory": memory["seconds"], "network": network["seconds"], "latency": latency}
    resident = shard["total"] + memory["pending_grads"]
    return {
        "deployment": d,
        "optimizer": optimizer,
        "shard": shard,
        "resident": resident,
        "fits": resident <= d.shard_capacity,
        "wire": wire,
        "wire_step": wire["total"] * fig("tokens_per_step"),
        "memory": memory,
        "network": network,
        "parts": parts,
        "overlapped": max(parts.values()),
        "serial": sum(parts.values()),
        "first": max(parts, key=parts.get),
    }


# ---- the document ----------------------------------------------------------------------
def _inputs_table() -> list[str]:
    lines = ["| input | value | kind | source |", "|---|---:|---|---|"]
    for name, f in FIGURES.items():
        value = f"{f.value:,.6g}" if f.value < 1e6 else f"{f.value:,.0f}"
        lines.append(f"| `{name}` | {value} {f.unit} | {f.kind} | {f.source} |")
    return lines


def _results_table(results: list[dict]) -> list[str]:
    lines = [
        "| deployment | optimizer | grid (R, C) "
        "| per shard: values + state (+ pending grads) | fits | wire B/token "
        "| wire GB/step (all) | NIC GB/step (node) | memory ms | network ms | channel ms "
        "| step ms, overlapped / serial | saturates first |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        d, s = r["deployment"], r["shard"]
        per_shard = (
            f"{s['values'] / GIB:,.2f} + {s['state'] / GIB:,.2f} "
            f"(+ {r['memory']['pending_grads'] / GIB:,.2f}) GiB "
            f"of {d.shard_capacity / GB:,.0f} GB"
        )
        lines.append(
            f"| {d.name} | {r['optimizer']} | {d.grid} | {per_shard} | "
            f"{'yes' if r['fits'] else 'NO'} | {r['wire']['total']:,.0f} | "
            f"{r['wire_step'] / GB:,.1f} | {r['network']['bytes'] / GB:,.2f} | "
            f"{r['parts']['memory'] * 1e3:,.1f} | {r['parts']['network'] * 1e3:,.1f} | "
            f"{r['parts']['latency'] * 1e3:,.2f} | {r['overlapped'] * 1e3:,.1f} / "
            f"{r['serial'] * 1e3:,.1f} | {r['first']} |"
        )
    return lines


def _grid_table(shards: int) -> list[str]:
    slots, dim = int(fig("slots")), int(fig("dim"))
    lines = [
        (
            f"| grid for {shards} shards | row blocks hit per token | wire B/token | "
            "of which dim-sized (y, dy) |"
        ),
        "|---|---:|---:|---:|",
    ]
    for R, C in sorted(grids(shards)):
        wire = wire_per_token((R, C), slots, dim)
        dense = wire["lookup_received"] + (wire["backward_sent"] - wire["lookup_sent"])
        lines.append(
            f"| ({R}, {C}) | {row_blocks_hit(R, slots):.1f} | {wire['total']:,.0f} | {dense:,.0f} |"
        )
    return lines


def _findings(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        d, p = r["deployment"], r["parts"]
        out.append(
            f"- **{d.name}, {r['optimizer']}**: {r['resident'] / GB:,.1f} GB per shard "
            f"({'fits' if r['fits'] else 'does NOT fit'} in {d.shard_capacity / GB:,.0f} GB); "
            f"the store's share of a step is {r['overlapped'] * 1e3:,.1f}-"
            f"{r['serial'] * 1e3:,.1f} ms, {r['first']}-bound "
            f"(memory {p['memory'] * 1e3:,.1f} ms, network {p['network'] * 1e3:,.1f} ms)."
        )
    return out


def _advice(results: list[dict]) -> list[str]:
    """What saturates first in each deployment, from the computed parts."""
    out = []
    for d in deployments():
        rows = [r for r in results if r["deployment"] == d]
        first = " and ".join(sorted({r["first"] for r in rows}))
        ratios = sorted(r["parts"]["network"] / r["parts"]["memory"] for r in rows)
        out.append(
            f"- **{d.name}**: {first} first; the network takes {ratios[0]:,.2g}-"
            f"{ratios[-1]:,.2g}x the memory time (both optimizers)."
        )
        if "network" in first:
            out.append(
                f"  Each token moves {rows[0]['wire']['total'] / 1e3:,.0f} KB over "
                "TCP. What would move it: y, dy and dw as bf16 instead of float32 "
                "(about half the dim-sized bytes), a transport over the nodes' RDMA "
                "fabric, or trainers placed next to the row blocks their tokens hit."
            )
        if "memory" in first:
            touched = unique_rows(fig("rows"), fig("tokens_per_step") * fig("slots"))
            out.append(
                f"  Each step touches {touched / fig('rows'):.0%} of the rows "
                "(uniform random rows; skewed key usage touches fewer), and their "
                "read-modify-write with the row gradients and optimizer state "
                "dominates. What would move it: more host-memory nodes (fewer rows "
                "each), row-wise Adagrad instead of Adam, or fewer tokens per step."
            )
    latency = 2 * fig("channel_round_ms")
    out.append(
        f"- The data channel's two rounds per step add {latency:.2f} ms (measured on "
        "loopback, the shard's work included); they matter only for small steps."
    )
    return out


def render() -> str:
    results = [size(d, opt) for d in deployments() for opt in ("rowwise_adagrad", "adam")]
    T, slots, dim = fig("tokens_per_step"), int(fig("slots")), int(fig("dim"))
    total = fig("rows") * dim
    lines = [
        "# Sizing the store for the largest memory of the papers",
        "",
        (
            "Generated by `python -m benchmarks.sizing --out docs/scaling.md` from the inputs "
            "below; edit the inputs in `benchmarks/sizing.py`, not this file. The method and "
            "its formulas are in the script's docstring."
        ),
        "",
        (
            f"The memory: {fig('rows'):,.0f} rows x {dim} = {total / 1e9:,.1f}B values, "
            f"{total * fig('value_bytes') / GIB:,.0f} GiB in bf16; Adam's two float32 moments "
            f"add {total * 8 / GIB:,.0f} GiB, row-wise Adagrad's one float per row and column "
            f"block {fig('rows') * 4 / GIB:,.2f} GiB per column block. A step is {T:,.0f} "
            f"tokens reading {slots} rows each from one memory layer."
        ),
        "",
        "## Inputs",
        "",
        (
            "Measured figures come from this project's benchmarks on a 2-core CPU VM; no GPU "
            "figure has been measured (docs/benchmarks.md), so GPU rows apply the CPU-measured "
            "fraction of copy bandwidth to the HBM bandwidth of the data sheet. Treat the "
            "GPU times as estimates until `benchmarks/gpu.py` gives a measured fraction."
        ),
        "",
        *_inputs_table(),
        "",
        "## The table",
        "",
        (
            "Per shard: the block's values and optimizer state, and the float32 row gradients "
            "that pend between a step's pushes and its update (one per touched row). "
            "Wire: both directions, lookup and backward. NIC: the busier direction of one "
            "node. Step: the store's share only (the dense model's compute is not in it); "
            "'overlapped' assumes memory, network and channel rounds overlap fully, 'serial' "
            "not at all."
        ),
        "",
        *_results_table(results),
        "",
        *_findings(results),
        "",
        "## Choosing the grid",
        "",
        (
            "Column blocks repeat the (row, weight) pairs, 8 B per slot, to every column "
            "block; row blocks repeat the dim-sized output and dy, 4 B per column, to every "
            f"row block a token hits, and with {slots} random rows a token hits almost every "
            "row block. Each deployment above uses the grid with the fewest bytes per token "
            "among those memstore accepts (at least 64 columns per block):"
        ),
        "",
        *_grid_table(int(fig("nodes")) * int(fig("gpus_per_node"))),
        "",
        *_grid_table(int(fig("nodes"))),
        "",
        "## Where it saturates and what would move it",
        "",
        *_advice(results),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown here instead of stdout")
    ns = parser.parse_args(argv)
    text = render()
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
