"""The trainer on Ray Train: W = 2 workers on an existing table equal in-process
training; a killed worker and a killed shard each restart the run from its checkpoint
and it ends as an uninterrupted run does, also after a stop and --resume; a run the
cluster cannot place is refused at once."""

import os
import signal
import time
from pathlib import Path

import pytest

import memstore
from memstore import InvalidArgument
from memstore.trainer import checkpoint
from memstore.trainer.data import StepData
from memstore.trainer.train import table_specs, train
from tests.local_ray import local_ray

from .helpers import config, metrics

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    # Ray Train's controller polls its workers once per health check (2 s by default):
    # it notices finished and failed workers, and takes each report (a worker's next
    # report blocks until then), sooner. 0.2 s measured slower here than 0.5 s: the
    # polling competes with the workers for the two cores.
    with local_ray(num_cpus=8, env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}) as ray:
        yield ray


@pytest.fixture(scope="module")
def ray_whole(tmp_path_factory, ray_local):
    """An uninterrupted run of tiny.yaml with 2 workers on a 2-shard table that another
    job made (store.connect), as the trainer makes its own: the same seed and optimizer,
    stepping on the last of 2 pushes (2 workers x 1 memory layer)."""
    tmp = tmp_path_factory.mktemp("ray")
    args = config("tiny", tmp, "workers=2", "store.name=t-whole", "store.connect=true")
    ((rows, dim),) = table_specs(args.model_args(StepData(args).vocab_size)).values()
    table = memstore.create_table(
        "t-whole-memory",
        rows,
        dim,
        shards=2,
        seed=args.seed + 1,
        optimizer=memstore.Adam(lr=args.value_lr),
        pushes_per_step=2,
        step_on_push=True,
    )
    try:
        before = table.fingerprints()
        result = train(args)
        after = memstore.connect("t-whole-memory")  # left in place
        assert after.last_step == 12 and after.fingerprints() != before
    finally:
        memstore.drop_table("t-whole-memory")
    return args, result, metrics(args.run_dir)


def test_ray_train_workers_match_in_process(tmp_path, ray_whole):
    local = config("tiny", tmp_path / "local")
    train(local)
    remote, result, b = ray_whole
    a = metrics(local.run_dir)
    # the same function up to float summation order (two half-batches, two row blocks)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4, abs=1e-5)
    assert b[-1]["eval"]["recall"] == pytest.approx(a[-1]["eval"]["recall"], abs=2 / 256)
    run = Path(remote.run_dir)
    assert checkpoint.checkpoint_steps(run, ["memory"]) == [0, 4, 8, 12]
    assert (run / "checkpoint_manager_snapshot.json").exists()  # Ray Train's record
    assert result["start"] == 0 and not result["stopped"]


def test_an_existing_table_of_another_shape_is_refused_before_any_worker_starts(
    tmp_path, ray_local
):
    args = config("tiny", tmp_path, "workers=2", "store.name=t-ext", "store.connect=true")
    ((rows, dim),) = table_specs(args.model_args(StepData(args).vocab_size)).values()
    memstore.create_table("t-ext-memory", rows, dim + 1, shards=1)
    try:
        with pytest.raises(InvalidArgument, match="store.connect"):
            train(args)
    finally:
        memstore.drop_table("t-ext-memory")


def _same_run(rows: list[dict], whole: list[dict]) -> None:
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in whole], rel=1e-5)
    assert rows[-1]["eval"] == pytest.approx(whole[-1]["eval"], rel=1e-5)


def _attempt_starts(steps_file: Path) -> list[int]:
    """The first step of each attempt, from the steps rank 0 finished in order: an
    attempt that restarted from the checkpoint of step s goes on with step s + 1."""
    steps = [int(line) for line in steps_file.read_text().split()]
    return [s for i, s in enumerate(steps) if i == 0 or s != steps[i - 1] + 1]


def test_a_killed_worker_and_a_killed_shard_restart_the_run_from_their_checkpoints(
    tmp_path, ray_whole
):
    """One run meets both faults, so that one set of worker groups and tables serves
    both (each start costs processes). Rank 1's process is killed after step 6: Ray
    Train starts a new worker group, which resumes from the checkpoint of step 4. A
    shard is killed after step 10: it restarts from the store checkpoint of step 8, a
    worker's next call raises StoreRolledBack(8), and Ray Train restarts the workers from
    the checkpoint of step 8, whose store checkpoint rank 0 reloads. The job is then
    stopped after step 11; a --resume continues from step 8 and the run ends as the
    uninterrupted one."""
    done = tmp_path / "steps-of-rank-0"

    def kill_rank_1_then_a_shard(step, rank):
        import ray

        from memstore.table import NAMESPACE, shard_name

        if rank == 0:
            with open(done, "a") as f:
                f.write(f"{step}\n")
        worker_killed, shard_killed = tmp_path / "worker-killed", tmp_path / "shard-killed"
        if step == 6 and rank == 1 and not worker_killed.exists():
            worker_killed.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        if step == 10 and rank == 0 and not shard_killed.exists():
            shard_killed.touch()
            # kill -9 of its process: gone before step 11 begins (ray.kill would take
            # effect a moment later, possibly after the step).
            shard = ray.get_actor(shard_name("t-kill-memory", 0, 0), namespace=NAMESPACE)
            os.kill(ray.get(shard.info.remote())["pid"], signal.SIGKILL)

    cut = config("tiny", tmp_path, "workers=2", "store.name=t-kill")
    result = train(cut, on_step=kill_rank_1_then_a_shard, stop_after=11)  # then "killed"
    assert result["start"] == 8 and result["stopped"]
    assert _attempt_starts(done) == [1, 5, 9]
    assert [r["step"] for r in metrics(cut.run_dir)] == list(range(1, 12))
    # Its tables went with the job: --resume loads the store checkpoint of step 8 into
    # new tables and the model checkpoint of step 8 into new workers.
    result = train(cut, resume=True, on_step=kill_rank_1_then_a_shard)  # kills no more
    assert result["start"] == 8 and _attempt_starts(done) == [1, 5, 9, 9]
    _same_run(metrics(cut.run_dir), ray_whole[2])
    with pytest.raises(memstore.TableNotFound):  # dropped at the end (store.keep false)
        memstore.connect("t-kill-memory")


def _all_cpus_free(ray) -> float:
    """The cluster's CPUs once all are free again: the previous test's workers and
    shards give theirs back a moment after its run returns."""
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 120  # a hang guard only
    while ray.available_resources().get("CPU", 0.0) != total:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
    return total


def test_a_run_the_cluster_cannot_place_is_refused_at_once(tmp_path, ray_local):
    """8 logical CPUs: 6 workers x 1 CPU and 4 shards x 1 CPU do not fit, and the run
    fails before any table or worker is placed (Ray Train would wait and retry), naming
    what was asked, what the cluster has and the settings to change."""
    free = _all_cpus_free(ray_local)
    args = config(
        "tiny", tmp_path, "workers=6", "batch_size=18", "store.name=t-big", "store.shards=4"
    )
    with pytest.raises(InvalidArgument, match="ray.cpus_per_worker") as refused:
        train(args)
    message = str(refused.value)
    assert "6 workers x 1 CPU" in message and "4 shards" in message
    assert f"{free:g} free CPUs" in message
    assert not memstore.table.table_exists("t-big-memory")
    assert ray_local.available_resources()["CPU"] == free
