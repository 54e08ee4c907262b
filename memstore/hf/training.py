"""Train memory layers with ``transformers.Trainer``, in one process or in Ray Train.

:class:`MemoryCallback` does per optimizer step what a training loop of one's own does
with :class:`memstore.trainer.memory.MemoryPushes`: it tags each micro-batch's backward
with the step and a push id distinct over ranks, micro-batches and the layers reading
one table, and steps each local table once the optimizer has stepped. A store table
made with ``step_on_push`` applies the step with its last push (the way for several
processes: none of them reads the values before every push of the step is in); one
without it is stepped by the callback, in one process. Under data parallelism the
pushes are scaled by 1 / world size (see :class:`memstore.hf.layers.PushScaledTable`),
so that the values, like the dense weights, get the mean of the ranks' gradients.
"""

from __future__ import annotations

from transformers import TrainerCallback

from memstore.errors import InvalidArgument
from memstore.shard_table import ShardTable
from memstore.trainer.memory import MemoryPushes, pushes_per_step

from .layers import memory_mlps

__all__ = ["MemoryCallback"]


class MemoryCallback(TrainerCallback):
    """Steps the value tables of a model's memory layers with the Trainer's optimizer.

    Pass it to ``Trainer(..., callbacks=[MemoryCallback()])``. Table step s is the
    Trainer's optimizer step s counted on from the table's last applied step, so a
    model trained again, or restored from a checkpoint, goes on where its table is.
    """

    def __init__(self):
        self._pushes: MemoryPushes | None = None
        self._views: list = []
        self._offsets: dict[int, int] = {}  # id(view) -> table step of global step 0
        self._micro_batch = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        mlps = [m for _, m in memory_mlps(model)]
        if not mlps:
            raise InvalidArgument("model", "a model with memory layers (add_memory_layers)", None)
        world, micro = args.world_size, args.gradient_accumulation_steps
        layers = [m.memory for m in mlps]
        self._views = []
        for layer in layers:
            if not any(layer.table is v for v in self._views):
                self._views.append(layer.table)
        for view in self._views:
            readers = sum(layer.table is view for layer in layers)
            _check_table(view.base, world, pushes_per_step(world, readers, micro))
            view.push_scale = 1.0 / world
            self._offsets[id(view)] = view.base.last_step - state.global_step
        self._pushes = MemoryPushes(layers, rank=args.process_index, micro_batches=micro)

    def _tag(self, state) -> None:
        self._pushes.set_step(None, self._micro_batch)
        for layer in self._pushes.layers:
            layer.step = self._offsets[id(layer.table)] + state.global_step + 1

    def on_step_begin(self, args, state, control, **kwargs):
        self._micro_batch = 0
        self._tag(state)

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro_batch += 1
        self._tag(state)

    def on_step_end(self, args, state, control, **kwargs):
        micro = self._micro_batch + 1
        for view in self._views:
            step = self._offsets[id(view)] + state.global_step
            base = view.base
            if isinstance(base, ShardTable):
                base.step(step)
            elif getattr(base, "config", {}).get("step_on_push"):
                if micro != self._pushes.micro_batches:
                    raise InvalidArgument(
                        "gradient_accumulation_steps",
                        f"a divisor of the batches per epoch: table {base.name!r} applies a "
                        f"step with its {self._pushes.micro_batches}-micro-batch pushes",
                        f"a step of {micro} micro-batches",
                    )
            else:
                base.step(step)

    def on_train_end(self, args, state, control, **kwargs):
        for view in self._views:
            view.push_scale = 1.0


def _check_table(table, world: int, pushes: int) -> None:
    """Refuse, before the first step, a table on which this run could not train."""
    if isinstance(table, ShardTable):
        if world > 1:
            raise InvalidArgument(
                "table",
                f"a memstore table (create_table / connect) to train on {world} processes",
                "a local ShardTable (each process would train its own copy)",
            )
        return
    config = getattr(table, "config", {})  # a store table's; other ValueTables have none
    if world > 1 and not config.get("step_on_push"):
        raise InvalidArgument(
            "table",
            f"a table created with step_on_push=True to train on {world} processes",
            f"table {getattr(table, 'name', table)!r} without it",
        )
    if config.get("step_on_push") and config.get("pushes_per_step") != pushes:
        raise InvalidArgument(
            "pushes_per_step",
            f"{pushes} for table {table.name!r} (world size x micro-batches x its layers)",
            config.get("pushes_per_step"),
        )
