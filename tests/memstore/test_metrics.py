"""Shard metrics through Ray's Prometheus endpoint: a table's calls, scraped by value.

This module starts its own Ray instance with a metrics export port (and a 1 s report
interval), then scrapes ``http://127.0.0.1:PORT/metrics`` as Prometheus would."""

import re
import socket
import time
import urllib.request

import pytest
import torch

import memstore
from tests.local_ray import local_ray

ROWS, DIM, B, M = 400, 128, 6, 5


@pytest.fixture(scope="module")
def metrics_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with local_ray(
        num_cpus=4,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 1000},
    ):
        yield port


def _series(port: int, table: str) -> dict:
    """{(metric, block, op or ""): value} of the table's memstore series."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"ray_(memstore_\w+)\{(.*)\} (\S+)$", line)
        if not m or f'table="{table}"' not in m.group(2):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        out[(m.group(1), labels.get("block"), labels.get("op", labels.get("le", "")))] = float(
            m.group(3)
        )
    return out


def test_shards_export_their_calls_as_prometheus_metrics(metrics_port, tmp_path):
    name = "metered"
    t = memstore.create_table(name, ROWS, DIM, shards=(1, 2), seed=1, timeout_s=120)
    try:
        g = torch.Generator().manual_seed(0)
        idx, w = torch.randint(0, ROWS, (B, M), generator=g), torch.rand(B, M, generator=g)
        dy = torch.randn(B, DIM, generator=g)
        for _ in range(2):
            t.lookup(idx, w)
        t.backward(idx, w, dy, step=1)
        updated = t.step(1)
        t.save(tmp_path / "ckpt")
        want = {("memstore_lookups_total", block, ""): 2.0 for block in ("0-0", "0-1")}
        want.update(
            {("memstore_rows_read_total", block, ""): 3.0 * B * M for block in ("0-0", "0-1")}
        )
        deadline = time.monotonic() + 60
        while True:  # exported every second; wait for the values of these calls
            got = _series(metrics_port, name)
            if all(got.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert {k: got.get(k) for k in want} == want
        assert sum(got[("memstore_rows_updated_total", b, "")] for b in ("0-0", "0-1")) == updated
        # per block and lookup: idx, w (int32 + float32 per slot) and offsets in, y out
        lookups_in = 2 * (B * M * 8 + (B + 1) * 8)
        assert got[("memstore_bytes_out_total", "0-0", "")] == 2 * B * 64 * 4 + B * M * 4
        assert got[("memstore_bytes_in_total", "0-0", "")] >= lookups_in + B * 64 * 4
        assert got[("memstore_pending_steps", "0-1", "")] == 0
        assert got[("memstore_checkpoint_seconds", "0-0", "")] > 0
        assert got[("memstore_call_seconds_count", "0-0", "lookup")] == 2
        assert got[("memstore_call_seconds_count", "0-1", "backward")] == 1
    finally:
        memstore.drop_table(name)
