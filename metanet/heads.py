"""Episodic classifier heads: classify a task's queries by comparing them with its support set.

The network's features (the input of the space's linear head) feed one of three heads,
each a classifier of the few-shot literature that has no inner loop of its own:

- ``matching``: Matching Networks (Vinyals et al. 2016). Each query attends over the
  support set with a softmax of scaled cosine similarities; a class's probability is
  the attention on its support examples. Without full-context embeddings; the cosine
  scale is learned (it starts at 10: unscaled cosines, in [-1, 1], give a near-uniform
  attention over a support set).
- ``relation``: Relation Networks (Sung et al. 2018). A learned relation module (an MLP
  on the concatenated query feature and class feature) scores each (query, class) pair;
  the scores are the logits. The class feature is the mean of its support features, not
  the paper's sum, so that a model trained at one shot count is scored at another on the
  same scale; trained with the trainer's cross-entropy, not the paper's mean squared
  error on sigmoid scores (the one loss of every classification row).
- ``memory``: a memory-augmented network (Santoro et al. 2016). An LSTM controller reads
  the support sequence, each feature with its one-hot label, and writes keys to an
  external memory with least-recently-used access (128 slots of 40, as in the paper);
  the controller reads its input with the previous read vector. Each query is one more
  controller step with no label that reads the memory (and writes nothing, so queries
  are independent). The paper presents each label one step after its sample, because
  its episodes are one stream; here the support labels are known at once, as in every
  few-shot protocol, so each sample comes with its own label.

Every head maps ``(support features (B, N, C), support labels (B, N), query features
(B, Q, C), ways)`` to query logits ``(B, Q, ways)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HEADS", "EPISODIC_HEADS", "make_head", "class_means", "MatchingHead", "RelationHead", "MemoryHead"]

EPISODIC_HEADS = ("matching", "relation", "memory")
_OFF = -1e4  # log-attention of a support example outside the class
HEADS = ("linear", *EPISODIC_HEADS)  # linear: the space's own head (from prototypes, or learned)


def class_means(feats: Tensor, y: Tensor, ways: int) -> Tensor:
    """Each class's mean feature: ``(B, N, C)`` features and ``(B, N)`` labels in, ``(B, ways, C)``
    out (zero for a class without examples). The prototypes of ProtoNets and Proto-MAML."""
    onehot = F.one_hot(y, ways).to(feats.dtype)  # (B, N, ways)
    return torch.einsum("bnw,bnc->bwc", onehot, feats) / onehot.sum(1).clamp_min(1.0)[..., None]


class MatchingHead(nn.Module):
    """Matching Networks' cosine attention over the support set (see the module docstring)."""

    any_ways = True  # any number of classes: nothing learned is per class

    def __init__(self, features: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, support: Tensor, y: Tensor, query: Tensor, ways: int) -> Tensor:
        cos = torch.einsum("bqc,bnc->bqn", F.normalize(query, dim=-1), F.normalize(support, dim=-1))
        attention = torch.log_softmax(self.log_scale.exp() * cos, -1)  # (B, Q, N)
        # log sum over the class's support examples of the attention: log p(c | query);
        # a large finite negative off the class (-inf would give NaN gradients for a class
        # with no support example)
        off = F.one_hot(y, ways).transpose(1, 2)[:, None] == 0  # (B, 1, ways, N)
        masked = attention[:, :, None, :].masked_fill(off, _OFF)  # (B, Q, ways, N)
        return torch.logsumexp(masked, -1)


class RelationHead(nn.Module):
    """Relation Networks' learned relation module on (query, class) pairs."""

    any_ways = True

    def __init__(self, features: int, hidden: int = 64):
        super().__init__()
        self.relation = nn.Sequential(nn.Linear(2 * features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, support: Tensor, y: Tensor, query: Tensor, ways: int) -> Tensor:
        classes = class_means(support, y, ways)
        b, q, c = query.shape
        pairs = torch.cat([query[:, :, None].expand(b, q, ways, c), classes[:, None].expand(b, q, ways, c)], -1)
        return self.relation(pairs).squeeze(-1)  # (B, Q, ways)


class MemoryHead(nn.Module):
    """A memory-augmented network with least-recently-used access (Santoro et al. 2016).

    Args:
        features: the feature size of a sample.
        ways: the label size (a learned output layer: exactly this many classes).
        hidden: the LSTM controller's state size.
        slots, width: the memory's rows and row size.
        gamma: the decay of the usage weights.
    """

    any_ways = False  # the label input and the output layer are per class

    def __init__(self, features: int, ways: int, hidden: int = 128, slots: int = 128, width: int = 40, gamma: float = 0.95):
        super().__init__()
        self.ways, self.slots, self.width, self.gamma = ways, slots, width, gamma
        self.controller = nn.LSTMCell(features + ways + width, hidden)  # sample, label, previous read
        self.key = nn.Linear(hidden, width)
        self.gate = nn.Linear(hidden, 1)  # the write gate: previous read location vs least used
        self.out = nn.Linear(hidden + width, ways)

    def initial(self, batch: int, like: Tensor) -> dict[str, Tensor]:
        """The state before the first sample: empty memory, zero usage, an empty read."""
        z = like.new_zeros
        return {
            "h": z(batch, self.controller.hidden_size), "c": z(batch, self.controller.hidden_size),
            "memory": z(batch, self.slots, self.width), "usage": z(batch, self.slots), "read_w": z(batch, self.slots),
            "read": z(batch, self.width),
        }  # fmt: skip

    @staticmethod
    def least_used(usage: Tensor) -> Tensor:
        """One-hot of each row's least-used slot (the first of equals): ``w^lu``, n = 1 read head."""
        return F.one_hot(usage.argmin(-1), usage.shape[-1]).to(usage.dtype)

    def read(self, memory: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """Read weights (softmax of cosine similarity of ``key`` with each row) and the read vector."""
        cos = torch.einsum("...w,...sw->...s", F.normalize(key, dim=-1), F.normalize(memory, dim=-1, eps=1e-6))
        w = torch.softmax(cos, -1)
        return w, torch.einsum("...s,...sw->...w", w, memory)

    def memory_step(self, state: dict[str, Tensor], key: Tensor, gate: Tensor) -> dict[str, Tensor]:
        """Write ``key``, then read with it (Santoro et al. eq. 5-8): the write goes to the
        previously read slots and the least-used one, mixed by ``sigmoid(gate)``, after the
        least-used slot is cleared; the usage decays by ``gamma`` and adds both weights."""
        lu = self.least_used(state["usage"])
        g = torch.sigmoid(gate)
        write_w = g * state["read_w"] + (1 - g) * lu
        memory = state["memory"] * (1 - lu)[..., None] + write_w[..., None] * key[:, None, :]
        read_w, read = self.read(memory, key)
        usage = self.gamma * state["usage"] + read_w + write_w
        return {**state, "memory": memory, "usage": usage, "read_w": read_w, "read": read}

    def step(self, state: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        """One support sample ``x`` (its feature and one-hot label): controller (reading ``x``
        and the previous read vector), write, read."""
        h, c = self.controller(torch.cat([x, state["read"]], -1), (state["h"], state["c"]))
        return self.memory_step({**state, "h": h, "c": c}, torch.tanh(self.key(h)), self.gate(h))

    def forward(self, support: Tensor, y: Tensor, query: Tensor, ways: int) -> Tensor:
        if ways != self.ways:
            raise ValueError(f"the memory network's label input and output are learned for {self.ways}-way tasks, so it cannot classify {ways}-way tasks")
        labels = F.one_hot(y, ways).to(support.dtype)
        state = self.initial(support.shape[0], support)
        for t in range(support.shape[1]):
            state = self.step(state, torch.cat([support[:, t], labels[:, t]], -1))
        b, q, _ = query.shape
        blank = query.new_zeros(b, q, ways)
        hidden = self.controller.hidden_size
        last_read = state["read"][:, None].expand(b, q, self.width)
        h, _ = self.controller(torch.cat([query, blank, last_read], -1).flatten(0, 1), (state["h"].repeat_interleave(q, 0), state["c"].repeat_interleave(q, 0)))
        h = h.view(b, q, hidden)
        _, r = self.read(state["memory"][:, None], torch.tanh(self.key(h)))
        return self.out(torch.cat([h, r], -1))


def make_head(name: str, features: int, ways: int) -> nn.Module | None:
    """The episodic head ``name`` on ``features``-sized features (None for ``linear``)."""
    if name not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {name!r}")
    if name == "linear":
        return None
    if name == "matching":
        return MatchingHead(features)
    if name == "relation":
        return RelationHead(features)
    return MemoryHead(features, ways)
