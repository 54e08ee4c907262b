"""The training loop of one rank, and the in-process run (``workers: 0``) around it.

:func:`run_steps` is the same loop in-process and inside every Ray Train worker: a
step, the tables' step when the shards do not apply it themselves, the metrics line
(rank 0), evaluation (rank 0), checkpoints, the progress bar (rank 0). What differs
between the two is a small ``run`` object: :class:`LocalRun` here, and
``trainer.ray_train.RayTrainRun`` on Ray Train.

``workers: 0`` trains in one process on the global batch with local ShardTables and
no Ray: the mode the fast tests and the step benchmark's baseline use. It computes the
same function as W >= 1 ranks up to float summation order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from memstore import InvalidArgument
from memstore import checkpoint as store_checkpoint

from . import checkpoint
from .config import TrainArgs
from .metrics import Metrics, plot, progress_bar
from .model import ModelArgs, table_users
from .replica import Replica

log = logging.getLogger(__name__)

__all__ = ["METRICS", "PLOT", "CONFIG", "run_steps", "LocalRun", "write_config"]

METRICS = "metrics.jsonl"
PLOT = "loss.png"
CONFIG = "config.yaml"


class Run(Protocol):
    """What :func:`run_steps` needs from the mode it runs in."""

    chief: bool  # rank 0: writes metrics, evaluates, saves the store

    def step_tables(self, step: int) -> None: ...

    def total(self, out: dict) -> dict: ...

    def checkpoint(self, step: int, state: dict | None) -> None: ...


def write_config(args: TrainArgs, model_args: ModelArgs, run_dir: Path) -> None:
    """The resolved config: the model section is the model as built."""
    import yaml

    d = args.to_dict()
    d["model"] = model_args.to_dict()
    d["dense_equivalent"] = False
    with open(run_dir / CONFIG, "w", encoding="utf-8") as f:
        yaml.safe_dump(d, f, sort_keys=False)


def saved_state(replica: Replica, seconds: float, tokens: int) -> dict:
    return {
        **replica.state(),
        "seconds": seconds,
        "tokens": tokens,
        "model_args": replica.model_args.to_dict(),
    }


def check_resumable(saved: dict, replica: Replica) -> None:
    if saved["model_args"] != replica.model_args.to_dict():
        raise InvalidArgument(
            "model", "the model of the checkpoint being resumed", "a different model config"
        )


def run_steps(
    args: TrainArgs,
    replica: Replica,
    run: Run,
    run_dir: Path,
    start: int,
    counters: tuple[float, int],
    stop_after: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict | None:
    """Steps ``start + 1`` to ``args.steps`` (or ``stop_after``, as if the job was
    killed there: no final evaluation). ``counters``: training seconds and tokens so
    far. ``on_step(step, rank)`` runs after every step (tests inject faults). Returns
    the run's summary on rank 0, None elsewhere."""
    seconds, tokens = counters
    metrics = Metrics(run_dir / METRICS, keep_until=start) if run.chief else None
    if args.checkpoint_every and start == 0:  # what a shard restarted before step 1 reloads
        run.checkpoint(0, saved_state(replica, seconds, tokens) if run.chief else None)
    bar = progress_bar(args.steps, start, run.chief and args.progress, args.store.name)
    last_eval, step = None, start
    try:
        for step in range(start + 1, args.steps + 1):
            t0 = time.perf_counter()
            out = replica.train_step(step)
            run.step_tables(step)
            dt = time.perf_counter() - t0
            out = run.total(out)
            seconds, tokens = seconds + dt, tokens + out["tokens"]
            row = {
                "step": step,
                "loss": out["loss"],
                "lr": out["lr"],
                "grad_norm": out["grad_norm"],
                "tokens": tokens,
                "seconds": seconds,
            }
            if run.chief:
                if args.eval_every and step % args.eval_every == 0:
                    last_eval = row["eval"] = replica.evaluate()
                metrics.log(row)
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                run.checkpoint(step, saved_state(replica, seconds, tokens) if run.chief else None)
            bar.update(1)
            bar.set_postfix(
                loss=f"{out['loss']:.4f}",
                tok_s=f"{out['tokens'] / dt:,.0f}",
                **(
                    {"recall": f"{last_eval['recall']:.3f}"}
                    if last_eval and "recall" in last_eval
                    else {}
                ),
                refresh=False,
            )
            if on_step is not None:
                on_step(step, replica.rank)
            if stop_after is not None and step >= stop_after:
                break
    finally:
        bar.close()
    if not run.chief:
        return None
    stopped = step < args.steps
    if not stopped and metrics.rows and "eval" not in metrics.rows[-1]:
        last_eval = replica.evaluate()
        metrics.set_last_eval(last_eval)
    if not stopped:
        plot(metrics, run_dir / PLOT, f"{args.store.name}: {args.steps} steps, W={args.workers}")
    return {
        "step": step,
        "stopped": stopped,
        "start": start,
        "losses": metrics.losses(),
        "eval": last_eval,
        "seconds": seconds,
        "tokens": tokens,
        "run_dir": str(run_dir),
    }


class LocalRun:
    """``workers: 0``: one Replica in this process with local ShardTables, no Ray;
    checkpoints written under the run_dir directly."""

    chief = True

    def __init__(self, args: TrainArgs, run_dir: Path):
        if args.ray.storage_path is not None:
            raise InvalidArgument(
                "ray.storage_path",
                "unset with workers: 0 (in-process runs keep their checkpoints in run_dir)",
                args.ray.storage_path,
            )
        self.args, self.run_dir = args, run_dir
        self.replica = Replica(args)
        self.tables = self.replica.model.value_tables()

    def train(self, resume: bool, stop_after: int | None, on_step) -> dict:
        start, counters = 0, (0.0, 0)
        resumed = checkpoint.resume_step(self.run_dir, list(self.tables)) if resume else None
        if resumed is not None:
            state, stores = checkpoint.read(checkpoint.step_dir(self.run_dir, resumed))
            check_resumable(state, self.replica)
            self.replica.load(state)
            self._load_tables(stores)
            start, counters = resumed, (state["seconds"], state["tokens"])
            log.info("resumed %s at step %d", self.run_dir, start)
        elif resume:
            log.warning("no checkpoint in %s: starting from step 0", self.run_dir)
        write_config(self.args, self.replica.model_args, self.run_dir)
        return run_steps(
            self.args, self.replica, self, self.run_dir, start, counters, stop_after, on_step
        )

    def step_tables(self, step: int) -> None:
        self.replica.step_tables(self.tables, step)

    def total(self, out: dict) -> dict:
        return out

    def checkpoint(self, step: int, state: dict | None) -> None:
        paths = {}
        for name, table in self.tables.items():
            paths[name] = path = checkpoint.store_path(self.run_dir, name, step)
            checkpoint.set_aside(self.run_dir, Path(path))
            if self.args.stats_snapshot is not None:
                table.snapshot_stats(self.args.stats_snapshot)
            sd = table.state_dict()
            staging = store_checkpoint.begin(path)
            entry = store_checkpoint.write_block(staging, "0-0", sd)
            seed = self.replica.model_args.seed + table_users(self.replica.model_args)[name][0]
            config = {
                "name": name,
                "rows": table.rows,
                "dim": table.dim,
                "dtype": sd["dtype"],
                "optimizer": sd["optimizer"],
                "seed": seed,
            }
            store_checkpoint.commit(path, config, [entry], step, staging=staging)
        checkpoint.save_local(self.run_dir, step, state, paths)

    def _load_tables(self, stores: dict) -> None:
        for name, table in self.tables.items():
            table.load_state_dict(store_checkpoint.load_block(stores["tables"][name], table.spec))
