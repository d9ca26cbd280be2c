"""Meta-training runs: task construction, the outer loop, validation and resume.

``train`` builds a run (``_Run``: model, optimizer, schedule state; ``step``, ``validate``,
``save``) from a ``config.TrainConfig`` and loops until its budget is spent, writing the
run directory that ``metanet.rundir`` describes and reads. ``train`` with ``resume=True`` continues a run exactly: model, optimizer, schedule, step
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
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checkpoint as ckpt
from . import distributed
from .compile import checked_compile
from .graph import population_health
from .config import ConfigError, TrainConfig, validate_config, validate_new_run
from .meta import MetaNet, bf16_warning, evaluate, generate_networks, precision
from .plan import ExecOptions
from .plan import compile as compile_plan
from .rundir import FORMAT_VERSION, METRICS, MetricsLog, build_space, load_run, load_training_checkpoint, read_run_config, start_run
from .space import SearchSpace
from .tasks import DEFAULT_DOMAINS, Episode, TaskDistribution, fixed_episodes, make_tasks
from .tasks.images import cache_dir
from .tuning import choose_paths

__all__ = ["TrainConfig", "ConfigError", "NonFiniteError", "architecture_health", "build_space", "build_tasks", "check_tasks", "validate_config", "build_model", "train", "load_run", "reuse_freed_memory", "step_function", "step_keywords", "compiled_step", "episode_args"]

log = logging.getLogger(__name__)


IMAGE_TASKS = ("omniglot", "miniimagenet", "images", "multidomain")  # task distributions with named splits
# the config fields only some task distributions read (build_tasks passes them to those alone)
TASK_OPTIONS = {
    "data_root": IMAGE_TASKS,
    "split_file": ("images",),
    "rotations": ("omniglot",),
    "domains": ("multidomain",),
    "domain_weights": ("multidomain",),
}
REGRESSION_TASKS = ("sinusoid", "multimodal")  # the built-in ones: ways does not apply


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
    if dist.kind != space.task.kind:
        raise ConfigError(f"space '{space.name}' is for {space.task.kind} but tasks '{cfg.tasks}' are {dist.kind}")
    if tuple(dist.input_shape) != tuple(space.task.input):
        raise ConfigError(f"space '{space.name}' expects inputs {list(space.task.input)} but tasks '{cfg.tasks}' give {list(dist.input_shape)}")
    if dist.kind == "regression" and dist.n_outputs != space.task.outputs:
        raise ConfigError(f"space '{space.name}' has {space.task.outputs} outputs but tasks '{cfg.tasks}' have {dist.n_outputs}")
    if dist.kind == "classification" and dist.n_outputs != cfg.ways:
        raise ConfigError(f"tasks '{cfg.tasks}' are {dist.n_outputs}-way but the config asks for {cfg.ways} ways")
    if cfg.meta_batch < world_size:
        raise ConfigError(f"meta-batch {cfg.meta_batch} is smaller than the {world_size} processes; every process needs at least one task")


def build_model(cfg: TrainConfig, space: SearchSpace, n_families: int) -> MetaNet:
    """A fresh MetaNet for a config (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    try:
        return MetaNet(space, n_families, cfg.model_config())
    except ValueError as e:  # e.g. arch 'fixed' on a space with a choice of ops
        raise ConfigError(f"space '{space.name}': {str(e).splitlines()[0]}") from None


def step_keywords(cfg: TrainConfig, strategy: str) -> dict[str, Any]:
    """``meta_loss``'s keyword arguments for a config's meta-step (all but the noise)."""
    return {"inner_steps": cfg.inner_steps, "order": cfg.order, "beta": cfg.beta, "entropy_weight": cfg.entropy_weight, "gumbel": cfg.gumbel, "hard": cfg.hard,
            "strategy": strategy, "op_dropout": cfg.op_dropout, "param_prior": cfg.param_prior, "checkpoint": cfg.checkpoint_steps, "cg_steps": cfg.cg_steps}  # fmt: skip


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed blocks, however large, for reuse instead of returning them
    to the system.

    A meta-step allocates and frees the same large activations every step. By default
    glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh mappings and
    unmaps them when freed, so each step faults their pages in again (``bench_meta``
    counts ~27,500 minor faults per conv4 step at meta-batch 8, and 1.2 to 1.6 million per step
    of the clone loop on 84x84 images, whose 64-channel activations pass 32 MiB). Here no
    block is served by mmap (``M_MMAP_MAX`` 0: all come from the heap) and the heap's
    free top is kept up to 2 GiB (``M_TRIM_THRESHOLD``). The cost is resident memory:
    it stays at the peak, and grows past it where a freed block cannot serve a later
    request (the heap gives memory back only from its top; a contrived pattern of mixed
    sizes freed out of order held over twice its live peak). The setting is process-wide
    and stays after ``train`` returns. Threads other than the main one (``--strategy threads``)
    allocate from arenas of their own, in heaps of at most 64 MiB. glibc deletes an
    emptied heap unless the free space it would leave in the heap below (its free top and
    the room it has left to grow) is under the top pad; a 64 MiB pad (``M_TOP_PAD``), a
    heap's largest size, is never exceeded, so no emptied heap is deleted (at 84x84 and
    64 channels the threads faulted 36,000 to 83,000 pages per step without it, under
    7,000 with it, and ran 1.05x as fast, with a largest resident set 12-14% higher; one
    shared arena, the other way to keep the heaps, cost the threads more in its lock than
    the faults: docs/PERFORMANCE.md). The main heap then also grows in steps of 64 MiB
    more than asked, address space that costs memory only once written. Called by
    ``train``; a no-op (False) where the C library is not glibc.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # glibc's mallopt parameters
        return libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and libc.mallopt(m_top_pad, 64 * 2**20) == 1
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


def step_function(model: MetaNet, part: slice, noise: torch.Generator, params: list[Tensor], step_kw: dict[str, Any], arithmetic: str = "fp32") -> StepFn:
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
        return distributed.meta_gradients(model, Episode(sx, sy, qx, qy, md), part, noise, params, lambda: precision(arithmetic, sx.device), temperature=temperature, **step_kw)

    return step


def compiled_step(step: StepFn, episode: Episode, temperature: float, noise: torch.Generator) -> tuple[StepFn, dict[str, Any]]:
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
        checked = checked_compile(step, (*episode_args(episode), temperature, state))
    finally:
        quiet.setLevel(level)
        noise.set_state(state)
    info = {"compiled": checked.compiled, "compile_s": round(checked.compile_s, 1), "eager_s": round(checked.eager_s, 3), "max_rel_error": checked.max_rel_error if math.isfinite(checked.max_rel_error) else None}
    if not checked.compiled:
        info["reason"] = checked.reason
    return checked.fn, info


def episode_args(ep: Episode) -> tuple[Tensor | None, ...]:
    return ep.support_x, ep.support_y, ep.query_x, ep.query_y, ep.metadata


# --------------------------------------------------------------------------- the run


@dataclass
class _Setup:
    """What rank 0 validated and every rank builds from."""

    cfg: TrainConfig
    space_text: str | None  # the run's space.yaml when resuming
    saved: dict[str, Any] | None  # last.pt when resuming from a checkpoint


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool | Callable[[str], None] = False, stop_after: int | None = None, overwrite: bool = True, device: str | torch.device | None = None) -> dict[str, Any]:
    """Meta-train and write the run directory; returns the final metrics.

    Everything the user gave is checked before the run directory is created or touched.
    Under torchrun the process group is initialised here (and destroyed at the end) when
    no one has done so; every rank calls ``train`` with the same arguments.

    Args:
        cfg: the configuration (ignored in favour of the saved one when resuming).
        out: run directory.
        resume: continue from ``out/last.pt``, or from the start of the saved config when
            the run never reached a checkpoint.
        progress: show progress (rank 0): a tqdm bar where stderr is a terminal; else,
            given a function (the CLI passes one that prints), a line to it every half
            minute; else nothing.
        stop_after: stop (as if killed) after this many steps in this call; for tests.
        overwrite: start afresh in a folder that already holds a run, or write the run into
            a folder of other files (the CLI asks for ``--overwrite``); with False either is
            a ``ConfigError``.
        device: where to train; None: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.

    Raises:
        ConfigError: a bad configuration, or a folder that is not (or already is) a run.
        NonFiniteError: ``max_nonfinite`` non-finite steps in a row.
    """
    reuse_freed_memory()
    ctx = distributed.setup(device)
    try:
        setup, built = _agreed_setup(ctx, cfg, Path(out), resume, overwrite)
        run = _Run(ctx, setup, Path(out), resume, built)
        try:
            result = _loop(run, progress, stop_after)
        finally:
            run.close()
    except BaseException:
        ctx.close(clean=False)
        raise
    ctx.close()
    return result


def _loop(run: _Run, progress: bool | Callable[[str], None], stop_after: int | None) -> dict[str, Any]:
    """The outer loop: step until the budget is spent, validating and checkpointing on schedule."""
    shown = _Progress(run.cfg.max_steps, run.state["step"], progress if callable(progress) else None) if progress and run.ctx.is_main else None
    done_here = 0
    try:
        while not run.spent():
            if stop_after is not None and done_here >= stop_after:
                return {"stopped": run.state["step"]}
            m = run.step()
            done_here += 1
            if shown is not None:
                shown.update(run.state["step"], run.state["elapsed"], m["query_loss"])
            validate = run.state["step"] % run.cfg.val_every == 0 or run.progress() >= 1.0
            if validate:
                run.validate()
            if validate or (run.cfg.ckpt_every is not None and run.state["step"] % run.cfg.ckpt_every == 0):
                run.save(ckpt.LAST)
    finally:
        if shown is not None:
            shown.close()
    return run.result()


def _prepare(cfg: TrainConfig | None, out: Path, resume: bool, overwrite: bool) -> _Setup:
    """Rank 0: read and check what the user gave; writes nothing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; --out needs a folder for the run")
    if resume:
        cfg, text = read_run_config(out, "train --resume")
        saved = None
        if (out / ckpt.LAST).exists():
            saved = load_training_checkpoint(out / ckpt.LAST)
        return _Setup(cfg, text, saved)
    if cfg is None:
        raise ConfigError("train: no config given (and not resuming)")
    validate_config(cfg)
    validate_new_run(cfg)
    if not overwrite and any((out / f).exists() for f in (ckpt.LAST, "config.yaml")):
        raise ConfigError(f"train: {out} already holds a run; use --resume to continue it or --overwrite to start again")
    # space.yaml, written before config.yaml, and hidden temporaries: a start that was cut short
    if not overwrite and out.is_dir() and any(p.name != "space.yaml" and not p.name.startswith(".") for p in out.iterdir()):
        raise ConfigError(f"train: --out {out} is not empty and holds no run; give a new or empty folder, or --overwrite to write the run among its files")
    return _Setup(cfg, None, None)


def _agreed_setup(ctx: distributed.Context, cfg: TrainConfig | None, out: Path, resume: bool, overwrite: bool) -> tuple[_Setup, tuple[SearchSpace, TaskDistribution, list[Episode]] | None]:
    """Rank 0 checks everything (config, space, tasks, validation tasks) and tells the
    others, so that a mistake is one error on every rank rather than a hang. Returns the
    setup, and on rank 0 the space, training tasks and validation episodes it built
    (kept: an image dataset is slow to build)."""
    setup: _Setup | BaseException | None = None
    built = None
    if ctx.is_main:
        try:
            setup = _prepare(cfg, out, resume, overwrite)
            space = build_space(setup.cfg, setup.space_text)
            tasks = build_tasks(setup.cfg, "train", space=space)
            check_tasks(setup.cfg, space, tasks, ctx.world_size)
            c = setup.cfg
            val = build_tasks(c, "val", queries=c.queries, space=space)
            built = (space, tasks, fixed_episodes(val, c.val_tasks, min(c.meta_batch, c.val_tasks), seed=c.seed + 10_000))
        except Exception as e:  # noqa: BLE001 -- re-raised on every rank below
            setup = e
    setup = ctx.broadcast_object(setup if ctx.is_main else None)
    if isinstance(setup, BaseException):
        raise setup
    assert setup is not None
    return setup, built


class _Run:
    """One process's part of a training run: model, optimizer, schedule state and files.

    ``step`` runs one meta-step, ``validate`` scores the fixed validation tasks (rank 0),
    ``save`` writes a checkpoint (rank 0); ``state`` (step, elapsed seconds, best score,
    non-finite counts, task strategy) is what a checkpoint carries besides the weights.
    """

    def __init__(self, ctx: distributed.Context, setup: _Setup, out: Path, resume: bool, built: tuple[SearchSpace, TaskDistribution, list[Episode]] | None = None) -> None:
        cfg = self.cfg = setup.cfg
        self.ctx, self.out = ctx, out
        if built is None:  # a rank other than 0: no validation
            built = (space := build_space(cfg, setup.space_text)), build_tasks(cfg, "train", space=space), []
        self.space, self.tasks, self.val_episodes = built
        self.model = build_model(cfg, self.space, self.tasks.n_families).to(ctx.device)
        self.arch_params = list(self.model.arch.parameters())
        arch_ids = {id(p) for p in self.arch_params}
        if cfg.arch_lr is None:  # one group, in the model's parameter order (as checkpoints hold it)
            groups = [{"params": list(self.model.parameters()), "base_lr": cfg.meta_lr}]
        else:  # the architecture generator on its own learning rate
            groups = [{"params": [p for p in self.model.parameters() if id(p) not in arch_ids], "base_lr": cfg.meta_lr}, {"params": self.arch_params, "base_lr": cfg.arch_lr}]
        self.opt = torch.optim.Adam(groups, lr=cfg.meta_lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # tasks (CPU), the same on every rank
        # The generators' noise (VAE, Gumbel) is drawn on the model's device.
        self.noise = self.gen if ctx.device.type == "cpu" else torch.Generator(ctx.device).manual_seed(cfg.seed + 20_000)
        self.val_episodes = [ep.to(ctx.device) for ep in self.val_episodes]
        self.state: dict[str, Any] = {"step": 0, "elapsed": 0.0, "best": None, "nonfinite": 0, "nonfinite_run": 0, "strategy": cfg.strategy}
        if setup.saved is not None:
            try:
                self.model.load_state_dict(setup.saved["model"])
                self.opt.load_state_dict(setup.saved["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise ConfigError(f"{out / ckpt.LAST}: does not match the run's config.yaml ({str(e).splitlines()[0].strip()})") from None
            for group, base in zip(self.opt.param_groups, (cfg.meta_lr, cfg.arch_lr)):
                group.setdefault("base_lr", base)  # a checkpoint from before per-group rates
            self.state.update(setup.saved["state"])
            _restore_rng(setup.saved["rng"], self.gen, self.noise)
        else:  # a fresh start: the global RNGs from the seed too, so that last.pt's RNG state is reproducible
            _seed_globals(cfg.seed)
        self.part = distributed.shard(cfg.meta_batch, ctx.rank, ctx.world_size)
        if ctx.distributed:
            log.info("rank %d/%d adapts tasks %d:%d of %d on %s", ctx.rank, ctx.world_size, self.part.start, self.part.stop, cfg.meta_batch, ctx.device)
        if ctx.is_main and cfg.precision == "bf16" and (slow := bf16_warning(ctx.device)):
            log.warning("%s", slow)
        if ctx.is_main:  # only now is anything written
            start_run(out, cfg, self.space, resume_step=self.state["step"] if resume else None)
        self.metrics = MetricsLog(out / METRICS if ctx.is_main else None)
        if self.state["strategy"] == "auto":  # time the execution paths on this machine and shapes (cached on disk)
            probe = self.tasks.sample(self.part.stop - self.part.start, torch.Generator().manual_seed(cfg.seed + 1)).to(ctx.device)
            choice = choose_paths(self.model, probe, step_keywords(cfg, "auto"), cfg.precision, cache=cache_dir()) if ctx.is_main else None
            if choice is not None:  # rank 0 measures (or reads the cache); the others take its choice
                log.info("execution paths: %s (%s; %s)", choice.describe(), "cached" if choice.cached else "measured",
                         ", ".join(f"{k} {v:.3g}s" for k, v in choice.times.items()))  # fmt: skip
            self.state["strategy"], self.state["exec_options"] = ctx.broadcast_object((choice.strategy, dataclasses.asdict(choice.options)) if choice else None)
        if self.state.get("exec_options"):  # a resumed run keeps the paths it chose
            self.model.plan = compile_plan(self.space, ExecOptions(**self.state["exec_options"]))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step_fn = step_function(self.model, self.part, self.noise, self.params, step_keywords(cfg, self.state["strategy"]), cfg.precision)
        self.compile_info: dict[str, Any] | None = None
        self.warned: set[str] = set()  # kinds of architecture collapse already warned about
        self._elapsed_t = torch.zeros(1, dtype=torch.float64, device=ctx.device)

    def progress(self) -> float:
        """The share of the budget spent (steps, or minutes of wall clock)."""
        if self.cfg.max_steps is not None:
            return self.state["step"] / self.cfg.max_steps
        return self.state["elapsed"] / (60.0 * self.cfg.minutes)

    def spent(self) -> bool:
        if self.ctx.distributed and self.cfg.max_steps is None:  # the time budget ends on the same step everywhere
            self._elapsed_t[0] = self.state["elapsed"]
            self.state["elapsed"] = float(self.ctx.broadcast(self._elapsed_t)[0])
        return self.progress() >= 1.0

    def step(self) -> dict[str, float]:
        """One meta-step: sample, meta-gradient, clip, update (or skip a non-finite one), log."""
        cfg, state = self.cfg, self.state
        t0 = time.perf_counter()
        p = self.progress()
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * _lr_factor(cfg, p)
        tau = _temperature(cfg, p)
        episode = self.tasks.sample(cfg.meta_batch, self.gen).to(self.ctx.device)
        if cfg.compile and self.compile_info is None:  # on this process's first step
            self.step_fn, self.compile_info = compiled_step(self.step_fn, episode, tau, self.noise)
            self.metrics.write({"step": state["step"], "compile": self.compile_info})
        loss, grads, m = self.step_fn(*episode_args(episode), tau)
        for p_, g in zip(self.params, grads):
            p_.grad = g
        finite = bool(torch.isfinite(loss))
        if self.ctx.distributed:
            finite, m = self.ctx.all_reduce_step(self.params, finite, m)
        if p < cfg.arch_warmup:  # warm-up: the architecture generator does not learn yet
            for p_ in self.arch_params:
                p_.grad = None
        if finite:
            finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)))
        if finite:
            self.opt.step()
            state["nonfinite_run"] = 0
        else:
            state["nonfinite"] += 1
            state["nonfinite_run"] += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", state["step"], state["nonfinite_run"])
            if state["nonfinite_run"] >= cfg.max_nonfinite:
                saved = "last.pt holds the last finite state" if (self.out / ckpt.LAST).exists() else "no checkpoint was written yet"
                raise NonFiniteError(f"{cfg.max_nonfinite} non-finite losses or gradients in a row, the last at step {state['step']}; lower --meta-lr or --inner-lr ({saved})")
        state["step"] += 1
        state["elapsed"] += time.perf_counter() - t0
        if state["step"] % cfg.log_every == 0:
            self.metrics.write({"step": state["step"], "time": round(state["elapsed"], 3), "temperature": tau, "lr": self.opt.param_groups[0]["lr"], "nonfinite": state["nonfinite"], "skipped": not finite, **m})
        return m

    def validate(self) -> None:
        """Rank 0: score the validation tasks, log them (and the architectures' health), keep the best."""
        if not self.ctx.is_main:
            return
        state = self.state
        t_val = time.perf_counter()
        val = evaluate(self.model, self.val_episodes, self.cfg.eval_inner_steps)
        score = val["mean"] if self.space.task.kind == "classification" else -val["mean"]
        better = math.isfinite(score) and (state["best"] is None or score > state["best"])
        row = {"step": state["step"], "time": round(state["elapsed"], 3), "val": val}
        if self.cfg.arch != "fixed":
            row["arch"] = architecture_health(self.model, self.val_episodes, self.warned)
        self.metrics.write(row)
        if better:
            state["best"] = score
            self.save(ckpt.BEST)
        state["elapsed"] += time.perf_counter() - t_val  # the budget includes validation

    def save(self, name: str) -> None:
        """Rank 0: write the training checkpoint ``name`` (last.pt or best.pt)."""
        if not self.ctx.is_main:
            return
        gens = {"tasks": self.gen} if self.noise is self.gen else {"tasks": self.gen, "noise": self.noise}
        ckpt.save_checkpoint(self.out / name, {
            "format_version": FORMAT_VERSION,
            "config": dataclasses.asdict(self.cfg),
            "space": self.space.text,
            "n_families": self.tasks.n_families,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "state": dict(self.state),
            "rng": ckpt.capture_rng(gens),
        })  # fmt: skip

    def result(self) -> dict[str, Any]:
        """The final figures, rank 0's on every rank (and no rank leaves early)."""
        best = self.state["best"]
        if best is not None and self.space.task.kind != "classification":
            best = -best
        result = {"step": self.state["step"], "best_val": best, "strategy": self.state["strategy"], "nonfinite": self.state["nonfinite"], "elapsed": self.state["elapsed"]}
        if self.compile_info is not None:
            result["compile"] = self.compile_info
        return self.ctx.broadcast_object(result)

    def close(self) -> None:
        self.metrics.close()


class _Progress:
    """Training progress for a person: a tqdm bar on a terminal; in a log (stderr not a
    terminal) one plain line to ``write`` every ``every`` seconds instead of a bar's redraws."""

    def __init__(self, total: int | None, initial: int, write: Callable[[str], None] | None = None, every: float = 30.0) -> None:
        self.total, self.every, self.last, self.write = total, every, time.monotonic(), write
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, elapsed: float, query_loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(query=f"{query_loss:.3f}")
        elif self.write is not None and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            of = f"/{self.total}" if self.total else ""
            self.write(f"step {step}{of}, {elapsed:.0f} s, query loss {query_loss:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def architecture_health(model: MetaNet, episodes: list[Episode], warned: set[str] | None = None) -> dict[str, Any]:
    """``graph.population_health`` of the networks generated for ``episodes``; warns once per kind of collapse.

    ``warned`` holds the kinds already warned about (``tasks``, ``parameter_free``) and
    is updated, so that a run says each once. A shared or fixed architecture gives every
    task the same network by construction: only a conditional one is warned about that.
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
        # one architecture for all is a collapse only where the generator conditions on the task
        if model.arch.mode == "conditional" and health["distinct"] == 1 and health["tasks"] >= 10 and "tasks" not in warned:
            warned.add("tasks")
            log.warning("the architecture generator gave all %d validation tasks the same architecture (collapse across tasks): see metrics.jsonl 'arch'", health["tasks"])
        if health["parametric_share"] < 0.25 and "parameter_free" not in warned:
            warned.add("parameter_free")
            log.warning("only %.0f%% of the generated networks' kept edges have weights (collapse to parameter-free ops: pooling and skip win without training)", 100 * health["parametric_share"])
    return health


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
