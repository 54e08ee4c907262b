"""The distributed table: a grid of shard actors on Ray, and the handle that routes to them.

``create_table`` places one detached, named actor per block (namespace ``memstore``)
with a SPREAD placement group, plus a small catalog actor that holds the table's
config and published keys, so that ``connect(name)`` works from any driver of the
cluster. The handle validates every call before anything leaves the process (values
in float32, the wire dtype), sends each shard one call per operation with all shards
in flight, and assembles results. Every call that reads or changes a block carries the
incarnation the handle knows for that shard; a restarted shard refuses it unchanged
(fencing) and the handle rolls every block back to the checkpoint that shard restored.
Writes also carry the table's rollback epoch, so that after any handle rolled the table
back, every block refuses the writes of a handle that has not learned of it yet.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import torch

from memstore import kernels

from . import checkpoint
from ._internal.data_channel import DEFAULT_MAX_PAIRS, ChannelSettings, DataClient
from ._internal.validation import (
    check_index,
    check_lr,
    check_push_magnitude,
    check_step,
    wire_float,
)
from ._internal.wire import to_tensor
from .errors import (
    InvalidArgument,
    MemoryBudgetExceeded,
    MemstoreError,
    ShardRestarted,
    ShardUnavailable,
    StepOutOfOrder,
    StoreRolledBack,
    TableExists,
    TableNotFound,
)
from .grid import ShardGrid, pack_grouping

log = logging.getLogger(__name__)

NAMESPACE = "memstore"
DEFAULT_TIMEOUT_S = 120.0
# A row block's routed arrays at least this large are put in the object store once for
# all its column blocks rather than sent with each call.
PUT_BYTES = 1 << 20
# The data calls that change a block: fenced by the rollback epoch as well.
WRITES = frozenset({"backward", "step"})

__all__ = ["Table", "NAMESPACE", "drop_table"]


def _ray():
    import ray

    return ray


def _holding_lock(method):
    """``method`` under the handle's lock: the I/O thread of the async calls and the
    caller's thread share the handle's incarnations, epoch, steps and data channel."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class TableCatalog:
    """Config and published keys of one table (a detached actor)."""

    def __init__(self, config: dict):
        self.config = config
        self.keys: np.ndarray | None = None
        self.keys_version = ""

    def get_config(self) -> dict:
        return self.config

    def publish_keys(self, keys: np.ndarray, version: str = "") -> None:
        self.keys, self.keys_version = keys, version

    def get_keys(self) -> np.ndarray | None:
        return self.keys

    def get_published(self) -> tuple[str, np.ndarray | None]:
        return self.keys_version, self.keys


def shard_name(table: str, r: int, c: int) -> str:
    return f"{table}/shard-{r}-{c}"


def catalog_name(table: str) -> str:
    return f"{table}/catalog"


class Table:
    """Handle of a distributed table; cheap to create, one per process or Ray worker.

    ``last_read_steps``: each block's last applied step, by "r-c", as the last lookup,
    gather or query read it (the shards return it with the values they read, so equal
    steps mean the values come from one step of the table).
    """

    def __init__(
        self, config: dict, shards: dict, push_id: int = 0, timeout_s: float | None = None
    ):
        self.config = config
        self.name = config["name"]
        self.grid = ShardGrid.from_dict(config["grid"])
        self.shards = shards  # (r, c) -> actor handle
        self.push_id = push_id
        self._channel: DataClient | None = None
        self.timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        self._incarnations: dict[tuple[int, int], str] = {}
        self._epoch = 0  # the rollback epoch the blocks take writes for
        self._addresses: dict[tuple[int, int], tuple | None] = {}
        # Group pushed slots once here for all column blocks: off, since on the 2-core
        # machine benchmarks/store.py measured it slower than each block grouping its own
        # (serial on the client, and more bytes on the wire); the benchmark compares both.
        self._group_slots = False
        self.last_step = 0
        self.last_read_steps: dict[str, int] = {}
        self._read_keys_versions: set[str] = set()  # published keys the last read saw
        self._keys: tuple[str, torch.Tensor] | None = None  # (version, keys) cached
        self._init_async_state()
        infos = self._call_all("info")
        self._note(infos)
        self.last_step = max(i["last_step"] for i in infos.values())
        for block, info in infos.items():
            if info.get("restarted") and not self._reconciled(info["incarnation"], infos):
                # A restart no handle has rolled the table back for: a new handle has no
                # state of its own to restore, so it reconciles the blocks and goes on.
                self._roll_back(block, notify=False)

    def _note(self, infos: dict) -> None:
        """Remember each shard's incarnation and data-channel address, and the table's
        rollback epoch."""
        for block, info in infos.items():
            self._incarnations[block] = info["incarnation"]
            address = info.get("data_address")
            self._addresses[block] = tuple(address) if address else None
        self._epoch = max(int(info.get("epoch", 0)) for info in infos.values())

    def _write_fence(self, block) -> str:
        """What a write to ``block`` expects: the shard's incarnation and the epoch."""
        return f"{self._incarnations[block]}/{self._epoch}"

    def _init_async_state(self) -> None:
        self._lock = threading.RLock()
        # Issuing an async call takes only this lock, never the one a call in flight holds.
        self._issue_lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None  # the async calls' I/O thread
        self._pushes: dict[int, list[tuple[int, Future]]] = {}  # step -> (epoch, future)
        self._rolled_back: tuple[int, str] | None = None  # (step, shard) last learned

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_channel"] = None  # sockets belong to the process that opened them
        for name in ("_lock", "_issue_lock", "_executor", "_pushes"):  # threads, futures
            del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_async_state()
        self._rolled_back = state.get("_rolled_back")

    @property
    def rows(self) -> int:
        return self.grid.rows

    @property
    def dim(self) -> int:
        return self.grid.dim

    # ---- transport -----------------------------------------------------------
    def _wait(self, refs: dict):
        """ray.get of {block: ref}, translating timeouts and dead actors."""
        ray = _ray()
        out = {}
        deadline = time.monotonic() + self.timeout_s
        for block, ref in refs.items():
            name = shard_name(self.name, *block)
            try:
                out[block] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError as e:
                raise ShardUnavailable(name, self.timeout_s, "timed out") from e
            except ShardRestarted:
                self._roll_back(block)
            except ray.exceptions.RayActorError as e:
                self._recover_or_raise(block, e)
        return out

    def _call_all(self, method: str, *args, fenced: bool = False) -> dict:
        """``method(*args)`` on every shard; ``fenced``: with the incarnation expected of
        each as the last argument."""
        return self._wait(
            {
                b: getattr(a, method).remote(*args, *((self._incarnations[b],) if fenced else ()))
                for b, a in self.shards.items()
            }
        )

    def _checked(self, results: dict) -> dict:
        """Strip incarnations; a changed one means a shard restarted from a checkpoint.
        A read's replies also carry what each block saw (its step, its keys' version)."""
        for block, (incarnation, *_) in results.items():
            if self._incarnations.get(block) != incarnation:
                self._roll_back(block)
        seen = {block: reply[2] for block, reply in results.items() if len(reply) > 2}
        if seen:
            self.last_read_steps = {f"{r}-{c}": int(s["step"]) for (r, c), s in seen.items()}
            self._read_keys_versions = {str(s["keys"]) for s in seen.values()}
        # In block order, not reply order: the row blocks' partial sums are then added in
        # the same order on every call, so a lookup's float result does not depend on
        # which shard answered first.
        return {block: results[block][1] for block in sorted(results)}

    def _recover_or_raise(self, block, error):
        """A call failed because the shard died: wait for its restart, then roll back."""
        ray = _ray()
        name = shard_name(self.name, *block)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                ray.get(
                    self.shards[block].info.remote(), timeout=max(0.0, deadline - time.monotonic())
                )
                break
            except ray.exceptions.ActorUnavailableError:
                # Restarting: Ray answers at once, so poll until the deadline.
                if time.monotonic() > deadline:
                    raise ShardUnavailable(name, self.timeout_s, "still restarting") from error
                time.sleep(0.2)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
                raise ShardUnavailable(name, self.timeout_s, str(error).splitlines()[0]) from e
        self._roll_back(block)

    @_holding_lock
    def _roll_back(self, block, notify: bool = True) -> None:
        """Bring every block, the restarted one included (its pending pushes go too), to
        the checkpoint a restarted shard reports it restored, then tell the caller.

        Once per restart: blocks remember the restarts they were rolled back for (all
        those seen at the reload), so a second handle that meets one of them, or meets
        the new epoch on a write, only learns the new incarnations and epoch (a second
        reload would drop pushes made since the first)."""
        infos = self._call_all("info")
        pending = [
            b
            for b, i in sorted(infos.items())
            if i.get("restarted") and not self._reconciled(i["incarnation"], infos)
        ]
        if pending:
            source = block if block in pending else pending[0]
            step = self._reload_all(infos, source, pending)
        else:
            source = block
            step = infos[block].get("rolled_back_to")
            step = infos[block]["restored_step"] if step is None else step
        self._note(self._call_all("info"))
        self.last_step = step
        self._rolled_back = (step, shard_name(self.name, *source))
        if notify:
            raise StoreRolledBack(step, shard_name(self.name, *source))
        log.warning(
            "table %s rolled back to step %d: shard %s had restarted",
            self.name,
            step,
            shard_name(self.name, *source),
        )

    def _reload_all(self, infos: dict, source, pending: list) -> int:
        """Reload every block from the checkpoint ``source`` restored, under a new
        rollback epoch. The reload covers every shard restarted by now (a lost node
        restarts all of its shards): each restart is marked, so that no handle meeting
        another of them reloads again and drops the steps trained since."""
        info = infos[source]
        restarts = sorted({infos[b]["incarnation"] for b in pending})
        epoch = max(int(i.get("epoch", 0)) for i in infos.values()) + 1
        _ray().get(
            [
                actor.reload.remote(info["restored_path"], restarts, epoch)
                for actor in self.shards.values()
            ],
            timeout=self.timeout_s,
        )
        return info["restored_step"]

    @staticmethod
    def _reconciled(restart: str, infos: dict) -> bool:
        return all(restart in i.get("reconciled", ()) for i in infos.values())

    # ---- validation ------------------------------------------------------------
    def _check_pairs(self, idx, w) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated pairs on the host, where the wire (numpy) starts; w in float32,
        checked after the cast. The shards then check only their row range."""
        check_index("idx", idx, 2, 0, self.rows)
        return idx.cpu(), wire_float("w", w, tuple(idx.shape)).cpu()

    def _check_step(self, step) -> int:
        if step is None:
            return self.last_step + 1
        check_step("step", step)
        if step <= self.last_step and self.config.get("mode") != "async":
            raise StepOutOfOrder(step, self.last_step)
        return step

    # ---- data ------------------------------------------------------------------
    def lookup(self, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(B, dim) float32 = Σ_m w[b, m] · values[idx[b, m]]."""
        idx, w = self._check_pairs(idx, w)
        return self._lookup_checked(idx, w)

    def _lookup_checked(self, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        routes = self.grid.route(idx, w)
        parts = self._data_call("lookup", routes)
        # In numpy, on this thread: see memstore._internal.validation on torch's threads.
        y = np.zeros((idx.shape[0], self.dim), dtype=np.float32)
        for (_r, c), part in parts.items():
            y[:, self.grid.col_bounds[c] : self.grid.col_bounds[c + 1]] += part
        return torch.from_numpy(y)

    @_holding_lock
    def _data_call(
        self, op: str, routes, extra: dict | None = None, ray_kwargs: dict | None = None
    ) -> dict:
        """``op`` (lookup or backward) on every shard with its row block's routed pairs
        plus ``extra[block]`` = (more arrays, scalars), if given, and the incarnation
        expected of the shard (a restarted one refuses the call: the table rolls back).
        ``ray_kwargs[block]``: keyword arguments of the call, which then goes over Ray."""
        arrays = [(r.rows.numpy(), r.w.numpy(), r.offsets.numpy()) for r in routes]
        extra = {b: (extra or {}).get(b, ((), ())) for b in self.shards}
        fence = self._write_fence if op in WRITES else self._incarnations.__getitem__
        calls = {
            (r, c): (arrays[r] + more, (*scalars, fence((r, c))))
            for (r, c), (more, scalars) in extra.items()
        }

        def over_ray(todo: list) -> dict:
            sent = self._put_routes(arrays)
            return {
                (r, c): getattr(self.shards[(r, c)], op).remote(
                    *sent[r],
                    *extra[(r, c)][0],
                    *calls[(r, c)][1],
                    **(ray_kwargs or {}).get((r, c), {}),
                )
                for r, c in todo
            }

        if ray_kwargs is not None:
            return self._checked(self._wait(over_ray(list(self.shards))))
        return self._shard_call(op, calls, over_ray)

    def _shard_call(self, op: str, calls: dict, over_ray) -> dict:
        """``op`` on every shard: ``calls[block]`` = (arrays, scalars) over the data
        channel where the shards have one; ``over_ray(blocks)`` -> {block: ObjectRef}
        makes the same calls over Ray.

        A call whose connection failed (the shard died, restarted, or the socket broke)
        is repeated over Ray, where a dead or restarted shard is recognised and handled;
        after a channel timeout (a lost reply, or a silent shard) every call is.
        Repeating is safe: lookups change nothing, and a shard answers a repeated push or
        step with its first reply.
        """
        todo = list(self.shards)
        results = {}
        if all(self._addresses.get(b) for b in todo):
            requests = {b: (self._addresses[b], op, *calls[b]) for b in todo}
            try:
                results, todo = self._data_channel().call_all(requests)
            except ShardRestarted as e:
                self._roll_back(tuple(int(x) for x in e.shard.split("-")))
            except TimeoutError:
                log.warning(
                    "no reply from a shard of %s on the data channel within %g s: "
                    "the call goes over Ray",
                    self.name,
                    self.timeout_s,
                )
                results, todo = {}, list(self.shards)
            for block in todo:
                log.info(
                    "data channel to %s failed: the call goes over Ray",
                    shard_name(self.name, *block),
                )
        if todo:
            results.update(self._wait(over_ray(todo)))
        return self._checked(results)

    @property
    def timeout_s(self) -> float:
        """Seconds any call waits for a shard (Ray and the data channel alike)."""
        return self._timeout_s

    @timeout_s.setter
    def timeout_s(self, seconds: float) -> None:
        self._timeout_s = seconds
        if self._channel is not None:  # the channel reads it on every call
            self._channel.timeout_s = seconds

    def _data_channel(self) -> DataClient:
        if self._channel is None:
            self._channel = DataClient(self.timeout_s, ChannelSettings.from_config(self.config))
        return self._channel

    def _put_routes(self, arrays: list[tuple]) -> list[tuple]:
        """Each row block's (rows, w, offsets), put in the object store once when several
        column blocks read them and they are large; small ones travel inline with each
        call, which costs less than a put (Ray inlines arguments up to 100 KiB)."""
        if self.grid.shape[1] == 1 or max(sum(a.nbytes for a in t) for t in arrays) < PUT_BYTES:
            return arrays
        ray = _ray()
        return [tuple(ray.put(a) for a in triple) for triple in arrays]

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, dim) float32 copies of the given rows."""
        check_index("rows", rows, 1, 0, self.rows)
        rows = rows.cpu()
        out = torch.zeros(rows.shape[0], self.dim)
        inner = torch.tensor(self.grid.row_bounds[1:-1], dtype=rows.dtype)
        block_of = torch.bucketize(rows, inner, right=True)
        refs = {
            (r, c): a.gather.remote(rows[block_of == r].numpy(), self._incarnations[(r, c)])
            for (r, c), a in self.shards.items()
        }
        for (r, c), part in self._checked(self._wait(refs)).items():
            c0, c1 = self.grid.col_bounds[c], self.grid.col_bounds[c + 1]
            out[block_of == r, c0:c1] = to_tensor(part)
        return out

    def backward(
        self,
        idx,
        w,
        dy,
        step: int | None = None,
        push_id: int | None = None,
        lr: float | None = None,
        *,
        rows=None,
        top_t: int | None = None,
        background: str | None = None,
        doc_ids=None,
    ):
        """dw (B, M); the row gradients pend at the shards for (step, push_id). ``lr``:
        the learning rate step s is applied with (a schedule; all pushes of s agree),
        default the table optimizer's. ``doc_ids`` (B,) int >= 0: the document of each
        bag; the row statistics of a tagged step count documents (``ShardTable.backward``;
        a tagged push goes over Ray, not the data channel).

        A row budget (``rows``, or ``top_t`` with ``background``, as for :meth:`step`)
        makes a sparse push, on tables whose pushes apply the step (async mode, where
        each push is its own update, or ``step_on_push``): the update changes only
        those rows, or the ``top_t`` rows of this push's accesses by TF-IDF chosen
        across every row block (``ShardTable.score_rows``). With ``step_on_push`` every
        push of a step carries a budget, or none does, and the step updates the union
        of the rows its pushes chose (with one push a step: exactly the top t)."""
        budget = self._check_push_budget(rows, top_t, background)
        args = self._check_push(idx, w, dy, step, push_id, lr)
        docs = self._check_doc_ids(doc_ids, args[0].shape[0])
        return self._push(*args, budget=budget, doc_ids=docs)

    @staticmethod
    def _check_doc_ids(doc_ids, bags: int) -> np.ndarray | None:
        """A push's document tags: one int >= 0 per bag, as int64."""
        if doc_ids is None:
            return None
        if not isinstance(doc_ids, torch.Tensor):
            doc_ids = torch.as_tensor(np.asarray(doc_ids))
        check_index("doc_ids", doc_ids, 1, 0, 1 << 62)
        if doc_ids.shape[0] != bags:
            raise InvalidArgument("doc_ids", f"one id per bag ({bags})", doc_ids.shape[0])
        return doc_ids.cpu().numpy().astype(np.int64)

    def _check_push(self, idx, w, dy, step, push_id, lr) -> tuple:
        """The validated arguments of a push: (idx, w, dy, step, push_id, lr)."""
        idx, w = self._check_pairs(idx, w)
        dy = wire_float("dy", dy, (idx.shape[0], self.dim)).cpu()
        check_push_magnitude(w, dy)
        step = self._check_step(step)
        push_id = self.push_id if push_id is None else check_step("push_id", push_id)
        lr = check_lr("lr", lr)
        return idx, w, dy, step, push_id, lr

    def _check_push_budget(self, rows, top_t, background) -> tuple | None:
        """A sparse push's (explicit rows or None, top_t, background), checked; None for
        a push without a row budget."""
        if rows is None and top_t is None and background is None:
            return None
        if self.config.get("mode") != "async" and not self.config.get("step_on_push"):
            field, got = next(
                (f, v)
                for f, v in (("rows", rows), ("top_t", top_t), ("background", background))
                if v is not None
            )
            raise InvalidArgument(
                field, "None: this table's steps choose rows (Table.step(rows=, top_t=))", got
            )
        return (self._check_choice(rows, top_t, background), top_t, background)

    @_holding_lock
    def _push_rows(self, idx: torch.Tensor, budget: tuple) -> np.ndarray:
        """The rows a sparse push updates: its explicit rows, or the ``top_t`` rows this
        push reads by TF-IDF, each row block scoring its own (the push's slots reading a
        row are its tf), ties broken by row id."""
        chosen, top_t, background = budget
        if top_t is None:
            return chosen
        read, counts = np.unique(idx.numpy().reshape(-1), return_counts=True)
        bounds = np.searchsorted(read, self.grid.row_bounds)
        heads = [(r, 0) for r in range(self.grid.shape[0])]
        refs = {
            (r, c): self.shards[(r, c)].score_rows.remote(
                read[bounds[r] : bounds[r + 1]],
                counts[bounds[r] : bounds[r + 1]],
                background,
                self._incarnations[(r, c)],
            )
            for r, c in heads
        }
        scored = self._checked(self._wait(refs))
        scores = np.concatenate([np.asarray(scored[b], dtype=np.float64) for b in heads])
        return np.sort(read[np.lexsort((read, -scores))[:top_t]])

    def _push(
        self,
        idx,
        w,
        dy,
        step: int,
        push_id: int,
        lr,
        need_dw: bool = True,
        budget=None,
        doc_ids=None,
    ):
        routes = self.grid.route(idx, w)
        grouped = self._grouped_slots(routes)
        chosen = None if budget is None else self._push_rows(idx, budget)
        extra = {}
        dy = dy.detach().numpy()
        for r, c in self.shards:
            c0, c1 = self.grid.col_bounds[c], self.grid.col_bounds[c + 1]
            extra[(r, c)] = (
                (np.ascontiguousarray(dy[:, c0:c1]), *grouped[r : r + 1]),
                (step, push_id, lr),
            )
        # A sparse or tagged push goes over Ray: its rows and tags ride as keywords, which
        # the data channel does not carry.
        keywords = None
        if chosen is not None or doc_ids is not None:
            keywords = {b: {} for b in self.shards}
            for r, c in self.shards:
                if chosen is not None:
                    keywords[(r, c)]["keep"] = self._block_rows(chosen, r)[0]
                if doc_ids is not None:
                    keywords[(r, c)]["doc_ids"] = doc_ids
        try:
            parts = self._data_call("backward", routes, extra, keywords)
        except ShardUnavailable:
            raise
        except MemstoreError:
            # Refused by a block, or the table rolled back: no block keeps this push.
            self._retract(step, push_id)
            raise
        return self._assemble_dw(idx.shape, routes, parts) if need_dw else None

    def _assemble_dw(self, shape, routes, parts: dict) -> torch.Tensor:
        """dw (B, M) from each block's dw of its routed slots: the column blocks' partial
        dot products summed per row block, then put at the row block's slots."""
        per_row_block = {}
        for (r, c), part in parts.items():
            part = np.asarray(part, dtype=np.float32)
            if part.shape != (routes[r].rows.numel(),):
                # np.place would silently repeat or drop values of a reply of another size.
                raise MemstoreError(
                    f"{shard_name(self.name, r, c)} answered dw of shape {part.shape} for "
                    f"{routes[r].rows.numel()} slots"
                )
            per_row_block[r] = part if r not in per_row_block else per_row_block[r] + part
        if len(routes) == 1:
            return torch.from_numpy(np.array(per_row_block[0]).reshape(shape))
        dw = np.zeros(shape, dtype=np.float32)
        for r, route in enumerate(routes):
            np.place(dw, route.mask.numpy(), per_row_block[r])
        return torch.from_numpy(dw)

    def _grouped_slots(self, routes) -> list:
        """Each row block's slots grouped by row (``grid.pack_grouping``), once for all
        its column blocks; none (each block groups its own) without column blocks or
        on a data channel that does not take the extra array."""
        if self.grid.shape[1] == 1 or not self._group_slots:
            return []
        if all(self._addresses.get(b) for b in self.shards):
            caps = getattr(self._data_channel(), "settings", None)
            backward = caps.caps.get("backward") if caps is not None else None
            if backward is None or len(backward.arrays) < 5:
                return []
        bounds = self.grid.row_bounds
        return [
            pack_grouping(route.rows, bounds[r], bounds[r + 1]).numpy()
            for r, route in enumerate(routes)
        ]

    def _retract(self, step: int, push_id: int) -> None:
        """A block refused the push (a step or lr check of its own): withdraw it from the
        blocks that took it, so that no block keeps a push the table refused."""
        if len(self.shards) == 1:
            return
        ray = _ray()
        taken = ray.get(
            [a.retract.remote(step, push_id) for a in self.shards.values()], timeout=self.timeout_s
        )
        if any(taken):
            log.warning(
                "push (step %d, push_id %d) refused by a block of %s: withdrawn from "
                "%d blocks that had taken it",
                step,
                push_id,
                self.name,
                sum(taken),
            )

    def step(
        self,
        step: int | None = None,
        pushes_per_step: int | None = None,
        lr: float | None = None,
        rows=None,
        top_t: int | None = None,
        background: str | None = None,
    ) -> int:
        """Apply the optimizer for ``step`` on every shard; ``pushes_per_step`` (default: the
        table's ``pushes_per_step``) pushes must have arrived. ``lr`` overrides the learning
        rate of this step. Returns the rows updated.

        A sparse step updates only ``rows`` (table row ids), or the ``top_t`` rows of
        highest TF-IDF of this step's accesses against the snapshotted statistics
        ``background`` (None: those counted so far), chosen across every row block as
        one block holding the whole table would (``ShardTable.top_rows``). The step's
        gradients of every other row are dropped; those rows do not change.

        Waits first for the pushes of ``step`` issued with ``backward_async`` through this
        handle; if one failed, raises its error and applies nothing (``_await_pushes``)."""
        step = self._check_step(step)
        lr = check_lr("lr", lr)
        chosen = self._check_sparse(rows, top_t, background)
        if pushes_per_step is None:
            pushes_per_step = self.config.get("pushes_per_step")
        elif (
            isinstance(pushes_per_step, bool)
            or not isinstance(pushes_per_step, int)
            or pushes_per_step < 1
        ):
            raise InvalidArgument("pushes_per_step", "None or an int >= 1", pushes_per_step)
        self._await_pushes(step)
        return self._step_all(step, pushes_per_step, lr, chosen, top_t, background)

    @_holding_lock
    def _step_all(
        self,
        step: int,
        pushes_per_step: int | None,
        lr: float | None,
        chosen: np.ndarray | None = None,
        top_t: int | None = None,
        background: str | None = None,
    ) -> int:
        """``step`` on every block; ``chosen`` rows (or the ``top_t`` best by TF-IDF
        against ``background``) only, when given."""
        if top_t is not None:
            chosen = self._top_rows(step, top_t, background)
        # With step_on_push the shards applied s with its last push; this confirms it.
        calls = {
            b: (self._block_rows(chosen, b[0]), (step, pushes_per_step, lr, self._write_fence(b)))
            for b in self.shards
        }

        def over_ray(todo: list) -> dict:
            return {b: self.shards[b].step.remote(*calls[b][0], *calls[b][1]) for b in todo}

        if chosen is not None and chosen.size > (self.config.get("max_pairs") or DEFAULT_MAX_PAIRS):
            done = self._checked(self._wait(over_ray(list(self.shards))))  # beyond its caps
        else:
            done = self._shard_call("step", calls, over_ray)
        self.last_step = step
        every = self.config.get("save_every")
        if every and step % every == 0:
            self.save()
        # Each block's count: an int over Ray, a one-element array over the data channel.
        return sum(int(np.asarray(n).item()) for n in done.values())

    def _check_sparse(self, rows, top_t, background) -> np.ndarray | None:
        """A sparse step's explicit rows (sorted, unique int64), after checking every
        sparse-step argument; None for a step of every touched row. Tables whose pushes
        apply the step take the row budget with the pushes instead."""
        if rows is None and top_t is None and background is None:
            return None
        if self.config.get("mode") == "async" or self.config.get("step_on_push"):
            field = "rows" if rows is not None else "top_t" if top_t is not None else "background"
            raise InvalidArgument(
                field,
                "None: this table's pushes apply its steps; give the budget with the pushes "
                "(backward(..., rows=, top_t=, background=))",
                "a row choice",
            )
        return self._check_choice(rows, top_t, background)

    def _check_choice(self, rows, top_t, background) -> np.ndarray | None:
        """The explicit rows of a row budget (sorted, unique int64), every argument checked."""
        if rows is not None and top_t is not None:
            raise InvalidArgument("top_t", "None when rows is given (one way to choose)", top_t)
        bad_t = isinstance(top_t, bool) or not isinstance(top_t, int) or top_t < 1
        if top_t is not None and bad_t:
            raise InvalidArgument("top_t", "an int >= 1", top_t)
        if background is not None and (top_t is None or not isinstance(background, str)):
            raise InvalidArgument("background", "a snapshot's name, with top_t", background)
        if rows is None:
            return None
        if isinstance(rows, (list, tuple)) and not rows:
            rows = torch.zeros(0, dtype=torch.int64)
        elif not isinstance(rows, torch.Tensor):
            rows = torch.as_tensor(np.asarray(rows))
        check_index("rows", rows, 1, 0, self.rows)
        return np.unique(rows.cpu().numpy().astype(np.int64))

    def _top_rows(self, step: int, top_t: int, background: str | None) -> np.ndarray:
        """The ``top_t`` rows of ``step`` by TF-IDF over the whole table: each row block
        proposes its best ``top_t`` (its column blocks see the same rows, so the first
        answers), and the best ``top_t`` of the proposals, ties by row id, are those of
        the whole table."""
        heads = [b for b in sorted(self.shards) if b[1] == 0]
        refs = {
            b: self.shards[b].top_rows.remote(step, top_t, background, self._incarnations[b])
            for b in heads
        }
        proposals = self._checked(self._wait(refs))
        rows = np.concatenate([np.asarray(p[0], dtype=np.int64) for p in proposals.values()])
        scores = np.concatenate([np.asarray(p[1], dtype=np.float64) for p in proposals.values()])
        return np.sort(rows[np.lexsort((rows, -scores))[:top_t]])

    def _block_rows(self, chosen: np.ndarray | None, r: int) -> tuple:
        """The arrays of row block ``r``'s step call: its chosen rows, if any were chosen."""
        if chosen is None:
            return ()
        lo, hi = np.searchsorted(chosen, self.grid.row_bounds[r : r + 2])
        return (np.ascontiguousarray(chosen[lo:hi]),)

    # ---- row statistics --------------------------------------------------------------
    @_holding_lock
    def row_stats(
        self, background: str | None = None, start: int = 0, stop: int | None = None
    ) -> dict:
        """Per row of the table, as counted by the blocks (``ShardTable.row_stats``):
        {"tf", "df"} int64 arrays and "steps"; ``background``: a snapshot's name; of the
        rows [start, stop) only when given (only the row blocks holding them answer)."""
        if background is not None and not isinstance(background, str):
            raise InvalidArgument("background", "None or a snapshot's name", background)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < self.rows:
            raise InvalidArgument("start", f"an int in [0, {self.rows})", start)
        stop = self.rows if stop is None else stop
        if isinstance(stop, bool) or not isinstance(stop, int) or not start < stop <= self.rows:
            raise InvalidArgument("stop", f"None or an int in ({start}, {self.rows}]", stop)
        bounds = self.grid.row_bounds
        heads = [
            (r, 0) for r in range(self.grid.shape[0]) if bounds[r] < stop and bounds[r + 1] > start
        ]
        refs = {
            b: self.shards[b].row_stats.remote(background, self._incarnations[b], start, stop)
            for b in heads
        }
        parts = [part for _, part in sorted(self._checked(self._wait(refs)).items())]
        return {
            "tf": np.concatenate([p["tf"] for p in parts]),
            "df": np.concatenate([p["df"] for p in parts]),
            "steps": int(parts[0]["steps"]),
        }

    @_holding_lock
    def snapshot_stats(self, name: str) -> None:
        """Keep the statistics counted so far, in every block, as the background ``name``."""
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise InvalidArgument("name", "1-64 characters of [A-Za-z0-9_.-]", name)
        self._checked(self._call_all("snapshot_stats", name, fenced=True))

    @_holding_lock
    def reset_stats(self) -> None:
        """Start counting again from zero in every block; backgrounds stay."""
        self._checked(self._call_all("reset_stats", fenced=True))

    @_holding_lock
    def set_row_counting(self, enabled: bool) -> None:
        """Switch the counting of applied steps on or off in every block (on by default:
        pushes count when their step is applied; lookups never count)."""
        if not isinstance(enabled, bool):
            raise InvalidArgument("enabled", "a bool", enabled)
        self._checked(self._call_all("count_rows", enabled, fenced=True))

    # ---- async calls ---------------------------------------------------------------
    def lookup_async(self, idx: torch.Tensor, w: torch.Tensor) -> Future:
        """``lookup(idx, w)`` issued now, its (B, dim) result delivered by the future.
        Bad input raises here, before anything is sent.

        Which values it reads: each block serves it at the step the block has applied when
        the call reaches it (``last_read_steps`` says which, once its result is ready).
        The call runs on the handle's I/O thread in the order issued, never interleaved
        with another data call or step of this handle. So, while no other handle and no
        ``step_on_push`` steps the table: issued after ``step(s)`` returned, it reads s on
        every block; issued before a ``backward_async`` of s (which ``step(s)`` waits
        for), it reads s - 1; issued after the pushes of s but before ``step(s)`` is
        called, it reads s - 1 or s, the same step on every block."""
        idx, w = self._check_pairs(idx, w)
        idx, w = idx.clone(), w.clone()  # the caller may reuse its tensors meanwhile
        return self._submit(lambda: self._lookup_checked(idx, w), self._epoch)

    def backward_async(
        self,
        idx,
        w,
        dy,
        step: int | None = None,
        push_id: int | None = None,
        lr: float | None = None,
        need_dw: bool = True,
        *,
        rows=None,
        top_t: int | None = None,
        background: str | None = None,
        doc_ids=None,
    ) -> Future:
        """``backward(...)`` issued now; the future's result is dw (B, M), or None with
        ``need_dw=False`` (the shards' dw replies are only acknowledgements then: nothing
        is assembled). Bad input raises here. ``step(s)`` waits for the pushes of s.
        ``rows``, ``top_t``, ``background``: a sparse push, as for :meth:`backward` (the
        top t are chosen when the push is sent, after this handle's earlier pushes);
        ``doc_ids``: document tags, as for :meth:`backward`."""
        if not isinstance(need_dw, bool):
            raise InvalidArgument("need_dw", "True or False", need_dw)
        budget = self._check_push_budget(rows, top_t, background)
        idx, w, dy, step, push_id, lr = self._check_push(idx, w, dy, step, push_id, lr)
        docs = self._check_doc_ids(doc_ids, idx.shape[0])
        idx, w, dy = idx.clone(), w.clone(), dy.detach().clone()
        with self._issue_lock:
            epoch = self._epoch
            call = functools.partial(
                self._push, idx, w, dy, step, push_id, lr, need_dw, budget=budget, doc_ids=docs
            )
            future = self._submit(call, epoch)
            self._pushes.setdefault(step, []).append((epoch, future))
        future.add_done_callback(functools.partial(self._forget_push, step))
        return future

    def _submit(self, call, epoch: int) -> Future:
        """Run ``call`` on the handle's one I/O thread, under rollback ``epoch`` (the one
        the handle knows as the call is issued).

        One thread, not one per call: the data channel's client is not thread-safe and
        every data call reads and may change the handle's incarnations, epoch and steps,
        so the calls (the caller's blocking ones included) hold the handle's lock anyway;
        the thread keeps them in the order they were issued while the caller computes.

        A call issued before the handle learned of a rollback is not sent: its future
        raises StoreRolledBack of that rollback, as the call would have, had it been made
        blocking before the rollback was learned. A rollback is thus learned once (by the
        call that meets the restarted shard), and a push of the abandoned timeline never
        reaches a block after the reload."""
        with self._issue_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"memstore-{self.name}")
            return self._executor.submit(self._run_in_epoch, epoch, call)

    @_holding_lock
    def _run_in_epoch(self, epoch: int, call):
        if self._epoch != epoch:
            raise StoreRolledBack(*self._rolled_back)
        return call()

    def _forget_push(self, step: int, future: Future) -> None:
        """A push that went through needs no waiting for; a failed one stays for its step
        to raise."""
        if future.cancelled() or future.exception() is not None:
            return
        with self._issue_lock:
            pending = [p for p in self._pushes.get(step, ()) if p[1] is not future]
            if pending:
                self._pushes[step] = pending
            else:
                self._pushes.pop(step, None)

    def _await_pushes(self, step: int) -> None:
        """Wait for the async pushes of ``step``, then raise the first error among those
        issued in the handle's current rollback epoch. Pushes issued before a rollback the
        handle learned since are replaced by the replay's pushes; when there are none,
        their error (StoreRolledBack) is raised: the step's gradients are gone."""
        with self._issue_lock:
            pushes = self._pushes.pop(step, [])
        wait([future for _, future in pushes])
        current = [future for epoch, future in pushes if epoch == self._epoch]
        for future in current or [future for _, future in pushes]:
            error = future.exception()
            if error is not None:
                raise error

    # ---- keys and queries ----------------------------------------------------------
    def publish_keys(self, keys: torch.Tensor) -> None:
        """Publish product keys (H, 2, n, Dk/2) so that jobs without the model can query.

        The catalog serves them; every shard keeps a copy, from which a restarted
        catalog (which starts without keys) is refilled on the next query.
        """
        n = math.isqrt(self.rows)
        if keys.dim() != 4 or keys.shape[1] != 2 or keys.shape[2] != n or n * n != self.rows:
            raise InvalidArgument(
                "keys",
                f"shape (H, 2, {n}, Dk/2) for a table of n² = {self.rows} rows",
                tuple(keys.shape),
            )
        keys = wire_float("keys", keys.detach(), tuple(keys.shape)).cpu()
        version = uuid.uuid4().hex
        ray = _ray()
        ref = ray.put(keys.numpy())
        ray.get(
            [
                self._catalog().publish_keys.remote(ref, version),
                *(a.publish_keys.remote(ref, version) for a in self.shards.values()),
            ],
            timeout=self.timeout_s,
        )
        self._keys = (version, keys.clone())

    def _published_keys(self) -> tuple[str, torch.Tensor]:
        """(version, keys) from the catalog, refilled from a shard's copy if it restarted."""
        ray = _ray()
        catalog = self._catalog()
        version, keys = ray.get(catalog.get_published.remote(), timeout=self.timeout_s)
        if keys is None:  # a restarted catalog: refill it from a shard's copy
            for actor in self.shards.values():
                version, keys = ray.get(actor.get_published.remote(), timeout=self.timeout_s)
                if keys is not None:
                    ray.get(catalog.publish_keys.remote(keys, version), timeout=self.timeout_s)
                    break
        if keys is None:
            raise InvalidArgument("keys", "keys published with publish_keys first", None)
        return version, torch.from_numpy(np.array(keys))  # a copy the handle owns

    def query(self, q: torch.Tensor, k: int = 32):
        """Batched top-k query with the published keys: q (B, H, Dk) -> (indices (B, H, k),
        scores (B, H, k), output (B, dim)).

        The handle keeps the keys it last fetched or published. Every block returns the
        version of its keys with the values it read; when one reports other keys (they
        were published again since), the keys are fetched anew and the query repeated,
        so a query after publish_keys returned always uses the new keys."""
        if self._keys is None:
            self._keys = self._published_keys()
        try:
            answer = self._query_with(self._keys[1], q, k)
        except InvalidArgument as e:
            if e.field != "q":
                raise
            self._keys = self._published_keys()  # q may fit keys published since
            return self._query_with(self._keys[1], q, k)
        if self._read_keys_versions - {"", self._keys[0]}:
            self._keys = self._published_keys()
            answer = self._query_with(self._keys[1], q, k)
        return answer

    def _query_with(self, keys: torch.Tensor, q, k: int):
        H, _, n, half = keys.shape
        if not isinstance(q, torch.Tensor) or q.dim() != 3 or tuple(q.shape[1:]) != (H, 2 * half):
            raise InvalidArgument(
                "q",
                f"a (B, {H}, {2 * half}) tensor (heads and key width of the published keys)",
                tuple(getattr(q, "shape", ())),
            )
        q = wire_float("q", q.detach(), tuple(q.shape))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n * n:
            raise InvalidArgument("k", f"an int in [1, {n * n}]", k)
        with torch.no_grad():
            scores, indices = kernels.product_key_topk(q.float().cpu(), keys, k)
        w = torch.softmax(scores, dim=-1).flatten(1)
        return indices, scores, self.lookup(indices.flatten(1), w)

    # ---- state and admin -------------------------------------------------------------
    def save(self, path: str | os.PathLike | None = None) -> str:
        """Write a checkpoint (one file per block, manifest last). Without ``path``, it
        goes under the table's checkpoint_root, where restarted shards look."""
        if path is None:
            root = self.config.get("checkpoint_root")
            if not root:
                raise InvalidArgument(
                    "path", "a directory (the table has no checkpoint_root)", None
                )
            if self.config.get("step_on_push"):  # shards step without this handle
                self.last_step = max(i["last_step"] for i in self._call_all("info").values())
            path = checkpoint.checkpoint_dir(root, self.last_step)
        # Resolved here, on the driver: a relative path means this process's directory.
        path = checkpoint.resolve(path)
        staging = checkpoint.begin(path)  # fresh per save; commit makes it the checkpoint
        try:
            entries = list(self._call_all("save", staging, fenced=True).values())
        except BaseException:
            checkpoint.abort(staging)  # the blocks written so far will never be committed
            raise
        # The blocks' own step: with step_on_push it can be ahead of this handle's.
        self.last_step = max(int(e["last_step"]) for e in entries)
        table_config = {
            k: self.config[k] for k in ("name", "rows", "dim", "dtype", "optimizer", "seed")
        }
        checkpoint.commit(
            path,
            table_config,
            entries,
            self.last_step,
            staging=staging,
            key=self.config.get("checkpoint_key"),
        )
        return path

    def stats(self) -> dict:
        per_shard = self._call_all("stats")
        blocks = sorted(per_shard)
        return {
            "name": self.name,
            "rows": self.rows,
            "dim": self.dim,
            "grid": self.grid.shape,
            "bytes": sum(s["bytes"] for s in per_shard.values()),
            "last_step": self.last_step,
            "shards": [per_shard[b] for b in blocks],
        }

    def fingerprints(self) -> dict:
        return self._call_all("fingerprint")

    def drop(self) -> None:
        """Kill the shards and the catalog and free the placement group."""
        drop_table(self.name)

    def _catalog(self):
        return _ray().get_actor(catalog_name(self.name), namespace=NAMESPACE)

    def __repr__(self) -> str:
        return f"Table({self.name!r}, rows={self.rows}, dim={self.dim}, grid={self.grid.shape})"


def shard_bytes(config: dict, grid: ShardGrid) -> int:
    """Bytes of the largest block: values plus optimizer state."""
    from .optim import optimizer_from_dict

    kind = optimizer_from_dict(config["optimizer"]).kind
    elem = torch.empty((), dtype=getattr(torch, config["dtype"])).element_size()
    worst = 0
    for r, c in grid.blocks():
        rows, cols = grid.block(r, c).shape
        worst = max(worst, rows * cols * elem + kind.state_bytes(rows, cols))
    return worst


def check_budget(config: dict, grid: ShardGrid, budget: int | None) -> None:
    """Refuse a grid whose shard would not fit the per-shard budget or a node's memory."""
    need = shard_bytes(config, grid)
    if budget is not None and need > budget:
        raise MemoryBudgetExceeded(need, budget, "max_shard_bytes")
    nodes = [n for n in _ray().nodes() if n.get("Alive")]
    memory = max((n["Resources"].get("memory", 0) for n in nodes), default=0)
    if memory and need > memory:
        raise MemoryBudgetExceeded(need, int(memory), "the largest node's Ray memory")


def table_exists(name: str) -> bool:
    try:
        _ray().get_actor(catalog_name(name), namespace=NAMESPACE)
        return True
    except ValueError:
        return False


def find_table(name: str) -> dict:
    ray = _ray()
    try:
        catalog = ray.get_actor(catalog_name(name), namespace=NAMESPACE)
    except ValueError as e:
        known = sorted(
            a["name"][: -len("/catalog")]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == NAMESPACE and a["name"].endswith("/catalog")
        )
        raise TableNotFound(name, known) from e
    return ray.get(catalog.get_config.remote())


def raise_if_exists(name: str) -> None:
    if table_exists(name):
        raise TableExists(name)


def drop_table(name: str) -> None:
    """Kill every actor of table ``name`` and free its placement group; works even when
    shards are dead (no shard is called)."""
    ray = _ray()
    try:
        config = find_table(name)
    except TableNotFound:
        remove_placement_group_of(name)  # a create that failed before its catalog existed
        raise
    grid = ShardGrid.from_dict(config["grid"])
    for actor_name in [catalog_name(name), *(shard_name(name, r, c) for r, c in grid.blocks())]:
        try:
            ray.kill(ray.get_actor(actor_name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            log.info("actor %s of table %s was already gone", actor_name, name)
    remove_placement_group_of(name)


def remove_placement_group_of(name: str) -> None:
    from ray.util.placement_group import get_placement_group, remove_placement_group

    try:
        remove_placement_group(get_placement_group(f"memstore/{name}"))
    except ValueError:
        log.info("placement group of table %s was already gone", name)
