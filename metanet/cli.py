"""The ``metanet`` command: spaces, train, evaluate, generate, inspect.

User mistakes print one line (``metanet: error: ...``) and exit with status 2, never a
traceback; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user typed or pointed at."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UsageError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return v


# ------------------------------------------------------------------------------ spaces


def _cmd_spaces(args: argparse.Namespace) -> int:
    from .space import builtin_path, builtin_spaces, load

    if args.action == "list":
        for name in builtin_spaces():
            sp = load(builtin_path(name))
            print(f"{name:16s} {sp.task.kind:15s} input {list(sp.task.input)}  {len(sp.cells)} cells, {len(sp.edges)} edges  {sp.description}")
        return 0
    if args.action == "validate":
        if not args.files:
            raise UsageError("spaces validate: give one or more YAML files")
        for f in args.files:
            sp = load(f)
            print(f"{f}: ok ({sp.name}: {len(sp.cells)} cells, {len(sp.edges)} edges, alpha {list(sp.alpha_shape)})")
        return 0
    if len(args.files) != 1:
        raise UsageError("spaces show: give exactly one YAML file or built-in space name")
    print(_describe_space(load(args.files[0])))
    return 0


def _describe_space(sp) -> str:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .executor import compile, forward, init_params, param_count

    plan = compile(sp)
    params = init_params(plan, torch.Generator().manual_seed(0))
    lines = [f"space {sp.name}: {sp.task.kind}, input {list(sp.task.input)}, {sp.task.outputs} outputs, norm {sp.norm}"]
    if sp.description:
        lines.append(f"  {sp.description}")
    lines.append(f"stem: {sp.stem.op} -> {sp.stem.channels}    head: {sp.head.op}")
    image = sp.task.domain == "image"
    size = list(sp.task.input[1:]) if image else []
    for ci, (spec, cp) in enumerate(zip(sp.cells, plan.cells)):
        keep = "all" if spec.keep is None else spec.keep
        width = "channels" if image else "width"
        res = f" at {size[0]}x{size[1]}" if image else ""
        lines.append(f"cell {ci}: {spec.type}, {width} {spec.channels}{res}, {spec.nodes} nodes over {spec.inputs} input(s), output {spec.output}, keep {keep}, zero may win: {str(spec.allow_zero).lower()}, {len(cp.edges)} edges")
        lines.append(f"  {'op':22s} {'weights/edge':>12s} {'MFLOPs/edge':>12s}  (per input sample; stride-1 edge)")
        e = next((e for e in cp.edges if e.stride == 1), cp.edges[0])
        shape = (1, spec.channels, *size) if image else (1, spec.channels)
        x = torch.randn(shape)
        for call in e.ops:
            n = sum(math.prod(params[name].shape) for _, name in call.params)
            with FlopCounterMode(display=False) as fc:
                call(x, params, spec.channels, e.stride)
            lines.append(f"  {call.label:22s} {n:12d} {fc.get_total_flops() / 1e6:12.3f}  {call.op.doc}")
        if image and spec.reduction:
            size = [(s + 1) // 2 for s in size]
    x = torch.randn(1, *sp.task.input)
    alpha = sp.alpha_mask.float() / sp.alpha_mask.sum(-1, keepdim=True)
    with FlopCounterMode(display=False) as fc:
        forward(plan, alpha, params, x)
    lines.append(f"supernet: {param_count(plan)} weights in {len(plan.slots)} tensors, {fc.get_total_flops() / 1e6:.2f} MFLOPs per sample (all ops, unfused)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- train


def _train_config(args: argparse.Namespace):
    from .trainer import TrainConfig

    defaults = TrainConfig()
    over = {k: v for k, v in vars(args).items() if k in {f for f in TrainConfig.__dataclass_fields__} and v is not None}
    if args.first_order and args.reptile:
        raise UsageError("train: --first-order and --reptile exclude each other")
    if args.first_order:
        over["order"] = "first"
    if args.reptile:
        over["order"] = "reptile"
    for flag in ("meta_sgd", "adapt_alpha", "gumbel", "hard"):
        if getattr(args, flag):
            over[flag] = True
    if args.no_metadata:
        over["use_metadata"] = False
    if args.no_fused:
        over["fused"] = False
    if args.minutes is not None and args.steps is None:
        over["steps"] = None
    if args.tasks == "omniglot":
        over.setdefault("queries", 15)
        over.setdefault("shots", 1)
        over.setdefault("inner_lr", 0.4)
        over.setdefault("meta_batch", 16)
        over.setdefault("space", "conv_omniglot")
    return dataclasses_replace(defaults, over)


def dataclasses_replace(obj, over: dict):
    import dataclasses

    return dataclasses.replace(obj, **over)


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train

    out = Path(args.out)
    if args.resume:
        if not (out / "last.pt").exists():
            raise UsageError(f"train --resume: {out} has no last.pt to resume from")
        result = train(None, out, resume=True, progress=not args.quiet)  # type: ignore[arg-type]
    else:
        if (out / "last.pt").exists() and not args.overwrite:
            raise UsageError(f"train: {out} already holds a run; use --resume to continue it or --overwrite to start again")
        cfg = _train_config(args)
        result = train(cfg, out, progress=not args.quiet)
    print(json.dumps(result))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import dataclasses

    from .meta import evaluate
    from .tasks import fixed_episodes
    from .trainer import build_tasks, load_run

    model, cfg = load_run(args.run)
    over = {k: getattr(args, k) for k in ("ways", "shots", "queries", "data_root") if getattr(args, k) is not None}
    if args.tasks is not None:
        over["tasks"] = args.tasks
    cfg = dataclasses.replace(cfg, **over)
    if cfg.ways != model.space.task.outputs and model.kind == "classification":
        raise UsageError(f"evaluate: the run was trained for {model.space.task.outputs}-way tasks, not {cfg.ways}-way")
    split = args.split or ("val" if cfg.tasks == "omniglot" else None)
    dist = build_tasks(cfg, split)
    steps = args.inner_steps if args.inner_steps is not None else cfg.eval_inner_steps
    episodes = fixed_episodes(dist, args.episodes, min(args.episodes, 25), seed=args.seed)
    result = evaluate(model, episodes, steps)
    metric = "accuracy" if model.kind == "classification" else "mse"
    print(json.dumps({"run": str(args.run), "tasks": cfg.tasks, "split": split, "shots": cfg.shots, "ways": cfg.ways if model.kind == "classification" else None, "inner_steps": steps, "episodes": result["n"], metric: result["mean"], "ci95": result["ci95"]}))
    return 0


# -------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``metanet`` command."""
    p = _Parser(prog="metanet", description="Meta-learn task-specific neural networks.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True

    sp = sub.add_parser("spaces", help="list, validate or show search spaces")
    sp.add_argument("action", choices=("list", "validate", "show"))
    sp.add_argument("files", nargs="*", help="YAML files (or built-in space names for show)")
    sp.set_defaults(func=_cmd_spaces)

    tr = sub.add_parser("train", help="meta-train the generators")
    tr.add_argument("--space", help="search space YAML or built-in name (default: mlp_regression)")
    tr.add_argument("--tasks", help="task distribution: sinusoid, multimodal, omniglot")
    tr.add_argument("--data-root", dest="data_root", help="dataset folder (omniglot)")
    tr.add_argument("--ways", type=_positive_int)
    tr.add_argument("--shots", type=_positive_int)
    tr.add_argument("--queries", type=_positive_int)
    tr.add_argument("--meta-batch", dest="meta_batch", type=_positive_int)
    tr.add_argument("--inner-steps", dest="inner_steps", type=_nonneg_int)
    tr.add_argument("--eval-inner-steps", dest="eval_inner_steps", type=_nonneg_int)
    tr.add_argument("--inner-lr", dest="inner_lr", type=_positive_float)
    tr.add_argument("--meta-lr", dest="meta_lr", type=_positive_float)
    tr.add_argument("--first-order", action="store_true")
    tr.add_argument("--reptile", action="store_true")
    tr.add_argument("--meta-sgd", dest="meta_sgd", action="store_true", help="learn per-weight inner step sizes")
    tr.add_argument("--adapt-alpha", dest="adapt_alpha", action="store_true", help="adapt the alpha logits in the inner loop")
    tr.add_argument("--arch", choices=("conditional", "shared", "fixed"))
    tr.add_argument("--weights", choices=("vae", "off"))
    tr.add_argument("--no-metadata", action="store_true", help="withhold task metadata")
    tr.add_argument("--no-fused", action="store_true", help="run mixed ops unfused (reference path)")
    tr.add_argument("--strategy", choices=("auto", "loop", "vmap"))
    tr.add_argument("--beta", type=_nonneg_float, help="KL weight")
    tr.add_argument("--entropy-weight", dest="entropy_weight", type=float)
    tr.add_argument("--temperature", type=_positive_float)
    tr.add_argument("--final-temperature", dest="final_temperature", type=_positive_float)
    tr.add_argument("--gumbel", action="store_true")
    tr.add_argument("--hard", action="store_true")
    tr.add_argument("--steps", type=_positive_int)
    tr.add_argument("--minutes", type=_positive_float)
    tr.add_argument("--val-every", dest="val_every", type=_positive_int)
    tr.add_argument("--val-tasks", dest="val_tasks", type=_positive_int)
    tr.add_argument("--seed", type=_nonneg_int)
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out")
    tr.add_argument("--overwrite", action="store_true", help="start again in an existing run directory")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate a run on fixed test tasks")
    ev.add_argument("run", help="run directory")
    ev.add_argument("--tasks")
    ev.add_argument("--split", help="omniglot split: train, val, background, evaluation")
    ev.add_argument("--data-root", dest="data_root")
    ev.add_argument("--ways", type=_positive_int)
    ev.add_argument("--shots", type=_positive_int)
    ev.add_argument("--queries", type=_positive_int)
    ev.add_argument("--episodes", type=_positive_int, default=600)
    ev.add_argument("--inner-steps", dest="inner_steps", type=_nonneg_int)
    ev.add_argument("--seed", type=_nonneg_int, default=1234)
    ev.set_defaults(func=_cmd_evaluate)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .graph import GenotypeError
    from .space import SpaceError
    from .tasks import TaskError
    from .trainer import ConfigError, NonFiniteError

    return (UsageError, SpaceError, TaskError, ConfigError, CheckpointError, GenotypeError, NonFiniteError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metanet`` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UsageError as e:
        print(f"metanet: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 -- only the user's mistakes are turned into one line
        if isinstance(e, _user_errors()):
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"metanet: error: {msg}", file=sys.stderr)
            return EXIT_USAGE
        raise
    except KeyboardInterrupt:
        print("metanet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
