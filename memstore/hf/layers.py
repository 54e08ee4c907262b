"""Memory layers inside a Hugging Face decoder: find the MLPs, wrap them, tag the tables.

A decoder-only ``transformers`` model keeps its blocks in a ``ModuleList`` named
``layers`` (Llama, Qwen2/3, Mistral, Gemma, ...) or ``h`` (GPT-2) on its decoder
(``model.get_decoder()``, else ``model.base_model``), and every block calls
``self.mlp(hidden_states)`` on the hidden states after its post-attention norm. So the
integration needs no list of model classes: it replaces ``block.mlp`` by a
:class:`MemoryMLP` that reads the same input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from memstore.errors import InvalidArgument
from memstore.memory_layer import MemoryLayer, MemoryLayerArgs, ValueTable
from memstore.optim import Adam
from memstore.shard_table import ShardTable

__all__ = ["MemoryMLP", "PushScaledTable", "add_memory_layers", "decoder_blocks", "memory_mlps"]

MODES = ("parallel", "replace")
EXPECTED_MODEL = (
    "a decoder-only transformers causal LM whose decoder (model.get_decoder() or "
    "model.base_model) holds its blocks in a ModuleList `layers` or `h`, each block "
    "with an `mlp` module"
)


class PushScaledTable:
    """A value table whose pushed row gradients are scaled by ``push_scale``.

    The store sums the pushes of a step while data-parallel training averages the
    dense gradients over ranks; with ``push_scale = 1 / world_size`` the values get the
    mean of the ranks' gradients too. The returned dw (the gradient of the weights,
    dense) is unscaled. One view per table, shared by the layers that read it, so
    that layers reading one table are recognised as such (``m.table is n.table``).
    """

    def __init__(self, base: ValueTable):
        self.base = base
        self.push_scale = 1.0

    @property
    def rows(self) -> int:
        return self.base.rows

    @property
    def dim(self) -> int:
        return self.base.dim

    def lookup(self, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.base.lookup(idx, w)

    def backward(self, idx, w, dy, step=None, push_id: int = 0, lr=None) -> torch.Tensor:
        kwargs = {} if lr is None else {"lr": lr}
        if self.push_scale == 1.0:
            return self.base.backward(idx, w, dy, step=step, push_id=push_id, **kwargs)
        dw = self.base.backward(idx, w, dy * self.push_scale, step=step, push_id=push_id, **kwargs)
        return dw / self.push_scale  # dw is linear in dy

    def step(self, step: int | None = None, lr: float | None = None) -> int:
        return self.base.step(step, lr=lr)


class MemoryMLP(nn.Module):
    """What a decoder block calls as its ``mlp``: a memory layer in place of the MLP
    (``mlp=None``) or beside it, its output added to the MLP's.

    ``out``: the zero-initialised output projection of a PKM memory beside an MLP
    (Memory+ has its own, zeroed instead), so that the block's output is the MLP's,
    bit for bit, until training moves it.
    """

    def __init__(self, memory: MemoryLayer, mlp: nn.Module | None = None, out=None):
        super().__init__()
        self.memory = memory
        self.mlp = mlp
        self.out = out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self._read_memory(x)
        if self.mlp is None:
            return y
        return self.mlp(x, *args, **kwargs) + y

    def _read_memory(self, x: torch.Tensor) -> torch.Tensor:
        """The memory's output in x's dtype. Under autocast (mixed precision) the memory
        runs in its parameters' dtype: the top-k takes queries and keys of one dtype,
        and ranking the keys is where low precision would change which rows are read."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = self.memory(x.to(self.memory.keys.dtype))
            if self.out is not None:
                y = self.out(y)
        return y.to(x.dtype)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model``, each with an ``mlp``; InvalidArgument otherwise."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise InvalidArgument("model", EXPECTED_MODEL, f"{type(model).__name__} (encoder-decoder)")
    candidates = []
    if callable(getattr(model, "get_decoder", None)):
        candidates.append(model.get_decoder())
    candidates += [getattr(model, "base_model", None), model]
    for module in candidates:
        for name in ("layers", "h"):
            blocks = getattr(module, name, None)
            if (
                isinstance(blocks, nn.ModuleList)
                and len(blocks) > 0
                and all(isinstance(getattr(b, "mlp", None), nn.Module) for b in blocks)
            ):
                return blocks
    raise InvalidArgument("model", EXPECTED_MODEL, type(model).__name__)


def memory_mlps(model: nn.Module) -> list[tuple[int, MemoryMLP]]:
    """(block index, MemoryMLP) of every block of ``model`` that has a memory layer."""
    return [(i, b.mlp) for i, b in enumerate(decoder_blocks(model)) if isinstance(b.mlp, MemoryMLP)]


def _check_layers(layers, count: int) -> list[int]:
    expected = f"a non-empty list of distinct block indices in [0, {count})"
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise InvalidArgument("layers", expected, layers)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count:
            raise InvalidArgument("layers", expected, layers)
    if len(set(layers)) != len(layers):
        raise InvalidArgument("layers", expected, layers)
    return list(layers)


def _tables(table, args: MemoryLayerArgs, layers: list[int], device) -> list[PushScaledTable]:
    """One view per layer: local ShardTables (``table=None``), one table shared by all
    layers, or one table each (a list as long as ``layers``)."""
    rows = args.n_keys**2
    if table is None:
        return [
            PushScaledTable(
                ShardTable(
                    rows,
                    args.value_dim,
                    optimizer=Adam(lr=args.value_lr),
                    seed=args.seed + position,
                    device=str(device),
                )
            )
            for position in range(len(layers))
        ]
    if isinstance(table, (list, tuple)):
        if len(table) != len(layers):
            raise InvalidArgument("table", f"a list of {len(layers)} tables (one per layer)", table)
        views: dict[int, PushScaledTable] = {}  # a table listed twice is shared
        return [views.setdefault(id(t), _view(t, args)) for t in table]
    view = _view(table, args)
    return [view] * len(layers)


def _view(table, args: MemoryLayerArgs) -> PushScaledTable:
    base = table.base if isinstance(table, PushScaledTable) else table
    for attr in ("rows", "dim", "lookup", "backward", "step"):
        if not hasattr(base, attr):
            raise InvalidArgument(
                "table",
                "None, a memstore table or ShardTable, or a list of them",
                type(base).__name__,
            )
    rows = args.n_keys**2
    if (base.rows, base.dim) != (rows, args.value_dim):
        raise InvalidArgument(
            "table", f"a {rows} x {args.value_dim} value table", f"{base.rows} x {base.dim}"
        )
    return table if isinstance(table, PushScaledTable) else PushScaledTable(base)


def _memory_mlp(block: nn.Module, args, view, mode: str) -> MemoryMLP:
    like = next(block.mlp.parameters(), None)
    memory = MemoryLayer(args, table=view)
    if mode == "replace":
        wrapper = MemoryMLP(memory)
    elif args.memory_plus:
        nn.init.zeros_(memory.out.weight)
        wrapper = MemoryMLP(memory, block.mlp)
    else:
        out = nn.Linear(args.value_dim, args.dim, bias=False)
        nn.init.zeros_(out.weight)
        wrapper = MemoryMLP(memory, block.mlp, out)
    if like is not None:
        wrapper.to(device=like.device, dtype=like.dtype)
    return wrapper


def add_memory_layers(
    model: nn.Module,
    layers: Sequence[int],
    args: MemoryLayerArgs,
    mode: str = "parallel",
    table=None,
) -> nn.Module:
    """Add memory layers to the decoder blocks ``layers`` of a ``transformers`` causal LM,
    in place; returns ``model``.

    ``mode``: "replace" (the block's MLP becomes the memory layer: training from
    scratch) or "parallel" (a memory layer beside the MLP, its output projection at
    zero: the outputs of a pretrained model are unchanged until it trains). The memory
    layer reads the MLP's input, the hidden states after the post-attention norm.
    ``table``: None (a local ShardTable per layer, seeded ``args.seed + position``),
    one table for all the layers (a ``memstore`` table from ``create_table`` /
    ``connect`` puts the values in the store), or a list of one table per layer.
    Train with :class:`memstore.hf.MemoryCallback`; ``model.save_pretrained`` then
    saves the tables beside the weights, and :func:`memstore.hf.from_pretrained` loads.
    """
    from .saving import record_memory_config

    blocks = decoder_blocks(model)
    layers = _check_layers(layers, len(blocks))
    if not isinstance(args, MemoryLayerArgs):
        raise InvalidArgument("args", "a MemoryLayerArgs", type(args).__name__)
    if mode not in MODES:
        raise InvalidArgument("mode", "'parallel' or 'replace'", mode)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int) and args.dim != hidden:
        raise InvalidArgument("args.dim", f"{hidden} (the model's hidden_size)", args.dim)
    taken = [i for i in layers if isinstance(blocks[i].mlp, MemoryMLP)]
    if taken:
        raise InvalidArgument("layers", "blocks without a memory layer yet", taken)
    device = next(model.parameters()).device
    views = _shared_views(model, _tables(table, args, layers, device))
    for i, view in zip(layers, views, strict=True):
        blocks[i].mlp = _memory_mlp(blocks[i], args, view, mode)
    record_memory_config(model, layers, args, mode)
    return model


def _shared_views(model: nn.Module, views: list[PushScaledTable]) -> list[PushScaledTable]:
    """Reuse the view of a table that memory layers added earlier already read: one
    view per table is how layers sharing it are told apart (push ids)."""
    known = {id(m.memory.table.base): m.memory.table for _, m in memory_mlps(model)}
    return [known.setdefault(id(v.base), v) for v in views]
