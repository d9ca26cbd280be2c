"""Meta-training runs: config, task construction, the outer loop, checkpoints and resume.

A run directory holds ``config.yaml``, ``space.yaml`` (the exact search space text),
``metrics.jsonl`` (one JSON object per logged step), ``last.pt`` and ``best.pt``.
``train`` with ``resume=True`` continues a run exactly: model, optimizer, schedule, step
and every RNG state come back from ``last.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from . import checkpoint as ckpt
from .meta import ORDERS, MetaNet, ModelConfig, evaluate, meta_loss
from .space import SearchSpace, load, loads
from .tasks import Episode, TaskDistribution, fixed_episodes, make_tasks

__all__ = ["TrainConfig", "ConfigError", "build_space", "build_tasks", "build_model", "train", "load_run", "calibrate_strategy"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key '{unknown[0]}'")
        return cls(**data)


def build_space(cfg: TrainConfig, text: str | None = None) -> SearchSpace:
    """The run's search space, with the classifier head sized to ``ways``."""
    space = loads(text, cfg.space) if text is not None else load(cfg.space)
    if space.task.kind == "classification" and space.task.outputs != cfg.ways:
        space = dataclasses.replace(space, task=dataclasses.replace(space.task, outputs=cfg.ways))
    return space


def build_tasks(cfg: TrainConfig, split: str | None = None, *, shots: int | None = None, queries: int | None = None) -> TaskDistribution:
    """The task distribution a config names (``split`` for image datasets)."""
    kw: dict[str, Any] = {"shots": shots or cfg.shots, "queries": queries or cfg.queries}
    if cfg.tasks == "omniglot":
        from .tasks import default_data_root

        root = cfg.data_root or default_data_root()
        if root is None:
            raise ConfigError("omniglot needs --data-root DIR (npz files or images_background/ PNG folders); none given and no default found")
        kw.update(root=root, split=split or "train", ways=cfg.ways, rotations=cfg.rotations)
    elif cfg.tasks == "multimodal":
        kw.update(with_metadata=cfg.use_metadata)
    return make_tasks(cfg.tasks, **kw)


def _check(cfg: TrainConfig, space: SearchSpace, dist: TaskDistribution) -> None:
    if cfg.order not in ORDERS:
        raise ConfigError(f"order must be one of {', '.join(ORDERS)}, got {cfg.order!r}")
    if dist.kind != space.task.kind:
        raise ConfigError(f"space '{space.name}' is for {space.task.kind} but tasks '{cfg.tasks}' are {dist.kind}")
    if tuple(dist.input_shape) != tuple(space.task.input):
        raise ConfigError(f"space '{space.name}' expects inputs {list(space.task.input)} but tasks '{cfg.tasks}' give {list(dist.input_shape)}")
    if dist.kind == "regression" and dist.n_outputs != space.task.outputs:
        raise ConfigError(f"space '{space.name}' has {space.task.outputs} outputs but tasks '{cfg.tasks}' have {dist.n_outputs}")
    if cfg.steps is None and cfg.minutes is None:
        raise ConfigError("give --steps or --minutes")


def build_model(cfg: TrainConfig, space: SearchSpace, n_families: int) -> MetaNet:
    """A fresh MetaNet for a config (seeded by ``cfg.seed``)."""
    torch.manual_seed(cfg.seed)
    return MetaNet(space, n_families, cfg.model_config())


def calibrate_strategy(model: MetaNet, episode: Episode, cfg: TrainConfig, repeats: int = 2) -> str:
    """Time one meta-step with each task-execution strategy and return the faster one."""
    times = {}
    for strategy in ("loop", "vmap"):
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            loss, _ = meta_loss(model, episode, inner_steps=cfg.inner_steps, order=cfg.order, strategy=strategy)
            torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
            best = min(best, time.perf_counter() - t)
        times[strategy] = best
    choice = min(times, key=times.get)
    log.info("task execution: %s (loop %.3fs, vmap %.3fs per step)", choice, times["loop"], times["vmap"])
    return choice


def _temperature(cfg: TrainConfig, progress: float) -> float:
    return cfg.temperature * (cfg.final_temperature / cfg.temperature) ** min(max(progress, 0.0), 1.0)


def _lr_factor(cfg: TrainConfig, progress: float) -> float:
    if cfg.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class NonFiniteError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Meta-train and write the run directory; returns the final metrics.

    Args:
        cfg: the configuration (ignored in favour of the saved one when resuming).
        out: run directory.
        resume: continue from ``out/last.pt``.
        progress: show a tqdm bar.
        stop_after: stop (as if killed) after this many steps in this call; for tests.
    """
    out = Path(out)
    if resume:
        cfg, space_text = _read_run_config(out)
        space = build_space(cfg, space_text)
    else:
        space = build_space(cfg)
    dist = build_tasks(cfg, "train")
    val_dist = build_tasks(cfg, "val", queries=cfg.queries)
    _check(cfg, space, dist)
    model = build_model(cfg, space, dist.n_families)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.meta_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    val_episodes = fixed_episodes(val_dist, cfg.val_tasks, min(cfg.meta_batch, cfg.val_tasks), seed=cfg.seed + 10_000)
    state = {"step": 0, "elapsed": 0.0, "best": None, "nonfinite": 0, "nonfinite_run": 0, "strategy": cfg.strategy}
    if resume:
        saved = ckpt.load_checkpoint(out / ckpt.LAST)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state.update(saved["state"])
        ckpt.restore_rng(saved["rng"], {"tasks": gen})
    else:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_bytes(out / "config.yaml", cfg.to_yaml().encode())
        ckpt.atomic_write_bytes(out / "space.yaml", space.text.encode())
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if state["strategy"] == "auto":
        probe = dist.sample(cfg.meta_batch, torch.Generator().manual_seed(cfg.seed + 1))
        state["strategy"] = calibrate_strategy(model, probe, cfg)
        model.zero_grad(set_to_none=True)

    def save(name: str) -> None:
        ckpt.save_checkpoint(out / name, {
            "format_version": FORMAT_VERSION,
            "config": dataclasses.asdict(cfg),
            "space": space.text,
            "n_families": dist.n_families,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "state": dict(state),
            "rng": ckpt.capture_rng({"tasks": gen}),
        })  # fmt: skip

    def progress_of() -> float:
        if cfg.steps is not None:
            return state["step"] / cfg.steps
        return state["elapsed"] / (60.0 * cfg.minutes)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=state["step"], unit="step", dynamic_ncols=True)
    metrics_file = (out / "metrics.jsonl").open("a")
    done_here = 0
    try:
        while progress_of() < 1.0:
            if stop_after is not None and done_here >= stop_after:
                return {"stopped": state["step"]}
            t0 = time.perf_counter()
            p = progress_of()
            for group in opt.param_groups:
                group["lr"] = cfg.meta_lr * _lr_factor(cfg, p)
            tau = _temperature(cfg, p)
            episode = dist.sample(cfg.meta_batch, gen)
            loss, m = meta_loss(model, episode, inner_steps=cfg.inner_steps, order=cfg.order, beta=cfg.beta, entropy_weight=cfg.entropy_weight, temperature=tau, gumbel=cfg.gumbel, hard=cfg.hard, strategy=state["strategy"], generator=gen)
            opt.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                finite = bool(torch.isfinite(norm))
            if finite:
                opt.step()
                state["nonfinite_run"] = 0
            else:
                state["nonfinite"] += 1
                state["nonfinite_run"] += 1
                if state["nonfinite_run"] >= cfg.max_nonfinite:
                    raise NonFiniteError(f"{cfg.max_nonfinite} non-finite losses or gradients in a row, the last at step {state['step']}; lower --meta-lr or --inner-lr")
            state["step"] += 1
            done_here += 1
            state["elapsed"] += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(query=f"{m['query_loss']:.3f}")
            if state["step"] % cfg.log_every == 0:
                row = {"step": state["step"], "time": round(state["elapsed"], 3), "temperature": tau, "lr": opt.param_groups[0]["lr"], "nonfinite": state["nonfinite"], **m}
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if state["step"] % cfg.val_every == 0 or progress_of() >= 1.0:
                t_val = time.perf_counter()
                val = evaluate(model, val_episodes, cfg.eval_inner_steps)
                score = val["mean"] if space.task.kind == "classification" else -val["mean"]
                better = math.isfinite(score) and (state["best"] is None or score > state["best"])
                metrics_file.write(json.dumps({"step": state["step"], "time": round(state["elapsed"], 3), "val": val}) + "\n")
                metrics_file.flush()
                if better:
                    state["best"] = score
                    save(ckpt.BEST)
                state["elapsed"] += time.perf_counter() - t_val  # the budget includes validation
                save(ckpt.LAST)
    finally:
        metrics_file.close()
        if bar is not None:
            bar.close()
    best = state["best"]
    if best is not None and space.task.kind != "classification":
        best = -best
    return {"step": state["step"], "best_val": best, "strategy": state["strategy"], "nonfinite": state["nonfinite"], "elapsed": state["elapsed"]}


def _read_run_config(run: Path) -> tuple[TrainConfig, str]:
    try:
        data = yaml.safe_load((run / "config.yaml").read_text())
        text = (run / "space.yaml").read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"{run}: not a metanet run directory (missing {Path(e.filename).name})") from None
    return TrainConfig.from_dict(data, str(run / "config.yaml")), text


def load_run(run: str | Path, which: str = "best") -> tuple[MetaNet, TrainConfig]:
    """Load a trained MetaNet from a run directory (``best.pt`` or ``last.pt``)."""
    run = Path(run)
    cfg, text = _read_run_config(run)
    path = run / (ckpt.BEST if which == "best" else ckpt.LAST)
    if not path.exists():
        path = run / ckpt.LAST
    saved = ckpt.load_checkpoint(path)
    model = MetaNet(build_space(cfg, text), saved["n_families"], cfg.model_config())
    model.load_state_dict(saved["model"])
    model.eval()
    return model, cfg
