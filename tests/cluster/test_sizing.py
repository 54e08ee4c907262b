"""benchmarks/sizing.py: its arithmetic against hand computations, its wire model against
the bytes benchmarks/store.py measured, its shard bytes against memstore's own count,
and docs/scaling.md against its output."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import sizing

REPO = Path(__file__).resolve().parents[2]


def _row(deployment: str, optimizer: str) -> dict:
    (d,) = [d for d in sizing.deployments() if d.name.startswith(deployment)]
    return sizing.size(d, optimizer)


def test_h100_adam_row_by_hand():
    """16 nodes x 8 H100, Adam, grid (4, 32), 2^20 tokens of 128 slots per step."""
    r = _row("16 x 8 H100", "adam")
    assert r["deployment"].grid == (4, 32)
    # A block: 2^26 / 4 rows x 2048 / 32 columns, bf16 values and two float32 moments.
    assert r["shard"]["values"] == 2**24 * 64 * 2 == 2 * 2**30
    assert r["shard"]["state"] == 2**24 * 64 * 2 * 4 == 8 * 2**30
    # Wire per token: 4 row blocks hit (1 - 0.75^128 rounds to 1), 32 column blocks.
    lookup_sent = 32 * (128 * 8 + 4 * 8)  # pairs to every column block, offsets per block
    lookup_received = 4 * 2048 * 4  # a float32 partial of all columns per row block
    backward_sent = lookup_sent + 4 * 2048 * 4  # the pairs again and dy's columns
    backward_received = 32 * 128 * 4  # a float32 dw part per pair and column block
    assert lookup_sent + lookup_received + backward_sent + backward_received == 149_504
    assert r["wire"]["total"] == pytest.approx(149_504, abs=1e-6)
    # One node's NIC: its 1/16 of the tokens, both kinds of bytes, 15/16 leave the node.
    nic_bytes = 149_504 * 2**20 / 16 * 15 / 16
    assert r["network"]["bytes"] == pytest.approx(nic_bytes)
    assert r["parts"]["network"] == pytest.approx(nic_bytes / 50e9)  # 400 Gb/s = 50 GB/s
    # Memory of one shard: 2^20 pairs of 64 columns; 2^26 (1 - e^-2) / 4 rows touched.
    touched = 2**26 * (1 - math.exp(-2)) / 4
    reads = 2**20 * 64 * 2 * 2  # forward and dw read the bf16 slice
    rest = 2**20 * 64 * 4 + touched * 64 * 4 + touched * 64 * (2 * 2 + 4 * 4 + 4)
    seconds = reads / (3.35e12 * 11.4 / 28.8) + rest / (3.35e12 * 12.0 / 28.8)
    assert r["parts"]["memory"] == pytest.approx(seconds)
    assert r["parts"]["latency"] == pytest.approx(2 * 0.76e-3)
    assert r["first"] == "network"
    assert r["serial"] == pytest.approx(seconds + nic_bytes / 50e9 + 2 * 0.76e-3)


@pytest.mark.parametrize(
    "grid, sent, received",
    [
        ((1, 1), 3_088, 1_536),  # cfb8391:BENCHMARKS.md, Store: 1 shard
        ((2, 1), 4_128, 2_560),  # (2, 1) rows
        ((4, 1), 6_208, 4_608),  # (4, 1) rows
    ],
)
def test_wire_model_gives_the_bytes_benchmarks_store_counted(grid, sent, received):
    """The store benchmark counted these bytes per token at dim 256, 128 slots. Its
    column grids are left out: it counted an array put once in Ray's object store for
    all column blocks once, while the data channel sends each column block its copy."""
    wire = sizing.wire_per_token(grid, slots=128, dim=256)
    assert wire["sent"] == pytest.approx(sent, abs=0.5)
    assert wire["received"] == pytest.approx(received, abs=0.5)


@pytest.mark.parametrize("optimizer", ["adam", "rowwise_adagrad"])
def test_shard_bytes_agree_with_memstores_budget_check(optimizer):
    """memstore.table.shard_bytes (what create_table checks against a budget) counts the
    same block bytes for the paper's table."""
    import memstore
    from memstore.grid import ShardGrid
    from memstore.table import shard_bytes

    opt = {"adam": memstore.Adam(), "rowwise_adagrad": memstore.RowWiseAdagrad()}[optimizer]
    for deployment in sizing.deployments():
        grid = deployment.grid
        config = {"optimizer": opt.to_dict(), "dtype": "bfloat16"}
        theirs = shard_bytes(config, ShardGrid.make(2**26, 2048, grid))
        assert sizing.bytes_per_shard(grid, optimizer)["total"] == theirs


def test_best_grid_has_the_fewest_wire_bytes_and_at_least_64_columns():
    assert sizing.best_grid(128) == (4, 32)
    assert sizing.best_grid(16) == (2, 8)  # (1, 16) sends 57,600 B/token, (2, 8) 53,504
    assert all(2048 // c >= 64 for _, c in sizing.grids(128))
    assert (1, 64) not in sizing.grids(64)  # 32 columns per block: memstore refuses it


def test_unique_rows_matches_a_sampled_count():
    import torch

    g = torch.Generator().manual_seed(0)
    draws = torch.randint(0, 10_000, (30_000,), generator=g)
    assert sizing.unique_rows(10_000, 30_000) == pytest.approx(len(draws.unique()), rel=0.01)


def test_docs_scaling_is_the_scripts_output():
    assert (REPO / "docs" / "scaling.md").read_text(encoding="utf-8") == sizing.render(), (
        "regenerate: python -m benchmarks.sizing --out docs/scaling.md"
    )
