import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    # One intra-op thread: this CI machine is shared and has two cores; a contended
    # OpenMP pool makes tiny ops take milliseconds. Results stay deterministic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
