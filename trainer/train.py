"""The training loop: ``python -m trainer.train --config trainer/configs/<name>.yaml``.

Read top to bottom: the config (:class:`TrainArgs`, loaded from YAML with unknown keys
rejected), the data of a step, one data-parallel rank (:class:`Replica`), the two
backends that run the ranks (:class:`LocalBackend`, in-process, and
:class:`RayBackend`, W worker actors plus distributed tables), checkpoints, and the loop
(:func:`train`) with its progress bar, metrics, evaluation and plot.

How a step works with W workers (``workers: W`` >= 1):

- Every worker draws the same global batch of step s (a generator seeded by
  ``(seed, s)``: no data position to save) and keeps its slice of B/W rows.
- Its loss is the sum of its masked token losses divided by the *global* count of
  target tokens, so the losses of all workers sum to the mean over the global batch.
  Dense gradients are all-reduced with SUM (gloo), which makes them the gradients of
  that mean; value gradients are summed by the store over the W pushes, so both agree.
- The dense gradients are clipped to ``grad_clip`` by their global norm and Adam(W)
  steps them with warm-up and cosine decay. Value rows are not clipped (their
  gradients never leave the store); their lr follows the same schedule scaled to
  ``value_lr`` and travels with each push, so the shard applies the step with it.
- In sync mode a shard applies step s once all ``W · workers_per_rank`` pushes of s
  arrived, within the call of the last one (``store.step_on_push``, the default): a
  rank's backward returns only after its pushes, and the all-reduce waits for every
  rank's backward, so no lookup of step s+1 can precede the update of step s. With
  ``step_on_push: false`` the driver calls ``table.step(s)`` after the workers, one
  more blocking round per step.

Why own worker actors rather than Ray Train's TorchTrainer: fewer moving parts. The
store is already Ray-native (named actors that a worker reaches with
``memstore.connect``), everything here runs on CPU with gloo, and the driver must
interleave ``table.step``, checkpoints of model and store at the same step, and
restore on ``StoreRolledBack`` with the workers' steps — a plain actor per rank
and a process group of our own make that a few dozen lines, with no Trainer
lifecycle, run-config or checkpoint-manager semantics to fit around.

``workers: 0`` trains in-process on the global batch with local ShardTables (no Ray):
the mode the fast tests use; it computes the same function as W >= 1 up to float
summation order.

Run directory::

    config.yaml                  the resolved config
    metrics.jsonl                one line per step (and per evaluation)
    loss.png                     the loss curve (and eval recall), written at the end
    checkpoints/step-N.pt        dense params, dense optimizer state, step, RNG
    store/<table>/step-N/        the value table at the same step (memstore checkpoint)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import memstore
from memstore import InvalidArgument, StoreRolledBack
from memstore import checkpoint as store_checkpoint

from .data import Batch, ByteDataset, FactsCorpus, evaluate, text_nll, text_splits
from .model import (
    ModelArgs,
    Transformer,
    check_known_keys,
    dense_equivalent,
    strict_from_dict,
    table_specs,
    table_users,
)

log = logging.getLogger(__name__)

__all__ = ["TrainArgs", "DataArgs", "StoreArgs", "load_config", "train", "main"]

CHECKPOINTS = "checkpoints"
STORE = "store"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
_CKPT_FILE = re.compile(r"^step-(\d+)\.pt$")
_STEP_DIR = re.compile(r"^step-(\d+)$")
ABANDONED = "abandoned"


# ---- config ------------------------------------------------------------------------

@dataclasses.dataclass
class DataArgs:
    kind: str = "facts"  # "facts" (synthetic factual recall) or "text" (bytes of a file)
    entities: int = 1000
    attributes: int = 8
    values: int = 100
    seed: int = 0  # the facts table (not the batch order: TrainArgs.seed)
    path: str | None = None  # text file, for kind "text"
    seq_len: int = 128  # window length, for kind "text"
    # text: validation data, never sampled for training; at most one of the two. A
    # separate file, or the last val_fraction of path's bytes held out (training
    # windows stay before it). Neither: evaluation scores training windows only.
    val_path: str | None = None
    val_fraction: float | None = None
    eval_batch_size: int = 1024
    eval_windows: int = 64  # text: fixed windows, evenly spread, scored per part

    def __post_init__(self) -> None:
        if self.kind not in ("facts", "text"):
            raise InvalidArgument("data.kind", "'facts' or 'text'", self.kind)
        if self.kind == "text" and not self.path:
            raise InvalidArgument("data.path", "a text file for kind 'text'", self.path)
        for name in ("val_path", "val_fraction"):
            if self.kind == "facts" and getattr(self, name) is not None:
                raise InvalidArgument(f"data.{name}", "unset for kind 'facts' (every fact "
                                      "is evaluated)", getattr(self, name))
        if self.val_fraction is not None and not (
                not isinstance(self.val_fraction, bool)
                and isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise InvalidArgument("data.val_fraction", "a number in (0, 1)", self.val_fraction)
        if self.val_fraction is not None and self.val_path is not None:
            raise InvalidArgument("data.val_fraction", "unset when data.val_path is given",
                                  self.val_fraction)
        _check_int("data.seq_len", self.seq_len, 1)
        _check_int("data.eval_windows", self.eval_windows, 1)


@dataclasses.dataclass
class StoreArgs:
    name: str = "run"  # table name prefix: tables are "<name>-<table>"
    shards: int | list[int] = 1  # S or [R, C] per table
    mode: str = "sync"  # "sync" or "async"
    max_staleness: int | None = None
    # Sync mode: shards apply step s with its last push (no driver round per step).
    # None: on in sync mode; False: the driver calls table.step(s) after the workers.
    step_on_push: bool | None = None
    data_channel: str = "socket"  # lookups and pushes over TCP ("socket") or Ray ("ray")
    threads_per_shard: int = 1
    timeout_s: float | None = None
    keep: bool = False  # leave the tables on the cluster after training
    # Use tables "<name>-<table>" that already exist (created by another job) instead of
    # creating them; they are left on the cluster afterwards.
    connect: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise InvalidArgument("store.name", "a non-empty string without '/'", self.name)
        if self.mode not in ("sync", "async"):
            raise InvalidArgument("store.mode", "'sync' or 'async'", self.mode)
        if isinstance(self.shards, list):
            self.shards = tuple(self.shards)
        if self.data_channel not in ("socket", "ray"):
            raise InvalidArgument("store.data_channel", "'socket' or 'ray'", self.data_channel)
        if self.step_on_push is None:
            self.step_on_push = self.mode == "sync"
        if self.step_on_push and self.mode != "sync":
            raise InvalidArgument("store.step_on_push", "false in async mode", True)


@dataclasses.dataclass
class TrainArgs:
    model: dict = dataclasses.field(default_factory=dict)  # ModelArgs fields
    dense_equivalent: bool = False  # replace memory layers by FFNs of equal FLOPs
    data: DataArgs = dataclasses.field(default_factory=DataArgs)
    store: StoreArgs = dataclasses.field(default_factory=StoreArgs)
    steps: int = 100
    batch_size: int = 64  # global, over all workers
    lr: float = 1e-3  # dense peak lr
    value_lr: float = 1e-2  # the value tables' Adam lr (the peak, when scheduled)
    # "cosine": the dense lr's warm-up and cosine scaled to value_lr; "constant"
    value_schedule: str = "cosine"
    warmup: int = 10
    min_lr: float = 1e-4  # cosine floor
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global norm of the dense gradients; 0: off
    workers: int = 0  # data-parallel Ray workers; 0: in-process, no Ray
    threads_per_worker: int | None = None  # torch threads per rank (default: torch's)
    device: str = "cpu"  # "cpu", "cuda" (one GPU per rank, nccl) or "auto"
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 0  # 0: never
    run_dir: str = "runs/default"
    seed: int = 0  # batch order; also the model's seed unless model.seed is given
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "TrainArgs":
        d = dict(d or {})
        check_known_keys(cls, d, "")
        check_known_keys(ModelArgs, d.get("model") or {}, "model")
        d["data"] = strict_from_dict(DataArgs, d.get("data"), "data")
        d["store"] = strict_from_dict(StoreArgs, d.get("store"), "store")
        return cls(**d)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup", "workers", "eval_every", "checkpoint_every", "seed"):
            _check_int(name, getattr(self, name), 0)
        for name in ("lr", "value_lr"):
            _check_float(name, getattr(self, name), positive=True)
        for name in ("min_lr", "weight_decay", "grad_clip"):
            _check_float(name, getattr(self, name), positive=False)
        if self.value_schedule not in ("cosine", "constant"):
            raise InvalidArgument("value_schedule", "'cosine' or 'constant'", self.value_schedule)
        if self.device not in ("cpu", "cuda", "auto"):
            raise InvalidArgument("device", "'cpu', 'cuda' or 'auto'", self.device)
        if self.workers and self.batch_size % self.workers:
            raise InvalidArgument("batch_size", f"a multiple of workers={self.workers}",
                                  self.batch_size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["store"]["shards"], tuple):
            d["store"]["shards"] = list(d["store"]["shards"])
        return d

    def model_args(self, vocab_size: int) -> ModelArgs:
        """The model: vocab from the data, value_lr from here, seed from here unless
        the model section names one, then the dense equivalent when asked."""
        d = {"vocab_size": vocab_size, "seed": self.seed, **self.model,
             "value_lr": self.value_lr}
        args = ModelArgs.from_dict(d)
        return dense_equivalent(args) if self.dense_equivalent else args

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def table_name(self, table: str) -> str:
        return f"{self.store.name}-{table}"


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(name, f"an int >= {minimum}", value)


def _check_float(name, value, positive):
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise InvalidArgument(name, "a finite number " + ("> 0" if positive else ">= 0"), value)


def _set_path(d: dict, dotted: str, value) -> None:
    """d[a][b] = value for "a.b"; every key on the way must be a known field."""
    keys = dotted.split(".")
    node, cls = d, TrainArgs
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if cls is not None:
            fields = {f.name: f for f in dataclasses.fields(cls)}
            if key not in fields:
                raise InvalidArgument("--set", f"a key among {sorted(fields)}",
                                      ".".join(keys[: i + 1]))
            sub = {"data": DataArgs, "store": StoreArgs, "model": ModelArgs}.get(key) \
                if cls is TrainArgs else None
        else:
            sub = None
        if last:
            node[key] = value
        else:
            if sub is None:
                raise InvalidArgument("--set", "a path into data, store or model", dotted)
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node, cls = node[key], sub


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainArgs:
    """TrainArgs from a YAML file plus ``key=value`` overrides (values parsed as YAML)."""
    import yaml

    d = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise InvalidArgument("config", "a YAML mapping", type(d).__name__)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InvalidArgument("--set", "key=value", item)
        _set_path(d, key.strip(), yaml.safe_load(text))
    return TrainArgs.from_dict(d)


# ---- data --------------------------------------------------------------------------

class StepData:
    """The batch of every step, a pure function of (seed, step): resuming at step s
    needs no data position beyond s."""

    def __init__(self, args: TrainArgs):
        self.args = args
        d = args.data
        if d.kind == "facts":
            self.corpus = FactsCorpus(d.entities, d.attributes, d.values, seed=d.seed)
            self.validation = None
            self.vocab_size = self.corpus.vocab_size
        else:
            try:
                self.corpus, self.validation = text_splits(d.path, d.seq_len, d.val_path,
                                                           d.val_fraction)
            except InvalidArgument as e:  # name the config field
                raise InvalidArgument(f"data.{e.field}", e.expected, e.got) from None
            self.vocab_size = ByteDataset.vocab_size

    def global_batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.args.seed, step])
        B = self.args.batch_size
        if isinstance(self.corpus, FactsCorpus):
            return self.corpus.batch(rng.integers(0, self.corpus.n_facts, size=B))
        return self.corpus.window(self.corpus.sample_starts(rng, B))

    def evaluate(self, model: Transformer) -> dict:
        """Facts: trainer.data.evaluate. Text: NLL and bits per byte on eval_windows
        fixed windows of the training part (``train_*``) and of the validation data
        (``val_*``, when there is one); ``nll`` and ``bits_per_byte`` repeat the
        validation figures, or the training ones without validation data."""
        d = self.args.data
        model = _OnDevice(model)
        if isinstance(self.corpus, FactsCorpus):
            return evaluate(model, self.corpus, batch_size=d.eval_batch_size)
        out = {}
        parts = {"train": self.corpus, "val": self.validation}
        for part, data in parts.items():
            if data is not None:
                nll = text_nll(model, data, data.fixed_starts(d.eval_windows),
                               d.eval_batch_size)
                out[f"{part}_nll"], out[f"{part}_bits_per_byte"] = nll, nll / math.log(2)
        head = "val" if self.validation is not None else "train"
        out["nll"], out["bits_per_byte"] = out[f"{head}_nll"], out[f"{head}_bits_per_byte"]
        return out


class _OnDevice(torch.nn.Module):
    """The model, fed host tokens and answering on the host (evaluation on a GPU)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens.to(self.model.embed.weight.device)).cpu()


def lr_at(args: TrainArgs, step: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine to ``min_lr``."""
    if args.warmup and step <= args.warmup:
        return args.lr * step / args.warmup
    span = max(1, args.steps - args.warmup)
    progress = min(1.0, (step - args.warmup) / span)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def value_lr_at(args: TrainArgs, step: int) -> float:
    """The values' lr: :func:`lr_at`'s shape scaled to ``value_lr`` (its floor is
    ``value_lr · min_lr / lr``), or ``value_lr`` with ``value_schedule: constant``."""
    if args.value_schedule == "constant":
        return args.value_lr
    return args.value_lr * lr_at(args, step) / args.lr


# ---- one rank ----------------------------------------------------------------------

class PeerFailed(RuntimeError):
    """Another rank failed in this step; this rank skipped its update to stay in step."""


class Replica:
    """One data-parallel rank: the model, its dense optimizer and its slice of each batch.

    A plain class: in-process it is used directly (``rank=0, world=1``, local tables);
    on Ray it is wrapped with ``ray.remote`` at spawn and its value tables are handles
    on the store (``tables``: model table name -> store table name).
    """

    def __init__(self, config: dict, rank: int = 0, world: int = 1,
                 tables: dict[str, str] | None = None):
        self.args = TrainArgs.from_dict(config)
        if self.args.threads_per_worker:
            torch.set_num_threads(self.args.threads_per_worker)
        self.rank, self.world = rank, world
        self.device = self.args.torch_device()
        self.data = StepData(self.args)
        self.model_args = self.args.model_args(self.data.vocab_size)
        handles = None if tables is None else {
            name: memstore.connect(store_name, worker=rank, timeout_s=self.args.store.timeout_s)
            for name, store_name in tables.items()}
        self.table_names = tables
        self._build(handles)
        self.group = False

    def _build(self, handles) -> None:
        self.model = Transformer(self.model_args, tables=handles, worker=self.rank)
        self.model.to(self.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=self.args.lr, betas=(0.9, 0.95),
                                     weight_decay=self.args.weight_decay)

    # ---- process group (Ray mode) ----------------------------------------------------
    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for the rank-0 rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_group(self, host: str, port: int, timeout_s: float) -> None:
        import datetime

        import torch.distributed as dist

        if host == "127.0.0.1":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", init_method=f"tcp://{host}:{port}", rank=self.rank,
                                world_size=self.world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self.group = True

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.group = False

    # ---- a step ------------------------------------------------------------------
    def train_step(self, step: int, lr: float) -> dict:
        """Forward/backward of this rank's slice, all-reduce, clip, dense update.

        Returns this rank's share of the loss (the shares sum to the global mean) and
        the global gradient norm before clipping. The value tables are stepped by the
        caller. Collectives stay aligned when a rank fails: every rank first agrees on
        whether all succeeded, and all skip the update otherwise.
        """
        start = time.perf_counter()
        batch = Batch(*(t if t is None else t.to(self.device)
                        for t in self.data.global_batch(step)))
        count = batch.targets.numel() if batch.mask is None else int(batch.mask.sum())
        per = batch.inputs.shape[0] // self.world
        rows = slice(self.rank * per, (self.rank + 1) * per)
        self.model.set_step(step, value_lr=value_lr_at(self.args, step))
        self.opt.zero_grad(set_to_none=True)
        error, loss = None, torch.zeros(())
        try:
            logits = self.model(batch.inputs[rows])
            nll = F.cross_entropy(logits.flatten(0, 1), batch.targets[rows].flatten(),
                                  reduction="none")
            if batch.mask is not None:
                nll = nll * batch.mask[rows].flatten().to(nll.dtype)
            loss = nll.sum() / max(count, 1)
            loss.backward()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the agreement
            error = e
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.group:
            import torch.distributed as dist

            ok = torch.tensor([0.0 if error else 1.0], device=self.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if ok.item() == 0.0:
                self.opt.zero_grad(set_to_none=True)
                raise error if error is not None else PeerFailed(f"another rank failed at "
                                                                 f"step {step}")
            flat = torch.cat([p.grad.reshape(-1) for p in self.params])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in self.params:
                n = p.numel()
                p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
                offset += n
        elif error is not None:
            raise error
        if self.args.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params]))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        return {"loss": float(loss.detach()), "grad_norm": float(norm),
                "tokens": int(batch.inputs[rows].numel()),
                "seconds": time.perf_counter() - start}

    def step_tables(self, step: int) -> None:
        """In-process mode: apply the local value tables' optimizer for ``step``."""
        for table in self.model.value_tables().values():
            table.step(step)

    def evaluate(self) -> dict:
        return self.data.evaluate(self.model)

    # ---- state -------------------------------------------------------------------
    def state(self) -> dict:
        """Dense parameters and optimizer state (values live in the tables)."""
        opt = self.opt.state_dict()
        opt["state"] = {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                        for i, st in opt["state"].items()}
        return {"model": {k: v.detach().cpu().clone() for k, v in
                          self.model.state_dict().items()},
                "optimizer": opt, "rng": torch.get_rng_state()}

    def load(self, state: dict, reconnect: bool = False) -> None:
        """Load a :meth:`state`; ``reconnect`` rebuilds the table handles first (after
        the store rolled back or its tables were reloaded)."""
        if reconnect and self.table_names is not None:
            handles = {name: memstore.connect(store_name, worker=self.rank,
                                              timeout_s=self.args.store.timeout_s)
                       for name, store_name in self.table_names.items()}
            self._build(handles)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])

    def save_local_tables(self, root: str, step: int) -> None:
        for name, table in self.model.value_tables().items():
            path = store_checkpoint.checkpoint_dir(os.path.join(root, name), step)
            _set_aside(Path(root).parent, Path(path))
            sd = table.state_dict()
            staging = store_checkpoint.begin(path)
            entry = store_checkpoint.write_block(staging, "0-0", sd)
            config = {"name": name, "rows": table.rows, "dim": table.dim,
                      "dtype": sd["dtype"], "optimizer": sd["optimizer"],
                      "seed": self.model_args.seed + table_users(self.model_args)[name][0]}
            store_checkpoint.commit(path, config, [entry], step, staging=staging)

    def load_local_tables(self, root: str, step: int) -> None:
        for name, table in self.model.value_tables().items():
            path = store_checkpoint.checkpoint_dir(os.path.join(root, name), step)
            table.load_state_dict(store_checkpoint.load_block(path, table.spec))


# ---- backends ----------------------------------------------------------------------

class LocalBackend:
    """W = 0: one Replica in this process, local ShardTables, no Ray."""

    def __init__(self, args: TrainArgs, run_dir: Path):
        self.args, self.run_dir = args, run_dir
        self.replica = Replica(args.to_dict())
        self.model_args = self.replica.model_args

    def start(self, restore_step: int | None) -> None:
        if restore_step is not None:
            self.restore(restore_step)

    def train_step(self, step: int, lr: float) -> dict:
        out = self.replica.train_step(step, lr)
        self.replica.step_tables(step)
        return out

    def evaluate(self) -> dict:
        return self.replica.evaluate()

    def save(self, step: int) -> dict:
        return self.replica.state()

    def save_store(self, step: int) -> None:
        self.replica.save_local_tables(str(self.run_dir / STORE), step)

    def restore(self, step: int) -> None:
        state = load_model_checkpoint(self.run_dir, step)
        self.replica.load(state["replica"])
        self.replica.load_local_tables(str(self.run_dir / STORE), step)

    def table_names(self) -> list[str]:
        return list(table_specs(self.model_args))

    def close(self) -> None:
        pass


class RayBackend:
    """W >= 1 worker actors (one Replica each, a gloo group among them) and the value
    tables in the store, created (or reloaded from a checkpoint) by this driver."""

    def __init__(self, args: TrainArgs, run_dir: Path):
        import ray

        self.ray = ray
        self.args, self.run_dir = args, run_dir
        self.model_args = args.model_args(StepData(args).vocab_size)
        # pushes per rank and step (Transformer.workers_per_rank, one micro-batch)
        self.per_rank = {name: len(users) for name, users in table_users(self.model_args).items()}
        self.specs = table_specs(self.model_args)
        self.started_ray = False
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
            else:  # a local instance on loopback, with a logical CPU per shard and worker
                shards = args.store.shards
                per_table = shards if isinstance(shards, int) else shards[0] * shards[1]
                need = len(self.specs) * per_table * args.store.threads_per_shard + args.workers
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need),
                         include_dashboard=False, log_to_driver=False)
            self.started_ray = True
        self.tables: dict[str, memstore.Table] = {}
        self.workers = []

    # ---- tables ------------------------------------------------------------------
    def _table_options(self, name: str) -> dict:
        s = self.args.store
        return dict(shards=s.shards, mode=s.mode, max_staleness=s.max_staleness,
                    workers=self.args.workers * self.per_rank[name],
                    step_on_push=s.step_on_push, data_channel=s.data_channel,
                    checkpoint_root=str(self.run_dir / STORE / name),
                    threads_per_shard=s.threads_per_shard, timeout_s=s.timeout_s)

    def _create_tables(self) -> None:
        if self.args.store.connect:
            return self._connect_tables()
        users = table_users(self.model_args)
        for name, (rows, dim) in self.specs.items():
            self.tables[name] = memstore.create_table(
                self.args.table_name(name), rows, dim,
                optimizer=memstore.Adam(lr=self.args.value_lr),
                seed=self.model_args.seed + users[name][0], **self._table_options(name))

    def _connect_tables(self) -> None:
        """The existing tables, checked against the model: same shape, and a table that
        steps on its last push must expect this job's number of pushes."""
        for name, (rows, dim) in self.specs.items():
            table = memstore.connect(self.args.table_name(name),
                                     timeout_s=self.args.store.timeout_s)
            pushes = self.args.workers * self.per_rank[name]
            if (table.rows, table.dim) != (rows, dim):
                raise InvalidArgument("store.connect", f"a table {table.name} of {rows} x {dim} "
                                      "for this model", f"{table.rows} x {table.dim}")
            if table.config.get("step_on_push") and table.config.get("workers") != pushes:
                raise InvalidArgument("store.connect", f"a table {table.name} that steps "
                                      f"after {pushes} pushes (workers x memory layers)",
                                      f"workers={table.config.get('workers')}")
            self.tables[name] = table

    def _tables_at(self, step: int) -> None:
        """Every table at the store checkpoint of ``step``: a running table already
        there (e.g. rolled back by a restarted shard) is kept, any other is reloaded."""
        for name in self.specs:
            store_name = self.args.table_name(name)
            try:
                table = memstore.connect(store_name, timeout_s=self.args.store.timeout_s)
            except memstore.TableNotFound:
                table = None
            if table is not None and table.last_step == step:
                self.tables[name] = table
                continue
            if table is not None:
                memstore.drop_table(store_name)
            path = store_checkpoint.checkpoint_dir(str(self.run_dir / STORE / name), step)
            self.tables[name] = memstore.load_table(path, store_name, **self._table_options(name))

    # ---- workers -----------------------------------------------------------------
    def _spawn_workers(self) -> None:
        ray, W = self.ray, self.args.workers
        names = {name: self.args.table_name(name) for name in self.specs}
        cls = ray.remote(Replica)
        config = self.args.to_dict()
        device = self.args.device
        gpus = 1 if device == "cuda" or (device == "auto" and ray.cluster_resources().get(
            "GPU", 0) >= self.args.workers) else 0
        self.workers = [cls.options(num_cpus=1, num_gpus=gpus, max_restarts=0)
                        .remote(config, r, W, names)
                        for r in range(W)]
        if W > 1:
            host, port = ray.get(self.workers[0].address.remote())
            if host == ray.util.get_node_ip_address():
                host = "127.0.0.1"
            timeout = self.args.store.timeout_s or 300.0
            ray.get([w.init_group.remote(host, port, timeout) for w in self.workers])

    def start(self, restore_step: int | None) -> None:
        if restore_step is None:
            self._create_tables()
            self._spawn_workers()
        else:
            self._tables_at(restore_step)
            self._spawn_workers()
            self._load_workers(restore_step, reconnect=False)

    def _load_workers(self, step: int, reconnect: bool) -> None:
        state = load_model_checkpoint(self.run_dir, step)["replica"]
        ref = self.ray.put(state)
        self.ray.get([w.load.remote(ref, reconnect) for w in self.workers])

    # ---- steps -------------------------------------------------------------------
    def train_step(self, step: int, lr: float) -> dict:
        ray = self.ray
        refs = [w.train_step.remote(step, lr) for w in self.workers]
        outs, errors = [], []
        for ref in refs:
            try:
                outs.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - sorted out below
                errors.append(_cause(e))
        if errors:
            rolled = [e for e in errors if isinstance(e, StoreRolledBack)]
            raise rolled[0] if rolled else errors[0]
        for table in self.tables.values():
            if not table.config.get("step_on_push"):
                table.step(step)
        return {"loss": sum(o["loss"] for o in outs), "grad_norm": outs[0]["grad_norm"],
                "tokens": sum(o["tokens"] for o in outs)}

    def evaluate(self) -> dict:
        return self.ray.get(self.workers[0].evaluate.remote())

    def save(self, step: int) -> dict:
        return self.ray.get(self.workers[0].state.remote())

    def save_store(self, step: int) -> None:
        for name, table in self.tables.items():
            path = store_checkpoint.checkpoint_dir(str(self.run_dir / STORE / name), step)
            _set_aside(self.run_dir, Path(path))
            table.save(path)

    def restore(self, step: int) -> None:
        """After StoreRolledBack: tables to ``step``, every worker reconnects and loads
        the model checkpoint of ``step``."""
        self._tables_at(step)
        self._load_workers(step, reconnect=True)

    def table_names(self) -> list[str]:
        return list(self.specs)

    def close(self) -> None:
        ray = self.ray
        for w in self.workers:
            try:
                ray.get(w.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
            ray.kill(w)
        self.workers = []
        if not (self.args.store.keep or self.args.store.connect):
            for name in self.specs:
                try:
                    memstore.drop_table(self.args.table_name(name))
                except memstore.TableNotFound:
                    pass
        if self.started_ray:
            ray.shutdown()


def _cause(error: BaseException) -> BaseException:
    """The exception a Ray task raised, unwrapped from RayTaskError."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


# ---- checkpoints -------------------------------------------------------------------

def _ckpt_file(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:09d}.pt"


def save_checkpoint(backend, run_dir: Path, step: int, extra: dict) -> None:
    """Model first (fsynced, atomic rename, directory fsynced), then the store at the
    same step: a checkpoint step exists once both are there (:func:`checkpoint_steps`).
    Everything saved is tensors and plain types, so it loads with weights_only=True."""
    state = backend.save(step)
    file = _ckpt_file(run_dir, step)
    file.parent.mkdir(parents=True, exist_ok=True)
    _set_aside(run_dir, file)
    tmp = file.with_suffix(f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"step": step, "replica": state, **extra}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
    _fsync_dir(file.parent)
    _fsync_dir(run_dir)  # the checkpoints directory itself may be new
    backend.save_store(step)


def load_model_checkpoint(run_dir: Path, step: int) -> dict:
    """The model checkpoint of ``step``; it is data, never code (weights_only)."""
    return torch.load(_ckpt_file(run_dir, step), map_location="cpu", weights_only=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_steps(run_dir: Path) -> list[int]:
    folder = run_dir / CHECKPOINTS
    return sorted(int(m.group(1)) for n in (os.listdir(folder) if folder.exists() else [])
                  if (m := _CKPT_FILE.match(n)))


def store_steps(run_dir: Path, name: str) -> list[int]:
    """Steps with a committed store checkpoint of table ``name``."""
    return sorted(int(m.group(1)) for p in store_checkpoint.checkpoints(run_dir / STORE / name)
                  if (m := _STEP_DIR.match(os.path.basename(p))))


def checkpoint_steps(run_dir: Path, tables: list[str]) -> list[int]:
    """Steps with a model checkpoint and a committed store checkpoint of every table."""
    common = set(model_steps(run_dir))
    for name in tables:
        common &= set(store_steps(run_dir, name))
    return sorted(common)


def _has_checkpoints(run_dir: Path) -> bool:
    return any((run_dir / sub).exists() and any((run_dir / sub).iterdir())
               for sub in (CHECKPOINTS, STORE))


def _set_aside(run_dir: Path, path: Path) -> None:
    """Move ``path`` (a file or a step directory inside ``run_dir``) under
    ``run_dir/abandoned/<time>/``, keeping its place in the tree: checkpoints are never
    deleted by the trainer, only moved where no shard or resume looks."""
    if not path.exists():
        return
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    target = run_dir / ABANDONED / stamp / path.relative_to(run_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, target)
    _fsync_dir(path.parent)
    log.warning("moved %s to %s", path, target)


def _set_aside_after(run_dir: Path, tables: list[str], step: int) -> None:
    """Set aside checkpoints of steps after ``step`` (an abandoned future: a restarted
    shard must never reload one of them, and resume must not pick them)."""
    for n in os.listdir(run_dir / CHECKPOINTS) if (run_dir / CHECKPOINTS).exists() else []:
        if (m := _CKPT_FILE.match(n)) and int(m.group(1)) > step:
            _set_aside(run_dir, run_dir / CHECKPOINTS / n)
    for name in tables:
        root = run_dir / STORE / name
        for n in os.listdir(root) if root.exists() else []:
            m = _STEP_DIR.match(n)
            if m and int(m.group(1)) > step:
                _set_aside(run_dir, root / n)


def _resume_step(run_dir: Path, tables: list[str]) -> int | None:
    """The step --resume continues from: the newest step with both a model checkpoint
    and a committed store checkpoint of every table. Later checkpoints of one kind only
    (a save cut short, a store step without its model) are set aside with a warning;
    when checkpoints exist but share no step, CheckpointError and nothing is changed."""
    steps = checkpoint_steps(run_dir, tables)
    if not steps:
        if _has_checkpoints(run_dir):
            found = {"model": model_steps(run_dir),
                     **{f"store {n}": store_steps(run_dir, n) for n in tables}}
            raise memstore.CheckpointError(
                str(run_dir), f"no step has both a model and a store checkpoint ({found}); "
                "nothing was changed: start over with --overwrite, or restore the missing "
                "files")
        return None
    start = steps[-1]
    newer = [s for s in model_steps(run_dir) if s > start] + [
        s for n in tables for s in store_steps(run_dir, n) if s > start]
    if newer:
        log.warning("resuming at step %d, the newest step with model and store checkpoints; "
                    "checkpoints of later steps %s are incomplete and set aside under %s",
                    start, sorted(set(newer)), run_dir / ABANDONED)
    _set_aside_after(run_dir, tables, start)
    return start


# ---- metrics and plot --------------------------------------------------------------

class Metrics:
    """metrics.jsonl: one JSON object per step: ``step``, ``loss`` (mean over the
    global batch's target tokens), ``lr`` (dense), ``grad_norm`` (dense, before
    clipping), ``tokens`` (input tokens seen so far), ``seconds`` (training time so
    far: the steps only, without evaluation and checkpoints, carried over resumes),
    and ``eval`` at evaluation steps (facts: trainer.data.evaluate's recall,
    recall_any, nll; text: StepData.evaluate's train_ and val_ nll and bits_per_byte).
    On resume or restore, lines after the restored step are dropped so that the file
    is the history of the run that continues."""

    def __init__(self, path: Path, keep_until: int | None):
        self.path = path
        self.rows: list[dict] = []
        if keep_until is not None and path.exists():
            with open(path, encoding="utf-8") as f:
                self.rows = [r for r in map(json.loads, f) if r.get("step", 0) <= keep_until]
        self._rewrite()

    def _rewrite(self) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")

    def truncate(self, step: int) -> None:
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
        self._rewrite()

    def log(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def losses(self) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in self.rows if "loss" in r]


def plot(metrics: Metrics, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*metrics.losses()) if metrics.losses() else ((), ())
    ax.plot(steps, losses, lw=1, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_yscale("log")
    evals = [r for r in metrics.rows if "eval" in r]
    for key, label in (("train_nll", "eval nll, training windows"),
                       ("val_nll", "eval nll, validation windows")):
        if evals and key in evals[0]["eval"]:
            ax.plot([r["step"] for r in evals], [r["eval"][key] for r in evals], "o-", ms=3,
                    label=label)
    if evals and "recall" in evals[0]["eval"]:
        ax.plot([r["step"] for r in evals], [r["eval"]["nll"] for r in evals], "o-", ms=3,
                label="eval nll")
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval"]["recall"] for r in evals], "s--",
                 ms=3, color="tab:green", label="eval recall")
        ax2.set_ylabel("recall")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the loop ----------------------------------------------------------------------

def write_config(args: TrainArgs, model_args: ModelArgs, run_dir: Path) -> None:
    import yaml

    d = args.to_dict()
    d["model"] = model_args.to_dict()
    d["dense_equivalent"] = False  # the model section is already the resolved model
    with open(run_dir / "config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(d, f, sort_keys=False)


def train(args: TrainArgs, resume: bool = False, stop_after: int | None = None,
          on_step=None, overwrite: bool = False) -> dict:
    """Train; returns the final metrics. ``resume`` continues from the newest step
    with both a model and a store checkpoint in ``run_dir`` (a fresh start when
    ``run_dir`` holds no checkpoint at all; it never deletes one). A new run in a
    ``run_dir`` that holds checkpoints needs ``overwrite``. ``stop_after`` ends the
    loop after that step as if the job was killed (no final eval/plot: tests).
    ``on_step(step, backend)`` is called after every step (tests inject faults)."""
    run_dir = Path(args.run_dir).absolute()
    if resume and overwrite:
        raise InvalidArgument("overwrite", "False with resume (continue or start over, "
                              "not both)", overwrite)
    if not resume and not overwrite and _has_checkpoints(run_dir):
        raise InvalidArgument("run_dir", "a directory without checkpoints (or --resume to "
                              "continue it, --overwrite to start over)", str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    backend = (LocalBackend if args.workers == 0 else RayBackend)(args, run_dir)
    try:
        return _loop(args, backend, run_dir, resume, stop_after, on_step)
    finally:
        backend.close()


def _loop(args, backend, run_dir, resume, stop_after, on_step) -> dict:
    from tqdm import tqdm

    tables = backend.table_names()
    start, seconds, tokens = 0, 0.0, 0
    resumed = _resume_step(run_dir, tables) if resume else None
    if resumed is not None:
        start = resumed
        saved = load_model_checkpoint(run_dir, start)
        if saved["model_args"] != backend.model_args.to_dict():
            raise InvalidArgument("model", "the model of the checkpoint being resumed",
                                  "a different model config")
        seconds, tokens = saved["seconds"], saved["tokens"]
        backend.start(start)
        log.info("resumed %s at step %d", run_dir, start)
    else:
        if resume:
            log.warning("no checkpoint in %s: starting from step 0", run_dir)
        else:  # train() checked that overwrite was asked for if there are any
            for sub in (CHECKPOINTS, STORE):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
        backend.start(None)
    write_config(args, backend.model_args, run_dir)
    metrics = Metrics(run_dir / METRICS, keep_until=start if resumed is not None else None)

    def checkpoint(step):
        save_checkpoint(backend, run_dir, step, {"seconds": seconds, "tokens": tokens,
                                                 "model_args": backend.model_args.to_dict()})

    if args.checkpoint_every and resumed is None:
        checkpoint(0)  # the state a shard restarted before the first checkpoint rolls to
    bar = tqdm(total=args.steps, initial=start, disable=not args.progress, dynamic_ncols=True,
               desc=args.store.name)
    step, last_eval, rollbacks = start, None, 0
    try:
        while step < args.steps:
            step += 1
            lr = lr_at(args, step)
            try:  # a restarted shard can surface in the step, the evaluation or the save
                t0 = time.perf_counter()
                out = backend.train_step(step, lr)
                dt = time.perf_counter() - t0
                seconds += dt
                tokens += out["tokens"]
                row = {"step": step, "loss": out["loss"], "lr": lr,
                       "grad_norm": out["grad_norm"], "tokens": tokens, "seconds": seconds}
                if args.eval_every and step % args.eval_every == 0:
                    last_eval = row["eval"] = backend.evaluate()
                metrics.log(row)
                if args.checkpoint_every and step % args.checkpoint_every == 0:
                    checkpoint(step)
            except StoreRolledBack as e:
                if e.step not in checkpoint_steps(run_dir, tables):
                    raise
                rollbacks += 1
                log.warning("store rolled back to step %d: restoring the model of that step",
                            e.step)
                saved = load_model_checkpoint(run_dir, e.step)
                seconds, tokens = saved["seconds"], saved["tokens"]
                _set_aside_after(run_dir, tables, e.step)
                backend.restore(e.step)
                metrics.truncate(e.step)
                bar.n = step = e.step
                bar.refresh()
                continue
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{out['tokens'] / dt:,.0f}",
                            **({"recall": f"{last_eval['recall']:.3f}"}
                               if last_eval and "recall" in last_eval else {}))
            if on_step is not None:
                on_step(step, backend)
            if stop_after is not None and step >= stop_after:
                return {"step": step, "stopped": True, "losses": metrics.losses(),
                        "eval": last_eval, "seconds": seconds, "tokens": tokens,
                        "rollbacks": rollbacks, "run_dir": str(run_dir)}
    finally:
        bar.close()
    if metrics.rows and "eval" not in metrics.rows[-1]:
        last_eval = backend.evaluate()
        metrics.rows[-1]["eval"] = last_eval
        metrics._rewrite()
    plot(metrics, run_dir / PLOT, f"{args.store.name}: {args.steps} steps, W={args.workers}")
    return {"step": step, "stopped": False, "losses": metrics.losses(), "eval": last_eval,
            "seconds": seconds, "tokens": tokens, "rollbacks": rollbacks,
            "run_dir": str(run_dir)}


# ---- CLI ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.train`` and ``memstore train``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="memstore train", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (trainer/configs/*.yaml)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the newest step with model and store checkpoints "
                       "in run_dir (never deletes a checkpoint)")
    start.add_argument("--overwrite", action="store_true",
                       help="start a new run in a run_dir that holds checkpoints, deleting them")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set workers=2 --set model.dim=64")
    ns = parser.parse_args(argv)
    try:
        args = load_config(ns.config, ns.set)
    except InvalidArgument as e:
        parser.error(str(e))
    try:
        result = train(args, resume=ns.resume, overwrite=ns.overwrite)
    except (InvalidArgument, memstore.CheckpointError) as e:
        parser.exit(2, f"memstore train: error: {e}\n")
    ev = result.get("eval") or {}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float))
    print(f"{args.run_dir}: {result['step']} steps, {result['tokens']:,} tokens in "
          f"{result['seconds']:.1f} s; final loss {result['losses'][-1][1]:.4f}; {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
