"""Product-key memory (PKM) and Memory+ as a torch module whose values live in a table.

Read top to bottom: queries from x, exact product-key top-k against the sub-keys,
softmax weights, a weighted bag of value rows from the table, and for Memory+ a
silu gate and an output projection (Berges et al. 2024):

    out = W2 (y ⊙ silu(W1 x))          y = Σ_i softmax(s)_i · V[I_i]

The keys and the query net are ordinary dense parameters. The values are not: they
live in a value table (a local :class:`ShardTable`, or the distributed table), which
receives the row gradients during backward and applies its own sparse optimizer when
the trainer calls ``table.step(s)``.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from memstore.kernels import product_key_topk

from ._internal.validation import dataclass_from_dict
from .errors import InvalidArgument
from .optim import Adam
from .shard_table import ShardTable

__all__ = ["MemoryLayer", "MemoryLayerArgs", "ValueTable"]


class ValueTable(Protocol):
    """What a MemoryLayer needs from its values: local and distributed tables alike."""

    rows: int
    dim: int

    def lookup(self, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...

    def backward(
        self, idx, w, dy, step: int | None = None, push_id: int = 0, lr: float | None = None
    ) -> torch.Tensor: ...

    def step(self, step: int | None = None, lr: float | None = None) -> int: ...


@dataclasses.dataclass
class MemoryLayerArgs:
    dim: int  # model width, input and output of the layer
    heads: int = 4
    k: int = 32  # rows read per head and token
    n_keys: int = 1024  # sub-keys per half: the table has n_keys² rows
    key_dim: int = 256  # query/key width per head, split into two halves
    value_dim: int | None = None  # row width; defaults to dim
    memory_plus: bool = False  # silu gate and output projection (Memory+)
    qk_norm: bool = True  # RMS-normalise query halves and sub-keys
    value_lr: float = 1e-3  # learning rate of the local table's Adam
    seed: int = 0  # seeds the local table's initial values

    @classmethod
    def from_dict(cls, d: dict) -> MemoryLayerArgs:
        return dataclass_from_dict(cls, d, "memory layer config")

    def __post_init__(self) -> None:
        if self.value_dim is None:
            self.value_dim = self.dim
        for name in ("dim", "heads", "k", "n_keys", "key_dim", "value_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(name, "an int >= 1", value)
        if self.key_dim % 2:
            raise InvalidArgument("key_dim", "an even int (two halves)", self.key_dim)
        if self.k > self.n_keys**2:
            raise InvalidArgument("k", f"at most n_keys² = {self.n_keys**2}", self.k)
        if not self.memory_plus and self.value_dim != self.dim:
            raise InvalidArgument(
                "value_dim", f"{self.dim} (= dim) without memory_plus", self.value_dim
            )


class TableLookup(torch.autograd.Function):
    """y = table.lookup(idx, w); backward sends dy to the table and returns dw."""

    @staticmethod
    def forward(ctx, w, idx, table, step, push_id, lr):
        ctx.save_for_backward(w, idx)
        ctx.table, ctx.step, ctx.push_id, ctx.lr = table, step, push_id, lr
        return table.lookup(idx, w.detach())

    @staticmethod
    def backward(ctx, dy):
        w, idx = ctx.saved_tensors
        kwargs = {} if ctx.push_id is None else {"push_id": ctx.push_id}
        if ctx.lr is not None:
            kwargs["lr"] = ctx.lr
        dw = ctx.table.backward(idx, w.detach(), dy.contiguous(), step=ctx.step, **kwargs)
        return dw.to(device=w.device, dtype=w.dtype), None, None, None, None, None


class MemoryLayer(nn.Module):
    """PKM / Memory+ layer with a pluggable value table.

    ``table=None`` creates a local :class:`ShardTable` of n_keys² × value_dim rows with
    lazy Adam at ``value_lr``. Pass a distributed table to keep the values in the store.
    Set ``step`` before a training step to tag its gradients (default: the table's
    next step). Several layers sharing one table must push under distinct
    ``push_id``s (a repeated (step, push_id) push is ignored as a retry); default: the table's.
    ``value_lr``, when set, is the learning rate the table applies that step with (a
    schedule for the values); default: the table optimizer's own.
    """

    def __init__(self, args: MemoryLayerArgs, table: ValueTable | None = None):
        super().__init__()
        self.args = args
        rows = args.n_keys**2
        if table is None:
            table = ShardTable(
                rows, args.value_dim, optimizer=Adam(lr=args.value_lr), seed=args.seed
            )
        if table.rows != rows or table.dim != args.value_dim:
            raise InvalidArgument(
                "table", f"a {rows} x {args.value_dim} value table", f"{table.rows} x {table.dim}"
            )
        self.table = table
        self.step: int | None = None
        self.value_lr: float | None = None  # this step's value lr (schedules); None: the table's
        self.push_id: int | None = None
        half = args.key_dim // 2
        self.query = nn.Linear(args.dim, args.heads * args.key_dim, bias=False)
        self.keys = nn.Parameter(torch.randn(args.heads, 2, args.n_keys, half) * half**-0.5)
        if args.memory_plus:
            self.gate = nn.Linear(args.dim, args.value_dim, bias=False)
            self.out = nn.Linear(args.value_dim, args.dim, bias=False)

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and row indices (N, heads, k) of the flattened tokens x (N, dim)."""
        a = self.args
        q = self.query(x).view(-1, a.heads, 2, a.key_dim // 2)
        keys = self.keys
        if a.qk_norm:
            q = F.rms_norm(q, (a.key_dim // 2,))
            keys = F.rms_norm(keys, (a.key_dim // 2,))
        return product_key_topk(q.reshape(-1, a.heads, a.key_dim), keys, a.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.args
        if x.shape[-1] != a.dim:
            raise InvalidArgument("x", f"last dimension {a.dim}", tuple(x.shape))
        flat = x.reshape(-1, a.dim)
        scores, idx = self.topk(flat)
        w = torch.softmax(scores.float(), dim=-1).flatten(1)  # (N, heads·k)
        y = TableLookup.apply(w, idx.flatten(1), self.table, self.step, self.push_id, self.value_lr)
        y = y.to(device=x.device, dtype=x.dtype)  # a remote table answers on the host
        if a.memory_plus:
            y = self.out(y * F.silu(self.gate(flat)))
        return y.reshape(x.shape)
