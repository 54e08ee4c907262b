"""How a table is cut into shards, and how a batch is routed to them.

A table of rows × dim is a grid of R row blocks × C column blocks. Column blocks see
every (token, slot) pair and return a slice of the output columns; row blocks see only
the pairs whose row they own, as ragged CSR bags, and return partial sums that the
client adds. Indices travel as int32 when the table has fewer than 2³¹ rows.

In a grid of several column blocks, every block of a row block gets the same slots; the
client groups them by row once (:func:`pack_grouping`) and sends the grouping with the
push, so that no block repeats that per-slot work.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from memstore.kernels.grouped import group_rows

from ._internal.validation import check_positive_int
from .errors import InvalidArgument
from .shard_table import BlockSpec

__all__ = ["ShardGrid", "RowRoute", "pack_grouping", "unpack_grouping"]

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
    def make(cls, rows: int, dim: int, shards) -> ShardGrid:
        """``shards=S`` (column blocks while each keeps >= 64 columns, then row blocks)
        or ``shards=(R, C)``."""
        check_positive_int("rows", rows)
        check_positive_int("dim", dim)
        if isinstance(shards, int) and not isinstance(shards, bool):
            check_positive_int("shards", shards)
            C = max(
                c
                for c in range(1, shards + 1)
                if shards % c == 0 and (c == 1 or dim // c >= MIN_COLUMNS_PER_BLOCK)
            )
            R = shards // C
        elif (
            isinstance(shards, (tuple, list))
            and len(shards) == 2
            and all(isinstance(x, int) and x >= 1 for x in shards)
        ):
            R, C = shards
        else:
            raise InvalidArgument("shards", "an int >= 1 or a pair (R, C) of ints >= 1", shards)
        if R > rows:
            raise InvalidArgument("shards", f"at most {rows} row blocks (one row each)", R)
        if C > 1 and dim // C < MIN_COLUMNS_PER_BLOCK:
            raise InvalidArgument(
                "shards",
                f"column blocks of >= {MIN_COLUMNS_PER_BLOCK} "
                f"columns (dim {dim} allows {dim // MIN_COLUMNS_PER_BLOCK})",
                C,
            )
        return cls(rows, dim, tuple(_even_bounds(rows, R)), tuple(_even_bounds(dim, C)))

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.row_bounds) - 1, len(self.col_bounds) - 1)

    def block(self, r: int, c: int) -> BlockSpec:
        return BlockSpec(
            self.rows,
            self.dim,
            self.row_bounds[r],
            self.row_bounds[r + 1],
            self.col_bounds[c],
            self.col_bounds[c + 1],
        )

    def blocks(self) -> list[tuple[int, int]]:
        R, C = self.shape
        return [(r, c) for r in range(R) for c in range(C)]

    def index_dtype(self) -> torch.dtype:
        return torch.int32 if self.rows < 2**31 else torch.int64

    def route(self, idx: torch.Tensor, w: torch.Tensor) -> list[RowRoute]:
        """Split validated (B, M) pairs by row block; one entry per row block.

        In numpy, on the calling thread: its compress and comparisons are several times
        faster than torch's boolean indexing and bucketize on the host
        (benchmarks/store.py's routing), and torch would wake its intra-op threads,
        which take cores from shards on the same machine."""
        R = self.shape[0]
        B, M = idx.shape
        rows = idx.detach().contiguous().numpy()
        weights = w.detach().to(torch.float32).contiguous().numpy()
        index_dtype = np.int32 if self.index_dtype() == torch.int32 else np.int64
        if R == 1:
            return [
                RowRoute(
                    torch.from_numpy(np.ones((B, M), dtype=bool)),
                    torch.from_numpy(rows.reshape(-1).astype(index_dtype)),
                    torch.from_numpy(weights.reshape(-1)),
                    torch.from_numpy(np.arange(B + 1, dtype=np.int64) * M),
                )
            ]
        block_of = _block_of(rows, self.row_bounds[1:-1])
        routes = []
        for r in range(R):
            mask = block_of == r
            offsets = np.zeros(B + 1, dtype=np.int64)
            np.cumsum(mask.sum(axis=1), out=offsets[1:])
            flat = mask.reshape(-1)
            routes.append(
                RowRoute(
                    torch.from_numpy(mask),
                    torch.from_numpy(np.compress(flat, rows.reshape(-1)).astype(index_dtype)),
                    torch.from_numpy(np.compress(flat, weights.reshape(-1))),
                    torch.from_numpy(offsets),
                )
            )
        return routes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShardGrid:
        return cls(d["rows"], d["dim"], tuple(d["row_bounds"]), tuple(d["col_bounds"]))


def _block_of(rows: np.ndarray, inner: tuple[int, ...]) -> np.ndarray:
    """The row block of every row id, given the blocks' inner bounds (sorted)."""
    if len(inner) > 16:  # a binary search beats many passes
        return np.searchsorted(np.asarray(inner), rows, side="right").astype(np.int16)
    block_of = np.zeros(rows.shape, dtype=np.int16)
    for bound in inner:
        block_of += rows >= bound
    return block_of


def pack_grouping(rows: torch.Tensor, row_start: int, row_stop: int) -> torch.Tensor:
    """The slots of a row block grouped by row, as one int32 array: order (P) | uniq (U)
    | seg (U+1) (see ``kernels.grouped.group_rows``; uniq are global rows)."""
    local = rows.to(torch.int64) - row_start
    uniq, seg, order = group_rows(local, row_stop - row_start)
    return torch.cat([order, uniq + row_start, seg]).to(torch.int32)


def unpack_grouping(packed: torch.Tensor, pairs: int) -> tuple[torch.Tensor, ...]:
    """(uniq, seg, order) views of a packed grouping of ``pairs`` slots."""
    rest = packed.numel() - pairs - 1
    if packed.dim() != 1 or rest < 0 or rest % 2:
        raise InvalidArgument(
            "grouping",
            f"order ({pairs}) | uniq (U) | seg (U+1) as one 1-d array",
            tuple(packed.shape),
        )
    U = rest // 2
    return packed[pairs : pairs + U], packed[pairs + U :], packed[:pairs]
