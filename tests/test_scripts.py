"""The scripts the docs quote run as documented.

Every benchmark's ``--quick`` run prints exactly one JSON line of figures. The figures
themselves are not asserted (timings belong to the benchmarks, not to tests): the line
must parse and its ratios be finite and positive. The two example scripts of the README
run end to end and write what they say.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metanet.tasks import default_data_root

ROOT = Path(__file__).resolve().parents[1]
# bench_precision trains on Omniglot: without the data (../shared) it can only fail
_needs_omniglot = pytest.mark.skipif(default_data_root() is None, reason="Omniglot data absent (../shared/data/omniglot)")


def _numbers(d: object, path: str = "") -> list[tuple[str, float]]:
    if isinstance(d, dict):
        return [kv for k, v in d.items() for kv in _numbers(v, f"{path}.{k}")]
    if isinstance(d, list):
        return [kv for i, v in enumerate(d) for kv in _numbers(v, f"{path}[{i}]")]
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        return [(path, float(d))]
    return []


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,ratios",
    [
        ("fused", ["edge.speedup", "edge.memory_ratio", "conv_omniglot.speedup", "darts_cnn.speedup"]),
        ("meta", ["speedup_vs_clone.ours_loop", "speedup_vs_clone.ours_loop_bf16", "speedup_vs_clone.ours_loop_first_order", "speedup_vs_clone.ours_loop_query_only", "speedup_vs_clone.ours_loop_aten_conv_derivative", "query_pass_speedup_vs_clone.ours_loop", "fraction_of_peak", "processes.speedup_vs_clone_loop", "processes.fraction_of_peak"]),
        ("generate", ["conv_omniglot.generation_ms", "mlp_regression.generation_ms", "meta_memory.ratio"]),
        pytest.param("precision", ["speedup_bf16_vs_fp32", "fp32.accuracy", "bf16.accuracy"], marks=_needs_omniglot),
        ("compile", ["step_ms.eager", "step_ms.compiled"]),
        ("data", ["load.first_load_s", "load.cached_load_s", "sampling.conv4_miniimagenet.share"]),
        ("memory", ["ratio_5_to_1.ours", "ratio_5_to_1.ours_checkpointed", "ours_checkpointed.5.peak_rise_mb", "ratio_5_to_1.ours_implicit"]),
    ],
)  # fmt: skip
def test_quick_benchmark_prints_one_json_line(name: str, ratios: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"bench_{name}.py"), "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout[-2000:]
    figures = json.loads(lines[0])
    assert figures["bench"] == name and figures["quick"] is True
    assert figures["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # figures depend on it
    numbers = dict(_numbers(figures))
    for key in ratios:
        value = numbers[f".{key}"]
        assert math.isfinite(value) and value > 0, (key, value)
    if name == "meta":  # the second order's share pairs each strategy with its first-order twin
        share = figures["second_order_share"]
        assert set(share) == ({"ours_loop", "ours_threads"} if figures["threads"] > 1 else {"ours_loop"}), share
        steps = figures["step_s"]  # each share from its own pair of timings (rounded to ms)
        assert all(abs(v - (1 - steps[f"{k}_first_order"] / steps[k])) < 0.02 for k, v in share.items()), (share, steps)
        query = figures["query_pass_speedup_vs_clone"]  # ours' query pass alone against the clone loop's
        assert set(query) == set(share), query
        assert all(abs(v - steps["clone_loop_query_only"] / steps[f"{k}_query_only"]) < 0.05 * v for k, v in query.items()), (query, steps)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize(
    "name,ratios",
    [
        ("meta", ["speedup_vs_clone.ours_loop", "fraction_of_peak", "meta_grad_max_rel_diff_vs_clone"]),
        ("memory", ["ratio_5_to_1.ours", "ratio_5_to_1.ours_checkpointed", "ours_checkpointed.5.peak_rise_mb"]),
        ("fused", ["edge.speedup", "conv_omniglot.speedup", "conv_miniimagenet.memory_ratio"]),
    ],
)  # fmt: skip
def test_quick_benchmark_runs_on_a_cuda_device(name: str, ratios: list[str]) -> None:
    """Where there is a GPU, the benchmarks that time and size a meta-step run on it too."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"bench_{name}.py"), "--quick", "--device", "cuda"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["device"] == torch.cuda.get_device_name()
    numbers = dict(_numbers(figures))
    for key in ratios:
        value = numbers[f".{key}"]
        assert math.isfinite(value) and value >= 0, (key, value)


@pytest.mark.parametrize("name", ["meta", "memory", "fused"])
def test_a_benchmark_refuses_a_device_it_cannot_use(name: str) -> None:
    devices = [("tpu", "--device must be cpu, cuda or cuda:N, got 'tpu'")]
    if not torch.cuda.is_available():
        devices.append(("cuda", "--device cuda: no such CUDA device here"))
    for device, message in devices:
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / f"bench_{name}.py"), "--device", device], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stdout == ""
        assert message in out.stderr.strip().splitlines()[-1] and "Traceback" not in out.stderr


def _script(name: str, *args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_generate_example_writes_a_graph_per_family(tmp_path: Path) -> None:
    stdout = _script("generate_example.py", "--steps", "20", "--out", str(tmp_path / "graphs"), cwd=tmp_path)
    for family in ("sinusoid", "linear", "tanh"):
        assert (tmp_path / "graphs" / f"{family}.png").stat().st_size > 0
        assert (tmp_path / "graphs" / f"{family}.dot").read_text().startswith("digraph")
        assert any(line.startswith(family) for line in stdout.splitlines())


def test_custom_tasks_example_runs() -> None:
    assert "validation episodes" in _script("custom_tasks_example.py")
