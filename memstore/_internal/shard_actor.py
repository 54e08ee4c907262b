"""The shard: a plain class that a Ray actor hosts.

``ShardWorker`` owns one block of a table (a :class:`ShardTable`) and speaks numpy
on the wire: Ray moves numpy arrays through its object store without copying, and
the arrays come back as tensors with ``torch.from_numpy``. It is wrapped with
``ray.remote(...)`` only when spawned, so tests can spawn a failing subclass.

Every data call returns ``(incarnation, result)``. The incarnation is new each time
the actor process starts, so a client that sees it change knows that the shard
restarted and reloaded its last checkpoint (``restored_step``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import uuid

import numpy as np
import torch

from .. import checkpoint
from ..errors import InvalidArgument
from ..grid import ShardGrid
from ..optim import optimizer_from_dict
from ..shard_table import ShardTable
from .data_channel import ChannelSettings, DataServer
from .wire import to_tensor

log = logging.getLogger(__name__)


def _locked(method):
    """Run under the shard's lock: Ray calls and data-channel calls arrive on different
    threads, and every one of them reads or changes the block."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return run


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (tests of the plain class): loopback
        return "127.0.0.1"


class ShardWorker:
    def __init__(self, config: dict, r: int, c: int):
        torch.set_num_threads(max(1, int(config.get("threads", 1))))
        self._lock = threading.RLock()
        self.config = config
        self.block_id = f"{r}-{c}"
        grid = ShardGrid.from_dict(config["grid"])
        self.spec = grid.block(r, c)
        self.table = self._new_table()
        self.incarnation = uuid.uuid4().hex
        self.async_applied: set[tuple[int, int]] = set()
        self.max_seen_step = 0
        self.staleness: list[int] = []
        self.restored_step = self._restore()
        self.keys: np.ndarray | None = None
        self.data_server = None
        if config.get("data_channel", "socket") == "socket":
            self.data_server = DataServer(
                config.get("data_bind") or _node_ip(),
                {"lookup": self.lookup, "backward": self.backward},
                ChannelSettings.from_config(config), advertised_host=_node_ip())

    def _new_table(self) -> ShardTable:
        """This block with its initial values (the seed fixes them for any grid)."""
        c = self.config
        return ShardTable(
            c["rows"], c["dim"], optimizer=optimizer_from_dict(c["optimizer"]), dtype=c["dtype"],
            seed=c["seed"], device=c.get("device", "cpu"),
            row_range=(self.spec.row_start, self.spec.row_stop),
            col_range=(self.spec.col_start, self.spec.col_stop),
        )

    def _restore(self) -> int:
        """Load the newest committed checkpoint of the table, if there is one."""
        # A damaged newest checkpoint falls back to the previous one (with a warning).
        found = checkpoint.restore_block(self.config.get("checkpoint_root"), self.spec,
                                         self.config.get("restore_from"))
        if found is None:
            return 0
        path, state = found
        self.table.load_state_dict(state)
        log.info("shard %s of %s restored step %d from %s", self.block_id,
                 self.config["name"], self.table.last_step, path)
        return self.table.last_step

    # ---- control -------------------------------------------------------------
    def info(self) -> dict:
        import ray

        return {
            "incarnation": self.incarnation,
            "restored_step": self.restored_step,
            "last_step": self.table.last_step,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "block": self.block_id,
            "data_address": self.data_server.address if self.data_server else None,
        }

    @_locked
    def reload(self, path: str | None) -> tuple[str, int]:
        """Roll this block back to the checkpoint at ``path``, or to its initial values
        when there is none (after another shard restarted from the same state)."""
        if path:
            self.table.load_state_dict(checkpoint.load_block(path, self.spec))
        else:
            self.table = self._new_table()
        self.async_applied.clear()
        return self.incarnation, self.table.last_step

    # ---- data ----------------------------------------------------------------
    @_locked
    def lookup(self, rows, w, offsets):
        y = self.table.lookup_csr(to_tensor(rows), to_tensor(w), to_tensor(offsets))
        return self.incarnation, y.numpy()

    @_locked
    def gather(self, rows):
        return self.incarnation, self.table.gather(to_tensor(rows)).float().numpy()

    @_locked
    def backward(self, rows, w, offsets, dy, step: int, worker: int, lr: float | None = None):
        args = (to_tensor(rows), to_tensor(w), to_tensor(offsets), to_tensor(dy))
        if self.config.get("mode") == "async":
            return self.incarnation, self._backward_async(args, step, worker, lr)
        dw = self.table.backward_csr(*args, step=step, worker=worker, lr=lr)
        # step_on_push implies workers (create_table checks it): the last push steps.
        if self.config.get("step_on_push") and (
                len(self.table.pushes(step)) >= self.config["workers"]):
            self.table.step(step)
        return self.incarnation, dw.numpy()

    def _backward_async(self, args, step: int, worker: int, lr: float | None) -> np.ndarray:
        """Parameter-server style: each push is applied on arrival as its own update."""
        max_staleness = self.config.get("max_staleness")
        lag = self.max_seen_step - step
        if max_staleness is not None and lag > max_staleness:
            raise InvalidArgument("step", f"at most {max_staleness} steps behind the newest "
                                  f"push ({self.max_seen_step})", step)
        internal = self.table.last_step + 1
        dw = self.table.backward_csr(*args, step=internal, worker=worker, lr=lr)
        if (worker, step) not in self.async_applied:
            self.async_applied.add((worker, step))
            self.table.step(internal)
            self.max_seen_step = max(self.max_seen_step, step)
            self.staleness.append(max(lag, 0))
        else:
            self.table.discard(internal)
        return dw.numpy()

    @_locked
    def step(self, step: int, workers: int | None, lr: float | None = None):
        if self.config.get("mode") == "async":
            return self.incarnation, 0
        if self.config.get("step_on_push") and step <= self.table.last_step:
            return self.incarnation, 0  # applied by its last push: step only confirms it
        if workers is not None:
            arrived = self.table.pushes(step)
            if len(arrived) < workers:
                raise InvalidArgument("step", f"pushes from {workers} workers before step {step}",
                                      f"pushes from workers {arrived}")
        return self.incarnation, self.table.step(step, lr=lr)

    # ---- published keys (a copy for a restarted catalog) ------------------------
    def publish_keys(self, keys: np.ndarray) -> None:
        self.keys = keys

    def get_keys(self) -> np.ndarray | None:
        return self.keys

    # ---- state ---------------------------------------------------------------
    @_locked
    def save(self, path: str) -> dict:
        return checkpoint.write_block(path, self.block_id, self.table.state_dict())

    @_locked
    def fingerprint(self) -> str:
        return self.table.fingerprint()

    @_locked
    def stats(self) -> dict:
        out = {"block": self.block_id, "pid": os.getpid(), **self.table.stats()}
        if self.staleness:
            out["staleness_mean"] = float(np.mean(self.staleness))
            out["staleness_max"] = int(np.max(self.staleness))
        return out
