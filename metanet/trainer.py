"""Meta-training runs: config, task construction, the outer loop, checkpoints and resume.

A run directory holds ``config.yaml``, ``space.yaml`` (the exact search space text),
``metrics.jsonl`` (one JSON object per logged step), ``last.pt`` and ``best.pt``.
``train`` with ``resume=True`` continues a run exactly: model, optimizer, schedule, step
and every RNG state come back from ``last.pt``, and the rows of ``metrics.jsonl`` written
after that checkpoint are dropped, since the resumed run writes them again.

Under torchrun (``WORLD_SIZE > 1``) the meta-batch is sharded across the processes (see
``metanet.distributed``): every rank samples the whole meta-batch from the shared seed and
runs the generators on all of it (so each task draws the same noise as in one process),
then adapts only its own block of tasks; the gradients and metrics are summed over the
ranks, each rank's loss weighted by its share of the tasks, so N processes follow the
trajectory of one process with the same meta-batch (up to float rounding). Rank 0 alone
validates, writes files and shows progress.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from . import checkpoint as ckpt
from . import distributed
from .compile import checked_compile
from .graph import population_health
from .meta import ORDERS, PRECISIONS, MetaNet, ModelConfig, evaluate, generate_networks, meta_loss, precision
from .space import SearchSpace, load, loads
from .tasks import DEFAULT_DOMAINS, Episode, TaskDistribution, fixed_episodes, make_tasks

__all__ = ["TrainConfig", "ConfigError", "NonFiniteError", "architecture_health", "build_space", "build_tasks", "check_tasks", "validate_config", "build_model", "train", "load_run", "calibrate_strategy", "reuse_freed_memory"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # of the training checkpoints (last.pt, best.pt); resume needs this exact one
METRICS = "metrics.jsonl"


class ConfigError(ValueError):
    """A training configuration that cannot run; the message is one line."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; written to ``RUN_DIR/config.yaml``."""

    space: str = "mlp_regression"
    tasks: str = "sinusoid"
    ways: int = 5
    shots: int = 5
    queries: int = 10
    data_root: str | None = None
    rotations: bool = True
    split_file: str | None = None  # images: CSV of class,split lines (else a seeded fraction of the classes)
    domains: str | None = None  # multidomain: comma-separated domain entries (None: omniglot,miniimagenet,chars74k_fnt)
    domain_weights: str | None = None  # multidomain: comma-separated sampling weights, one per domain
    meta_batch: int = 25
    inner_steps: int = 1
    eval_inner_steps: int = 10
    order: str = "second"
    beta: float = 1e-3
    entropy_weight: float = 0.0
    temperature: float = 1.0
    final_temperature: float = 1.0
    gumbel: bool = False
    hard: bool = False
    strategy: str = "auto"  # auto | loop | vmap
    compile: bool = False  # torch.compile the meta-step, kept only if it matches eager on the first step
    precision: str = "fp32"  # fp32 | bf16 (mixed precision of the meta-step's forward; see meta.precision)
    meta_lr: float = 1e-3
    clip: float = 10.0
    schedule: str = "cosine"  # cosine | constant
    steps: int | None = 1000
    minutes: float | None = None
    seed: int = 0
    val_every: int = 250
    val_tasks: int = 100
    log_every: int = 10
    max_nonfinite: int = 10
    ckpt_every: int | None = None  # also write last.pt every this many steps (None: at validations only)
    # model
    arch: str = "conditional"
    weights: str = "vae"
    dim: int = 64
    latent: int = 32
    inner_lr: float = 0.01
    meta_sgd: bool = False
    adapt_alpha: bool = False
    use_metadata: bool = True
    fused: bool = True
    proto_head: bool = True

    def model_config(self) -> ModelConfig:
        names = {f.name for f in fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """A config from plain data (``config.yaml``), every value checked (``ConfigError``)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted((k for k in data if k not in known), key=str)
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r}{_suggest(str(unknown[0]), known)}")
        cfg = cls(**data)
        validate_config(cfg, source)
        return cfg


def _suggest(name: str, valid: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Field checks: (kind, lower bound or choices). Everything else is a plain string.
_POS_INT = ("ways", "shots", "queries", "meta_batch", "val_every", "val_tasks", "log_every", "max_nonfinite", "dim", "latent")
_NONNEG_INT = ("inner_steps", "eval_inner_steps", "seed")
_POS_FLOAT = ("temperature", "final_temperature", "meta_lr", "clip", "inner_lr")
_NONNEG_FLOAT = ("beta",)
_BOOL = ("rotations", "gumbel", "hard", "meta_sgd", "adapt_alpha", "use_metadata", "fused", "proto_head", "compile")
_CHOICES = {
    "order": ORDERS,
    "strategy": ("auto", "loop", "vmap"),
    "schedule": ("cosine", "constant"),
    "arch": ("conditional", "shared", "fixed"),
    "weights": ("vae", "off"),
    "precision": PRECISIONS,
}


def validate_config(cfg: TrainConfig, source: str = "config") -> None:
    """Check every field's type and range; raise ``ConfigError`` naming the first bad one."""

    def bad(name: str, expected: str) -> ConfigError:
        return ConfigError(f"{source}: {name} must be {expected}, got {getattr(cfg, name)!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for name in _POS_INT:
        v = getattr(cfg, name)
        if not (is_int(v) and v >= 1):
            raise bad(name, "a positive integer")
    for name in _NONNEG_INT:
        v = getattr(cfg, name)
        if not (is_int(v) and v >= 0):
            raise bad(name, "an integer >= 0")
    for name in _POS_FLOAT:
        v = getattr(cfg, name)
        if not (is_num(v) and v > 0):
            raise bad(name, "a finite number > 0")
    for name in _NONNEG_FLOAT:
        v = getattr(cfg, name)
        if not (is_num(v) and v >= 0):
            raise bad(name, "a finite number >= 0")
    if not is_num(cfg.entropy_weight):
        raise bad("entropy_weight", "a finite number")
    for name in _BOOL:
        if not isinstance(getattr(cfg, name), bool):
            raise bad(name, "true or false")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            v = getattr(cfg, name)
            raise ConfigError(f"{source}: {name} must be one of {', '.join(choices)}, got {v!r}{_suggest(str(v), list(choices))}")
    if cfg.compile and cfg.precision != "fp32":
        # Measured: the compiled bf16 sinusoid step differed from eager bf16 by 1.8e-4, and
        # bf16 meta-gradients differ from fp32 ones by per cent; a tolerance that admits
        # that rounding could not tell a dropped second-order graph from it.
        raise ConfigError(
            f"{source}: compile needs precision fp32, got {cfg.precision!r}: the compiled step is checked"
            " against eager to rtol 1e-4, which bf16 rounding exceeds; use --compile or --precision bf16, not both"
        )
    for name in ("space", "tasks"):
        v = getattr(cfg, name)
        if not (isinstance(v, str) and v):
            raise bad(name, "a non-empty string")
    for name in ("data_root", "split_file", "domains", "domain_weights"):
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, str) and v):
            raise bad(name, "a non-empty string or null")
    if cfg.domain_weights is not None:
        try:
            weights = [float(w) for w in cfg.domain_weights.split(",")]
        except ValueError:
            raise bad("domain_weights", "comma-separated numbers, one per domain") from None
        if any(not (math.isfinite(w) and w >= 0) for w in weights) or not sum(weights) > 0:
            raise bad("domain_weights", "comma-separated numbers >= 0 with a positive sum")
    if cfg.steps is not None and not (is_int(cfg.steps) and cfg.steps >= 1):
        raise bad("steps", "a positive integer or null")
    if cfg.minutes is not None and not (is_num(cfg.minutes) and cfg.minutes > 0):
        raise bad("minutes", "a finite number > 0 or null")
    if cfg.steps is None and cfg.minutes is None:
        raise ConfigError(f"{source}: give steps or minutes (--steps or --minutes)")
    if cfg.ckpt_every is not None and not (is_int(cfg.ckpt_every) and cfg.ckpt_every >= 1):
        raise bad("ckpt_every", "a positive integer or null")


def build_space(cfg: TrainConfig, text: str | None = None) -> SearchSpace:
    """The run's search space, with the classifier head sized to ``ways``."""
    space = loads(text, cfg.space) if text is not None else load(cfg.space)
    if space.task.kind == "classification" and space.task.outputs != cfg.ways:
        space = dataclasses.replace(space, task=dataclasses.replace(space.task, outputs=cfg.ways))
    return space


IMAGE_TASKS = ("omniglot", "miniimagenet", "images", "multidomain")  # task distributions with named splits


def build_tasks(cfg: TrainConfig, split: str | None = None, *, shots: int | None = None, queries: int | None = None, space: SearchSpace | None = None, family_names: tuple[str, ...] | None = None) -> TaskDistribution:
    """The task distribution a config names.

    Args:
        split: the split of an image dataset (default ``train``).
        shots, queries: override the config's.
        space: the search space whose input shape image episodes take (resized and
            converted to its channels); default ``build_space(cfg)``.
        family_names: multidomain: the domain names of the metadata ids (a run's trained
            domains, so that a left-out domain gets the unknown id).
    """
    from .tasks import default_data_root, shared_data_root

    kw: dict[str, Any] = {"shots": shots or cfg.shots, "queries": queries or cfg.queries}
    if cfg.tasks in IMAGE_TASKS:
        kw.update(split=split or "train", ways=cfg.ways)
        # images take the space's (C, H, W); a space for other inputs is refused by check_tasks
        input_shape = tuple((space or build_space(cfg)).task.input)
        shape = {"image_size": input_shape[-1], "channels": input_shape[0]} if len(input_shape) == 3 else {}
    if cfg.tasks == "omniglot":
        root = cfg.data_root or default_data_root()
        if root is None:
            raise ConfigError("omniglot needs --data-root DIR (npz files or images_background/ PNG folders); none given and no default found")
        kw.update(root=root, rotations=cfg.rotations)
        if "image_size" in shape:
            kw["image_size"] = shape["image_size"]
    elif cfg.tasks == "miniimagenet":
        root = cfg.data_root or shared_data_root("miniimagenet")
        if root is None:
            raise ConfigError("miniimagenet needs --data-root DIR (images/ + train.csv, val.csv, test.csv, or <split>/<wnid>/ folders); none given and no default found")
        kw.update(root=root, **shape)
    elif cfg.tasks == "images":
        if cfg.data_root is None:
            raise ConfigError("images needs --data-root DIR, a folder of class folders (<root>/<class>/<image>)")
        kw.update(root=cfg.data_root, split_file=cfg.split_file, **shape)
    elif cfg.tasks == "multidomain":
        root = cfg.data_root or shared_data_root()
        weights = None if cfg.domain_weights is None else tuple(float(w) for w in cfg.domain_weights.split(","))
        domains = DEFAULT_DOMAINS if cfg.domains is None else tuple(d.strip() for d in cfg.domains.split(","))
        kw.update(domains=domains, data_root=root, weights=weights, with_metadata=cfg.use_metadata, family_names=family_names, **shape)
    elif cfg.tasks == "multimodal":
        kw.update(with_metadata=cfg.use_metadata)
    return make_tasks(cfg.tasks, **kw)


def check_tasks(cfg: TrainConfig, space: SearchSpace, dist: TaskDistribution, world_size: int = 1) -> None:
    """Raise ``ConfigError`` unless the tasks fit the space (kind, input shape, outputs, ways)."""
    if cfg.order not in ORDERS:
        raise ConfigError(f"order must be one of {', '.join(ORDERS)}, got {cfg.order!r}")
    if dist.kind != space.task.kind:
        raise ConfigError(f"space '{space.name}' is for {space.task.kind} but tasks '{cfg.tasks}' are {dist.kind}")
    if tuple(dist.input_shape) != tuple(space.task.input):
        raise ConfigError(f"space '{space.name}' expects inputs {list(space.task.input)} but tasks '{cfg.tasks}' give {list(dist.input_shape)}")
    if dist.kind == "regression" and dist.n_outputs != space.task.outputs:
        raise ConfigError(f"space '{space.name}' has {space.task.outputs} outputs but tasks '{cfg.tasks}' have {dist.n_outputs}")
    if dist.kind == "classification" and dist.n_outputs != cfg.ways:
        raise ConfigError(f"tasks '{cfg.tasks}' are {dist.n_outputs}-way but the config asks for {cfg.ways} ways")
    if cfg.steps is None and cfg.minutes is None:
        raise ConfigError("give --steps or --minutes")
    if cfg.meta_batch < world_size:
        raise ConfigError(f"meta-batch {cfg.meta_batch} is smaller than the {world_size} processes; every process needs at least one task")


def build_model(cfg: TrainConfig, space: SearchSpace, n_families: int) -> MetaNet:
    """A fresh MetaNet for a config (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    try:
        return MetaNet(space, n_families, cfg.model_config())
    except ValueError as e:  # e.g. arch 'fixed' on a space with a choice of ops
        raise ConfigError(f"space '{space.name}': {str(e).splitlines()[0]}") from None


def calibrate_strategy(model: MetaNet, episode: Episode, cfg: TrainConfig, repeats: int = 2) -> str:
    """Time one meta-step with each task-execution strategy and return the faster one."""
    times = {}
    for strategy in ("loop", "vmap"):
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            with precision(cfg.precision, episode.support_x.device):
                loss, _ = meta_loss(model, episode, inner_steps=cfg.inner_steps, order=cfg.order, strategy=strategy)
            torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
            best = min(best, time.perf_counter() - t)
        times[strategy] = best
    choice = min(times, key=times.get)
    log.info("task execution: %s (loop %.3fs, vmap %.3fs per step)", choice, times["loop"], times["vmap"])
    return choice


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed large blocks for reuse instead of returning them to the system.

    A meta-step allocates and frees the same large activations every step. By default
    glibc serves blocks above its mmap threshold with fresh mappings and unmaps them when
    freed, so each step faults all of its pages in again (``bench_meta`` counts ~27,500
    minor faults per conv4 step at meta-batch 8). Raising the mmap threshold to its
    maximum (32 MiB) and the trim threshold to 2 GiB keeps them in the heap; the process's
    resident memory then stays near its peak. Called by ``train``; a no-op (False) where
    the C library is not glibc.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
        return libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False


def _temperature(cfg: TrainConfig, progress: float) -> float:
    return cfg.temperature * (cfg.final_temperature / cfg.temperature) ** min(max(progress, 0.0), 1.0)


def _lr_factor(cfg: TrainConfig, progress: float) -> float:
    if cfg.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class NonFiniteError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


StepFn = Callable[..., tuple[Tensor, tuple[Tensor | None, ...], dict[str, float]]]


def _step_function(model: MetaNet, part: slice, noise: torch.Generator, params: list[Tensor], step_kw: dict[str, Any], arithmetic: str = "fp32") -> StepFn:
    """One meta-step as a pure function of its data: ``(loss, meta-gradients, metrics)``.

    ``step(support_x, support_y, query_x, query_y, metadata, temperature, noise_state)``;
    with ``noise_state`` given, the VAE and Gumbel noise generator is first set to it, so
    that two calls (eager and compiled, in ``checked_compile``) draw the same noise. It
    updates nothing else: the trainer assigns the gradients and steps the optimizer.
    ``arithmetic`` is the forward pass's precision (``meta.precision``); the meta-gradients
    are taken outside it, and are float32 like the weights.
    """

    def step(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, md: Tensor | None, temperature: float, noise_state: Tensor | None = None) -> tuple[Tensor, tuple[Tensor | None, ...], dict[str, float]]:
        if noise_state is not None:
            noise.set_state(noise_state)
        with precision(arithmetic, sx.device):
            loss, m = distributed.shard_loss(model, Episode(sx, sy, qx, qy, md), part, noise, temperature=temperature, **step_kw)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss, grads, m

    return step


def _compiled_step(step: StepFn, episode: Episode, temperature: float, noise: torch.Generator) -> tuple[StepFn, dict[str, Any]]:
    """``torch.compile`` the meta-step if it gives eager's meta-gradients on ``episode``.

    Runs the eager and the compiled step once each on the run's first meta-batch, from the
    same noise state (which is restored afterwards, so the run draws what an eager run
    draws). Compilation takes tens of seconds on 2 CPU cores. Returns the step to use and
    what the check found (logged, and kept in the run's result).
    """
    state = noise.get_state()
    # meta_loss reads its metrics as Python numbers, a deliberate graph break that dynamo
    # reports with a multi-line warning while it traces; nothing for a user to act on.
    quiet = logging.getLogger("torch._dynamo.variables.tensor")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        checked = checked_compile(step, (*_episode_args(episode), temperature, state))
    finally:
        quiet.setLevel(level)
        noise.set_state(state)
    info = {"compiled": checked.compiled, "compile_s": round(checked.compile_s, 1), "eager_s": round(checked.eager_s, 3), "max_rel_error": checked.max_rel_error if math.isfinite(checked.max_rel_error) else None}
    if not checked.compiled:
        info["reason"] = checked.reason
    return checked.fn, info


def _episode_args(ep: Episode) -> tuple[Tensor | None, ...]:
    return ep.support_x, ep.support_y, ep.query_x, ep.query_y, ep.metadata


# --------------------------------------------------------------------------- the run


@dataclass
class _Setup:
    """What rank 0 validated and every rank builds from."""

    cfg: TrainConfig
    space_text: str | None  # the run's space.yaml when resuming
    saved: dict[str, Any] | None  # last.pt when resuming from a checkpoint


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = False, stop_after: int | None = None, overwrite: bool = True, device: str | torch.device | None = None) -> dict[str, Any]:
    """Meta-train and write the run directory; returns the final metrics.

    Everything the user gave is checked before the run directory is created or touched.
    Under torchrun the process group is initialised here (and destroyed at the end) when
    no one has done so; every rank calls ``train`` with the same arguments.

    Args:
        cfg: the configuration (ignored in favour of the saved one when resuming).
        out: run directory.
        resume: continue from ``out/last.pt``, or from the start of the saved config when
            the run never reached a checkpoint.
        progress: show a tqdm bar (rank 0).
        stop_after: stop (as if killed) after this many steps in this call; for tests.
        overwrite: start afresh in a folder that already holds a run (the CLI asks for
            ``--overwrite``); with False that is a ``ConfigError``.
        device: where to train; None: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.

    Raises:
        ConfigError: a bad configuration, or a folder that is not (or already is) a run.
        NonFiniteError: ``max_nonfinite`` non-finite steps in a row.
    """
    reuse_freed_memory()
    ctx = distributed.setup(device)
    try:
        result = _train(ctx, cfg, Path(out), resume, progress, stop_after, overwrite)
    except BaseException:
        ctx.close(clean=False)
        raise
    ctx.close()
    return result


def _prepare(cfg: TrainConfig | None, out: Path, resume: bool, overwrite: bool) -> _Setup:
    """Rank 0: read and check what the user gave; writes nothing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; --out needs a folder for the run")
    if resume:
        cfg, text = _read_run_config(out, "train --resume")
        saved = None
        if (out / ckpt.LAST).exists():
            saved = _load_training_checkpoint(out / ckpt.LAST)
        return _Setup(cfg, text, saved)
    if cfg is None:
        raise ConfigError("train: no config given (and not resuming)")
    validate_config(cfg)
    if not overwrite and any((out / f).exists() for f in (ckpt.LAST, "config.yaml")):
        raise ConfigError(f"train: {out} already holds a run; use --resume to continue it or --overwrite to start again")
    return _Setup(cfg, None, None)


def _load_training_checkpoint(path: Path) -> dict[str, Any]:
    saved = ckpt.load_checkpoint(path)
    version = saved.get("format_version")
    if version != FORMAT_VERSION:
        raise ConfigError(f"{path}: a training checkpoint of format version {version!r}; this metanet resumes version {FORMAT_VERSION} only")
    missing = [k for k in ("model", "optimizer", "state", "rng", "n_families") if k not in saved]
    if missing:
        raise ConfigError(f"{path}: not a metanet training checkpoint (no {missing[0]!r})")
    return saved


def _train(ctx: distributed.Context, cfg: TrainConfig | None, out: Path, resume: bool, progress: bool, stop_after: int | None, overwrite: bool) -> dict[str, Any]:
    # Rank 0 checks everything first and tells the others, so that a mistake is one error
    # on every rank rather than a hang.
    setup: _Setup | BaseException | None = None
    if ctx.is_main:
        try:
            setup = _prepare(cfg, out, resume, overwrite)
            space = build_space(setup.cfg, setup.space_text)
            dist_ = build_tasks(setup.cfg, "train", space=space)
            val_dist = build_tasks(setup.cfg, "val", queries=setup.cfg.queries, space=space)
            check_tasks(setup.cfg, space, dist_, ctx.world_size)
            val_episodes = fixed_episodes(val_dist, setup.cfg.val_tasks, min(setup.cfg.meta_batch, setup.cfg.val_tasks), seed=setup.cfg.seed + 10_000)
            model = build_model(setup.cfg, space, dist_.n_families)
        except Exception as e:  # noqa: BLE001 -- re-raised on every rank below
            setup = e
    setup = ctx.broadcast_object(setup if ctx.is_main else None)
    if isinstance(setup, BaseException):
        raise setup
    assert setup is not None
    cfg = setup.cfg
    if not ctx.is_main:
        space = build_space(cfg, setup.space_text)
        dist_ = build_tasks(cfg, "train", space=space)
        model = build_model(cfg, space, dist_.n_families)
        val_episodes = []
    model.to(ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.meta_lr)
    gen = torch.Generator().manual_seed(cfg.seed)  # tasks (CPU), the same on every rank
    # The generators' noise (VAE, Gumbel) is drawn on the model's device.
    noise = gen if ctx.device.type == "cpu" else torch.Generator(ctx.device).manual_seed(cfg.seed + 20_000)
    val_episodes = [ep.to(ctx.device) for ep in val_episodes]
    state = {"step": 0, "elapsed": 0.0, "best": None, "nonfinite": 0, "nonfinite_run": 0, "strategy": cfg.strategy}
    saved = setup.saved
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"{out / ckpt.LAST}: does not match the run's config.yaml ({str(e).splitlines()[0].strip()})") from None
        state.update(saved["state"])
        _restore_rng(saved["rng"], gen, noise)
    else:  # a fresh start: the global RNGs from the seed too, so that last.pt's RNG state is reproducible
        _seed_globals(cfg.seed)
    del setup, saved  # the checkpoint's tensors are in the model and optimizer now
    part = distributed.shard(cfg.meta_batch, ctx.rank, ctx.world_size)
    if ctx.distributed:
        log.info("rank %d/%d adapts tasks %d:%d of %d on %s", ctx.rank, ctx.world_size, part.start, part.stop, cfg.meta_batch, ctx.device)

    if ctx.is_main:  # only now is anything written
        if resume:
            ckpt.remove_stale_temps(out)
            _truncate_metrics(out / METRICS, state["step"])
        else:
            out.mkdir(parents=True, exist_ok=True)
            for stale in (ckpt.LAST, ckpt.BEST, METRICS):
                (out / stale).unlink(missing_ok=True)
            ckpt.atomic_write_bytes(out / "space.yaml", space.text.encode())
            ckpt.atomic_write_bytes(out / "config.yaml", cfg.to_yaml().encode())  # written last: marks a run
    if state["strategy"] == "auto":
        probe = dist_.sample(part.stop - part.start, torch.Generator().manual_seed(cfg.seed + 1)).to(ctx.device)
        state["strategy"] = ctx.broadcast_object(calibrate_strategy(model, probe, cfg))
        model.zero_grad(set_to_none=True)

    def save(name: str) -> None:
        ckpt.save_checkpoint(out / name, {
            "format_version": FORMAT_VERSION,
            "config": dataclasses.asdict(cfg),
            "space": space.text,
            "n_families": dist_.n_families,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "state": dict(state),
            "rng": ckpt.capture_rng({"tasks": gen} if noise is gen else {"tasks": gen, "noise": noise}),
        })  # fmt: skip

    def progress_of() -> float:
        if cfg.steps is not None:
            return state["step"] / cfg.steps
        return state["elapsed"] / (60.0 * cfg.minutes)

    sync_clock = ctx.distributed and cfg.steps is None
    elapsed_t = torch.zeros(1, dtype=torch.float64, device=ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    step_kw = dict(inner_steps=cfg.inner_steps, order=cfg.order, beta=cfg.beta, entropy_weight=cfg.entropy_weight, gumbel=cfg.gumbel, hard=cfg.hard, strategy=state["strategy"])
    step = _step_function(model, part, noise, params, step_kw, cfg.precision)
    compile_info: dict[str, Any] | None = None
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=state["step"], unit="step", dynamic_ncols=True)
    metrics_file = (out / METRICS).open("a") if ctx.is_main else None
    warned: set[str] = set()  # kinds of architecture collapse already warned about

    def write(row: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(_finite_or_null(row)) + "\n")
            metrics_file.flush()

    done_here = 0
    try:
        while True:
            if sync_clock:  # the time budget ends on the same step everywhere
                elapsed_t[0] = state["elapsed"]
                state["elapsed"] = float(ctx.broadcast(elapsed_t)[0])
            if progress_of() >= 1.0:
                break
            if stop_after is not None and done_here >= stop_after:
                return {"stopped": state["step"]}
            t0 = time.perf_counter()
            p = progress_of()
            for group in opt.param_groups:
                group["lr"] = cfg.meta_lr * _lr_factor(cfg, p)
            tau = _temperature(cfg, p)
            episode = dist_.sample(cfg.meta_batch, gen).to(ctx.device)
            if cfg.compile and compile_info is None:  # on this process's first step
                step, compile_info = _compiled_step(step, episode, tau, noise)
                write({"step": state["step"], "compile": compile_info})
            loss, grads, m = step(*_episode_args(episode), tau)
            for p_, g in zip(params, grads):
                p_.grad = g
            finite = bool(torch.isfinite(loss))
            if ctx.distributed:
                finite, m = ctx.all_reduce_step(params, finite, m)
            if finite:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                finite = bool(torch.isfinite(norm))
            if finite:
                opt.step()
                state["nonfinite_run"] = 0
            else:
                state["nonfinite"] += 1
                state["nonfinite_run"] += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", state["step"], state["nonfinite_run"])
                if state["nonfinite_run"] >= cfg.max_nonfinite:
                    raise NonFiniteError(f"{cfg.max_nonfinite} non-finite losses or gradients in a row, the last at step {state['step']}; lower --meta-lr or --inner-lr (last.pt holds the last finite state)")
            state["step"] += 1
            done_here += 1
            state["elapsed"] += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(query=f"{m['query_loss']:.3f}")
            if state["step"] % cfg.log_every == 0:
                write({"step": state["step"], "time": round(state["elapsed"], 3), "temperature": tau, "lr": opt.param_groups[0]["lr"], "nonfinite": state["nonfinite"], "skipped": not finite, **m})
            validate = state["step"] % cfg.val_every == 0 or progress_of() >= 1.0
            if validate and ctx.is_main:
                t_val = time.perf_counter()
                val = evaluate(model, val_episodes, cfg.eval_inner_steps)
                score = val["mean"] if space.task.kind == "classification" else -val["mean"]
                better = math.isfinite(score) and (state["best"] is None or score > state["best"])
                row = {"step": state["step"], "time": round(state["elapsed"], 3), "val": val}
                if cfg.arch != "fixed":
                    row["arch"] = architecture_health(model, val_episodes, warned)
                write(row)
                if better:
                    state["best"] = score
                    save(ckpt.BEST)
                state["elapsed"] += time.perf_counter() - t_val  # the budget includes validation
            if ctx.is_main and (validate or (cfg.ckpt_every is not None and state["step"] % cfg.ckpt_every == 0)):
                save(ckpt.LAST)
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if bar is not None:
            bar.close()
    best = state["best"]
    if best is not None and space.task.kind != "classification":
        best = -best
    result = {"step": state["step"], "best_val": best, "strategy": state["strategy"], "nonfinite": state["nonfinite"], "elapsed": state["elapsed"]}
    if compile_info is not None:
        result["compile"] = compile_info
    return ctx.broadcast_object(result)  # rank 0's figures everywhere (and no rank leaves early)


def architecture_health(model: MetaNet, episodes: list[Episode], warned: set[str] | None = None) -> dict[str, Any]:
    """``graph.population_health`` of the networks generated for ``episodes``; warns once per kind of collapse.

    ``warned`` holds the kinds already warned about (``tasks``, ``parameter_free``) and
    is updated, so that a run says each once.
    """
    genotypes, families, alphas = [], [], []
    for ep in episodes:
        nets = generate_networks(model, ep)
        genotypes += [n.genotype for n in nets]
        alphas += [n.alpha for n in nets]
        families += ep.metadata.tolist() if ep.metadata is not None else [None] * len(nets)
    known = [f for f in families if f is not None]
    health = population_health(model.space, genotypes, families if known else None, torch.stack(alphas))
    if warned is not None:
        if health["distinct"] == 1 and health["tasks"] >= 10 and "tasks" not in warned:
            warned.add("tasks")
            log.warning("the architecture generator gave all %d validation tasks the same architecture (collapse across tasks): see metrics.jsonl 'arch'", health["tasks"])
        if health["parametric_share"] < 0.25 and "parameter_free" not in warned:
            warned.add("parameter_free")
            log.warning("only %.0f%% of the generated networks' kept edges have weights (collapse to parameter-free ops: pooling and skip win without training)", 100 * health["parametric_share"])
    return health


def _finite_or_null(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or infinity: such figures are logged as null."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out[k] = _finite_or_null(v)
        elif isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out


def _seed_globals(seed: int) -> None:
    import random

    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


def _restore_rng(rng: dict[str, Any], gen: torch.Generator, noise: torch.Generator) -> None:
    rng = dict(rng)
    saved_gens = dict(rng.get("generators", {}))
    noise_state = saved_gens.pop("noise", None)
    rng["generators"] = saved_gens
    ckpt.restore_rng(rng, {"tasks": gen})
    if noise is gen:
        if noise_state is not None:
            log.warning("resuming on the CPU a run saved on %s: the generators' noise continues from the task stream", noise_state["device"])
    elif noise_state is not None and torch.device(noise_state["device"]).type == noise.device.type:
        noise.set_state(noise_state["state"])
    else:
        log.warning("resuming on %s a run saved elsewhere: the generators' noise starts from a fresh seed", noise.device)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (the resumed checkpoint's).

    Later rows (and a line cut short by a kill) belong to steps the resumed run repeats.
    """
    if not path.exists():
        return
    data = path.read_bytes()
    keep: list[bytes] = []
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            row = json.loads(line)
        except ValueError:
            break
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or row["step"] > step:
            break
        keep.append(line)
    kept = b"".join(keep)
    if kept != data:
        ckpt.atomic_write_bytes(path, kept)


def _read_run_config(run: Path, cmd: str | None = None) -> tuple[TrainConfig, str]:
    what = f"{cmd}: " if cmd else ""
    if not run.is_dir():
        raise ConfigError(f"{what}{run}: no such run directory")
    try:
        text_cfg = (run / "config.yaml").read_text()
        text = (run / "space.yaml").read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"{what}{run}: not a metanet run directory (missing {Path(e.filename).name})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}{run}: cannot read the run's files ({type(e).__name__})") from None
    try:
        data = yaml.safe_load(text_cfg)  # plain data only: a tag that would run code is refused
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{run / 'config.yaml'}: not a readable config ({first})") from None
    try:
        return TrainConfig.from_dict(data, str(run / "config.yaml")), text
    except TypeError as e:  # e.g. keys that are not strings
        raise ConfigError(f"{run / 'config.yaml'}: not a metanet config ({e})") from None


def load_run(run: str | Path, which: str = "best") -> tuple[MetaNet, TrainConfig]:
    """Load a trained MetaNet from a run directory (``best.pt`` or ``last.pt``)."""
    run = Path(run)
    cfg, text = _read_run_config(run)
    path = run / (ckpt.BEST if which == "best" else ckpt.LAST)
    if not path.exists():
        path = run / ckpt.LAST
    if not path.exists():
        raise ConfigError(f"{run}: the run has no checkpoint yet (no {ckpt.LAST} or {ckpt.BEST})")
    saved = ckpt.load_checkpoint(path)
    version = saved.get("format_version")
    if not (type(version) is int and 1 <= version <= FORMAT_VERSION) or "model" not in saved or "n_families" not in saved:
        raise ConfigError(f"{path}: not a metanet training checkpoint this version reads (format version {version!r}, expected 1..{FORMAT_VERSION})")
    try:
        model = MetaNet(build_space(cfg, text), saved["n_families"], cfg.model_config())
        model.load_state_dict(saved["model"])
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: does not match the run's config.yaml ({str(e).splitlines()[0].strip()})") from None
    model.eval()
    return model, cfg
