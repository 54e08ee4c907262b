"""The memstore.v1.MemoryStore servicer: requests decoded and checked, then answered
through the public Table API of the tables in the ``memstore`` namespace.

The server is asyncio (grpc.aio); each method runs on a thread of the server's pool,
under a deadline: the caller's, at most the server's call timeout. Every request's
work is bounded once its tensors are decoded (a copy no larger than the message
limit) and before anything else is allocated or sent to a shard: at most the table's
``max_batch`` rows and ``max_pairs`` (row, weight) pairs per call, and a reply within
the message limit (:class:`CallLimits`).

Tables are looked up by name on each call, so tables created after the server
started are served. Each server thread keeps its own handles (a handle owns
data-channel sockets), cached by name and checked against the table's catalog actor
at most once a second, so a table dropped and created again under the same name is
reconnected.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import threading
import time

import grpc
import numpy as np
import torch

from .. import api
from ..errors import (
    InvalidArgument,
    PreconditionFailed,
    ShardUnavailable,
    StepOutOfOrder,
    StoreRolledBack,
    TableNotFound,
)
from ..table import NAMESPACE, Table, catalog_name
from ..v1 import memstore_pb2 as pb
from ..v1 import memstore_pb2_grpc as pb_grpc
from .data_channel import DEFAULT_MAX_BATCH, DEFAULT_MAX_PAIRS
from .grpc_codec import FLOATS, INTS, decode, encode
from .grpc_errors import status_for
from .validation import check_lr, check_step

log = logging.getLogger(__name__)

REVALIDATE_S = 1.0
READ_ATTEMPTS = 3
# Room left in a reply for everything but the tensors' data (StepSeen, shapes).
REPLY_OVERHEAD = 64 << 10
# Bytes of one row's tf or df in a Stats reply (int64).
ROW_STAT_BYTES = 8
# Stats keys that are not counters; config fields are never copied (they may hold secrets).
_SHARD_FIELDS = ("block", "rows", "cols", "bytes", "last_step", "pending_steps")


@dataclasses.dataclass
class _Entry:
    table: Table
    catalog_id: str
    checked: float


class TableCache:
    """Per-thread table handles, keyed by name and the catalog actor's id."""

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self._local = threading.local()

    def get(self, name: str) -> Table:
        if not isinstance(name, str) or not name or "/" in name or len(name) > 256:
            raise InvalidArgument("table", "a table name (non-empty, no '/')", name)
        cache = self._local.__dict__.setdefault("tables", {})
        entry = cache.get(name)
        now = time.monotonic()
        if entry is not None and now - entry.checked < REVALIDATE_S:
            return entry.table
        catalog_id = _catalog_id(name)
        if entry is None or entry.catalog_id != catalog_id:
            entry = _Entry(api.connect(name, timeout_s=self.timeout_s), catalog_id, now)
            cache[name] = entry
        entry.checked = now
        return entry.table

    def forget(self, name: str) -> None:
        self._local.__dict__.setdefault("tables", {}).pop(name, None)


def _ray():
    import ray

    return ray


def _catalog_id(name: str) -> str:
    ray = _ray()
    try:
        return ray.get_actor(catalog_name(name), namespace=NAMESPACE)._actor_id.hex()
    except ValueError:
        raise TableNotFound(name, table_names()) from None


def table_names() -> list[str]:
    ray = _ray()
    return sorted(
        a["name"][: -len("/catalog")]
        for a in ray.util.list_named_actors(True)
        if a.get("namespace") == NAMESPACE and a["name"].endswith("/catalog")
    )


def shard_steps(table: Table) -> dict[str, int]:
    """Each shard's last applied step, by block "r-c" (the shards' info, no lock taken)."""
    ray = _ray()
    blocks = list(table.shards)
    try:
        infos = ray.get([table.shards[b].info.remote() for b in blocks], timeout=table.timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
        raise ShardUnavailable(table.name, table.timeout_s, str(e).splitlines()[0]) from e
    return {f"{r}-{c}": int(i["last_step"]) for (r, c), i in zip(blocks, infos)}


def _seen(out, steps: dict[str, int], consistent: bool):
    out.step = min(steps.values())
    out.shard_steps.update(steps)
    out.consistent = consistent
    return out


def _read(table: Table, read, seen_out):
    """``read()``, with the steps the shards read at (returned with their replies);
    repeated while the shards disagree (a step landing during the read)."""
    for _ in range(READ_ATTEMPTS):
        try:
            result = read()
        except StoreRolledBack as e:
            # The table went back to a checkpoint since this thread's handle last read;
            # the handle has reconciled with the restarted shards, and a read changes
            # nothing, so a reader is answered from the restored rows.
            log.info("table %s rolled back to step %s; reading again", table.name, e.step)
            result = read()
        steps = table.last_read_steps
        if len(set(steps.values())) == 1:
            break
    _seen(seen_out, steps, len(set(steps.values())) == 1)
    return result


def _tensor(field, message, request, kinds, ndim) -> torch.Tensor:
    a = decode(field, getattr(request, field), request.HasField(field), kinds, ndim)
    return torch.from_numpy(np.array(a))  # a writable copy: the message's bytes are read-only


def _shard_message(stats: dict) -> pb.ShardStats:
    out = pb.ShardStats(**{k: stats[k] for k in _SHARD_FIELDS if k in stats})
    for key, value in stats.items():
        if (
            key not in _SHARD_FIELDS
            and key != "pid"
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ):
            out.counters[key] = float(value)
    return out


def _optimizer_params(config: dict) -> tuple[str, dict[str, float]]:
    opt = dict(config.get("optimizer") or {})
    kind = str(opt.pop("kind", ""))
    params = {}
    for key, value in opt.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for i, v in enumerate(values):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                params[key if len(values) == 1 else f"{key}{i + 1}"] = float(v)
    return kind, params


@dataclasses.dataclass(frozen=True)
class CallLimits:
    """The most work one call may ask of a table: rows (``max_batch``), (row, weight)
    pairs (``max_pairs``, the table's data-channel caps) and reply bytes."""

    max_batch: int
    max_pairs: int
    reply_bytes: int

    @classmethod
    def of(cls, table: Table, max_message_bytes: int) -> CallLimits:
        return cls(
            int(table.config.get("max_batch") or DEFAULT_MAX_BATCH),
            int(table.config.get("max_pairs") or DEFAULT_MAX_PAIRS),
            max_message_bytes - REPLY_OVERHEAD,
        )

    def check(self, field: str, shape, pairs_per_row: int, reply_bytes_per_row: int) -> None:
        """Refuse ``shape[0]`` rows (of a decoded request: its copy is bounded by the
        message limit) that ask for more than a call may produce."""
        n = int(shape[0])
        for most, what in (
            (self.max_batch, "the table's max_batch"),
            (self.max_pairs // max(pairs_per_row, 1), f"the table's max_pairs of {self.max_pairs}"),
            (self.reply_bytes // max(reply_bytes_per_row, 1), f"{self.reply_bytes} reply bytes"),
        ):
            if n > most:
                raise InvalidArgument(field, f"at most {most} rows per call ({what})", n)


def _query_costs(table: Table, shape, k: int, with_values: bool) -> tuple[int, int]:
    """(pairs, reply bytes) per query vector of shape (B, H, Dk): its H·k looked-up rows
    or the H·min(k, n)² candidates of the top-k (n keys per half), whichever is more."""
    heads = int(shape[1])
    k = max(int(k), 1)
    n = math.isqrt(max(table.rows - 1, 0)) + 1
    pairs = heads * max(k, min(k, n) ** 2)
    return pairs, heads * k * 12 + (table.dim * 4 if with_values else 0)


class MemoryStoreServicer(pb_grpc.MemoryStoreServicer):
    """The methods, synchronous (each runs on a server thread); ``context`` is unused."""

    def __init__(
        self,
        timeout_s: float | None = None,
        save_root: str | None = None,
        max_message_bytes: int = 64 << 20,
    ):
        self.tables = TableCache(timeout_s)
        self.save_root = os.path.realpath(save_root) if save_root else None
        self.max_message_bytes = max_message_bytes

    def _limits(self, table: Table) -> CallLimits:
        return CallLimits.of(table, self.max_message_bytes)

    # ---- reads -------------------------------------------------------------------
    def ListTables(self, request, context):
        reply = pb.ListTablesReply()
        for name in table_names():
            try:
                table = self.tables.get(name)
                steps = shard_steps(table)
            except TableNotFound:
                continue  # dropped meanwhile
            summary = reply.tables.add(name=name, rows=table.rows, dim=table.dim)
            _seen(summary.seen, steps, True)
        return reply

    def DescribeTable(self, request, context):
        table = self.tables.get(request.table)
        stats = table.stats()
        cfg = table.config
        kind, params = _optimizer_params(cfg)
        reply = pb.DescribeTableReply(
            name=table.name,
            rows=table.rows,
            dim=table.dim,
            grid=list(table.grid.shape),
            dtype=str(cfg.get("dtype", "")),
            optimizer=kind,
            optimizer_params=params,
            mode=str(cfg.get("mode", "")),
            shards=[_shard_message(s) for s in stats["shards"]],
        )
        limits = self._limits(table)
        reply.max_batch, reply.max_pairs = limits.max_batch, limits.max_pairs
        shape = self._key_shape(table)
        if shape is not None:
            reply.keys_published = True
            reply.key_heads, reply.key_dim = shape[0], 2 * shape[3]
        return _seen_from_stats(reply, stats)

    def _key_shape(self, table: Table) -> tuple | None:
        """Shape (H, 2, n, Dk/2) of the published keys (the catalog's, else a shard's
        copy, as Table.query finds them), or None."""
        ray = _ray()
        catalog = ray.get_actor(catalog_name(table.name), namespace=NAMESPACE)
        keys = ray.get(catalog.get_keys.remote(), timeout=table.timeout_s)
        if keys is None:
            copies = ray.get(
                [a.get_keys.remote() for a in table.shards.values()], timeout=table.timeout_s
            )
            keys = next((k for k in copies if k is not None), None)
        return None if keys is None else tuple(keys.shape)

    def Stats(self, request, context):
        table = self.tables.get(request.table)
        page = self._row_page(table, request)
        stats = table.stats()
        reply = pb.StatsReply(
            bytes=int(stats["bytes"]), shards=[_shard_message(s) for s in stats["shards"]]
        )
        if page is not None:
            start, count, max_rows = page
            background = request.background or None
            rows = table.row_stats(background, start=start, stop=start + count)
            out = reply.row_stats
            out.row_start, out.steps = start, rows["steps"]
            out.table_rows, out.max_rows = table.rows, max_rows
            encode(rows["tf"].astype(np.int64), out.tf)
            encode(rows["df"].astype(np.int64), out.df)
        return _seen_from_stats(reply, stats)

    def _row_page(self, table: Table, request) -> tuple[int, int, int] | None:
        """(row_start, row_count, max_rows) of a Stats request asking for row statistics,
        checked before anything is read: a page fits the reply (16 bytes a row)."""
        if not request.rows:
            for field, given in (
                ("background", bool(request.background)),
                ("row_start", request.row_start != 0),
                ("row_count", request.HasField("row_count")),
            ):
                if given:
                    raise InvalidArgument("rows", f"true when {field} is given", False)
            return None
        max_rows = max(1, self._limits(table).reply_bytes // (2 * ROW_STAT_BYTES))
        start = request.row_start
        if not 0 <= start < table.rows:
            raise InvalidArgument("row_start", f"an int in [0, {table.rows})", start)
        count = request.row_count if request.HasField("row_count") else table.rows - start
        if not 1 <= count <= table.rows - start:
            raise InvalidArgument("row_count", f"an int in [1, {table.rows - start}]", count)
        if count > max_rows:
            raise InvalidArgument(
                "row_count",
                f"at most {max_rows} rows per call (the reply limit); page with row_start",
                count,
            )
        return start, count, max_rows

    def Lookup(self, request, context):
        table = self.tables.get(request.table)
        idx = _tensor("idx", request.idx, request, INTS, 2)
        w = _tensor("w", request.w, request, FLOATS, 2)
        self._limits(table).check("idx", idx.shape, idx.shape[1], table.dim * 4)
        reply = pb.LookupReply()
        y = _read(table, lambda: table.lookup(idx, w), reply.seen)
        encode(y.numpy(), reply.y)
        return reply

    def Gather(self, request, context):
        table = self.tables.get(request.table)
        rows = _tensor("rows", request.rows, request, INTS, 1)
        self._limits(table).check("rows", rows.shape, 1, table.dim * 4)
        reply = pb.GatherReply()
        values = _read(table, lambda: table.gather(rows), reply.seen)
        encode(values.numpy(), reply.values)
        return reply

    def Query(self, request, context):
        table = self.tables.get(request.table)
        q = _tensor("q", request.q, request, FLOATS, 3)
        pairs, reply_bytes = _query_costs(table, q.shape, request.k, request.return_values)
        self._limits(table).check("q", q.shape, pairs, reply_bytes)
        reply = pb.QueryReply()
        try:
            indices, scores, values = _read(table, lambda: table.query(q, request.k), reply.seen)
        except InvalidArgument as e:
            if e.field == "keys" and e.got is None:
                raise PreconditionFailed(
                    "keys",
                    f"table {table.name} has no published keys; publish them with PublishKeys",
                ) from e
            raise
        encode(indices.numpy().astype(np.int64), reply.indices)
        encode(scores.float().numpy(), reply.scores)
        if request.return_values:
            encode(values.numpy(), reply.values)
        return reply

    # ---- writes ------------------------------------------------------------------
    def _at_current_step(self, table: Table, step: int | None = None) -> dict[str, int]:
        """The shards' steps; the handle learns the newest, and a sync-mode ``step``
        at or before it is refused before anything is sent."""
        steps = shard_steps(table)
        newest = max(steps.values())
        if step is not None and step <= newest and table.config.get("mode") != "async":
            raise StepOutOfOrder(step, newest)
        table.last_step = newest
        return steps

    def ApplyGradients(self, request, context):
        table = self.tables.get(request.table)
        idx = _tensor("idx", request.idx, request, INTS, 2)
        w = _tensor("w", request.w, request, FLOATS, 2)
        dy = _tensor("dy", request.dy, request, FLOATS, 2)
        self._limits(table).check("idx", idx.shape, idx.shape[1], 0)
        step = check_step("step", request.step)
        push_id = check_step("push_id", request.push_id)
        lr = check_lr("lr", request.lr) if request.HasField("lr") else None
        budget = _row_budget(request)
        if request.HasField("doc_ids"):
            budget["doc_ids"] = _tensor("doc_ids", request.doc_ids, request, INTS, 1)
        steps = self._at_current_step(table, step)
        dw = table.backward(idx, w, dy, step=step, push_id=push_id, lr=lr, **budget)
        reply = pb.ApplyGradientsReply()
        _seen(reply.seen, steps, True)
        encode(dw.numpy(), reply.dw)
        return reply

    def Step(self, request, context):
        table = self.tables.get(request.table)
        step = check_step("step", request.step)
        pushes_per_step = (
            check_step("pushes_per_step", request.pushes_per_step)
            if request.HasField("pushes_per_step")
            else None
        )
        lr = check_lr("lr", request.lr) if request.HasField("lr") else None
        budget = _row_budget(request)
        self._at_current_step(table, step)
        updated = table.step(step, pushes_per_step=pushes_per_step, lr=lr, **budget)
        reply = pb.StepReply(rows_updated=int(updated))
        _seen(reply.seen, shard_steps(table), True)
        return reply

    def PublishKeys(self, request, context):
        table = self.tables.get(request.table)
        keys = _tensor("keys", request.keys, request, FLOATS, 4)
        table.publish_keys(keys)
        reply = pb.PublishKeysReply()
        _seen(reply.seen, shard_steps(table), True)
        return reply

    def Save(self, request, context):
        table = self.tables.get(request.table)
        path = self._save_path(request.path)
        written = table.save(path)
        reply = pb.SaveReply(path=os.path.relpath(written, self.save_root))
        _seen(reply.seen, shard_steps(table), True)
        return reply

    def _save_path(self, path: str) -> str:
        if self.save_root is None:
            raise PreconditionFailed(
                "path", "this server has no save directory (serve --save-root DIR)"
            )
        if not path or os.path.isabs(path) or "\x00" in path or "://" in path:
            raise InvalidArgument("path", "a relative path under the server's save directory", path)
        full = os.path.realpath(os.path.join(self.save_root, path))
        if full == self.save_root or os.path.commonpath([full, self.save_root]) != self.save_root:
            raise InvalidArgument("path", "a path inside the server's save directory", path)
        return full


def _row_budget(request) -> dict:
    """The sparse-step arguments of a Step or ApplyGradients request (the table checks
    them against its rows and snapshots before anything changes)."""
    budget = {}
    if request.HasField("rows"):
        budget["rows"] = _tensor("rows", request.rows, request, INTS, 1)
    if request.HasField("top_t"):
        if request.top_t < 1:
            raise InvalidArgument("top_t", "an int >= 1", request.top_t)
        budget["top_t"] = int(request.top_t)
    if request.background:
        budget["background"] = request.background
    return budget


def _seen_from_stats(reply, stats: dict):
    _seen(reply.seen, {s["block"]: int(s["last_step"]) for s in stats["shards"]}, True)
    return reply


def on_threads(servicer: MemoryStoreServicer, executor, call_timeout_s: float):
    """An asyncio servicer whose every method runs ``servicer``'s on ``executor``, under
    the caller's deadline cut to ``call_timeout_s``; any error becomes its one status
    (status_for), and a table whose call failed is reconnected on the next call."""
    out = pb_grpc.MemoryStoreServicer()
    for name in pb.DESCRIPTOR.services_by_name["MemoryStore"].methods_by_name:
        setattr(out, name, _on_thread(servicer, name, executor, call_timeout_s))
    return out


def _forgetting(servicer: MemoryStoreServicer, name: str):
    method = getattr(servicer, name)

    def call(request):
        try:
            return method(request, None)
        except Exception as e:
            code, _ = status_for(e)
            if code in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.ABORTED,
                grpc.StatusCode.INTERNAL,
            ):  # on this thread: the handles are the thread's own
                servicer.tables.forget(getattr(request, "table", ""))
            raise

    return call


def _on_thread(servicer: MemoryStoreServicer, name: str, executor, call_timeout_s: float):
    method = _forgetting(servicer, name)

    async def call(request, context):
        remaining = context.time_remaining()
        limit = call_timeout_s if remaining is None else min(remaining, call_timeout_s)
        running = asyncio.get_running_loop().run_in_executor(executor, method, request)
        try:
            return await asyncio.wait_for(running, max(limit, 0.0))
        except asyncio.TimeoutError:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, f"{name}: no answer in {limit:.3g} s"
        except Exception as e:  # noqa: BLE001 - every error becomes a status
            code, message = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s failed", name, exc_info=e)
        await context.abort(code, message)

    return call
