"""Task encoders: a support set (and optional metadata) in, one task embedding out.

Permutation-invariant over the support set. For classification the embedding is built
from per-class prototypes pooled symmetrically over classes, so relabelling the classes
leaves it unchanged. Task metadata (a categorical family id) is fused in by addition of a
learned embedding; a reserved "unknown" row stands in when metadata is withheld.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TaskEncoder"]


class TaskEncoder(nn.Module):
    """Embeds a batch of tasks from their support sets.

    Args:
        kind: ``"classification"`` or ``"regression"``.
        input_shape: ``(C, H, W)`` or ``(D,)``.
        n_outputs: ways (classification) or output dimension (regression).
        dim: size of the task embedding.
        n_families: number of metadata families; 0 disables metadata.
    """

    def __init__(self, kind: str, input_shape: tuple[int, ...], n_outputs: int, dim: int = 64, n_families: int = 0):
        super().__init__()
        self.kind, self.dim, self.n_outputs = kind, dim, n_outputs
        hidden = 64
        if len(input_shape) == 3:
            c = input_shape[0]
            self.features: nn.Module = nn.Sequential(
                nn.Conv2d(c, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(64, hidden, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )  # fmt: skip
        else:
            d_in = input_shape[0] + (n_outputs if kind == "regression" else 0)
            self.features = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.per_item = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(2 * hidden, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.n_families = n_families
        self.family = nn.Embedding(n_families + 1, dim) if n_families else None
        if self.family is not None:
            nn.init.normal_(self.family.weight, std=0.1)

    def forward(self, support_x: Tensor, support_y: Tensor, metadata: Tensor | None = None, ways: int | None = None) -> Tensor:
        """Embed tasks.

        Args:
            support_x: ``(B, N, *input)``.
            support_y: ``(B, N)`` class ids, or ``(B, N, outputs)`` regression targets.
            metadata: ``(B,)`` family ids, -1 (or None) for unknown.
            ways: classification: the number of classes (default ``n_outputs``); the
                prototypes are pooled symmetrically, so any number gives a ``dim`` embedding.

        Returns:
            ``(B, dim)`` task embeddings.
        """
        b, n = support_x.shape[:2]
        if self.kind == "classification":
            h = self.features(support_x.flatten(0, 1)).view(b, n, -1)  # (B, N, h)
            onehot = F.one_hot(support_y, ways or self.n_outputs).to(h.dtype)  # (B, N, ways)
            counts = onehot.sum(1).clamp_min(1.0)  # (B, ways)
            items = torch.einsum("bnw,bnh->bwh", onehot, h) / counts[..., None]  # prototypes
        else:
            pairs = torch.cat([support_x.flatten(2), support_y.flatten(2)], dim=-1)  # (B, N, D + out)
            items = self.features(pairs)  # (B, N, h)
        items = self.per_item(items)
        pooled = torch.cat([items.mean(1), items.amax(1)], dim=-1)  # (B, 2h): symmetric pooling
        e = self.out(pooled)
        if self.family is not None:
            ids = torch.full((b,), self.n_families, dtype=torch.long, device=e.device)
            if metadata is not None:
                ids = torch.where(metadata >= 0, metadata, ids)
            e = e + self.family(ids)
        return e
