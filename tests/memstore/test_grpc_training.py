"""A second job while training: the facts trainer (tiny config, one Ray worker) trains
in a subprocess driver, and another process that is no Ray driver (it cannot import
Ray or torch) reads the live table over gRPC. Every read that saw whole steps equals,
block by block, the store checkpoint the trainer wrote at that step."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import memstore
import memstore.server as ms
from memstore import checkpoint
from memstore.grid import ShardGrid
from tests.local_ray import local_ray

from .grpc_util import READER, TOKENS

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 8

READER_JOB = textwrap.dedent("""
    import builtins, json, sys, time
    real_import = builtins.__import__
    def no_ray(name, *args, **kwargs):  # this job is not a Ray driver, and has no torch
        if name.split(".")[0] in ("ray", "torch"):
            raise ImportError(f"{name} is not available to this job")
        return real_import(name, *args, **kwargs)
    builtins.__import__ = no_ray
    import numpy as np
    from memstore.client import MemoryClient
    address, token, prefix, steps, out = sys.argv[1:]
    reads = []
    with MemoryClient(address, token=token, read_retries=8) as c:
        deadline = time.monotonic() + 120
        names = []
        while not names and time.monotonic() < deadline:
            names = [t["name"] for t in c.tables() if t["name"].startswith(prefix)]
        name = sorted(names)[0]
        rows = c.describe(name)["rows"]
        while time.monotonic() < deadline:
            values, seen = c.gather(name, np.arange(rows), with_seen=True)
            reads.append({"values": values.tolist(), "steps": seen.shard_steps,
                          "consistent": seen.consistent})
            if seen.step >= int(steps):
                break
            time.sleep(0.05)  # leave the cores to the trainer
    json.dump({"table": name, "reads": reads}, open(out, "w"))
""")


@pytest.fixture(scope="module")
def ray_for_train():
    """The module's Ray instance. Ray Train's controller takes a worker's report (which
    blocks until the previous one is taken) once per health check, 2 s by default: a
    checkpoint every step would spend most of the test waiting for it."""
    with local_ray(num_cpus=16, env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}) as ray:
        yield ray


@pytest.mark.timeout(300)
def test_a_reader_job_queries_the_live_table_while_training(ray_for_train, tmp_path):
    gcs = ray_for_train.get_runtime_context().gcs_address
    server = ms.start(ms.ServerOptions(address="127.0.0.1:0", tokens=TOKENS))
    env = {
        **os.environ,
        "RAY_ADDRESS": gcs,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PYTHONPATH": str(REPO),
    }
    run_dir = tmp_path / "run"
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memstore.trainer.train",
            "--config",
            str(REPO / "memstore/trainer/configs/tiny.yaml"),
            "--set",
            f"steps={STEPS}",
            "--set",
            "workers=1",
            "--set",
            "checkpoint_every=1",
            "--set",
            "eval_every=0",
            "--set",
            "store.name=live",
            "--set",
            "store.keep=true",
            "--set",
            "progress=false",
            "--set",
            f"run_dir={run_dir}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    (tmp_path / "reader.py").write_text(READER_JOB)
    reader = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "reader.py"),
            server.address,
            READER,
            "live-",
            str(STEPS),
            str(tmp_path / "reads.json"),
        ],
        cwd=REPO,
        env={k: v for k, v in env.items() if k != "RAY_ADDRESS"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    out, _ = trainer.communicate(timeout=240)
    table_name = None
    try:
        assert trainer.returncode == 0, out[-3000:]
        assert reader.returncode == 0, reader.stderr[-3000:]
        result = json.loads((tmp_path / "reads.json").read_text())
        table_name = result["table"]
        _check_reads(result, run_dir)
    finally:
        server.stop()
        for name in [table_name] if table_name else []:
            memstore.drop_table(name)


def _check_reads(result: dict, run_dir: pathlib.Path) -> None:
    table = memstore.connect(result["table"])
    grid = ShardGrid.from_dict(table.config["grid"])
    root = run_dir / "store" / result["table"].removeprefix("live-")
    whole = [r for r in result["reads"] if r["consistent"]]
    # The reader ran while the trainer stepped: it saw the table at several steps.
    assert len({min(r["steps"].values()) for r in whole}) >= 2
    assert whole and result["reads"][-1]["steps"] == {f"{r}-{c}": STEPS for r, c in grid.blocks()}
    for read in whole:
        values = np.array(read["values"], np.float32)
        for r, c in grid.blocks():
            spec = grid.block(r, c)
            step = read["steps"][f"{r}-{c}"]
            saved = checkpoint.load_block(checkpoint.checkpoint_dir(str(root), step), spec)
            np.testing.assert_array_equal(
                values[spec.row_start : spec.row_stop, spec.col_start : spec.col_stop],
                saved["values"].float().numpy(),
            )
