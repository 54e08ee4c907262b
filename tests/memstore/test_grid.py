"""ShardGrid.route against a plain Python loop over the pairs: every pair lands in the
block that owns its row, in order, with its weight, and the offsets cut the bags."""

import pytest
import torch

from memstore.grid import ShardGrid


def loop_route(idx, w, row_bounds):
    """Per row block: (mask, rows, w, offsets) built pair by pair."""
    B, M = idx.shape
    out = []
    for r0, r1 in zip(row_bounds[:-1], row_bounds[1:]):
        mask = [[r0 <= int(idx[b, m]) < r1 for m in range(M)] for b in range(B)]
        rows = [int(idx[b, m]) for b in range(B) for m in range(M) if mask[b][m]]
        ws = [float(w[b, m]) for b in range(B) for m in range(M) if mask[b][m]]
        offsets = [0]
        for b in range(B):
            offsets.append(offsets[-1] + sum(mask[b]))
        out.append((mask, rows, ws, offsets))
    return out


def grid_with_rows(rows: int, dim: int, row_blocks: int) -> ShardGrid:
    bounds = tuple(round(rows * i / row_blocks) for i in range(row_blocks + 1))
    return ShardGrid(rows, dim, bounds, (0, dim // 2, dim))


@pytest.mark.parametrize("row_blocks", [1, 2, 3, 20])  # 20: the binary-search path
@pytest.mark.parametrize("B,M", [(9, 41), (1, 1), (0, 4), (33, 7)])
def test_route_matches_a_loop_over_the_pairs(row_blocks, B, M):
    g = torch.Generator().manual_seed(B * 100 + M + row_blocks)
    rows = 1000
    idx = torch.randint(0, rows, (B, M), generator=g)
    idx[:, 0] = rows - 1 if B else idx[:, 0]  # the last row, on a block's edge
    w = torch.rand(B, M, generator=g, dtype=torch.float64)  # routed as float32
    grid = grid_with_rows(rows, 8, row_blocks)
    routes = grid.route(idx, w)
    assert len(routes) == row_blocks
    for route, (mask, expect_rows, expect_w, offsets) in zip(
        routes, loop_route(idx, w, grid.row_bounds)
    ):
        assert route.mask.tolist() == mask
        assert route.rows.dtype == torch.int32 and route.rows.tolist() == expect_rows
        assert route.w.dtype == torch.float32
        assert route.w.tolist() == pytest.approx(expect_w, rel=1e-7)
        assert route.offsets.dtype == torch.int64 and route.offsets.tolist() == offsets


def test_row_ids_past_int32_route_as_int64():
    rows = 2**31 + 10
    grid = grid_with_rows(rows, 8, 2)
    idx = torch.tensor([[0, rows - 1], [2**31 + 3, 5]])
    w = torch.ones(2, 2)
    low, high = grid.route(idx, w)
    assert high.rows.dtype == torch.int64
    assert high.rows.tolist() == [rows - 1, 2**31 + 3] and low.rows.tolist() == [0, 5]
    assert low.offsets.tolist() == [0, 1, 2] and high.offsets.tolist() == [0, 1, 2]
