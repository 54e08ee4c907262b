"""Crash-safe checkpoints of a sharded value table, on local disks or object stores.

A checkpoint is a directory (a key prefix on an object store)::

    step-000000123/
        block-0-0.pt       one torch.save file per stored block: values, optimizer
        block-0-1.pt       state, counters (written by each shard, in parallel)
        ...
        manifest.json      table config, grid, step, the sha256 of every block file,
                           and the sha256 of the manifest itself

Storage goes through ``pyarrow.fs``: a checkpoint path is a local path, ``file://``
or any URI that ``pyarrow.fs.FileSystem.from_uri`` resolves (``s3://bucket/key``;
options in the query, e.g. ``?endpoint_override=host:port&scheme=http``). A URI whose
scheme pyarrow.fs does not know is an error, never a local directory.

A save has three phases, so that a crash at any point leaves either the previous
state or a complete checkpoint, never a half-written one that a reader would load:

1. :func:`begin` (driver): a fresh staging location for this save. On a local
   filesystem, a hidden sibling ``.step-000000123.staging-<hex>``; on an object store
   (where nothing renames atomically), ``step-000000123/data-<hex>/``.
2. :func:`write_block` (each shard, in parallel): its block file into the staging
   location, fsynced on local filesystems.
3. :func:`commit` (driver): re-hashes every block file, then writes the checksummed
   manifest. Locally the manifest goes into the staging directory, which is fsynced and
   renamed into place in one atomic step (a concurrent save to the same path loses the
   rename and raises). On an object store the manifest, written last at
   ``step-000000123/manifest.json``, is the commit point: it names its own ``data-<hex>``
   files, so two saves racing to one path leave the manifest of one of them whole.

A directory without a valid manifest is not a checkpoint. Every manifest entry is
checked before anything is allocated or opened: block file names match a strict
pattern (no ``/`` other than the one ``data-<hex>/`` prefix, never ``..`` or an absolute
path), dtypes come from a fixed set, block shapes tile the table of the config, and
file sizes are bounded by the block's shape. Block files load only with
``torch.load(weights_only=True)``: a checkpoint can never run code.

Any grid loads any checkpoint (:func:`load_block` assembles a target block from the
stored blocks it overlaps), with one exception: the row-wise Adagrad accumulator is
per (row, column block) and cannot be re-gridded over columns; see :func:`load_block`.
:func:`restore_block` is what a starting shard uses: the newest committed checkpoint
whose blocks load, falling back (with a warning) past one whose block is damaged.

Manifest (``version`` 2)::

    {"format": "memstore-checkpoint", "version": 2, "step": 123, "last_step": 123,
     "updates": 123, "created_unix": 1.7e9,
     "table": {"name": ..., "rows": R, "dim": D, "dtype": "float32",
               "optimizer": {"kind": "adam", ...}, "seed": 0, ...anything given},
     "grid": {"row_bounds": [0, r1, ..., R], "col_bounds": [0, c1, ..., D]},
     "blocks": [{"block": "0-0", "file": "block-0-0.pt", "spec": {...BlockSpec...},
                 "sha256": "...", "bytes": 12345, "last_step": 123, "updates": 123}, ...],
     "manifest_sha256": "<sha256 of the canonical JSON of everything else>"}
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid

import torch

from ._internal.validation import DTYPES
from .errors import CheckpointError, InvalidArgument
from .optim import OptimizerKind, optimizer_from_dict
from .shard_table import BlockSpec

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "resolve",
    "begin",
    "abort",
    "write_block",
    "commit",
    "read_manifest",
    "checkpoints",
    "latest_checkpoint",
    "checkpoint_dir",
    "load_block",
    "restore_block",
]

FORMAT_NAME = "memstore-checkpoint"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_BLOCK_FORMAT = "memstore-block"
_BLOCK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DATA_DIR = re.compile(r"^data-[0-9a-f]{32}$")
_FILE = re.compile(r"^(?:(data-[0-9a-f]{32})/)?block-([A-Za-z0-9_-]{1,64})\.pt$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_STEP_DIR = re.compile(r"^step-(\d{1,18})$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_MAX_MANIFEST_BYTES = 64 << 20
_MAX_BLOCKS = 1 << 16
_MAX_ROWS_OR_DIM = 1 << 40
# A torch.save file holds the raw tensors plus a small pickle of names and numbers.
_BLOCK_FILE_SLACK = 1 << 20
# Files are hashed in chunks so that a block of many GiB never sits twice in memory.
_HASH_CHUNK = 16 << 20
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(BlockSpec))
_ENTRY_FIELDS = {"block", "file", "spec", "sha256", "bytes", "last_step", "updates"}
_EXPECTED_PATH = (
    "a local path, a file:// URI, or a URI whose scheme pyarrow.fs supports "
    "(s3://bucket/key, gs://, hdfs://, ...)"
)


# ---- locations: local paths and pyarrow.fs URIs -------------------------------------
def resolve(path: str | os.PathLike, field: str = "path") -> str:
    """The canonical form of a checkpoint path, the same in every process.

    A local path (or ``file://`` URI) becomes absolute against this process's working
    directory, so the driver resolves it before shards on other nodes and in other
    directories see it; any other URI is checked against pyarrow.fs and kept as given.
    """
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidArgument(field, _EXPECTED_PATH, path)
    match = _SCHEME.match(path)
    if match is None:
        return os.path.abspath(path)
    _, fs_path, local = _filesystem(path, field)
    return os.path.abspath(fs_path) if local else path


@functools.lru_cache(maxsize=256)
def _from_uri(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _filesystem(path: str, field: str = "path"):
    """(pyarrow filesystem, its path, whether it is the local filesystem)."""
    import pyarrow.fs as pafs

    if _SCHEME.match(path) is None:
        return pafs.LocalFileSystem(), os.path.abspath(path), True
    try:
        fs, fs_path = _from_uri(path)
    except Exception as e:  # ArrowInvalid, ArrowNotImplementedError, ValueError, ...
        raise InvalidArgument(field, _EXPECTED_PATH, f"{path!r} ({e})") from e
    return fs, fs_path, isinstance(fs, pafs.LocalFileSystem)


def _join(path: str, *names: str) -> str:
    """``path/name...``, keeping a URI's query (its filesystem options) at the end."""
    if _SCHEME.match(path) is None:
        return os.path.join(path, *names)
    base, sep, query = path.partition("?")
    return "/".join([base.rstrip("/"), *names]) + sep + query


def _split(path: str) -> tuple[str, str]:
    """(parent, last name) of a resolved path or URI."""
    if _SCHEME.match(path) is None:
        return os.path.dirname(path), os.path.basename(path)
    base, sep, query = path.partition("?")
    parent, _, name = base.rstrip("/").rpartition("/")
    return parent + sep + query, name


def _fsync_dir(path: str) -> None:
    """Make renames inside ``path`` durable: a rename lives in the directory's inode."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_size(path: str) -> int | None:
    """Size of the file at ``path``; None when there is none."""
    import pyarrow.fs as pafs

    fs, fs_path, _ = _filesystem(path)
    info = fs.get_file_info(fs_path)
    return info.size if info.type == pafs.FileType.File else None


def _read_bytes(path: str, limit: int) -> bytes:
    """The whole file, refused (before reading) when it is larger than ``limit``."""
    size = _file_size(path)
    if size is None:
        raise FileNotFoundError(path)
    if size > limit:
        raise CheckpointError(path, f"{size} bytes, more than the {limit} allowed")
    fs, fs_path, _ = _filesystem(path)
    with fs.open_input_stream(fs_path) as f:
        return f.read()


def _write_file(path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` whole or not at all (object stores: one PUT)."""
    fs, fs_path, local = _filesystem(path)
    if not local:
        with fs.open_output_stream(fs_path) as f:
            f.write(data)
        return
    parent, name = os.path.split(fs_path)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, fs_path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _list(path: str) -> list[str] | None:
    """Names directly under ``path``; None when it does not exist."""
    import pyarrow.fs as pafs

    fs, fs_path, local = _filesystem(path)
    if local:
        try:
            return os.listdir(fs_path)
        except (FileNotFoundError, NotADirectoryError):
            return None
    infos = fs.get_file_info(pafs.FileSelector(fs_path, allow_not_found=True))
    return [i.base_name for i in infos]


def _remove_tree_quietly(path: str) -> None:
    fs, fs_path, local = _filesystem(path)
    try:
        if local:
            shutil.rmtree(fs_path)
        else:
            fs.delete_dir(fs_path)
    except OSError as e:
        log.warning("could not remove %s: %s", path, e)


def _remove_quietly(file: str) -> None:
    try:
        os.remove(file)
    except OSError:
        pass


def _sha256_file(path: str) -> tuple[str, int]:
    fs, fs_path, _ = _filesystem(path)
    h, size = hashlib.sha256(), 0
    with fs.open_input_stream(fs_path) as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _spec_dict(spec) -> dict:
    if isinstance(spec, BlockSpec):
        return dataclasses.asdict(spec)
    try:
        return dataclasses.asdict(BlockSpec(**{k: _int(spec[k]) for k in _SPEC_FIELDS}))
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidArgument("spec", f"a BlockSpec or a dict of {list(_SPEC_FIELDS)}", spec) from e


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an int")
    return value


# ---- writing -------------------------------------------------------------------
def begin(path: str | os.PathLike) -> str:
    """A fresh, empty staging location for one save to ``path``; give it to every
    :func:`write_block` of the save and to :func:`commit`. Refused when ``path`` already
    holds a committed checkpoint."""
    path = resolve(path)
    _, local = _staging_kind(path)
    if _file_size(_join(path, MANIFEST)) is not None:
        raise CheckpointError(path, "already committed; write a new step directory")
    token = uuid.uuid4().hex
    if local:
        parent, name = os.path.split(path)
        staging = os.path.join(parent, f".{name}.staging-{token}")
        os.makedirs(parent, exist_ok=True)
        os.mkdir(staging)
        return staging
    staging = _join(path, f"data-{token}")
    fs, fs_path, _ = _filesystem(staging)
    fs.create_dir(fs_path)
    return staging


def _staging_kind(path: str) -> tuple[str, bool]:
    name = _split(path)[1]
    if not name or name in (".", ".."):
        raise InvalidArgument("path", "a checkpoint directory below a parent", path)
    return name, _filesystem(path)[2]


def abort(staging: str | os.PathLike) -> None:
    """Remove the staging location of a save that will not be committed (best effort:
    nothing reads an abandoned staging location, so a failure here only logs)."""
    staging = resolve(staging, "staging")
    name = _split(staging)[1]
    if not (_DATA_DIR.match(name) or re.fullmatch(r"\..+\.staging-[0-9a-f]{32}", name)):
        raise InvalidArgument("staging", "a location checkpoint.begin returned", staging)
    if _list(staging) is not None:
        _remove_tree_quietly(staging)


def _check_staging(path: str, staging: str) -> str:
    """The prefix of block files in the manifest ("" locally, "data-<hex>/" remotely)."""
    name, local = _staging_kind(path)
    parent, staged = _split(staging)
    if local:
        ok = parent == os.path.dirname(path) and re.fullmatch(
            rf"\.{re.escape(name)}\.staging-[0-9a-f]{{32}}", staged
        )
        prefix = ""
    else:
        ok = parent == path and _DATA_DIR.match(staged)
        prefix = staged + "/"
    if not ok:
        raise InvalidArgument(
            "staging", f"the location checkpoint.begin({path!r}) returned", staging
        )
    return prefix


def write_block(path: str | os.PathLike, block_id: str, state_dict: dict) -> dict:
    """Write one block's ``ShardTable.state_dict()`` into the staging location ``path``
    (from :func:`begin`); returns its manifest entry.

    Safe to call from many processes at once for different ``block_id`` values. The
    entry is what :func:`commit` needs: ``{block, file, spec, sha256, bytes, last_step,
    updates}``.
    """
    path = resolve(path)
    if not isinstance(block_id, str) or not _BLOCK_ID.match(block_id):
        raise InvalidArgument("block_id", "1-64 characters of [A-Za-z0-9_-]", block_id)
    if _file_size(_join(path, MANIFEST)) is not None:
        # Overwriting a block of a committed checkpoint would break its checksums.
        raise CheckpointError(path, "already committed; write a new step directory")
    payload = {
        "format": _BLOCK_FORMAT,
        "version": FORMAT_VERSION,
        "block": block_id,
        "spec": _spec_dict(state_dict["spec"]),
        "dtype": str(state_dict["dtype"]),
        "optimizer": dict(state_dict["optimizer"]),
        "values": _compact(state_dict["values"]),
        "state": {k: _compact(v) for k, v in state_dict["state"].items()},
        "last_step": int(state_dict["last_step"]),
        "updates": int(state_dict["updates"]),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    final = f"block-{block_id}.pt"
    _, fs_path, local = _filesystem(path)
    if local:
        os.makedirs(fs_path, exist_ok=True)
    _write_file(_join(path, final), data)
    log.debug("wrote %s/%s (%d bytes)", path, final, len(data))
    return {
        "block": block_id,
        "file": final,
        "spec": payload["spec"],
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "last_step": payload["last_step"],
        "updates": payload["updates"],
    }


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU owning exactly its bytes: torch.save writes a view's whole
    storage, so a block cut from a larger tensor would otherwise carry all of it."""
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def commit(
    path: str | os.PathLike, table_config: dict, entries: list[dict], step: int, *, staging: str
) -> dict:
    """Make the checkpoint at ``path`` exist from the blocks written into ``staging``.

    ``table_config`` must hold ``rows``, ``dim``, ``dtype`` and ``optimizer`` (a dict
    or a memstore optimizer); everything else in it (name, seed, ...) is kept as is.
    The entries must tile the table as a grid and agree on their counters. Every block
    file is hashed again and must match its entry. Invalid arguments raise before
    anything changes; a failure after that (a changed block, another save that
    committed ``path`` first) removes the staging location and raises CheckpointError.
    Returns the manifest.
    """
    path, staging = resolve(path), resolve(staging, "staging")
    prefix = _check_staging(path, staging)
    table = _table_config(table_config)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidArgument("step", "an int >= 0", step)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InvalidArgument("entries", "a list of write_block entries", type(entries).__name__)
    entries = [
        dict(e, spec=_spec_dict(e.get("spec")), file=prefix + str(e.get("file"))) for e in entries
    ]
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "step": step,
        "created_unix": time.time(),
        "table": table,
        "blocks": entries,
    }
    _check_entries(path, manifest)  # fills grid, last_step and updates
    try:
        _verify_blocks(path, staging, manifest, prefix)
        manifest["manifest_sha256"] = _manifest_sha256(manifest)
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        if prefix:
            _commit_object_store(path, data)
        else:
            _commit_local(path, staging, data)
    except BaseException:
        _remove_tree_quietly(staging)
        raise
    log.info("committed checkpoint %s (step %d, %d blocks)", path, step, len(entries))
    return manifest


def _verify_blocks(path: str, staging: str, manifest: dict, prefix: str) -> None:
    for e in manifest["blocks"]:
        file = _join(staging, e["file"][len(prefix) :])
        try:
            sha, size = _sha256_file(file)
        except OSError as err:
            raise CheckpointError(
                path, f"block file {e['file']} is missing or unreadable: {err}"
            ) from err
        if (sha, size) != (e["sha256"], e["bytes"]):
            raise CheckpointError(
                path,
                f"block file {e['file']} is not the one written "
                f"(sha256 {sha}, {size} bytes; entry {e['sha256']}, "
                f"{e['bytes']} bytes)",
            )


def _commit_local(path: str, staging: str, data: bytes) -> None:
    _fsync_dir(staging)  # the block renames, durable before the manifest names them
    _write_file(os.path.join(staging, MANIFEST), data)
    _fsync_dir(staging)
    try:
        # Atomic: readers see no directory or the whole checkpoint. A directory already
        # there (another save won the race) makes the rename fail, never merge.
        os.rename(staging, path)
    except OSError as e:
        raise CheckpointError(
            path, f"already exists (another save committed it first): {e.strerror}"
        ) from e
    _fsync_dir(os.path.dirname(path))


def _commit_object_store(path: str, data: bytes) -> None:
    # No atomic rename: the manifest, written last in one PUT, is the commit point.
    if _file_size(_join(path, MANIFEST)) is not None:
        raise CheckpointError(path, "already committed by another save")
    _write_file(_join(path, MANIFEST), data)


def _manifest_sha256(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _table_config(table_config: dict) -> dict:
    if not isinstance(table_config, dict):
        raise InvalidArgument("table_config", "a dict", type(table_config).__name__)
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
    _check_table(table, lambda reason: InvalidArgument("table_config", reason, table))
    return table


def _check_table(table: dict, fail) -> None:
    for key in ("rows", "dim"):
        v = table.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _MAX_ROWS_OR_DIM:
            raise fail(f"{key}: an int in [1, {_MAX_ROWS_OR_DIM}]")
    if table.get("dtype") not in DTYPES:
        raise fail(f"dtype: one of {sorted(DTYPES)}")


def _check_entries(path: str, manifest: dict) -> None:
    """Check every entry's form and that the blocks tile rows × dim as a grid; set grid,
    last_step and updates. Shared by commit and read_manifest, before anything is
    opened or allocated, so that load_block can rely on every target cell being covered
    by exactly one stored block of a bounded size."""
    table = manifest["table"]
    rows, dim = table["rows"], table["dim"]
    entries = manifest["blocks"]
    if not isinstance(entries, list) or not 1 <= len(entries) <= _MAX_BLOCKS:
        raise CheckpointError(path, f"blocks: a list of 1 to {_MAX_BLOCKS} entries")
    specs = [_check_entry(path, e, table) for e in entries]
    if any((s.rows, s.dim) != (rows, dim) for s in specs):
        raise CheckpointError(path, f"a block's table shape differs from {rows} x {dim}")
    rb = sorted({b for s in specs for b in (s.row_start, s.row_stop)})
    cb = sorted({b for s in specs for b in (s.col_start, s.col_stop)})
    cells = {(s.row_start, s.row_stop, s.col_start, s.col_stop) for s in specs}
    if (
        rb[0] != 0
        or rb[-1] != rows
        or cb[0] != 0
        or cb[-1] != dim
        or len(cells) != len(specs)
        or len(specs) != (len(rb) - 1) * (len(cb) - 1)
        or any(
            (r0, r1) not in zip(rb, rb[1:]) or (c0, c1) not in zip(cb, cb[1:])
            for r0, r1, c0, c1 in cells
        )
    ):
        raise CheckpointError(
            path,
            f"blocks do not tile {rows} x {dim} as a grid "
            f"(row bounds {rb[:8]}, col bounds {cb[:8]}, "
            f"{len(specs)} blocks)",
        )
    files = [e["file"] for e in entries]
    if len(set(files)) != len(files) or len({f.rpartition("/")[0] for f in files}) != 1:
        raise CheckpointError(
            path, "two blocks name the same file, or blocks sit in different data directories"
        )
    counters = {(e["last_step"], e["updates"]) for e in entries}
    if len(counters) != 1:
        # Blocks saved at different steps would mix two states of the table.
        raise CheckpointError(path, f"blocks disagree on (last_step, updates): {sorted(counters)}")
    ((last_step, updates),) = counters
    manifest.update(grid={"row_bounds": rb, "col_bounds": cb}, last_step=last_step, updates=updates)


def _check_entry(path: str, entry: dict, table: dict) -> BlockSpec:
    """One manifest entry's fields, by type, pattern and bound."""

    def bad(reason):
        return CheckpointError(path, f"block entry {str(entry)[:200]}: {reason}")

    if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
        raise bad(f"expected exactly the fields {sorted(_ENTRY_FIELDS)}")
    block, file = entry["block"], entry["file"]
    if not isinstance(block, str) or not _BLOCK_ID.match(block):
        raise bad("block: 1-64 characters of [A-Za-z0-9_-]")
    match = _FILE.match(file) if isinstance(file, str) else None
    if match is None or match.group(2) != block:
        raise bad("file: block-<block>.pt, optionally in one data-<32 hex>/ directory")
    if not isinstance(entry["sha256"], str) or not _SHA256.match(entry["sha256"]):
        raise bad("sha256: 64 lowercase hex digits")
    try:
        spec = BlockSpec(**{k: _int(entry["spec"][k]) for k in _SPEC_FIELDS})
        if set(entry["spec"]) != set(_SPEC_FIELDS):
            raise ValueError(f"fields other than {_SPEC_FIELDS}")
        for key in ("bytes", "last_step", "updates"):
            if _int(entry[key]) < 0:
                raise ValueError(f"{key} < 0")
    except (KeyError, TypeError, ValueError) as e:  # InvalidArgument is a ValueError
        raise bad(f"spec or counters malformed: {e}") from e
    kind = OptimizerKind(table["optimizer"]["kind"])
    raw = spec.shape[0] * spec.shape[1] * DTYPES[table["dtype"]].itemsize
    limit = raw + kind.state_bytes(*spec.shape) + _BLOCK_FILE_SLACK
    if entry["bytes"] > limit:
        raise bad(f"bytes: at most {limit} for a {spec.shape} block")
    return spec


# ---- finding and reading ---------------------------------------------------------
def checkpoint_dir(root: str | os.PathLike, step: int) -> str:
    """``root/step-000000123``: zero-padded so that names sort by step."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidArgument("step", "an int >= 0", step)
    return _join(resolve(root, "root"), f"step-{step:09d}")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a committed checkpoint; CheckpointError when there is none.

    Raised for: no manifest (never committed, or not a checkpoint), unreadable or
    corrupt JSON, a checksum that does not match, another format or an unknown version,
    malformed entries, blocks that do not tile the table.
    """
    path = resolve(path)
    try:
        data = _read_bytes(_join(path, MANIFEST), _MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise CheckpointError(path, f"no {MANIFEST}: not a committed checkpoint") from None
    except OSError as e:
        raise CheckpointError(path, f"{MANIFEST} is unreadable: {e}") from e
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"{MANIFEST} is corrupt: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(path, f"{MANIFEST} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            path,
            f"unknown format version {manifest.get('version')!r} "
            f"(this memstore reads version {FORMAT_VERSION})",
        )
    if manifest.get("manifest_sha256") != _manifest_sha256(manifest):
        raise CheckpointError(
            path, f"{MANIFEST} is corrupt: its manifest_sha256 does not match its contents"
        )
    try:
        table = manifest["table"]
        _check_table(table, lambda reason: CheckpointError(path, f"table: {reason}"))
        if _norm_opt(table["optimizer"]) != table["optimizer"]:
            raise CheckpointError(path, f"table: an unknown optimizer {table['optimizer']}")
        if _int(manifest["step"]) < 0:
            raise ValueError("step < 0")
        _check_entries(path, manifest)
    except (KeyError, TypeError, ValueError) as e:  # InvalidArgument is a ValueError
        raise CheckpointError(path, f"{MANIFEST} is malformed: {e!r}") from e
    return manifest


def checkpoints(root: str | os.PathLike) -> list[str]:
    """The committed ``root/step-N`` checkpoints, newest step first.

    Directories without a valid manifest, or whose block files are not all there with
    the sizes the manifest gives (a save that died before commit, an object-store
    save cut short), are skipped.
    """
    return list(_committed(root))


def _committed(root: str | os.PathLike):
    root = resolve(root, "root")
    names = _list(root) or []
    steps = sorted(((int(m.group(1)), n) for n in names if (m := _STEP_DIR.match(n))), reverse=True)
    for _, name in steps:
        path = _join(root, name)
        try:
            manifest = read_manifest(path)
            for e in manifest["blocks"]:
                if _file_size(_join(path, *e["file"].split("/"))) != e["bytes"]:
                    raise CheckpointError(
                        path, f"block file {e['file']} is missing or of another size"
                    )
        except CheckpointError as e:
            log.info("skipping %s: %s", path, e.reason)
            continue
        yield path


def latest_checkpoint(root: str | os.PathLike) -> str | None:
    """The committed ``root/step-N`` checkpoint of the highest step, or None."""
    return next(_committed(root), None)


# ---- loading -------------------------------------------------------------------
def load_block(path: str | os.PathLike, spec: BlockSpec, manifest: dict | None = None) -> dict:
    """The state_dict of block ``spec`` (any grid), for ``ShardTable.load_state_dict``.

    Values and every optimizer state tensor are cut from the stored blocks that
    overlap rows [row_start, row_stop) × cols [col_start, col_stop); each stored file's
    sha256 is checked before it is loaded (mismatch: CheckpointError naming the file).

    Row-wise Adagrad keeps one accumulator per (row, column block): it is fed by the
    mean of g² over the block's columns, so column blocks of the same row hold
    different values and no re-gridding of columns is exact. Loading such a table is
    therefore allowed only when the target's columns are exactly one stored column
    block (any row grid is fine); otherwise CheckpointError says so.
    """
    path = resolve(path)
    manifest = read_manifest(path) if manifest is None else manifest
    table = manifest["table"]
    if (spec.rows, spec.dim) != (table["rows"], table["dim"]):
        raise CheckpointError(
            path,
            f"target block is of a {spec.rows} x {spec.dim} table, "
            f"the checkpoint of a {table['rows']} x {table['dim']} table",
        )
    kind = OptimizerKind(table["optimizer"]["kind"])
    _check_rowwise_columns(path, manifest, spec, kind)
    shape = spec.shape
    values = torch.empty(shape, dtype=DTYPES[table["dtype"]])
    state = {
        n: torch.empty(kind.state_shape(*shape), dtype=torch.float32) for n in kind.state_names()
    }
    for entry in manifest["blocks"]:
        src = BlockSpec(**entry["spec"])
        r0, r1 = max(src.row_start, spec.row_start), min(src.row_stop, spec.row_stop)
        c0, c1 = max(src.col_start, spec.col_start), min(src.col_stop, spec.col_stop)
        if r0 >= r1 or c0 >= c1:
            continue
        stored = _read_block(path, entry, manifest)
        # Source and target coordinates of the overlap.
        sr, sc = (
            slice(r0 - src.row_start, r1 - src.row_start),
            slice(c0 - src.col_start, c1 - src.col_start),
        )
        tr, tc = (
            slice(r0 - spec.row_start, r1 - spec.row_start),
            slice(c0 - spec.col_start, c1 - spec.col_start),
        )
        values[tr, tc] = stored["values"][sr, sc]
        for name, out in state.items():
            if out.dim() == 1:  # row-wise: the target's columns are this one column block
                out[tr] = stored["state"][name][sr]
            else:
                out[tr, tc] = stored["state"][name][sr, sc]
    return {
        "spec": dataclasses.asdict(spec),
        "dtype": table["dtype"],
        "optimizer": dict(table["optimizer"]),
        "values": values,
        "state": state,
        "last_step": manifest["last_step"],
        "updates": manifest["updates"],
    }


def restore_block(
    root: str | os.PathLike | None, spec: BlockSpec, restore_from: str | os.PathLike | None = None
) -> tuple[str, dict] | None:
    """``(path, state_dict)`` of the newest checkpoint under ``root`` whose blocks for
    ``spec`` load, else of ``restore_from``; None when there is no checkpoint at all.

    A committed checkpoint whose block turns out damaged (checksum, contents) is passed
    over with a warning for the previous one: a shard restarting after such damage
    comes back at an older step instead of failing every restart.
    """
    candidates = list(_committed(root)) if root else []
    if restore_from:
        candidates.append(resolve(restore_from, "restore_from"))
    for i, path in enumerate(candidates):
        try:
            return path, load_block(path, spec)
        except CheckpointError as e:
            if i == len(candidates) - 1:
                raise
            log.warning(
                "checkpoint %s does not load (%s); falling back to %s",
                path,
                e.reason,
                candidates[i + 1],
            )
    return None


def _check_rowwise_columns(path: str, manifest: dict, spec: BlockSpec, kind) -> None:
    if kind is not OptimizerKind.ROWWISE_ADAGRAD:
        return
    cb = manifest["grid"]["col_bounds"]
    if (spec.col_start, spec.col_stop) not in set(zip(cb, cb[1:])):
        raise CheckpointError(
            path,
            f"rowwise_adagrad keeps one accumulator per (row, column block); target "
            f"columns [{spec.col_start}, {spec.col_stop}) are not one stored column block "
            f"(column bounds {cb}), and changing the column grid would change the optimizer",
        )


def _load_verified(path: str, entry: dict):
    """The stored block's torch.load result, after its size and sha256 matched."""
    file = _join(path, *entry["file"].split("/"))
    _, fs_path, local = _filesystem(file)
    try:
        if local:
            sha, size = _sha256_file(file)
            source = fs_path  # mmap: only the slices copied out become resident
        else:
            data = _read_bytes(file, entry["bytes"])
            sha, size, source = hashlib.sha256(data).hexdigest(), len(data), io.BytesIO(data)
    except OSError as e:
        raise CheckpointError(path, f"block file {entry['file']} is unreadable: {e}") from e
    if (sha, size) != (entry["sha256"], entry["bytes"]):
        raise CheckpointError(
            path,
            f"block file {entry['file']} is corrupt: sha256 {sha} "
            f"!= {entry['sha256']} in the manifest",
        )
    try:
        # weights_only: a checkpoint must never be able to run code.
        return torch.load(source, map_location="cpu", weights_only=True, mmap=local)
    except Exception as e:  # torch raises many types for a file it cannot read
        raise CheckpointError(path, f"block file {entry['file']} does not load: {e}") from e


def _read_block(path: str, entry: dict, manifest: dict) -> dict:
    """Load one stored block after checking its sha256 and its contents' metadata."""
    stored = _load_verified(path, entry)
    if (
        not isinstance(stored, dict)
        or not isinstance(stored.get("state"), dict)
        or not isinstance(stored.get("values"), torch.Tensor)
        or not all(isinstance(t, torch.Tensor) for t in stored["state"].values())
    ):
        raise CheckpointError(path, f"block file {entry['file']} is not a memstore block")
    table, src = manifest["table"], BlockSpec(**entry["spec"])
    kind = OptimizerKind(table["optimizer"]["kind"])
    want_state = kind.state_shape(*src.shape)
    problems = [
        stored.get("format") != _BLOCK_FORMAT and "not a memstore block",
        stored.get("spec") != entry["spec"] and "spec differs from the manifest",
        (stored.get("dtype") != table["dtype"] or stored["values"].dtype != DTYPES[table["dtype"]])
        and f"dtype {stored.get('dtype')} != {table['dtype']}",
        _norm_opt(stored.get("optimizer")) != table["optimizer"] and "optimizer differs",
        tuple(stored["values"].shape) != src.shape and "values shape differs from its spec",
        any(
            tuple(t.shape) != want_state or t.dtype != torch.float32
            for t in stored["state"].values()
        )
        and "state shape or dtype differs",
        set(stored["state"]) != set(kind.state_names())
        and "state tensors differ from the optimizer's",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(path, f"block file {entry['file']}: {'; '.join(problems)}")
    return stored


def _norm_opt(opt) -> dict | None:
    try:
        return json.loads(json.dumps(optimizer_from_dict(opt).to_dict()))
    except (InvalidArgument, TypeError, AttributeError, KeyError, ValueError):
        return None
