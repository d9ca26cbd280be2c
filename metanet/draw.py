"""Draw architectures as PNG files: a cell-by-cell layout of a genotype or of one task's
soft encoding, and the op-frequency heatmap of a population of genotypes.

The graph views themselves (networkx graphs, JSON, GraphML, DOT, text) are
``metanet.export``'s; this module only lays them out and draws them. It needs matplotlib
(``pip install 'metanet[plot]'``), imported only when drawing, on an Agg canvas that
leaves pyplot's global state alone; without it the functions raise ``ImportError``
saying how to install it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .export import _cell_header, _colours, _op_labels, _short, _soft_rows, op_frequency
from .graph import OUT, Genotype, live_nodes
from .space import CellSpec, SearchSpace

__all__ = ["draw_genotype_png", "draw_soft_png", "draw_population_png"]

_MPL_MISSING = "PNG output needs matplotlib: pip install 'metanet[plot]'"
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
