"""The run directory: what a training run writes and what reads it back.

A run directory holds ``config.yaml`` (the ``TrainConfig``), ``space.yaml`` (the exact
search space text), ``metrics.jsonl`` (one JSON object per logged step), ``last.pt`` and
``best.pt`` (training checkpoints: model, optimizer, schedule state and RNG states).
``config.yaml`` is written last when a run starts: it marks a folder as a run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .meta import MetaNet
from .space import SearchSpace, load, loads

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "METRICS", "build_space", "read_run_config", "load_run", "load_training_checkpoint", "truncate_metrics", "MetricsLog", "start_run"]

FORMAT_VERSION = 1  # of the training checkpoints (last.pt, best.pt); resume needs this exact one
METRICS = "metrics.jsonl"


def build_space(cfg: TrainConfig, text: str | None = None) -> SearchSpace:
    """The run's search space, with the classifier head sized to ``ways``."""
    space = loads(text, cfg.space) if text is not None else load(cfg.space)
    if space.task.kind == "classification" and space.task.outputs != cfg.ways:
        space = dataclasses.replace(space, task=dataclasses.replace(space.task, outputs=cfg.ways))
    return space


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    saved = ckpt.load_checkpoint(path)
    version = saved.get("format_version")
    if version != FORMAT_VERSION:
        raise ConfigError(f"{path}: a training checkpoint of format version {version!r}; this metanet resumes version {FORMAT_VERSION} only")
    missing = [k for k in ("model", "optimizer", "state", "rng", "n_families") if k not in saved]
    if missing:
        raise ConfigError(f"{path}: not a metanet training checkpoint (no {missing[0]!r})")
    return saved


def truncate_metrics(path: Path, step: int) -> None:
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


class MetricsLog:
    """``metrics.jsonl``, appended to one JSON row at a time (non-finite figures as null)."""

    def __init__(self, path: Path | None) -> None:
        self._file = path.open("a") if path is not None else None  # None: a rank that writes nothing

    def write(self, row: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_finite_or_null(row)) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def start_run(out: Path, cfg: TrainConfig, space: SearchSpace, *, resume_step: int | None) -> None:
    """Prepare ``out`` for writing: a resumed run drops stale temporaries and the metrics
    rows after its checkpoint; a new one clears old files and writes space.yaml, then
    config.yaml (last: it marks a run)."""
    if resume_step is not None:
        ckpt.remove_stale_temps(out)
        truncate_metrics(out / METRICS, resume_step)
        return
    out.mkdir(parents=True, exist_ok=True)
    for stale in (ckpt.LAST, ckpt.BEST, METRICS):
        (out / stale).unlink(missing_ok=True)
    ckpt.atomic_write_bytes(out / "space.yaml", space.text.encode())
    ckpt.atomic_write_bytes(out / "config.yaml", cfg.to_yaml().encode())


def read_run_config(run: Path, cmd: str | None = None) -> tuple[TrainConfig, str]:
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
    cfg, text = read_run_config(run)
    path = run / (ckpt.BEST if which == "best" else ckpt.LAST)
    if not path.exists():
        path = run / ckpt.LAST
        if path.exists() and which == "best":
            log.warning("%s has no %s (no finite validation yet): using %s", run, ckpt.BEST, ckpt.LAST)
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
