"""Training on Ray Train (``workers: W >= 1``): a ``TorchTrainer`` of W workers.

The driver (:func:`fit`) only starts the run and waits for it. The loop runs inside
the workers (:func:`train_loop_per_worker`), one Ray Train worker per data-parallel
rank, with the dense parameters in DDP (gloo on CPU, NCCL on GPUs) and the value
tables in the store:

- Rank 0 creates the tables ``<store.name>-<table>`` (or, with ``store.connect``,
  checks the existing ones); every rank connects to them by name.
- Checkpoints: rank 0 saves each table (``Table.save``) to
  ``<root>/store/<table>/step-N``, then reports the model, the dense optimizer and the
  store paths of that step with ``ray.train.report(..., checkpoint=...)``; Ray Train
  keeps them at ``<root>/checkpoints/step-N``.
- Faults: a worker that dies, or a ``StoreRolledBack`` from a restarted shard, fails
  the worker group; Ray Train starts a new one (``ray.max_failures``) and every worker
  resumes from ``ray.train.get_checkpoint()``, rank 0 first reloading every table from
  the store checkpoint of that same step. A new run with the same run directory and
  ``--resume`` continues the same way, since Ray Train finds its checkpoints there.

``<root>`` is the run_dir, or ``<ray.storage_path>/<run name>`` when a storage path
(a local path or a URI) is given.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

import memstore
from memstore.table import table_exists

from . import checkpoint
from .config import Device, StoreMode, TrainArgs
from .data import StepData
from .loop import check_resumable, run_steps, write_config
from .memory import pushes_per_step
from .model import table_specs, table_users
from .replica import Replica

log = logging.getLogger(__name__)

__all__ = [
    "fit",
    "train_loop_per_worker",
    "experiment_root",
    "storage_and_name",
    "RayTrainRun",
    "StoreTables",
]


def experiment_root(args: TrainArgs, run_dir: Path) -> str:
    """Where the run's checkpoints live: Ray Train's storage path joined with the run
    name (by default the run_dir's parent and last part: the run_dir itself). A URI's
    query (``?endpoint_override=...``) stays at its end."""
    storage = args.ray.storage_path
    if storage is None:
        storage = str(run_dir.parent)
    elif not checkpoint.is_uri(storage):
        storage = str(Path(storage).absolute())
    return checkpoint.join(storage, args.ray.name or run_dir.name)


def storage_and_name(root: str) -> tuple[str, str]:
    """(Ray Train's storage_path, run name) of an experiment root: the inverse of
    :func:`experiment_root`, the query kept on the storage path."""
    base, sep, query = root.partition("?") if checkpoint.is_uri(root) else (root, "", "")
    storage, _, name = base.rstrip("/").rpartition("/")
    return storage + sep + query, name


# ---- the tables in the store -------------------------------------------------------


class StoreTables:
    """The store tables of a run: their names, options, creation and restoration."""

    def __init__(self, args: TrainArgs, root: str, world: int):
        self.args, self.root, self.world = args, root, world
        model_args = args.model_args(StepData(args).vocab_size)
        self.specs = table_specs(model_args)
        self.users = table_users(model_args)
        self.seed = model_args.seed

    def names(self) -> dict[str, str]:
        """Model table name -> store table name."""
        return {name: self.args.table_name(name) for name in self.specs}

    def options(self, name: str) -> dict:
        s = self.args.store
        return dict(
            shards=s.shards,
            mode=s.mode.value,
            max_staleness=s.max_staleness,
            pushes_per_step=pushes_per_step(self.world, layers=len(self.users[name])),
            step_on_push=s.step_on_push,
            data_channel=s.data_channel.value,
            data_encrypt=s.data_encrypt,
            checkpoint_root=checkpoint.store_root(self.root, name),
            threads_per_shard=s.threads_per_shard,
            timeout_s=s.timeout_s,
        )

    def prepare(self, start: int, stores: dict | None) -> None:
        """Rank 0, before anyone connects: every table at step ``start``, from the
        store checkpoint of that step in ``stores`` (None: a new run)."""
        for name, store_name in self.names().items():
            if self.args.store.connect:
                table = self.check_existing(name)
                if table.last_step != start:
                    raise memstore.InvalidArgument(
                        "store.connect",
                        f"a table {table.name} at step {start}, where this run starts",
                        f"step {table.last_step}",
                    )
                continue
            if table_exists(store_name):  # left by a failed attempt, or kept by a run
                if self._at_step(store_name, start):
                    continue
                memstore.drop_table(store_name)
            if stores is None:
                rows, dim = self.specs[name]
                memstore.create_table(
                    store_name,
                    rows,
                    dim,
                    optimizer=memstore.Adam(lr=self.args.value_lr),
                    seed=self.seed + self.users[name][0],
                    **self.options(name),
                )
            else:
                memstore.load_table(stores["tables"][name], store_name, **self.options(name))

    def _at_step(self, store_name: str, step: int) -> bool:
        """A sync table already at ``step`` is the state of that step (it got there by
        training from the same checkpoint, or a restarted shard rolled it back there),
        so it is kept. Pushes of the next step that it may hold from the failed attempt
        are gradients at that same state, and their repeats are ignored."""
        if self.args.store.mode is not StoreMode.SYNC:
            return False
        table = memstore.connect(store_name, timeout_s=self.args.store.timeout_s)
        if table.last_step == step:
            log.info("table %s is at step %d: kept", store_name, step)
            return True
        return False

    def check_existing(self, name: str) -> memstore.Table:
        """``store.connect``: the table another job made fits this model and run: same
        shape and, if it steps on its last push, expecting this run's pushes."""
        table = memstore.connect(self.args.table_name(name), timeout_s=self.args.store.timeout_s)
        rows, dim = self.specs[name]
        pushes = self.options(name)["pushes_per_step"]
        if (table.rows, table.dim) != (rows, dim):
            raise memstore.InvalidArgument(
                "store.connect",
                f"a table {table.name} of {rows} x {dim} for this model",
                f"{table.rows} x {table.dim}",
            )
        if table.config.get("step_on_push") and table.config.get("pushes_per_step") != pushes:
            raise memstore.InvalidArgument(
                "store.connect",
                f"a table {table.name} that steps after {pushes} pushes (workers x memory layers)",
                f"pushes_per_step={table.config.get('pushes_per_step')}",
            )
        return table

    def connect(self) -> dict[str, memstore.Table]:
        return {
            name: memstore.connect(store_name, timeout_s=self.args.store.timeout_s)
            for name, store_name in self.names().items()
        }

    def drop(self) -> None:
        for store_name in self.names().values():
            try:
                memstore.drop_table(store_name)
            except memstore.TableNotFound:
                pass


# ---- inside each worker ------------------------------------------------------------


class RayTrainRun:
    """What :func:`trainer.loop.run_steps` needs on a Ray Train worker."""

    def __init__(self, args: TrainArgs, rank: int, root: str, tables: dict):
        self.args, self.rank, self.root, self.tables = args, rank, root, tables
        self.chief = rank == 0
        # Tables that do not apply a step with its last push are stepped by rank 0,
        # and no rank looks anything up before that step is applied (a barrier).
        self.steps_tables = any(not t.config.get("step_on_push") for t in tables.values())

    def step_tables(self, step: int) -> None:
        if not self.steps_tables:
            return
        import torch.distributed as dist

        if self.chief:
            for table in self.tables.values():
                if not table.config.get("step_on_push"):
                    table.step(step)
        dist.barrier()

    def total(self, out: dict) -> dict:
        """The global loss (the ranks' shares summed) and the global tokens of a step."""
        import torch.distributed as dist

        both = torch.tensor([out["loss"], out["tokens"]], dtype=torch.float64)
        dist.all_reduce(both)
        return {**out, "loss": float(both[0]), "tokens": int(both[1])}

    def checkpoint(self, step: int, state: dict | None) -> None:
        """Rank 0 saves the tables of ``step``, then every rank reports (a barrier);
        rank 0's report carries the model checkpoint naming those store checkpoints."""
        import ray.train

        folder, ckpt = None, None
        if self.chief:
            paths = {}
            for name, table in self.tables.items():
                path = checkpoint.store_path(self.root, name, step)
                if not checkpoint.is_uri(self.root):
                    checkpoint.set_aside(Path(self.root), Path(path))
                    checkpoint.set_aside(
                        Path(self.root), Path(checkpoint.step_dir(self.root, step))
                    )
                paths[name] = table.save(path)
            folder = tempfile.mkdtemp(prefix="memstore-train-")
            checkpoint.write(folder, step, state, paths)
            ckpt = ray.train.Checkpoint.from_directory(folder)
        try:
            ray.train.report(
                {"step": step},
                checkpoint=ckpt,
                checkpoint_dir_name=f"{checkpoint.CHECKPOINTS}/{checkpoint.step_name(step)}",
            )
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


def _restore_point(root: str, tables: list[str]) -> tuple[int, str | None]:
    """Rank 0: (step, checkpoint directory) this attempt starts from.

    Ray Train's latest checkpoint, ``ray.train.get_checkpoint()``, is the newest report
    its controller had taken in when the last attempt ended. In a local run directory
    a newer checkpoint can be complete on disk (model directory and store saved) yet
    not taken in yet, when a worker died just after it: the newest complete step on
    disk is then taken. Later checkpoints are set aside."""
    import ray.train

    latest = ray.train.get_checkpoint()
    registered = None
    if latest is not None:
        with latest.as_directory() as folder:
            registered = checkpoint.read(folder)[1]
    if not checkpoint.is_uri(root):
        step = checkpoint.resume_step(Path(root), tables, strict=False)
        if step is not None and registered is not None and step > registered["step"]:
            log.info(
                "resuming from step %d, newer than Ray Train's latest checkpoint (step %d)",
                step,
                registered["step"],
            )
        return (0, None) if step is None else (step, checkpoint.step_dir(root, step))
    if registered is None:
        return 0, None
    if not checkpoint.committed(registered, tables):
        raise memstore.CheckpointError(
            latest.path, "a store checkpoint it names is missing or not committed"
        )
    return registered["step"], latest.path


def _broadcast(value):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_loop_per_worker(config: dict) -> dict | None:
    """One Ray Train worker: restore point, tables, model, steps."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    args = TrainArgs.from_dict(config["args"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    root, run_dir = config["root"], Path(config["run_dir"])
    if rank == 0:  # the driver made run_dir on its own node; rank 0 may run on another
        run_dir.mkdir(parents=True, exist_ok=True)
    store = StoreTables(args, root, world)
    start, folder = _restore_point(root, list(store.specs)) if rank == 0 else (0, None)
    start, folder = _broadcast((start, folder))
    state, stores = (None, None)
    if folder is not None:
        with ray.train.Checkpoint(folder).as_directory() as local:
            state, stores = checkpoint.read(local)
    if rank == 0:
        store.prepare(start, stores)
    dist.barrier()
    tables = store.connect()
    # On GPUs, this worker's own (Ray Train picks it by the worker's local rank).
    device = ray.train.torch.get_device() if args.torch_device().type == "cuda" else None
    replica = Replica(args, rank, world, tables, device)
    counters = (0.0, 0)
    if state is not None:
        check_resumable(state, replica)
        replica.load(state)
        counters = (state["seconds"], state["tokens"])
        if rank == 0:
            log.info("resumed %s at step %d", root, start)
    elif rank == 0:
        write_config(args, replica.model_args, run_dir)
    run = RayTrainRun(args, rank, root, tables)
    return run_steps(
        args,
        replica,
        run,
        run_dir,
        start,
        counters,
        config.get("stop_after"),
        config.get("on_step"),
    )


# ---- the driver --------------------------------------------------------------------


def _cpus_asked(args: TrainArgs, tables: int) -> tuple[float, str]:
    """The CPUs the run reserves (its shards, unless it connects to existing tables, and
    its workers), and how that sum is made, for an error message."""
    shards = args.store.shards
    per_table = shards if isinstance(shards, int) else shards[0] * shards[1]
    shard_cpus = 0 if args.store.connect else tables * per_table * args.store.threads_per_shard
    worker_cpus = args.workers * args.ray.cpus_per_worker
    how = (
        f"{args.workers} workers x {args.ray.cpus_per_worker:g} CPU (ray.cpus_per_worker) + "
        f"{shard_cpus:g} CPUs of shards ({tables} tables x {per_table} shards x "
        f"{args.store.threads_per_shard} store.threads_per_shard)"
    )
    return shard_cpus + worker_cpus, how


def check_room(args: TrainArgs, tables: int, free_cpus: float) -> None:
    """Refuse at once a run the cluster cannot place: Ray Train would otherwise wait
    for CPUs that never come and retry its worker group without end."""
    asked, how = _cpus_asked(args, tables)
    if asked > free_cpus + 1e-9:
        raise memstore.InvalidArgument(
            "ray.cpus_per_worker",
            f"a run that fits the cluster's {free_cpus:g} free CPUs (lower workers, "
            "ray.cpus_per_worker or store.threads_per_shard, or add nodes)",
            f"{asked:g} CPUs: {how}",
        )


def _attach_ray(args: TrainArgs, tables: int) -> bool:
    """Attach to Ray (RAY_ADDRESS or a running instance) or start a local one with a
    logical CPU per shard and worker; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return False
    need, _ = _cpus_asked(args, tables)
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
        include_dashboard=False,
        log_to_driver=False,
    )
    return True


def _worker_config(args: TrainArgs, run_dir: Path) -> dict:
    """The config the workers get: paths absolute, since Ray Train workers run in a
    directory of their own."""
    d = args.to_dict()
    d["run_dir"] = str(run_dir)
    for key in ("path", "val_path"):
        if d["data"][key]:
            d["data"][key] = os.path.abspath(d["data"][key])
    return d


def _use_gpu(args: TrainArgs) -> bool:
    import ray

    if args.device is Device.AUTO:
        return ray.cluster_resources().get("GPU", 0) >= args.workers
    return args.device is Device.CUDA


def _user_error(error: BaseException) -> BaseException:
    """The memstore error that failed every attempt, if that is what happened."""
    failures = getattr(error, "worker_failures", None) or {}
    for failure in failures.values():
        cause = getattr(failure, "cause", failure)
        if isinstance(cause, memstore.MemstoreError):
            return cause
    return error


def fit(
    args: TrainArgs, run_dir: Path, root: str, resume: bool, stop_after: int | None, on_step
) -> dict:
    """Run the TorchTrainer and return rank 0's summary. Tables this run created are
    dropped at the end unless ``store.keep``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    store = StoreTables(args, root, args.workers)
    started = _attach_ray(args, len(store.specs))
    try:
        check_room(args, len(store.specs), ray.available_resources().get("CPU", 0.0))
        if args.store.connect:  # refused here, before any worker starts
            for name in store.specs:
                store.check_existing(name)
        elif not resume:
            taken = [n for n in store.names().values() if table_exists(n)]
            if taken:
                raise memstore.InvalidArgument(
                    "store.name",
                    "a prefix whose tables do not exist yet (or store.connect: true)",
                    taken,
                )
        use_gpu = _use_gpu(args)
        storage, name = storage_and_name(root)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "args": _worker_config(args, run_dir),
                "root": root,
                "run_dir": str(run_dir),
                "stop_after": stop_after,
                "on_step": on_step,
            },
            scaling_config=ScalingConfig(
                num_workers=args.workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": args.ray.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=args.ray.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=None),
            ),
            torch_config=TorchConfig(
                backend="nccl" if use_gpu else "gloo", timeout_s=int(args.store.timeout_s or 1800)
            ),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - a memstore error is the user's to see
            cause = _user_error(e)
            if cause is e:
                raise
            raise cause from e
        return result.return_value
    finally:
        if not (args.store.keep or args.store.connect):
            store.drop()
        if started:
            import ray

            ray.shutdown()
