"""Execution paths chosen by measurement on the machine at hand, and cached on disk.

Every execution choice gives the same maths (``ExecOptions``' layouts and fusions, and
one task at a time or ``vmap``); which is fastest depends on the CPU (AVX2 or AVX-512
with AMX), the thread count and the shapes. ``choose_paths`` times the meta-step of the
run with each candidate on its actual shapes and keeps the fastest (by more than 3%,
else the earlier candidate: the fast paths first). The candidates are the fast paths
under the strategies (loop, vmap, ``task``: the loop with one backward per task, and on
a CPU with several intra-op threads ``threads``: ``task`` with the tasks shared among
the threads), each fast path turned off alone, and every reference path at
once, so the choice is never slower than the reference by more than that 3% margin, as
measured. A candidate that runs exactly as one already timed (a switch that does not
apply to the space, such as edge groups on conv4) is not timed again, so timing noise
cannot choose it.

The choice is cached per machine and shape: one JSON file per key under
``<cache>/paths/`` (``METANET_CACHE``, else ``~/.cache/metanet``), written to a temporary
sibling and renamed, read with ``json`` only (nothing in it runs), and ignored unless it
is well formed and names the same key. The key is the CPU capability and model, torch's
version, the thread count, the device, the space, the model's configuration, the
meta-step's settings and the episode shapes: what makes one path faster than another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .compile import clock
from .distributed import PER_TASK, THREADS, meta_gradients
from .meta import MetaNet, precision
from .plan import ExecOptions, Plan, compile

__all__ = ["PathChoice", "choose_paths", "step_timer", "candidates", "runs_as", "PLAN_SWITCHES", "path_key", "cpu_model", "REFERENCE", "MARGIN"]

log = logging.getLogger(__name__)
_FLAGS = ("channels_last", "stem_im2col", "group_edges", "native_norm", "stem_fold", "stem_recompute")  # ExecOptions' switches
# a compiled Plan's switches: ExecOptions' as compile resolved them for the space, and the layout it derives
PLAN_SWITCHES = ("stem_im2col", "stem_channels_last", "channels_last", "group_edges", "native_norm", "stem_fold", "stem_recompute")
REFERENCE = ExecOptions(**{name: False for name in _FLAGS})  # every fast path off
# a candidate replaces the best so far only when faster by more than timing noise: paths
# that do not apply to a space (edge groups on conv4) time the same up to noise
MARGIN = 0.97
_VERSION = 5  # of the cache file's layout and candidates (2: the per-task backward; 3: convolution stems channels-last and folded; 4: the stem recomputed in chunks; 5: the tasks shared among threads)


@dataclass(frozen=True)
class PathChoice:
    """The chosen task strategy and execution options, the seconds each candidate took
    (``"loop"``, ``"vmap"``, ``"loop -channels_last"``, ``"loop reference"``, ...), and
    whether the choice came from the cache."""

    strategy: str
    options: ExecOptions
    times: dict[str, float]
    cached: bool = False

    def describe(self) -> str:
        off = [k for k, v in dataclasses.asdict(self.options).items() if v is False]
        return f"{self.strategy}, " + ("every fast path" if not off else "without " + ", ".join(off))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def candidates(image: bool, threads: bool = False) -> list[tuple[str, str, ExecOptions]]:
    """``(label, strategy, options)`` to time: the fast paths under loop, vmap, the per-task
    backward (``task``) and, with ``threads`` (a CPU with several intra-op threads and a
    meta-batch of several tasks), the tasks shared among the threads (``threads``), then
    (image spaces, where the layouts apply) each fast path off alone and all of them off.
    ``choose_paths`` skips a candidate that runs as one already timed (``runs_as``)."""
    fast = ExecOptions()
    out = [("loop", "loop", fast), ("vmap", "vmap", fast), (PER_TASK, PER_TASK, fast)]
    if threads:
        out.append((THREADS, THREADS, fast))
    if image:
        for name in _FLAGS:
            out.append((f"-{name}", "", dataclasses.replace(fast, **{name: False})))
        out.append(("reference", "", REFERENCE))
    return out


def runs_as(plan: Plan) -> tuple[bool, ...]:
    """``plan``'s switches as they change its execution: edge groups only where a cell has
    any, the native norm only where the space normalises (a folded convolution stem and the
    channels-last layouts are already off in a plan where they do not apply)."""
    on = {k: bool(getattr(plan, k)) for k in PLAN_SWITCHES}
    on["group_edges"] &= any(cp.groups for cp in plan.cells)
    on["native_norm"] &= plan.space.norm == "batch"
    return tuple(on.values())


def path_key(model: MetaNet, episode: Any, step: Mapping[str, Any], precision_name: str) -> dict[str, Any]:
    """What makes one path faster than another here (see the module docstring)."""
    return {
        "version": _VERSION,
        "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_model": cpu_model(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": _device_name(episode.support_x.device),
        "space": hashlib.sha256(model.space.text.encode()).hexdigest()[:16],
        "model": dataclasses.asdict(model.config), "step": {k: v for k, v in sorted(step.items()) if k != "strategy"},
        "precision": precision_name, "shapes": [list(episode.support_x.shape), list(episode.query_x.shape)],
    }  # fmt: skip


def _device_name(device: torch.device) -> str:
    """``cpu``, or the accelerator's model (a shared cache may serve several machines)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return str(device)


def _file(cache: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache / "paths" / f"{digest}.json"


def _read(path: Path, key: dict[str, Any]) -> PathChoice | None:
    """The cached choice at ``path`` for ``key``; None if absent, damaged or for another key."""
    try:
        data = json.loads(path.read_text())
        if data["key"] != key:
            return None
        options = ExecOptions(**{k: data["options"][k] for k in _FLAGS})
        if data["strategy"] not in ("loop", "vmap", PER_TASK, THREADS) or not all(isinstance(v, (bool, type(None))) for v in dataclasses.asdict(options).values()):
            return None
        return PathChoice(data["strategy"], options, {str(k): float(v) for k, v in data["times"].items()}, cached=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write(path: Path, key: dict[str, Any], choice: PathChoice) -> None:
    """Write the choice atomically (a temporary sibling, then a rename); a cache that cannot
    be written is only a cache."""
    data = {"key": key, "strategy": choice.strategy, "options": dataclasses.asdict(choice.options), "times": choice.times}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except (OSError, ValueError) as err:
        log.warning("could not cache the execution paths in %s: %s", path.parent, err)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


Timer = Callable[[str, ExecOptions], float]


def step_timer(model: MetaNet, episode: Any, step: Mapping[str, Any], precision_name: str, repeats: int = 2) -> Timer:
    """Seconds of the fastest of ``repeats`` meta-steps (forward and meta-gradient) of
    ``model`` on ``episode`` with a strategy and options; the model's plan is restored."""

    def timer(strategy: str, options: ExecOptions) -> float:
        plan = model.plan
        model.plan = compile(model.space, options)
        try:
            best = math.inf
            for _ in range(repeats):
                t = clock(episode.support_x)
                # the noise from a generator of its own: timing leaves the global RNG as it was
                noise = torch.Generator(episode.support_x.device).manual_seed(0)
                inputs = [p for p in model.parameters() if p.requires_grad]
                meta_gradients(model, episode, slice(0, episode.support_x.shape[0]), noise, inputs, lambda: precision(precision_name, episode.support_x.device), **{**step, "strategy": strategy})
                best = min(best, clock(episode.support_x) - t)  # the GPU's kernels, not their launch
            return best
        finally:
            model.plan = plan
            model.zero_grad(set_to_none=True)

    return timer


def choose_paths(model: MetaNet, episode: Any, step: Mapping[str, Any], precision_name: str = "fp32", *, cache: Path | None = None, timer: Timer | None = None) -> PathChoice:
    """The fastest strategy and execution options for ``model``'s meta-step on ``episode``.

    ``step``: ``meta_loss``'s keyword arguments (the strategy among them is ignored).
    ``cache``: the cache folder (None: measure, write nothing). ``timer``: seconds of one
    candidate (default: ``step_timer``; tests pass their own). The strategy is chosen
    first with the fast paths; the option candidates then run under that strategy.
    """
    key = path_key(model, episode, step, precision_name)
    path = _file(cache, key) if cache is not None else None
    if path is not None and (hit := _read(path, key)) is not None:
        return hit
    timer = timer or step_timer(model, episode, step, precision_name)
    times: dict[str, float] = {}
    best: tuple[float, str, ExecOptions] | None = None
    timed: set[tuple[str, tuple[bool, ...]]] = set()
    threads = episode.support_x.device.type == "cpu" and torch.get_num_threads() > 1 and episode.support_x.shape[0] > 1
    for label, strategy, options in candidates(model.plan.image, threads):
        strategy = strategy or best[1]  # the option candidates: under the faster strategy
        if label.startswith(("-", "reference")):
            label = f"{strategy} {label}"
        execution = (strategy, runs_as(compile(model.space, options)))
        if execution in timed:  # a switch that does not apply to this space: the same run again
            continue
        timed.add(execution)
        times[label] = timer(strategy, options)
        if best is None or times[label] < MARGIN * best[0]:
            best = (times[label], strategy, options)
    choice = PathChoice(best[1], best[2], times)
    if path is not None:
        _write(path, key, choice)
    return choice
