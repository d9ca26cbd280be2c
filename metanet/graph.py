"""Cell DAGs as networkx graphs, genotypes, and discretisation of soft encodings.

networkx is the single structural representation: discretisation builds each cell's DAG,
prunes the nodes that cannot reach the cell output, and the exporters of ``export.py``
read the same graphs.

Node numbering inside a cell: ``0 .. inputs-1`` are the cell inputs (the outputs of the
previous one or two cells), ``inputs .. inputs+nodes-1`` the intermediate nodes, and the
string ``"out"`` the cell output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import OPS
from .space import CellSpec, SearchSpace

__all__ = ["Genotype", "GenotypeError", "discretise", "cell_dag", "live_nodes", "entropy"]

OUT = "out"
GENOTYPE_VERSION = 1


class GenotypeError(ValueError):
    """A genotype that does not fit its search space; the message is one line."""


@dataclass(frozen=True)
class Genotype:
    """A discrete architecture: per cell, the kept edges ``(src, dst, op label)``.

    Nodes that cannot reach a cell's output are already pruned. Hashable, and its JSON
    form is canonical (sorted edges, sorted keys), so equal genotypes have equal JSON.
    """

    space: str
    cells: tuple[tuple[tuple[int, int, str], ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "cells", tuple(tuple(sorted(map(tuple, c))) for c in self.cells))

    def to_json(self) -> str:
        """Canonical JSON text."""
        data = {
            "format": "metanet.genotype",
            "version": GENOTYPE_VERSION,
            "space": self.space,
            "cells": [[list(e) for e in cell] for cell in self.cells],
        }
        return json.dumps(data, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "<genotype>") -> Genotype:
        """Parse the JSON written by ``to_json``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenotypeError(f"{source}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(data, dict) or data.get("format") != "metanet.genotype":
            raise GenotypeError(f"{source}: expected a metanet genotype JSON object with \"format\": \"metanet.genotype\"")
        try:
            cells = tuple(tuple((int(s), int(d), str(op)) for s, d, op in cell) for cell in data["cells"])
            return cls(str(data["space"]), cells)
        except (KeyError, TypeError, ValueError):
            raise GenotypeError(f"{source}: 'cells' must be a list of [src, dst, op] lists per cell, and 'space' a name") from None

    def validate(self, space: SearchSpace) -> None:
        """Raise GenotypeError unless every edge and op exists in ``space``."""
        if self.space != space.name:
            raise GenotypeError(f"genotype is for space '{self.space}', not '{space.name}'")
        if len(self.cells) != len(space.cells):
            raise GenotypeError(f"genotype has {len(self.cells)} cells; space '{space.name}' has {len(space.cells)}")
        for ci, (cell, spec) in enumerate(zip(self.cells, space.cells)):
            edges, labels = set(spec.edges()), [o.label for o in spec.ops]
            for s, d, op in cell:
                if (s, d) not in edges:
                    raise GenotypeError(f"cells[{ci}]: no edge {s}->{d} in this cell")
                if op not in labels:
                    raise GenotypeError(f"cells[{ci}]: edge {s}->{d}: op '{op}' is not a candidate; expected one of {', '.join(labels)}")

    def to_alpha(self, space: SearchSpace) -> Tensor:
        """The one-hot encoding ``(edges, ops)`` of this genotype; dropped edges are all zero."""
        alpha = torch.zeros(space.alpha_shape)
        index = {(e.cell, e.src, e.dst): e.index for e in space.edges}
        for ci, cell in enumerate(self.cells):
            labels = [o.label for o in space.cells[ci].ops]
            for s, d, op in cell:
                alpha[index[(ci, s, d)], labels.index(op)] = 1.0
        return alpha

    def ops(self) -> list[str]:
        """Every op of every kept edge, in order."""
        return [op for cell in self.cells for _, _, op in cell]


def cell_dag(spec: CellSpec, edges: list[tuple[int, int, str]] | tuple[tuple[int, int, str], ...]) -> nx.DiGraph:
    """The DAG of one cell: inputs, intermediate nodes, ``out``, and the given op edges."""
    g = nx.DiGraph()
    for i in range(spec.inputs):
        g.add_node(i, role="input")
    for j in range(spec.inputs, spec.inputs + spec.nodes):
        g.add_node(j, role="node")
    g.add_node(OUT, role="output")
    for s, d, op in edges:
        g.add_edge(s, d, op=op)
    inner = range(spec.inputs, spec.inputs + spec.nodes)
    for j in ([inner[-1]] if spec.output == "last" else inner):
        g.add_edge(j, OUT, op=spec.output)
    return g


def live_nodes(spec: CellSpec, edges: tuple[tuple[int, int, str], ...]) -> set[int]:
    """Intermediate nodes that can reach the cell output."""
    g = cell_dag(spec, edges)
    return {n for n in nx.ancestors(g, OUT) if isinstance(n, int) and n >= spec.inputs}


def _prune(spec: CellSpec, edges: list[tuple[int, int, str]]) -> tuple[tuple[int, int, str], ...]:
    """Drop the edges of nodes that cannot reach the cell output."""
    g = cell_dag(spec, edges)
    live = nx.ancestors(g, OUT)
    return tuple(e for e in edges if e[1] in live)


def discrete_alpha(space: SearchSpace, alpha: Tensor) -> Tensor:
    """The space's discretisation rule as a one-hot encoding ``(..., edges, ops)`` of
    soft encodings ``alpha`` (any leading batch dimensions); dropped edges are all zero.

    Per node, the ``keep`` incoming edges with the strongest non-zero op are kept (all
    when ``keep`` is None; ties go to the earlier input); each kept edge takes its argmax
    op, ``zero`` excluded unless ``allow_zero``; an edge whose winner is ``zero`` is
    dropped. A node that would keep no edge keeps its strongest one with that edge's best
    non-zero op, so that every node, and so the cell output, stays connected to the cell
    inputs: a network whose output is cut off from its input is constant, and no gradient
    reaches any of its weights again (the collapse to ``zero`` of a hard architecture).

    This is both the network ``discretise`` emits (before pruning nodes that do not reach
    the output, which changes nothing the network computes) and the forward pass of a
    hard (straight-through) architecture in meta-training.
    """
    if tuple(alpha.shape[-2:]) != space.alpha_shape:
        raise GenotypeError(f"alpha has shape {tuple(alpha.shape)}; space '{space.name}' expects (..., {', '.join(map(str, space.alpha_shape))})")
    a = alpha.detach()
    out = torch.zeros_like(a)
    for ci, spec in enumerate(space.cells):
        n = len(spec.ops)
        zero = next((k for k, o in enumerate(spec.ops) if o.name == "zero"), None)
        nonzero = torch.tensor([o.name != "zero" for o in spec.ops], device=a.device)
        if not bool(nonzero.any()):
            continue  # a cell of only zero ops keeps nothing
        for dst in range(spec.inputs, spec.inputs + spec.nodes):
            edges = sorted((e for e in space.edges if e.cell == ci and e.dst == dst), key=lambda e: e.src)
            idx = torch.tensor([e.index for e in edges], device=a.device)
            rows = a[..., idx, :n]  # (..., E, n)
            strength, best_nonzero = rows.masked_fill(~nonzero, float("-inf")).max(-1)  # first max on ties
            best = rows.argmax(-1) if spec.allow_zero else best_nonzero
            order = torch.sort(strength, dim=-1, descending=True, stable=True).indices
            rank = torch.argsort(order, dim=-1)  # 0: the strongest edge
            kept = rank < spec.keep if spec.keep else torch.ones_like(rank, dtype=torch.bool)
            live = kept & (best != zero) if zero is not None else kept
            revive = (rank == 0) & ~live.any(-1, keepdim=True)
            op = torch.where(revive, best_nonzero, best)
            onehot = F.one_hot(op, n).to(a.dtype) * (live | revive).unsqueeze(-1).to(a.dtype)
            out[..., idx, :n] = onehot
    return out


def discretise(space: SearchSpace, alpha: Tensor) -> Genotype:
    """Apply the space's rule (``discrete_alpha``) to one task's soft encoding ``alpha``
    (edges, ops). Nodes that cannot reach the cell output are pruned."""
    if tuple(alpha.shape) != space.alpha_shape:
        raise GenotypeError(f"alpha has shape {tuple(alpha.shape)}; space '{space.name}' expects {space.alpha_shape}")
    chosen = discrete_alpha(space, alpha.detach().float().cpu())
    cells: list[tuple[tuple[int, int, str], ...]] = []
    for ci, spec in enumerate(space.cells):
        labels = [o.label for o in spec.ops]
        # Genotype sorts its edges: no order to keep here
        kept = [(e.src, e.dst, labels[int(chosen[e.index].argmax())]) for e in space.edges if e.cell == ci and bool(chosen[e.index].any())]
        cells.append(_prune(spec, kept))
    return Genotype(space.name, tuple(cells))


def entropy(alpha: Tensor, mask: Tensor) -> Tensor:
    """Per-edge entropy (nats) of op distributions ``(..., edges, ops)`` over the real ops."""
    p = alpha.masked_fill(~mask, 0.0)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def parametric(space: SearchSpace, cell: int, src: int, label: str) -> bool:
    """Whether op ``label`` on an edge leaving node ``src`` of ``cell`` has weights.

    Pooling, ``zero`` and ``skip`` at stride 1 have none: the ops that win a softmax race
    without being trained (the DARTS collapse). ``skip`` at stride 2 (factorised reduce)
    has two 1x1 convolutions.
    """
    spec = space.cells[cell]
    choice = next(o for o in spec.ops if o.label == label)
    return bool(OPS[choice.name].shapes(spec.channels, stride=spec.stride(src), **choice.kwargs))


def population_health(space: SearchSpace, genotypes: list[Genotype], families: list[int] | None = None, alphas: Tensor | None = None) -> dict:
    """How task-specific a population of generated architectures is.

    Args:
        space: their search space.
        genotypes: one per task.
        families: each task's family or domain id (-1 or None: unknown), for the
            per-family figures and the mutual information.
        alphas: ``(T, edges, ops)`` soft encodings, for the mean per-edge entropy.

    Returns:
        ``tasks``, ``distinct`` genotypes, ``top_share`` (tasks with the most common one),
        ``parametric_share`` (kept edges whose op has weights), and where given:
        ``mean_entropy`` (nats per edge), ``distinct_per_family`` and
        ``mutual_information`` (bits, plug-in estimate, between family and genotype; at
        most log2 of the number of families; 0 when every family gets the same one).
    """
    if not genotypes:
        raise ValueError("population_health needs at least one genotype")
    keys = [g.to_json() for g in genotypes]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    kept = [(ci, s, op) for g in genotypes for ci, cell in enumerate(g.cells) for s, _, op in cell]
    share = sum(parametric(space, ci, s, op) for ci, s, op in kept) / len(kept) if kept else 0.0
    out: dict = {"tasks": len(keys), "distinct": len(counts), "top_share": max(counts.values()) / len(keys), "parametric_share": share}
    if alphas is not None:
        out["mean_entropy"] = float(entropy(alphas, space.alpha_mask.to(alphas.device)).mean())
    if families is not None:
        pairs = [(int(f), k) for f, k in zip(families, keys) if f is not None and int(f) >= 0]
        per: dict[int, set[str]] = {}
        for f, k in pairs:
            per.setdefault(f, set()).add(k)
        out["distinct_per_family"] = {str(f): len(v) for f, v in sorted(per.items())}
        out["mutual_information"] = _mutual_information(pairs)
    return out


def _mutual_information(pairs: list[tuple[int, str]]) -> float:
    """Plug-in mutual information (bits) between the two sides of ``pairs``."""
    import math
    from collections import Counter

    n = len(pairs)
    if n == 0:
        return 0.0
    joint, left, right = Counter(pairs), Counter(f for f, _ in pairs), Counter(k for _, k in pairs)
    return max(0.0, sum(c / n * math.log2(c * n / (left[f] * right[k])) for (f, k), c in joint.items()))
