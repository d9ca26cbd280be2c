"""The task protocol: an ``Episode`` (a meta-batch of tasks) and a ``TaskDistribution``.

A task distribution samples whole meta-batches at once: every tensor carries the task
dimension B first, so that a learner can process the B tasks batched or one by one
(``Episode.task``). Randomness comes only from the ``torch.Generator`` passed to
``sample``, so a seeded generator gives the same episodes on every run.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["did_you_mean", "TaskError", "Episode", "TaskDistribution", "fixed_episodes", "shared_data_root"]


def shared_data_root(name: str = "") -> Path | None:
    """The folder ``shared/data/<name>`` beside the working directory or the repository, or None.

    Looked for under the parent of the working directory, then under the parent of the
    repository that holds the ``metanet`` package (a development checkout).
    """
    repo = Path(__file__).resolve().parents[2]
    for candidate in (Path.cwd().parent, repo.parent):
        folder = candidate / "shared" / "data" / name
        if folder.is_dir():
            return folder.resolve()
    return None


class TaskError(ValueError):
    """A task distribution built from bad input; the message is one line."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(field: str, name: str, valid: Iterable[str]) -> TaskError:
    """Build the error for a name that is not one of ``valid``."""
    valid = list(valid)
    listed = ", ".join(repr(v) for v in valid)
    return TaskError(f"{field} {name!r} is not one of {listed}{did_you_mean(name, valid)}")


def _check_positive(field: str, value: int) -> None:
    """Raise ``TaskError`` unless ``value`` is an int of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskError(f"{field} must be a positive int, got {value!r}")


def _check_range(field: str, value: tuple[float, float]) -> tuple[float, float]:
    """Return ``value`` as a float pair after checking ``low <= high``."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TaskError(f"{field} must be a (low, high) pair of numbers, got {value!r}") from None
    if not low <= high:
        raise TaskError(f"{field} must have low <= high, got {value!r}")
    return low, high


@dataclass(frozen=True, eq=False)  # == on tensors is elementwise: compare episodes by identity
class Episode:
    """A meta-batch of B tasks."""

    support_x: Tensor  # (B, Ns, *input_shape) float32
    # classification: (B, Ns) int64 in [0, ways); regression: (B, Ns, outputs) float32
    support_y: Tensor
    query_x: Tensor  # (B, Nq, *input_shape)
    query_y: Tensor  # like support_y
    metadata: Tensor | None = None  # (B,) int64 family id, or None

    def to(self, device: torch.device | str) -> Episode:
        """Return the episode with every tensor moved to ``device``."""
        return self._map(lambda t: t.to(device))

    def task(self, b: int) -> Episode:
        """Return task ``b`` alone, keeping a leading task dimension of 1."""
        return self._map(lambda t: t[b].unsqueeze(0))

    def slice(self, part: slice) -> Episode:
        """The tasks ``part`` of the meta-batch."""
        return self._map(lambda t: t[part])

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Episode:
        """Apply ``fn`` to every tensor of the episode."""
        return Episode(
            fn(self.support_x),
            fn(self.support_y),
            fn(self.query_x),
            fn(self.query_y),
            None if self.metadata is None else fn(self.metadata),
        )

    @property
    def batch_size(self) -> int:
        """Number of tasks B."""
        return self.support_x.shape[0]


@runtime_checkable
class TaskDistribution(Protocol):
    """A family of tasks that samples meta-batches of episodes."""

    kind: str  # "classification" | "regression"
    input_shape: tuple[int, ...]  # (C, H, W) or (D,)
    n_outputs: int  # ways for classification, output dim for regression
    n_families: int  # number of categorical metadata values, 0 when no metadata

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Episode:
        """Sample an episode of ``batch`` tasks."""
        ...


def fixed_episodes(dist: TaskDistribution, n_tasks: int, batch: int, seed: int) -> list[Episode]:
    """Return a deterministic list of episodes holding ``n_tasks`` tasks in total.

    Episodes have ``batch`` tasks each, except the last, which holds the remainder. The
    same distribution and seed give identical tensors, which makes this the way to build
    validation and test sets.
    """
    _check_positive("n_tasks", n_tasks)
    _check_positive("batch", batch)
    generator = torch.Generator().manual_seed(seed)
    sizes = [batch] * (n_tasks // batch) + ([n_tasks % batch] if n_tasks % batch else [])
    return [dist.sample(size, generator) for size in sizes]
