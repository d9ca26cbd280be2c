"""Inspect architectures: networkx graphs, JSON, GraphML, DOT and text views.

Two graphs describe a network of a space. ``genotype_graph`` is the discrete network: a
``stem`` node, per cell its inputs, live intermediate nodes and output, the kept op edges,
the links between cells, and a ``head``. ``soft_graph`` is one task's soft encoding: the
same skeleton with every candidate edge, carrying its top op, that op's weight, the
entropy of the edge and its full alpha row as scalar attributes. Node ids are strings
(``"stem"``, ``"c0/in0"``, ``"c0/n2"``, ``"c0/out"``, ``"head"``); a cell's intermediate
nodes keep the cell numbering of ``graph.py`` (after the inputs).

Node attributes: ``role`` (stem, input, node, output, head), ``cell`` (-1 outside cells),
``label`` (display text), ``channels``; cell nodes add ``cell_type``, outputs ``combine``.
Graph attributes: ``space``, ``kind`` ("genotype" or "soft"), ``ops`` (the space's op labels
as a JSON list, so that every view colours an op the same way). Every attribute is a
scalar (str, int, float), so the graphs survive JSON, GraphML and DOT unchanged; the
writers also accept other graphs (see ``to_graphml``).

PNG drawings of these views are ``metanet.draw``'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import Tensor

from .graph import OUT, Genotype, entropy, live_nodes
from .space import CellSpec, SearchSpace

__all__ = [
    "genotype_graph",
    "soft_graph",
    "to_json",
    "from_json",
    "to_graphml",
    "read_graphml",
    "to_dot",
    "describe_genotype",
    "describe_soft",
    "op_frequency",
    "diff_genotypes",
]

STEM, HEAD, DROPPED = "stem", "head", "dropped"
_JSON_KEYS = "metanet_json_attrs"  # graph attribute naming the GraphML values stored as JSON text
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939")
_ZERO_COLOUR = "#9a9a9a"


# ------------------------------------------------------------------------------ graphs


def _short(spec: CellSpec, j: int | str) -> str:
    """Cell-local display name: ``in0``, ``n2`` or ``out``."""
    if j == OUT:
        return "out"
    return f"in{j}" if j < spec.inputs else f"n{j}"


def _nid(ci: int, spec: CellSpec, j: int | str) -> str:
    return f"c{ci}/{_short(spec, j)}"


def _sources(space: SearchSpace, ci: int) -> list[str]:
    """Node ids feeding cell ``ci``'s inputs (as the executor wires them: in0 is the oldest)."""
    spec = space.cells[ci]
    states = [max(ci + 1 - spec.inputs + j, 0) for j in range(spec.inputs)]
    return [STEM if s == 0 else f"c{s - 1}/out" for s in states]


def _link_ops(space: SearchSpace, ci: int) -> list[str]:
    """What turns each source into cell ``ci``'s input: identity or a 1x1 projection."""
    image = space.task.domain == "image"
    states = [(space.stem.channels, 1)]
    for c in space.cells:
        states.append((c.out_channels, states[-1][1] * (2 if c.reduction else 1)))
    spec, ref = space.cells[ci], states[ci][1]
    ops = []
    for j in range(spec.inputs):
        c_prev, scale = states[max(ci + 1 - spec.inputs + j, 0)]
        stride = ref // scale
        if c_prev == spec.channels and stride == 1:
            ops.append("identity")
        elif image:
            ops.append("conv_1x1" + (f" s{stride}" if stride > 1 else ""))
        else:
            ops.append("linear")
    return ops


def _op_labels(space: SearchSpace) -> list[str]:
    """Every op label of the space, in order of first appearance."""
    out: list[str] = []
    for c in space.cells:
        out += [o.label for o in c.ops if o.label not in out]
    return out


def _skeleton(space: SearchSpace, kind: str, nodes: Sequence[set[int]]) -> nx.DiGraph:
    """Stem, head, and per cell its inputs, the given intermediate nodes, out and links."""
    # ``ops`` (JSON list of the space's op labels) keeps op colours the same in every view
    g = nx.DiGraph(space=space.name, kind=kind, ops=json.dumps(_op_labels(space)))
    g.add_node(STEM, role="stem", cell=-1, label=f"stem: {space.stem.op}", channels=space.stem.channels)
    for ci, spec in enumerate(space.cells):
        for j, (src, op) in enumerate(zip(_sources(space, ci), _link_ops(space, ci))):
            g.add_node(_nid(ci, spec, j), role="input", cell=ci, cell_type=spec.type, label=f"in{j}",
                       channels=spec.channels)
            g.add_edge(src, _nid(ci, spec, j), op=op, kind="link", cell=ci)
        for j in sorted(nodes[ci]):
            g.add_node(_nid(ci, spec, j), role="node", cell=ci, cell_type=spec.type, label=f"n{j}",
                       channels=spec.channels)
        g.add_node(_nid(ci, spec, OUT), role="output", cell=ci, cell_type=spec.type, label="out",
                   channels=spec.out_channels, combine=spec.output)
        inner = sorted(nodes[ci])
        for j in inner[-1:] if spec.output == "last" else inner:
            g.add_edge(_nid(ci, spec, j), _nid(ci, spec, OUT), op=spec.output, kind="output", cell=ci)
    last = len(space.cells) - 1
    g.add_node(HEAD, role="head", cell=-1, label=f"head: {space.head.op}", channels=space.task.outputs)
    g.add_edge(_nid(last, space.cells[last], OUT), HEAD, op="identity", kind="link", cell=-1)
    return g


def _edge_index(space: SearchSpace) -> dict[tuple[int, int, int], int]:
    return {(e.cell, e.src, e.dst): e.index for e in space.edges}


def genotype_graph(space: SearchSpace, genotype: Genotype) -> nx.DiGraph:
    """The whole discrete network as one DiGraph (pruned nodes left out).

    Op edges carry ``op`` (label), ``kind="op"``, ``cell`` and ``edge`` (the alpha row);
    ``kind="output"`` edges join live nodes to their cell output (``op`` is sum, concat or
    last) and ``kind="link"`` edges join cells (``op`` is identity or the projection).
    """
    genotype.validate(space)
    live = [live_nodes(spec, cell) for spec, cell in zip(space.cells, genotype.cells)]
    g = _skeleton(space, "genotype", live)
    index = _edge_index(space)
    for ci, (spec, cell) in enumerate(zip(space.cells, genotype.cells)):
        for s, d, op in cell:
            g.add_edge(_nid(ci, spec, s), _nid(ci, spec, d), op=op, kind="op", cell=ci, edge=index[(ci, s, d)])
    return g


def _check_alpha(space: SearchSpace, alpha: Tensor) -> Tensor:
    if tuple(alpha.shape) != space.alpha_shape:
        raise ValueError(f"alpha has shape {tuple(alpha.shape)}; space '{space.name}' expects one task's "
                         f"{space.alpha_shape} (edges, ops)")
    return alpha.detach().double().cpu()


def _soft_rows(space: SearchSpace, alpha: Tensor) -> list[dict[str, Any]]:
    """Per candidate edge: its cell, ends, top op, weight, entropy and alpha row."""
    a = _check_alpha(space, alpha)
    ent = entropy(a, space.alpha_mask)
    rows = []
    for e in space.edges:
        labels = [o.label for o in space.cells[e.cell].ops]
        row = [float(x) for x in a[e.index, : len(labels)]]
        top = max(range(len(labels)), key=lambda k: (row[k], -k))
        rows.append(dict(edge=e, top=labels[top], weight=row[top], entropy=float(ent[e.index]),
                         alpha=dict(zip(labels, row))))
    return rows


def soft_graph(space: SearchSpace, alpha: Tensor) -> nx.DiGraph:
    """One task's soft encoding ``alpha`` (edges, ops) as a DiGraph of every candidate edge.

    Each op edge carries ``top_op`` (also as ``op``), ``weight`` (alpha of the top op),
    ``entropy`` (nats, over the cell's real ops), ``edge`` (alpha row), ``cell``, and one
    float attribute ``alpha[<op label>]`` per candidate op.
    """
    nodes = [set(range(c.inputs, c.inputs + c.nodes)) for c in space.cells]
    g = _skeleton(space, "soft", nodes)
    for r in _soft_rows(space, alpha):
        e, spec = r["edge"], space.cells[r["edge"].cell]
        attrs = {f"alpha[{k}]": v for k, v in r["alpha"].items()}
        g.add_edge(_nid(e.cell, spec, e.src), _nid(e.cell, spec, e.dst), op=r["top"], kind="op", cell=e.cell,
                   edge=e.index, top_op=r["top"], weight=r["weight"], entropy=r["entropy"], **attrs)
    return g


# ---------------------------------------------------------------- JSON, GraphML, DOT


def _plain(v: Any) -> Any:
    """JSON fallback for tensors and numpy arrays."""
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"cannot write {type(v).__name__} as JSON")


def to_json(g: nx.DiGraph) -> str:
    """networkx node-link JSON, canonical: nodes and edges sorted, keys sorted."""
    data = nx.node_link_data(g, edges="edges")
    data["nodes"] = sorted(data["nodes"], key=lambda n: str(n["id"]))
    data["edges"] = sorted(data["edges"], key=lambda e: (str(e["source"]), str(e["target"])))
    return json.dumps(data, sort_keys=True, indent=1, default=_plain)


def from_json(text: str) -> nx.DiGraph:
    """Read the node-link JSON written by ``to_json``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict) or "nodes" not in data or "edges" not in data:
        raise ValueError("expected networkx node-link JSON with 'nodes' and 'edges'")
    return nx.node_link_graph(data, edges="edges")


def _scalar(v: Any) -> tuple[Any, bool]:
    """A GraphML-writable value, and whether it had to become JSON text."""
    if isinstance(v, (str, bool, int, float)):
        return v, False
    if isinstance(v, Tensor) and v.numel() == 1:
        return v.item(), False
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy scalars
        return v.item(), False
    return json.dumps(v, sort_keys=True, default=_plain), True


def to_graphml(g: nx.DiGraph, path: str | Path) -> Path:
    """Write GraphML with scalar attributes only.

    Non-scalar values (lists, tuples, dicts, vectors, None) are stored as JSON strings and
    their keys listed in the graph attribute ``metanet_json_attrs``, so ``read_graphml``
    restores them. Node ids are written as strings.
    """
    h = nx.DiGraph()
    encoded: dict[str, list[str]] = {"graph": [], "node": [], "edge": []}

    def conv(scope: str, attrs: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in attrs.items():
            out[k], as_json = _scalar(v)
            if as_json and k not in encoded[scope]:
                encoded[scope].append(k)
        return out

    h.graph.update(conv("graph", dict(g.graph)))
    for n, attrs in g.nodes(data=True):
        h.add_node(str(n), **conv("node", attrs))
    for u, v, attrs in g.edges(data=True):
        h.add_edge(str(u), str(v), **conv("edge", attrs))
    if any(encoded.values()):
        h.graph[_JSON_KEYS] = json.dumps(encoded, sort_keys=True)
    path = Path(path)
    nx.write_graphml(h, path)
    return path


def read_graphml(path: str | Path) -> nx.DiGraph:
    """Read a GraphML file written by ``to_graphml`` (node ids as strings)."""
    g = nx.read_graphml(Path(path), node_type=str)
    for k in ("node_default", "edge_default"):  # added by networkx's reader
        if g.graph.get(k) == {}:
            del g.graph[k]
    encoded = json.loads(g.graph.pop(_JSON_KEYS, "{}"))
    scopes = {"graph": [g.graph], "node": [d for _, d in g.nodes(data=True)], "edge": [d for *_, d in g.edges(data=True)]}
    for scope, keys in encoded.items():
        for attrs in scopes[scope]:
            for k in keys:
                if k in attrs:
                    attrs[k] = json.loads(attrs[k])
    return g


def _q(s: Any) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped, newlines as \\n."""
    text = str(s).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text.replace("\r", "").replace("\n", "\\n") + '"'


def _colours(labels: Sequence[str]) -> dict[str, str]:
    """A fixed colour per op label (grey for zero), stable across every view of a space."""
    out, k = {}, 0
    for lab in labels:
        if lab.split("[")[0] == "zero":
            out[lab] = _ZERO_COLOUR
        else:
            out[lab] = _PALETTE[k % len(_PALETTE)]
            k += 1
    return out


_DOT_NODE = {
    "stem": 'shape=box, style="rounded,filled", fillcolor="#dddddd"',
    "head": 'shape=box, style="rounded,filled", fillcolor="#dddddd"',
    "input": 'shape=box, style="rounded,filled", fillcolor="#c1e1c1"',
    "output": 'shape=box, style="rounded,filled", fillcolor="#f5e6a8"',
    "node": 'shape=circle, style=filled, fillcolor="#cfe2f3", fixedsize=true, width=0.5',
}


def to_dot(g: nx.DiGraph) -> str:
    """Graphviz DOT text, DARTS style: one ``cluster_cN`` per cell, ops on the edges.

    Inputs, outputs, stem and head are boxes, intermediate nodes circles. Edges of a soft
    graph are labelled with their top op and its weight, pen width growing with the weight.
    Any DiGraph works; nodes without ``role``/``cell`` are plain ellipses outside clusters.
    """
    ops = sorted({str(d["op"]) for *_, d in g.edges(data=True) if d.get("kind") == "op" and "op" in d})
    if isinstance(g.graph.get("ops"), str) and g.graph["ops"].startswith("["):
        ops = json.loads(g.graph["ops"]) + ops
    colours = _colours(list(dict.fromkeys(ops)))
    lines = [f"digraph {_q(g.graph.get('space', 'metanet'))} {{",
             f"  graph [rankdir=LR, fontname=Helvetica, label={_q(' '.join(str(g.graph.get(k, '')) for k in ('space', 'kind')).strip())}];",
             "  node [fontname=Helvetica, fontsize=11];",
             "  edge [fontname=Helvetica, fontsize=9];"]

    def node_line(n: Any, d: dict[str, Any], indent: str) -> str:
        style = _DOT_NODE.get(d.get("role", ""), "shape=ellipse")
        return f"{indent}{_q(n)} [label={_q(d.get('label', n))}, {style}];"

    clusters: dict[int, list[str]] = {}
    titles: dict[int, str] = {}
    for n, d in g.nodes(data=True):
        cell = d.get("cell", -1)
        if isinstance(cell, int) and cell >= 0:
            clusters.setdefault(cell, []).append(node_line(n, d, "    "))
            titles[cell] = f"cell {cell}" + (f" ({d['cell_type']})" if "cell_type" in d else "")
        else:
            lines.append(node_line(n, d, "  "))
    for cell in sorted(clusters):
        lines += [f"  subgraph cluster_c{cell} {{", f"    label={_q(titles[cell])};",
                  '    style=rounded; color="#999999";', *clusters[cell], "  }"]
    for u, v, d in g.edges(data=True):
        kind, op = d.get("kind", "op"), str(d.get("op", ""))
        if kind == "op":
            attrs = [f"color={_q(colours.get(op, 'black'))}"]
            if "weight" in d and "top_op" in d:
                w = float(d["weight"])
                attrs = [f"label={_q(f'{op} {w:.2f}')}", f"penwidth={0.5 + 3.5 * w:.2f}", *attrs]
            else:
                attrs.insert(0, f"label={_q(op)}")
        elif kind == "output":
            attrs = ['color="#888888"', "style=dashed", "arrowsize=0.6"]
        else:
            attrs = ['color="#555555"'] + ([f"label={_q(op)}"] if op and op != "identity" else [])
        lines.append(f"  {_q(u)} -> {_q(v)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------- text views


def _cell_header(space: SearchSpace, ci: int) -> str:
    spec = space.cells[ci]
    size = f"{spec.channels} channels" if space.task.domain == "image" else f"width {spec.channels}"
    feeds = ", ".join(f"in{j} = {s if s == STEM else 'cell ' + s[1:].split('/')[0]}"
                      for j, s in enumerate(_sources(space, ci)))
    return f"cell {ci}: {spec.type}, {size}, inputs: {feeds}"


def describe_genotype(space: SearchSpace, genotype: Genotype) -> str:
    """Readable text of a discrete network: per cell, ``n2 <- in0: conv_3x3`` lines."""
    genotype.validate(space)
    size = f"{space.stem.channels} channels" if space.task.domain == "image" else f"width {space.stem.channels}"
    lines = [f"genotype of space '{space.name}'", f"stem: {space.stem.op}, {size}"]
    for ci, (spec, cell) in enumerate(zip(space.cells, genotype.cells)):
        lines.append(_cell_header(space, ci))
        live = sorted(live_nodes(spec, cell))
        for d in live:
            ins = [(s, op) for s, dd, op in cell if dd == d]
            lines += [f"  {_short(spec, d)} <- {_short(spec, s)}: {op}" for s, op in ins]
            if not ins:
                lines.append(f"  {_short(spec, d)} <- (no input: zeros)")
        inner = live[-1:] if spec.output == "last" else live
        lines.append(f"  out = {spec.output}({', '.join(_short(spec, j) for j in inner)})")
    lines.append(f"head: {space.head.op} -> {space.task.outputs} outputs")
    return "\n".join(lines)


def describe_soft(space: SearchSpace, alpha: Tensor) -> str:
    """Readable text of one soft encoding: per edge its top op, weight, entropy, alpha row."""
    rows = _soft_rows(space, alpha)
    lines = [f"soft encoding of space '{space.name}' (entropy in nats)"]
    for ci, spec in enumerate(space.cells):
        lines.append(_cell_header(space, ci) + f"; max entropy {math.log(len(spec.ops)):.3f}")
        for r in (r for r in rows if r["edge"].cell == ci):
            e = r["edge"]
            row = " ".join(f"{k}={v:.3f}" for k, v in r["alpha"].items())
            lines.append(f"  e{e.index} {_short(spec, e.src)}->{_short(spec, e.dst)}: {r['top']} "
                         f"{r['weight']:.3f}, H={r['entropy']:.3f} | {row}")
    return "\n".join(lines)


# ----------------------------------------------------------------- population and diff


def op_frequency(space: SearchSpace, genotypes: Sequence[Genotype]) -> tuple[Tensor, list[str]]:
    """How often each op wins each candidate edge over a population of genotypes.

    Returns:
        ``(freq, labels)``: ``freq`` is ``(edges, len(labels))`` with rows summing to 1;
        ``labels`` are the space's op labels (first appearance order; ``zero`` only if a
        genotype keeps it) then ``"dropped"``, the share of genotypes without that edge
        (not kept, zero won, or pruned).
    """
    if not genotypes:
        raise ValueError("op_frequency needs at least one genotype")
    for gt in genotypes:
        gt.validate(space)
    # discretisation drops an edge whose winner is zero, so zero has a column only if used
    used = {op for gt in genotypes for op in gt.ops()}
    labels = [lab for lab in _op_labels(space) if lab.split("[")[0] != "zero" or lab in used] + [DROPPED]
    col = {lab: k for k, lab in enumerate(labels)}
    index = _edge_index(space)
    counts = torch.zeros(len(space.edges), len(labels), dtype=torch.float64)  # (edges, ops+1)
    for gt in genotypes:
        seen = set()
        for ci, cell in enumerate(gt.cells):
            for s, d, op in cell:
                counts[index[(ci, s, d)], col[op]] += 1
                seen.add(index[(ci, s, d)])
        for i in range(len(space.edges)):
            if i not in seen:
                counts[i, -1] += 1
    return counts / len(genotypes), labels


def diff_genotypes(space: SearchSpace, a: Genotype, b: Genotype) -> str:
    """Per cell, the edges whose op changed, or that only one genotype has; or "identical"."""
    a.validate(space)
    b.validate(space)
    if a.cells == b.cells:
        return "identical"
    lines = []
    for ci, (spec, ca, cb) in enumerate(zip(space.cells, a.cells, b.cells)):
        ea, eb = {(s, d): op for s, d, op in ca}, {(s, d): op for s, d, op in cb}
        out = []
        for s, d in sorted(set(ea) | set(eb)):
            name = f"{_short(spec, d)} <- {_short(spec, s)}"
            if (s, d) not in eb:
                out.append(f"  - {name}: {ea[(s, d)]} (removed)")
            elif (s, d) not in ea:
                out.append(f"  + {name}: {eb[(s, d)]} (added)")
            elif ea[(s, d)] != eb[(s, d)]:
                out.append(f"  ~ {name}: {ea[(s, d)]} -> {eb[(s, d)]} (op changed)")
        lines += [f"cell {ci}:", *out] if out else [f"cell {ci}: identical"]
    return "\n".join(lines)
