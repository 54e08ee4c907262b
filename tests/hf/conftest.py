import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread():
    """The models are tiny: with 2 threads on busy cores their matmuls wait on each
    other (measured: a Trainer step 1 s instead of 0.08 s), so one thread, then back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
