"""A shard's metrics through ``ray.util.metrics``, exported by Ray's Prometheus endpoint.

Every series carries the table name and the block ("r-c"). Outside a Ray worker (the
plain class in tests) the metrics are not created and recording does nothing.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Call latency buckets, seconds: a one-token lookup to a large push on a busy node.
LATENCY_BOUNDARIES = [0.0005, 0.002, 0.01, 0.05, 0.2, 1.0, 5.0]
COUNTERS = {
    "memstore_lookups_total": "lookup calls answered",
    "memstore_rows_read_total": "rows read by lookups and pushes (one per slot)",
    "memstore_rows_updated_total": "rows the optimizer updated",
    "memstore_bytes_in_total": "array bytes received by data calls",
    "memstore_bytes_out_total": "array bytes sent back by data calls",
    "memstore_replayed_pushes_total": "repeated pushes answered from remembered replies",
}
GAUGES = {
    "memstore_pending_steps": "steps with gradients pending",
    "memstore_staleness_steps": "steps the last async push was behind the newest",
    "memstore_checkpoint_seconds": "seconds the last checkpoint of the block took",
}


class ShardMetrics:
    def __init__(self, table: str, block: str):
        self.tags = {"table": table, "block": block}
        self.series: dict = {}
        try:
            import ray
            from ray.util.metrics import Counter, Gauge, Histogram

            if not ray.is_initialized():
                return
            keys = ("table", "block")
            for name, text in COUNTERS.items():
                self.series[name] = Counter(name, description=text, tag_keys=keys)
            for name, text in GAUGES.items():
                self.series[name] = Gauge(name, description=text, tag_keys=keys)
            self.series["memstore_call_seconds"] = Histogram(
                "memstore_call_seconds",
                description="data call latency in the shard",
                boundaries=LATENCY_BOUNDARIES,
                tag_keys=(*keys, "op"),
            )
        except Exception:  # noqa: BLE001 - metrics are never worth failing a shard for
            log.warning("shard metrics unavailable", exc_info=True)
            self.series = {}

    def add(self, name: str, value: float) -> None:
        if name in self.series and value > 0:
            self.series[name].inc(value, tags=self.tags)

    def set(self, name: str, value: float) -> None:
        if name in self.series:
            self.series[name].set(value, tags=self.tags)

    def call(self, op: str, seconds: float, bytes_in: int, bytes_out: int) -> None:
        if "memstore_call_seconds" in self.series:
            self.series["memstore_call_seconds"].observe(seconds, tags={**self.tags, "op": op})
        self.add("memstore_bytes_in_total", bytes_in)
        self.add("memstore_bytes_out_total", bytes_out)
