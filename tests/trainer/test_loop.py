"""trainer.loop, in-process (workers: 0): the shipped tiny and facts configs train a few
steps and write the config they ran; tiny learns; text data trains; a run writes its
metrics, evaluations, plot and checkpoints; ray.storage_path is refused without Ray
Train."""

import math
from pathlib import Path

import pytest

from memstore.trainer import checkpoint
from memstore.trainer.config import load_config
from memstore.trainer.loop import PLOT
from memstore.trainer.train import train

from .helpers import config, metrics

# The facts configs' model and store as shipped, on 200 of their 2,000 entities: the
# final evaluation scores every fact, and 50,000 of them took most of the test's time.
SMALL_CORPUS = {
    "tiny": [],
    "facts-memory": ["data.entities=200"],
    "facts-dense": ["data.entities=200"],
}


@pytest.mark.parametrize("name", list(SMALL_CORPUS))
def test_every_config_trains_a_few_steps(tmp_path, name):
    args = config(
        name,
        tmp_path,
        "workers=0",
        "steps=3",
        "warmup=1",
        "eval_every=0",
        "checkpoint_every=0",
        *SMALL_CORPUS[name],
    )
    result = train(args)
    rows = metrics(args.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["tokens"] == 3 * args.batch_size * 2
    assert 0.0 <= result["eval"]["recall"] <= 1.0
    assert result["eval"]["facts"] == args.data.entities * args.data.attributes
    assert (Path(args.run_dir) / PLOT).stat().st_size > 0
    written = load_config(Path(args.run_dir) / "config.yaml")
    assert written.model_args(1).to_dict() | {"vocab_size": 1} == args.model_args(1).to_dict() | {
        "vocab_size": 1
    }


def test_tiny_learns(tmp_path):
    args = config("tiny", tmp_path, "steps=60", "eval_every=0", "checkpoint_every=0")
    train(args)
    losses = [r["loss"] for r in metrics(args.run_dir)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3


def test_text_data(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = config(
        "tiny",
        tmp_path,
        "data.kind=text",
        f"data.path={text}",
        "data.seq_len=8",
        "steps=3",
        "eval_every=0",
        "checkpoint_every=0",
    )
    result = train(args)
    assert result["eval"]["bits_per_byte"] > 0
    assert metrics(args.run_dir)[-1]["tokens"] == 3 * args.batch_size * 8


def test_outputs_of_a_run(tmp_path):
    args = config("tiny", tmp_path)
    result = train(args)
    run = Path(args.run_dir)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, args.steps + 1))
    assert {"step", "loss", "lr", "tokens", "seconds", "grad_norm"} <= set(rows[0])
    assert [r["step"] for r in rows if "eval" in r] == [6, 12]
    assert {"recall", "nll"} <= set(rows[5]["eval"]) and result["eval"] == rows[-1]["eval"]
    assert (run / PLOT).read_bytes()[:4] == b"\x89PNG"
    assert checkpoint.checkpoint_steps(run, ["memory"]) == [0, 4, 8, 12]
    assert sorted(p.name for p in (run / "checkpoints" / "step-000000004").iterdir()) == [
        "checksums.json",
        "model.pt",
        "store.json",
    ]
    assert not result["stopped"] and result["start"] == 0


def test_storage_path_is_for_ray_train_runs(tmp_path):
    args = config("tiny", tmp_path, f"ray.storage_path={tmp_path / 'elsewhere'}")
    with pytest.raises(Exception, match="ray.storage_path"):
        train(args)
