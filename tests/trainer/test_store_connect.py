"""``store.connect``: a run on a table another job made checks, before any worker starts,
that the table fits the model and steps after exactly this run's pushes per step."""

import pytest

import memstore
from memstore import InvalidArgument
from memstore.trainer.data import StepData
from memstore.trainer.ray_train import StoreTables
from memstore.trainer.train import table_specs
from tests.local_ray import local_ray

from .helpers import config

WORKERS = 2  # tiny.yaml has one memory layer: a step of the run is 2 pushes


@pytest.fixture(scope="module")
def ray_local():
    with local_ray(num_cpus=4) as ray:
        yield ray


def _made_by_another_job(args, **options) -> memstore.Table:
    ((rows, dim),) = table_specs(args.model_args(StepData(args).vocab_size)).values()
    return memstore.create_table(
        args.table_name("memory"), rows, dim, shards=1, timeout_s=120, **options
    )


def test_a_table_stepping_after_another_count_of_pushes_is_refused(tmp_path, ray_local):
    pushes = WORKERS + 1
    args = config(
        "tiny", tmp_path, f"workers={WORKERS}", f"store.name=sc{pushes}", "store.connect=true"
    )
    table = _made_by_another_job(args, pushes_per_step=pushes, step_on_push=True)
    try:
        before = table.fingerprints()
        stores = StoreTables(args, str(tmp_path / "root"), WORKERS)
        for call in (lambda: stores.check_existing("memory"), lambda: stores.prepare(0, None)):
            with pytest.raises(InvalidArgument) as e:
                call()
            assert e.value.field == "store.connect"
            assert e.value.got == f"pushes_per_step={pushes}"
            assert f"steps after {WORKERS} pushes" in str(e.value)
        assert table.fingerprints() == before and table.last_step == 0
    finally:
        memstore.drop_table(table.name)


def test_a_table_stepping_after_this_runs_pushes_is_taken(tmp_path, ray_local):
    args = config("tiny", tmp_path, f"workers={WORKERS}", "store.name=sc2", "store.connect=true")
    table = _made_by_another_job(args, pushes_per_step=WORKERS, step_on_push=True)
    try:
        stores = StoreTables(args, str(tmp_path / "root"), WORKERS)
        assert stores.check_existing("memory").name == table.name
        stores.prepare(0, None)  # the table, at step 0, is where the run starts
    finally:
        memstore.drop_table(table.name)
