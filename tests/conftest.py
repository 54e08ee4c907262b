import os
import random

import numpy as np
import pytest
import torch

# Keep every Ray instance the tests start on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(autouse=True)
def reseed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
