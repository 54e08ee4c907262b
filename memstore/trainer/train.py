"""Train the memory-layer LM: ``python -m memstore.trainer.train --config <name>`` (a
built-in config of ``memstore/trainer/configs/`` or a YAML path; also ``memstore train``),
with ``--set key=value`` overrides, ``--resume`` or ``--overwrite``.

This module wires the parts of the trainer together:

- ``config.py``: :class:`TrainArgs` and its sections, strict, from YAML;
- ``data.py`` and ``model.py``: the batches of every step, the transformer;
- ``replica.py``: one data-parallel rank (a step, the schedules, its state);
- ``loop.py``: the loop of a rank, and the in-process run (``workers: 0``);
- ``ray_train.py``: the run on Ray Train (``workers: W``), with the tables in the store;
- ``checkpoint.py``: the run's checkpoints, resume and the abandoned future;
- ``metrics.py``: metrics.jsonl, the plot, the progress bar;
- ``memory.py``: push ids and DDP beside a value table, for any Ray Train job;
- ``cli.py``: the command line.

Run directory::

    config.yaml                    the resolved config
    metrics.jsonl                  one line per step (and per evaluation)
    loss.png                       the loss curve (and eval recall), written at the end
    checkpoints/step-N/            model.pt (dense params, optimizer, RNG, counters) and
                                   store.json (the store checkpoints of step N)
    store/<table>/step-N/          the value table at step N (a memstore checkpoint)

With ``ray.storage_path`` the checkpoints and store go to ``<storage_path>/<run name>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memstore import InvalidArgument

from . import checkpoint
from .checkpoint import ABANDONED, CHECKPOINTS, STORE, checkpoint_steps
from .cli import main
from .config import DataArgs, RayArgs, StoreArgs, TrainArgs, load_config
from .data import StepData
from .loop import CONFIG, METRICS, PLOT, LocalRun
from .model import table_specs
from .replica import lr_at, value_lr_at

__all__ = [
    "TrainArgs",
    "DataArgs",
    "StoreArgs",
    "RayArgs",
    "load_config",
    "train",
    "main",
    "StepData",
    "lr_at",
    "value_lr_at",
    "checkpoint_steps",
    "table_specs",
    "METRICS",
    "PLOT",
    "CONFIG",
    "CHECKPOINTS",
    "STORE",
    "ABANDONED",
]


def train(
    args: TrainArgs,
    resume: bool = False,
    stop_after: int | None = None,
    on_step=None,
    overwrite: bool = False,
) -> dict:
    """Train; returns the summary of the run (rank 0's): ``step``, ``stopped``,
    ``start`` (the step this attempt started from), ``losses``, ``eval``, ``seconds``,
    ``tokens``, ``run_dir``.

    ``resume`` continues from the newest complete checkpoint (a fresh start when there
    is none; it never deletes one). A new run where checkpoints exist needs
    ``overwrite``, which deletes them. ``stop_after`` ends the loop after that step as
    if the job was killed (no final evaluation or plot). ``on_step(step, rank)`` runs
    after every step on every rank (tests inject faults with it)."""
    run_dir = Path(args.run_dir).absolute()
    if resume and overwrite:
        raise InvalidArgument(
            "overwrite", "False with resume (continue or start over, not both)", overwrite
        )
    if args.workers == 0:
        root = run_dir
    else:
        from .ray_train import experiment_root

        root = experiment_root(args, run_dir)
    local = not checkpoint.is_uri(root)
    if local and not resume and not overwrite and checkpoint.has_checkpoints(Path(root)):
        raise InvalidArgument(
            "run_dir",
            "a directory without checkpoints (or --resume to "
            "continue it, --overwrite to start over)",
            str(root),
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if local and not resume:
        checkpoint.clear(Path(root))
    if args.workers == 0:
        return LocalRun(args, run_dir).train(resume, stop_after, on_step)
    from .ray_train import fit

    return fit(args, run_dir, str(root), resume, stop_after, on_step)


if __name__ == "__main__":
    sys.exit(main())
