"""Checkpoints of ShardTable blocks (memstore.checkpoint), in one process on real files.

Any grid loads any stored grid exactly (values, optimizer state, counters; bfloat16;
row-wise Adagrad only with its column grid) and training after a reload goes on bit for
bit; a save cut before its commit, a partial or a damaged checkpoint is never loaded (the
previous one is); concurrent saves commit one whole checkpoint and the commit re-hashes
every block; hostile, oversized, deeply nested or unsigned manifests are refused before
any block file is opened, and a pickled payload never runs; the operator secret comes
from the argument, the environment or a private key file. The references are the saved
table's own state and sha256 digests and HMAC signatures computed here with hashlib and
hmac, not by the package.
"""

import dataclasses
import hashlib
import hmac
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import memstore
from memstore import CheckpointError, InvalidArgument, ShardTable
from memstore import checkpoint as ck
from memstore.shard_table import BlockSpec

ROWS, DIM = 1000, 70
SECRET = "operator-secret-of-the-checkpoint-tests-0123456789"


@pytest.fixture(autouse=True)
def checkpoint_secret(monkeypatch):
    """Every test signs and verifies with this secret, never the user's key file."""
    monkeypatch.setenv(ck.SECRET_ENV, SECRET)


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
    return {
        f"r{i}c{j}": BlockSpec(ROWS, DIM, r0, r1, c0, c1)
        for i, (r0, r1) in enumerate(zip(rb, rb[1:]))
        for j, (c0, c1) in enumerate(zip(cb, cb[1:]))
    }


def batch(seed, B=32, M=6):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, ROWS, (B, M), generator=g),
        torch.rand(B, M, generator=g),
        torch.randn(B, DIM, generator=g),
    )


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
    return {
        **sd,
        "row_stats": None,  # the whole table's row statistics are not the block's
        "spec": dataclasses.asdict(spec),
        "values": sd["values"][r, c].clone(),
        "state": state,
    }


def as_table(like, spec, sd):
    t = ShardTable(
        ROWS,
        DIM,
        optimizer=like.optimizer,
        dtype=like.dtype_name,
        seed=99,
        row_range=(spec.row_start, spec.row_stop),
        col_range=(spec.col_start, spec.col_stop),
    )
    t.load_state_dict(sd)
    return t


def config(t, **extra):
    return {
        "name": "mem0",
        "rows": ROWS,
        "dim": DIM,
        "dtype": t.dtype_name,
        "optimizer": t.optimizer.to_dict(),
        "seed": 7,
        **extra,
    }


def manifest_sha256(m):
    """The manifest checksum as the format defines it: sha256 of the canonical JSON
    (sorted keys, no spaces) of every field but itself."""
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def manifest_hmac(m, secret=SECRET):
    """The manifest's HMAC as the format defines it, computed here from the definition:
    the table key is HMAC-SHA256(secret, "memstore-checkpoint-key\\0" + table name)
    in hex; the HMAC is HMAC-SHA256(table key, "memstore-checkpoint-manifest\\0" +
    canonical JSON of every field but hmac and manifest_sha256)."""
    name = m["table"].get("name", "")
    key = hmac.new(secret.encode(), b"memstore-checkpoint-key\0" + name.encode(), "sha256")
    body = {k: v for k, v in m.items() if k not in ("hmac", "manifest_sha256")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    message = b"memstore-checkpoint-manifest\0" + canonical
    return hmac.new(key.hexdigest().encode(), message, "sha256").hexdigest()


def write_manifest(file, m, secret=SECRET):
    """Write an edited manifest, signed and checksummed: only the content checks remain."""
    signed = {**m, "hmac": manifest_hmac(m, secret)}
    file.write_text(json.dumps({**signed, "manifest_sha256": manifest_sha256(signed)}))


def save_grid(path, whole, grid, step=2):
    """Cut ``whole`` into real ShardTable blocks of ``grid`` and checkpoint them."""
    sd = whole.state_dict()
    staging = ck.begin(path)
    entries = [
        ck.write_block(staging, bid, as_table(whole, s, cut(sd, s)).state_dict())
        for bid, s in specs(grid).items()
    ]
    return ck.commit(path, config(whole), entries, step, staging=staging)


def save_blocks(path, blocks, cfg, step):
    """Checkpoint ``{block_id: state_dict}`` at ``path`` through a fresh staging directory."""
    staging = ck.begin(path)
    entries = [ck.write_block(staging, bid, sd) for bid, sd in blocks.items()]
    return ck.commit(path, cfg, entries, step, staging=staging)


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
    path = tmp_path / "ck"
    save_grid(path, whole, "2x2", step=2)
    m = ck.read_manifest(path)
    assert (m["format"], m["version"], m["step"], m["last_step"], m["updates"]) == (
        "memstore-checkpoint",
        2,
        2,
        2,
        2,
    )
    assert m["table"]["name"] == "mem0" and m["table"]["seed"] == 7
    assert m["table"]["optimizer"] == {
        "kind": "adam",
        "lr": 0.05,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
    }
    assert sorted(e["file"] for e in m["blocks"]) == [
        f"block-r{i}c{j}.pt" for i in (0, 1) for j in (0, 1)
    ]
    for e in m["blocks"]:
        data = (path / e["file"]).read_bytes()
        assert (e["sha256"], e["bytes"]) == (hashlib.sha256(data).hexdigest(), len(data))
    assert json.loads((path / "manifest.json").read_text()) == m
    assert m["manifest_sha256"] == manifest_sha256(m)
    assert m["hmac"] == manifest_hmac(m)
    assert not [n for n in os.listdir(path) if n.startswith(".")]  # no temp files left
    assert os.listdir(tmp_path) == ["ck"]  # the staging directory became the checkpoint


def route(spec, idx, w, dy):
    """The (token, slot) pairs a block owns, one per row of a sub-batch, as a shard gets them."""
    mine = (idx >= spec.row_start) & (idx < spec.row_stop)
    tok = mine.nonzero()[:, 0]
    return idx[mine][:, None], w[mine][:, None], dy[tok, spec.col_start : spec.col_stop]


def test_training_continues_identically_after_reload(tmp_path):
    whole = trained()
    save_grid(tmp_path, whole, "2x2")
    reloaded = ShardTable(ROWS, DIM, optimizer=whole.optimizer, seed=1)
    reloaded.load_state_dict(ck.load_block(tmp_path, BlockSpec.whole(ROWS, DIM)))
    blocks = {
        bid: as_table(whole, s, ck.load_block(tmp_path, s)) for bid, s in specs("3x2").items()
    }
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
    staging = ck.begin(partial)  # blocks written, never committed
    for bid, s in specs("2x2").items():
        ck.write_block(staging, bid, cut(whole.state_dict(), s))
    os.mkdir(partial)  # even a directory of that name without a manifest is no checkpoint
    with pytest.raises(CheckpointError, match="no manifest.json") as e:
        ck.read_manifest(partial)
    assert e.value.path == partial
    assert ck.latest_checkpoint(tmp_path) == ck.checkpoint_dir(tmp_path, 1)
    assert ck.checkpoints(tmp_path) == [ck.checkpoint_dir(tmp_path, 1)]
    assert ck.latest_checkpoint(tmp_path / "nowhere") is None
    assert ck.latest_checkpoint(partial) is None  # a root with no step directories


def test_latest_checkpoint_picks_highest_committed_step(tmp_path):
    whole = trained()
    for step in (9, 10, 100):  # 100 sorts before 9 as a string; steps compare as ints
        save_grid(os.path.join(tmp_path, f"step-{step}"), whole, "4x1", step=step)
    (tmp_path / "step-000000200").mkdir()  # empty: a save that died before any block
    (tmp_path / "notes").mkdir()
    assert ck.latest_checkpoint(tmp_path) == os.path.join(tmp_path, "step-100")
    assert ck.checkpoint_dir("r", 123) == os.path.join(os.getcwd(), "r", "step-000000123")


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
    staging = ck.begin(path)
    entries = []
    for i, (r0, r1) in enumerate([(0, 120), (120, 300)]):
        part = {**sd, "row_stats": None, "spec": BlockSpec(300, 16, r0, r1, 0, 16),
                "values": sd["values"][r0:r1],
                "state": {k: v[r0:r1] for k, v in sd["state"].items()}}
        entries.append(ck.write_block(staging, f"r{i}", part))
    return path, staging, entries

train(1)
path, staging, entries = write_blocks(1)
ck.commit(path, cfg, entries, 1, staging=staging)
open(os.path.join(root, "step1.fingerprint"), "w").write(t.fingerprint())
train(2)
path, staging, entries = write_blocks(2)
with open(os.path.join(staging, ".manifest.json.tmp-half"), "w") as f:
    f.write('{"format": "memstore-chec')  # a manifest being written, cut short
open(os.path.join(root, "blocks-of-step-2-written"), "w").close()
time.sleep(60)
ck.commit(path, cfg, entries, 2, staging=staging)
"""


def test_save_killed_before_commit_falls_back_to_previous_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_SAVER, str(tmp_path)], env=env, stderr=subprocess.PIPE
    )
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
    staged = [n for n in os.listdir(tmp_path) if n.startswith(".step-000000002.staging-")]
    assert len(staged) == 1 and os.path.isfile(tmp_path / staged[0] / "block-r1.pt")
    assert not os.path.exists(ck.checkpoint_dir(tmp_path, 2))
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
    assert_same(
        ck.load_block(tmp_path, BlockSpec(ROWS, DIM, 0, 250, 0, DIM)),
        cut(whole.state_dict(), BlockSpec(ROWS, DIM, 0, 250, 0, DIM)),
    )


def test_corrupt_or_unknown_manifest_raises(tmp_path):
    save_grid(tmp_path, trained(steps=1), "1x1", step=1)
    manifest = tmp_path / "manifest.json"
    good = json.loads(manifest.read_text())
    write_manifest(manifest, {**good, "version": 99})
    with pytest.raises(CheckpointError, match="unknown format version 99"):
        ck.read_manifest(tmp_path)
    manifest.write_text(json.dumps(good)[:40])
    with pytest.raises(CheckpointError, match="corrupt"):
        ck.read_manifest(tmp_path)
    manifest.write_text(json.dumps({**good, "step": 5}))  # edited, checksum not updated
    with pytest.raises(CheckpointError, match="manifest_sha256 does not match"):
        ck.read_manifest(tmp_path)
    write_manifest(manifest, {**good, "blocks": good["blocks"] * 2})
    with pytest.raises(CheckpointError, match="same file|do not tile"):
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
    blocks = {
        f"r0c{j}": ShardTable(ROWS, DIM, optimizer=opt, seed=7, col_range=c)
        for j, c in enumerate([(0, 33), (33, DIM)])
    }
    for step in range(1, steps + 1):
        idx, w, dy = batch(step)
        for t in blocks.values():
            t.backward(idx, w, dy[:, t.spec.col_start : t.spec.col_stop], step=step)
            t.step(step)
    return blocks


def test_rowwise_adagrad_round_trip_with_the_same_column_grid(tmp_path):
    blocks = rowwise_column_grid()
    b0, b1 = blocks["r0c0"], blocks["r0c1"]
    assert not torch.equal(b0.state["sum"], b1.state["sum"])  # per (row, column block)
    save_blocks(tmp_path, {bid: t.state_dict() for bid, t in blocks.items()}, config(b0), 2)
    for t in blocks.values():  # same columns, rows re-gridded into 3
        sd = t.state_dict()
        for r0, r1 in [(0, 100), (100, 700), (700, ROWS)]:
            s = BlockSpec(ROWS, DIM, r0, r1, t.spec.col_start, t.spec.col_stop)
            got = ck.load_block(tmp_path, s)
            assert got["state"]["sum"].shape == (r1 - r0,)
            expected = {
                **sd,
                "values": sd["values"][r0:r1],
                "state": {"sum": sd["state"]["sum"][r0:r1]},
            }
            assert_same(got, expected)


@pytest.mark.parametrize("cols", [(0, DIM), (0, 20), (20, 50)])
def test_rowwise_adagrad_refuses_a_changed_column_grid(tmp_path, cols):
    blocks = rowwise_column_grid(steps=1)
    save_blocks(
        tmp_path, {bid: t.state_dict() for bid, t in blocks.items()}, config(blocks["r0c0"]), 1
    )
    with pytest.raises(CheckpointError, match="rowwise_adagrad.*not one stored column block"):
        ck.load_block(tmp_path, BlockSpec(ROWS, DIM, 0, ROWS, *cols))


def test_parallel_writers_and_commit_checks(tmp_path):
    whole = trained(steps=1)
    sd, path = whole.state_dict(), tmp_path / "ck"
    staging = ck.begin(path)
    with ThreadPoolExecutor(4) as pool:  # shards write their blocks concurrently
        entries = list(
            pool.map(
                lambda item: ck.write_block(staging, item[0], cut(sd, item[1])),
                specs("2x2").items(),
            )
        )
    with pytest.raises(CheckpointError, match="do not tile"):
        ck.commit(path, config(whole), entries[:3], 1, staging=staging)
    with pytest.raises(CheckpointError, match="disagree"):
        ck.commit(
            path,
            config(whole),
            [entries[0], {**entries[1], "updates": 5}, *entries[2:]],
            1,
            staging=staging,
        )
    with pytest.raises(InvalidArgument, match="table_config"):
        ck.commit(path, {"rows": ROWS, "dim": DIM}, entries, 1, staging=staging)
    with pytest.raises(InvalidArgument, match="staging"):
        ck.commit(path, config(whole), entries, 1, staging=str(tmp_path / "elsewhere"))
    with pytest.raises(InvalidArgument, match="block_id"):
        ck.write_block(staging, "../evil", sd)
    assert not path.exists()  # rejected commits changed nothing
    ck.commit(path, config(whole), entries, 1, staging=staging)
    assert not os.path.exists(staging)
    with pytest.raises(CheckpointError, match="already committed"):
        ck.begin(path)
    with pytest.raises(CheckpointError, match="already committed"):
        ck.write_block(path, "r0c0", cut(sd, specs("2x2")["r0c0"]))
    with pytest.raises(CheckpointError, match="checkpoint of a 1000 x 70 table"):
        ck.load_block(path, BlockSpec.whole(ROWS, DIM + 1))


def test_commit_rehashes_every_block(tmp_path):
    whole = trained(steps=1)
    sd, path = whole.state_dict(), tmp_path / "ck"
    staging = ck.begin(path)
    entries = [ck.write_block(staging, bid, cut(sd, s)) for bid, s in specs("2x2").items()]
    # Another writer replaces one block after it was written: same name, other bytes.
    other = trained(steps=2).state_dict()
    ck.write_block(staging, "r1c0", cut(other, specs("2x2")["r1c0"]))
    with pytest.raises(CheckpointError, match="block file block-r1c0.pt is not the one written"):
        ck.commit(path, config(whole), entries, 1, staging=staging)
    assert not path.exists() and not os.path.exists(staging)
    assert ck.latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("file", "../block-r0c0.pt", "file: block-<block>.pt"),
        ("file", "/etc/passwd", "file: block-<block>.pt"),
        ("file", "data-0123/block-r0c0.pt", "file: block-<block>.pt"),
        ("file", "block-r1c1.pt", "file: block-<block>.pt"),  # another block's file
        ("block", "r0c0/../x", "block: 1-64"),
        ("sha256", "0" * 63, "sha256: 64"),
        ("bytes", 1 << 40, "bytes: at most"),
        ("bytes", -1, "counters malformed"),
        (
            "spec",
            {
                "rows": ROWS,
                "dim": DIM,
                "row_start": 0,
                "row_stop": ROWS + 5,
                "col_start": 0,
                "col_stop": DIM,
            },
            "spec or counters malformed",
        ),
        ("extra", 1, "exactly the fields"),
    ],
)
def test_hostile_manifest_entries_refused_before_any_file_is_opened(
    tmp_path, field, value, message
):
    save_grid(tmp_path, trained(steps=1), "1x1", step=1)
    file = tmp_path / "manifest.json"
    good = json.loads(file.read_text())
    block = dict(good["blocks"][0], **{field: value})
    write_manifest(file, {**good, "blocks": [block]})
    os.remove(tmp_path / "block-r0c0.pt")  # an open would say "unreadable", not the field
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ck.read_manifest(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ck.load_block(tmp_path, BlockSpec.whole(ROWS, DIM))
    assert ck.latest_checkpoint(tmp_path.parent) is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dtype": "float64"}, "dtype: one of"),
        ({"dtype": "object"}, "dtype: one of"),
        ({"rows": ROWS + 1}, "table shape differs"),
        ({"rows": True}, "rows: an int"),
        ({"optimizer": {"kind": "evil"}}, "unknown optimizer"),
    ],
)
def test_manifest_table_config_is_constrained(tmp_path, change, message):
    save_grid(tmp_path, trained(steps=1), "2x2", step=1)
    file = tmp_path / "manifest.json"
    good = json.loads(file.read_text())
    write_manifest(file, {**good, "table": {**good["table"], **change}})
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ck.read_manifest(tmp_path)


_EVIL = """
import os
import pathlib
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
"""


def test_a_pickled_payload_never_runs(tmp_path):
    """A block file whose checksum matches but whose pickle calls os.system is refused."""
    save_grid(tmp_path / "ck", trained(steps=1), "1x1", step=1)
    marker = tmp_path / "pwned"
    namespace = {}
    exec(_EVIL.format(marker=marker), namespace)  # noqa: S102 - builds the hostile payload
    block = tmp_path / "ck" / "block-r0c0.pt"
    torch.save({"values": namespace["Evil"]()}, block)
    data = block.read_bytes()
    file = tmp_path / "ck" / "manifest.json"
    m = json.loads(file.read_text())
    m["blocks"][0].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    write_manifest(file, m)
    with pytest.raises(CheckpointError, match="does not load"):
        ck.load_block(tmp_path / "ck", BlockSpec.whole(ROWS, DIM))
    assert not marker.exists()


def test_concurrent_saves_to_one_path_commit_one_whole_checkpoint(tmp_path):
    """Eight savers of eight different tables race to one path: one wins whole."""
    tables = [trained(steps=s) for s in range(1, 9)]
    path = tmp_path / "ck"
    barrier = threading.Barrier(len(tables))

    def save(t):
        sd, staging = t.state_dict(), ck.begin(path)
        entries = [ck.write_block(staging, bid, cut(sd, s)) for bid, s in specs("2x2").items()]
        barrier.wait()
        try:
            ck.commit(path, config(t), entries, t.last_step, staging=staging)
            return t
        except CheckpointError as e:
            assert "already exists" in e.reason
            return None

    with ThreadPoolExecutor(len(tables)) as pool:
        results = list(pool.map(save, tables))
    winners = [t for t in results if t is not None]
    assert len(winners) == 1
    assert ck.read_manifest(path)["step"] == winners[0].last_step
    got = ck.load_block(path, BlockSpec.whole(ROWS, DIM))
    assert_same(got, winners[0].state_dict())
    assert os.listdir(tmp_path) == ["ck"]  # the losers' staging directories are gone


def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    old, new = trained(steps=1), trained(steps=2)
    save_grid(ck.checkpoint_dir(tmp_path, 1), old, "2x2", step=1)
    save_grid(ck.checkpoint_dir(tmp_path, 2), new, "2x2", step=2)
    block = os.path.join(ck.checkpoint_dir(tmp_path, 2), "block-r0c1.pt")
    with open(block, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte ^ 0xFF]))
    spec = specs("2x2")["r0c1"]
    with caplog.at_level("WARNING", logger="memstore.checkpoint"):
        path, sd = ck.restore_block(tmp_path, spec)
    assert path == ck.checkpoint_dir(tmp_path, 1)
    assert_same(sd, cut(old.state_dict(), spec))
    assert any("falling back to" in r.getMessage() for r in caplog.records)
    # A block that is intact in the newest checkpoint loads from it.
    path, sd = ck.restore_block(tmp_path, specs("2x2")["r0c0"])
    assert path == ck.checkpoint_dir(tmp_path, 2)
    assert ck.restore_block(tmp_path / "none", spec) is None


def test_paths_resolve_on_the_caller_and_unknown_schemes_are_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ck.resolve("rel/ck") == str(tmp_path / "rel" / "ck")
    assert ck.resolve(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert ck.checkpoint_dir("rel", 7) == str(tmp_path / "rel" / "step-000000007")
    uri = "s3://bucket/root?endpoint_override=127.0.0.1:1&scheme=http"
    assert ck.resolve(uri) == uri
    assert ck.checkpoint_dir(uri, 3) == (
        "s3://bucket/root/step-000000003?endpoint_override=127.0.0.1:1&scheme=http"
    )
    for bad in ("foo://bucket/x", "memstore://x", ""):
        with pytest.raises(InvalidArgument, match="checkpoint_root: expected a local path"):
            ck.resolve(bad, "checkpoint_root")
    with pytest.raises(InvalidArgument, match="path: expected a local path"):
        ck.begin("foo://bucket/x")
    save_grid("rel/ck", trained(steps=1), "1x1", step=1)
    assert ck.read_manifest(tmp_path / "rel" / "ck")["step"] == 1
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(("foo:", "s3:"))]


def test_a_block_cut_from_a_larger_tensor_stores_only_its_rows(tmp_path):
    """torch.save writes a view's whole storage; a block file must hold its rows only."""
    whole = trained(steps=1)
    sd, spec = whole.state_dict(), BlockSpec(ROWS, DIM, 0, 100, 0, DIM)
    view = {
        **sd,
        "row_stats": None,  # the whole table's row statistics are not the block's
        "spec": spec,
        "values": sd["values"][:100],
        "state": {k: v[:100] for k, v in sd["state"].items()},
    }
    staging = ck.begin(tmp_path / "ck")
    entry = ck.write_block(staging, "r0", view)
    rows_bytes = 100 * DIM * 4 * 3  # values, exp_avg, exp_avg_sq
    assert rows_bytes < entry["bytes"] < rows_bytes + 64 * 1024
    assert entry["bytes"] < ROWS * DIM * 4  # not the whole table's storage


def test_abort_removes_only_a_staging_location(tmp_path):
    staging = ck.begin(tmp_path / "ck")
    ck.write_block(staging, "r0", trained(steps=1).state_dict())
    ck.abort(staging)
    assert os.listdir(tmp_path) == []
    ck.abort(staging)  # already gone: nothing to do
    (tmp_path / "data").mkdir()
    with pytest.raises(InvalidArgument, match="staging"):
        ck.abort(tmp_path / "data")
    assert (tmp_path / "data").is_dir()


# ---- authentication and bounded parsing ---------------------------------------------
def plant(root, step, whole, how):
    """A checkpoint at ``root/step-N`` with valid block and manifest checksums that the
    operator never signed: signed with another secret, or with no hmac at all."""
    path = ck.checkpoint_dir(root, step)
    if how == "another secret":
        save_grid(path, whole, "2x2", step=step)
        m = json.loads((pathlib.Path(path) / "manifest.json").read_text())
        write_manifest(pathlib.Path(path) / "manifest.json", m, secret="x" * 40)
    else:
        save_grid(path, whole, "2x2", step=step)
        file = pathlib.Path(path) / "manifest.json"
        m = {k: v for k, v in json.loads(file.read_text()).items() if k != "hmac"}
        file.write_text(json.dumps({**m, "manifest_sha256": manifest_sha256(m)}))
    return path


@pytest.mark.parametrize("how", ["another secret", "no hmac"])
def test_a_planted_unsigned_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog, how):
    old, forged = trained(steps=1), trained(optimizer=memstore.Adam(lr=5.0), steps=3)
    save_grid(ck.checkpoint_dir(tmp_path, 1), old, "2x2", step=1)
    planted = plant(tmp_path, 999_999_999, forged, how)
    key = ck.table_key(SECRET, "mem0")
    with pytest.raises(CheckpointError, match="not authenticated"):
        ck.read_manifest(planted, key=key)
    spec = specs("2x2")["r1c0"]
    with caplog.at_level("WARNING", logger="memstore.checkpoint"):
        path, sd = ck.restore_block(tmp_path, spec, key=key)
    assert path == ck.checkpoint_dir(tmp_path, 1)
    assert_same(sd, cut(old.state_dict(), spec))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(planted in m and "not authenticated" in m for m in warned), warned
    assert ck.checkpoints(tmp_path, key=key) == [ck.checkpoint_dir(tmp_path, 1)]


def test_a_table_key_verifies_only_its_own_tables_checkpoints(tmp_path):
    save_grid(tmp_path, trained(steps=1), "1x1", step=1)  # table "mem0"
    assert ck.read_manifest(tmp_path, key=ck.table_key(SECRET, "mem0"))["step"] == 1
    assert ck.read_manifest(tmp_path, secret=SECRET)["step"] == 1  # derived from its name
    with pytest.raises(CheckpointError, match="not authenticated"):
        ck.read_manifest(tmp_path, key=ck.table_key(SECRET, "other"))
    with pytest.raises(CheckpointError, match="not authenticated"):
        ck.read_manifest(tmp_path, secret="y" * 40)
    # Renaming the table in a manifest (checksum fixed) breaks its signature.
    file = tmp_path / "manifest.json"
    m = json.loads(file.read_text())
    m["table"]["name"] = "other"
    file.write_text(json.dumps({**m, "manifest_sha256": manifest_sha256(m)}))
    with pytest.raises(CheckpointError, match="not authenticated"):
        ck.read_manifest(tmp_path, key=ck.table_key(SECRET, "other"))


def test_a_deeply_nested_manifest_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    old = trained(steps=1)
    save_grid(ck.checkpoint_dir(tmp_path, 1), old, "2x2", step=1)
    hostile = pathlib.Path(ck.checkpoint_dir(tmp_path, 2))
    hostile.mkdir()
    (hostile / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)  # 200 KB
    with pytest.raises(CheckpointError, match="nests 100000 deep, more than the 32"):
        ck.read_manifest(hostile)
    # Brackets inside strings (escaped quotes included) are not nesting.
    (hostile / "manifest.json").write_text(json.dumps({"format": '\\"[[[' * 50_000}))
    with pytest.raises(CheckpointError, match="not a memstore-checkpoint manifest"):
        ck.read_manifest(hostile)
    (hostile / "manifest.json").write_text('{"a": ' * 33 + "1" + "}" * 33)
    with pytest.raises(CheckpointError, match="nests 33 deep"):
        ck.read_manifest(hostile)
    (hostile / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    spec = specs("2x2")["r0c0"]
    with caplog.at_level("WARNING", logger="memstore.checkpoint"):
        path, sd = ck.restore_block(tmp_path, spec, key=ck.table_key(SECRET, "mem0"))
    assert path == ck.checkpoint_dir(tmp_path, 1)
    assert_same(sd, cut(old.state_dict(), spec))
    assert any("nests 100000 deep" in r.getMessage() for r in caplog.records)


def test_a_manifest_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    save_grid(tmp_path, trained(steps=1), "1x1", step=1)
    size = (tmp_path / "manifest.json").stat().st_size
    monkeypatch.setattr(ck, "_MAX_MANIFEST_BYTES", size - 1)
    with pytest.raises(CheckpointError, match=f"{size} bytes, more than the {size - 1} allowed"):
        ck.read_manifest(tmp_path)
    monkeypatch.setattr(ck, "_MAX_MANIFEST_BYTES", size)
    assert ck.read_manifest(tmp_path)["step"] == 1


def test_the_operator_secret_comes_from_argument_environment_or_key_file(tmp_path, monkeypatch):
    assert ck.operator_secret("a" * 32) == "a" * 32
    assert ck.operator_secret() == SECRET  # the environment, set by the fixture
    with pytest.raises(InvalidArgument, match="checkpoint_secret") as e:
        ck.operator_secret("short-secret")
    assert "short-secret" not in str(e.value)  # a secret is never echoed
    monkeypatch.delenv(ck.SECRET_ENV)
    key_file = tmp_path / "keys" / "secret"
    monkeypatch.setenv(ck.KEY_FILE_ENV, str(key_file))
    first = ck.operator_secret()  # created on first use, owner-only
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert key_file.read_text() == first and (key_file.stat().st_mode & 0o777) == 0o600
    assert ck.operator_secret() == first
    key_file.chmod(0o644)  # readable by others: refused, not used
    with pytest.raises(InvalidArgument, match=ck.KEY_FILE_ENV):
        ck.operator_secret()
    key_file.chmod(0o600)
    os.symlink(key_file, tmp_path / "link")
    monkeypatch.setenv(ck.KEY_FILE_ENV, str(tmp_path / "link"))
    with pytest.raises(InvalidArgument, match=ck.KEY_FILE_ENV):  # a link is never followed
        ck.operator_secret()
