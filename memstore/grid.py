"""How a table is cut into shards, and how a batch is routed to them.

A table of rows × dim is a grid of R row blocks × C column blocks. Column blocks see
every (token, slot) pair and return a slice of the output columns; row blocks see only
the pairs whose row they own, as ragged CSR bags, and return partial sums that the
client adds. Indices travel as int32 when the table has fewer than 2³¹ rows.
"""

from __future__ import annotations

import dataclasses

import torch

from ._internal.validation import check_positive_int
from .errors import InvalidArgument
from .shard_table import BlockSpec

__all__ = ["ShardGrid", "RowRoute"]

# Narrower column blocks would make each shard's rows shorter than a few cache lines.
MIN_COLUMNS_PER_BLOCK = 64


def _even_bounds(total: int, parts: int) -> list[int]:
    return [total * p // parts for p in range(parts + 1)]


@dataclasses.dataclass(frozen=True)
class RowRoute:
    """The pairs of a (B, M) batch that fall in one row block, as CSR bags."""

    mask: torch.Tensor  # (B, M) bool: which pairs belong to the block
    rows: torch.Tensor  # (P,) global row ids, int32 or int64
    w: torch.Tensor  # (P,) float32
    offsets: torch.Tensor  # (B+1,) int64


@dataclasses.dataclass(frozen=True)
class ShardGrid:
    rows: int
    dim: int
    row_bounds: tuple[int, ...]
    col_bounds: tuple[int, ...]

    @classmethod
    def make(cls, rows: int, dim: int, shards) -> "ShardGrid":
        """``shards=S`` (column blocks while each keeps >= 64 columns, then row blocks)
        or ``shards=(R, C)``."""
        check_positive_int("rows", rows)
        check_positive_int("dim", dim)
        if isinstance(shards, int) and not isinstance(shards, bool):
            check_positive_int("shards", shards)
            C = max(c for c in range(1, shards + 1)
                    if shards % c == 0 and (c == 1 or dim // c >= MIN_COLUMNS_PER_BLOCK))
            R = shards // C
        elif (isinstance(shards, (tuple, list)) and len(shards) == 2
              and all(isinstance(x, int) and x >= 1 for x in shards)):
            R, C = shards
        else:
            raise InvalidArgument("shards", "an int >= 1 or a pair (R, C) of ints >= 1", shards)
        if R > rows:
            raise InvalidArgument("shards", f"at most {rows} row blocks (one row each)", R)
        if C > 1 and dim // C < MIN_COLUMNS_PER_BLOCK:
            raise InvalidArgument("shards", f"column blocks of >= {MIN_COLUMNS_PER_BLOCK} "
                                  f"columns (dim {dim} allows {dim // MIN_COLUMNS_PER_BLOCK})", C)
        return cls(rows, dim, tuple(_even_bounds(rows, R)), tuple(_even_bounds(dim, C)))

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.row_bounds) - 1, len(self.col_bounds) - 1)

    def block(self, r: int, c: int) -> BlockSpec:
        return BlockSpec(self.rows, self.dim, self.row_bounds[r], self.row_bounds[r + 1],
                         self.col_bounds[c], self.col_bounds[c + 1])

    def blocks(self) -> list[tuple[int, int]]:
        R, C = self.shape
        return [(r, c) for r in range(R) for c in range(C)]

    def index_dtype(self) -> torch.dtype:
        return torch.int32 if self.rows < 2**31 else torch.int64

    def route(self, idx: torch.Tensor, w: torch.Tensor) -> list[RowRoute]:
        """Split validated (B, M) pairs by row block; one entry per row block."""
        R = self.shape[0]
        B = idx.shape[0]
        w = w.to(torch.float32)
        if R == 1:
            offsets = torch.arange(B + 1, dtype=torch.int64) * idx.shape[1]
            mask = torch.ones(idx.shape, dtype=torch.bool)
            return [RowRoute(mask, idx.reshape(-1).to(self.index_dtype()), w.reshape(-1), offsets)]
        inner = torch.tensor(self.row_bounds[1:-1], dtype=idx.dtype)
        block_of = torch.bucketize(idx, inner, right=True)
        routes = []
        for r in range(R):
            mask = block_of == r
            offsets = torch.zeros(B + 1, dtype=torch.int64)
            torch.cumsum(mask.sum(dim=1), 0, out=offsets[1:])
            routes.append(RowRoute(mask, idx[mask].to(self.index_dtype()), w[mask], offsets))
        return routes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShardGrid":
        return cls(d["rows"], d["dim"], tuple(d["row_bounds"]), tuple(d["col_bounds"]))
