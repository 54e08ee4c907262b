"""Fine-tuning: a run that starts from another run's checkpoint and trains part of the
model (the ``finetune`` section of the config, :class:`trainer.config.FinetuneArgs`).

The run loads the dense parameters and the value tables of ``finetune.from`` (a run
directory's newest complete checkpoint, or one ``checkpoints/step-N`` folder). The
values keep their row statistics and snapshots (the background of ``sparse_memory``);
their optimizer starts afresh, as the dense one does, and their steps are numbered from
1 again. Then ``finetune.method`` decides what trains:

- ``full``: every dense parameter, and every value row a step reads;
- ``lora``: peft's LoRA adapters (rank ``lora_rank``, scale ``lora_alpha / rank``) on
  the attention and FFN projections (:data:`LORA_TARGETS`); everything else frozen,
  the values too (each step is applied with an empty row set: the statistics are
  counted, no row changes);
- ``memory``: every value row a step reads; the dense parameters frozen;
- ``sparse_memory``: the ``top_t`` rows of each step by TF-IDF of the step's accesses
  against the snapshot ``background`` (``Table.step(top_t=, background=)``); the
  dense parameters frozen.

A frozen parameter has ``requires_grad`` False and is in no optimizer: it stays the
same bit for bit. A memory layer's rows get their gradients from the backward of its
lookup, which autograd runs only when the lookup's weights require grad; with every
parameter before the layer frozen they would not, so a forward pre-hook makes the
layer's input a leaf that requires grad (a graph of frozen parameters has nothing
else a gradient could reach). Only the local tables of ``workers: 0`` load from a
checkpoint here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import memstore
from memstore import InvalidArgument
from memstore import checkpoint as store_checkpoint

from . import checkpoint
from .config import FinetuneArgs, FinetuneMethod

log = logging.getLogger(__name__)

__all__ = ["LORA_TARGETS", "FrozenOptimizer", "prepare", "start_from", "table_step"]

# The attention (qkv, proj) and SwiGLU FFN (w1, w2, w3) projections of trainer.model.
LORA_TARGETS = ["qkv", "proj", "w1", "w2", "w3"]
# Model fields that may differ from the checkpoint's: they act before loading only.
_NOT_ARCHITECTURE = {"value_lr", "seed"}


def checkpoint_dir(source: str, tables: list[str]) -> Path:
    """The checkpoint folder ``finetune.from`` names: itself when it holds a model
    file, else the newest complete checkpoint of the run directory."""
    path = Path(source)
    if (path / checkpoint.MODEL_FILE).is_file():
        return path
    steps = checkpoint.checkpoint_steps(path, tables) if path.is_dir() else []
    if not steps:
        raise InvalidArgument(
            "finetune.from",
            "a run directory with a complete checkpoint, or a checkpoints/step-N folder",
            source,
        )
    return Path(checkpoint.step_dir(path, steps[-1]))


def _fresh_optimizer(sd: dict) -> dict:
    """A table state with its values and row statistics, its optimizer state zeroed
    and its step count back at 0 (the fine-tuning run numbers its steps from 1)."""
    state = {k: torch.zeros_like(v) for k, v in sd["state"].items()}
    return {**sd, "state": state, "last_step": 0, "updates": 0}


def start_from(model: torch.nn.Module, ft: FinetuneArgs) -> Path:
    """Load ``ft.from_``'s dense parameters and value tables into ``model`` (local
    tables); returns the checkpoint folder. The checkpoint must be of the same model,
    and ``ft.background`` a statistics snapshot of every table in it."""
    tables = model.value_tables()
    folder = checkpoint_dir(ft.from_, list(tables))
    state, stores = checkpoint.read(folder)
    ours, theirs = model.args.to_dict(), dict(state.get("model_args") or {})
    differ = sorted(
        k for k in (set(ours) | set(theirs)) - _NOT_ARCHITECTURE if ours.get(k) != theirs.get(k)
    )
    if differ:
        raise InvalidArgument(
            "finetune.from", "a checkpoint of this run's model", f"a model differing in {differ}"
        )
    model.load_state_dict(state["model"])
    for name, table in tables.items():
        if not isinstance(table, memstore.ShardTable):
            raise InvalidArgument(
                "finetune.from", "a run with local value tables (workers: 0)", type(table).__name__
            )
        table.load_state_dict(
            _fresh_optimizer(store_checkpoint.load_block(stores["tables"][name], table.spec))
        )
        if ft.background is not None:
            try:
                table.row_stats(background=ft.background)
            except InvalidArgument as e:
                raise InvalidArgument(
                    "finetune.background", f"{e.expected} in {folder}", ft.background
                ) from None
    log.info("fine-tuning (%s) from %s", ft.method.value, folder)
    return folder


def prepare(model: torch.nn.Module, ft: FinetuneArgs) -> list[torch.nn.Parameter]:
    """Freeze what ``ft.method`` does not train (LoRA: inject the adapters first);
    returns the dense parameters that train."""
    if ft.method is FinetuneMethod.FULL:
        return [p for p in model.parameters() if p.requires_grad]
    if ft.method is FinetuneMethod.LORA:
        _inject_lora(model, ft)
    for name, p in model.named_parameters():
        p.requires_grad_(ft.method is FinetuneMethod.LORA and ".lora_" in name)
    for layer in model.memory_layers():
        layer.register_forward_pre_hook(_input_requires_grad)
    return [p for p in model.parameters() if p.requires_grad]


def _inject_lora(model: torch.nn.Module, ft: FinetuneArgs) -> None:
    try:
        import peft
    except ImportError as e:
        raise InvalidArgument(
            "finetune.method", "lora with peft installed (pip install 'memstore[finetune]')", "lora"
        ) from e
    config = peft.LoraConfig(
        r=ft.lora_rank, lora_alpha=ft.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS
    )
    with torch.random.fork_rng(devices=[]):  # the adapters' init: seeded as the model is
        torch.manual_seed(model.args.seed)
        peft.inject_adapter_in_model(config, model)


def _input_requires_grad(module, inputs):
    """Forward pre-hook of a memory layer: its input as a leaf requiring grad when
    nothing before it does, so that the lookup's backward pushes the row gradients."""
    (x,) = inputs
    if torch.is_grad_enabled() and not x.requires_grad:
        return (x.detach().requires_grad_(),)
    return None


def table_step(table, step: int, ft: FinetuneArgs) -> int:
    """Apply ``step`` on ``table`` (a ShardTable or a store Table) as ``ft.method``
    trains the values; returns the rows updated."""
    if ft.method is FinetuneMethod.SPARSE_MEMORY:
        return table.step(step, top_t=ft.top_t, background=ft.background)
    if ft.method is FinetuneMethod.LORA:
        return table.step(step, rows=[])  # values frozen; the accesses are still counted
    return table.step(step)


class FrozenOptimizer:
    """The dense optimizer of a run whose dense parameters are all frozen: no groups,
    no state, a step that changes nothing."""

    def __init__(self):
        self.param_groups: list = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": []}

    def load_state_dict(self, state: dict) -> None:
        if state.get("state") or state.get("param_groups"):
            raise InvalidArgument(
                "optimizer", "the state of a run with no dense parameter", "a state with groups"
            )
