"""The examples run as typed on a cluster the size of this project's 2-core machine, and
one asked for more than the cluster has fails at once, saying what to change.

examples/ray_train_memory.py sizes its shards and workers from the cluster's free CPUs;
here Ray offers exactly 2 CPUs, as `ray.init()` does on a 2-core machine.
"""

import importlib.util
import re
from pathlib import Path

import pytest

import memstore
from tests.local_ray import local_ray

REPO = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_cpus():
    with local_ray(num_cpus=2) as ray:
        yield ray


def test_the_ray_train_example_fits_two_cpus_and_trains(two_cpus, tmp_path):
    example = load_example("ray_train_memory")
    accuracy = example.main(workers=2, steps=60, storage_path=str(tmp_path))
    assert accuracy > 0.5  # chance: 1/16
    with pytest.raises(memstore.TableNotFound):
        memstore.connect("example-recall")  # dropped at the end


def test_more_workers_than_the_cluster_holds_fail_before_ray_train_starts(two_cpus, tmp_path):
    example = load_example("ray_train_memory")
    with pytest.raises(SystemExit) as refused:
        example.main(workers=8, steps=1, storage_path=str(tmp_path), cpus_per_worker=1)
    message = str(refused.value)
    assert "8 workers x 1 CPU" in message  # what was asked
    assert re.search(r"the cluster has [\d.]+ free CPUs", message)  # what there is
    assert "--workers or --cpus-per-worker" in message  # what to change
    with pytest.raises(memstore.TableNotFound):
        memstore.connect("example-recall")  # nothing was placed


@pytest.mark.parametrize("cpus, workers", [(2.0, 2), (2.0, 1), (0.5, 2), (16.0, 4)])
def test_the_shares_of_shards_and_workers_never_exceed_the_cpus(cpus, workers):
    example = load_example("ray_train_memory")
    per_shard, per_worker = example.cpu_shares(cpus, workers, None)
    assert 0 < per_shard <= 1 and 0 < per_worker <= 1
    assert example.SHARDS * per_shard + workers * per_worker <= cpus + 1e-9
