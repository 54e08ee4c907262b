"""A client of the memstore gRPC server (``memstore serve``), for jobs outside Ray.

    from memstore.client import MemoryClient

    with MemoryClient("127.0.0.1:50051", token=...) as client:
        result = client.query("facts-mem0", q, k=32)       # q: (B, H, Dk)
        y = client.lookup("facts-mem0", idx, w)            # (B, M), (B, M) -> (B, dim)

Arrays go in as numpy arrays or torch tensors and come back as the same kind. This
module imports neither Ray nor torch (torch only when given torch tensors). Requests
larger than the message limit are split along the batch and the answers joined in
order; reads are retried with backoff when the server is UNAVAILABLE, writes never
(repeat a push with the same (step, push_id) to retry it safely).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import grpc
import numpy as np

from ._internal.grpc_auth import client_token, is_loopback
from ._internal.grpc_codec import FLOATS, INTS, decode, encode
from .errors import InvalidArgument, RemoteError
from .v1 import memstore_pb2 as pb
from .v1 import memstore_pb2_grpc as pb_grpc

__all__ = ["MemoryClient", "QueryResult", "Seen"]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
# Room left in a message for everything but the tensors' data.
_MESSAGE_OVERHEAD = 64 << 10


@dataclasses.dataclass
class Seen:
    """The table step a reply saw (see StepSeen in the proto)."""

    step: int
    shard_steps: dict
    consistent: bool

    @classmethod
    def of(cls, message) -> Seen:
        return cls(message.step, dict(message.shard_steps), message.consistent)

    @classmethod
    def joined(cls, parts: list[Seen]) -> Seen:
        """One Seen for the answer assembled from split calls."""
        same = all(p.shard_steps == parts[0].shard_steps for p in parts)
        return cls(
            min(p.step for p in parts),
            parts[-1].shard_steps,
            same and all(p.consistent for p in parts),
        )


@dataclasses.dataclass
class QueryResult:
    indices: object  # (B, H, k) int64
    scores: object  # (B, H, k) float32
    values: object  # (B, dim) float32, or None
    seen: Seen


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _as_numpy(field: str, x) -> np.ndarray:
    if _is_torch(x):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    if not isinstance(x, np.ndarray):
        raise InvalidArgument(field, "a numpy array or torch tensor", type(x).__name__)
    return x


def check_transport(address: str, tls: bool, insecure: bool, sends_token: bool) -> None:
    """Refuse to send a token in clear beyond this machine: a non-loopback address
    needs TLS, or ``insecure`` (which logs a warning)."""
    if tls or not sends_token or is_loopback(address.rpartition(":")[0] or address):
        return
    if not insecure:
        raise InvalidArgument(
            "address",
            "a loopback address, TLS (root certificates / --tls-ca), or insecure=True "
            "(--insecure) to send the token in clear",
            address,
        )
    log.warning("sending a token to %s without TLS: anyone on the path can read it", address)


def _like(template, a: np.ndarray):
    """``a`` as the kind of array the caller gave (torch in, torch out)."""
    if _is_torch(template):
        import torch

        return torch.from_numpy(np.array(a))
    return np.array(a)  # writable, independent of the reply's bytes


class MemoryClient:
    """A connection to one ``memstore serve`` server: the tables of its Ray cluster by
    name, for reads (``tables``, ``describe``, ``stats``, ``row_stats``, ``lookup``,
    ``gather``, ``query``) and writes (``apply_gradients``, ``step``, ``publish_keys``,
    ``save``), each allowed by the token's scopes. Reads are split to fit the message
    limit and the table's caps, and retried while the server is UNAVAILABLE; writes go
    once. Errors come back as :class:`memstore.errors.RemoteError` with the status name.
    Use it as a context manager, or call ``close``."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        root_certificates: bytes | None = None,
        *,
        token_file: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout_s: float = 60.0,
        read_retries: int = 4,
        backoff_s: float = 0.1,
        server_name: str | None = None,
        insecure: bool = False,
    ):
        """``token``: else ``token_file``, $MEMSTORE_TOKEN, or ~/.memstore/grpc-token.
        ``root_certificates`` (PEM bytes) turns on TLS; ``server_name`` overrides the
        name the certificate is checked against. A token goes in clear only to a
        loopback address, or with ``insecure=True`` (logged as a warning)."""
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.timeout_s = timeout_s
        self.read_retries = read_retries
        self.backoff_s = backoff_s
        token = client_token(token, token_file)
        check_transport(address, root_certificates is not None, insecure, bool(token))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.MemoryStoreStub(self._channel)
        self._tables: dict[str, dict] = {}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- transport -------------------------------------------------------------------
    def _call(self, method: str, request, read: bool):
        rpc = getattr(self._stub, method)
        attempts = 1 + (self.read_retries if read else 0)
        for attempt in range(attempts):
            try:
                return rpc(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt + 1 < attempts:
                    time.sleep(self.backoff_s * (2**attempt))
                    continue
                raise RemoteError(method, code.name, e.details() or "") from None

    def _info(self, table: str) -> dict:
        if table not in self._tables:
            self._tables[table] = self.describe(table)
        return self._tables[table]

    def _dim(self, table: str) -> int:
        return self._info(table)["dim"]

    def _chunk_rows(
        self, table: str, request_bytes_per_row: int, reply_bytes_per_row: int, pairs: int = 1
    ) -> int:
        """Rows per call: within the message limit and the table's per-call caps (a
        server that states none has 0 for them)."""
        info = self._info(table)
        per_row = max(request_bytes_per_row, reply_bytes_per_row, 1)
        rows = max(1, (self.max_message_bytes - _MESSAGE_OVERHEAD) // per_row)
        if info["max_batch"] > 0:
            rows = min(rows, info["max_batch"])
        if info["max_pairs"] > 0:
            rows = min(rows, max(1, info["max_pairs"] // max(pairs, 1)))
        return rows

    # ---- reads -------------------------------------------------------------------------
    def tables(self) -> list[dict]:
        reply = self._call("ListTables", pb.ListTablesRequest(), read=True)
        return [
            {"name": t.name, "rows": t.rows, "dim": t.dim, "step": t.seen.step}
            for t in reply.tables
        ]

    def describe(self, table: str) -> dict:
        r = self._call("DescribeTable", pb.DescribeTableRequest(table=table), read=True)
        return {
            "name": r.name,
            "rows": r.rows,
            "dim": r.dim,
            "grid": tuple(r.grid),
            "dtype": r.dtype,
            "optimizer": r.optimizer,
            "optimizer_params": dict(r.optimizer_params),
            "mode": r.mode,
            "step": r.seen.step,
            "keys_published": r.keys_published,
            "key_heads": r.key_heads,
            "key_dim": r.key_dim,
            "max_batch": r.max_batch,
            "max_pairs": r.max_pairs,
            "shards": [_shard_dict(s) for s in r.shards],
        }

    def stats(
        self,
        table: str,
        *,
        rows: bool = False,
        background: str | None = None,
        row_start: int = 0,
        row_count: int | None = None,
    ) -> dict:
        """Per-shard counters; with ``rows``, also "row_stats": the statistics of rows
        [row_start, row_start + row_count) (default: to the end of the table, refused
        when more than one reply holds; :meth:`row_stats` pages through them)."""
        request = pb.StatsRequest(table=table, rows=rows, row_start=row_start)
        if background is not None:
            request.background = background
        if row_count is not None:
            request.row_count = row_count
        r = self._call("Stats", request, read=True)
        out = {"step": r.seen.step, "bytes": r.bytes, "shards": [_shard_dict(s) for s in r.shards]}
        if r.HasField("row_stats"):
            rs = r.row_stats
            out["row_stats"] = {
                "row_start": rs.row_start,
                "tf": decode("tf", rs.tf, rs.HasField("tf"), INTS, 1),
                "df": decode("df", rs.df, rs.HasField("df"), INTS, 1),
                "steps": rs.steps,
                "table_rows": rs.table_rows,
                "max_rows": rs.max_rows,
            }
        return out

    def row_stats(self, table: str, background: str | None = None) -> dict:
        """{"tf", "df"} int64 arrays over every row of the table and "steps", as
        ``Table.row_stats`` answers them, read in pages of the server's ``max_rows``."""
        first = self.stats(table, rows=True, background=background, row_count=1)["row_stats"]
        total, page = first["table_rows"], first["max_rows"]
        tf, df, steps = [], [], set()
        for start in range(0, total, page):
            part = self.stats(
                table,
                rows=True,
                background=background,
                row_start=start,
                row_count=min(page, total - start),
            )["row_stats"]
            tf.append(part["tf"])
            df.append(part["df"])
            steps.add(part["steps"])
        return {"tf": np.concatenate(tf), "df": np.concatenate(df), "steps": max(steps)}

    def lookup(self, table: str, idx, w, *, with_seen: bool = False):
        """(B, dim) float32 = Σ_m w[b, m] · values[idx[b, m]]."""
        i, wn = _as_numpy("idx", idx), _as_numpy("w", w)
        if i.ndim != 2 or wn.shape != i.shape:
            raise InvalidArgument("w", f"the shape of idx {i.shape}", wn.shape)
        rows = self._chunk_rows(
            table, i.shape[1] * (i.itemsize + 4), self._dim(table) * 4, i.shape[1]
        )
        ys, seen = [], []
        for s in range(0, max(len(i), 1), rows):
            request = pb.LookupRequest(table=table)
            encode(i[s : s + rows], request.idx)
            _encode_float(wn[s : s + rows], request.w)
            reply = self._call("Lookup", request, read=True)
            ys.append(decode("y", reply.y, reply.HasField("y"), FLOATS, 2))
            seen.append(Seen.of(reply.seen))
        y = _like(idx, np.concatenate(ys))
        return (y, Seen.joined(seen)) if with_seen else y

    def gather(self, table: str, rows, *, with_seen: bool = False):
        """(n, dim) float32 copies of the rows."""
        r = _as_numpy("rows", rows)
        step = self._chunk_rows(table, r.itemsize, self._dim(table) * 4)
        parts, seen = [], []
        for s in range(0, max(len(r), 1), step):
            request = pb.GatherRequest(table=table)
            encode(r[s : s + step], request.rows)
            reply = self._call("Gather", request, read=True)
            parts.append(decode("values", reply.values, reply.HasField("values"), FLOATS, 2))
            seen.append(Seen.of(reply.seen))
        out = _like(rows, np.concatenate(parts))
        return (out, Seen.joined(seen)) if with_seen else out

    def query(self, table: str, q, k: int = 32, *, return_values: bool = True) -> QueryResult:
        """Top-k rows of the published product keys for q (B, H, Dk), their scores and
        (``return_values``) the weighted lookup of them (B, dim)."""
        qn = _as_numpy("q", q)
        if qn.ndim != 3:
            raise InvalidArgument("q", "a (B, H, Dk) array", qn.shape)
        per_row_reply = qn.shape[1] * k * 12 + (self._dim(table) * 4 if return_values else 0)
        n = math.isqrt(max(self._info(table)["rows"] - 1, 0)) + 1  # keys per half, at most
        pairs = qn.shape[1] * max(k, min(k, n) ** 2)
        step = self._chunk_rows(table, qn[0].size * 4, per_row_reply, pairs)
        parts = []
        for s in range(0, max(len(qn), 1), step):
            request = pb.QueryRequest(table=table, k=k, return_values=return_values)
            _encode_float(qn[s : s + step], request.q)
            parts.append(self._call("Query", request, read=True))
        return QueryResult(
            _like(q, np.concatenate([decode("indices", p.indices, True, INTS, 3) for p in parts])),
            _like(q, np.concatenate([decode("scores", p.scores, True, FLOATS, 3) for p in parts])),
            _like(q, np.concatenate([decode("values", p.values, True, FLOATS, 2) for p in parts]))
            if return_values
            else None,
            Seen.joined([Seen.of(p.seen) for p in parts]),
        )

    # ---- writes (never retried) -------------------------------------------------------
    def apply_gradients(
        self,
        table: str,
        idx,
        w,
        dy,
        step: int,
        push_id: int = 0,
        lr: float | None = None,
        *,
        with_seen: bool = False,
        rows=None,
        top_t: int | None = None,
        background: str | None = None,
        doc_ids=None,
    ):
        """Push the row gradients of dy (B, dim) for (step, push_id); returns dw (B, M).
        One message: a push larger than the limit is refused, never split (each part
        would count as a push). ``rows``, ``top_t``, ``background``: a sparse push on a
        table whose pushes apply its steps; ``doc_ids`` (B,): the document of each bag,
        for the row statistics (``Table.backward``)."""
        request = pb.ApplyGradientsRequest(table=table, step=step, push_id=push_id)
        encode(_as_numpy("idx", idx), request.idx)
        _encode_float(_as_numpy("w", w), request.w)
        _encode_float(_as_numpy("dy", dy), request.dy)
        if lr is not None:
            request.lr = lr
        _set_budget(request, rows, top_t, background)
        if doc_ids is not None:
            docs = _as_numpy("doc_ids", doc_ids)
            if docs.dtype.kind not in "iu":
                raise InvalidArgument("doc_ids", "an integer array, one id per bag", docs.dtype)
            encode(docs.astype(np.int64, copy=False), request.doc_ids)
        if request.ByteSize() > self.max_message_bytes:
            raise InvalidArgument(
                "dy",
                f"a push under {self.max_message_bytes} bytes (pushes "
                "are not split; push smaller batches)",
                request.ByteSize(),
            )
        reply = self._call("ApplyGradients", request, read=False)
        dw = _like(idx, decode("dw", reply.dw, reply.HasField("dw"), FLOATS, 2))
        return (dw, Seen.of(reply.seen)) if with_seen else dw

    def step(
        self,
        table: str,
        step: int,
        pushes_per_step: int | None = None,
        lr: float | None = None,
        *,
        rows=None,
        top_t: int | None = None,
        background: str | None = None,
    ) -> int:
        """Apply step ``step``; returns the rows updated. ``rows`` (row ids), or
        ``top_t`` (with a ``background`` snapshot's name, or the counts so far): a
        sparse step, as ``Table.step``."""
        request = pb.StepRequest(table=table, step=step)
        if pushes_per_step is not None:
            request.pushes_per_step = pushes_per_step
        if lr is not None:
            request.lr = lr
        _set_budget(request, rows, top_t, background)
        return self._call("Step", request, read=False).rows_updated

    def publish_keys(self, table: str, keys) -> int:
        """Publish product keys (H, 2, n, Dk/2); returns the step the table is at."""
        request = pb.PublishKeysRequest(table=table)
        _encode_float(_as_numpy("keys", keys), request.keys)
        return self._call("PublishKeys", request, read=False).seen.step

    def save(self, table: str, path: str) -> str:
        """Checkpoint to ``path`` under the server's save directory; returns it."""
        return self._call("Save", pb.SaveRequest(table=table, path=path), read=False).path


def _set_budget(request, rows, top_t, background) -> None:
    """The row budget of a Step or ApplyGradients request (the server checks it)."""
    if rows is not None:
        r = _as_numpy("rows", rows)
        if r.dtype.kind not in "iu" or r.ndim != 1:
            raise InvalidArgument("rows", "a 1-d integer array of row ids", f"{r.dtype} {r.shape}")
        encode(r.astype(np.int64, copy=False), request.rows)
    if top_t is not None:
        if isinstance(top_t, bool) or not isinstance(top_t, int) or not 1 <= top_t < 1 << 31:
            raise InvalidArgument("top_t", "an int in [1, 2**31)", top_t)
        request.top_t = top_t
    if background is not None:
        if not isinstance(background, str) or not background:
            raise InvalidArgument("background", "a snapshot's name", background)
        request.background = background


def _encode_float(a: np.ndarray, out) -> None:
    """float32 on the wire unless the array is float64 or float16 (sent as is)."""
    if a.dtype == np.float64 or a.dtype == np.float16:
        encode(a, out)
    elif a.dtype.kind == "f" or a.dtype.kind in "iu":
        encode(a.astype(np.float32, copy=False), out)
    else:
        raise InvalidArgument("tensor", "a floating-point array", a.dtype)


def _shard_dict(s) -> dict:
    return {
        "block": s.block,
        "rows": s.rows,
        "cols": s.cols,
        "bytes": s.bytes,
        "last_step": s.last_step,
        "pending_steps": list(s.pending_steps),
        **dict(s.counters),
    }
