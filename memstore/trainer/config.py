"""The trainer's config: :class:`TrainArgs` and its sections, loaded from YAML.

Every section is a dataclass checked by ``memstore._internal.validation``: unknown keys
are refused by name (``data.entitiez``), every value is checked against its field's
type and bounds, and choices are enums with string values, so a YAML file, a
``--set key=value`` and a ``TrainArgs(...)`` in Python are held to the same rules.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import typing

import torch

from memstore import InvalidArgument
from memstore._internal.validation import (
    bounded,
    check_fields,
    check_known_keys,
    dataclass_from_dict,
)

from . import configs
from .model import ModelArgs, dense_equivalent

__all__ = [
    "DataKind",
    "StoreMode",
    "DataChannel",
    "ValueSchedule",
    "Device",
    "DataArgs",
    "StoreArgs",
    "RayArgs",
    "FactsSet",
    "FinetuneMethod",
    "FinetuneArgs",
    "TrainArgs",
    "load_config",
]


class DataKind(str, enum.Enum):
    """``data.kind``: what the model trains on."""

    FACTS = "facts"  # synthetic factual recall (trainer.data.FactsCorpus)
    TEXT = "text"  # bytes of a file (trainer.data.ByteDataset)
    MIXED = "mixed"  # facts and bytes of a file in one vocabulary (trainer.data.MixedData)


class FactsSet(str, enum.Enum):
    """``data.train_facts``: the facts a ``mixed`` run's batches draw from."""

    FIRST = "first"  # the facts before the held-apart share data.new_facts
    SECOND = "second"  # the held-apart share (the new facts of a fine-tuning run)


class StoreMode(str, enum.Enum):
    """``store.mode``: when the store applies the pushed row gradients."""

    SYNC = "sync"  # row gradients pend until every push of a step arrived
    ASYNC = "async"  # a push is applied on arrival


class DataChannel(str, enum.Enum):
    """``store.data_channel``: how lookups and pushes reach the shards."""

    SOCKET = "socket"  # lookups and pushes over a TCP connection per shard
    RAY = "ray"  # every call over Ray


class ValueSchedule(str, enum.Enum):
    """``value_schedule``: the learning rate schedule of the values in the store."""

    COSINE = "cosine"  # the dense lr's warm-up and cosine, scaled to value_lr
    CONSTANT = "constant"  # value_lr throughout


class Device(str, enum.Enum):
    """``device``: where the workers compute (``auto``: GPUs when the cluster has one per
    worker)."""

    CPU = "cpu"
    CUDA = "cuda"  # one GPU per rank, NCCL
    AUTO = "auto"  # CUDA when there is a GPU per rank


@dataclasses.dataclass
class DataArgs:
    kind: DataKind = DataKind.FACTS
    entities: int = bounded(1000, min=1)
    attributes: int = bounded(8, min=1)
    values: int = bounded(100, min=1)
    seed: int = bounded(0, min=0)  # the facts table (not the batch order: TrainArgs.seed)
    path: str | None = None  # text file, for kind "text"
    seq_len: int = bounded(128, min=1)  # window length, for kind "text"
    # text: validation data, never sampled for training; at most one of the two. A
    # separate file, or the last val_fraction of path's bytes held out (training
    # windows stay before it). Neither: evaluation scores training windows only.
    val_path: str | None = None
    val_fraction: float | None = None
    eval_batch_size: int = bounded(1024, min=1)
    eval_windows: int = bounded(64, min=1)  # text: fixed windows, evenly spread, per part
    # kind "mixed" only: the share of a batch's rows that are text windows (the rest
    # are rows of facts; default 0.5), the share of the facts (a seeded permutation's
    # last part) held apart as the second set (default none), and which set trains.
    text_fraction: float | None = None
    new_facts: float | None = None
    train_facts: FactsSet | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.kind is not DataKind.FACTS and not self.path:
            raise InvalidArgument("path", f"a text file for kind '{self.kind.value}'", self.path)
        self._check_mixed()
        for name in ("val_path", "val_fraction"):
            if self.kind is DataKind.FACTS and getattr(self, name) is not None:
                raise InvalidArgument(
                    name, "unset for kind 'facts' (every fact is evaluated)", getattr(self, name)
                )
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise InvalidArgument("val_fraction", "a number in (0, 1)", self.val_fraction)
        if self.val_fraction is not None and self.val_path is not None:
            raise InvalidArgument(
                "val_fraction", "unset when data.val_path is given", self.val_fraction
            )

    def _check_mixed(self) -> None:
        names = ("text_fraction", "new_facts", "train_facts")
        if self.kind is not DataKind.MIXED:
            for name in names:
                if getattr(self, name) is not None:
                    raise InvalidArgument(name, "unset unless kind is 'mixed'", getattr(self, name))
            return
        if self.text_fraction is None:
            self.text_fraction = 0.5
        if self.train_facts is None:
            self.train_facts = FactsSet.FIRST
        if not 0 <= self.text_fraction < 1:
            raise InvalidArgument("text_fraction", "a number in [0, 1)", self.text_fraction)
        if self.new_facts is not None and not 0 < self.new_facts < 1:
            raise InvalidArgument("new_facts", "None or a number in (0, 1)", self.new_facts)
        if self.train_facts is FactsSet.SECOND and self.new_facts is None:
            raise InvalidArgument(
                "train_facts", "'first' unless data.new_facts holds a second set apart", "second"
            )


@dataclasses.dataclass
class StoreArgs:
    name: str = "run"  # table name prefix: tables are "<name>-<table>"
    shards: int | list[int] = bounded(1, min=1)  # S or [R, C] per table
    mode: StoreMode = StoreMode.SYNC
    max_staleness: int | None = bounded(None, min=0)
    # Sync mode: shards apply step s with its last push (no extra round per step).
    # None: on in sync mode; False: rank 0 calls table.step(s) after every step.
    step_on_push: bool | None = None
    data_channel: DataChannel = DataChannel.SOCKET
    # CURVE on the data channel: None wherever an end is off loopback, True always,
    # False never (memstore.create_table's data_encrypt).
    data_encrypt: bool | None = None
    threads_per_shard: int = bounded(1, min=1)
    timeout_s: float | None = bounded(None, gt=0)
    keep: bool = False  # leave the tables on the cluster after training
    # Use tables "<name>-<table>" that already exist (created by another job) instead of
    # creating them; they are left on the cluster afterwards.
    connect: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.name or "/" in self.name:
            raise InvalidArgument("name", "a non-empty string without '/'", self.name)
        if isinstance(self.shards, list):
            if len(self.shards) != 2:
                raise InvalidArgument("shards", "an int or [rows, columns]", self.shards)
            self.shards = tuple(self.shards)
        if self.step_on_push is None:
            self.step_on_push = self.mode is StoreMode.SYNC
        if self.step_on_push and self.mode is not StoreMode.SYNC:
            raise InvalidArgument("step_on_push", "false in async mode", True)


@dataclasses.dataclass
class RayArgs:
    """Ray Train's settings (workers >= 1): where its checkpoints go, how often a
    failed worker group is restarted, and what each worker reserves."""

    # Local path or URI (pyarrow.fs) of the run's checkpoints, model and store; None:
    # the run_dir itself. With a URI, checkpoints go to <storage_path>/<run name>.
    storage_path: str | None = None
    name: str | None = None  # Ray Train's run name; None: the run_dir's last part
    max_failures: int = bounded(3, min=-1)  # worker-group restarts; -1: no limit
    cpus_per_worker: float = bounded(1.0, gt=0)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.name is not None and (not self.name or "/" in self.name):
            raise InvalidArgument("name", "None or a non-empty string without '/'", self.name)


class FinetuneMethod(str, enum.Enum):
    """``finetune.method``: what a fine-tuning run trains (trainer.finetune)."""

    FULL = "full"  # every dense parameter and every value row a batch reads
    LORA = "lora"  # LoRA adapters on the attention and FFN projections; values frozen
    MEMORY = "memory"  # every value row a batch reads; dense parameters frozen
    SPARSE_MEMORY = "sparse_memory"  # the top_t rows of each step by TF-IDF; dense frozen


_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # a table's statistics snapshot


@dataclasses.dataclass
class FinetuneArgs:
    """A run that starts from another run's checkpoint and trains part of the model.
    In YAML the checkpoint is ``from`` (``from_`` in Python: ``from`` is a keyword)."""

    method: FinetuneMethod | None = None  # None: no fine-tuning, a run from scratch
    # A run directory (its newest complete checkpoint) or a checkpoints/step-N folder.
    from_: str | None = None
    top_t: int | None = bounded(None, min=1)  # sparse_memory: rows updated per step
    # sparse_memory: the statistics snapshot TF-IDF weighs against (the pretraining
    # run's stats_snapshot); None: the statistics counted so far.
    background: str | None = None
    lora_rank: int = bounded(8, min=1)
    lora_alpha: float = bounded(16.0, gt=0)

    ALIASES = {"from": "from_"}  # YAML key -> field

    @classmethod
    def from_dict(cls, d) -> FinetuneArgs:
        """From a mapping with YAML keys (``from``); errors name ``finetune.<key>``."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise InvalidArgument("finetune", "a mapping", type(d).__name__)
        known = sorted(_yaml_key(f.name) for f in dataclasses.fields(cls))
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise InvalidArgument(
                "finetune",
                f"keys among {known}",
                "unknown keys " + ", ".join(f"finetune.{k}" for k in unknown),
            )
        try:
            return cls(**{cls.ALIASES.get(k, k): v for k, v in d.items()})
        except InvalidArgument as e:
            raise InvalidArgument(f"finetune.{e.field}", e.expected, e.got) from None

    def __post_init__(self) -> None:
        check_fields(self)
        method = self.method
        if method is None:
            for name in ("from_", "top_t", "background"):
                if getattr(self, name) is not None:
                    raise InvalidArgument(
                        _yaml_key(name), "unset without a method", getattr(self, name)
                    )
            return
        if not self.from_:
            raise InvalidArgument("from", f"a checkpoint to start {method.value} from", self.from_)
        sparse = method is FinetuneMethod.SPARSE_MEMORY
        if sparse and self.top_t is None:
            raise InvalidArgument("top_t", "the rows per step (an int >= 1)", None)
        for name in ("top_t", "background"):
            if not sparse and getattr(self, name) is not None:
                raise InvalidArgument(
                    name, "unset unless method is sparse_memory", getattr(self, name)
                )
        if self.background is not None and not _SNAPSHOT_NAME.fullmatch(self.background):
            raise InvalidArgument(
                "background", "1-64 characters of [A-Za-z0-9_.-]", self.background
            )


def _yaml_key(name: str) -> str:
    return {v: k for k, v in FinetuneArgs.ALIASES.items()}.get(name, name)


@dataclasses.dataclass
class TrainArgs:
    model: dict = dataclasses.field(default_factory=dict)  # ModelArgs fields
    dense_equivalent: bool = False  # replace memory layers by FFNs of equal FLOPs
    data: DataArgs = dataclasses.field(default_factory=DataArgs)
    store: StoreArgs = dataclasses.field(default_factory=StoreArgs)
    ray: RayArgs = dataclasses.field(default_factory=RayArgs)
    steps: int = bounded(100, min=1)
    batch_size: int = bounded(64, min=1)  # global, over all workers
    lr: float = bounded(1e-3, gt=0)  # dense peak lr
    value_lr: float = bounded(1e-2, gt=0)  # the value tables' Adam lr (the peak)
    value_schedule: ValueSchedule = ValueSchedule.COSINE
    warmup: int = bounded(10, min=0)
    min_lr: float = bounded(1e-4, min=0)  # cosine floor
    weight_decay: float = bounded(0.0, min=0)
    grad_clip: float = bounded(1.0, min=0)  # global norm of the dense gradients; 0: off
    workers: int = bounded(0, min=0)  # data-parallel Ray Train workers; 0: in-process
    threads_per_worker: int | None = bounded(None, min=1)  # torch threads per rank
    device: Device = Device.CPU
    eval_every: int = bounded(0, min=0)  # 0: only at the end
    checkpoint_every: int = bounded(0, min=0)  # 0: never
    run_dir: str = "runs/default"
    seed: int = bounded(0, min=0)  # batch order; the model's seed unless model.seed is given
    progress: bool = True
    finetune: FinetuneArgs = dataclasses.field(default_factory=FinetuneArgs)
    # At every checkpoint the tables' row statistics counted so far are also kept under
    # this name (what a fine-tuning run's finetune.background names); None: not kept.
    stats_snapshot: str | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> TrainArgs:
        return dataclass_from_dict(cls, d, "")

    def __post_init__(self) -> None:
        if not isinstance(self.finetune, FinetuneArgs):
            self.finetune = FinetuneArgs.from_dict(self.finetune)
        check_fields(self)
        check_known_keys(ModelArgs, self.model, "model")
        self._check_finetune()
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", self.run_dir):
            # Path() would make "s3://b/x" a local folder "s3:/b/x"; a run's files other
            # than checkpoints (config, metrics, plots) are local by design.
            raise InvalidArgument(
                "run_dir",
                "a local directory (checkpoints go to an object store with ray.storage_path)",
                self.run_dir,
            )
        if self.workers and self.batch_size % self.workers:
            raise InvalidArgument(
                "batch_size", f"a multiple of workers={self.workers}", self.batch_size
            )

    def _check_finetune(self) -> None:
        if self.stats_snapshot is not None and not _SNAPSHOT_NAME.fullmatch(self.stats_snapshot):
            raise InvalidArgument(
                "stats_snapshot", "None or 1-64 characters of [A-Za-z0-9_.-]", self.stats_snapshot
            )
        if self.finetune.method is not None and self.workers:
            # Ray Train's workers neither load finetune.from nor make sparse steps.
            raise InvalidArgument(
                "finetune.method",
                "None with workers >= 1 (fine-tuning runs in-process)",
                self.finetune.method.value,
            )
        if self.finetune.method is not None and self.dense_equivalent:
            raise InvalidArgument("dense_equivalent", "false when fine-tuning", True)

    def to_dict(self) -> dict:
        """Plain types only (enums as their values): YAML and Ray can carry it."""
        d = _plain(dataclasses.asdict(self))
        d["finetune"] = {_yaml_key(k): v for k, v in d["finetune"].items()}
        return d

    def model_args(self, vocab_size: int) -> ModelArgs:
        """The model: vocab from the data, value_lr from here, seed from here unless
        the model section names one, then the dense equivalent when asked."""
        d = {"vocab_size": vocab_size, "seed": self.seed, **self.model, "value_lr": self.value_lr}
        args = ModelArgs.from_dict(d)
        return dense_equivalent(args) if self.dense_equivalent else args

    def torch_device(self) -> torch.device:
        if self.device is Device.AUTO:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device.value)

    def table_name(self, table: str) -> str:
        return f"{self.store.name}-{table}"


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _section(cls, key: str):
    """The dataclass behind field ``key`` of ``cls`` (``model``: ModelArgs), or None."""
    if cls is TrainArgs and key == "model":
        return ModelArgs
    hint = typing.get_type_hints(cls).get(key)
    return hint if dataclasses.is_dataclass(hint) else None


def set_path(d: dict, dotted: str, value) -> None:
    """d[a][b] = value for "a.b"; every key on the way must be a known field (by its
    YAML name: ``finetune.from``)."""
    keys = dotted.split(".")
    node, cls = d, TrainArgs
    for i, key in enumerate(keys):
        fields = {_yaml_key(f.name) for f in dataclasses.fields(cls)}
        if key not in fields:
            raise InvalidArgument("--set", f"a key among {sorted(fields)}", ".".join(keys[: i + 1]))
        if i == len(keys) - 1:
            node[key] = value
            return
        sub = _section(cls, key)
        if sub is None:
            raise InvalidArgument(
                "--set", "a path into data, store, ray, finetune or model", dotted
            )
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node, cls = node[key], sub


def _safe_yaml(stream):
    """``stream`` (a file or a string) parsed by PyYAML's safe loader, with floats read
    as YAML 1.2 reads them: PyYAML follows YAML 1.1, where ``1e-5`` (no dot) is a
    string, and a learning rate written that way would be refused as "not a number"."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    loader = Loader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> TrainArgs:
    """TrainArgs from a YAML file plus ``key=value`` overrides (values parsed as YAML;
    ``1e-5`` is a float, as in YAML 1.2)."""
    d = {}
    if path is not None:
        with open(configs.path(path), encoding="utf-8") as f:
            d = _safe_yaml(f) or {}
        if not isinstance(d, dict):
            raise InvalidArgument("config", "a YAML mapping", type(d).__name__)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InvalidArgument("--set", "key=value", item)
        set_path(d, key.strip(), _safe_yaml(text))
    return TrainArgs.from_dict(d)
