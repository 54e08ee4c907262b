"""The training loop: configs, in-process training, checkpoint/resume, Ray workers."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

import memstore
from memstore import InvalidArgument
from trainer import train as tr

CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"


def config(name: str, tmp_path, *overrides: str) -> tr.TrainArgs:
    return tr.load_config(CONFIGS / f"{name}.yaml",
                          [f"run_dir={tmp_path / name}", "progress=false", *overrides])


def metrics(run_dir) -> list[dict]:
    with open(Path(run_dir) / tr.METRICS, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---- config ------------------------------------------------------------------------

def test_unknown_keys_are_rejected_by_name(tmp_path):
    for text, name in [("stepz: 3\n", "stepz"), ("data:\n  entitiez: 3\n", "data.entitiez"),
                       ("store:\n  shardz: 2\n", "store.shardz"),
                       ("model:\n  dimm: 8\n", "model.dimm")]:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(InvalidArgument, match=name.replace(".", r"\.")):
            tr.load_config(path)
    with pytest.raises(InvalidArgument, match="nosuch"):
        tr.load_config(CONFIGS / "tiny.yaml", ["data.nosuch=1"])


def test_overrides_and_validation():
    args = tr.load_config(CONFIGS / "tiny.yaml", ["model.dim=64", "workers=2", "store.shards=[2, 1]"])
    assert args.model["dim"] == 64 and args.workers == 2 and args.store.shards == (2, 1)
    with pytest.raises(InvalidArgument, match="batch_size"):
        tr.load_config(CONFIGS / "tiny.yaml", ["workers=3"])
    with pytest.raises(InvalidArgument, match="lr"):
        tr.load_config(CONFIGS / "tiny.yaml", ["lr=-1"])
    with pytest.raises(InvalidArgument, match="store.data_channel"):
        tr.load_config(CONFIGS / "tiny.yaml", ["store.data_channel=grpc"])
    with pytest.raises(InvalidArgument, match="store.step_on_push"):
        tr.load_config(CONFIGS / "tiny.yaml", ["store.mode=async", "store.step_on_push=true"])
    assert tr.load_config(CONFIGS / "tiny.yaml", ["store.mode=async"]).store.step_on_push is False


def test_schedule_warms_up_then_decays_to_min_lr():
    args = tr.TrainArgs(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    lrs = [tr.lr_at(args, s) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_value_lr_follows_the_dense_schedule_scaled_or_stays_constant():
    args = tr.TrainArgs(steps=100, warmup=10, lr=1.0, min_lr=0.1, value_lr=0.5)
    for step in (1, 10, 50, 100):
        assert tr.value_lr_at(args, step) == pytest.approx(0.5 * tr.lr_at(args, step))
    const = tr.TrainArgs(steps=100, warmup=10, value_lr=0.5, value_schedule="constant")
    assert {tr.value_lr_at(const, s) for s in (1, 50, 100)} == {0.5}
    with pytest.raises(InvalidArgument, match="value_schedule"):
        tr.TrainArgs(value_schedule="linear")


# ---- in-process training -----------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "facts-memory", "facts-dense"])
def test_every_config_trains_a_few_steps(tmp_path, name):
    args = config(name, tmp_path, "workers=0", "steps=3", "warmup=1", "eval_every=0",
                  "checkpoint_every=0")
    result = tr.train(args)
    rows = metrics(args.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["tokens"] == 3 * args.batch_size * 2
    assert 0.0 <= result["eval"]["recall"] <= 1.0
    assert (Path(args.run_dir) / tr.PLOT).stat().st_size > 0
    written = tr.load_config(Path(args.run_dir) / "config.yaml")
    assert written.model_args(1).to_dict() | {"vocab_size": 1} == \
        args.model_args(1).to_dict() | {"vocab_size": 1}


def test_tiny_learns(tmp_path):
    args = config("tiny", tmp_path, "steps=60", "eval_every=0", "checkpoint_every=0")
    tr.train(args)
    losses = [r["loss"] for r in metrics(args.run_dir)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3


def test_text_data(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = config("tiny", tmp_path, "data.kind=text", f"data.path={text}", "data.seq_len=8",
                  "steps=3", "eval_every=0", "checkpoint_every=0")
    result = tr.train(args)
    assert result["eval"]["bits_per_byte"] > 0
    assert metrics(args.run_dir)[-1]["tokens"] == 3 * args.batch_size * 8


def test_outputs_of_a_run(tmp_path):
    args = config("tiny", tmp_path)
    tr.train(args)
    run = Path(args.run_dir)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, args.steps + 1))
    assert {"step", "loss", "lr", "tokens", "seconds", "grad_norm"} <= set(rows[0])
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert {"recall", "nll"} <= set(evals[0]["eval"])
    assert (run / tr.PLOT).read_bytes()[:4] == b"\x89PNG"
    assert tr.checkpoint_steps(run, ["memory"]) == [0, 4, 8, 12]


def test_stop_and_resume_gives_the_same_loss_curve(tmp_path):
    whole = config("tiny", tmp_path / "a")
    tr.train(whole)
    cut = config("tiny", tmp_path / "b")
    assert tr.train(cut, stop_after=7)["stopped"]  # killed after step 7: resumes at 4
    result = tr.train(cut, resume=True)
    a, b = metrics(whole.run_dir), metrics(cut.run_dir)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-exact
    assert a[-1]["eval"] == b[-1]["eval"] and result["tokens"] == a[-1]["tokens"]


def test_resume_with_another_model_is_refused(tmp_path):
    args = config("tiny", tmp_path)
    tr.train(args, stop_after=4)
    other = config("tiny", tmp_path, "model.dim=64")
    with pytest.raises(InvalidArgument, match="model"):
        tr.train(other, resume=True)


def tree(run_dir) -> dict:
    """Every file under run_dir (but the metrics and config the next run rewrites)
    with its bytes: what "nothing was deleted or changed" compares."""
    run_dir = Path(run_dir)
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in (tr.METRICS, "config.yaml", tr.PLOT)}


def test_a_used_run_dir_needs_overwrite_and_resume_never_deletes(tmp_path):
    args = config("tiny", tmp_path)
    tr.train(args, stop_after=5)  # checkpoints of steps 0 and 4
    before = tree(args.run_dir)
    with pytest.raises(InvalidArgument, match="run_dir.*--overwrite"):
        tr.train(args)
    with pytest.raises(InvalidArgument, match="overwrite"):
        tr.train(args, resume=True, overwrite=True)
    assert tree(args.run_dir) == before
    result = tr.train(args, resume=True, stop_after=6)
    assert result["step"] == 6 and [r["step"] for r in metrics(args.run_dir)] == [1, 2, 3, 4, 5, 6]
    assert {k: v for k, v in tree(args.run_dir).items() if k in before} == before
    tr.train(args, overwrite=True, stop_after=1)
    assert tr.checkpoint_steps(Path(args.run_dir), ["memory"]) == [0]


def test_resume_when_model_and_store_checkpoints_disagree(tmp_path):
    """The documented choice: the newest step with both; the unmatched newer ones are
    moved under abandoned/, not deleted. With no common step: an error, nothing moved."""
    run = Path(tmp_path / "tiny")
    args = config("tiny", tmp_path)
    tr.train(args, stop_after=9)  # steps 0, 4, 8
    store8 = run / tr.STORE / "memory" / "step-000000008"
    model8 = run / tr.CHECKPOINTS / "step-000000008.pt"
    manifest8 = (store8 / "manifest.json").read_bytes()
    os.remove(store8 / "manifest.json")  # the store save of step 8 never committed
    model8_bytes = model8.read_bytes()
    result = tr.train(args, resume=True, stop_after=5)
    assert result["step"] == 5 and [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]
    assert not model8.exists()
    set_aside = list((run / tr.ABANDONED).rglob("step-000000008.pt"))
    assert len(set_aside) == 1 and set_aside[0].read_bytes() == model8_bytes
    assert list((run / tr.ABANDONED).rglob("step-000000008/block-0-0.pt"))
    # No step with both any more: refused, and nothing is moved or deleted.
    (run / tr.ABANDONED).rename(tmp_path / "kept")
    for n in os.listdir(run / tr.CHECKPOINTS):
        os.rename(run / tr.CHECKPOINTS / n, tmp_path / "kept" / n)
    (store8.parent / "step-000000012").mkdir()
    before = tree(run)
    with pytest.raises(memstore.CheckpointError, match=r"no step has both.*'model': \[\]"):
        tr.train(args, resume=True)
    assert tree(run) == before and manifest8


_EVIL = """
import os
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
"""


def test_a_model_checkpoint_is_loaded_as_data_only(tmp_path):
    args = config("tiny", tmp_path)
    tr.train(args, stop_after=5)
    marker = tmp_path / "pwned"
    namespace = {}
    exec(_EVIL.format(marker=marker), namespace)  # noqa: S102 - builds the hostile payload
    torch.save({"step": 4, "replica": namespace["Evil"]()},
               Path(args.run_dir) / tr.CHECKPOINTS / "step-000000004.pt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported"):
        tr.train(args, resume=True, stop_after=5)
    assert not marker.exists()


def test_cli_main(tmp_path, capsys):
    assert tr.main(["--config", str(CONFIGS / "tiny.yaml"), "--set", f"run_dir={tmp_path}",
                    "--set", "progress=false", "--set", "steps=2"]) == 0
    assert "2 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tr.main(["--config", str(CONFIGS / "tiny.yaml"), "--set", "bogus=1"])
    again = ["--config", str(CONFIGS / "tiny.yaml"), "--set", f"run_dir={tmp_path}",
             "--set", "progress=false", "--set", "steps=2"]
    with pytest.raises(SystemExit) as e:
        tr.main(again)
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tr.main([*again, "--resume", "--overwrite"])
    assert tr.main([*again, "--overwrite"]) == 0


def test_memstore_train_command_runs_the_trainer(tmp_path, capsys):
    """``memstore train`` reaches trainer.train.main through the memstore.commands entry
    point (installed by pip install -e .), without memstore importing the trainer."""
    from memstore import cli

    assert "train" in cli._plugins()
    assert cli.main(["train", "--config", str(CONFIGS / "tiny.yaml"), "--set",
                     f"run_dir={tmp_path}", "--set", "progress=false", "--set", "steps=2"]) == 0
    assert "2 steps" in capsys.readouterr().out


# ---- Ray: W workers, a sharded store -----------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_whole(tmp_path_factory, ray_local):
    """An uninterrupted run of tiny.yaml with 2 workers and a 2-shard store."""
    tmp = tmp_path_factory.mktemp("ray")
    args = config("tiny", tmp, "workers=2", "store.shards=2", "store.name=t-whole")
    result = tr.train(args)
    return args, result, metrics(args.run_dir)


def test_ray_workers_match_in_process(tmp_path, ray_whole):
    local = config("tiny", tmp_path / "local")
    tr.train(local)
    remote, result, b = ray_whole
    a = metrics(local.run_dir)
    # the same function up to float summation order (two half-batches, two row blocks)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4, abs=1e-5)
    assert b[-1]["eval"]["recall"] == pytest.approx(a[-1]["eval"]["recall"], abs=2 / 256)
    assert tr.checkpoint_steps(Path(remote.run_dir), ["memory"]) == [0, 4, 8, 12]
    with pytest.raises(memstore.TableNotFound):  # dropped at the end (store.keep false)
        memstore.connect("t-whole-memory")
    assert result["rollbacks"] == 0


def test_ray_training_connects_to_an_existing_table_and_leaves_it(tmp_path, ray_local):
    """store.connect: the values live in a table another job created (driver steps it,
    as it was created without step_on_push); it is still there afterwards."""
    args = config("tiny", tmp_path, "workers=2", "store.name=t-ext", "store.connect=true",
                  "checkpoint_every=0", "steps=3")
    rows, dim = tr.table_specs(args.model_args(tr.StepData(args).vocab_size))["memory"]
    with pytest.raises(InvalidArgument, match="store.connect"):
        memstore.create_table("t-ext-memory", rows, dim + 1, shards=2)
        try:
            tr.train(args)
        finally:
            memstore.drop_table("t-ext-memory")
    table = memstore.create_table("t-ext-memory", rows, dim, shards=2, workers=2)
    try:
        before = table.fingerprints()
        tr.train(args)
        after = memstore.connect("t-ext-memory")
        assert after.last_step == 3 and after.fingerprints() != before
    finally:
        memstore.drop_table("t-ext-memory")


def test_ray_restore_after_a_shard_dies_then_resume(tmp_path, ray_local, ray_whole):
    from memstore.table import NAMESPACE, shard_name

    a = [r["loss"] for r in ray_whole[2]]
    # A shard is killed after step 6: it restarts from the store checkpoint of step 4,
    # the next call raises StoreRolledBack(4), and the trainer reloads the model of
    # step 4 into every worker and continues.
    killed = []

    def kill(step, backend):
        if step == 6 and not killed:
            killed.append(step)
            ray_local.kill(ray_local.get_actor(shard_name("t-cut-memory", 0, 0),
                                               namespace=NAMESPACE), no_restart=False)

    cut = config("tiny", tmp_path, "workers=2", "store.name=t-cut")
    result = tr.train(cut, on_step=kill, stop_after=10)  # then "killed" after step 10
    assert killed and result["rollbacks"] == 1 and result["stopped"]
    assert [r["step"] for r in metrics(cut.run_dir)] == list(range(1, 11))
    # The tables were dropped with the job: --resume loads the store checkpoint of
    # step 8 into new tables and the model checkpoint of step 8 into new workers.
    result = tr.train(cut, resume=True)
    rows = metrics(cut.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == pytest.approx(a, rel=1e-5)
    assert rows[-1]["eval"] == pytest.approx(ray_whole[2][-1]["eval"], rel=1e-5)
