"""Test-wide settings."""

import torch

# The suite runs many tiny ops; one intra-op thread avoids oversubscribing 2 cores (and is
# faster for tensors this small). Benchmarks, not tests, measure threaded throughput.
torch.set_num_threads(1)
