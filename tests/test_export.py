"""Export of genotypes and soft encodings: graphs, JSON, GraphML, DOT, text and PNG."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import networkx as nx
import pytest
import torch

from metanet import draw, export
from metanet.graph import Genotype, discretise, entropy
from metanet.space import builtin_spaces, load

SPACES = ["tiny", "conv_omniglot", "darts_cnn", "mlp_regression"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _alpha(space, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(space.alpha_shape, generator=g), -1) * space.alpha_mask  # (edges, ops)


def _genotype(space, seed: int = 0) -> Genotype:
    return discretise(space, _alpha(space, seed))


def _graphs(name: str) -> list[nx.DiGraph]:
    space = load(name)
    return [export.genotype_graph(space, _genotype(space)), export.soft_graph(space, _alpha(space))]


def _assert_same(g: nx.DiGraph, h: nx.DiGraph) -> None:
    """Isomorphic with equal attributes, and equal node by node (ids, values and types)."""
    assert nx.is_isomorphic(g, h, node_match=lambda a, b: a == b, edge_match=lambda a, b: a == b)
    assert g.graph == h.graph
    assert dict(g.nodes(data=True)) == dict(h.nodes(data=True))
    assert {(u, v): d for u, v, d in g.edges(data=True)} == {(u, v): d for u, v, d in h.edges(data=True)}
    for n, d in g.nodes(data=True):
        assert {k: type(x) for k, x in d.items()} == {k: type(x) for k, x in h.nodes[n].items()}
    for u, v, d in g.edges(data=True):
        assert {k: type(x) for k, x in d.items()} == {k: type(x) for k, x in h.edges[u, v].items()}


# ---------------------------------------------------------------------------- graphs


def test_parametrised_spaces_are_builtin():
    # the parametrised spaces cover 1- and 2-input cells, sum/concat/last, images and vectors
    assert set(SPACES) <= set(builtin_spaces())


@pytest.mark.parametrize("name", SPACES)
def test_genotype_graph_holds_exactly_the_genotype(name):
    space = load(name)
    gt = _genotype(space, 3)
    g = export.genotype_graph(space, gt)
    assert g.graph["space"] == name and g.graph["kind"] == "genotype"
    ops = {(d["cell"], u, v, d["op"]) for u, v, d in g.edges(data=True) if d["kind"] == "op"}
    want = {(ci, f"c{ci}/{'in' if s < space.cells[ci].inputs else 'n'}{s}", f"c{ci}/n{d}", op)
            for ci, cell in enumerate(gt.cells) for s, d, op in cell}
    assert ops == want
    roles = nx.get_node_attributes(g, "role")
    assert roles["stem"] == "stem" and roles["head"] == "head"
    assert g.nodes["stem"]["cell"] == -1 and g.nodes["head"]["cell"] == -1
    for n, d in g.nodes(data=True):
        assert set(d) >= {"role", "cell", "label"}
        assert isinstance(d["cell"], int) and isinstance(d["label"], str) and d["label"]
    assert nx.is_directed_acyclic_graph(g)
    # each cell output feeds the next cell's newest input (a dropped-out cell may cut the ops)
    for ci in range(len(space.cells)):
        nxt = f"c{ci + 1}/in{space.cells[ci + 1].inputs - 1}" if ci + 1 < len(space.cells) else "head"
        assert g.edges[f"c{ci}/out", nxt]["kind"] == "link"
        assert all(g.in_degree(f"c{ci}/in{j}") == 1 for j in range(space.cells[ci].inputs))
    # every kept edge's node reaches its cell output
    for ci in range(len(space.cells)):
        for n in (n for n, d in g.nodes(data=True) if d["cell"] == ci and d["role"] == "node"):
            assert nx.has_path(g, n, f"c{ci}/out")


def test_cell_links_follow_the_executor_wiring():
    space = load("darts_cnn")  # two-input cells: in0 is fed by the cell two back
    g = export.genotype_graph(space, _genotype(space))
    pred = {n: list(g.predecessors(n)) for n in g}
    assert pred["c0/in0"] == ["stem"] and pred["c0/in1"] == ["stem"]
    assert pred["c1/in0"] == ["stem"] and pred["c1/in1"] == ["c0/out"]
    assert pred["c2/in0"] == ["c0/out"] and pred["c2/in1"] == ["c1/out"]
    assert pred["c3/in0"] == ["c1/out"] and pred["c3/in1"] == ["c2/out"]
    assert pred["head"] == ["c3/out"]
    # cell 2 sees cell 0's output at twice its resolution: a strided projection
    assert g.edges["c0/out", "c2/in0"]["op"] == "conv_1x1 s2"
    tiny = load("tiny")
    t = export.genotype_graph(tiny, _genotype(tiny))
    assert [*t.predecessors("c1/in0")] == ["stem"] and [*t.predecessors("c1/in1")] == ["c0/out"]


@pytest.mark.parametrize("name", builtin_spaces())
def test_links_match_the_compiled_plan(name):
    from metanet.executor import compile as compile_plan

    space = load(name)
    plan = compile_plan(space)
    g = export.genotype_graph(space, _genotype(space))
    for ci, cp in enumerate(plan.cells):
        for j, ip in enumerate(cp.inputs):
            (src,) = g.predecessors(f"c{ci}/in{j}")
            assert src == ("stem" if ip.state == 0 else f"c{ip.state - 1}/out")
            op = g.edges[src, f"c{ci}/in{j}"]["op"]
            if ip.weight is None:
                assert op == "identity"
            else:
                assert op == ("linear" if space.task.domain == "vector" else
                              "conv_1x1" + (f" s{ip.stride}" if ip.stride > 1 else ""))


def test_soft_graph_carries_every_candidate_edge():
    space = load("conv_omniglot")  # cells with 3 and with 5 candidate ops
    alpha = _alpha(space, 1)
    g = export.soft_graph(space, alpha)
    assert g.graph["kind"] == "soft"
    ops = [(u, v, d) for u, v, d in g.edges(data=True) if d["kind"] == "op"]
    assert len(ops) == len(space.edges)
    ent = entropy(alpha, space.alpha_mask)
    for u, v, d in ops:
        e = space.edges[d["edge"]]
        labels = [o.label for o in space.cells[e.cell].ops]
        row = alpha[e.index, : len(labels)]
        assert d["top_op"] == d["op"] == labels[int(row.argmax())]
        assert d["weight"] == pytest.approx(float(row.max()))
        assert d["entropy"] == pytest.approx(float(ent[e.index]))
        assert {k for k in d if k.startswith("alpha[")} == {f"alpha[{lab}]" for lab in labels}
        assert [d[f"alpha[{lab}]"] for lab in labels] == pytest.approx(row.tolist())
        assert all(isinstance(x, (str, int, float)) for x in d.values())


def test_soft_graph_rejects_a_batch_with_a_clear_message():
    space = load("tiny")
    with pytest.raises(ValueError, match=r"alpha has shape \(1, 8, 6\); space 'tiny' expects one task's \(8, 6\)"):
        export.soft_graph(space, _alpha(space)[None])


# ------------------------------------------------------------------- JSON and GraphML


@pytest.mark.parametrize("name", SPACES)
def test_json_round_trip(name):
    for g in _graphs(name):
        text = export.to_json(g)
        h = export.from_json(text)
        _assert_same(g, h)
        assert export.to_json(h) == text  # canonical
        assert json.loads(text)["graph"]["space"] == name


@pytest.mark.parametrize("name", SPACES)
def test_graphml_round_trip(name, tmp_path):
    for i, g in enumerate(_graphs(name)):
        path = export.to_graphml(g, tmp_path / f"g{i}.graphml")
        h = export.read_graphml(path)
        _assert_same(g, h)
        # what networkx itself reads: the same graph, with nothing but scalars in the file
        raw = nx.read_graphml(path, node_type=str)
        assert set(raw.nodes) == set(g.nodes)


def test_graphml_keeps_non_scalar_values_as_json(tmp_path):
    g = nx.DiGraph(space="x", shape=[3, 4])
    g.add_node("a", vec=[0.5, 1.0], meta={"k": 1}, none=None)
    g.add_node("b", t=torch.tensor(2.5))
    g.add_edge("a", "b", row=(1, 2))
    h = export.read_graphml(export.to_graphml(g, tmp_path / "x.graphml"))
    assert h.graph == {"space": "x", "shape": [3, 4]}
    assert h.nodes["a"] == {"vec": [0.5, 1.0], "meta": {"k": 1}, "none": None}
    assert h.nodes["b"] == {"t": 2.5}
    assert h.edges["a", "b"] == {"row": [1, 2]}


def test_from_json_rejects_other_text():
    with pytest.raises(ValueError, match="not JSON"):
        export.from_json("{nodes")
    with pytest.raises(ValueError, match="node-link JSON with 'nodes' and 'edges'"):
        export.from_json('{"a": 1}')


# ------------------------------------------------------------------------------- DOT


def _dot_tokens(text: str) -> list[tuple[str, str]]:
    """A small DOT lexer: ("str", unescaped) for quoted strings, ("sym", c) for punctuation."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == '"':
            j, buf = i + 1, []
            while text[j] != '"':
                if text[j] == "\\":
                    nxt = text[j + 1]
                    buf.append({"n": "\n"}.get(nxt, nxt))
                    j += 2
                else:
                    buf.append(text[j])
                    j += 1
            out.append(("str", "".join(buf)))
            i = j + 1
        elif c in "{}[];=,":
            out.append(("sym", c))
            i += 1
        elif text.startswith("->", i):
            out.append(("sym", "->"))
            i += 2
        elif c.isspace():
            i += 1
        else:
            m = re.match(r"[#\w.]+", text[i:])
            assert m, f"unexpected character {c!r} at {i}"
            out.append(("id", m.group()))
            i += len(m.group())
    return out


def _dot_structure(text: str) -> tuple[set[str], list[tuple[str, str]], dict[str, str], list[str]]:
    """Declared nodes, edges, node labels and cluster names; asserts balanced braces."""
    toks = _dot_tokens(text)
    depth, nodes, edges, labels, clusters = 0, set(), [], {}, []
    for k, (kind, val) in enumerate(toks):
        if (kind, val) == ("sym", "{"):
            depth += 1
        elif (kind, val) == ("sym", "}"):
            depth -= 1
            assert depth >= 0, "unbalanced braces"
        elif kind == "id" and val == "subgraph":
            clusters.append(toks[k + 1][1])
        elif kind == "str" and toks[k + 1] == ("sym", "->"):
            edges.append((val, toks[k + 2][1]))
        elif kind == "str" and toks[k + 1] == ("sym", "[") and toks[k - 1] != ("sym", "->"):
            nodes.add(val)
            assert toks[k + 2:k + 4] == [("id", "label"), ("sym", "=")]
            labels[val] = toks[k + 4][1]
    assert depth == 0, "unbalanced braces"
    return nodes, edges, labels, clusters


@pytest.mark.parametrize("name", SPACES)
def test_dot_is_well_formed(name):
    space = load(name)
    for g in _graphs(name):
        text = export.to_dot(g)
        assert text.startswith("digraph ")
        nodes, edges, labels, clusters = _dot_structure(text)
        assert nodes == set(g.nodes)
        assert sorted(edges) == sorted(g.edges)
        assert all(u in nodes and v in nodes for u, v in edges)
        assert clusters == [f"cluster_c{i}" for i in range(len(space.cells))]
        assert labels == {n: d["label"] for n, d in g.nodes(data=True)}
        assert 'shape=circle' in text and 'shape=box' in text


def test_dot_soft_edges_show_top_op_and_weight():
    space = load("tiny")
    g = export.soft_graph(space, _alpha(space))
    text = export.to_dot(g)
    for u, v, d in g.edges(data=True):
        if d["kind"] == "op":
            line = next(x for x in text.splitlines() if x.strip().startswith(f'"{u}" -> "{v}"'))
            assert f'label="{d["top_op"]} {d["weight"]:.2f}"' in line
            assert f"penwidth={0.5 + 3.5 * d['weight']:.2f}" in line


def test_dot_escapes_quotes_backslashes_and_newlines():
    g = nx.DiGraph(space='my "space"')
    g.add_node('a "quoted" node', label='say "hi" \\ then\nbye', role="node", cell=0)
    g.add_node("b", label="b")
    g.add_edge('a "quoted" node', "b", op='op "x"', kind="op")
    text = export.to_dot(g)
    assert r'"say \"hi\" \\ then\nbye"' in text
    assert r'label="op \"x\""' in text
    nodes, edges, labels, _ = _dot_structure(text)
    assert labels['a "quoted" node'] == 'say "hi" \\ then\nbye'
    assert edges == [('a "quoted" node', "b")]
    assert nodes == {'a "quoted" node', "b"}


# -------------------------------------------------------------------------- text views


def test_describe_genotype_lists_every_kept_edge():
    space = load("darts_cnn")
    gt = _genotype(space, 5)
    text = export.describe_genotype(space, gt)
    for ci, cell in enumerate(gt.cells):
        block = text.split(f"cell {ci}: ")[1].split("\ncell ")[0]
        assert block.startswith(f"{space.cells[ci].type}, {space.cells[ci].channels} channels")
        for s, d, op in cell:
            assert f"  n{d} <- {'in' if s < 2 else 'n'}{s}: {op}" in block.splitlines()
        assert "  out = concat(n2, n3, n4, n5)" in block.splitlines()
    tiny = load("tiny")
    gt = Genotype("tiny", (((0, 1, "conv_3x3"), (1, 2, "skip")), ((1, 2, "conv_1x1"), (2, 3, "max_pool_3x3"))))
    text = export.describe_genotype(tiny, gt)
    assert "  n1 <- in0: conv_3x3\n  n2 <- n1: skip\n  out = sum(n1, n2)" in text
    assert "in0 = stem, in1 = cell 0" in text


def test_describe_soft_reports_top_op_weight_entropy_and_row():
    space = load("tiny")
    alpha = _alpha(space, 2)
    text = export.describe_soft(space, alpha)
    ent = entropy(alpha, space.alpha_mask)
    labels = [o.label for o in space.cells[0].ops]
    for e in space.edges:
        row = alpha[e.index]
        line = next(x for x in text.splitlines() if x.startswith(f"  e{e.index} "))
        top = int(row.argmax())
        assert f": {labels[top]} {float(row[top]):.3f}, H={float(ent[e.index]):.3f} |" in line
        assert all(f"{lab}={float(row[k]):.3f}" in line for k, lab in enumerate(labels))
    assert f"max entropy {math.log(6):.3f}" in text


# ------------------------------------------------------------- population and diff


@pytest.mark.parametrize("name", ["tiny", "conv_omniglot", "darts_cnn"])
def test_op_frequency_matches_counting_one_hots(name):
    space = load(name)
    gts = [_genotype(space, s) for s in range(12)]
    freq, labels = export.op_frequency(space, gts)
    assert freq.shape == (len(space.edges), len(labels)) and labels[-1] == "dropped"
    assert torch.allclose(freq.sum(1), torch.ones(len(space.edges), dtype=freq.dtype))
    # reference: the mean of the genotypes' one-hot encodings, columns mapped by label
    ref = torch.zeros_like(freq)
    for gt in gts:
        onehot = gt.to_alpha(space)
        for e in space.edges:
            cell_labels = [o.label for o in space.cells[e.cell].ops]
            for k, lab in enumerate(cell_labels):
                if onehot[e.index, k]:
                    ref[e.index, labels.index(lab)] += 1 / len(gts)
            if not onehot[e.index].any():
                ref[e.index, -1] += 1 / len(gts)
    torch.testing.assert_close(freq, ref)
    assert "zero" not in labels  # discretisation drops an edge whose winner is zero


def test_op_frequency_needs_genotypes_of_its_space():
    space = load("tiny")
    with pytest.raises(ValueError, match="at least one genotype"):
        export.op_frequency(space, [])
    other = _genotype(load("conv_omniglot"))
    with pytest.raises(ValueError, match="genotype is for space 'conv_omniglot', not 'tiny'"):
        export.op_frequency(space, [other])


def test_diff_genotypes():
    space = load("tiny")
    a = Genotype("tiny", (((0, 1, "conv_3x3"), (1, 2, "skip")), ((1, 2, "conv_1x1"), (2, 3, "max_pool_3x3"))))
    assert export.diff_genotypes(space, a, a) == "identical"
    assert export.diff_genotypes(space, _genotype(space, 4), _genotype(space, 4)) == "identical"
    b = Genotype("tiny", (((0, 1, "conv_3x3"), (0, 2, "avg_pool_3x3"), (1, 2, "conv_1x1")),
                          ((1, 2, "conv_1x1"), (2, 3, "max_pool_3x3"))))
    text = export.diff_genotypes(space, a, b)
    assert text.splitlines() == [
        "cell 0:",
        "  + n2 <- in0: avg_pool_3x3 (added)",
        "  ~ n2 <- n1: skip -> conv_1x1 (op changed)",
        "cell 1: identical",
    ]
    c = Genotype("tiny", (((0, 1, "conv_3x3"), (1, 2, "skip")), ((2, 3, "max_pool_3x3"),)))
    assert "  - n2 <- in1: conv_1x1 (removed)" in export.diff_genotypes(space, a, c).splitlines()


# ------------------------------------------------------------------------------ PNGs


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("name", ["tiny", "conv_omniglot"])
def test_pngs_are_written(name, tmp_path):
    pytest.importorskip("matplotlib")
    space = load(name)
    gts = [_genotype(space, s) for s in range(6)]
    paths = [
        draw.draw_genotype_png(space, gts[0], tmp_path / "genotype.png", title="a title"),
        draw.draw_soft_png(space, _alpha(space), tmp_path / "soft.png"),
        draw.draw_population_png(space, gts, tmp_path / "sub" / "population.png"),
    ]
    for p in paths:
        w, h = _png_size(p)
        assert p.stat().st_size > 5000 and w > 300 and h > 200
    # one panel per cell, laid out two per row: more cells make a taller figure
    if len(space.cells) > 2:
        w1, h1 = _png_size(paths[0])
        one = load("tiny")
        w2, h2 = _png_size(draw.draw_genotype_png(one, _genotype(one), tmp_path / "t.png"))
        assert h1 > h2


def test_png_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    space = load("tiny")
    with pytest.raises(ImportError, match=r"PNG output needs matplotlib: pip install 'metanet\[plot\]'"):
        draw.draw_genotype_png(space, _genotype(space), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_importing_export_does_not_import_matplotlib():
    code = "import sys, metanet.export; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True)


@pytest.mark.parametrize("name", ["tiny", "darts_cnn"])
def test_layout_flows_left_to_right_and_arrows_miss_other_nodes(name):
    space = load(name)
    for cells in (
        [(sorted({d for _, d, _ in c}), list(c)) for c in _genotype(space, 7).cells],
        [(list(range(s.inputs, s.inputs + s.nodes)), [(a, b, "x") for a, b in s.edges()]) for s in space.cells],
    ):
        for spec, (nodes, edges) in zip(space.cells, cells):
            plan = draw._plan_cell(spec, nodes, edges)
            pos = plan["pos"]
            assert all(pos[i][0] == 0 for i in range(spec.inputs))
            assert all(pos[s][0] < pos[d][0] for s, d in plan["pairs"])
            names, centres, half, boxes = draw._obstacles(pos, plan["boxes"], plan["notes"])
            for (s, d), rad in zip(plan["pairs"], plan["rads"]):
                pts = draw._curve(pos[s], pos[d], rad, 50, 0.1, 0.9)
                hit = draw._inside(pts, centres, half, boxes, 0.0)
                others = torch.tensor([n not in (s, d) for n in names])
                assert not hit[:, others].any(), f"{name}: edge {s}->{d} crosses a node or its note"
