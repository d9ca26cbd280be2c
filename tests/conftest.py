"""Test-wide settings."""

import os
import tempfile

import pytest
import torch

# Decoded image datasets go to a cache folder of the test run's own, never the user's.
os.environ.setdefault("METANET_CACHE", tempfile.mkdtemp(prefix="metanet-test-cache-"))

# The suite runs many tiny ops; one intra-op thread avoids oversubscribing 2 cores (and is
# faster for tensors this small). Benchmarks, not tests, measure threaded throughput.
torch.set_num_threads(1)


@pytest.fixture
def two_threads():
    """Two intra-op threads for one test, whatever the machine (the ``threads`` strategy
    shares tasks among them), the count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
