"""Crash-safe checkpoints of a sharded value table.

A checkpoint is a directory::

    step-000000123/
        block-r0c0.pt      one torch.save file per stored block: values, optimizer
        block-r0c1.pt      state, counters (written by each shard, in parallel)
        ...
        manifest.json      written LAST, by atomic rename: table config, grid, step,
                           updates and the sha256 of every block file

A directory without ``manifest.json`` is not a checkpoint: a save that dies before
:func:`commit` leaves block files nobody reads. Every file is written to a temporary
name, fsynced and renamed, so a file that exists under its final name is complete.

Any grid loads any checkpoint (:func:`load_block` assembles a target block from the
stored blocks it overlaps), with one exception: the row-wise Adagrad accumulator is
per (row, column block) and cannot be re-gridded over columns; see :func:`load_block`.

Manifest (``version`` 1)::

    {"format": "memstore-checkpoint", "version": 1, "step": 123, "last_step": 123,
     "updates": 123, "created_unix": 1.7e9,
     "table": {"name": ..., "rows": R, "dim": D, "dtype": "float32",
               "optimizer": {"kind": "adam", ...}, "seed": 0, ...anything given},
     "grid": {"row_bounds": [0, r1, ..., R], "col_bounds": [0, c1, ..., D]},
     "blocks": [{"block": "r0c0", "file": "block-r0c0.pt", "spec": {...BlockSpec...},
                 "sha256": "...", "bytes": 12345, "last_step": 123, "updates": 123}, ...]}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import uuid

import torch

from .errors import CheckpointError, InvalidArgument
from .optim import OptimizerKind, optimizer_from_dict
from .shard_table import BlockSpec

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "write_block",
    "commit",
    "read_manifest",
    "latest_checkpoint",
    "checkpoint_dir",
    "load_block",
]

FORMAT_NAME = "memstore-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_BLOCK_FORMAT = "memstore-block"
_BLOCK_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Files are hashed in chunks so that a block of many GiB never sits twice in memory.
_HASH_CHUNK = 16 << 20
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(BlockSpec))


# ---- small durable-file helpers ---------------------------------------------
def _fsync_dir(path: str) -> None:
    """Make renames inside ``path`` durable: a rename lives in the directory's inode."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: str, final: str) -> str:
    # Hidden, and unique per process and call, so parallel writers never share a
    # temporary file and readers never mistake one for a finished file.
    return os.path.join(path, f".{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _sha256_file(file: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _spec_dict(spec) -> dict:
    if isinstance(spec, BlockSpec):
        return dataclasses.asdict(spec)
    try:
        return dataclasses.asdict(BlockSpec(**{k: int(spec[k]) for k in _SPEC_FIELDS}))
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidArgument("spec", f"a BlockSpec or a dict of {list(_SPEC_FIELDS)}",
                              spec) from e


# ---- writing -------------------------------------------------------------------
def write_block(path: str | os.PathLike, block_id: str, state_dict: dict) -> dict:
    """Write one block's ``ShardTable.state_dict()`` durably; returns its manifest entry.

    Safe to call from many processes at once for different ``block_id`` values: each
    writes its own temporary file and renames it into place. The entry is what
    :func:`commit` needs: ``{block, file, spec, sha256, bytes, last_step, updates}``.
    """
    path = os.fspath(path)
    if not isinstance(block_id, str) or not _BLOCK_ID.match(block_id):
        raise InvalidArgument("block_id", "1-128 characters of [A-Za-z0-9_.-], not starting "
                              "with '.'", block_id)
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, MANIFEST)):
        # Overwriting a block of a committed checkpoint would break its checksums:
        # a crash before the next commit would leave a "committed" but unloadable step.
        raise CheckpointError(path, "already committed; write a new step directory")
    payload = {
        "format": _BLOCK_FORMAT,
        "version": FORMAT_VERSION,
        "block": block_id,
        "spec": _spec_dict(state_dict["spec"]),
        "dtype": str(state_dict["dtype"]),
        "optimizer": dict(state_dict["optimizer"]),
        "values": state_dict["values"].detach().cpu().contiguous(),
        "state": {k: v.detach().cpu().contiguous() for k, v in state_dict["state"].items()},
        "last_step": int(state_dict["last_step"]),
        "updates": int(state_dict["updates"]),
    }
    final = f"block-{block_id}.pt"
    tmp = _temp_name(path, final)
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        # Hash what is on disk, the bytes a reader will verify.
        sha, size = _sha256_file(tmp)
        os.replace(tmp, os.path.join(path, final))
    except BaseException:
        _remove_quietly(tmp)
        raise
    log.debug("wrote %s/%s (%d bytes)", path, final, size)
    return {"block": block_id, "file": final, "spec": payload["spec"], "sha256": sha,
            "bytes": size, "last_step": payload["last_step"], "updates": payload["updates"]}


def _remove_quietly(file: str) -> None:
    try:
        os.remove(file)
    except OSError:
        pass


def commit(path: str | os.PathLike, table_config: dict, entries: list[dict], step: int) -> dict:
    """Make the checkpoint in ``path`` exist: write ``manifest.json`` last, atomically.

    ``table_config`` must hold ``rows``, ``dim``, ``dtype`` and ``optimizer`` (a dict
    or a memstore optimizer); everything else in it (name, seed, ...) is kept as is.
    The entries must tile the table as a grid, agree on their counters, and their
    files must be in ``path`` with the sizes written. Returns the manifest.
    """
    path = os.fspath(path)
    table = _table_config(table_config)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidArgument("step", "an int >= 0", step)
    entries = [dict(e, spec=_spec_dict(e["spec"])) for e in entries]
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "step": step,
        "created_unix": time.time(),
        "table": table,
        "blocks": entries,
    }
    _check_entries(path, manifest)  # fills grid, last_step and updates
    for e in entries:
        file = os.path.join(path, e["file"])
        if not os.path.isfile(file) or os.path.getsize(file) != e["bytes"]:
            raise CheckpointError(path, f"block file {e['file']} is missing or not the "
                                  f"{e['bytes']} bytes written")
    # The block renames must be durable before the manifest that names them is.
    _fsync_dir(path)
    tmp = _temp_name(path, MANIFEST)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, MANIFEST))
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(path)
    log.info("committed checkpoint %s (step %d, %d blocks)", path, step, len(entries))
    return manifest


def _table_config(table_config: dict) -> dict:
    table = dict(table_config)
    missing = [k for k in ("rows", "dim", "dtype", "optimizer") if k not in table]
    if missing:
        raise InvalidArgument("table_config", "rows, dim, dtype and optimizer", f"no {missing}")
    opt = table["optimizer"]
    # Normalised through optimizer_from_dict so that manifests compare equal to the
    # blocks' own optimizer dicts (tuples vs JSON lists) and unknown kinds fail here.
    opt = opt.to_dict() if hasattr(opt, "to_dict") else optimizer_from_dict(opt).to_dict()
    table["optimizer"] = json.loads(json.dumps(opt))
    try:
        json.dumps(table)
    except (TypeError, ValueError) as e:
        raise InvalidArgument("table_config", "JSON-serialisable values", str(e)) from e
    return table


def _check_entries(path: str, manifest: dict) -> None:
    """Check the blocks tile rows × dim as a grid; set grid, last_step and updates.

    Shared by commit and read_manifest, so that load_block can rely on every target
    cell being covered by exactly one stored block.
    """
    rows, dim = int(manifest["table"]["rows"]), int(manifest["table"]["dim"])
    entries = manifest["blocks"]
    if not entries:
        raise CheckpointError(path, "no blocks")
    specs = [BlockSpec(**e["spec"]) for e in entries]
    if any((s.rows, s.dim) != (rows, dim) for s in specs):
        raise CheckpointError(path, f"a block's table shape differs from {rows} x {dim}")
    rb = sorted({b for s in specs for b in (s.row_start, s.row_stop)})
    cb = sorted({b for s in specs for b in (s.col_start, s.col_stop)})
    cells = {(s.row_start, s.row_stop, s.col_start, s.col_stop) for s in specs}
    grid = {(r0, r1, c0, c1) for r0, r1 in zip(rb, rb[1:]) for c0, c1 in zip(cb, cb[1:])}
    if rb[0] != 0 or rb[-1] != rows or cb[0] != 0 or cb[-1] != dim \
            or cells != grid or len(specs) != len(grid):
        raise CheckpointError(path, f"blocks do not tile {rows} x {dim} as a grid "
                              f"(row bounds {rb}, col bounds {cb}, {len(specs)} blocks)")
    if len({e["file"] for e in entries}) != len(entries):
        raise CheckpointError(path, "two blocks name the same file")
    counters = {(int(e["last_step"]), int(e["updates"])) for e in entries}
    if len(counters) != 1:
        # Blocks saved at different steps would mix two states of the table.
        raise CheckpointError(path, f"blocks disagree on (last_step, updates): {sorted(counters)}")
    (last_step, updates), = counters
    manifest.update(grid={"row_bounds": rb, "col_bounds": cb}, last_step=last_step,
                    updates=updates)


# ---- finding and reading ---------------------------------------------------------
def checkpoint_dir(root: str, step: int) -> str:
    """``root/step-000000123``: zero-padded so that names sort by step."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidArgument("step", "an int >= 0", step)
    return os.path.join(root, f"step-{step:09d}")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a committed checkpoint; CheckpointError when there is none.

    Raised for: no manifest (never committed, or not a checkpoint), unreadable or
    corrupt JSON, another format or an unknown version, blocks that do not tile the
    table.
    """
    path = os.fspath(path)
    file = os.path.join(path, MANIFEST)
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(path, f"no {MANIFEST}: not a committed checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"{MANIFEST} is unreadable or corrupt: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(path, f"{MANIFEST} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(path, f"unknown format version {manifest.get('version')!r} "
                              f"(this memstore reads version {FORMAT_VERSION})")
    try:
        _check_entries(path, manifest)
    except (KeyError, TypeError, ValueError) as e:  # InvalidArgument is a ValueError
        raise CheckpointError(path, f"{MANIFEST} is malformed: {e!r}") from e
    return manifest


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    """The committed ``root/step-N`` directory of the highest step, or None.

    Directories without a readable manifest (a save that died before commit) are
    skipped, so a crash mid-save falls back to the previous committed step.
    """
    root = os.fspath(root)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return None
    steps = sorted(((int(m.group(1)), n) for n in names if (m := _STEP_DIR.match(n))),
                   reverse=True)
    for step, name in steps:
        path = os.path.join(root, name)
        try:
            read_manifest(path)
        except CheckpointError as e:
            log.info("skipping %s: %s", path, e.reason)
            continue
        return path
    return None


# ---- loading -------------------------------------------------------------------
def load_block(path: str | os.PathLike, spec: BlockSpec, manifest: dict | None = None) -> dict:
    """The state_dict of block ``spec`` (any grid), for ``ShardTable.load_state_dict``.

    Values and every optimizer state tensor are cut from the stored blocks that
    overlap rows [row_start, row_stop) × cols [col_start, col_stop); each stored file's
    sha256 is checked before use (mismatch: CheckpointError naming the file).

    Row-wise Adagrad keeps one accumulator per (row, column block): it is fed by the
    mean of g² over the block's columns, so column blocks of the same row hold
    different values and no re-gridding of columns is exact. Loading such a table is
    therefore allowed only when the target's columns are exactly one stored column
    block (any row grid is fine); otherwise CheckpointError says so.
    """
    path = os.fspath(path)
    manifest = read_manifest(path) if manifest is None else manifest
    table = manifest["table"]
    if (spec.rows, spec.dim) != (int(table["rows"]), int(table["dim"])):
        raise CheckpointError(path, f"target block is of a {spec.rows} x {spec.dim} table, "
                              f"the checkpoint of a {table['rows']} x {table['dim']} table")
    kind = OptimizerKind(table["optimizer"]["kind"])
    _check_rowwise_columns(path, manifest, spec, kind)
    shape = spec.shape
    dtype = getattr(torch, table["dtype"])
    values = torch.empty(shape, dtype=dtype)
    state = {n: torch.empty(kind.state_shape(*shape), dtype=torch.float32)
             for n in kind.state_names()}
    for entry in manifest["blocks"]:
        src = BlockSpec(**entry["spec"])
        r0, r1 = max(src.row_start, spec.row_start), min(src.row_stop, spec.row_stop)
        c0, c1 = max(src.col_start, spec.col_start), min(src.col_stop, spec.col_stop)
        if r0 >= r1 or c0 >= c1:
            continue
        stored = _read_block(path, entry, manifest)
        # Source and target coordinates of the overlap.
        sr, sc = slice(r0 - src.row_start, r1 - src.row_start), slice(c0 - src.col_start,
                                                                    c1 - src.col_start)
        tr, tc = slice(r0 - spec.row_start, r1 - spec.row_start), slice(c0 - spec.col_start,
                                                                      c1 - spec.col_start)
        values[tr, tc] = stored["values"][sr, sc]
        for name, out in state.items():
            if out.dim() == 1:  # row-wise: the target's columns are this one column block
                out[tr] = stored["state"][name][sr]
            else:
                out[tr, tc] = stored["state"][name][sr, sc]
    return {"spec": dataclasses.asdict(spec), "dtype": table["dtype"],
            "optimizer": dict(table["optimizer"]), "values": values, "state": state,
            "last_step": int(manifest["last_step"]), "updates": int(manifest["updates"])}


def _check_rowwise_columns(path: str, manifest: dict, spec: BlockSpec, kind) -> None:
    if kind is not OptimizerKind.ROWWISE_ADAGRAD:
        return
    cb = manifest["grid"]["col_bounds"]
    if (spec.col_start, spec.col_stop) not in set(zip(cb, cb[1:])):
        raise CheckpointError(
            path, f"rowwise_adagrad keeps one accumulator per (row, column block); target "
            f"columns [{spec.col_start}, {spec.col_stop}) are not one stored column block "
            f"(column bounds {cb}), and changing the column grid would change the optimizer")


def _read_block(path: str, entry: dict, manifest: dict) -> dict:
    """Load one stored block after checking its sha256 and its contents' metadata."""
    file = os.path.join(path, entry["file"])
    try:
        sha, _ = _sha256_file(file)
    except OSError as e:
        raise CheckpointError(path, f"block file {entry['file']} is unreadable: {e}") from e
    if sha != entry["sha256"]:
        raise CheckpointError(path, f"block file {entry['file']} is corrupt: sha256 {sha} "
                              f"!= {entry['sha256']} in the manifest")
    # weights_only: a checkpoint directory must never be able to run code; mmap keeps
    # only the slices we copy out resident.
    try:
        stored = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a file it cannot read
        raise CheckpointError(path, f"block file {entry['file']} does not load: {e}") from e
    if not isinstance(stored, dict) or not isinstance(stored.get("state"), dict) \
            or not isinstance(stored.get("values"), torch.Tensor):
        raise CheckpointError(path, f"block file {entry['file']} is not a memstore block")
    table, src = manifest["table"], BlockSpec(**entry["spec"])
    want_state = OptimizerKind(table["optimizer"]["kind"]).state_shape(*src.shape)
    problems = [
        stored.get("format") != _BLOCK_FORMAT and "not a memstore block",
        stored.get("spec") != entry["spec"] and "spec differs from the manifest",
        stored.get("dtype") != table["dtype"]
        and f"dtype {stored.get('dtype')} != {table['dtype']}",
        _norm_opt(stored.get("optimizer")) != table["optimizer"] and "optimizer differs",
        tuple(stored["values"].shape) != src.shape and "values shape differs from its spec",
        any(tuple(t.shape) != want_state for t in stored["state"].values())
        and "state shape differs from its spec",
        set(stored["state"]) != set(OptimizerKind(table["optimizer"]["kind"]).state_names())
        and "state tensors differ from the optimizer's",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(path, f"block file {entry['file']}: {'; '.join(problems)}")
    return stored


def _norm_opt(opt) -> dict | None:
    try:
        return json.loads(json.dumps(optimizer_from_dict(opt).to_dict()))
    except (InvalidArgument, TypeError, AttributeError):
        return None
