"""Checkpoints of a training run: the model and its dense optimizer, and the value
tables at the same step.

Layout of a run's checkpoint directory (the run_dir, or ``<ray.storage_path>/<name>``)::

    checkpoints/step-N/model.pt        dense parameters, optimizer state, RNG, counters
    checkpoints/step-N/store.json      {"step": N, "tables": {table: store checkpoint path}}
    checkpoints/step-N/checksums.json  the sha256 and size of the two files above
    store/<table>/step-N/              the value table at step N (a memstore checkpoint)

A step is a checkpoint once its ``checkpoints/step-N`` directory holds the three files,
the two files match their checksums, and every store checkpoint it names is committed
(its manifest verifies with the table's checkpoint key, see :mod:`memstore.checkpoint`).
Nothing in a step directory is loaded before its checksums match: a damaged one is
refused with CheckpointError naming the file, and a resume passes over it. The
checksums detect damage, not forgery: the store checkpoints are what is signed.

The store saves first, then the model directory is written (in-process: a temporary
directory renamed into place; on Ray Train: reported with ``ray.train.report``, which
copies it to storage), so a step directory never names a store checkpoint that was not
committed before it. Everything in ``model.pt`` is tensors and plain types: it loads
with ``torch.load(weights_only=True)``.

Store checkpoints verify with keys derived from the operator's secret
(:func:`memstore.checkpoint.operator_secret`), resolved where the tables are created
and loaded: on Ray Train, rank 0's node; a run over several nodes needs the same
``MEMSTORE_CHECKPOINT_SECRET`` (or key file) on every node.

Checkpoints are never deleted by the trainer except by ``--overwrite``: checkpoints of
an abandoned future (steps after the one a run went back to) are moved under
``abandoned/<time>/``, where no restarted shard and no resume looks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

import memstore
from memstore import checkpoint as store_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTS",
    "STORE",
    "ABANDONED",
    "MODEL_FILE",
    "STORE_FILE",
    "CHECKSUMS_FILE",
    "step_dir",
    "store_path",
    "write",
    "read",
    "verify",
    "save_local",
    "checkpoint_steps",
    "resume_step",
    "set_aside",
    "set_aside_after",
    "has_checkpoints",
    "clear",
    "is_uri",
]

CHECKPOINTS = "checkpoints"
STORE = "store"
ABANDONED = "abandoned"
MODEL_FILE = "model.pt"
STORE_FILE = "store.json"
CHECKSUMS_FILE = "checksums.json"
_CHECKSUMS_FORMAT = "memstore-train-checkpoint"
_MAX_JSON_BYTES = 1 << 20  # store.json and checksums.json: a few hundred bytes each
_HASH_CHUNK = 16 << 20
RAY_TRAIN_FILES = ("checkpoint_manager_snapshot.json", ".validate_storage_marker")
_STEP = re.compile(r"^step-(\d+)$")


def is_uri(path: str) -> bool:
    return "://" in str(path)


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def join(root: str | Path, *names: str) -> str:
    """``root/name/...``; a URI keeps its query (its filesystem options) at the end."""
    return store_checkpoint.join(str(root).rstrip("/") or "/", *names)


def step_dir(root: str | Path, step: int) -> str:
    """The model checkpoint directory of ``step`` under ``root``."""
    return join(root, CHECKPOINTS, step_name(step))


def store_root(root: str | Path, table: str) -> str:
    """The checkpoint_root of table ``table`` of the run."""
    return join(root, STORE, table)


def store_path(root: str | Path, table: str, step: int) -> str:
    """Where table ``table`` of the run saves itself at ``step`` (its checkpoint_root
    is the folder above)."""
    return store_checkpoint.checkpoint_dir(store_root(root, table), step)


# ---- one checkpoint directory ------------------------------------------------------


def write(folder: str | Path, step: int, state: dict, tables: dict[str, str]) -> None:
    """``model.pt`` (``state``: tensors and plain types), ``store.json`` (the store
    checkpoint of each table) and, last, ``checksums.json`` (their sha256 and sizes)
    into the local directory ``folder``, fsynced."""
    folder = Path(folder)
    with open(folder / MODEL_FILE, "wb") as f:
        torch.save({"step": step, **state}, f)
        _sync(f)
    with open(folder / STORE_FILE, "w", encoding="utf-8") as f:
        json.dump({"step": step, "tables": tables}, f)
        _sync(f)
    files = {}
    for name in (MODEL_FILE, STORE_FILE):
        sha, size = _sha256(folder / name)
        files[name] = {"sha256": sha, "bytes": size}
    with open(folder / CHECKSUMS_FILE, "w", encoding="utf-8") as f:
        json.dump({"format": _CHECKSUMS_FORMAT, "files": files}, f)
        _sync(f)


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _sha256(file: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _small_json(folder: Path, name: str):
    """The JSON of ``folder/name``, refused over 1 MiB before it is read."""
    file = folder / name
    try:
        if file.stat().st_size > _MAX_JSON_BYTES:
            raise memstore.CheckpointError(str(folder), f"{name} is over {_MAX_JSON_BYTES} bytes")
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise memstore.CheckpointError(str(folder), f"{name} is missing or unreadable: {e}") from e


def verify(folder: str | Path) -> None:
    """Check ``model.pt`` and ``store.json`` against ``checksums.json`` (sizes first,
    then sha256); CheckpointError naming the file that does not match."""
    folder = Path(folder)
    sums = _small_json(folder, CHECKSUMS_FILE)
    names = (MODEL_FILE, STORE_FILE)
    files = sums.get("files") if isinstance(sums, dict) else None
    if (
        not isinstance(sums, dict)
        or sums.get("format") != _CHECKSUMS_FORMAT
        or not isinstance(files, dict)
        or set(files) != set(names)
        or not all(isinstance(e, dict) and set(e) == {"sha256", "bytes"} for e in files.values())
    ):
        raise memstore.CheckpointError(str(folder), f"{CHECKSUMS_FILE} is malformed")
    for name in names:
        want = files[name]
        try:
            size = (folder / name).stat().st_size
            got = _sha256(folder / name) if size == want["bytes"] else (None, size)
        except OSError as e:
            raise memstore.CheckpointError(str(folder), f"{name} is unreadable: {e}") from e
        if got != (want["sha256"], want["bytes"]):
            raise memstore.CheckpointError(
                str(folder),
                f"{name} does not match {CHECKSUMS_FILE} (sha256 {got[0]}, {got[1]} bytes; "
                f"expected {want['sha256']}, {want['bytes']} bytes)",
            )


def read(folder: str | Path) -> tuple[dict, dict]:
    """(model state, store.json) of a local checkpoint directory, once both files match
    their checksums; the model file is data, never code (weights_only)."""
    folder = Path(folder)
    verify(folder)
    stores = _small_json(folder, STORE_FILE)
    state = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    return state, stores


def committed(stores: dict, tables: list[str]) -> bool:
    """Every table of the run has a committed store checkpoint in ``stores``."""
    paths = stores.get("tables") if isinstance(stores, dict) else None
    if not isinstance(paths, dict):
        return False
    for name in tables:
        if name not in paths:
            return False
        try:
            store_checkpoint.read_manifest(paths[name])
        except memstore.MemstoreError:  # not committed, not verified, not a path
            return False
    return True


def save_local(root: Path, step: int, state: dict, tables: dict[str, str]) -> None:
    """In-process runs: the checkpoint directory of ``step`` under ``root``, written
    to a temporary sibling and renamed into place (a crash leaves no half of it)."""
    final = Path(step_dir(root, step))
    final.parent.mkdir(parents=True, exist_ok=True)
    set_aside(root, final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    write(staging, step, state, tables)
    os.rename(staging, final)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the checkpoints of a run ------------------------------------------------------


def _steps(folder: Path) -> list[int]:
    names = os.listdir(folder) if folder.is_dir() else []
    return sorted(int(m.group(1)) for n in names if (m := _STEP.match(n)))


def model_steps(root: Path) -> list[int]:
    """Steps with a complete model checkpoint directory (its three files)."""
    return [
        s
        for s in _steps(root / CHECKPOINTS)
        if all(
            (Path(step_dir(root, s)) / f).is_file()
            for f in (MODEL_FILE, STORE_FILE, CHECKSUMS_FILE)
        )
    ]


def store_steps(root: Path, table: str) -> list[int]:
    """Steps with a committed store checkpoint of ``table``."""
    return sorted(
        int(m.group(1))
        for p in store_checkpoint.checkpoints(store_root(root, table))
        if (m := _STEP.match(os.path.basename(p)))
    )


def checkpoint_steps(root: Path, tables: list[str]) -> list[int]:
    """Steps with a model checkpoint that matches its checksums and whose store
    checkpoints are all committed; a damaged one is passed over with a warning."""
    out = []
    for step in model_steps(root):
        folder = Path(step_dir(root, step))
        try:
            verify(folder)
        except memstore.CheckpointError as e:
            log.warning("skipping %s: %s", folder, e.reason)
            continue
        if committed(_small_json(folder, STORE_FILE), tables):
            out.append(step)
    return out


def has_checkpoints(root: Path) -> bool:
    return any(
        (root / sub).exists() and any((root / sub).iterdir()) for sub in (CHECKPOINTS, STORE)
    ) or any((root / name).exists() for name in RAY_TRAIN_FILES)


def clear(root: Path) -> None:
    """Delete every checkpoint of the run (``--overwrite``), Ray Train's record too."""
    for sub in (CHECKPOINTS, STORE):
        shutil.rmtree(root / sub, ignore_errors=True)
    for name in RAY_TRAIN_FILES:
        (root / name).unlink(missing_ok=True)


def set_aside(root: Path, path: Path) -> None:
    """Move ``path`` (inside ``root``) under ``root/abandoned/<time>/``, keeping its
    place in the tree: the trainer never deletes a checkpoint it may need."""
    if not path.exists():
        return
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    target = root / ABANDONED / stamp / path.relative_to(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, target)
    _fsync_dir(path.parent)
    log.warning("moved %s to %s", path, target)


def set_aside_after(root: Path, tables: list[str], step: int) -> None:
    """Set aside the checkpoints of steps after ``step``: an abandoned future, which a
    restarted shard must never reload and a resume must never pick."""
    for s in _steps(root / CHECKPOINTS):
        if s > step:
            set_aside(root, Path(step_dir(root, s)))
    for name in tables:
        for s in _steps(root / STORE / name):
            if s > step:
                set_aside(root, Path(store_path(root, name, s)))


def resume_step(root: Path, tables: list[str], strict: bool = True) -> int | None:
    """The step a run continues from: the newest step whose model checkpoint names
    committed store checkpoints of every table. Later checkpoints are set aside with a
    warning. None when there is no checkpoint at all; when there are some but none is
    complete: ``strict``, CheckpointError and nothing is changed; otherwise they are
    all set aside and the run starts over (a restart before its first checkpoint)."""
    steps = checkpoint_steps(root, tables)
    if not steps:
        if has_checkpoints(root) and not strict:
            set_aside_after(root, tables, -1)
        elif has_checkpoints(root):
            found = {
                "model": model_steps(root),
                **{f"store {n}": store_steps(root, n) for n in tables},
            }
            raise memstore.CheckpointError(
                str(root),
                f"no step has both a model and a store checkpoint ({found}); "
                "nothing was changed: start over with --overwrite, or restore the missing "
                "files",
            )
        return None
    start = steps[-1]
    newer = sorted(
        {s for s in model_steps(root) if s > start}
        | {s for n in tables for s in store_steps(root, n) if s > start}
    )
    if newer:
        log.warning(
            "resuming at step %d, the newest step with model and store checkpoints; "
            "checkpoints of later steps %s are set aside under %s",
            start,
            newer,
            root / ABANDONED,
        )
    set_aside_after(root, tables, start)
    return start
