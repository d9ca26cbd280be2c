"""A user-defined task distribution: step functions, registered and sampled like the built-ins.

Run: python scripts/custom_tasks_example.py
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from metanet.tasks import (
    Episode,
    TaskDistribution,
    TaskError,
    fixed_episodes,
    make_tasks,
    register_tasks,
)


@register_tasks("step")
@dataclass(frozen=True)
class StepFunctions:
    """Steps y = +-h [x > t], x ~ U[-5, 5], t ~ U[-3, 3], h ~ U[1, 3]; the sign is the family."""

    shots: int = 5
    queries: int = 10

    kind: ClassVar[str] = "regression"
    input_shape: ClassVar[tuple[int, ...]] = (1,)
    n_outputs: ClassVar[int] = 1
    n_families: ClassVar[int] = 2  # metadata: 0 = step up, 1 = step down

    def __post_init__(self) -> None:
        if self.shots < 1 or self.queries < 1:
            raise TaskError(f"shots and queries must be >= 1, got {self.shots} and {self.queries}")

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Episode:
        """Sample ``batch`` step functions; metadata says which way each one steps."""
        n = self.shots + self.queries
        x = 10 * torch.rand(batch, n, 1, generator=generator) - 5  # (B, N, 1)
        threshold = 6 * torch.rand(batch, 1, 1, generator=generator) - 3  # (B, 1, 1)
        size = 1 + 2 * torch.rand(batch, 1, 1, generator=generator)  # (B, 1, 1)
        down = torch.randint(2, (batch,), generator=generator)  # (B,)
        sign = 1 - 2 * down[:, None, None]  # +1 up, -1 down
        y = sign * size * (x > threshold).float()  # (B, N, 1)
        k = self.shots
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:], down)


def main() -> None:
    dist = make_tasks("step", shots=10, queries=20)
    assert isinstance(dist, TaskDistribution)
    episode = dist.sample(4, torch.Generator().manual_seed(0))
    for name in ("support_x", "support_y", "query_x", "query_y", "metadata"):
        tensor = getattr(episode, name)
        print(f"{name:10s} {tuple(tensor.shape)} {tensor.dtype}")
    validation = fixed_episodes(dist, n_tasks=50, batch=16, seed=0)
    print("validation episodes:", [e.batch_size for e in validation])
    print("task 0 steps", "down" if episode.metadata[0] else "up")


if __name__ == "__main__":
    main()
