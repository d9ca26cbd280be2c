"""The ``metanet`` command: spaces, train, evaluate, generate, inspect.

User mistakes print one line (``metanet: error: ...``) and exit with status 2, never a
traceback; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import number_type

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user typed or pointed at."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""  # "metanet train": "train"
        raise UsageError(f"{command}: {message}" if command else message)


_positive_int = number_type("pos_int")
_nonneg_int = number_type("nonneg_int")


# ------------------------------------------------------------------------------ spaces


def _cmd_spaces(args: argparse.Namespace) -> int:
    from .space import builtin_path, builtin_spaces, load

    if args.action == "list":
        if args.files:
            raise UsageError(f"spaces list: takes no arguments, got {args.files[0]!r} (spaces show NAME describes one)")
        rows = [(name, load(builtin_path(name))) for name in builtin_spaces()]
        cols = [[name, sp.task.kind, f"input {list(sp.task.input)}", f"{len(sp.cells)} cells, {len(sp.edges)} edges", sp.description] for name, sp in rows]
        widths = [max(len(c[i]) for c in cols) for i in range(4)]
        for c in cols:
            print("  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + c[4])
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


# train options that are not settings of the run (every other option is, and --resume refuses it)
_RUN_OPTIONS = frozenset({"out", "resume", "overwrite", "quiet", "verbose", "command", "func"})


def _train_config(args: argparse.Namespace):
    from .config import config_from_options

    options = vars(args).copy()
    chosen = [o for o, flag in (("first", args.first_order), ("reptile", args.reptile)) if flag]
    if len(chosen) > 1:
        raise UsageError("train: --first-order and --reptile exclude each other")
    if chosen:
        if args.order not in (None, chosen[0]):
            raise UsageError(f"train: --order {args.order} and --{'first-order' if chosen[0] == 'first' else 'reptile'} contradict each other")
        options["order"] = chosen[0]
    return config_from_options(_absolute_folders(options))


def _absolute_folders(options: dict) -> dict:
    """The dataset folders a run names, made absolute: ``evaluate``, ``generate`` and
    ``--resume`` read them from the run's config.yaml in any working folder."""
    from .tasks.images import INVERT, strip_invert

    for key in ("data_root", "split_file"):
        if options.get(key):
            options[key] = os.path.abspath(options[key])
    if options.get("domains"):
        entries = []
        for entry in options["domains"].split(","):
            name, sep, where = entry.partition("=")
            if sep:  # NAME=FOLDER, maybe with a trailing :invert
                folder, invert = strip_invert(where)
                entry = f"{name}={os.path.abspath(folder.strip())}{INVERT if invert else ''}"
            entries.append(entry)
        options["domains"] = ",".join(entries)
    return options


def _check_applies(given: dict, tasks: str, cmd: str) -> None:
    """Refuse an option given for tasks that do not read it (``--data-root`` with sinusoid):
    given for others, it would be ignored (``trainer.TASK_OPTIONS``)."""
    from .config import option_flag
    from .trainer import REGRESSION_TASKS, TASK_OPTIONS

    for key, where in TASK_OPTIONS.items():
        if given.get(key) is not None and tasks not in where:
            raise UsageError(f"{cmd}: {option_flag(key)} applies to tasks {', '.join(where)}, not to '{tasks}'")
    if given.get("ways") is not None and tasks in REGRESSION_TASKS:
        raise UsageError(f"{cmd}: --ways applies to classification tasks, not to '{tasks}' (regression)")


def _progress_line(line: str) -> None:
    """Training progress in a log: one line on stderr (a terminal gets a bar instead)."""
    print(line, file=sys.stderr, flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import option_flag
    from .distributed import env_rank
    from .trainer import train

    out = Path(args.out)
    if args.resume:
        # every config option is None unless given; --first-order and --reptile are False
        given = [option_flag(k) for k, v in vars(args).items() if k not in _RUN_OPTIONS and v is not None and not (k in ("first_order", "reptile") and v is False)]
        if given:
            raise UsageError(f"train --resume: {given[0]} cannot change a run being resumed (its config.yaml holds the settings)")
        if args.overwrite:
            raise UsageError("train: --resume and --overwrite exclude each other")
        result = train(None, out, resume=True, progress=False if args.quiet else _progress_line)  # type: ignore[arg-type]
    else:
        cfg = _train_config(args)
        _check_applies(vars(args), cfg.tasks, "train")
        result = train(cfg, out, progress=False if args.quiet else _progress_line, overwrite=args.overwrite)
    if env_rank() == 0:  # under torchrun only rank 0 reports
        print(json.dumps(result))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import dataclasses

    from .meta import evaluate
    from .tasks import DEFAULT_DOMAINS, domain_name, fixed_episodes
    from .trainer import IMAGE_TASKS, build_tasks, check_tasks, load_run

    model, cfg = load_run(args.run)
    trained_domains = tuple(domain_name(d) for d in (cfg.domains.split(",") if cfg.domains else DEFAULT_DOMAINS)) if cfg.tasks == "multidomain" else None
    over = {k: getattr(args, k) for k in ("ways", "shots", "queries", "data_root", "split_file", "domains") if getattr(args, k) is not None}
    if args.domains is not None:
        over["domain_weights"] = None  # the run's weights are for its own domains: evaluate on each alike
    if args.tasks is not None:
        over["tasks"] = args.tasks
        if args.tasks != cfg.tasks and args.data_root is None:
            over["data_root"] = None  # the run's folder belongs to its own tasks
    _check_applies(over, over.get("tasks", cfg.tasks), "evaluate")
    cfg = dataclasses.replace(cfg, **over)
    if model.kind == "classification":
        try:
            model.check_ways(cfg.ways)
        except ValueError as e:
            raise UsageError(f"evaluate: {e}") from None
    if args.split is not None and cfg.tasks not in IMAGE_TASKS:
        raise UsageError(f"evaluate: --split applies to image datasets ({', '.join(IMAGE_TASKS)}), not to tasks '{cfg.tasks}'")
    split = args.split or ("val" if cfg.tasks in IMAGE_TASKS else None)
    dist = build_tasks(cfg, split, space=model.space, family_names=trained_domains)
    check_tasks(cfg, model.space, dist)
    trained = model.encoder.n_families if model.encoder.family is not None else 0
    if dist.n_families and trained and dist.n_families != trained:  # ids beyond the trained embedding
        raise UsageError(f"evaluate: the run was trained with {trained} task families as metadata, tasks '{cfg.tasks}' have {dist.n_families}")
    steps = args.inner_steps if args.inner_steps is not None else cfg.eval_inner_steps
    episodes = fixed_episodes(dist, args.episodes, min(args.episodes, 25), seed=args.seed)
    result = evaluate(model, episodes, steps)
    metric = "accuracy" if model.kind == "classification" else "mse"
    if result["nonfinite"]:  # a diverged task: the mean is not a number, and says nothing
        print(f"metanet: warning: {result['nonfinite']} of {result['n']} tasks diverged (non-finite {metric}); {metric} and ci95 are null", file=sys.stderr)
    finite = {k: result[k] if math.isfinite(result[k]) else None for k in ("mean", "ci95")}  # JSON has no NaN
    data = {"data_root": cfg.data_root} if cfg.tasks in IMAGE_TASKS else {}  # null: the default folder
    if cfg.tasks == "multidomain":
        data["domains"] = cfg.domains or ",".join(DEFAULT_DOMAINS)
    print(json.dumps({"run": str(args.run), "tasks": cfg.tasks, "split": split, **data, "shots": cfg.shots, "ways": cfg.ways if model.kind == "classification" else None,
                      "inner_steps": steps, "episodes": result["n"], metric: finite["mean"], "ci95": finite["ci95"], "nonfinite": result["nonfinite"]}, allow_nan=False))  # fmt: skip
    return 0


# ---------------------------------------------------------------------- generate, inspect


def _load_npz(path: str, flag: str, cmd: str) -> dict:
    """The arrays of a support-set .npz (``x``, ``y`` and optionally ``metadata``)."""
    import zipfile

    import numpy as np

    p = Path(path)
    where = f"{cmd}: {flag} {path}"
    if not p.exists():
        raise UsageError(f"{where}: no such file")
    if not p.is_file():
        raise UsageError(f"{where}: not a file (expected an .npz with arrays x and y)")
    with p.open("rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise UsageError(f"{where}: is a single .npy array; expected an .npz (numpy.savez) with arrays x and y")
    if not zipfile.is_zipfile(p):
        raise UsageError(f"{where}: not an .npz file; expected numpy.savez output with arrays x and y")
    try:
        loaded = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{where}: not a readable .npz file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    try:
        with loaded:
            data = {k: loaded[k] for k in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{where}: cannot read its arrays ({str(e).splitlines()[0]})") from None
    missing = [k for k in ("x", "y") if k not in data]
    if missing:
        held = ", ".join(sorted(data)) or "no arrays"
        raise UsageError(f"{where}: has no array {' or '.join(repr(m) for m in missing)} (it holds {held}); expected x (inputs) and y (targets)")
    return data


def _support(model, path: str, flag: str, cmd: str, *, tasks: bool = False):
    """Validated (x, y) tensors and the npz's metadata array (or None)."""
    from .network import GenerateError, check_support

    data = _load_npz(path, flag, cmd)
    try:
        x, y = check_support(model.space, data["x"], data["y"], tasks=tasks, any_ways=model.any_ways)
    except GenerateError as e:
        raise UsageError(f"{cmd}: {flag} {path}: {e}") from None
    return x, y, data.get("metadata")


def _metadata_arg(text: str | None, cfg, model, cmd: str):
    """--metadata as a family id; a family name works for multimodal runs."""
    if text is None:
        return None
    families = model.encoder.n_families if model.encoder.family is not None else 0
    if families == 0:
        raise UsageError(f"{cmd}: --metadata: this run was trained without task metadata")
    names: tuple[str, ...] = ()
    if cfg.tasks == "multimodal":
        from .tasks import FAMILY_NAMES

        names = FAMILY_NAMES
    if text in names:
        return names.index(text)
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -1 <= value < families:
        named = f" or a name ({', '.join(names)})" if names else ""
        raise UsageError(f"{cmd}: --metadata {text!r}: expected a family id 0 to {families - 1} (-1: unknown){named}")
    return value


def _generate_checked(cmd: str, fn, *args, **kwargs):
    from .network import GenerateError

    try:
        return fn(*args, **kwargs)
    except GenerateError as e:
        raise UsageError(f"{cmd}: {e}") from None


def _has_matplotlib() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # a stub in sys.modules without a spec
        return False


def _cmd_generate(args: argparse.Namespace) -> int:
    import warnings

    from .network import ProductWarning, generate
    from .trainer import load_run

    out, run = Path(args.out), Path(args.run)
    if out.exists() and not out.is_dir():
        raise UsageError(f"generate: --out {out} is a file; give a folder")
    if out.resolve() == run.resolve() or out.resolve() in run.resolve().parents:
        raise UsageError(f"generate: --out {out} would replace the run {run}; give another folder")
    if out.is_dir() and any(out.iterdir()):
        # --overwrite replaces an earlier network, never a folder of other files
        if not (out / "network.json").is_file():
            raise UsageError(f"generate: --out {out} is not empty and holds no saved network; give a new or empty folder")
        if not args.overwrite:
            raise UsageError(f"generate: --out {out} holds a network; use --overwrite to replace it")
    if not run.is_dir():
        raise UsageError(f"generate: {run}: no such run directory")
    model, cfg = load_run(run)
    x, y, npz_meta = _support(model, args.support, "--support", "generate")
    metadata = _metadata_arg(args.metadata, cfg, model, "generate")
    if metadata is None and npz_meta is not None:
        metadata = npz_meta
    net = _generate_checked("generate", generate, model, x, y, metadata, args.adapt_steps, args.sample)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ProductWarning)
        net.save(out, support_y=y, about={"run": str(run), "support": f"{args.support} ({x.shape[0]} examples)"})
    for w in caught:
        if issubclass(w.category, ProductWarning):
            print(f"metanet: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    print((out / "summary.txt").read_text().split("\n\n")[0])
    print(f"wrote {out}/")
    return 0


def _read_genotype(path: Path, cmd: str):
    """A genotype JSON file and its space: space.yaml beside it, else the built-in space."""
    from .network import read_network_info, space_for
    from .graph import Genotype
    from .space import builtin_path, builtin_spaces, load, loads

    if not path.is_file():
        raise UsageError(f"{cmd}: {path}: no such genotype file")
    genotype = Genotype.from_json(path.read_text(), str(path))
    beside = path.parent / "space.yaml"
    if beside.is_file():
        if (path.parent / "network.json").is_file():
            space = _generate_checked(cmd, lambda: space_for(beside.read_text(), read_network_info(path.parent), str(beside)))
        else:
            space = loads(beside.read_text(), str(beside))
        if space.name != genotype.space:
            raise UsageError(f"{cmd}: {path} is a genotype of space '{genotype.space}', but {beside} defines '{space.name}'")
    elif builtin_path(genotype.space).is_file():
        space = load(builtin_path(genotype.space))
    else:
        raise UsageError(f"{cmd}: {path} is a genotype of space '{genotype.space}': no space.yaml beside it and no built-in space of that name (built-in: {', '.join(builtin_spaces())})")
    genotype.validate(space)
    return genotype, space


def _emit(text: str, out: str | None) -> None:
    from .checkpoint import atomic_write_bytes

    if out is None:
        print(text, end="" if text.endswith("\n") else "\n")
        return
    atomic_write_bytes(_out_path(out), (text if text.endswith("\n") else text + "\n").encode())
    print(f"wrote {out}")


def _out_path(out: str) -> Path:
    p = Path(out)
    if not p.parent.is_dir():
        raise UsageError(f"inspect: --out {out}: folder {p.parent} does not exist")
    if p.is_dir():
        raise UsageError(f"inspect: --out {out} is a folder; give a file name")
    return p


def _write_png(out: str | None, draw: Callable[[Path], object], announce: bool = True) -> None:
    import os

    if out is None:
        raise UsageError("inspect: --format png needs --out FILE.png")
    if not _has_matplotlib():
        raise UsageError("inspect: PNG output needs matplotlib: pip install 'metanet[plot]' (or pip install matplotlib)")
    p = _out_path(out)
    tmp = p.with_name(f".{p.stem}.tmp-{os.getpid()}.png")
    try:
        draw(tmp)
        os.replace(tmp, p)
    except ImportError as e:  # matplotlib present but broken
        raise UsageError(f"inspect: {str(e).splitlines()[0]}") from None
    finally:
        tmp.unlink(missing_ok=True)
    if announce:
        print(f"wrote {out}")


def _frequency_table(space, genotypes) -> str:
    from .export import op_frequency

    freq, labels = op_frequency(space, genotypes)
    rows = [f"c{e.cell} e{e.src}->{e.dst}" for e in space.edges]
    w = max(len(r) for r in rows)
    cols = [max(len(lab), 5) for lab in labels]
    lines = [f"op frequency over {len(genotypes)} tasks (share of tasks whose network uses the op on the edge)",
             " " * w + "  " + "  ".join(f"{lab:>{c}s}" for lab, c in zip(labels, cols))]
    for i, r in enumerate(rows):
        lines.append(f"{r:{w}s}  " + "  ".join(f"{float(freq[i, k]):>{c}.3f}" for k, c in enumerate(cols)))
    distinct = len(set(genotypes))
    lines.append(f"{distinct} distinct architecture{'s' if distinct != 1 else ''} among {len(genotypes)} tasks")
    return "\n".join(lines)


def _health_lines(health: dict) -> str:
    """``graph.population_health`` in words."""
    lines = [f"kept edges with weights (not pooling, skip or zero): {100 * health['parametric_share']:.1f}%",
             f"most common architecture: {100 * health['top_share']:.1f}% of tasks"]
    if "mean_entropy" in health:
        lines.append(f"mean per-edge entropy of the soft encoding: {health['mean_entropy']:.3f} nats")
    if "mutual_information" in health:
        per = ", ".join(f"{f}: {n}" for f, n in health["distinct_per_family"].items())
        lines.append(f"distinct architectures per family (id: count): {per}")
        lines.append(f"mutual information between family and architecture: {health['mutual_information']:.3f} bits")
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .network import generate
    from .trainer import load_run

    cmd = "inspect"
    src = Path(args.source)
    if not src.exists():
        raise UsageError(f"{cmd}: {src}: no such run directory or genotype file")
    is_run = src.is_dir() and (src / "config.yaml").is_file()
    if src.is_dir() and not is_run:
        if not (src / "genotype.json").is_file():
            raise UsageError(f"{cmd}: {src} is neither a run directory (no config.yaml) nor a saved network (no genotype.json)")
        src = src / "genotype.json"
    exclusive = [f for f, on in (("--soft", args.soft), ("--diff", args.diff), ("--population", args.population)) if on]
    if len(exclusive) > 1:
        raise UsageError(f"{cmd}: {' and '.join(exclusive)} exclude each other")
    metadata = None
    if not is_run:
        needs_run = [f for f, on in (("--support", args.support), ("--soft", args.soft), ("--population", args.population), ("--metadata", args.metadata)) if on]
        if needs_run:
            raise UsageError(f"{cmd}: {needs_run[0]} needs a run directory; {src} is a genotype file")
        genotype, space = _read_genotype(src, cmd)
        alpha = model = None
    else:
        model, cfg = load_run(src)
        space = model.space
        metadata = _metadata_arg(args.metadata, cfg, model, cmd)
        if args.population:
            return _inspect_population(args, model, metadata)
        if not args.support:
            raise UsageError(f"{cmd}: a run directory needs --support FILE.npz (one task's support set) or --population FILE.npz")
        x, y, npz_meta = _support(model, args.support, "--support", cmd)
        net = _generate_checked(cmd, generate, model, x, y, metadata if metadata is not None else npz_meta)
        genotype, alpha = net.genotype, net.alpha
    if args.diff:
        return _inspect_diff(args, src, model, space, genotype, metadata)
    return _inspect_views(args, space, genotype, alpha)


def _inspect_population(args: argparse.Namespace, model, metadata) -> int:
    """``inspect RUN --population TASKS.npz``: op frequencies and the population's health."""
    import numpy as np
    import torch

    from . import draw as dr
    from .graph import population_health
    from .network import generate_batch

    cmd, space = "inspect", model.space
    if args.support:
        raise UsageError(f"{cmd}: give --support or --population, not both")
    if args.format not in ("text", "png"):
        raise UsageError(f"{cmd}: --population prints a table and draws a PNG heatmap to --out; --format {args.format} does not apply")
    xs, ys, npz_meta = _support(model, args.population, "--population", cmd, tasks=True)
    meta = metadata if metadata is not None else npz_meta
    if metadata is None and model.encoder.family is None:
        meta = None  # the run takes no metadata: the npz's ids only group the tasks below
    if args.out is None and args.format == "png":
        raise UsageError(f"{cmd}: --format png needs --out FILE.png")
    families = None
    ids = metadata if metadata is not None else npz_meta
    if ids is not None:  # checked before anything is generated or written
        flat = np.asarray(ids).reshape(-1)
        if not np.issubdtype(flat.dtype, np.number):
            raise UsageError(f"{cmd}: metadata must hold numeric family ids, got {flat.dtype} values")
        if flat.size not in (1, len(xs)):
            raise UsageError(f"{cmd}: metadata must be one family id or one per task ({len(xs)}), got {flat.size} values")
        families = np.broadcast_to(flat.astype(np.int64), (len(xs),)).tolist()
    nets = _generate_checked(cmd, generate_batch, model, xs, ys, meta)
    genotypes = [n.genotype for n in nets]
    if args.out is not None:
        _write_png(args.out, lambda p: dr.draw_population_png(space, genotypes, p), announce=False)
    print(_frequency_table(space, genotypes))
    print(_health_lines(population_health(space, genotypes, families, torch.stack([n.alpha for n in nets]))))
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def _inspect_diff(args: argparse.Namespace, src: Path, model, space, genotype, metadata) -> int:
    """``inspect ... --diff OTHER``: how another task's (or genotype's) architecture differs."""
    from . import export as ex
    from .network import generate

    cmd, other = "inspect", Path(args.diff)
    if other.suffix == ".npz":
        if model is None:
            raise UsageError(f"{cmd}: --diff {other}: a support set needs a run directory to generate from; {src} is a genotype file")
        ox, oy, ometa = _support(model, str(other), "--diff", cmd)
        other_genotype = _generate_checked(cmd, generate, model, ox, oy, metadata if metadata is not None else ometa).genotype
    else:
        if other.is_dir() and (other / "genotype.json").is_file():
            other = other / "genotype.json"
        other_genotype, other_space = _read_genotype(other, cmd)
        if other_space.name != space.name:
            raise UsageError(f"{cmd}: --diff {other}: a genotype of space '{other_space.name}' cannot be compared with one of '{space.name}'")
    if args.format != "text":
        raise UsageError(f"{cmd}: --diff prints text; --format {args.format} does not apply")
    first = f"{args.support} (generated by {src})" if model is not None and args.support else src  # the run's support set, not the run
    _emit(f"--- {first}\n+++ {args.diff}\n" + ex.diff_genotypes(space, genotype, other_genotype), args.out)
    return 0


def _inspect_views(args: argparse.Namespace, space, genotype, alpha) -> int:
    """One architecture (or, with ``--soft``, its soft encoding) in ``--format``."""
    import tempfile

    from . import draw as dr
    from . import export as ex

    g = ex.soft_graph(space, alpha) if args.soft else ex.genotype_graph(space, genotype)
    if args.format == "text":
        _emit(ex.describe_soft(space, alpha) if args.soft else ex.describe_genotype(space, genotype), args.out)
    elif args.format == "dot":
        _emit(ex.to_dot(g), args.out)
    elif args.format == "json":
        _emit(ex.to_json(g), args.out)
    elif args.format == "graphml":
        if args.out is not None:
            ex.to_graphml(g, _out_path(args.out))
            print(f"wrote {args.out}")
        else:
            with tempfile.TemporaryDirectory() as d:
                print(ex.to_graphml(g, Path(d) / "graph.graphml").read_text(), end="")
    elif args.soft:
        _write_png(args.out, lambda p: dr.draw_soft_png(space, alpha, p))
    else:
        _write_png(args.out, lambda p: dr.draw_genotype_png(space, genotype, p))
    return 0


# -------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``metanet`` command."""
    from .config import VERSION

    p = _Parser(prog="metanet", description="Meta-learn task-specific neural networks.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("--version", action="version", version=f"metanet {VERSION}")
    # -v after the command too (metanet train -v ...): not given there, it leaves the top's
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True

    sp = sub.add_parser("spaces", parents=[common], help="list, validate or show search spaces")
    sp.add_argument("action", choices=("list", "validate", "show"), help="list: the built-in spaces; validate: check YAML files; show: print a space's cells and ops")
    sp.add_argument("files", nargs="*", help="YAML files (or built-in space names for show)")
    sp.set_defaults(func=_cmd_spaces)

    from .config import add_train_options

    tr = sub.add_parser("train", parents=[common], help="meta-train the generators", description="Meta-train the generators into a run directory (--out). The budget is --steps or --minutes. Task distributions have their own defaults (listed after the field's default).")
    add_train_options(tr)
    tr.add_argument("--first-order", action="store_true", help="first-order MAML (same as --order first)")
    tr.add_argument("--reptile", action="store_true", help="Reptile (same as --order reptile)")
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out")
    tr.add_argument("--overwrite", action="store_true", help="start again in an existing run directory, or write the run into a folder of other files")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", parents=[common], help="evaluate a run on fixed test tasks")
    ev.add_argument("run", help="run directory")
    ev.add_argument("--tasks", help="evaluate on another task distribution than the run's (same input shape after resizing), e.g. images --data-root DIR for an unseen domain")
    ev.add_argument("--split", help="split of an image dataset (default val): omniglot train, val, background, evaluation; miniimagenet train, val, test; images and multidomain train, val, test, all")
    ev.add_argument("--data-root", dest="data_root", help="dataset folder (default: the run's)")
    ev.add_argument("--split-file", dest="split_file", help="images: CSV of class,split lines")
    ev.add_argument("--domains", help="multidomain: the domains to evaluate on (a domain the run did not train on gets the unknown-domain metadata)")
    ev.add_argument("--ways", type=number_type("ways"), help="classes per task, at least 2; any number where the run's head comes from prototypes")
    ev.add_argument("--shots", type=_positive_int, help="support examples per class (regression: per task); default: the run's")
    ev.add_argument("--queries", type=_positive_int, help="query examples per class (regression: per task) scored after adaptation; default: the run's")
    ev.add_argument("--episodes", type=_positive_int, default=600, help="fixed test tasks (default: 600)")
    ev.add_argument("--inner-steps", dest="inner_steps", type=_nonneg_int, help="adaptation steps on each support set (default: the run's --eval-inner-steps)")
    ev.add_argument("--seed", type=_nonneg_int, default=1234, help="seed of the test tasks: the same seed, the same tasks (default: 1234)")
    ev.set_defaults(func=_cmd_evaluate)

    ge = sub.add_parser("generate", parents=[common], help="generate one task's network from its support set")
    ge.add_argument("run", help="run directory")
    ge.add_argument("--support", required=True, help=".npz with x (N, *input) and y (N,) or (N, outputs)")
    ge.add_argument("--metadata", help="task family id (or family name for multimodal runs)")
    ge.add_argument("--adapt-steps", dest="adapt_steps", type=_nonneg_int, default=0, help="inner-loop steps on the support set (with the model's step sizes and proximal term, as in validation)")
    ge.add_argument("--sample", action="store_true", help="sample the weight latent instead of taking its mean")
    ge.add_argument("--out", required=True, help="output folder")
    ge.add_argument("--overwrite", action="store_true", help="replace the network an earlier generate wrote in --out (a folder of other files is never replaced)")
    ge.set_defaults(func=_cmd_generate)

    ins = sub.add_parser("inspect", parents=[common], help="show a generated architecture as text, DOT, GraphML, JSON or PNG")
    ins.add_argument("source", help="run directory (with --support or --population), genotype.json, or a generated folder")
    ins.add_argument("--support", help=".npz with one task's support set x, y (with a run directory)")
    ins.add_argument("--metadata", help="task family id (or family name for multimodal runs)")
    ins.add_argument("--format", choices=("text", "dot", "graphml", "json", "png"), default="text", help="text (default), Graphviz dot, GraphML, JSON, or a PNG drawing (needs matplotlib and --out)")
    ins.add_argument("--out", help="output file (default: print; required for png)")
    ins.add_argument("--soft", action="store_true", help="the soft encoding instead of the discrete network (run only)")
    ins.add_argument("--diff", help="compare with another task (.npz support set) or another genotype.json")
    ins.add_argument("--population", help=".npz with x (T, N, *input), y (T, N) and optionally metadata (T,): op frequencies over T tasks, the share of edges with weights, per-edge entropy, and with metadata the distinct architectures per family and the family-architecture mutual information; --out FILE.png draws the heatmap")
    ins.set_defaults(func=_cmd_inspect)
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
        parser = build_parser()
        if not (sys.argv[1:] if argv is None else list(argv)):  # a bare `metanet`: what it can do
            parser.print_help()
            return EXIT_USAGE
        try:
            args = parser.parse_args(argv)
        except UsageError as e:  # the same mistake on every rank under torchrun: said once per machine
            if os.environ.get("LOCAL_RANK", "0").strip() in ("", "0"):
                sys.stderr.write(f"metanet: error: {e}\n")
            return EXIT_USAGE
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UsageError as e:
        sys.stderr.write(f"metanet: error: {e}\n")  # one write: under torchrun, ranks share stderr
        return EXIT_USAGE
    except BrokenPipeError:  # the reader went away (`metanet ... | head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor one at exit's flush
        return 1
    except Exception as e:  # noqa: BLE001 -- only the user's mistakes are turned into one line
        if isinstance(e, _user_errors()):
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            sys.stderr.write(f"metanet: error: {msg}\n")
            return EXIT_USAGE
        raise
    except KeyboardInterrupt:
        print("metanet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
