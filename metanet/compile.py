"""torch.compile for metanet: discrete networks, and a meta-training step checked against eager.

Two uses, with different trust:

- ``compile_network(module)``: a generated discrete network is an ordinary first-order
  module (``DiscreteNetwork``), so ``torch.compile`` is as safe as for any model; use it for
  inference and fine-tuning. The compiled module shares its parameters with ``module``.
- ``checked_compile(step_fn, example)``: a MAML meta-step differentiates through the
  inner loop (a gradient of a gradient). PyTorch issues 98825 and 181581 report
  ``torch.compile`` failing on functorch-style MAML, or silently dropping the higher-order
  part of the graph, which leaves a plausible but wrong (first-order) meta-gradient. So
  the compiled step is run once on ``example`` next to the eager step; it is used only if
  it compiles, runs and gives the same outputs to a relative tolerance. Otherwise the
  eager step is used and a warning is logged with the reason.

Compiling takes tens of seconds on 2 CPU cores (40-115 s measured for a conv MAML step);
it pays only for long runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["compile_network", "checked_compile", "CheckedStep", "compare_outputs", "clock", "synchronize"]

log = logging.getLogger(__name__)

Compiler = Callable[[Callable[..., Any]], Callable[..., Any]]


def compile_network(module: nn.Module, *, mode: str | None = None, dynamic: bool | None = None, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` a discrete network for inference and fine-tuning.

    Args:
        module: a ``DiscreteNetwork`` (``GeneratedNetwork.module``) or any module; a
            ``GeneratedNetwork`` is accepted too and its ``module`` compiled.
        mode: ``torch.compile`` mode (None: default; ``"max-autotune"`` compiles longer).
        dynamic: symbolic shapes (None: PyTorch decides after a shape changes).
        backend: ``torch.compile`` backend.

    Returns:
        The compiled module. It shares parameters with ``module``: an optimizer built on
        either one trains both, and ``state_dict`` keys are those of ``module`` under
        ``_orig_mod.``.
    """
    if not isinstance(module, nn.Module):
        module = getattr(module, "module", module)
    if not isinstance(module, nn.Module):
        raise TypeError(f"compile_network expects an nn.Module or a GeneratedNetwork, got {type(module).__name__}")
    return torch.compile(module, dynamic=dynamic, backend=backend, **_inductor_args(mode, backend))


def _inductor_args(mode: str | None, backend: str) -> dict[str, Any]:
    """``mode``/``options`` for torch.compile, with inductor's layout optimisation off.

    Inductor converts convolutions to channels_last. On this build (torch 2.13 CPU,
    oneDNN 3.12) the weight gradient of a channels_last 1x1 stride-2 convolution with few
    channels corrupts the heap (eager too: ``free(): invalid size`` or a wrong gradient),
    which is the factorised-reduce skip of every reduction cell. NCHW stays exact.
    """
    if backend != "inductor":
        return {"mode": mode}
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode)) if mode else {}
    options["layout_optimization"] = False
    return {"options": options}


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(path, leaf) pairs of nested tuples, lists and mappings, in a stable order."""
    if isinstance(tree, Mapping):
        return [leaf for k in tree for leaf in _leaves(tree[k], f"{prefix}[{k!r}]")]
    if isinstance(tree, (tuple, list)):
        return [leaf for i, v in enumerate(tree) for leaf in _leaves(v, f"{prefix}[{i}]")]
    return [(prefix or "output", tree)]


def compare_outputs(got: Any, expected: Any, rtol: float = 1e-4, atol: float = 1e-6) -> tuple[bool, float, str]:
    """Compare two step outputs (nested tuples/lists/dicts of tensors and numbers).

    Each tensor leaf must satisfy ``|got - expected| <= atol + rtol * max|expected|``: a
    tolerance relative to the leaf's scale, since compiled kernels reorder reductions.

    Returns:
        ``(equal, worst relative error, message naming the first bad leaf or "")``.
    """
    a, b = _leaves(got), _leaves(expected)
    if [p for p, _ in a] != [p for p, _ in b]:
        return False, math.inf, f"structure differs: {[p for p, _ in a]} vs {[p for p, _ in b]}"
    worst = 0.0
    for (path, x), (_, y) in zip(a, b):
        if (x is None and isinstance(y, Tensor)) or (y is None and isinstance(x, Tensor)):
            # autograd.grad(allow_unused=True) gives None where a compiled graph may give zeros
            t = x if y is None else y
            if bool((t != 0).any()):
                return False, math.inf, f"{path}: None against a non-zero tensor"
            continue
        if isinstance(y, Tensor) or isinstance(x, Tensor):
            if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
                return False, math.inf, f"{path}: {type(x).__name__} vs {type(y).__name__}"
            if x.shape != y.shape:
                return False, math.inf, f"{path}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
            x, y = x.detach().double(), y.detach().double()
            if not bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all()):
                return False, math.inf, f"{path}: non-finite values"
            scale = float(y.abs().max()) if y.numel() else 0.0
            err = float((x - y).abs().max()) if y.numel() else 0.0
            rel = err / scale if scale > 0 else err
            worst = max(worst, rel)
            if err > atol + rtol * scale:
                return False, worst, f"{path}: max |difference| {err:.3g} against max |value| {scale:.3g} (rtol {rtol:g})"
        elif x is None or y is None:
            if x is not y:
                return False, math.inf, f"{path}: {x!r} vs {y!r}"
        elif isinstance(y, (int, float)):
            err = abs(float(x) - float(y))
            if err > atol + rtol * abs(float(y)):
                return False, math.inf, f"{path}: {x!r} vs {y!r}"
    return True, worst, ""


@dataclass
class CheckedStep:
    """A meta-step function chosen by ``checked_compile``; call it like the step itself.

    Attributes:
        fn: the function in use (the compiled step, or the eager one).
        compiled: whether ``fn`` is the compiled step.
        reason: why the eager step is used ("" when compiled).
        max_rel_error: worst relative difference of the checked outputs (inf if not compared).
        compile_s: seconds of the first compiled call (compilation included).
        eager_s: seconds of the eager reference call.
    """

    fn: Callable[..., Any]
    compiled: bool
    reason: str = ""
    max_rel_error: float = math.inf
    compile_s: float = math.nan
    eager_s: float = math.nan

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def synchronize(device: torch.device | None) -> None:
    """Wait for the kernels queued on ``device`` (a CUDA device runs them asynchronously: a
    clock read at once would time their launch); a no-op on the CPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(*tensors: Any) -> float:
    """``time.perf_counter()`` once the work queued for ``tensors``' device has finished
    (``synchronize``). Non-tensors among ``tensors`` are ignored."""
    device = next((t.device for t in tensors if isinstance(t, Tensor) and t.is_cuda), None)
    synchronize(device)
    return time.perf_counter()


def checked_compile(
    step_fn: Callable[..., Any],
    example: Sequence[Any],
    *,
    mode: str | None = None,
    backend: str = "inductor",
    rtol: float = 1e-4,
    atol: float = 1e-6,
    compiler: Compiler | None = None,
) -> CheckedStep:
    """Compile a meta-training step if it gives the same meta-gradients as eager.

    ``step_fn(*example)`` must return the step's results as tensors (for example the loss
    and the meta-gradients of the generator parameters, computed inside it with
    ``torch.autograd.grad`` or ``torch.func.grad``) and must be deterministic for given
    arguments (draw randomness from an explicit ``torch.Generator``, or not at all: compiled
    and eager code do not share random streams). It should not update state (no optimizer
    step inside): it runs twice on ``example``.

    Args:
        step_fn: the eager step.
        example: arguments of the first step.
        mode, backend: passed to ``torch.compile``.
        rtol, atol: tolerance of the comparison (see ``compare_outputs``).
        compiler: replaces ``torch.compile`` (tests inject a wrong "compiler" with it).

    Returns:
        A ``CheckedStep`` wrapping the compiled step, or the eager one (with a logged
        warning) when compilation or the first compiled call fails or the outputs differ.
    """
    compile_fn = compiler or (lambda f: torch.compile(f, backend=backend, **_inductor_args(mode, backend)))
    t = clock(*example)
    expected = step_fn(*example)
    eager_s = clock(*example) - t

    def eager(reason: str, err: float = math.inf, compile_s: float = math.nan) -> CheckedStep:
        log.warning("meta-step not compiled, running eager: %s", reason)
        return CheckedStep(step_fn, False, reason, err, compile_s, eager_s)

    t = clock(*example)
    try:
        compiled = compile_fn(step_fn)
        got = compiled(*example)
    except Exception as e:  # noqa: BLE001 - any compiler failure means: stay eager
        first = (str(e).strip().splitlines() or [""])[0]
        return eager(f"compilation failed ({type(e).__name__}: {first[:300]})", compile_s=time.perf_counter() - t)
    compile_s = clock(*example) - t
    same, err, why = compare_outputs(got, expected, rtol, atol)
    if not same:
        return eager(f"compiled outputs differ from eager ({why})", err, compile_s)
    log.info("meta-step compiled (%.1f s; max relative difference to eager %.2g)", compile_s, err)
    return CheckedStep(compiled, True, "", err, compile_s, eager_s)
