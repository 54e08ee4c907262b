"""kill -9 during saves, at seeded random points: of the saving driver (a forked child
process saving in a loop) and of a shard of a real Ray table. Each kill is proven to land
inside a save: the process is stopped (SIGSTOP) first, and killed only once the files
show a save staged and not committed; otherwise it resumes and the next save is tried.
After every kill the newest committed checkpoint is whole and holds exactly the state
of its step; a save that was cut short is never loaded."""

import os
import random
import re
import signal
import threading
import time
import traceback

import pytest
import torch

import memstore
from memstore import Adam, ShardTable, StoreRolledBack
from memstore import checkpoint as ck
from memstore.shard_table import BlockSpec

ROWS, DIM, SEED = 3000, 64, 11
SHARD_ROWS = 40_000  # 15 MB per shard and save: long enough for kills to land inside
ROW_BOUNDS = (0, 900, 2100, ROWS)  # the saving driver's 3 blocks
DRIVER_KILLS, SHARD_KILLS = 10, 6  # a shard kill costs a process restart (about 2 s)
SECRET = "operator-secret-of-the-fault-tests-0123456789"
CONFIG = {
    "name": "faults",
    "rows": ROWS,
    "dim": DIM,
    "dtype": "float32",
    "optimizer": {"kind": "adam", "lr": 0.05},
    "seed": SEED,
}


@pytest.fixture(autouse=True)
def checkpoint_secret(monkeypatch):
    monkeypatch.setenv(ck.SECRET_ENV, SECRET)  # the forked saver inherits it


def batch(step, rows, B=32, M=4):
    g = torch.Generator().manual_seed(1000 + step)
    return (
        torch.randint(0, rows, (B, M), generator=g),
        torch.rand(B, M, generator=g),
        torch.randn(B, DIM, generator=g),
    )


def train_step(t, step):
    idx, w, dy = batch(step, t.rows)
    t.backward(idx, w, dy, step=step)
    t.step(step)


class ReferenceValues(dict):
    """Values of the table after each step, trained in one in-process table as far as a
    lookup asks: the killed driver's pace depends on the machine's load."""

    def __init__(self, rows: int = ROWS):
        super().__init__()
        self.table = ShardTable(rows, DIM, optimizer=Adam(lr=0.05), seed=SEED)
        self[0] = self.table.values.clone()

    def __missing__(self, step: int) -> torch.Tensor:
        for s in range(max(self) + 1, step + 1):
            train_step(self.table, s)
            self[s] = self.table.values.clone()
        return self[step]


def assert_whole(root, expected: dict[int, torch.Tensor], rows: int = ROWS):
    """The newest committed checkpoint under root loads whole and equals its step's state;
    and the one before it."""
    found = ck.checkpoints(root)  # every committed one has a valid manifest and its files
    for path in found[:2]:  # the newest, and the one a damaged newest falls back to
        manifest = ck.read_manifest(path)
        got = ck.load_block(path, BlockSpec.whole(rows, DIM), manifest)
        assert got["last_step"] == manifest["step"]
        torch.testing.assert_close(got["values"], expected[manifest["step"]], rtol=0, atol=0)
    return found[0] if found else None


def _save_forever(root: str) -> None:
    """The forked driver: train a step, save it as 3 blocks, forever."""
    torch.set_num_threads(1)
    t = ShardTable(ROWS, DIM, optimizer=Adam(lr=0.05), seed=SEED)
    step = 0
    while True:
        step += 1
        train_step(t, step)
        sd, path = t.state_dict(), ck.checkpoint_dir(root, step)
        staging = ck.begin(path)
        entries = []
        for i, (r0, r1) in enumerate(zip(ROW_BOUNDS, ROW_BOUNDS[1:])):
            part = {
                **sd,
                "row_stats": None,  # the whole table's row statistics are not the block's
                "spec": BlockSpec(ROWS, DIM, r0, r1, 0, DIM),
                "values": sd["values"][r0:r1],
                "state": {k: v[r0:r1] for k, v in sd["state"].items()},
            }
            entries.append(ck.write_block(staging, f"{i}-0", part))
        ck.commit(path, CONFIG, entries, step, staging=staging)


def _block_files(folder: str) -> int:
    """Block files complete in ``folder`` (a file is renamed to its name once written);
    -1 when the folder is gone (its save committed: renamed into place)."""
    try:
        return sum(1 for n in os.listdir(folder) if n.startswith("block-") and n.endswith(".pt"))
    except FileNotFoundError:
        return -1


def _staged_step(folder: str) -> int:
    return int(re.match(r"\.step-(\d+)\.staging-", os.path.basename(folder)).group(1))


def _stop_inside_a_save(pid: int, root: str, step: int, blocks: int) -> tuple[str, int]:
    """Stop the saving driver once the staging directory of a save of ``step`` or later
    holds ``blocks`` block files, and make sure that, stopped, the save is still
    uncommitted (one that committed between the look and the stop: resume, wait for the
    next). Returns (staging directory, block files in it), as the kill will leave them."""
    deadline = time.monotonic() + 120  # a hang guard only
    while True:
        assert time.monotonic() < deadline, "no save reached the kill point"
        staged = [
            os.path.join(root, n)
            for n in os.listdir(root)
            if ".staging-" in n and _staged_step(n) >= step
        ]
        if any(_block_files(d) >= blocks for d in staged):
            os.kill(pid, signal.SIGSTOP)
            still = [(d, _block_files(d)) for d in staged if _block_files(d) >= blocks]
            if still:
                return still[0]
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.001)


def test_driver_killed_at_random_points_of_saves(tmp_path):
    rng = random.Random(SEED)
    expected = ReferenceValues()
    stats = {"kills": 0, "committed": [], "blocks_at_kill": []}
    for kill in range(DRIVER_KILLS):
        root = str(tmp_path / f"run{kill}")
        os.makedirs(root)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                _save_forever(root)
            except BaseException:  # noqa: BLE001 - shown on stderr; the parent sees the exit
                traceback.print_exc()
            finally:
                os._exit(1)
        # Seeded: in the save of step 1 to 6 (or the next one, if that one ended first),
        # after 0 to 3 of its 3 blocks (3: its manifest may be written too).
        staging, blocks = _stop_inside_a_save(pid, root, rng.randint(1, 6), rng.randint(0, 3))
        cut_step = _staged_step(staging)
        assert not os.path.exists(ck.checkpoint_dir(root, cut_step))  # stopped before commit
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        stats["kills"] += 1
        stats["blocks_at_kill"].append(blocks)
        # The kill landed inside that save: its staging directory is left as it was,
        # its step never committed, and the step before it is the newest checkpoint.
        assert [os.path.join(root, n) for n in os.listdir(root) if ".staging-" in n] == [staging]
        assert _block_files(staging) == blocks
        assert not os.path.exists(ck.checkpoint_dir(root, cut_step))
        latest = assert_whole(root, expected)
        committed = len(ck.checkpoints(root))
        stats["committed"].append(committed)
        assert committed == cut_step - 1
        steps = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step-"))
        assert steps == list(range(1, committed + 1))
        assert latest == (ck.checkpoint_dir(root, committed) if committed else None)
    assert stats["kills"] == DRIVER_KILLS
    print(f"driver kills: {stats}")


@pytest.mark.usefixtures("ray_start_16_cpus")
def test_shard_killed_at_random_points_of_saves(tmp_path, table_names):
    import ray

    rng = random.Random(SEED + 1)
    expected = ReferenceValues(SHARD_ROWS)
    name = table_names("faults")
    t = memstore.create_table(
        name,
        SHARD_ROWS,
        DIM,
        shards=2,
        optimizer=Adam(lr=0.05),
        seed=SEED,
        checkpoint_root=str(tmp_path),
        max_restarts=SHARD_KILLS + 1,
        timeout_s=60,
        data_channel="ray",
    )
    t.save()  # step 0: a restart always finds a committed checkpoint
    stats = {"kills": 0, "saves_failed": 0, "saves_committed": 0, "missed": 0, "own_block": []}
    step = 0
    while stats["kills"] < SHARD_KILLS:
        assert stats["missed"] < 5 * SHARD_KILLS, stats  # saves that always ended first
        step += 1
        train_step(t, step)
        block = rng.choice(sorted(t.shards))
        pid = ray.get(t.shards[block].info.remote())["pid"]
        staged_before = set(os.listdir(tmp_path))
        outcome = []
        saver = threading.Thread(target=_record, args=(outcome, t.save))
        saver.start()
        # From the moment the save is staged, a seeded delay into the shards' writes.
        staged = []
        while saver.is_alive() and not staged:
            staged = [
                n for n in os.listdir(tmp_path) if ".staging-" in n and n not in staged_before
            ]
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGSTOP)
        # Stopped, the shard can neither write nor answer: if the save's staging
        # directory is still there, uncommitted, the kill lands inside the save.
        staging = tmp_path / staged[0] if staged else None
        if staging is None or not staging.is_dir():
            os.kill(pid, signal.SIGCONT)  # the save ended first: not a kill inside one
            saver.join(timeout=120)
            assert outcome == [None]
            stats["missed"] += 1
            continue
        assert not os.path.exists(ck.checkpoint_dir(tmp_path, step))
        stats["own_block"].append((staging / f"block-{block[0]}-{block[1]}.pt").exists())
        os.kill(pid, signal.SIGKILL)
        stats["kills"] += 1
        saver.join(timeout=120)
        assert not saver.is_alive()
        stats["saves_committed" if outcome[0] is None else "saves_failed"] += 1
        assert not [n for n in os.listdir(tmp_path) if ".staging-" in n]  # aborted or renamed
        latest = assert_whole(str(tmp_path), expected, SHARD_ROWS)
        restored = _recover(ray, t)
        assert latest is not None and restored == ck.read_manifest(latest)["step"]
        if outcome[0] is None:
            assert restored == step  # a save that returned is committed and kept
        else:
            assert not os.path.exists(ck.checkpoint_dir(tmp_path, step))
        values = t.gather(torch.arange(SHARD_ROWS)).float()
        torch.testing.assert_close(values, expected[restored], rtol=0, atol=0)
        step = restored
    print(f"shard kills: {stats}")


def _record(outcome: list, fn) -> None:
    """Append None when ``fn()`` returns, else the exception it raised."""
    try:
        fn()
        outcome.append(None)
    except Exception as e:  # noqa: BLE001 - the test records the outcome
        outcome.append(e)


def _recover(ray, t) -> int:
    """Reach every shard again; the restarted one rolls the table back. Returns the step
    the table stands at."""
    deadline = time.monotonic() + 120
    while True:
        try:
            t.gather(torch.arange(2))
            return t.last_step
        except StoreRolledBack as e:
            return e.step
        except memstore.ShardUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def _plant_unsigned(real: str, step: int) -> str:
    """A copy of the committed checkpoint ``real`` as ``step``, its checksums valid and
    its hmac made with a secret that is not the operator's."""
    import hashlib
    import hmac
    import json
    import shutil

    planted = ck.checkpoint_dir(os.path.dirname(real), step)
    shutil.copytree(real, planted)
    file = os.path.join(planted, "manifest.json")
    with open(file) as f:
        m = json.load(f)
    m["step"] = step
    body = {k: v for k, v in m.items() if k not in ("hmac", "manifest_sha256")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    m["hmac"] = hmac.new(b"not-the-operator", canonical, "sha256").hexdigest()
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    m["manifest_sha256"] = hashlib.sha256(canonical).hexdigest()
    with open(file, "w") as f:
        json.dump(m, f)
    return planted


@pytest.mark.usefixtures("ray_start_16_cpus")
def test_a_restarted_shard_skips_planted_and_hostile_checkpoints(tmp_path, table_names):
    import ray

    rows = 2000
    expected = ReferenceValues(rows)
    name = table_names("planted")
    t = memstore.create_table(
        name,
        rows,
        DIM,
        shards=2,
        optimizer=Adam(lr=0.05),
        seed=SEED,
        checkpoint_root=str(tmp_path),
        max_restarts=2,
        timeout_s=60,
        data_channel="ray",
    )
    # The shards hold the table's key, never the operator's secret.
    assert t.config["checkpoint_key"] == ck.table_key(SECRET, name)
    assert SECRET not in repr(t.config)
    train_step(t, 1)
    train_step(t, 2)
    real = t.save()
    planted = _plant_unsigned(real, 999_999_999)
    hostile = ck.checkpoint_dir(str(tmp_path), 999_999_998)
    os.makedirs(hostile)
    with open(os.path.join(hostile, "manifest.json"), "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)  # 200 KB: a RecursionError for json alone
    with pytest.raises(memstore.CheckpointError, match="not authenticated"):
        ck.read_manifest(planted)
    train_step(t, 3)  # ahead of the checkpoint: the rollback must go back to step 2
    pid = ray.get(t.shards[(1, 0)].info.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    assert _recover(ray, t) == 2
    info = ray.get(t.shards[(1, 0)].info.remote())
    assert (info["restored_step"], info["restored_path"]) == (2, real)
    values = t.gather(torch.arange(rows)).float()
    torch.testing.assert_close(values, expected[2], rtol=0, atol=0)
