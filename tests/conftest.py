import fcntl
import os
import random
import tempfile

import numpy as np
import pytest
import torch

# Keep every Ray instance the tests start on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# A GCS starting beside another test process on 2 busy cores can take longer than
# Ray's default 30 s to write its port file.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")


@pytest.fixture(autouse=True)
def reseed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module", autouse=True)
def one_raylet_cluster_at_a_time(request):
    """The suite runs in two processes of whole test files (pytest-xdist, pyproject's
    addopts). Files that start real raylets (marker `cluster`) take turns, so that two
    multi-node clusters never start at once on a 2-core machine."""
    if request.node.get_closest_marker("cluster") is None:
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), "memstore-tests-raylets.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
