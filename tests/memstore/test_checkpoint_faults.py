"""kill -9 during saves, at seeded random points: of the saving driver (a forked child
process saving in a loop) and of a shard of a real Ray table. After every kill the
newest committed checkpoint is whole and holds exactly the state of its step; a save
that was cut short is never loaded."""

import os
import random
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
CONFIG = {
    "name": "faults",
    "rows": ROWS,
    "dim": DIM,
    "dtype": "float32",
    "optimizer": {"kind": "adam", "lr": 0.05},
    "seed": SEED,
}


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
                "spec": BlockSpec(ROWS, DIM, r0, r1, 0, DIM),
                "values": sd["values"][r0:r1],
                "state": {k: v[r0:r1] for k, v in sd["state"].items()},
            }
            entries.append(ck.write_block(staging, f"{i}-0", part))
        ck.commit(path, CONFIG, entries, step, staging=staging)


def test_driver_killed_at_random_points_of_saves(tmp_path):
    rng = random.Random(SEED)
    expected = ReferenceValues()
    stats = {"kills": 0, "cut_saves": 0, "committed": 0}
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
        time.sleep(rng.uniform(0.2, 0.8))  # seeded: through several saves
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        stats["kills"] += 1
        latest = assert_whole(root, expected)
        committed = len(ck.checkpoints(root))
        stats["committed"] += committed
        # A save in flight when the driver died leaves a staging directory, never a step.
        staged = [n for n in os.listdir(root) if ".staging-" in n]
        stats["cut_saves"] += len(staged)
        assert len(staged) <= 1
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
    stats = {"kills": 0, "saves_failed": 0, "saves_committed": 0}
    step = 0
    for _ in range(SHARD_KILLS):
        step += 1
        train_step(t, step)
        block = rng.choice(sorted(t.shards))
        pid = ray.get(t.shards[block].info.remote())["pid"]
        staged_before = set(os.listdir(tmp_path))
        outcome = []
        saver = threading.Thread(target=_record, args=(outcome, t.save))
        saver.start()
        # From the moment the save is staged, a seeded delay into the shards' writes.
        while saver.is_alive() and not [
            n for n in os.listdir(tmp_path) if ".staging-" in n and n not in staged_before
        ]:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.15))
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
        values = t.gather(torch.arange(SHARD_ROWS)).float()
        torch.testing.assert_close(values, expected[restored], rtol=0, atol=0)
        step = restored
    assert stats["kills"] == SHARD_KILLS
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
