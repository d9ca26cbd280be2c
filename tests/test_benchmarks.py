"""Every benchmark's ``--quick`` run works and prints exactly one JSON line of figures.

The figures themselves are not asserted: timings belong to the benchmarks, not to tests.
What is checked is that the scripts the performance docs quote still run as documented,
and that what they print is one parseable line whose ratios are finite and positive.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
        ("meta", ["speedup_vs_clone.ours_loop", "speedup_vs_clone.ours_loop_bf16", "fraction_of_peak"]),
        ("generate", ["conv_omniglot.generation_ms", "mlp_regression.generation_ms", "meta_memory.ratio"]),
        ("precision", ["speedup_bf16_vs_fp32", "fp32.accuracy", "bf16.accuracy"]),
        ("compile", ["step_ms.eager", "step_ms.compiled"]),
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
    numbers = dict(_numbers(figures))
    for key in ratios:
        value = numbers[f".{key}"]
        assert math.isfinite(value) and value > 0, (key, value)
