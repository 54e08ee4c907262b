"""A decoder-only transformer whose chosen FFNs are memory layers.

Read top to bottom: the config (:class:`ModelArgs`), the value tables it needs
(:func:`table_specs`), the blocks (RMSNorm, rotary attention, SwiGLU FFN), the model
(:class:`Transformer`), and the dense baseline (:func:`dense_equivalent`).

Each layer is ``h = x + attn(norm(x)); out = h + ffn(norm(h))``. At the layers listed in
``memory_layers`` the FFN is a :class:`memstore.MemoryLayer` (PKM, or Memory+ with a
silu gate) instead. Its keys and query net are ordinary parameters of this model; its
values live in a value table that the model either creates (a local
:class:`memstore.ShardTable`) or is given (e.g. a distributed :class:`memstore.Table`).
At the layers listed in ``engram_layers`` an :class:`memstore.EngramLayer` follows:
``out += engram(out, tokens)``, a hashed n-gram memory of the input token ids (bytes,
for byte-level text) whose rows live in a value table of their own, ``engram.<i>``.
With ``engram_prefetch`` a trainer issues their lookups before the forward
(:meth:`Transformer.prefetch_engram`, passed as ``forward(tokens, engram=...)``) and
their backward issues its pushes without waiting (``EngramLayer.async_push``).

Push ids (``MemoryLayer.push_id``, set by :meth:`Transformer.set_step`). A table
ignores a second push of the same (step, push_id) as a retry, so every backward that
reaches a table within one step must push under its own id, or its row gradients are
silently dropped. Two things push more than once per step and rank: the memory layers
sharing a pool (``shared_memory=True``, the published default), and the micro-batches
of gradient accumulation. :func:`trainer.memory.push_id` numbers them; a trainer with W
data-parallel ranks closes a step of table ``name`` after
``W * model.pushes_per_rank()[name]`` pushes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

import memstore
from memstore import EngramArgs, EngramLayer, InvalidArgument, MemoryLayer, MemoryLayerArgs
from memstore._internal.validation import (
    bounded,
    check_fields,
    check_positive_int,
    dataclass_from_dict,
)
from memstore.engram import EngramFetch, engram_primes
from memstore.memory_layer import ValueTable

from .memory import push_id

if TYPE_CHECKING:
    from .data import Batch

__all__ = [
    "ModelArgs",
    "Transformer",
    "table_specs",
    "table_users",
    "dense_equivalent",
    "ffn_slot_macs",
    "engram_macs",
]

SHARED_TABLE = "memory"  # the name of the shared pool; per-layer tables are "memory.<i>"
ENGRAM_TABLE = "engram"  # the Engram layer after layer i reads the table "engram.<i>"
# Dense weights are N(0, 0.02²); residual outputs (attention and FFN projections) are
# scaled by 1/sqrt(2·n_layers) (GPT-2). Memory layers keep their own init.
INIT_STD = 0.02


# ---- config ------------------------------------------------------------------------


@dataclasses.dataclass
class ModelArgs:
    vocab_size: int = bounded(min=1)
    dim: int = bounded(256, min=1)
    n_layers: int = bounded(4, min=1)
    n_heads: int = bounded(4, min=1)
    ffn_hidden: int | None = bounded(None, min=1)  # default: 8·dim/3, a multiple of 8
    # per-layer FFN widths (dense_equivalent)
    layer_ffn_hidden: list[int] | None = bounded(None, min=1)
    max_seq_len: int = bounded(256, min=1)
    norm_eps: float = bounded(1e-5, gt=0)
    rope_theta: float = bounded(10000.0, gt=0)
    memory_layers: list[int] = dataclasses.field(default_factory=list)
    memory_plus: bool = True  # Memory+ (silu gate, output projection); False: PKM
    mem_heads: int = 4
    mem_k: int = 32  # rows read per head and token
    mem_n_keys: int = 256  # sub-keys per half: a table has mem_n_keys² rows
    mem_key_dim: int = 128
    mem_value_dim: int | None = None  # row width; default dim (required for PKM)
    mem_qk_norm: bool = True
    shared_memory: bool = True  # one value pool for all memory layers
    # The memory layers become lucidrains' product_key_memory.PKM (the `bench` extra)
    # with the same heads, k, sub-keys and key width: a peer implementation whose
    # values are an ordinary dense parameter of this model (no value table, no store).
    pkm_peer: bool = False
    # Its values train at pkm_value_scale x the dense lr (y = c·bag(p), p initialised
    # at w/c: Adam's step ignores the gradient's scale, so w moves c times as far).
    pkm_value_scale: float = bounded(1.0, gt=0)
    # True: the peer's values train as the store's values do, in an Adam group of their
    # own at the values' lr (value_lr, value_schedule) with the store's Adam betas, no
    # weight decay and no clipping; False: with the dense parameters at the dense lr.
    pkm_value_group: bool = False
    # Engram layers (memstore.EngramLayer) after these layers' attention and FFN: hashed
    # n-grams of the token ids, engram_heads hash heads per order in engram_orders, each
    # head a table of the smallest free prime >= engram_rows rows of engram_dim floats.
    engram_layers: list[int] = dataclasses.field(default_factory=list)
    engram_orders: list[int] = dataclasses.field(default_factory=lambda: [2, 3])
    engram_heads: int = 2
    engram_rows: int = 65521
    engram_dim: int = 32
    engram_kernel: int = 4  # taps of its causal depthwise convolution
    # The trainer looks the Engram rows up before the forward and pushes their gradients
    # without waiting (the values read are the same); false: looked up and pushed in turn.
    engram_prefetch: bool = True
    value_lr: float = bounded(1e-3, gt=0)  # Adam lr of the local value tables
    seed: int = bounded(0, min=0)  # dense init and local table values

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        return dataclass_from_dict(cls, d, "model")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.ffn_hidden is None:
            self.ffn_hidden = 8 * math.ceil(8 * self.dim / 3 / 8)
        if self.mem_value_dim is None:
            self.mem_value_dim = self.dim
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise InvalidArgument(
                "n_heads",
                f"a divisor of dim={self.dim} leaving an even head width (rotary pairs)",
                self.n_heads,
            )
        self._check_layer_lists()
        if self.memory_layers:
            self.memory_args()  # validates the mem_* fields
        if self.engram_layers:
            self.engram_args(self.engram_layers[0])  # validates the engram_* fields
        if self.pkm_peer and (
            self.memory_plus or self.mem_value_dim != self.dim or self.mem_key_dim % 2
        ):
            raise InvalidArgument(
                "pkm_peer",
                "memory_plus false, mem_value_dim = dim and "
                "an even mem_key_dim (PKM: no gate, values of width "
                "dim, two key halves)",
                self.pkm_peer,
            )

    def _check_layer_lists(self) -> None:
        layers = self.memory_layers
        if len(set(layers)) != len(layers) or any(not 0 <= i < self.n_layers for i in layers):
            raise InvalidArgument(
                "memory_layers", f"distinct indices in [0, {self.n_layers})", layers
            )
        self.memory_layers = sorted(layers)
        engram = self.engram_layers
        if len(set(engram)) != len(engram) or any(not 0 <= i < self.n_layers for i in engram):
            raise InvalidArgument(
                "engram_layers", f"distinct indices in [0, {self.n_layers})", engram
            )
        self.engram_layers = sorted(engram)
        widths = self.layer_ffn_hidden
        if widths is not None and len(widths) != self.n_layers:
            raise InvalidArgument("layer_ffn_hidden", f"a list of {self.n_layers} ints", widths)

    def memory_args(self) -> MemoryLayerArgs:
        """The MemoryLayerArgs of every memory layer; errors name the mem_* field."""
        fields = dict(
            heads="mem_heads",
            k="mem_k",
            n_keys="mem_n_keys",
            key_dim="mem_key_dim",
            value_dim="mem_value_dim",
            qk_norm="mem_qk_norm",
        )
        try:
            return MemoryLayerArgs(
                dim=self.dim,
                memory_plus=self.memory_plus,
                value_lr=self.value_lr,
                seed=self.seed,
                **{ours: getattr(self, f) for ours, f in fields.items()},
            )
        except InvalidArgument as e:
            raise InvalidArgument(fields.get(e.field, e.field), e.expected, e.got) from None

    def engram_args(self, layer: int) -> EngramArgs:
        """The EngramArgs of the Engram layer after layer ``layer`` (its hash seeded by
        seed + layer); errors name the engram_* field."""
        fields = dict(
            orders="engram_orders",
            heads="engram_heads",
            rows="engram_rows",
            head_dim="engram_dim",
            kernel_size="engram_kernel",
        )
        try:
            return EngramArgs(
                dim=self.dim,
                norm_eps=self.norm_eps,
                value_lr=self.value_lr,
                seed=self.seed + layer,
                **{ours: getattr(self, f) for ours, f in fields.items()},
            )
        except InvalidArgument as e:
            raise InvalidArgument(fields.get(e.field, e.field), e.expected, e.got) from None

    def ffn_width(self, layer: int) -> int:
        return self.layer_ffn_hidden[layer] if self.layer_ffn_hidden else self.ffn_hidden


# ---- value tables ------------------------------------------------------------------


def table_users(args: ModelArgs) -> dict[str, list[int]]:
    """Table name -> the layers whose memory or Engram layer reads it, in layer order."""
    users = {}
    if args.memory_layers and not args.pkm_peer:
        if args.shared_memory:
            users[SHARED_TABLE] = list(args.memory_layers)
        else:
            users.update({f"{SHARED_TABLE}.{i}": [i] for i in args.memory_layers})
    users.update({engram_table(i): [i] for i in args.engram_layers})
    return users


def engram_table(layer: int) -> str:
    """The name of the table of the Engram layer after layer ``layer``."""
    return f"{ENGRAM_TABLE}.{layer}"


def table_specs(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """Table name -> (rows, dim), so a trainer can create the distributed tables."""
    specs = {}
    for name in table_users(args):
        if name.startswith(f"{ENGRAM_TABLE}."):
            heads = len(args.engram_orders) * args.engram_heads
            specs[name] = (sum(engram_primes(args.engram_rows, heads)), args.engram_dim)
        else:
            specs[name] = (args.mem_n_keys**2, args.mem_value_dim)
    return specs


def _local_tables(args: ModelArgs) -> dict[str, ValueTable]:
    """One local ShardTable per name, with lazy Adam at value_lr."""
    specs, tables = table_specs(args), {}
    for name, users in table_users(args).items():
        rows, dim = specs[name]
        tables[name] = memstore.ShardTable(
            rows, dim, optimizer=memstore.Adam(lr=args.value_lr), seed=args.seed + users[0]
        )
    return tables


# ---- blocks ------------------------------------------------------------------------


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, ...]:
    """cos and sin (max_seq_len, head_dim/2) of the rotary angles."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (B, heads, T, head_dim) by position."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.dim // args.n_heads
        self.qkv = nn.Linear(args.dim, 3 * args.dim, bias=False)
        self.proj = nn.Linear(args.dim, args.dim, bias=False)
        nn.init.normal_(self.qkv.weight, std=INIT_STD)
        nn.init.normal_(self.proj.weight, std=INIT_STD / math.sqrt(2 * args.n_layers))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos[:T], sin[:T]), apply_rotary(k, cos[:T], sin[:T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) ⊙ w3 x)."""

    def __init__(self, dim: int, hidden: int, n_layers: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        for linear in (self.w1, self.w3):
            nn.init.normal_(linear.weight, std=INIT_STD)
        nn.init.normal_(self.w2.weight, std=INIT_STD / math.sqrt(2 * n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _ScaledBag(nn.Module):
    """``c · embedding_bag(idx, p)``, the value read of :func:`pkm_peer_layer`."""

    def __init__(self, weight: torch.Tensor, scale: float):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(weight.detach() / scale)

    def forward(self, idx: torch.Tensor, per_sample_weights: torch.Tensor) -> torch.Tensor:
        return self.scale * F.embedding_bag(
            idx, self.weight, per_sample_weights=per_sample_weights, mode="sum"
        )


def pkm_peer_layer(args: ModelArgs) -> nn.Module:
    """lucidrains' PKM with this model's memory shape (``pkm_peer``): heads, top-k,
    sub-keys and key width (its dim_head is one half's width), values of width dim,
    with its own init; the value read scaled by ``pkm_value_scale``."""
    from product_key_memory import PKM

    layer = PKM(
        args.dim,
        heads=args.mem_heads,
        num_keys=args.mem_n_keys,
        topk=args.mem_k,
        dim_head=args.mem_key_dim // 2,
    )
    layer.values = _ScaledBag(layer.values.weight, args.pkm_value_scale)
    return layer


class Block(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        layer: int,
        table: ValueTable | None,
        engram_table: ValueTable | None = None,
    ):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attn = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        if args.pkm_peer and layer in args.memory_layers:
            self.ffn = pkm_peer_layer(args)
        elif table is None:
            self.ffn = FeedForward(args.dim, args.ffn_width(layer), args.n_layers)
        else:
            self.ffn = MemoryLayer(args.memory_args(), table=table)
        self.engram = None
        if engram_table is not None:
            self.engram = EngramLayer(args.engram_args(layer), table=engram_table)
            self.engram.async_push = args.engram_prefetch
            # projections as the dense weights; the value path writes the residual stream
            nn.init.normal_(self.engram.key.weight, std=INIT_STD)
            nn.init.normal_(self.engram.value.weight, std=INIT_STD / math.sqrt(2 * args.n_layers))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        tokens: torch.Tensor,
        fetch: EngramFetch | None = None,
    ) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), cos, sin)
        out = h + self.ffn(self.ffn_norm(h))
        if self.engram is None:
            return out
        if fetch is not None:
            return out + self.engram(out, fetch=fetch)
        return out + self.engram(out, tokens)


# ---- model -------------------------------------------------------------------------


class Transformer(nn.Module):
    """Decoder-only LM: tokens (B, T) -> logits (B, T, vocab_size).

    ``tables`` maps each name of :func:`table_specs` to a value table; None creates
    local ShardTables. ``rank`` is this process's data-parallel rank and
    ``micro_batches`` the backward passes it makes per step (gradient accumulation);
    they set the push ids (module docstring).
    """

    def __init__(
        self,
        args: ModelArgs,
        tables: dict[str, ValueTable] | None = None,
        rank: int = 0,
        micro_batches: int = 1,
    ):
        super().__init__()
        self.args = args
        self.rank = check_positive_int("rank", rank, 0)
        self.micro_batches = check_positive_int("micro_batches", micro_batches)
        self._tables = _local_tables(args) if tables is None else dict(tables)
        if set(self._tables) != set(table_specs(args)):
            raise InvalidArgument(
                "tables", f"exactly the tables {sorted(table_specs(args))}", sorted(self._tables)
            )
        engram_names = {engram_table(i) for i in args.engram_layers}
        tables = {
            layer: self._tables[name]
            for name, users in table_users(args).items()
            if name not in engram_names
            for layer in users
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            self.embed = nn.Embedding(args.vocab_size, args.dim)
            self.layers = nn.ModuleList(
                Block(args, i, tables.get(i), self._tables.get(engram_table(i)))
                for i in range(args.n_layers)
            )
            self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
            nn.init.normal_(self.embed.weight, std=INIT_STD)
            nn.init.normal_(self.output.weight, std=INIT_STD)
        cos, sin = rotary_tables(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.set_step(None)

    def forward(
        self, tokens: torch.Tensor, engram: dict[int, EngramFetch] | None = None
    ) -> torch.Tensor:
        """Logits of ``tokens``; ``engram``: the Engram layers' fetches of these tokens
        (:meth:`prefetch_engram`), None: they look their rows up themselves."""
        if tokens.dim() != 2 or not 1 <= tokens.shape[1] <= self.args.max_seq_len:
            raise InvalidArgument(
                "tokens", f"(B, T) with 1 <= T <= {self.args.max_seq_len}", tuple(tokens.shape)
            )
        if engram is not None and set(engram) != set(self.args.engram_layers):
            raise InvalidArgument(
                "engram", f"fetches of the layers {self.args.engram_layers}", sorted(engram)
            )
        engram = engram or {}
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rope_cos, self.rope_sin, tokens, engram.get(i))
        return self.output(self.norm(x)).float()

    def prefetch_engram(self, tokens: torch.Tensor) -> dict[int, EngramFetch]:
        """Layer -> the rows of ``tokens`` (B, T) its Engram layer reads, with their
        lookup issued now (``EngramLayer.prefetch``), for ``forward(tokens, engram=...)``."""
        return {i: self.layers[i].engram.prefetch(tokens) for i in self.args.engram_layers}

    def take_engram_pushes(self) -> dict[str, list]:
        """Table name -> the futures of the Engram pushes issued since the last call."""
        return {
            engram_table(i): self.layers[i].engram.take_pushes() for i in self.args.engram_layers
        }

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the target positions where ``batch.mask`` is True
        (every position when the mask is None)."""
        logits = self(batch.inputs)
        nll = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
        if batch.mask is None:
            return nll.mean()
        mask = batch.mask.flatten().to(nll.dtype)
        return (nll * mask).sum() / mask.sum().clamp_min(1)

    # ---- value tables --------------------------------------------------------------
    def value_tables(self) -> dict[str, ValueTable]:
        """Name -> value table (one entry when shared). Call ``table.step(s)`` on each
        after the dense optimizer's step."""
        return dict(self._tables)

    def table_specs(self) -> dict[str, tuple[int, int]]:
        return table_specs(self.args)

    def pushes_per_rank(self) -> dict[str, int]:
        """Name -> pushes of one rank per step (distinct push ids)."""
        return {
            name: len(users) * self.micro_batches for name, users in table_users(self.args).items()
        }

    def peer_values(self) -> list[nn.Parameter]:
        """The value parameters of the ``pkm_peer`` layers (none otherwise)."""
        if not self.args.pkm_peer:
            return []
        return [self.layers[i].ffn.values.weight for i in self.args.memory_layers]

    def memory_layers(self) -> list[MemoryLayer]:
        """The MemoryLayers (none for a ``pkm_peer`` model)."""
        return [] if self.args.pkm_peer else [self.layers[i].ffn for i in self.args.memory_layers]

    def engram_layers(self) -> list[EngramLayer]:
        """The EngramLayers, in layer order."""
        return [self.layers[i].engram for i in self.args.engram_layers]

    def set_step(
        self, step: int | None, micro_batch: int = 0, value_lr: float | None = None
    ) -> None:
        """Tag the row gradients of the next backward with ``step`` (None: each
        table's next step) and the push ids of micro-batch ``micro_batch`` in
        [0, micro_batches); the tables apply that step with ``value_lr`` (None: their
        optimizer's lr)."""
        for name, users in table_users(self.args).items():
            engram = name.startswith(f"{ENGRAM_TABLE}.")
            for position, i in enumerate(users):
                layer = self.layers[i].engram if engram else self.layers[i].ffn
                layer.push_id = push_id(
                    self.rank,
                    position,
                    micro_batch,
                    layers=len(users),
                    micro_batches=self.micro_batches,
                )
                layer.step, layer.value_lr = step, value_lr


# ---- the dense baseline ------------------------------------------------------------


def ffn_slot_macs(args: ModelArgs, layer: int) -> int:
    """Multiply-adds per token of layer ``layer``'s FFN slot (FFN or memory layer).

    A memory layer counts its query net, the sub-key scores of both halves, the
    weighted bag of heads·k rows and, for Memory+, the gate and output projection.
    Top-k selection (comparisons) and the sparse value update are not counted.
    """
    if layer not in args.memory_layers:
        return 3 * args.dim * args.ffn_width(layer)
    macs = args.dim * args.mem_heads * args.mem_key_dim  # query net (both halves)
    macs += args.mem_heads * args.mem_n_keys * args.mem_key_dim  # 2 halves × n × key_dim/2
    macs += args.mem_heads * args.mem_k * args.mem_value_dim  # bag of value rows
    if args.memory_plus:
        macs += 2 * args.dim * args.mem_value_dim  # gate and output projection
    return macs


def engram_macs(args: ModelArgs) -> int:
    """Multiply-adds per token of one Engram layer: the sum of its rows read (one per
    head, weight 1), the key and value projections, the gate's dot product and the
    depthwise convolution. Hashing (integer work) and norms are not counted."""
    memory = len(args.engram_orders) * args.engram_heads * args.engram_dim
    return memory + 2 * memory * args.dim + args.dim + args.engram_kernel * args.dim


def dense_equivalent(args: ModelArgs) -> ModelArgs:
    """The dense baseline of the same per-token compute.

    Every memory layer becomes a SwiGLU FFN whose width makes its multiply-adds per
    token (3·dim·hidden) match the memory layer's (:func:`ffn_slot_macs`), and every
    Engram layer's multiply-adds (:func:`engram_macs`) widen the FFN of its layer, each
    width rounded to the nearest width >= 1; every other layer keeps its FFN. The
    memory parameters (values and keys) and the Engram layers are gone: this is the
    iso-FLOP baseline, not an iso-parameter one. Attention, embeddings and the other
    layers are unchanged.
    """
    widths = [args.ffn_width(i) for i in range(args.n_layers)]
    for i in set(args.memory_layers) | set(args.engram_layers):
        macs = ffn_slot_macs(args, i) + (engram_macs(args) if i in args.engram_layers else 0)
        widths[i] = max(1, round(macs / (3 * args.dim)))
    return dataclasses.replace(args, memory_layers=[], engram_layers=[], layer_ffn_hidden=widths)
