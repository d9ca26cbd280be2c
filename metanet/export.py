"""Inspect architectures: networkx graphs, JSON, GraphML, DOT, text and PNG views.

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

PNG views need matplotlib (``pip install 'metanet[plot]'``), imported only when drawing;
they draw on an Agg canvas and leave pyplot's global state alone.
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
    "draw_genotype_png",
    "draw_soft_png",
    "op_frequency",
    "draw_population_png",
    "diff_genotypes",
]

STEM, HEAD, DROPPED = "stem", "head", "dropped"
_JSON_KEYS = "metanet_json_attrs"  # graph attribute naming the GraphML values stored as JSON text
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939")
_ZERO_COLOUR = "#9a9a9a"
_MPL_MISSING = "PNG output needs matplotlib: pip install 'metanet[plot]'"


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


# ------------------------------------------------------------------------------- PNGs


def _mpl() -> tuple[Any, Any]:
    """matplotlib's Figure and Agg canvas (pyplot and the global backend stay untouched)."""
    try:
        import matplotlib  # noqa: F401  (first: submodules may be cached without it)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(_MPL_MISSING) from e
    return Figure, FigureCanvasAgg


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, facecolor="white")
    return path


# Cell panels are laid out in data units and drawn at a fixed scale, so every panel and
# every figure of a space has the same node and font size.
_DX, _DY = 2.3, 1.2  # layer spacing, row spacing
_INCH = 0.9  # inches per data unit
_BOX = (0.4, 0.22)  # half width and height of input and output boxes
_R = 0.27  # radius of intermediate nodes
_RADS = (0.0, 0.15, -0.15, 0.3, -0.3, 0.45, -0.45, 0.6, -0.6)  # arc3 curvatures tried
_TS = (0.5, 0.44, 0.56, 0.38, 0.62, 0.32, 0.68, 0.26, 0.74, 0.2, 0.8, 0.15, 0.85)  # label spots along an edge

Point = tuple[float, float]


def _layout(spec: CellSpec, nodes: Sequence[int], edges: Sequence[tuple]) -> dict[Any, Point]:
    """Layered left-to-right positions: inputs, nodes by longest path from the inputs, out.

    Within a layer, nodes are ordered by the mean height of their sources (fewer crossings).
    Runs of single-node layers zig-zag up and down, so that edges skipping a layer can pass
    between nodes instead of through them.
    """
    layer: dict[Any, int] = {j: 0 for j in range(spec.inputs)}
    for j in sorted(nodes):  # sources are numbered before their destinations
        layer[j] = 1 + max((layer[s] for s, d, *_ in edges if d == j and s in layer), default=0)
    layer[OUT] = max((layer[j] for j in nodes), default=0) + 1
    by_layer: dict[int, list[Any]] = {}
    for j, lay in layer.items():
        by_layer.setdefault(lay, []).append(j)
    skips = any(layer[d] - layer[s] > 1 for s, d, *_ in edges)
    pos: dict[Any, Point] = {}
    for lay, js in sorted(by_layer.items()):
        if 0 < lay < layer[OUT]:  # barycentre order: fewer crossings with the layers before
            ys = {j: [pos[s][1] for s, d, *_ in edges if d == j and s in pos] for j in js}
            js = sorted(js, key=lambda j: -sum(ys[j]) / len(ys[j]) if ys[j] else 0.0)
        zig = 0.0
        if skips and len(js) == 1 and 0 < lay < layer[OUT]:
            zig = 0.3 * _DY * (1 if lay % 2 else -1)
        for k, j in enumerate(js):
            pos[j] = (lay * _DX, ((len(js) - 1) / 2 - k) * _DY + zig)
    return pos


def _control(a: Point, b: Point, rad: float) -> Point:
    """Middle control point of matplotlib's ``arc3`` curve (valid on equal-aspect axes)."""
    (x1, y1), (x2, y2) = a, b
    return (x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1)


def _curve(a: Point, b: Point, rad: float, n: int = 40, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """``n`` points ``(n, 2)`` of the quadratic Bezier from ``a`` to ``b`` for t in [lo, hi]."""
    p = torch.tensor([a, _control(a, b, rad), b], dtype=torch.float64)  # (3, 2)
    t = torch.linspace(lo, hi, n, dtype=torch.float64)[:, None]  # (n, 1)
    return (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]


def _inside(pts: Tensor, centres: Tensor, half: Tensor, is_box: Tensor, margin: float) -> Tensor:
    """(n, m) bool: point n lies within ``margin`` of obstacle m.

    Obstacles are boxes (``half`` = half width and height) or circles (``half[:, 0]`` = radius).
    """
    d = (pts[:, None, :] - centres[None, :, :]).abs()  # (n, m, 2)
    box = (d[..., 0] < half[:, 0] + margin) & (d[..., 1] < half[:, 1] + margin)
    return torch.where(is_box[None, :], box, d.norm(dim=-1) < half[:, 0] + margin)


def _obstacles(pos: dict[Any, Point], boxes: set[Any], notes: dict[Any, str]) -> tuple[list[Any], Tensor, Tensor, Tensor]:
    """Names, centres, half sizes and box flags of the nodes and of the notes under them."""
    names, centres, half, is_box = [], [], [], []
    for n, (x, y) in pos.items():
        names.append(n)
        centres.append((x, y))
        half.append(_BOX if n in boxes else (_R, _R))
        is_box.append(n in boxes)
    for n, text in notes.items():
        x, y = pos[n]
        top = y - (_BOX[1] if n in boxes else _R) - 0.06
        names.append(("note", n))
        centres.append((x, top - 0.1))
        half.append((0.03 * len(text), 0.1))
        is_box.append(True)
    f64 = torch.float64
    return names, torch.tensor(centres, dtype=f64), torch.tensor(half, dtype=f64), torch.tensor(is_box)


def _route(pos: dict[Any, Point], boxes: set[Any], notes: dict[Any, str], edges: Sequence[tuple[Any, Any]],
           quiet: int) -> list[float]:
    """An arc curvature per edge, chosen greedily to miss nodes, notes and earlier edges.

    Edges from index ``quiet`` on (node -> out) are routed last and may run beside each
    other, since they all converge on the same output.
    """
    names, centres, half, is_box = _obstacles(pos, boxes, notes)
    placed = torch.zeros(0, 2, dtype=torch.float64)
    rads = [0.0] * len(edges)
    span = lambda i: abs(pos[edges[i][1]][0] - pos[edges[i][0]][0])  # noqa: E731
    order = sorted(range(quiet), key=span) + sorted(range(quiet, len(edges)), key=span)
    loud = placed
    for i in order:
        s, d = edges[i]
        others = torch.tensor([n not in (s, d) for n in names])
        avoid = loud if i >= quiet else placed

        def cost(rad: float) -> float:
            pts = _curve(pos[s], pos[d], rad, 30, 0.1, 0.9)
            hit = _inside(pts, centres, half, is_box, 0.12)[:, others].any(1).sum().item()
            near = (((pts[:, None] - avoid[None]) ** 2).sum(-1) < 0.12**2).any(1).sum().item() if len(avoid) else 0
            return 100 * hit + near + 10 * abs(rad)

        rads[i] = min(_RADS, key=cost)
        placed = torch.cat([placed, _curve(pos[s], pos[d], rads[i], 30, 0.1, 0.9)])
        if i < quiet:
            loud = placed
    return rads


def _trimmed_path(a: Point, b: Point, rad: float, shape_a: tuple[Point, bool], shape_b: tuple[Point, bool]) -> Any:
    """The arc from the border of node ``a`` to the border of node ``b``, as a matplotlib Path."""
    from matplotlib.path import Path as MplPath

    pts = _curve(a, b, rad, 201)
    ts = torch.linspace(0, 1, 201, dtype=torch.float64)
    def outside(shape: tuple[Point, bool]) -> Tensor:
        centre, box = shape
        half = torch.tensor([_BOX if box else (_R, _R)], dtype=torch.float64)
        return ~_inside(pts, torch.tensor([centre], dtype=torch.float64), half, torch.tensor([box]), 0.02)[:, 0]

    out_a, out_b = outside(shape_a), outside(shape_b)
    ok = (out_a & out_b).nonzero()
    lo, hi = (ts[ok[0, 0]].item(), ts[ok[-1, 0]].item()) if len(ok) else (0.0, 1.0)
    p0, p1, p2 = torch.tensor(a), torch.tensor(_control(a, b, rad)), torch.tensor(b)
    at = lambda t: (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t * t * p2  # noqa: E731
    # the control point of the sub-curve on [lo, hi] (the blossom of the quadratic at lo, hi)
    ctrl = (1 - lo) * (1 - hi) * p0 + ((1 - lo) * hi + lo * (1 - hi)) * p1 + lo * hi * p2
    verts = [at(lo).tolist(), ctrl.tolist(), at(hi).tolist()]
    return MplPath(verts, [MplPath.MOVETO, MplPath.CURVE3, MplPath.CURVE3])


def _plan_cell(spec: CellSpec, nodes: Sequence[int], edges: Sequence[tuple]) -> dict[str, Any]:
    """Positions, routes and data extent of one cell panel (no drawing)."""
    pos = _layout(spec, nodes, edges)
    boxes = {j for j in pos if j == OUT or j < spec.inputs}
    inner = sorted(nodes)
    outs = [(j, OUT) for j in (inner[-1:] if spec.output == "last" else inner)]
    pairs = [(s, d) for s, d, *_ in edges] + outs
    # a genotype may keep no edge from an input, or none into a node: say so under it
    notes = {j: "unused" for j in range(spec.inputs) if all(s != j for s, *_ in edges)}
    notes.update({j: "no input: zeros" for j in inner if all(d != j for _, d, *_ in edges)})
    rads = _route(pos, boxes, notes, pairs, len(edges))
    pts = [_curve(pos[s], pos[d], r, 20) for (s, d), r in zip(pairs, rads)]
    pts.append(torch.tensor([(x + sx * _BOX[0], y + sy * _BOX[0]) for x, y in pos.values()
                             for sx in (-1, 1) for sy in (-1, 1)], dtype=torch.float64))
    lo, hi = torch.cat(pts).amin(0).tolist(), torch.cat(pts).amax(0).tolist()
    extent = (lo[0] - 0.35, hi[0] + 0.35, lo[1] - 0.45, hi[1] + 0.45)
    return dict(pos=pos, boxes=boxes, notes=notes, pairs=pairs, rads=rads, n_ops=len(edges), extent=extent)


def _label_spots(a: Point, b: Point, rad: float) -> list[Point]:
    """Where a label may go, best first: on its edge, then just beside it."""
    on = [tuple(_curve(a, b, rad, 1, t, t)[0].tolist()) for t in _TS]
    (x1, y1), (cx, cy), (x2, y2) = a, _control(a, b, rad), b
    beside = []
    for t in _TS[:7]:
        dx, dy = 2 * (1 - t) * (cx - x1) + 2 * t * (x2 - cx), 2 * (1 - t) * (cy - y1) + 2 * t * (y2 - cy)
        n = math.hypot(dx, dy) or 1.0
        (x, y), = _curve(a, b, rad, 1, t, t).tolist()
        beside += [(x - 0.3 * dy / n * side, y + 0.3 * dx / n * side) for side in (1, -1)]
    return on + beside


def _place_labels(ax: Any, renderer: Any, items: list[dict[str, Any]], avoid: list[Any], curves: list[Any]) -> None:
    """Put each label on its own edge where it covers no other label, node or edge.

    ``items``: dicts with the text artist, its candidate ``spots`` (best first) and the
    index of its edge in ``curves`` (sampled points of every drawn edge). Spots are scored
    in display space: a greedy pass, then a few rounds in which each label moves to its
    best spot given all the others (so an early label does not block a later one).
    """
    to_px = ax.transData.transform
    curve_px = [to_px(c) for c in curves]
    frame = ax.get_window_extent(renderer)
    boxes, static = [], []  # per item, per spot: bbox and the cost that does not depend on other labels
    for it in items:
        bbs, costs = [], []
        for rank, spot in enumerate(it["spots"]):
            it["text"].set_position(spot)
            bb = it["text"].get_window_extent(renderer).expanded(1.08, 1.15)
            cost = 0.3 * rank + 500 * sum(bb.overlaps(o) for o in avoid)
            cost += 1000 * (bb.x0 < frame.x0 or bb.x1 > frame.x1 or bb.y0 < frame.y0 or bb.y1 > frame.y1)
            cost += 40 * sum(
                bool(((c[:, 0] > bb.x0) & (c[:, 0] < bb.x1) & (c[:, 1] > bb.y0) & (c[:, 1] < bb.y1)).any())
                for k, c in enumerate(curve_px) if k != it["curve_index"]
            )
            bbs.append(bb)
            costs.append(cost)
        boxes.append(bbs)
        static.append(costs)
    choice: dict[int, int] = {}
    order = sorted(range(len(items)), key=lambda i: items[i]["length"])  # short edges have the fewest spots
    for _ in range(4):
        moved = False
        for i in order:
            others = [boxes[k][r] for k, r in choice.items() if k != i]
            best = min(range(len(boxes[i])),
                       key=lambda r: static[i][r] + 1000 * sum(boxes[i][r].overlaps(o) for o in others))
            moved |= choice.get(i) != best
            choice[i] = best
        if not moved:
            break
    for i, it in enumerate(items):
        it["text"].set_position(it["spots"][choice[i]])


def _draw_cells(space: SearchSpace, cells: list[tuple[list[int], list[tuple]]], headers: list[str],
                title: str, soft: bool, path: str | Path) -> Path:
    """One panel per cell; ``cells`` holds per cell (intermediate nodes, (src, dst, op, weight))."""
    Figure, Canvas = _mpl()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

    colours = _colours(_op_labels(space))
    plans = [_plan_cell(spec, nodes, edges) for spec, (nodes, edges) in zip(space.cells, cells)]
    ncols = 1 if len(plans) == 1 else 2
    nrows = math.ceil(len(plans) / ncols)
    size = [(p["extent"][1] - p["extent"][0], p["extent"][3] - p["extent"][2]) for p in plans]
    col_w = [max(size[i][0] for i in range(c, len(plans), ncols)) * _INCH for c in range(ncols)]
    row_h = [max(size[i][1] for i in range(r * ncols, min((r + 1) * ncols, len(plans)))) * _INCH for r in range(nrows)]
    pad, top, bottom, head_h = 0.3, 0.55, 0.65, 0.5  # inches
    fig_w = sum(col_w) + pad * (ncols + 1)
    fig_h = top + sum(row_h) + head_h * nrows + bottom
    fig = Figure(figsize=(fig_w, fig_h))
    canvas = Canvas(fig)
    renderer = canvas.get_renderer()
    fig.suptitle(title, fontsize=12, y=1 - 0.15 / fig_h, va="top")
    used_ops: list[str] = []
    for ci, (spec, plan, (nodes, edges)) in enumerate(zip(space.cells, plans, cells)):
        r, c = divmod(ci, ncols)
        left = pad * (c + 1) + sum(col_w[:c])
        y_top = fig_h - top - sum(row_h[:r]) - head_h * (r + 1)
        ax = fig.add_axes((left / fig_w, (y_top - row_h[r]) / fig_h, col_w[c] / fig_w, row_h[r] / fig_h))
        x0, x1, y0, y1 = plan["extent"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        ax.set_xlim(cx - col_w[c] / _INCH / 2, cx + col_w[c] / _INCH / 2)
        ax.set_ylim(cy - row_h[r] / _INCH / 2, cy + row_h[r] / _INCH / 2)
        ax.set_axis_off()
        head, _, feeds = headers[ci].partition(", inputs: ")
        ax.set_title(f"{head}\ninputs: {feeds}; out = {spec.output}", fontsize=9.5, loc="left", pad=4)
        pos, patches, notes = plan["pos"], {}, []
        for j, (x, y) in pos.items():
            faded = plan["notes"].get(j) == "unused"
            if j in plan["boxes"]:
                fill = "#f5e6a8" if j == OUT else "#c1e1c1"
                patch = FancyBboxPatch((x - _BOX[0], y - _BOX[1]), 2 * _BOX[0], 2 * _BOX[1],
                                       boxstyle="round,pad=0,rounding_size=0.08", fc=fill, ec="#444444",
                                       lw=1.0, zorder=3, alpha=0.45 if faded else 1.0)
            else:
                patch = Circle((x, y), _R, fc="#cfe2f3", ec="#3d6e99", lw=1.2, zorder=3,
                               ls="--" if j in plan["notes"] else "-")
            ax.add_patch(patch)
            patches[j] = patch
            ax.text(x, y, _short(spec, j), ha="center", va="center", fontsize=9.5, zorder=4,
                    color="#777777" if faded else "black")
            note = plan["notes"].get(j)
            if note:
                below = y - (_BOX[1] if j in plan["boxes"] else _R) - 0.06
                notes.append(ax.text(x, below, note, ha="center", va="top", fontsize=7.5, color="#666666", zorder=4))
        curves, items = [], []
        many = plan["n_ops"] > (16 if soft else 10)
        for k, ((s, d), rad) in enumerate(zip(plan["pairs"], plan["rads"])):
            curves.append(_curve(pos[s], pos[d], rad, 60, 0.05, 0.95).numpy())
            path_sd = _trimmed_path(pos[s], pos[d], rad, (pos[s], s in plan["boxes"]), (pos[d], d in plan["boxes"]))
            style = dict(path=path_sd, arrowstyle="-|>", shrinkA=0, shrinkB=1, mutation_scale=11, zorder=2)
            if k >= plan["n_ops"]:  # node -> out: the cell's combine, drawn quietly
                ax.add_patch(FancyArrowPatch(color="#999999", lw=0.9, ls="--", **style))
                continue
            op, w = edges[k][2], edges[k][3]
            if op not in used_ops:
                used_ops.append(op)
            col = colours.get(op, "black")
            lw = 0.6 + 3.0 * w if soft else 1.6
            ax.add_patch(FancyArrowPatch(color=col, lw=lw, alpha=0.35 + 0.65 * w if soft else 1.0,
                                         ls=":" if op == "zero" else "-", **style))
            if soft:
                label = f"{w:.2f}" if many else f"{op}\n{w:.2f}"
            else:
                label = "" if many else op
            if label:
                spots = _label_spots(pos[s], pos[d], rad)
                text = ax.text(*spots[0], label, ha="center", va="center", fontsize=8, zorder=5,
                               linespacing=0.95, bbox=dict(boxstyle="round,pad=0.18", fc="white", ec=col, lw=0.9))
                items.append(dict(text=text, curve_index=k, spots=spots, length=float(abs(pos[d][0] - pos[s][0]))))
        avoid = [a.get_window_extent(renderer) for a in [*patches.values(), *notes]]
        _place_labels(ax, renderer, items, avoid, curves)
    order = [op for op in colours if op in used_ops]
    handles = [Line2D([], [], color=colours[op], lw=2.5, ls=":" if op == "zero" else "-") for op in order]
    handles.append(Line2D([], [], color="#999999", lw=1.0, ls="--"))
    order.append("into out (cell combine)")
    fig.legend(handles, order, loc="lower center", ncol=min(len(order), 5), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 0.15 / fig_h), title="edge colour = op", title_fontsize=9)
    return _save(fig, path)


def draw_genotype_png(space: SearchSpace, genotype: Genotype, path: str | Path, title: str | None = None) -> Path:
    """Draw a discrete network as a PNG: one panel per cell, ops as coloured, labelled arrows.

    Inputs are on the left (faded when unused), intermediate nodes in topological layers,
    ``out`` on the right; dashed grey arrows are the cell's combine (sum, concat, last).
    """
    genotype.validate(space)
    cells = []
    for spec, cell in zip(space.cells, genotype.cells):
        cells.append((sorted(live_nodes(spec, cell)), [(s, d, op, 1.0) for s, d, op in cell]))
    headers = [_cell_header(space, i) for i in range(len(space.cells))]
    return _draw_cells(space, cells, headers, title or f"{space.name}: genotype", False, path)


def draw_soft_png(space: SearchSpace, alpha: Tensor, path: str | Path, title: str | None = None) -> Path:
    """Draw one soft encoding as a PNG: every candidate edge, coloured by its top op.

    Line width and opacity grow with the top op's weight; edges are labelled with the op
    and weight (only the weight when a cell has many edges, the legend naming the colours).
    """
    rows = _soft_rows(space, alpha)
    cells = []
    for ci, spec in enumerate(space.cells):
        edges = [(r["edge"].src, r["edge"].dst, r["top"], r["weight"]) for r in rows if r["edge"].cell == ci]
        cells.append((list(range(spec.inputs, spec.inputs + spec.nodes)), edges))
    headers = [_cell_header(space, i) for i in range(len(space.cells))]
    title = title or f"{space.name}: soft encoding (colour = top op, width = its weight)"
    return _draw_cells(space, cells, headers, title, True, path)


def draw_population_png(space: SearchSpace, genotypes: Sequence[Genotype], path: str | Path,
                        title: str | None = None) -> Path:
    """Heatmap of ``op_frequency``: rows are candidate edges, columns ops and ``dropped``.

    Grey cells are ops that are not candidates of that edge's cell.
    """
    Figure, Canvas = _mpl()
    import matplotlib

    freq, labels = op_frequency(space, genotypes)
    data = freq.clone()
    for e in space.edges:
        cands = {o.label for o in space.cells[e.cell].ops}
        for k, lab in enumerate(labels[:-1]):
            if lab not in cands:
                data[e.index, k] = float("nan")
    rows = [f"c{e.cell} e{e.src}->{e.dst}" for e in space.edges]
    fig = Figure(figsize=(2.4 + 0.62 * len(labels), 1.9 + 0.24 * len(rows)), layout="constrained")
    Canvas(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#e4e4e4")
    im = ax.imshow(data.numpy(), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(len(rows)), rows, fontsize=8.5 if len(rows) < 30 else 7.5, family="monospace")
    ax.tick_params(top=False, bottom=True, length=2)
    ax.set_xticks([x - 0.5 for x in range(1, len(labels))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(rows))], minor=True)
    ax.grid(which="minor", color="white", lw=0.6)
    ax.tick_params(which="minor", length=0)
    for e in space.edges[1:]:
        if e.cell != space.edges[e.index - 1].cell:
            ax.axhline(e.index - 0.5, color="#333333", lw=1.2)
    ax.axvline(len(labels) - 1.5, color="#333333", lw=1.2)
    for (i, k), v in ((ik, float(data[ik])) for ik in ((i, k) for i in range(len(rows)) for k in range(len(labels)))):
        if v > 0:
            ax.text(k, i, f"{v:.2f}".lstrip("0") if v < 1 else "1", ha="center", va="center",
                    fontsize=7 if len(rows) >= 30 else 8, color="white" if v > 0.6 else "#222222")
    fig.colorbar(im, ax=ax, label=f"share of the {len(genotypes)} genotypes", shrink=min(1.0, 12 / len(rows) + 0.3))
    ax.set_title(title or f"{space.name}: op per candidate edge over {len(genotypes)} genotypes", fontsize=11)
    return _save(fig, path)
