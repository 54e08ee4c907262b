"""Crash-safe checkpoints of a sharded value table, on local disks or object stores.

A checkpoint is a directory (a key prefix on an object store)::

    step-000000123/
        block-0-0.pt       one torch.save file per stored block: values, optimizer
        block-0-1.pt       state, counters (written by each shard, in parallel)
        ...
        manifest.json      table config, grid, step, the sha256 of every block file,
                           an HMAC with the table's checkpoint key, and the sha256 of
                           the manifest itself

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
3. :func:`commit` (driver): re-hashes every block file, then writes the signed,
   checksummed manifest. Locally the manifest goes into the staging directory, which is fsynced and
   renamed into place in one atomic step (a concurrent save to the same path loses the
   rename and raises). On an object store the manifest, written last at
   ``step-000000123/manifest.json`` with a create-only PUT, is the commit point: it
   names its own ``data-<hex>`` files, and of two saves racing to one path one commits
   and the other raises.

Checkpoints are authenticated: the manifest carries an HMAC-SHA256 of its contents
keyed by the table's checkpoint key, ``table_key(secret, table name)``, where the
secret is the operator's (:func:`operator_secret`: an argument, the
``MEMSTORE_CHECKPOINT_SECRET`` variable, or a 0600 key file in the operator's home),
never stored in a checkpoint root. A table's shards get only its key (in the table's
config, like the data secret), so a restarted shard verifies without the operator's
secret, and write access to a checkpoint root is not enough to make a checkpoint that
loads. The block files are bound to the manifest by their sha256.

On an object store the manifest is written create-only (S3 ``If-None-Match: *``,
through boto3, since pyarrow.fs has no conditional write): of concurrent saves to one
path exactly one commits, the others raise CheckpointError, as on a local disk. Saving
to another remote filesystem, which offers no such write, is refused.

The manifest is read within bounds: at most 64 MiB, refused before it is read, and at
most 32 levels of nesting, refused before it is parsed; a hostile manifest is a
CheckpointError like any invalid one, and a restart falls back past it.

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
     "hmac": "<HMAC-SHA256, the table's key, of the canonical JSON of the fields above>",
     "manifest_sha256": "<sha256 of the canonical JSON of everything else>"}
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
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
    "SECRET_ENV",
    "KEY_FILE_ENV",
    "resolve",
    "join",
    "operator_secret",
    "table_key",
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
# A manifest nests 4 deep (manifest, blocks, entry, spec); the table config may add a few.
_MAX_MANIFEST_DEPTH = 32
SECRET_ENV = "MEMSTORE_CHECKPOINT_SECRET"
KEY_FILE_ENV = "MEMSTORE_CHECKPOINT_KEY_FILE"
_DEFAULT_KEY_FILE = os.path.join("~", ".config", "memstore", "checkpoint-secret")
_MIN_SECRET_CHARS = 32
_MAX_SECRET_CHARS = 1024
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


def join(path: str, *names: str) -> str:
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


# ---- authentication: the operator's secret and the per-table keys ------------------
def operator_secret(value: str | None = None, field: str = "checkpoint_secret") -> str:
    """The secret checkpoint keys derive from: ``value`` when given, else the
    ``MEMSTORE_CHECKPOINT_SECRET`` environment variable, else the key file
    (``MEMSTORE_CHECKPOINT_KEY_FILE``, default ``~/.config/memstore/checkpoint-secret``),
    created with a random secret, readable by its owner only, when there is none.

    It lives outside every checkpoint root on purpose: write access to a checkpoint
    root must not be enough to make a checkpoint that verifies."""
    if value is None:
        value, field = os.environ.get(SECRET_ENV), SECRET_ENV
    if value is None:
        return _key_file_secret()
    if (
        not isinstance(value, str)
        or not _MIN_SECRET_CHARS <= len(value) <= _MAX_SECRET_CHARS
        or not value.isprintable()
    ):
        raise InvalidArgument(
            field,
            f"a printable string of {_MIN_SECRET_CHARS} to {_MAX_SECRET_CHARS} characters",
            "<hidden>" if isinstance(value, str) else type(value).__name__,
        )
    return value


def _key_file_secret() -> str:
    path = os.path.expanduser(os.environ.get(KEY_FILE_ENV) or _DEFAULT_KEY_FILE)
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # create-only: of two racing processes, one file wins
            log.warning(
                "created the checkpoint key file %s (keep it: it verifies checkpoints)", path
            )
        except FileExistsError:
            pass
    finally:
        _remove_quietly(tmp)
    return _read_key_file(path)


def _read_key_file(path: str) -> str:
    """The secret in ``path``, refused unless it is a regular file of this user that
    nobody else can read or write (another user could otherwise plant or read it)."""
    expected = "a regular file of this user with mode 0600 (at most 1 KiB)"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as e:  # a symbolic link (ELOOP), a directory, no permission
        raise InvalidArgument(KEY_FILE_ENV, expected, f"{path} ({e.strerror})") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.getuid()
            or st.st_mode & 0o077
            or st.st_size > _MAX_SECRET_CHARS
        ):
            raise InvalidArgument(KEY_FILE_ENV, expected, path)
        secret = f.read().decode("ascii", "replace").strip()
    return operator_secret(secret, KEY_FILE_ENV)


def table_key(secret: str, table_name: str) -> str:
    """The key that signs and verifies the checkpoints of table ``table_name``: derived
    from the operator's secret, so that one table's key (which its shards hold) cannot
    sign another table's checkpoints."""
    if not isinstance(table_name, str):
        raise InvalidArgument("table_name", "a string", type(table_name).__name__)
    message = b"memstore-checkpoint-key\0" + table_name.encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _key_for(manifest: dict, key: str | None, secret: str | None) -> str:
    """``key``, else the key of the table the manifest names, from ``secret`` (else the
    operator's secret). A manifest that claims another table fails to verify."""
    if key is not None:
        return key
    name = manifest["table"].get("name", "") if isinstance(manifest.get("table"), dict) else ""
    return table_key(operator_secret(secret), name if isinstance(name, str) else "")


def _manifest_hmac(manifest: dict, key: str) -> str:
    body = {k: v for k, v in manifest.items() if k not in ("manifest_sha256", "hmac")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    message = b"memstore-checkpoint-manifest\0" + canonical.encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


# ---- writing -------------------------------------------------------------------
def begin(path: str | os.PathLike) -> str:
    """A fresh, empty staging location for one save to ``path``; give it to every
    :func:`write_block` of the save and to :func:`commit`. Refused when ``path`` already
    holds a committed checkpoint."""
    path = resolve(path)
    _, local = _staging_kind(path)
    _check_conditional_commit(path)
    if _file_size(join(path, MANIFEST)) is not None:
        raise CheckpointError(path, "already committed; write a new step directory")
    token = uuid.uuid4().hex
    if local:
        parent, name = os.path.split(path)
        staging = os.path.join(parent, f".{name}.staging-{token}")
        os.makedirs(parent, exist_ok=True)
        os.mkdir(staging)
        return staging
    staging = join(path, f"data-{token}")
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
    if _file_size(join(path, MANIFEST)) is not None:
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
    if state_dict.get("row_stats") is not None:
        payload["row_stats"] = _compact_stats(state_dict["row_stats"])
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    final = f"block-{block_id}.pt"
    _, fs_path, local = _filesystem(path)
    if local:
        os.makedirs(fs_path, exist_ok=True)
    _write_file(join(path, final), data)
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


def _compact_stats(stats: dict) -> dict:
    """A block's row statistics (``ShardTable.state_dict()["row_stats"]``) to store."""

    def one(part: dict) -> dict:
        return {"tf": _compact(part["tf"]), "df": _compact(part["df"]), "steps": int(part["steps"])}

    return {
        **one(stats),
        "counting": bool(stats.get("counting", True)),
        "backgrounds": {str(k): one(v) for k, v in stats.get("backgrounds", {}).items()},
    }


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU owning exactly its bytes: torch.save writes a view's whole
    storage, so a block cut from a larger tensor would otherwise carry all of it."""
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def commit(
    path: str | os.PathLike,
    table_config: dict,
    entries: list[dict],
    step: int,
    *,
    staging: str,
    key: str | None = None,
    secret: str | None = None,
) -> dict:
    """Make the checkpoint at ``path`` exist from the blocks written into ``staging``.

    ``table_config`` must hold ``rows``, ``dim``, ``dtype`` and ``optimizer`` (a dict
    or a memstore optimizer); everything else in it (name, seed, ...) is kept as is.
    The entries must tile the table as a grid and agree on their counters. Every block
    file is hashed again and must match its entry. Invalid arguments raise before
    anything changes; a failure after that (a changed block, another save that
    committed ``path`` first) removes the staging location and raises CheckpointError.
    The manifest is signed with ``key`` (the table's checkpoint key), else with the key
    of ``table_config["name"]`` derived from ``secret`` (else :func:`operator_secret`).
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
        manifest["hmac"] = _manifest_hmac(manifest, _key_for(manifest, key, secret))
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
        file = join(staging, e["file"][len(prefix) :])
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
    """No atomic rename: the manifest, written last in one create-only PUT
    (``If-None-Match: *``), is the commit point; of saves racing to one path, the store
    lets exactly one create it. pyarrow.fs has no conditional write, so this one request
    goes through boto3, with the endpoint and credentials of the path's filesystem."""
    from botocore.exceptions import ClientError

    fs, fs_path, _ = _filesystem(join(path, MANIFEST))
    bucket, _, key = fs_path.partition("/")
    try:
        _s3_client(fs).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise CheckpointError(
                path, "already committed (another save committed it first)"
            ) from e
        raise CheckpointError(path, f"the manifest write failed: {e}") from e


def _check_conditional_commit(path: str) -> None:
    """Refuse, before anything is written, a remote store without a create-only write
    (two saves to one path would both succeed and one would be lost)."""
    fs, _, local = _filesystem(path)
    if local:
        return
    if fs.type_name != "s3":
        raise CheckpointError(
            path,
            f"saving to a {fs.type_name} filesystem is not supported: a checkpoint commit "
            "needs a create-only write (local disks and s3:// have one)",
        )


def _s3_client(fs):
    """A boto3 S3 client for the endpoint, region and credentials of pyarrow's ``fs``."""
    import boto3
    import botocore.config

    options = fs.__reduce__()[1][0]  # S3FileSystem's own constructor arguments
    endpoint = options.get("endpoint_override") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{options.get('scheme') or 'https'}://{endpoint}"
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=options.get("region") or None,
        aws_access_key_id=options.get("access_key") or None,
        aws_secret_access_key=options.get("secret_key") or None,
        aws_session_token=options.get("session_token") or None,
        verify=options.get("tls_ca_file_path") or None,
        config=botocore.config.Config(retries={"mode": "standard"}),
    )


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
    if not isinstance(table.get("name", ""), str):
        raise fail("name: a string (the table's checkpoint key derives from it)")


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
    return join(resolve(root, "root"), f"step-{step:09d}")


def read_manifest(
    path: str | os.PathLike, *, key: str | None = None, secret: str | None = None
) -> dict:
    """The manifest of a committed checkpoint whose signature verifies; CheckpointError
    when there is none.

    ``key``: the table's checkpoint key; without it, the key of the table the manifest
    names, derived from ``secret`` (else :func:`operator_secret`). Raised for: no
    manifest (never committed, or not a checkpoint), a manifest over the size or
    nesting limits, unreadable or corrupt JSON, a checksum that does not match, an
    hmac that does not verify (forged, or signed with another secret), another format
    or an unknown version, malformed entries, blocks that do not tile the table.
    """
    path = resolve(path)
    manifest = _parse_manifest(path)
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
    signature = manifest.get("hmac")
    if not isinstance(signature, str) or not hmac.compare_digest(
        signature, _manifest_hmac(manifest, _key_for(manifest, key, secret))
    ):
        raise CheckpointError(
            path,
            f"{MANIFEST} is not authenticated: its hmac does not verify with the table's "
            "checkpoint key (forged, or saved with another checkpoint secret)",
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


def _parse_manifest(path: str):
    """The manifest's JSON, read and parsed within bounds: a file over the size limit is
    refused before it is read, one nested deeper than the limit before it is parsed (the
    parser recurses once per level)."""
    try:
        data = _read_bytes(join(path, MANIFEST), _MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise CheckpointError(path, f"no {MANIFEST}: not a committed checkpoint") from None
    except OSError as e:
        raise CheckpointError(path, f"{MANIFEST} is unreadable: {e}") from e
    depth = _nesting_depth(data)
    if depth > _MAX_MANIFEST_DEPTH:
        raise CheckpointError(
            path, f"{MANIFEST} nests {depth} deep, more than the {_MAX_MANIFEST_DEPTH} allowed"
        )
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(path, f"{MANIFEST} is corrupt: {e}") from e


_JSON_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_JSON_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def _nesting_depth(data: bytes) -> int:
    """The deepest nesting of [ and { in JSON text, brackets inside strings not counted
    (malformed text may give any number: the parser refuses it after). Linear time: the
    escapes go first, so every quote left delimits a string."""
    import numpy as np

    text = _JSON_STRING.sub(b"", _JSON_ESCAPE.sub(b"", data))
    brackets = np.frombuffer(text.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    deepest = level = 0
    for start in range(0, len(brackets), _HASH_CHUNK):  # bounded memory per chunk
        chunk = brackets[start : start + _HASH_CHUNK]
        running = level + np.cumsum(np.where((chunk == 91) | (chunk == 123), 1, -1))
        deepest, level = max(deepest, int(running.max())), int(running[-1])
    return deepest


def checkpoints(
    root: str | os.PathLike, *, key: str | None = None, secret: str | None = None
) -> list[str]:
    """The committed ``root/step-N`` checkpoints, newest step first.

    Directories without a manifest that verifies (see :func:`read_manifest`; ``key``
    and ``secret`` as there), or whose block files are not all there with the sizes the
    manifest gives (a save that died before commit, an object-store save cut short),
    are skipped; all but a missing manifest with a warning.
    """
    return list(_committed(root, key, secret))


def _committed(root: str | os.PathLike, key: str | None = None, secret: str | None = None):
    root = resolve(root, "root")
    names = _list(root) or []
    steps = sorted(((int(m.group(1)), n) for n in names if (m := _STEP_DIR.match(n))), reverse=True)
    for _, name in steps:
        path = join(root, name)
        try:
            manifest = read_manifest(path, key=key, secret=secret)
            for e in manifest["blocks"]:
                if _file_size(join(path, *e["file"].split("/"))) != e["bytes"]:
                    raise CheckpointError(
                        path, f"block file {e['file']} is missing or of another size"
                    )
        except CheckpointError as e:
            # A save that died before its commit is expected; anything else is not.
            quiet = e.reason.startswith(f"no {MANIFEST}")
            (log.info if quiet else log.warning)("skipping %s: %s", path, e.reason)
            continue
        yield path


def latest_checkpoint(
    root: str | os.PathLike, *, key: str | None = None, secret: str | None = None
) -> str | None:
    """The committed ``root/step-N`` checkpoint of the highest step, or None."""
    return next(_committed(root, key, secret), None)


# ---- loading -------------------------------------------------------------------
def load_block(
    path: str | os.PathLike,
    spec: BlockSpec,
    manifest: dict | None = None,
    *,
    key: str | None = None,
    secret: str | None = None,
) -> dict:
    """The state_dict of block ``spec`` (any grid), for ``ShardTable.load_state_dict``.

    Values and every optimizer state tensor are cut from the stored blocks that
    overlap rows [row_start, row_stop) × cols [col_start, col_stop); each stored file's
    sha256 is checked before it is loaded (mismatch: CheckpointError naming the file).

    Row-wise Adagrad keeps one accumulator per (row, column block): it is fed by the
    mean of g² over the block's columns, so column blocks of the same row hold
    different values and no re-gridding of columns is exact. Loading such a table is
    therefore allowed only when the target's columns are exactly one stored column
    block (any row grid is fine); otherwise CheckpointError says so. ``manifest``: one
    :func:`read_manifest` returned for ``path``, else it is read, with ``key`` and
    ``secret`` as there.
    """
    path = resolve(path)
    if manifest is None:
        manifest = read_manifest(path, key=key, secret=secret)
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
    row_stats = _RowStatsCut(spec.shape[0])
    for entry in manifest["blocks"]:
        src = BlockSpec(**entry["spec"])
        r0, r1 = max(src.row_start, spec.row_start), min(src.row_stop, spec.row_stop)
        c0, c1 = max(src.col_start, spec.col_start), min(src.col_stop, spec.col_stop)
        if r0 >= r1 or c0 >= c1:
            continue
        stored = _read_block(path, entry, manifest)
        row_stats.add(stored.get("row_stats"), r0 - src.row_start, r0 - spec.row_start, r1 - r0)
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
        "row_stats": row_stats.result(),
    }


class _RowStatsCut:
    """The row statistics of a target block, cut from the stored blocks' rows (the
    column blocks of a row block count the same rows, so any one of them will do).
    Rows of stored blocks without statistics (older checkpoints) count zero."""

    def __init__(self, rows: int):
        self.rows = rows
        self.parts: dict[str | None, dict] = {}
        self.counting = True

    def _part(self, name: str | None, steps: int) -> dict:
        part = self.parts.setdefault(
            name,
            {
                "tf": torch.zeros(self.rows, dtype=torch.int32),
                "df": torch.zeros(self.rows, dtype=torch.int64),
                "steps": 0,
            },
        )
        part["steps"] = max(part["steps"], steps)
        return part

    def add(self, stored: dict | None, src_row: int, dst_row: int, n: int) -> None:
        if stored is None:
            return
        self.counting = bool(stored.get("counting", True))
        named = [(None, stored), *stored.get("backgrounds", {}).items()]
        for name, part in named:
            out = self._part(name, int(part["steps"]))
            for key in ("tf", "df"):
                out[key][dst_row : dst_row + n] = part[key][src_row : src_row + n]

    def result(self) -> dict | None:
        if not self.parts:
            return None
        live = self.parts.get(None) or self._part(None, 0)
        return {
            **live,
            "counting": self.counting,
            "backgrounds": {k: self.parts[k] for k in sorted(k for k in self.parts if k)},
        }


def restore_block(
    root: str | os.PathLike | None,
    spec: BlockSpec,
    restore_from: str | os.PathLike | None = None,
    *,
    key: str | None = None,
    restore_key: str | None = None,
) -> tuple[str, dict] | None:
    """``(path, state_dict)`` of the newest checkpoint under ``root`` whose blocks for
    ``spec`` load, else of ``restore_from``; None when there is no checkpoint at all.
    Checkpoints under ``root`` verify with ``key``, ``restore_from`` with
    ``restore_key`` (None: derived from the operator's secret, see :func:`read_manifest`).

    A checkpoint whose manifest does not verify (forged, hostile, corrupt) is skipped
    with a warning, and one whose block turns out damaged (checksum, contents) is
    passed over with a warning for the previous one: a shard restarting after such
    damage comes back at an older step instead of failing every restart.
    """
    candidates = [(p, key) for p in _committed(root, key)] if root else []
    if restore_from:
        candidates.append((resolve(restore_from, "restore_from"), restore_key))
    for i, (path, path_key) in enumerate(candidates):
        try:
            return path, load_block(path, spec, key=path_key)
        except CheckpointError as e:
            if i == len(candidates) - 1:
                raise
            log.warning(
                "checkpoint %s does not load (%s); falling back to %s",
                path,
                e.reason,
                candidates[i + 1][0],
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
    file = join(path, *entry["file"].split("/"))
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
        not _row_stats_ok(stored.get("row_stats"), src.shape[0]) and "row statistics malformed",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(path, f"block file {entry['file']}: {'; '.join(problems)}")
    return stored


def _row_stats_ok(stats, rows: int) -> bool:
    """Absent (an older checkpoint), or tf/df int tensors of one entry per row and a
    step count, for the live counts and each background."""

    def ok(part) -> bool:
        return (
            isinstance(part, dict)
            and all(
                isinstance(part.get(k), torch.Tensor)
                and part[k].dtype in (torch.int32, torch.int64)
                and tuple(part[k].shape) == (rows,)
                for k in ("tf", "df")
            )
            and type(part.get("steps")) is int
            and part["steps"] >= 0
        )

    if stats is None:
        return True
    backgrounds = stats.get("backgrounds", {}) if isinstance(stats, dict) else None
    return (
        ok(stats)
        and isinstance(backgrounds, dict)
        and all(isinstance(k, str) and ok(v) for k, v in backgrounds.items())
    )


def _norm_opt(opt) -> dict | None:
    try:
        return json.loads(json.dumps(optimizer_from_dict(opt).to_dict()))
    except (InvalidArgument, TypeError, AttributeError, KeyError, ValueError):
        return None
