"""One block of a value table, with its optimizer state.

A ``ShardTable`` owns rows [row_start, row_stop) × columns [col_start, col_stop) of
a table of ``rows × dim`` values. It answers lookups and gathers, takes the backward
pass of a batch (row gradients pend, keyed by step and push_id), and applies the
sparse optimizer when the step is closed. A table of one block is the in-process
value table of a :class:`memstore.MemoryLayer`; the distributed table is a grid of
blocks, each inside a shard actor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import time

import numpy as np
import torch

from memstore import kernels
from memstore.kernels.grouped import bag_backward_grouped

from ._internal.validation import (
    check_dtype_name,
    check_index,
    check_lr,
    check_positive_int,
    check_push_magnitude,
    check_step,
    check_step_window,
    check_tensor,
    wire_float,
)
from .errors import InvalidArgument, StepOutOfOrder
from .optim import Adam, _Optimizer

log = logging.getLogger(__name__)

__all__ = ["ShardTable", "BlockSpec"]

_BACKGROUND_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# Rows are initialised in fixed chunks, each from its own seed, so that a row's
# initial value does not depend on how the table is cut into blocks.
_INIT_CHUNK_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Where a block sits in its table."""

    rows: int
    dim: int
    row_start: int
    row_stop: int
    col_start: int
    col_stop: int

    @classmethod
    def whole(cls, rows: int, dim: int) -> BlockSpec:
        return cls(rows, dim, 0, rows, 0, dim)

    def __post_init__(self) -> None:
        check_positive_int("rows", self.rows)
        check_positive_int("dim", self.dim)
        if not 0 <= self.row_start < self.row_stop <= self.rows:
            raise InvalidArgument(
                "row_range", f"0 <= start < stop <= {self.rows}", (self.row_start, self.row_stop)
            )
        if not 0 <= self.col_start < self.col_stop <= self.dim:
            raise InvalidArgument(
                "col_range", f"0 <= start < stop <= {self.dim}", (self.col_start, self.col_stop)
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.row_stop - self.row_start, self.col_stop - self.col_start)


def initial_values(spec: BlockSpec, seed: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    """N(0, std²) values of the block, identical for a row whatever the grid."""
    out = kernels.empty_table(spec.shape, dtype)
    first = spec.row_start // _INIT_CHUNK_ROWS
    last = (spec.row_stop - 1) // _INIT_CHUNK_ROWS
    for chunk in range(first, last + 1):
        lo = chunk * _INIT_CHUNK_ROWS
        gen = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        full = torch.randn(_INIT_CHUNK_ROWS, spec.dim, generator=gen)
        a, b = max(lo, spec.row_start), min(lo + _INIT_CHUNK_ROWS, spec.row_stop)
        out[a - spec.row_start : b - spec.row_start] = (
            full[a - lo : b - lo, spec.col_start : spec.col_stop] * std
        ).to(dtype)
    return out


class ShardTable:
    """A block of a value table and its optimizer state, in one process.

    >>> t = ShardTable(rows=1 << 16, dim=64, optimizer=Adam(lr=1e-2))
    >>> y = t.lookup(idx, w)                 # idx (B, M) int64, w (B, M) -> (B, 64)
    >>> dw = t.backward(idx, w, dy, step=1)  # row gradients pend for step 1
    >>> t.step(1)                            # fused sparse Adam on the touched rows
    """

    def __init__(
        self,
        rows: int,
        dim: int,
        *,
        optimizer: _Optimizer | None = None,
        dtype: str = "float32",
        row_range: tuple[int, int] | None = None,
        col_range: tuple[int, int] | None = None,
        seed: int = 0,
        init_std: float | None = None,
        device: str = "cpu",
    ):
        check_positive_int("rows", rows)
        check_positive_int("dim", dim)
        self.spec = BlockSpec(rows, dim, *(row_range or (0, rows)), *(col_range or (0, dim)))
        self.dtype_name = dtype
        torch_dtype = check_dtype_name("dtype", dtype)
        if optimizer is None:
            optimizer = Adam()
        if not isinstance(optimizer, _Optimizer):
            raise InvalidArgument(
                "optimizer",
                "a memstore optimizer (SGD, Adagrad, RowWiseAdagrad, Adam, AdamW)",
                type(optimizer).__name__,
            )
        self.optimizer = optimizer
        self.device = torch.device(device)
        std = dim**-0.5 if init_std is None else init_std
        self.values = initial_values(self.spec, seed, std, torch_dtype).to(self.device)
        self.state = optimizer.init_state(*self.spec.shape, self.device)
        self.last_step = 0  # the last step applied; steps are numbered from 1
        self.updates = 0  # optimizer steps taken (bias correction count)
        # step -> push_id -> that push's row gradients, in factored form
        self._pending: dict[int, dict[int, kernels.SparseRowGrads]] = {}
        self._step_lr: dict[int, float] = {}  # step -> the lr its pushes asked for
        # step -> push_id -> the document id of each bag of that push (tagged pushes)
        self._pending_docs: dict[int, dict[int, torch.Tensor]] = {}
        self._counters = {
            "lookups": 0,
            "tokens": 0,
            "pushes": 0,
            "duplicate_pushes": 0,
            "rows_updated": 0,
            "lookup_s": 0.0,
            "backward_s": 0.0,
            "step_s": 0.0,
        }
        self._init_row_stats()

    # ---- reads ---------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.spec.rows

    @property
    def dim(self) -> int:
        return self.spec.dim

    def _local_index(self, idx: torch.Tensor, ndim: int, field: str = "idx") -> torch.Tensor:
        s = self.spec
        check_index(field, idx, ndim, s.row_start, s.row_stop)
        idx = idx.to(device=self.device, dtype=torch.int64)
        return idx - s.row_start if s.row_start else idx

    def _bags(self, idx, w) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validated (B, M) bags as block-local CSR: rows (P,), w (P,), offsets (B+1,)."""
        local = self._local_index(idx, 2)
        w = wire_float("w", w, tuple(idx.shape))
        B, M = idx.shape
        offsets = torch.arange(B + 1, dtype=torch.int64, device=self.device) * M
        return local.reshape(-1), w.reshape(-1).to(self.device), offsets

    @staticmethod
    def _floats(field: str, t, shape: tuple[int, ...], checked: bool) -> torch.Tensor:
        """float32 ``t`` of ``shape``. ``checked``: the sender (a table handle) already
        checked its values in float32, so only the dtype and shape are checked here."""
        if not checked:
            return wire_float(field, t, shape)
        check_tensor(field, t, len(shape))
        if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape):
            raise InvalidArgument(
                field,
                f"a float32 tensor of shape {tuple(shape)}",
                f"{t.dtype} of shape {tuple(t.shape)}",
            )
        return t

    def _csr_bags(
        self, rows, w, offsets, checked: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validated ragged bags (what a router sends a row block) as block-local CSR.
        The row range and the offsets are always checked: the kernels index with them."""
        local = self._local_index(rows, 1, field="rows")
        w = self._floats("w", w, (rows.shape[0],), checked)
        check_index("offsets", offsets, 1, 0, rows.shape[0] + 1)
        if (
            offsets.numel() == 0
            or int(offsets[0]) != 0
            or int(offsets[-1]) != rows.shape[0]
            or bool((offsets.diff() < 0).any())
        ):
            raise InvalidArgument(
                "offsets", f"non-decreasing from 0 to {rows.shape[0]}", "another sequence"
            )
        return local, w.to(self.device, torch.float32), offsets.to(self.device, torch.int64)

    def lookup(self, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(B, cols) float32: Σ_m w[b, m] · values[idx[b, m]] over this block's columns."""
        return self._lookup(*self._bags(idx, w))

    def lookup_csr(self, rows, w, offsets, checked: bool = False) -> torch.Tensor:
        """(B, cols) float32 for ragged bags: bag b is rows[offsets[b]:offsets[b+1]].
        ``checked``: w is float32 and its values were checked by the sender."""
        return self._lookup(*self._csr_bags(rows, w, offsets, checked))

    def _lookup(self, local, w, offsets) -> torch.Tensor:
        start = time.perf_counter()
        y = kernels.bag.bag_forward_csr(self.values, local, w, offsets)
        self._count("lookup_s", start, tokens=offsets.numel() - 1)
        return y

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, cols) copies of the given rows, in the table's dtype."""
        local = self._local_index(rows, 1, field="rows")
        return self.values[local].clone()

    # ---- updates -------------------------------------------------------------
    def backward(
        self,
        idx,
        w,
        dy,
        step: int | None = None,
        push_id: int = 0,
        lr: float | None = None,
        doc_ids=None,
    ) -> torch.Tensor:
        """dw (B, M) = <values[idx], dy>; the row gradients pend for (step, push_id).

        ``step`` defaults to the step after the last applied one. A second push of the
        same (step, push_id) returns dw again but is not applied twice. ``lr`` is the
        learning rate to apply step s with (a schedule); every push of s must agree.
        ``doc_ids`` (B,) int >= 0: the document each bag belongs to; a step whose pushes
        are tagged counts documents in the row statistics (every push of a step is
        tagged, or none is; see :meth:`row_stats`).
        """
        local, flat_w, offsets = self._bags(idx, w)
        return self._backward(
            local, flat_w, offsets, dy, step, push_id, lr, doc_ids=doc_ids
        ).reshape(idx.shape)

    def backward_csr(
        self,
        rows,
        w,
        offsets,
        dy,
        step: int | None = None,
        push_id: int = 0,
        lr: float | None = None,
        checked: bool = False,
        grouping=None,
        doc_ids=None,
    ):
        """dw (P,) for ragged bags; see :meth:`backward`. ``checked``: w and dy are
        float32 and their values were checked by the sender. ``grouping``: the slots
        grouped by row by the sender, (uniq, seg, order) as ``kernels.grouped.group_rows``
        makes them with global rows; a CPU block then groups nothing itself."""
        local, w, offsets = self._csr_bags(rows, w, offsets, checked)
        if grouping is not None:
            grouping = self._check_grouping(*grouping, rows.shape[0])
        return self._backward(local, w, offsets, dy, step, push_id, lr, checked, grouping, doc_ids)

    def _check_grouping(self, uniq, seg, order, pairs: int) -> tuple:
        """The sender's grouping, checked as far as the kernels index with it (cheaply:
        ranges, not that it is the grouping of these rows); rows made block-local."""
        check_index("order", order, 1, 0, pairs)
        if order.numel() != pairs:
            raise InvalidArgument("order", f"{pairs} slot positions", order.numel())
        s = self.spec
        check_index("uniq", uniq, 1, s.row_start, s.row_stop)
        check_index("seg", seg, 1, 0, pairs + 1)
        if (
            seg.numel() != uniq.numel() + 1
            or int(seg[0]) != 0
            or int(seg[-1]) != pairs
            or bool((seg.diff() < 0).any())
        ):
            raise InvalidArgument(
                "seg",
                f"{uniq.numel() + 1} non-decreasing offsets from 0 to {pairs}",
                "another sequence",
            )
        uniq = uniq.to(device=self.device, dtype=torch.int64)
        return (
            uniq - s.row_start if s.row_start else uniq,
            seg.to(self.device, torch.int64),
            order.to(self.device, torch.int64),
        )

    def _backward(
        self, local, w, offsets, dy, step, push_id, lr, checked=False, grouping=None, doc_ids=None
    ) -> torch.Tensor:
        dy = self._floats("dy", dy, (offsets.numel() - 1, self.spec.shape[1]), checked)
        check_push_magnitude(w, dy)
        step = self._check_open_step(step)
        check_step("push_id", push_id)
        lr = check_lr("lr", lr)
        asked = self._step_lr.get(step)
        if lr is not None and asked is not None and lr != asked:
            raise InvalidArgument("lr", f"{asked}, as the other pushes of step {step}", lr)
        doc_ids = self._check_doc_ids(doc_ids, offsets.numel() - 1, step)
        if lr is not None:
            self._step_lr[step] = lr
        start = time.perf_counter()
        if grouping is not None and self.device.type == "cpu":
            dw, grads = bag_backward_grouped(self.values, local, w, offsets, dy, *grouping)
        else:
            dw, grads = kernels.bag.bag_backward_sparse(
                self.values, local, w, offsets, dy.to(self.device, torch.float32)
            )
        pushes = self._pending.setdefault(step, {})
        if push_id in pushes:
            self._counters["duplicate_pushes"] += 1
            log.info("ignoring a repeated push %d for step %d", push_id, step)
        else:
            pushes[push_id] = grads
            if doc_ids is not None:
                self._pending_docs.setdefault(step, {})[push_id] = doc_ids
            self._counters["pushes"] += 1
        self._count("backward_s", start)
        return dw

    def _check_doc_ids(self, doc_ids, bags: int, step: int) -> torch.Tensor | None:
        """A push's document tags, one int >= 0 per bag; every push of a step is tagged,
        or none is (checked before anything changes)."""
        tagged = step in self._pending_docs
        if doc_ids is None:
            if tagged:
                raise InvalidArgument("doc_ids", f"tags, as the other pushes of step {step}", None)
            return None
        if self._pending.get(step) and not tagged:
            raise InvalidArgument(
                "doc_ids", f"None, as the other pushes of step {step}", "document tags"
            )
        if not isinstance(doc_ids, torch.Tensor):
            doc_ids = torch.as_tensor(np.asarray(doc_ids))
        check_index("doc_ids", doc_ids, 1, 0, 1 << 62)
        if doc_ids.shape[0] != bags:
            raise InvalidArgument("doc_ids", f"one id per bag ({bags})", doc_ids.shape[0])
        return doc_ids.to(self.device, torch.int64)

    def discard(self, step: int) -> None:
        """Forget the gradients pending for ``step`` without applying them."""
        self._pending.pop(step, None)
        self._pending_docs.pop(step, None)
        self._step_lr.pop(step, None)

    def retract(self, step: int, push_id: int) -> bool:
        """Withdraw the pending push of (step, push_id), e.g. one that another block of the
        table refused; False when there is none."""
        pushes = self._pending.get(step, {})
        if pushes.pop(push_id, None) is None:
            return False
        self._pending_docs.get(step, {}).pop(push_id, None)
        if not pushes:
            self.discard(step)
        return True

    def pushes(self, step: int) -> list[int]:
        """The push ids whose gradients are pending for ``step``."""
        return sorted(self._pending.get(step, {}))

    def step(
        self,
        step: int | None = None,
        lr: float | None = None,
        rows=None,
        top_t: int | None = None,
        background: str | None = None,
    ) -> int:
        """Apply the optimizer to the gradients pending for ``step``; returns the rows
        updated. The learning rate is ``lr``, else the one the pushes of ``step`` asked
        for, else the optimizer's own.

        A sparse step updates only some of the rows: ``rows`` (table row ids of this
        block), or the ``top_t`` rows of highest TF-IDF of this step's accesses against
        the statistics snapshotted as ``background`` (None: those counted so far), see
        :meth:`top_rows`. The step's gradient of every other row is dropped, and that
        row's values and optimizer state stay exactly as they were."""
        step = self._check_open_step(step)
        lr = check_lr("lr", lr)
        keep = self._check_sparse(rows, top_t, background)
        start = time.perf_counter()
        pushes = self._pending.pop(step, {})
        docs = self._pending_docs.pop(step, None)
        asked = self._step_lr.pop(step, None)
        lr = asked if lr is None else lr
        for stale in [s for s in self._pending if s < step]:
            log.warning("dropping gradients of step %d, never applied before step %d", stale, step)
            del self._pending[stale]
            self._pending_docs.pop(stale, None)
        for stale in [s for s in self._step_lr if s < step]:
            del self._step_lr[stale]
        if pushes:
            grads = kernels.SparseRowGrads.merge(
                [pushes[w] for w in sorted(pushes)], self.spec.shape[0]
            )
        else:
            grads = kernels.SparseRowGrads.empty(self.spec.shape[1], self.device)
        if top_t is not None:
            best, _ = self._best_rows(grads.rows, grads.seg.diff(), top_t, background)
            keep = torch.from_numpy(np.sort(best) - self.spec.row_start).to(self.device)
        # Counted before the restriction: the statistics are of accesses, not updates.
        self._count_rows(grads, None if docs is None else [docs[p] for p in sorted(pushes)])
        if keep is not None:
            grads = _restrict(grads, keep)
        self.updates += 1
        optimizer = self.optimizer if lr is None else dataclasses.replace(self.optimizer, lr=lr)
        optimizer.apply(self.values, self.state, grads.rows, grads, step=self.updates)
        self.last_step = step
        self._counters["rows_updated"] += grads.rows.numel()
        self._count("step_s", start)
        return grads.rows.numel()

    def _check_sparse(self, rows, top_t, background) -> torch.Tensor | None:
        """The block-local rows a sparse step keeps (sorted, unique) when ``rows`` is
        given; checks every sparse-step argument before anything changes."""
        if rows is not None and top_t is not None:
            raise InvalidArgument("top_t", "None when rows is given (one way to choose)", top_t)
        bad_t = isinstance(top_t, bool) or not isinstance(top_t, int) or top_t < 1
        if top_t is not None and bad_t:
            raise InvalidArgument("top_t", "an int >= 1", top_t)
        if background is not None:
            if top_t is None:
                raise InvalidArgument("background", "None unless top_t is given", background)
            self._background(background)
        if rows is None:
            return None
        if isinstance(rows, (list, tuple)) and not rows:
            rows = torch.zeros(0, dtype=torch.int64)
        elif not isinstance(rows, torch.Tensor):
            rows = torch.as_tensor(np.asarray(rows))
        return torch.unique(self._local_index(rows, 1, field="rows"))

    def top_rows(
        self, step: int | None = None, top_t: int = 1, background: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``top_t`` rows of this block that the pushes pending for ``step`` read,
        by TF-IDF ``tf · log((N + 1) / (df + 1))`` (tf: the step's slots reading the row;
        df and N: the background's document frequency and steps), as (table row ids
        int64, scores float64), best first, ties broken by row id ascending. A grid's
        row blocks each propose theirs and the handle keeps the best ``top_t`` of all:
        the same rows as one block holding the whole table would choose."""
        step = self._check_open_step(step)
        if top_t is None:
            raise InvalidArgument("top_t", "an int >= 1", top_t)
        self._check_sparse(None, top_t, background)
        parts = list(self._pending.get(step, {}).values())
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        local = torch.cat([p.rows for p in parts])
        counts = torch.cat([p.seg.diff() for p in parts])
        if len(parts) > 1:
            local, inverse = torch.unique(local, return_inverse=True)
            counts = torch.zeros(local.numel(), dtype=torch.int64, device=local.device).index_add_(
                0, inverse, counts
            )
        return self._best_rows(local, counts, top_t, background)

    def _best_rows(self, local, counts, top_t: int, background) -> tuple[np.ndarray, np.ndarray]:
        """(table row ids, scores) of the best ``top_t`` of ``local`` rows read ``counts``
        times, best first, ties by row id."""
        scores = self._scores(local, counts, background)
        rows = local.cpu().numpy().astype(np.int64) + self.spec.row_start
        order = np.lexsort((rows, -scores))[:top_t]
        return rows[order], scores[order]

    def _scores(self, local, counts, background) -> np.ndarray:
        """float64 TF-IDF of ``local`` rows read ``counts`` times, against ``background``."""
        df, steps = self._idf_counts(background)
        df_of = df[local].cpu().numpy()
        # The idf of each distinct df through math.log, not a vectorised log: that would
        # round differently at different positions of an array, so two grids could
        # score one row differently.
        distinct, inverse = np.unique(df_of, return_inverse=True)
        idf = np.array([math.log((steps + 1) / (d + 1)) for d in distinct.tolist()])
        return counts.cpu().numpy().astype(np.float64) * idf[inverse.reshape(-1)]

    def score_rows(self, rows, counts, background: str | None = None) -> np.ndarray:
        """TF-IDF scores (float64) of this block's ``rows`` (table row ids) read ``counts``
        times (int, >= 0), against ``background``: how a handle ranks the rows of one
        push across every row block (an async or ``step_on_push`` sparse push)."""
        local = self._local_index(torch.as_tensor(np.asarray(rows)), 1, field="rows")
        counts = torch.as_tensor(np.asarray(counts))
        check_index("counts", counts, 1, 0, 1 << 62)
        if counts.shape != local.shape:
            raise InvalidArgument("counts", f"shape {tuple(local.shape)}", tuple(counts.shape))
        if background is not None:
            self._background(background)
        return self._scores(local, counts, background)

    def _check_open_step(self, step: int | None) -> int:
        if step is None:
            return self.last_step + 1
        check_step("step", step)
        if step <= self.last_step:
            raise StepOutOfOrder(step, self.last_step)
        return check_step_window("step", step, self.last_step)

    def pending_steps(self) -> list[int]:
        return sorted(self._pending)

    # ---- row statistics ------------------------------------------------------
    def _init_row_stats(self) -> None:
        """Per row of the block: tf, the slots of the last counted step's pushes that read
        it; df, the counted steps that read it; and the number of steps counted. A step
        whose pushes tag their bags with documents counts documents instead: df + the
        step's distinct documents reading the row, steps + its distinct documents (a
        document is a tag within one step). Counted when a step is applied, from its
        merged gradients (already grouped by row), so lookups never count and a push
        counts once, retried or not."""
        n = self.spec.shape[0]
        self.count_rows = True  # the switch: off, applied steps are not counted
        self._row_df = torch.zeros(n, dtype=torch.int64, device=self.device)
        self._row_steps = 0
        # tf stays sparse, as the last counted step's rows and slot offsets (its merged
        # gradients' own): counting a step then costs one index_add_ into df.
        none = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._tf_last = (none, torch.zeros(1, dtype=torch.int64, device=self.device))
        self._ones = torch.ones(0, dtype=torch.int64, device=self.device)
        # name -> (tf, df, steps) snapshotted by snapshot_stats
        self._backgrounds: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def _count_rows(self, grads: kernels.SparseRowGrads, docs: list | None = None) -> None:
        """Count a step: df + 1 for each row it read and one more step; with document
        tags (``docs``: each push's bag tags, in the order the pushes were merged), df +
        the distinct documents that read the row and the step's distinct documents."""
        if not self.count_rows:
            return
        self._tf_last = (grads.rows, grads.seg)
        if docs is not None:
            self._count_documents(grads, torch.cat(docs))
            return
        touched = grads.rows.numel()
        if self._ones.numel() < touched:
            self._ones = torch.ones(touched, dtype=torch.int64, device=self.device)
        self._row_df.index_add_(0, grads.rows, self._ones[:touched])  # rows are unique
        self._row_steps += 1

    def _count_documents(self, grads: kernels.SparseRowGrads, bag_docs: torch.Tensor) -> None:
        """df of each row += the distinct documents among its slots; steps += the step's
        distinct documents (of every bag, so that every block of a grid counts alike)."""
        counts = grads.seg.diff()
        slot_row = torch.repeat_interleave(torch.arange(counts.numel(), device=self.device), counts)
        pairs = torch.unique(torch.stack([slot_row, bag_docs[grads.slot_bag]]), dim=1)
        per_row = torch.bincount(pairs[0], minlength=counts.numel())
        self._row_df.index_add_(0, grads.rows, per_row)
        self._row_steps += int(torch.unique(bag_docs).numel())

    def _live_tf(self) -> torch.Tensor:
        tf = torch.zeros(self.spec.shape[0], dtype=torch.int32, device=self.device)
        rows, seg = self._tf_last
        tf[rows] = seg.diff().to(torch.int32)
        return tf

    def _background(self, name: str | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(tf, df, steps) counted so far (``name`` None) or snapshotted as ``name``."""
        if name is None:
            return self._live_tf(), self._row_df, self._row_steps
        found = self._backgrounds.get(name) if isinstance(name, str) else None
        if found is None:
            raise InvalidArgument(
                "background", f"one of {sorted(self._backgrounds)} (see snapshot_stats)", name
            )
        return found

    def _idf_counts(self, name: str | None) -> tuple[torch.Tensor, int]:
        """(df, steps) of a background, without building the live tf."""
        if name is None:
            return self._row_df, self._row_steps
        return self._background(name)[1:]

    def row_stats(
        self, background: str | None = None, start: int | None = None, stop: int | None = None
    ) -> dict:
        """{"tf", "df"} int64 arrays over this block's rows, and "steps", as counted so
        far or as snapshotted under the name ``background``; of the rows [start, stop)
        (table row ids, clipped to the block) when given."""
        lo, hi = self.spec.row_start, self.spec.row_stop
        for field, bound in (("start", start), ("stop", stop)):
            if bound is not None and (
                isinstance(bound, bool) or not isinstance(bound, int) or not 0 <= bound <= self.rows
            ):
                raise InvalidArgument(field, f"None or an int in [0, {self.rows}]", bound)
        a = min(max(start if start is not None else lo, lo), hi) - lo
        b = max(min(stop if stop is not None else hi, hi), lo + a) - lo
        tf, df, steps = self._background(background)
        return {
            "tf": tf[a:b].cpu().numpy().astype(np.int64),
            "df": df[a:b].cpu().numpy().copy(),
            "steps": int(steps),
        }

    def snapshot_stats(self, name: str) -> None:
        """Keep the statistics counted so far as the background ``name`` (e.g. those of
        pretraining), replacing one of that name."""
        if not isinstance(name, str) or not _BACKGROUND_NAME.fullmatch(name):
            raise InvalidArgument("name", "1-64 characters of [A-Za-z0-9_.-]", name)
        self._backgrounds[name] = (self._live_tf(), self._row_df.clone(), self._row_steps)

    def reset_stats(self) -> None:
        """Start counting again from zero; snapshotted backgrounds stay."""
        self._row_df.zero_()
        self._row_steps = 0
        self._tf_last = (self._tf_last[0][:0], self._tf_last[1][:1] * 0)

    def _stats_state(self) -> dict:
        def one(tf, df, steps) -> dict:
            return {"tf": tf.cpu(), "df": df.cpu(), "steps": int(steps)}

        return {
            **one(self._live_tf(), self._row_df, self._row_steps),
            "counting": bool(self.count_rows),
            "backgrounds": {k: one(*v) for k, v in sorted(self._backgrounds.items())},
        }

    def _parse_stats_state(self, sd: dict | None) -> dict:
        """The row statistics of a state dict, checked; a state without them (an older
        checkpoint) starts them from zero."""
        n = self.spec.shape[0]
        zero = {"tf": torch.zeros(n, dtype=torch.int32), "df": torch.zeros(n, dtype=torch.int64)}
        if sd is None:
            return {**zero, "steps": 0, "counting": True, "backgrounds": {}}

        def check(field: str, part) -> dict:
            for name in ("tf", "df"):
                t = part.get(name) if isinstance(part, dict) else None
                if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
                    raise InvalidArgument(f"{field}.{name}", "an int tensor", type(t).__name__)
                if tuple(t.shape) != (n,):
                    raise InvalidArgument(f"{field}.{name}", f"shape ({n},)", tuple(t.shape))
            check_step(f"{field}.steps", part.get("steps"))
            return {"tf": part["tf"], "df": part["df"], "steps": int(part["steps"])}

        out = check("row_stats", sd)
        out["counting"] = bool(sd.get("counting", True))
        out["backgrounds"] = {
            name: check(f"row_stats.backgrounds.{name}", part)
            for name, part in dict(sd.get("backgrounds") or {}).items()
        }
        return out

    def _load_stats_state(self, parsed: dict) -> None:
        tf = parsed["tf"].to(self.device)
        rows = torch.nonzero(tf).reshape(-1)
        seg = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(tf[rows].to(torch.int64), 0, out=seg[1:])
        self._tf_last = (rows, seg)
        self._row_df.copy_(parsed["df"])
        self._row_steps = parsed["steps"]
        self.count_rows = parsed["counting"]
        self._backgrounds = {
            name: (
                part["tf"].to(self.device, torch.int32),
                part["df"].to(self.device, torch.int64),
                part["steps"],
            )
            for name, part in parsed["backgrounds"].items()
        }

    # ---- state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Values, optimizer state and counters; pending gradients are not part of it."""
        return {
            "spec": dataclasses.asdict(self.spec),
            "dtype": self.dtype_name,
            "optimizer": self.optimizer.to_dict(),
            "values": self.values.cpu(),
            "state": {k: v.cpu() for k, v in self.state.items()},
            "last_step": self.last_step,
            "updates": self.updates,
            "row_stats": self._stats_state(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Load a state of the same block shape; clears pending gradients."""
        if tuple(sd["values"].shape) != self.spec.shape:
            raise InvalidArgument("values", f"shape {self.spec.shape}", tuple(sd["values"].shape))
        if set(sd["state"]) != set(self.state):
            raise InvalidArgument("state", f"tensors {sorted(self.state)}", sorted(sd["state"]))
        row_stats = self._parse_stats_state(sd.get("row_stats"))
        self.values.copy_(sd["values"])
        for name, tensor in sd["state"].items():
            self.state[name].copy_(tensor)
        self.last_step = int(sd["last_step"])
        self.updates = int(sd["updates"])
        self._load_stats_state(row_stats)
        self._pending.clear()
        self._pending_docs.clear()
        self._step_lr.clear()

    def fingerprint(self) -> str:
        """sha256 of values and optimizer state: equal fingerprints, identical block."""
        h = hashlib.sha256()
        for t in [self.values, *(self.state[k] for k in sorted(self.state))]:
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        h.update(f"{self.last_step}:{self.updates}".encode())
        return h.hexdigest()

    def nbytes(self) -> int:
        return self.values.nbytes + sum(t.nbytes for t in self.state.values())

    def stats(self) -> dict:
        return {
            "rows": self.spec.shape[0],
            "cols": self.spec.shape[1],
            "bytes": self.nbytes(),
            "last_step": self.last_step,
            "pending_steps": self.pending_steps(),
            **self._counters,
            # Which implementation (triton, native, library, composite) each kernel op
            # of this process took: a shard actor's process serves one block.
            "kernel_paths": {
                f"{op}/{path}": n for (op, path), n in sorted(kernels._dispatch.COUNTS.items())
            },
        }

    def _count(self, timer: str, start: float, tokens: int = 0) -> None:
        self._counters[timer] += time.perf_counter() - start
        if tokens:
            self._counters["lookups"] += 1
            self._counters["tokens"] += tokens


def _restrict(grads: kernels.SparseRowGrads, keep: torch.Tensor) -> kernels.SparseRowGrads:
    """``grads`` of the rows in ``keep`` (block-local) only: the slots of every other
    row are dropped, so the optimizer never visits that row."""
    kept = torch.isin(grads.rows, keep)
    counts = grads.seg.diff()
    slots = kept.repeat_interleave(counts)
    seg = torch.zeros(int(kept.sum()) + 1, dtype=torch.int64, device=grads.rows.device)
    torch.cumsum(counts[kept], 0, out=seg[1:])
    return kernels.SparseRowGrads(
        grads.rows[kept], seg, grads.slot_bag[slots], grads.slot_w[slots], grads.dy
    )
