"""Shared fixtures."""

import pytest
import torch


@pytest.fixture()
def one_thread():
    # Tiny models are all overhead: with several test processes on two cores, OpenMP threads spin-wait on each other
    # (measured 10-35x slower per step with 2 threads under load); one intra-op thread each contends least.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
