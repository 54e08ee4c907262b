import os

import pytest

from tests.local_ray import local_ray

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="module")
def ray_start_16_cpus():
    """One local Ray instance per test module, on loopback."""
    # Logical CPUs: each shard reserves one in its placement group, and a test may hold
    # several tables at once.
    with local_ray(num_cpus=16) as ray:
        yield ray


@pytest.fixture
def table_names():
    """Unique table names, dropped after the test whatever happens."""
    import memstore

    made = []

    def name(prefix: str) -> str:
        made.append(f"{prefix}-{len(made)}")
        return made[-1]

    yield name
    for n in made:
        try:
            memstore.drop_table(n)
        except memstore.TableNotFound:
            pass
