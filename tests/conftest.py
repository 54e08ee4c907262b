"""The suite's shared settings: every Ray instance on loopback with a patient GCS start,
a fixed checkpoint secret, and every random generator reseeded before each test."""

import os
import random

import numpy as np
import pytest
import torch

# Keep every Ray instance the tests start on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# A GCS starting on 2 busy cores can take longer than Ray's default 30 s to write its
# port file.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
# The operator's checkpoint secret, which tables sign their checkpoints with: a fixed one
# for the suite (set before any Ray instance starts, so shards and Ray Train workers see
# it too), instead of a key file written under the user's home.
os.environ.setdefault("MEMSTORE_CHECKPOINT_SECRET", "memstore-test-suite-checkpoint-secret")


@pytest.fixture(autouse=True)
def reseed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
