"""Checkpoints on shared storage through pyarrow.fs, against a real S3-compatible server
(moto_server, started here on 127.0.0.1) and a real local Ray instance.

Two shards save to s3:// and another driver loads the checkpoint into three, equal to
the saved table; of 8 concurrent saves to one path exactly one commits, since the
manifest's PUT is create-only on the server; a filesystem without create-only writes is
refused for saving; a shard killed mid-save leaves no loadable checkpoint; hostile URIs
are refused; relative paths resolve on the driver.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import memstore
from memstore import SGD, Adam, CheckpointError, InvalidArgument, ShardTable
from memstore import checkpoint as ck
from memstore.shard_table import BlockSpec
from memstore.table import table_exists
from tests.local_ray import local_ray
from tests.s3_server import CREDENTIALS, moto_s3

ROWS, DIM, SEED = 600, 24, 3
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKET = "memstore-ck"
SECRET = "operator-secret-of-the-storage-tests-0123456789"
ENV = {**CREDENTIALS, ck.SECRET_ENV: SECRET}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback with one bucket; yields a URI maker for it."""
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # before Ray starts: its workers inherit them
    try:
        with moto_s3(BUCKET) as server:
            yield server.uri
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def ray_s3(s3):
    """The module's Ray instance, started after the S3 credentials are in the environment."""
    with local_ray(num_cpus=16, runtime_env={"env_vars": CREDENTIALS}) as ray:
        yield ray


def batch(step, B=16, M=4):
    g = torch.Generator().manual_seed(step)
    return (
        torch.randint(0, ROWS, (B, M), generator=g),
        torch.rand(B, M, generator=g),
        torch.randn(B, DIM, generator=g),
    )


def train(t, steps, first=1):
    for step in range(first, first + steps):
        idx, w, dy = batch(step)
        t.backward(idx, w, dy, step=step)
        t.step(step)


def reference(steps, optimizer) -> ShardTable:
    """The same training on one in-process table: the values a checkpoint must hold."""
    t = ShardTable(ROWS, DIM, optimizer=optimizer, seed=SEED)
    train(t, steps)
    return t


def test_library_round_trip_and_hostile_uri_on_s3(s3, tmp_path):
    """begin/write_block/commit/load_block on S3; blocks sit in the save's data-<hex>/."""
    whole = reference(2, Adam(lr=0.1))
    path = ck.checkpoint_dir(s3("lib"), 2)
    staging = ck.begin(path)
    assert staging.startswith(f"s3://{BUCKET}/lib/step-000000002/data-")
    sd = whole.state_dict()
    entries = []
    for bid, (r0, r1) in {"0-0": (0, 250), "1-0": (250, ROWS)}.items():
        part = {
            **sd,
            "row_stats": None,  # the whole table's row statistics are not the block's
            "spec": BlockSpec(ROWS, DIM, r0, r1, 0, DIM),
            "values": sd["values"][r0:r1],
            "state": {k: v[r0:r1] for k, v in sd["state"].items()},
        }
        entries.append(ck.write_block(staging, bid, part))
    assert ck.latest_checkpoint(s3("lib")) is None  # blocks without a manifest: nothing
    manifest = ck.commit(
        path,
        {"rows": ROWS, "dim": DIM, "dtype": "float32", "optimizer": whole.optimizer},
        entries,
        2,
        staging=staging,
    )
    assert all(
        e["file"].startswith(staging.rpartition("/")[2].split("?")[0] + "/")
        for e in manifest["blocks"]
    )
    assert ck.latest_checkpoint(s3("lib")) == path
    got = ck.load_block(path, BlockSpec(ROWS, DIM, 100, 400, 0, DIM))
    torch.testing.assert_close(got["values"], whole.values[100:400], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="already committed"):
        ck.begin(path)
    with pytest.raises(InvalidArgument, match="expected a local path"):
        ck.begin("nosuchfs://bucket/x")
    assert not [p for p in tmp_path.parent.rglob("s3:*")]


def test_of_8_concurrent_saves_to_one_s3_path_exactly_one_commits(s3):
    """All 8 saves stage their blocks before any commits: only the create-only manifest
    write decides, and the 7 that lose it raise and leave nothing behind."""
    path = ck.checkpoint_dir(s3("race"), 1)
    tables = [reference(1, Adam(lr=0.01 * (i + 1))) for i in range(8)]
    staged = threading.Barrier(len(tables))

    def save(t):
        staging = ck.begin(path)
        entry = ck.write_block(staging, "0-0", t.state_dict())
        staged.wait(timeout=120)
        cfg = {"name": "race", "rows": ROWS, "dim": DIM, "dtype": "float32"}
        return ck.commit(path, {**cfg, "optimizer": t.optimizer}, [entry], 1, staging=staging)

    outcomes = [None] * len(tables)

    def run(i):
        try:
            outcomes[i] = save(tables[i])
        except CheckpointError as e:
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tables))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    winners = [i for i, o in enumerate(outcomes) if isinstance(o, dict)]
    losers = [o for o in outcomes if isinstance(o, CheckpointError)]
    assert len(winners) == 1 and len(losers) == 7, outcomes
    assert all("another save committed it first" in e.reason for e in losers)
    (winner,) = winners
    got = ck.load_block(path, BlockSpec.whole(ROWS, DIM))
    torch.testing.assert_close(got["values"], tables[winner].values, rtol=0, atol=0)
    assert ck.read_manifest(path) == outcomes[winner]
    import pyarrow.fs as pafs

    fs, prefix = pafs.FileSystem.from_uri(path)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(prefix))}
    data_dirs = [n for n in names if n.startswith("data-")]
    assert names == {"manifest.json", *data_dirs} and len(data_dirs) == 1  # losers cleaned


def test_the_manifest_put_is_create_only_on_the_server(s3):
    """moto honours If-None-Match: a second create-only PUT of an existing manifest is
    refused by the server itself (no check of ours runs before it)."""
    whole = reference(1, Adam(lr=0.1))
    path = ck.checkpoint_dir(s3("put-once"), 1)
    cfg = {"name": "p", "rows": ROWS, "dim": DIM, "dtype": "float32", "optimizer": whole.optimizer}
    first = ck.begin(path)
    entry = ck.write_block(first, "0-0", whole.state_dict())
    committed = ck.commit(path, cfg, [entry], 1, staging=first)
    with pytest.raises(CheckpointError, match="another save committed it first"):
        ck._commit_object_store(path, b"{}")
    assert ck.read_manifest(path) == committed


def test_saving_to_a_filesystem_without_create_only_writes_is_refused():
    with pytest.raises(CheckpointError, match="mock filesystem is not supported"):
        ck.begin("mock:///bucket/step-000000001")


def test_two_shards_save_to_s3_and_another_driver_loads_into_three(ray_s3, s3, tmp_path):
    name = "s3-save"
    t = memstore.create_table(
        name,
        ROWS,
        DIM,
        shards=2,
        optimizer=Adam(lr=0.05),
        seed=SEED,
        timeout_s=120,
        data_channel="ray",
    )
    try:
        train(t, 3)
        path = t.save(ck.checkpoint_dir(s3("tables/a"), 3))
        assert ck.read_manifest(path)["grid"]["row_bounds"] == [0, ROWS // 2, ROWS]
    finally:
        memstore.drop_table(name)
    out = tmp_path / "loaded.pt"
    driver = (
        "import sys, torch, memstore\n"
        "t = memstore.load_table(sys.argv[1], 'from-s3', shards=3, timeout_s=120,\n"
        "                        data_channel='ray', checkpoint_secret=sys.argv[3])\n"
        "try:\n"
        "    assert len(t.shards) == 3, t.shards\n"
        f"    torch.save({{'values': t.gather(torch.arange({ROWS})).float(), "
        "'step': t.last_step}, sys.argv[2])\n"
        "finally:\n"
        "    memstore.drop_table('from-s3')\n"
    )
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_s3.get_runtime_context().gcs_address,
        "PYTHONPATH": REPO,
    }
    # Another job with none of this driver's secrets: it names the operator's secret.
    env.pop(ck.SECRET_ENV)
    env[ck.KEY_FILE_ENV] = str(tmp_path / "no-key-yet")
    with pytest.raises(CheckpointError, match="not authenticated"):
        memstore.load_table(path, "wrong-secret", checkpoint_secret="z" * 40)
    assert not table_exists("wrong-secret")
    subprocess.run(
        [sys.executable, "-c", driver, path, str(out), SECRET], env=env, check=True, timeout=300
    )
    loaded = torch.load(out, weights_only=True)
    assert loaded["step"] == 3
    torch.testing.assert_close(
        loaded["values"], reference(3, Adam(lr=0.05)).values, rtol=1e-6, atol=1e-6
    )


def _slow_saver_class():
    """A shard whose block 1-0 announces its save and then stalls before writing."""
    from memstore._internal.shard_actor import ShardWorker

    class SlowSave(ShardWorker):
        def save(self, path, *args, **kwargs):
            if self.block_id == "1-0" and self.table.last_step >= 2:
                ck._write_file(ck.join(path, "stalled"), b"")
                time.sleep(300)
            return super().save(path, *args, **kwargs)

    return SlowSave


def test_a_shard_killed_mid_save_on_s3_leaves_no_loadable_checkpoint(ray_s3, s3):
    import pyarrow.fs as pafs

    root = s3("tables/crash")
    name = "s3-crash"
    t = memstore.create_table(
        name,
        ROWS,
        DIM,
        shards=2,
        optimizer=SGD(lr=0.5),
        seed=SEED,
        checkpoint_root=root,
        max_restarts=1,
        timeout_s=60,
        worker_cls=_slow_saver_class(),
        data_channel="ray",
    )
    try:
        train(t, 1)
        first = t.save()
        train(t, 1, first=2)
        import ray

        # Asked now: an actor runs one call at a time, and the stalled save holds it.
        pid = ray.get(t.shards[(1, 0)].info.remote())["pid"]
        errors = []
        saver = threading.Thread(target=lambda: _record(errors, t.save))
        saver.start()
        fs, prefix = pafs.FileSystem.from_uri(ck.checkpoint_dir(root, 2))

        def files():
            return {
                i.base_name
                for i in fs.get_file_info(
                    pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
                )
            }

        deadline = time.monotonic() + 60
        while not {"stalled", "block-0-0.pt"} <= files():
            assert time.monotonic() < deadline and saver.is_alive(), errors
            time.sleep(0.05)
        # Half-written on S3: one block uploaded, the other shard stalled, no manifest.
        assert "manifest.json" not in files()
        assert ck.latest_checkpoint(root) == first
        os.kill(pid, signal.SIGKILL)
        saver.join(timeout=120)
        assert not saver.is_alive() and len(errors) == 1 and isinstance(errors[0], Exception)
        assert "manifest.json" not in files() and "block-0-0.pt" not in files()  # aborted
        with pytest.raises(CheckpointError, match="no manifest.json"):
            ck.read_manifest(ck.checkpoint_dir(root, 2))
        assert ck.latest_checkpoint(root) == first
        # The restarted shard came back from the committed step 1, not the half save.
        info = _wait_restarted(ray, t.shards[(1, 0)])
        assert (info["restored_step"], info["restored_path"]) == (1, first)
        got = ck.load_block(ck.latest_checkpoint(root), BlockSpec.whole(ROWS, DIM))
        torch.testing.assert_close(
            got["values"], reference(1, SGD(lr=0.5)).values, rtol=1e-6, atol=1e-6
        )
    finally:
        memstore.drop_table(name)


def _record(errors, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        errors.append(e)


def _wait_restarted(ray, actor):
    deadline = time.monotonic() + 60
    while True:
        try:
            return ray.get(actor.info.remote(), timeout=30)
        except ray.exceptions.ActorUnavailableError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_relative_paths_resolve_on_the_driver(ray_s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = memstore.create_table(
        "rel-save",
        ROWS,
        DIM,
        shards=2,
        seed=SEED,
        timeout_s=120,
        checkpoint_root="ckroot",
        data_channel="ray",
    )
    try:
        assert t.config["checkpoint_root"] == str(tmp_path / "ckroot")
        train(t, 1)
        assert t.save("here/ck") == str(tmp_path / "here" / "ck")
        assert ck.read_manifest(tmp_path / "here" / "ck")["step"] == 1
        assert t.save() == ck.checkpoint_dir(tmp_path / "ckroot", 1)
        with pytest.raises(InvalidArgument, match="path: expected a local path"):
            t.save("weird://bucket/x")
    finally:
        memstore.drop_table("rel-save")
    with pytest.raises(InvalidArgument, match="checkpoint_root: expected a local path"):
        memstore.create_table("bad-root", ROWS, DIM, checkpoint_root="nosuch://b/x")
    assert not [p for p in tmp_path.rglob("*") if ":" in p.name]
