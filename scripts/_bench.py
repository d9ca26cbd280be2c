"""Shared by the scripts/bench_*.py benchmarks: interleaved, repeated, median timing, the
device a benchmark runs on, and glibc set as ``metanet train`` sets it."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from metanet.compile import synchronize  # noqa: F401 - the benchmarks take it from here
from metanet.trainer import reuse_freed_memory


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device | None = None) -> dict[str, float]:
    """Median seconds of each function, alternating them ``repeats`` times (after a warm-up);
    each time ends when ``device`` has finished the function's kernels."""
    for fn in fns.values():
        fn()
    synchronize(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            synchronize(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def device_arg(ap: argparse.ArgumentParser) -> None:
    """Add ``--device`` (cpu, cuda or cuda:N) to a benchmark's arguments."""
    ap.add_argument("--device", default="cpu", help="where to run: cpu (default), cuda or cuda:N")


def freed_memory_arg(ap: argparse.ArgumentParser) -> None:
    """Add ``--reuse-freed-memory`` (glibc set as ``metanet train`` sets it) to a benchmark's arguments."""
    ap.add_argument("--reuse-freed-memory", action="store_true", help="call trainer.reuse_freed_memory() first, as metanet train does (process-wide: compare two runs)")


def freed_memory(args: argparse.Namespace) -> bool:
    """``trainer.reuse_freed_memory()`` where ``--reuse-freed-memory`` was given: whether it took."""
    return reuse_freed_memory() if args.reuse_freed_memory else False


def bench_device(ap: argparse.ArgumentParser, name: str) -> torch.device:
    """The ``--device`` a benchmark was given, refused in one line where there is no such device."""
    try:
        device = torch.device(name)
    except RuntimeError:
        ap.error(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        ap.error(f"--device {name}: no such CUDA device here (torch {torch.__version__}, {torch.cuda.device_count()} CUDA devices)")
    return device


def machine(device: torch.device) -> dict[str, str]:
    """What a figure was measured on: the CPU's instruction set and, on a GPU, its name."""
    out = {"device": "cpu", "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        out["device"] = torch.cuda.get_device_name(device)
    return out
