"""Few-shot regression: MAML's sinusoids and multimodal MAML's five function families.

``Sinusoid`` is the distribution of Finn et al. (2017): y = A sin(x - phase) with
A ~ U[0.1, 5], phase ~ U[0, pi] and x ~ U[-5, 5].

``Multimodal`` follows Vuorio et al. (2019): each task draws a family uniformly, then the
family's parameters uniformly from these ranges (x ~ U[-5, 5]):

=========  =================  ==================================================
family     y                  parameters
=========  =================  ==================================================
sinusoid   A sin(x - phase)   A in [0.1, 5], phase in [0, pi]
linear     a x + b            a in [-3, 3], b in [-3, 3]
quadratic  a (x - c)^2 + b    a in [-0.15, 0.15], c in [-3, 3], b in [-3, 3]
l1         a |x - c| + b      a in [-1, 1], c in [-3, 3], b in [-3, 3]
tanh       a tanh(x - c) + b  a in [-3, 3], c in [-3, 3], b in [-3, 3]
=========  =================  ==================================================

The l1 slope range is narrower than the [-3, 3] of the MMAML code, whose outputs reach
27 in magnitude; with [-1, 1] they stay within 11, the scale of the quadratic family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import Episode, TaskError, _check_positive, _check_range, _unknown

__all__ = ["Sinusoid", "Multimodal", "FAMILY_NAMES"]


@dataclass(frozen=True)
class _Family:
    """A parametric function family with a uniform range per parameter."""

    fn: Callable[..., Tensor]  # fn(x, *params) -> y, broadcasting
    ranges: tuple[tuple[float, float], ...]  # (low, high) of each parameter, in fn's order

    def __call__(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Draw one function per task and evaluate it at ``x``."""
        low, high = torch.tensor(self.ranges, dtype=x.dtype).T  # (P,)
        u = torch.rand(x.shape[0], len(self.ranges), generator=generator, dtype=x.dtype)  # (B, P)
        params = (low + (high - low) * u).T[:, :, None, None]  # (P, B, 1, 1)
        return self.fn(x, *params)  # (B, N, 1)


def _sine(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
    return amplitude * torch.sin(x - phase)


_FAMILIES: dict[str, _Family] = {
    "sinusoid": _Family(_sine, ((0.1, 5.0), (0.0, math.pi))),
    "linear": _Family(lambda x, a, b: a * x + b, ((-3.0, 3.0), (-3.0, 3.0))),
    "quadratic": _Family(
        lambda x, a, c, b: a * (x - c) ** 2 + b, ((-0.15, 0.15), (-3.0, 3.0), (-3.0, 3.0))
    ),
    "l1": _Family(
        lambda x, a, c, b: a * (x - c).abs() + b, ((-1.0, 1.0), (-3.0, 3.0), (-3.0, 3.0))
    ),
    "tanh": _Family(
        lambda x, a, c, b: a * torch.tanh(x - c) + b, ((-3.0, 3.0), (-3.0, 3.0), (-3.0, 3.0))
    ),
}

FAMILY_NAMES: tuple[str, ...] = tuple(_FAMILIES)


def _inputs(
    batch: int, n: int, x_range: tuple[float, float], generator: torch.Generator | None
) -> Tensor:
    """Draw ``n`` inputs per task uniformly from ``x_range``."""
    low, high = x_range
    u = torch.rand(batch, n, 1, generator=generator, dtype=torch.float32)  # (B, N, 1)
    return low + (high - low) * u


def _episode(x: Tensor, y: Tensor, shots: int, metadata: Tensor | None = None) -> Episode:
    """Split the first ``shots`` points of each task into the support set."""
    # contiguous copies: callers may .view() the halves
    return Episode(
        x[:, :shots].contiguous(),
        y[:, :shots].contiguous(),
        x[:, shots:].contiguous(),
        y[:, shots:].contiguous(),
        metadata,
    )


@dataclass(frozen=True)
class Sinusoid:
    """MAML's sinusoid regression: y = amplitude * sin(x - phase)."""

    shots: int = 5
    queries: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    kind: ClassVar[str] = "regression"
    input_shape: ClassVar[tuple[int, ...]] = (1,)
    n_outputs: ClassVar[int] = 1
    n_families: ClassVar[int] = 0

    def __post_init__(self) -> None:
        _check_positive("shots", self.shots)
        _check_positive("queries", self.queries)
        for name in ("amplitude", "phase", "x_range"):
            object.__setattr__(self, name, _check_range(name, getattr(self, name)))

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Episode:
        """Sample ``batch`` sinusoids with ``shots`` support and ``queries`` query points each."""
        x = _inputs(batch, self.shots + self.queries, self.x_range, generator)  # (B, N, 1)
        y = _Family(_sine, (self.amplitude, self.phase))(x, generator)  # (B, N, 1)
        return _episode(x, y, self.shots)


@dataclass(frozen=True)
class Multimodal:
    """Multimodal regression: each task is a function from a uniformly drawn family."""

    shots: int = 5
    queries: int = 10
    families: tuple[str, ...] = FAMILY_NAMES
    with_metadata: bool = True
    noise_std: float = 0.0

    kind: ClassVar[str] = "regression"
    input_shape: ClassVar[tuple[int, ...]] = (1,)
    n_outputs: ClassVar[int] = 1
    x_range: ClassVar[tuple[float, float]] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        _check_positive("shots", self.shots)
        _check_positive("queries", self.queries)
        families = (self.families,) if isinstance(self.families, str) else tuple(self.families)
        if not families:
            raise TaskError(f"families must name at least one of {', '.join(FAMILY_NAMES)}")
        for name in families:
            if name not in _FAMILIES:
                raise _unknown("family", name, FAMILY_NAMES)
        if len(set(families)) != len(families):
            raise TaskError(f"families must not repeat a name, got {families!r}")
        if not (isinstance(self.noise_std, (int, float)) and 0 <= self.noise_std < math.inf):
            raise TaskError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")
        object.__setattr__(self, "families", families)

    @property
    def n_families(self) -> int:
        """Number of family ids in the metadata, 0 without metadata."""
        return len(self.families) if self.with_metadata else 0

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Episode:
        """Sample ``batch`` tasks; metadata holds each task's index into ``families``."""
        x = _inputs(batch, self.shots + self.queries, self.x_range, generator)  # (B, N, 1)
        family = torch.randint(len(self.families), (batch,), generator=generator)  # (B,)
        # every family is evaluated on every task, then each task keeps its own: no task loop
        ys = torch.stack([_FAMILIES[name](x, generator) for name in self.families])  # (F, B, N, 1)
        y = ys[family, torch.arange(batch)]  # (B, N, 1)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=generator, dtype=y.dtype)
        return _episode(x, y, self.shots, family if self.with_metadata else None)
