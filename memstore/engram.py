"""Engram: a hashed n-gram memory as a torch module whose rows live in a table.

Read top to bottom: the config (:class:`EngramArgs`), the primes that size the hash
heads, the hash, the lookup's autograd function, and the layer (after "Conditional
Memory via Scalable Lookup", DeepSeek 2026). Per token t of a sequence of token ids:

- **Hash.** For every order n (default 2 and 3) and every one of its hash heads h, the
  last n token ids (positions before the start padded with :data:`PAD_ID`) are mixed as
  ``(x_t·m_0) xor (x_{t-1}·m_1) xor ... xor (x_{t-n+1}·m_{n-1})`` with odd multipliers
  m < 2³¹ drawn from the seed by splitmix64, and reduced modulo the head's prime p_h.
  Token ids are below 2³¹, so every product fits int64: the rows depend on nothing but
  the ids and the seed, on every process and after a restart.
- **Rows.** Head h owns the rows [offset_h, offset_h + p_h) of one value table of
  Σ p_h rows of ``head_dim`` floats: a local :class:`ShardTable` or the distributed
  table. A token reads one row per head (a bag of one slot, weight 1), and the rows
  read are concatenated: e_t of width heads·orders·head_dim.
- **Gate.** k_t = W_K e_t, v_t = W_V e_t,
  α_t = sigmoid(RMSNorm(h_t)·RMSNorm(k_t)/sqrt(dim)), ṽ_t = α_t·v_t.
- **Convolution.** Y = SiLU(Conv1D(RMSNorm(ṽ))) + ṽ, a causal depthwise convolution of
  ``kernel_size`` taps at dilation max(orders). The caller adds Y to the residual stream.

The rows a batch reads depend only on its token ids, so a trainer can compute them and
issue their lookup before the forward starts (:meth:`EngramLayer.prefetch`, an
:class:`EngramFetch` whose values are a ``concurrent.futures.Future``), then hand the
fetch to the forward (``fetch=``): the layer takes the values only when it runs, so the
table's round trip overlaps whatever the model computes before it. The weights of the
slots are constant, so the backward pushes the row gradients and needs no dw back; with
``async_push`` it issues the push (``backward_async(need_dw=False)`` of a store table)
and returns at once, the push's future collected in :attr:`EngramLayer.pushes`.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._internal.validation import dataclass_from_dict
from .errors import InvalidArgument
from .memory_layer import ValueTable
from .optim import Adam
from .shard_table import ShardTable

__all__ = [
    "EngramArgs",
    "EngramFetch",
    "EngramLayer",
    "EngramRows",
    "PAD_ID",
    "engram_primes",
    "is_prime",
    "lookup_future",
]

PAD_ID = 2**31 - 1  # the id of the positions before a sequence's start; tokens are below it
_MASK64 = (1 << 64) - 1


@dataclasses.dataclass
class EngramArgs:
    dim: int  # model width: the query h_t and the output Y
    orders: list[int] = dataclasses.field(default_factory=lambda: [2, 3])
    heads: int = 2  # hash heads per order
    rows: int = 65521  # rows per head asked for: each head gets a distinct prime >= it
    head_dim: int = 32  # width of one row
    kernel_size: int = 4  # taps of the causal depthwise convolution
    norm_eps: float = 1e-5
    value_lr: float = 1e-3  # learning rate of the local table's Adam
    seed: int = 0  # seeds the hash multipliers and the local table's initial values

    @classmethod
    def from_dict(cls, d: dict) -> EngramArgs:
        return dataclass_from_dict(cls, d, "engram layer config")

    def __post_init__(self) -> None:
        for name in ("dim", "heads", "rows", "head_dim", "kernel_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        orders = list(self.orders) if isinstance(self.orders, (list, tuple)) else None
        if (
            not orders
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in orders)
            or len(set(orders)) != len(orders)
        ):
            raise InvalidArgument("orders", "a non-empty list of distinct ints >= 1", self.orders)
        self.orders = sorted(orders)
        if self.rows >= PAD_ID:
            raise InvalidArgument("rows", f"below {PAD_ID}", self.rows)
        for name in ("norm_eps", "value_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidArgument(name, "a number > 0", value)

    @property
    def n_heads(self) -> int:
        """Hash heads over all orders: the rows a token reads."""
        return len(self.orders) * self.heads

    @property
    def memory_dim(self) -> int:
        """Width of e_t, the concatenated rows of a token."""
        return self.n_heads * self.head_dim


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(name, f"an int >= {minimum}", value)


# ---- primes and multipliers --------------------------------------------------------


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for n < 3.3·10²⁴."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n in bases:
        return True
    if any(n % p == 0 for p in bases):
        return False
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def engram_primes(rows: int, count: int) -> list[int]:
    """``count`` distinct primes, the smallest primes >= ``rows`` in increasing order:
    the sizes of the hash heads (distinct moduli keep the heads' collisions apart)."""
    _check_int("rows", rows, 1)
    _check_int("count", count, 1)
    primes, candidate = [], max(rows, 2)
    while len(primes) < count:
        if is_prime(candidate):
            primes.append(candidate)
        candidate += 1
    return primes


def _splitmix64(state: int) -> tuple[int, int]:
    """The next state and output of splitmix64 (Steele et al.): a fixed integer
    recipe, so the multipliers are the same on every platform and version."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def hash_multipliers(seed: int, n_heads: int, max_order: int) -> list[list[int]]:
    """Odd multipliers in [1, 2³¹), one per (head, position in the n-gram)."""
    state, out = seed & _MASK64, []
    for _ in range(n_heads):
        row = []
        for _ in range(max_order):
            state, z = _splitmix64(state)
            row.append((z >> 33) | 1)
        out.append(row)
    return out


# ---- the lookup's autograd function ------------------------------------------------


class EngramRows(NamedTuple):
    """The rows a batch reads: each distinct row once, as bags of one slot.

    idx (U, 1) int64 rows of the value table; w (U, 1) float32 ones; inverse
    (B, T, heads) int64 positions in idx of every token's rows. ``table.lookup(idx, w)``
    gives the (U, head_dim) values a forward takes as ``y``.
    """

    idx: torch.Tensor
    w: torch.Tensor
    inverse: torch.Tensor


class EngramFetch(NamedTuple):
    """A batch's rows and the future of their values (:meth:`EngramLayer.prefetch`)."""

    rows: EngramRows
    values: Future


def lookup_future(table: ValueTable, idx: torch.Tensor, w: torch.Tensor) -> Future:
    """``table.lookup(idx, w)`` as a future: the store's ``lookup_async`` (issued now, run
    on the handle's I/O thread), or, for a table without one (a local ShardTable, whose
    lookup is computation, not a round trip), the lookup made now. Either way an error
    of the lookup is the future's, raised where its result is taken."""
    if hasattr(table, "lookup_async"):
        return table.lookup_async(idx, w)
    future = Future()
    try:
        future.set_result(table.lookup(idx, w))
    except Exception as e:  # delivered where the blocking call would have raised it
        future.set_exception(e)
    return future


class EngramLookup(torch.autograd.Function):
    """y = table.lookup(idx, w) (or the given y); backward pushes dy to the table.

    Nothing differentiable goes in: ``anchor`` is a scalar that requires grad, so that
    autograd calls the backward, which pushes the rows' gradients and returns nothing
    (the weights are constant: the dw the table answers is not used). ``pushes``: a
    list, or None; given one and a table with ``backward_async``, the push is issued
    without waiting for it (``need_dw=False``) and its future appended to the list.
    """

    @staticmethod
    def forward(ctx, anchor, idx, w, y, table, step, push_id, lr, pushes):
        ctx.save_for_backward(idx, w)
        ctx.table, ctx.step, ctx.push_id, ctx.lr = table, step, push_id, lr
        ctx.pushes = pushes
        return table.lookup(idx, w) if y is None else y

    @staticmethod
    def backward(ctx, dy):
        idx, w = ctx.saved_tensors
        kwargs = {} if ctx.push_id is None else {"push_id": ctx.push_id}
        if ctx.lr is not None:
            kwargs["lr"] = ctx.lr
        dy = dy.float().contiguous()
        if ctx.pushes is not None and hasattr(ctx.table, "backward_async"):
            future = ctx.table.backward_async(idx, w, dy, step=ctx.step, need_dw=False, **kwargs)
            ctx.pushes.append(future)
        else:
            ctx.table.backward(idx, w, dy, step=ctx.step, **kwargs)
        return (None,) * 9


# ---- the layer ---------------------------------------------------------------------


class EngramLayer(nn.Module):
    """Engram with a pluggable value table (module docstring).

    ``table=None`` creates a local :class:`ShardTable` of Σ primes × head_dim rows with
    lazy Adam at ``value_lr``. ``step``, ``push_id`` and ``value_lr`` tag the next
    backward's push as for :class:`MemoryLayer`. ``forward(x, tokens)`` returns Y
    (B, T, dim), to be added to the residual stream x. ``async_push``: the backward
    issues its push without waiting (a table with ``backward_async``) and appends the
    future to :attr:`pushes`, which the caller drains (:meth:`take_pushes`); the
    table's ``step(s)`` waits for the pushes of s itself.
    """

    def __init__(self, args: EngramArgs, table: ValueTable | None = None):
        super().__init__()
        self.args = args
        self.primes = engram_primes(args.rows, args.n_heads)
        offsets = [0]
        for p in self.primes[:-1]:
            offsets.append(offsets[-1] + p)
        self.offsets = offsets
        rows = sum(self.primes)
        if table is None:
            table = ShardTable(
                rows, args.head_dim, optimizer=Adam(lr=args.value_lr), seed=args.seed
            )
        if table.rows != rows or table.dim != args.head_dim:
            raise InvalidArgument(
                "table", f"a {rows} x {args.head_dim} value table", f"{table.rows} x {table.dim}"
            )
        self.table = table
        self.step: int | None = None
        self.value_lr: float | None = None
        self.push_id: int | None = None
        self.async_push = False
        self.pushes: list[Future] = []
        # (heads, max order): zero past a head's order, so those positions mix in nothing
        mult = hash_multipliers(args.seed, args.n_heads, max(args.orders))
        head_orders = [n for n in args.orders for _ in range(args.heads)]
        for row, n in zip(mult, head_orders):
            row[n:] = [0] * (len(row) - n)
        self.register_buffer("multipliers", torch.tensor(mult, dtype=torch.int64), False)
        self.register_buffer("moduli", torch.tensor(self.primes, dtype=torch.int64), False)
        self.register_buffer("starts", torch.tensor(offsets, dtype=torch.int64), False)
        self.key = nn.Linear(args.memory_dim, args.dim, bias=False)
        self.value = nn.Linear(args.memory_dim, args.dim, bias=False)
        self.query_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.key_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.conv_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.conv = nn.Conv1d(
            args.dim,
            args.dim,
            args.kernel_size,
            groups=args.dim,
            dilation=max(args.orders),
            bias=False,
        )
        # A new layer adds the gated values only (SiLU(0) = 0); the convolution learns.
        nn.init.zeros_(self.conv.weight)

    def hash(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows (B, T, heads) int64 of the value table that the tokens (B, T) read."""
        if (
            not isinstance(tokens, torch.Tensor)
            or tokens.dim() != 2
            or tokens.dtype.is_floating_point
            or tokens.dtype.is_complex
            or tokens.dtype == torch.bool
        ):
            raise InvalidArgument("tokens", "an integer tensor (B, T)", _describe(tokens))
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= PAD_ID):
            raise InvalidArgument("tokens", f"ids in [0, {PAD_ID})", "ids out of range")
        tokens = tokens.to(device=self.multipliers.device, dtype=torch.int64)
        T = tokens.shape[1]
        padded = F.pad(tokens, (self.multipliers.shape[1] - 1, 0), value=PAD_ID)
        mix = torch.zeros(
            (self.args.n_heads, *tokens.shape), dtype=torch.int64, device=tokens.device
        )
        for k in range(self.multipliers.shape[1]):  # x_{t-k}: one shifted view per position
            shifted = padded[:, padded.shape[1] - T - k : padded.shape[1] - k]
            mix ^= shifted.unsqueeze(0) * self.multipliers[:, k, None, None]
        rows = mix % self.moduli[:, None, None] + self.starts[:, None, None]
        return rows.permute(1, 2, 0).contiguous()

    def rows(self, tokens: torch.Tensor) -> EngramRows:
        """The distinct rows the tokens (B, T) read, ready for ``table.lookup``."""
        uniq, inverse = torch.unique(self.hash(tokens), return_inverse=True)
        idx = uniq.unsqueeze(1)
        return EngramRows(idx, torch.ones(idx.shape, dtype=torch.float32), inverse)

    def prefetch(self, tokens: torch.Tensor) -> EngramFetch:
        """The rows of ``tokens`` (B, T) with their lookup issued now
        (:func:`lookup_future`), for ``forward(x, fetch=...)``. The values are those the
        table holds when the lookup reaches it: to read what the blocking forward would,
        issue it after the table applied the last step before this batch's."""
        rows = self.rows(tokens)
        return EngramFetch(rows, lookup_future(self.table, rows.idx, rows.w))

    def take_pushes(self) -> list[Future]:
        """The futures of the pushes issued since the last call (``async_push``)."""
        pushes, self.pushes = self.pushes, []
        return pushes

    def forward(
        self,
        x: torch.Tensor,
        tokens: torch.Tensor | None = None,
        *,
        rows: EngramRows | None = None,
        y: torch.Tensor | None = None,
        fetch: EngramFetch | None = None,
    ) -> torch.Tensor:
        """Y (B, T, dim) for the hidden states x (B, T, dim) of ``tokens`` (B, T), or of
        the precomputed ``rows`` (:meth:`rows`); ``y``: the values of ``rows.idx``
        already looked up (None: looked up here). ``fetch`` (:meth:`prefetch`) stands
        for rows and y: its values are waited for here, and an error of its lookup is
        raised here, as the blocking lookup's would be."""
        a = self.args
        if fetch is not None:
            if rows is not None or y is not None:
                raise InvalidArgument("fetch", "None when rows or y are given", "both")
            rows, y = fetch.rows, fetch.values.result()
        if rows is None:
            if tokens is None:
                raise InvalidArgument("tokens", "a (B, T) tensor, or rows", None)
            rows = self.rows(tokens)
        if x.dim() != 3 or x.shape[-1] != a.dim or tuple(x.shape[:2]) != rows.inverse.shape[:2]:
            raise InvalidArgument(
                "x", f"(B, T, {a.dim}) with (B, T) = {tuple(rows.inverse.shape[:2])}", _describe(x)
            )
        if y is not None and tuple(y.shape) != (rows.idx.shape[0], a.head_dim):
            raise InvalidArgument("y", f"({rows.idx.shape[0]}, {a.head_dim})", _describe(y))
        anchor = torch.zeros((), requires_grad=True)
        values = EngramLookup.apply(
            anchor,
            rows.idx,
            rows.w,
            y,
            self.table,
            self.step,
            self.push_id,
            self.value_lr,
            self.pushes if self.async_push else None,
        )
        values = values.to(device=x.device, dtype=x.dtype)  # a remote table answers on the host
        e = values[rows.inverse.to(x.device)].flatten(2)  # (B, T, heads·head_dim)
        return self.fuse(x, e)

    def fuse(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The gate and the causal convolution: Y from the hidden states x and the
        concatenated rows e (B, T, heads·head_dim)."""
        k = self.key(e)
        v = self.value(e)
        logit = (self.query_norm(x) * self.key_norm(k)).sum(-1, keepdim=True)
        gated = torch.sigmoid(logit / math.sqrt(self.args.dim)) * v
        reach = (self.args.kernel_size - 1) * self.conv.dilation[0]
        h = F.pad(self.conv_norm(gated).transpose(1, 2), (reach, 0))  # causal: left only
        return F.silu(self.conv(h)).transpose(1, 2) + gated


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} of shape {tuple(t.shape)}"
    return type(t).__name__
