"""Memory layers in your own Ray Train job: push ids, and DDP beside a value table.

A table applies step s once it got ``pushes_per_step`` pushes of s, and takes a second
push with the same (step, push_id) for a retry of the first (it is ignored). So every
backward that reaches a table within one step needs its own push id: each rank's, and
within a rank each memory layer's that reads the table and each micro-batch's. This
module derives them, so a training loop never computes one by hand::

    # driver
    table = memstore.create_table("facts", rows, dim, shards=2, step_on_push=True,
                                  pushes_per_step=pushes_per_step(workers, layers=2))

    # train_loop_per_worker
    table = memstore.connect("facts")
    model = MyModel(MemoryLayer(args, table=table), MemoryLayer(args, table=table))
    model = sum_dense_gradients(ray.train.torch.prepare_model(model))
    pushes = MemoryPushes(model.module.memory_layers)  # rank: ray.train.get_context()
    for step in range(1, steps + 1):
        pushes.set_step(step)                 # before the forward of that step
        loss = local_loss_sum / global_target_count
        loss.backward()                       # pushes; the last one applies the step
        optimizer.step()

``examples/ray_train_memory.py`` is that loop, complete.

Why :func:`sum_dense_gradients`: the store sums the row gradients of all pushes of a
step, while DDP averages dense gradients over ranks. With the loss of each rank scaled
to its share of the global batch (its token losses summed, divided by the global
count), summing both gives every parameter the gradient of the global mean loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memstore import InvalidArgument, MemoryLayer
from memstore._internal.validation import check_positive_int

__all__ = ["push_id", "pushes_per_step", "MemoryPushes", "sum_dense_gradients"]


def push_id(
    rank: int, layer: int = 0, micro_batch: int = 0, *, layers: int = 1, micro_batches: int = 1
) -> int:
    """The push id of memory layer ``layer`` (its position among the ``layers`` layers
    that read one table) of data-parallel ``rank`` in micro-batch ``micro_batch`` (of
    ``micro_batches`` per step): ``(rank · micro_batches + micro_batch) · layers + layer``,
    distinct for every backward of a step, and in [0, pushes_per_step)."""
    check_positive_int("rank", rank, 0)
    check_positive_int("layers", layers)
    check_positive_int("micro_batches", micro_batches)
    for name, value, count in (
        ("layer", layer, layers),
        ("micro_batch", micro_batch, micro_batches),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
            raise InvalidArgument(name, f"an int in [0, {count})", value)
    return (rank * micro_batches + micro_batch) * layers + layer


def pushes_per_step(world_size: int, layers: int = 1, micro_batches: int = 1) -> int:
    """Pushes a table gets per step from ``world_size`` ranks, each with ``layers``
    memory layers reading it and ``micro_batches`` backward passes per step."""
    check_positive_int("world_size", world_size)
    check_positive_int("layers", layers)
    check_positive_int("micro_batches", micro_batches)
    return world_size * micro_batches * layers


def _world_rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


class MemoryPushes:
    """Tags the MemoryLayers of one rank with the step and push id of each backward.

    ``layers``: the rank's MemoryLayers, in a fixed order (the same on every rank);
    layers reading the same table are numbered by their order among those. ``rank``:
    default the Ray Train world rank of this worker.
    """

    def __init__(
        self, layers: Sequence[MemoryLayer], rank: int | None = None, micro_batches: int = 1
    ):
        self.layers = list(layers)
        if not self.layers or not all(isinstance(m, MemoryLayer) for m in self.layers):
            raise InvalidArgument(
                "layers",
                "a non-empty sequence of MemoryLayers",
                [type(m).__name__ for m in self.layers],
            )
        self.rank = _world_rank() if rank is None else check_positive_int("rank", rank, 0)
        self.micro_batches = check_positive_int("micro_batches", micro_batches)
        self._position: list[tuple[int, int]] = []  # (position, layers) of each layer
        for layer in self.layers:
            readers = [m for m in self.layers if m.table is layer.table]
            self._position.append(
                (next(i for i, m in enumerate(readers) if m is layer), len(readers))
            )

    def per_rank(self, layer: MemoryLayer) -> int:
        """Pushes of one rank per step to the table ``layer`` reads."""
        return self.micro_batches * sum(m.table is layer.table for m in self.layers)

    def set_step(
        self, step: int | None, micro_batch: int = 0, value_lr: float | None = None
    ) -> None:
        """Tag the next backward: ``step`` (None: each table's next), micro-batch
        ``micro_batch`` of this step, and the lr the tables apply the step with (None:
        their optimizer's)."""
        for layer, (position, count) in zip(self.layers, self._position, strict=True):
            layer.step = step
            layer.push_id = push_id(
                self.rank, position, micro_batch, layers=count, micro_batches=self.micro_batches
            )
            layer.value_lr = value_lr


def _sum_allreduce(process_group, bucket):
    """DDP communication hook: the SUM of the ranks' gradients (DDP averages)."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def sum_dense_gradients(model: torch.nn.Module) -> torch.nn.Module:
    """Make a DistributedDataParallel ``model`` sum its ranks' gradients, as the store
    sums its pushes (module docstring); any other module (one rank) is returned as is."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model.register_comm_hook(None, _sum_allreduce)
    return model
