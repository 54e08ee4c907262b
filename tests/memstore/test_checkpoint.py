import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import memstore
from memstore import CheckpointError, InvalidArgument, ShardTable
from memstore import checkpoint as ck
from memstore.shard_table import BlockSpec

ROWS, DIM = 1000, 70
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GRIDS = {  # uneven bounds on purpose
    "1x1": ([0, ROWS], [0, DIM]),
    "2x2": ([0, 377, ROWS], [0, 33, DIM]),
    "4x1": ([0, 250, 501, 999, ROWS], [0, DIM]),
    "3x2": ([0, 100, 700, ROWS], [0, 50, DIM]),
    "6x1": ([0, 1, 200, 400, 600, 800, ROWS], [0, DIM]),
}


def specs(grid):
    rb, cb = GRIDS[grid] if isinstance(grid, str) else grid
    return {f"r{i}c{j}": BlockSpec(ROWS, DIM, r0, r1, c0, c1)
            for i, (r0, r1) in enumerate(zip(rb, rb[1:]))
            for j, (c0, c1) in enumerate(zip(cb, cb[1:]))}


def batch(seed, B=32, M=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, ROWS, (B, M), generator=g), torch.rand(B, M, generator=g),
            torch.randn(B, DIM, generator=g))


def trained(optimizer=None, dtype="float32", steps=2):
    t = ShardTable(ROWS, DIM, optimizer=optimizer or memstore.Adam(lr=0.05), dtype=dtype, seed=7)
    for step in range(1, steps + 1):
        t.backward(*batch(step), step=step)
        t.step(step)
    return t


def cut(sd, spec):
    """The part of a whole-table state_dict that a block of ``spec`` holds."""
    r, c = slice(spec.row_start, spec.row_stop), slice(spec.col_start, spec.col_stop)
    state = {k: (v[r] if v.dim() == 1 else v[r, c]).clone() for k, v in sd["state"].items()}
    return {**sd, "spec": dataclasses.asdict(spec), "values": sd["values"][r, c].clone(),
            "state": state}


def as_table(like, spec, sd):
    t = ShardTable(ROWS, DIM, optimizer=like.optimizer, dtype=like.dtype_name, seed=99,
                   row_range=(spec.row_start, spec.row_stop),
                   col_range=(spec.col_start, spec.col_stop))
    t.load_state_dict(sd)
    return t


def config(t, **extra):
    return {"name": "mem0", "rows": ROWS, "dim": DIM, "dtype": t.dtype_name,
            "optimizer": t.optimizer.to_dict(), "seed": 7, **extra}


def save_grid(path, whole, grid, step=2):
    """Cut ``whole`` into real ShardTable blocks of ``grid`` and checkpoint them."""
    sd = whole.state_dict()
    entries = [ck.write_block(path, bid, as_table(whole, s, cut(sd, s)).state_dict())
               for bid, s in specs(grid).items()]
    return ck.commit(path, config(whole), entries, step)


def assert_same(sd, expected):
    assert sd["values"].dtype == expected["values"].dtype
    assert torch.equal(sd["values"], expected["values"])
    assert sd["state"].keys() == expected["state"].keys()
    for k in sd["state"]:
        assert torch.equal(sd["state"][k], expected["state"][k]), k
    assert (sd["last_step"], sd["updates"]) == (expected["last_step"], expected["updates"])


@pytest.mark.parametrize("stored", ["2x2", "4x1"])
@pytest.mark.parametrize("target", ["1x1", "3x2", "6x1"])
def test_any_grid_loads_any_grid_exactly(tmp_path, stored, target):
    whole = trained()
    manifest = save_grid(tmp_path / "ck", whole, stored)
    assert manifest["grid"] == {"row_bounds": GRIDS[stored][0], "col_bounds": GRIDS[stored][1]}
    sd = whole.state_dict()
    for s in specs(target).values():
        got = ck.load_block(tmp_path / "ck", s)
        assert_same(got, cut(sd, s))
        as_table(whole, s, got)  # accepted by load_state_dict of a block of that spec


def test_manifest_contents(tmp_path):
    whole = trained()
    save_grid(tmp_path, whole, "2x2", step=2)
    m = ck.read_manifest(tmp_path)
    assert (m["format"], m["version"], m["step"], m["last_step"], m["updates"]) == (
        "memstore-checkpoint", 1, 2, 2, 2)
    assert m["table"]["name"] == "mem0" and m["table"]["seed"] == 7
    assert m["table"]["optimizer"] == {"kind": "adam", "lr": 0.05, "betas": [0.9, 0.999],
                                       "eps": 1e-8}
    assert sorted(e["file"] for e in m["blocks"]) == [f"block-r{i}c{j}.pt" for i in (0, 1)
                                                     for j in (0, 1)]
    for e in m["blocks"]:
        assert len(e["sha256"]) == 64
        assert e["bytes"] == os.path.getsize(tmp_path / e["file"])
    assert json.loads((tmp_path / "manifest.json").read_text()) == m
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp files left


def route(spec, idx, w, dy):
    """The (token, slot) pairs a block owns, one per row of a sub-batch, as a shard gets them."""
    mine = (idx >= spec.row_start) & (idx < spec.row_stop)
    tok = mine.nonzero()[:, 0]
    return idx[mine][:, None], w[mine][:, None], dy[tok, spec.col_start:spec.col_stop]


def test_training_continues_identically_after_reload(tmp_path):
    whole = trained()
    save_grid(tmp_path, whole, "2x2")
    reloaded = ShardTable(ROWS, DIM, optimizer=whole.optimizer, seed=1)
    reloaded.load_state_dict(ck.load_block(tmp_path, BlockSpec.whole(ROWS, DIM)))
    blocks = {bid: as_table(whole, s, ck.load_block(tmp_path, s))
              for bid, s in specs("3x2").items()}
    idx, w, dy = batch(3)
    for t in (whole, reloaded):
        t.backward(idx, w, dy, step=3)
        t.step(3)
    for t in blocks.values():
        t.backward(*route(t.spec, idx, w, dy), step=3)
        t.step(3)
    assert reloaded.fingerprint() == whole.fingerprint()
    sd = whole.state_dict()
    for t in blocks.values():
        assert_same(t.state_dict(), cut(sd, t.spec))


def test_partial_checkpoint_is_ignored(tmp_path):
    whole = trained()
    save_grid(ck.checkpoint_dir(tmp_path, 1), whole, "2x2", step=1)
    partial = ck.checkpoint_dir(tmp_path, 2)
    for bid, s in specs("2x2").items():
        ck.write_block(partial, bid, cut(whole.state_dict(), s))
    with pytest.raises(CheckpointError, match="no manifest.json") as e:
        ck.read_manifest(partial)
    assert e.value.path == partial
    assert ck.latest_checkpoint(tmp_path) == ck.checkpoint_dir(tmp_path, 1)
    assert ck.latest_checkpoint(tmp_path / "nowhere") is None
    assert ck.latest_checkpoint(partial) is None  # a root with no step directories


def test_latest_checkpoint_picks_highest_committed_step(tmp_path):
    whole = trained()
    for step in (9, 10, 100):  # 100 sorts before 9 as a string; steps compare as ints
        save_grid(os.path.join(tmp_path, f"step-{step}"), whole, "4x1", step=step)
    (tmp_path / "step-000000200").mkdir()  # empty: a save that died before any block
    (tmp_path / "notes").mkdir()
    assert ck.latest_checkpoint(tmp_path) == os.path.join(tmp_path, "step-100")
    assert ck.checkpoint_dir("r", 123) == os.path.join("r", "step-000000123")


_CRASHING_SAVER = r"""
import os, sys, time
import memstore
from memstore import checkpoint as ck
from memstore.shard_table import BlockSpec

root = sys.argv[1]
t = memstore.ShardTable(300, 16, optimizer=memstore.Adam(lr=0.1), seed=1)
cfg = {"name": "t", "rows": 300, "dim": 16, "dtype": "float32", "optimizer": t.optimizer.to_dict()}

def train(step):
    import torch
    gen = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 300, (8, 4), generator=gen)
    t.backward(idx, torch.rand(8, 4, generator=gen), torch.randn(8, 16, generator=gen), step=step)
    t.step(step)

def write_blocks(step):
    sd, path = t.state_dict(), ck.checkpoint_dir(root, step)
    entries = []
    for i, (r0, r1) in enumerate([(0, 120), (120, 300)]):
        part = {**sd, "spec": BlockSpec(300, 16, r0, r1, 0, 16),
                "values": sd["values"][r0:r1],
                "state": {k: v[r0:r1] for k, v in sd["state"].items()}}
        entries.append(ck.write_block(path, f"r{i}", part))
    return path, entries

train(1)
path, entries = write_blocks(1)
ck.commit(path, cfg, entries, 1)
open(os.path.join(root, "step1.fingerprint"), "w").write(t.fingerprint())
train(2)
path, entries = write_blocks(2)
with open(os.path.join(path, ".manifest.json.tmp-half"), "w") as f:
    f.write('{"format": "memstore-chec')  # a manifest being written, cut short
open(os.path.join(root, "blocks-of-step-2-written"), "w").close()
time.sleep(60)
ck.commit(path, cfg, entries, 2)
"""


def test_save_killed_before_commit_falls_back_to_previous_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_SAVER, str(tmp_path)], env=env,
                            stderr=subprocess.PIPE)
    marker = tmp_path / "blocks-of-step-2-written"
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the saver never reached step 2"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert os.path.isfile(os.path.join(ck.checkpoint_dir(tmp_path, 2), "block-r1.pt"))
    latest = ck.latest_checkpoint(tmp_path)
    assert latest == ck.checkpoint_dir(tmp_path, 1)
    t = ShardTable(300, 16, optimizer=memstore.Adam(lr=0.1), seed=5)
    t.load_state_dict(ck.load_block(latest, t.spec))
    assert t.fingerprint() == (tmp_path / "step1.fingerprint").read_text()
    assert t.last_step == 1


def test_corrupted_block_is_named(tmp_path):
    whole = trained()
    save_grid(tmp_path, whole, "4x1")
    file = tmp_path / "block-r2c0.pt"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"block file block-r2c0\.pt is corrupt"):
        ck.load_block(tmp_path, BlockSpec.whole(ROWS, DIM))
    # Blocks that do not overlap the damaged one still load.
    assert_same(ck.load_block(tmp_path, BlockSpec(ROWS, DIM, 0, 250, 0, DIM)),
                cut(whole.state_dict(), BlockSpec(ROWS, DIM, 0, 250, 0, DIM)))


def test_corrupt_or_unknown_manifest_raises(tmp_path):
    save_grid(tmp_path, trained(steps=1), "1x1", step=1)
    manifest = tmp_path / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**good, "version": 99}))
    with pytest.raises(CheckpointError, match="unknown format version 99"):
        ck.read_manifest(tmp_path)
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(CheckpointError, match="corrupt"):
        ck.read_manifest(tmp_path)
    manifest.write_text(json.dumps({**good, "blocks": good["blocks"] * 2}))
    with pytest.raises(CheckpointError, match="do not tile"):
        ck.read_manifest(tmp_path)


def test_bfloat16_round_trip(tmp_path):
    whole = trained(optimizer=memstore.SGD(lr=0.1), dtype="bfloat16")
    save_grid(tmp_path, whole, "2x2")
    assert ck.read_manifest(tmp_path)["table"]["dtype"] == "bfloat16"
    for s in specs("3x2").values():
        got = ck.load_block(tmp_path, s)
        assert got["values"].dtype == torch.bfloat16 and got["state"] == {}
        assert_same(got, cut(whole.state_dict(), s))


def rowwise_column_grid(steps=2):
    """A 1 x 2 column grid trained as shards train it: each block its own accumulators."""
    opt = memstore.RowWiseAdagrad(lr=0.1)
    blocks = {f"r0c{j}": ShardTable(ROWS, DIM, optimizer=opt, seed=7, col_range=c)
              for j, c in enumerate([(0, 33), (33, DIM)])}
    for step in range(1, steps + 1):
        idx, w, dy = batch(step)
        for t in blocks.values():
            t.backward(idx, w, dy[:, t.spec.col_start:t.spec.col_stop], step=step)
            t.step(step)
    return blocks


def test_rowwise_adagrad_round_trip_with_the_same_column_grid(tmp_path):
    blocks = rowwise_column_grid()
    b0, b1 = blocks["r0c0"], blocks["r0c1"]
    assert not torch.equal(b0.state["sum"], b1.state["sum"])  # per (row, column block)
    entries = [ck.write_block(tmp_path, bid, t.state_dict()) for bid, t in blocks.items()]
    ck.commit(tmp_path, config(b0), entries, 2)
    for t in blocks.values():  # same columns, rows re-gridded into 3
        sd = t.state_dict()
        for r0, r1 in [(0, 100), (100, 700), (700, ROWS)]:
            s = BlockSpec(ROWS, DIM, r0, r1, t.spec.col_start, t.spec.col_stop)
            got = ck.load_block(tmp_path, s)
            assert got["state"]["sum"].shape == (r1 - r0,)
            expected = {**sd, "values": sd["values"][r0:r1],
                        "state": {"sum": sd["state"]["sum"][r0:r1]}}
            assert_same(got, expected)


@pytest.mark.parametrize("cols", [(0, DIM), (0, 20), (20, 50)])
def test_rowwise_adagrad_refuses_a_changed_column_grid(tmp_path, cols):
    blocks = rowwise_column_grid(steps=1)
    entries = [ck.write_block(tmp_path, bid, t.state_dict()) for bid, t in blocks.items()]
    ck.commit(tmp_path, config(blocks["r0c0"]), entries, 1)
    with pytest.raises(CheckpointError, match="rowwise_adagrad.*not one stored column block"):
        ck.load_block(tmp_path, BlockSpec(ROWS, DIM, 0, ROWS, *cols))


def test_parallel_writers_and_commit_checks(tmp_path):
    whole = trained(steps=1)
    sd, path = whole.state_dict(), tmp_path / "ck"
    with ThreadPoolExecutor(4) as pool:  # shards write their blocks concurrently
        entries = list(pool.map(lambda item: ck.write_block(path, item[0], cut(sd, item[1])),
                                specs("2x2").items()))
    with pytest.raises(CheckpointError, match="do not tile"):
        ck.commit(path, config(whole), entries[:3], 1)
    with pytest.raises(CheckpointError, match="disagree"):
        ck.commit(path, config(whole), [entries[0], {**entries[1], "updates": 5}, *entries[2:]], 1)
    with pytest.raises(InvalidArgument, match="table_config"):
        ck.commit(path, {"rows": ROWS, "dim": DIM}, entries, 1)
    with pytest.raises(InvalidArgument, match="block_id"):
        ck.write_block(path, "../evil", sd)
    assert not (path / "manifest.json").exists()
    ck.commit(path, config(whole), entries, 1)
    with pytest.raises(CheckpointError, match="already committed"):
        ck.write_block(path, "r0c0", cut(sd, specs("2x2")["r0c0"]))
    with pytest.raises(CheckpointError, match="checkpoint of a 1000 x 70 table"):
        ck.load_block(path, BlockSpec.whole(ROWS, DIM + 1))
