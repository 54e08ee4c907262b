"""trainer.checkpoint: resume is exact, never deletes, and loads data only.

A run stopped and resumed gives the loss curve of the uninterrupted run, step by step;
resuming with another model is refused; a used run directory needs --overwrite and
--resume never deletes; resume takes the newest step whose model and store checkpoints
are both complete; model files load as data only (a pickled payload never runs);
checksums.json holds each file's sha256 and size, computed here with hashlib, and a
damaged or unchecksummed model checkpoint is passed over.
"""

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch

import memstore
from memstore import InvalidArgument
from memstore.trainer import checkpoint
from memstore.trainer.train import train

from .helpers import config, metrics, tree


def test_stop_and_resume_gives_the_same_loss_curve(tmp_path):
    whole = config("tiny", tmp_path / "a")
    train(whole)
    cut = config("tiny", tmp_path / "b")
    assert train(cut, stop_after=7)["stopped"]  # killed after step 7: resumes at 4
    result = train(cut, resume=True)
    a, b = metrics(whole.run_dir), metrics(cut.run_dir)
    assert [r["step"] for r in b] == list(range(1, 13)) and result["start"] == 4
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-exact
    assert a[-1]["eval"] == b[-1]["eval"] and result["tokens"] == a[-1]["tokens"]


def test_resume_with_another_model_is_refused(tmp_path):
    args = config("tiny", tmp_path)
    train(args, stop_after=4)
    other = config("tiny", tmp_path, "model.dim=64")
    with pytest.raises(InvalidArgument, match="model"):
        train(other, resume=True)


def test_a_used_run_dir_needs_overwrite_and_resume_never_deletes(tmp_path):
    args = config("tiny", tmp_path)
    train(args, stop_after=5)  # checkpoints of steps 0 and 4
    before = tree(args.run_dir)
    with pytest.raises(InvalidArgument, match="run_dir.*--overwrite"):
        train(args)
    with pytest.raises(InvalidArgument, match="overwrite"):
        train(args, resume=True, overwrite=True)
    assert tree(args.run_dir) == before
    result = train(args, resume=True, stop_after=6)
    assert result["step"] == 6 and [r["step"] for r in metrics(args.run_dir)] == list(range(1, 7))
    assert {k: v for k, v in tree(args.run_dir).items() if k in before} == before
    train(args, overwrite=True, stop_after=1)
    assert checkpoint.checkpoint_steps(Path(args.run_dir), ["memory"]) == [0]


def test_resume_when_model_and_store_checkpoints_disagree(tmp_path):
    """The newest step whose model checkpoint names committed store checkpoints; the
    newer ones are moved under abandoned/, not deleted. With no such step: an error,
    and nothing is moved."""
    run = Path(tmp_path / "tiny")
    args = config("tiny", tmp_path)
    train(args, stop_after=9)  # steps 0, 4, 8
    store8 = Path(checkpoint.store_path(run, "memory", 8))
    model8 = Path(checkpoint.step_dir(run, 8))
    os.remove(store8 / "manifest.json")  # the store save of step 8 never committed
    model8_bytes = (model8 / checkpoint.MODEL_FILE).read_bytes()
    result = train(args, resume=True, stop_after=5)
    assert result["step"] == 5 and [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]
    assert not model8.exists()
    set_aside = list((run / checkpoint.ABANDONED).rglob("step-000000008/model.pt"))
    assert len(set_aside) == 1 and set_aside[0].read_bytes() == model8_bytes
    assert list((run / checkpoint.ABANDONED).rglob("step-000000008/block-0-0.pt"))
    # No complete step any more: refused, and nothing is moved or deleted.
    (run / checkpoint.ABANDONED).rename(tmp_path / "kept")
    os.rename(run / checkpoint.CHECKPOINTS, tmp_path / "kept" / "model")
    (store8.parent / "step-000000012").mkdir()
    before = tree(run)
    with pytest.raises(memstore.CheckpointError, match=r"no step has both.*'model': \[\]"):
        train(args, resume=True)
    assert tree(run) == before


_EVIL = """
import os
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
"""


def test_a_model_checkpoint_is_loaded_as_data_only(tmp_path):
    args = config("tiny", tmp_path)
    train(args, stop_after=5)
    marker = tmp_path / "pwned"
    namespace = {}
    exec(_EVIL.format(marker=marker), namespace)  # noqa: S102 - builds the hostile payload
    folder = Path(checkpoint.step_dir(args.run_dir, 4))
    torch.save({"step": 4, "model": namespace["Evil"]()}, folder / checkpoint.MODEL_FILE)
    write_checksums(folder)  # whoever can write the file can write its checksum
    with pytest.raises(Exception, match="Weights only load failed|Unsupported"):
        train(args, resume=True, stop_after=5)
    assert not marker.exists()


def write_checksums(folder: Path) -> None:
    """checksums.json as the format defines it, computed here from the files."""
    files = {
        name: {
            "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
            "bytes": (folder / name).stat().st_size,
        }
        for name in (checkpoint.MODEL_FILE, checkpoint.STORE_FILE)
    }
    (folder / checkpoint.CHECKSUMS_FILE).write_text(
        json.dumps({"format": "memstore-train-checkpoint", "files": files})
    )


def test_checksums_of_a_checkpoint_are_those_of_its_files(tmp_path):
    args = config("tiny", tmp_path)
    train(args, stop_after=5)  # checkpoints of steps 0 and 4
    folder = Path(checkpoint.step_dir(args.run_dir, 4))
    written = json.loads((folder / checkpoint.CHECKSUMS_FILE).read_text())
    write_checksums(folder)
    assert json.loads((folder / checkpoint.CHECKSUMS_FILE).read_text()) == written
    state, stores = checkpoint.read(folder)
    assert state["step"] == 4 and stores["step"] == 4


@pytest.mark.parametrize("damaged", ["model.pt", "store.json", "checksums.json"])
def test_a_damaged_model_checkpoint_is_refused_and_resume_passes_over_it(tmp_path, caplog, damaged):
    args = config("tiny", tmp_path)
    train(args, stop_after=9)  # checkpoints of steps 0, 4, 8
    folder = Path(checkpoint.step_dir(args.run_dir, 8))
    file = folder / damaged
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x20  # one bit: same size, other content
    file.write_bytes(bytes(data))
    with pytest.raises(memstore.CheckpointError, match=damaged.replace(".", r"\.")):
        checkpoint.read(folder)
    with caplog.at_level(logging.WARNING, logger="memstore.trainer.checkpoint"):
        assert checkpoint.checkpoint_steps(Path(args.run_dir), ["memory"]) == [0, 4]
    assert any(str(folder) in r.getMessage() for r in caplog.records)
    result = train(args, resume=True, stop_after=5)  # from step 4, not the damaged 8
    assert result["start"] == 4 and result["step"] == 5


def test_a_model_checkpoint_without_checksums_is_not_a_checkpoint(tmp_path):
    args = config("tiny", tmp_path)
    train(args, stop_after=5)
    folder = Path(checkpoint.step_dir(args.run_dir, 4))
    (folder / checkpoint.CHECKSUMS_FILE).unlink()
    with pytest.raises(memstore.CheckpointError, match="checksums.json is missing"):
        checkpoint.read(folder)
    assert checkpoint.checkpoint_steps(Path(args.run_dir), ["memory"]) == [0]
