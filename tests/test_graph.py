"""Genotypes (canonical JSON, validation) and discretisation (keep, allow_zero, pruning)."""

from __future__ import annotations

import json
import math

import networkx as nx
import pytest
import torch
from torch.testing import assert_close

from metanet.executor import compile, forward, forward_genotype, init_params
from metanet.generators import ArchitectureGenerator
from metanet.graph import OUT, Genotype, GenotypeError, cell_dag, discrete_alpha, discretise, entropy, live_nodes
from metanet.space import SearchSpace, builtin_spaces, load

SPACES = builtin_spaces()


def _row(space: SearchSpace, cell: int, src: int, dst: int) -> int:
    (idx,) = [e.index for e in space.edges if (e.cell, e.src, e.dst) == (cell, src, dst)]
    return idx


def _col(space: SearchSpace, cell: int, label: str) -> int:
    return [o.label for o in space.cells[cell].ops].index(label)


def _alpha(space: SearchSpace, default: str | None, **rows: dict[str, float]) -> torch.Tensor:
    """An alpha where every edge of every cell has weight 1 on ``default`` (when that cell
    offers it); ``rows`` maps "cell_src_dst" to {op label: weight}, replacing the row."""
    a = torch.zeros(space.alpha_shape)
    for e in space.edges:
        labels = [o.label for o in space.cells[e.cell].ops]
        if default in labels:
            a[e.index, labels.index(default)] = 1.0
    for key, weights in rows.items():
        c, s, d = map(int, key.strip("e").split("_"))
        i = _row(space, c, s, d)
        a[i] = 0.0
        for label, w in weights.items():
            a[i, _col(space, c, label)] = w
    return a


# ---------------------------------------------------------------------------- genotype


def test_json_round_trip_is_canonical() -> None:
    g1 = Genotype("tiny", (((0, 2, "skip"), (0, 1, "conv_3x3"), (1, 2, "avg_pool_3x3")), ((1, 3, "skip"), (0, 2, "conv_1x1"))))
    g2 = Genotype("tiny", ([[1, 2, "avg_pool_3x3"], [0, 1, "conv_3x3"], [0, 2, "skip"]], [[0, 2, "conv_1x1"], [1, 3, "skip"]]))
    assert g1 == g2 and hash(g1) == hash(g2)
    assert g1.to_json() == g2.to_json()
    data = json.loads(g1.to_json())
    assert data == {
        "format": "metanet.genotype",
        "version": 1,
        "space": "tiny",
        "cells": [[[0, 1, "conv_3x3"], [0, 2, "skip"], [1, 2, "avg_pool_3x3"]], [[0, 2, "conv_1x1"], [1, 3, "skip"]]],
    }
    back = Genotype.from_json(g1.to_json())
    assert back == g1 and back.to_json() == g1.to_json() and hash(back) == hash(g1)
    g3 = Genotype("tiny", (((0, 1, "conv_3x3"),), ((1, 3, "skip"), (0, 2, "conv_1x1"))))
    assert g3 != g1 and g3.to_json() != g1.to_json()
    assert len({g1, g2, back, g3}) == 2


@pytest.mark.parametrize(
    "text,expected",
    [
        ("{not json", "<genotype>: not JSON (line 1, column 2: Expecting property name enclosed in double quotes)"),
        ("[1, 2]", '<genotype>: expected a metanet genotype JSON object with "format": "metanet.genotype"'),
        ('{"space": "tiny", "cells": []}', '<genotype>: expected a metanet genotype JSON object with "format": "metanet.genotype"'),
        ('{"format": "metanet.genotype", "cells": []}', "<genotype>: 'cells' must be a list of [src, dst, op] lists per cell, and 'space' a name"),
        ('{"format": "metanet.genotype", "space": "t", "cells": [[[0, 1]]]}',
         "<genotype>: 'cells' must be a list of [src, dst, op] lists per cell, and 'space' a name"),
        ('{"format": "metanet.genotype", "space": "t", "cells": [[["a", 1, "skip"]]]}',
         "<genotype>: 'cells' must be a list of [src, dst, op] lists per cell, and 'space' a name"),
        ('{"format": "metanet.genotype", "space": "t", "cells": 3}',
         "<genotype>: 'cells' must be a list of [src, dst, op] lists per cell, and 'space' a name"),
    ],
    ids=["syntax", "not-object", "no-format", "no-space", "short-edge", "bad-node", "cells-int"],
)
def test_from_json_errors_are_one_line(text: str, expected: str) -> None:
    with pytest.raises(GenotypeError) as ei:
        Genotype.from_json(text)
    assert str(ei.value) == expected


def test_from_json_names_its_source() -> None:
    with pytest.raises(GenotypeError) as ei:
        Genotype.from_json("", source="runs/x/genotype.json")
    assert str(ei.value) == "runs/x/genotype.json: not JSON (line 1, column 1: Expecting value)"


def test_validate() -> None:
    space = load("tiny")
    ok = Genotype("tiny", (((0, 1, "conv_3x3"), (1, 2, "skip")), ((1, 2, "max_pool_3x3"), (2, 3, "avg_pool_3x3"))))
    ok.validate(space)  # raises otherwise
    cases = [
        (Genotype("conv4", ok.cells), "genotype is for space 'conv4', not 'tiny'"),
        (Genotype("tiny", ok.cells[:1]), "genotype has 1 cells; space 'tiny' has 2"),
        (Genotype("tiny", (((2, 1, "skip"),), ())), "cells[0]: no edge 2->1 in this cell"),
        (Genotype("tiny", ((), ((0, 4, "skip"),))), "cells[1]: no edge 0->4 in this cell"),
        (Genotype("tiny", ((), ((0, 3, "sep_conv_3x3"),))),
         "cells[1]: edge 0->3: op 'sep_conv_3x3' is not a candidate; expected one of zero, skip, conv_1x1, conv_3x3, avg_pool_3x3, max_pool_3x3"),
    ]
    for geno, msg in cases:
        with pytest.raises(GenotypeError) as ei:
            geno.validate(space)
        assert str(ei.value) == msg


@pytest.mark.parametrize("name", SPACES)
def test_discretised_genotypes_validate_and_are_stable(name: str) -> None:
    space = load(name)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.softmax(torch.randn(space.alpha_shape, generator=g) * 3, -1) * space.alpha_mask
        geno = discretise(space, a)
        geno.validate(space)
        assert Genotype.from_json(geno.to_json()) == geno
        one_hot = geno.to_alpha(space)
        assert tuple(one_hot.shape) == space.alpha_shape
        assert one_hot.sum().item() == sum(len(c) for c in geno.cells)
        assert not one_hot[~space.alpha_mask].any()
        assert discretise(space, one_hot) == geno


# ------------------------------------------------------------------------ discretise


def test_allow_zero_drops_only_where_allowed() -> None:
    space = load("tiny")  # cell 0 allows zero; cell 1 does not, and keeps 1 input per node
    assert space.cells[0].allow_zero and not space.cells[1].allow_zero
    a = _alpha(
        space,
        None,
        e0_0_1={"zero": 0.6, "conv_3x3": 0.4},  # zero wins, allowed, but node 1's only input: conv_3x3
        e0_0_2={"skip": 0.7, "zero": 0.3},
        e0_1_2={"conv_1x1": 0.5, "zero": 0.3},
        e1_0_2={"zero": 0.9, "skip": 0.1},
        e1_1_2={"zero": 0.8, "conv_3x3": 0.5},  # zero wins, not allowed: conv_3x3
        e1_0_3={"max_pool_3x3": 0.2},
        e1_1_3={"avg_pool_3x3": 0.3, "zero": 0.6},
        e1_2_3={"zero": 0.95, "skip": 0.05},
    )
    geno = discretise(space, a)
    assert geno.cells[0] == ((0, 1, "conv_3x3"), (0, 2, "skip"), (1, 2, "conv_1x1"))
    # Node 2: strengths 0.1 vs 0.5 (zero's weight does not count); node 3: 0.2, 0.3, 0.05.
    assert geno.cells[1] == ((1, 2, "conv_3x3"), (1, 3, "avg_pool_3x3"))


def test_a_node_whose_every_input_chooses_zero_keeps_its_strongest_edge() -> None:
    """Zero winning every input of a node would cut the cell output off from its input: a
    constant network that no gradient reaches again (the collapse of a hard architecture)."""
    space = load("conv_multidomain")  # cell 1: nodes 1, 2, 3, output last, zero allowed
    a = _alpha(
        space,
        "conv_3x3",
        e1_0_1={"zero": 0.6, "conv_3x3": 0.4},
        e1_0_2={"zero": 0.9, "skip": 0.1},
        e1_1_2={"zero": 0.5, "conv_1x1": 0.3},
        e1_0_3={"zero": 0.7, "avg_pool_3x3": 0.2},
        e1_1_3={"zero": 0.8, "conv_1x1": 0.15},
        e1_2_3={"zero": 0.6, "conv_3x3": 0.35},
    )
    assert discretise(space, a).cells[1] == ((0, 1, "conv_3x3"), (1, 2, "conv_1x1"), (2, 3, "conv_3x3"))
    # Where a node keeps an edge of its own, zero winners still drop the others.
    a[_row(space, 1, 1, 3), _col(space, 1, "conv_1x1")] = 0.9
    assert discretise(space, a).cells[1] == ((0, 1, "conv_3x3"), (1, 3, "conv_1x1"))


@pytest.mark.parametrize("name", ["tiny", "conv_multidomain", "darts_cnn", "mlp_regression"])
def test_a_hard_architecture_in_training_runs_the_network_discretise_emits(name: str) -> None:
    """The straight-through forward pass of meta-training and the emitted genotype compute
    the same function, with zero often winning (the rule's corner cases)."""
    space = load(name)
    plan = compile(space)
    params = init_params(plan, torch.Generator().manual_seed(0))
    arch = ArchitectureGenerator(plan, dim=4, mode="shared")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, *space.task.input, generator=gen)
    zero = torch.tensor([[o.name == "zero" for o in space.cells[e.cell].ops] + [False] * (space.alpha_shape[1] - len(space.cells[e.cell].ops)) for e in space.edges])
    for _ in range(6):
        logits = torch.randn(space.alpha_shape, generator=gen) + 3.0 * zero * (torch.rand(space.alpha_shape[0], 1, generator=gen) < 0.6)
        logits = logits.masked_fill(~space.alpha_mask, float("-inf"))
        soft = torch.softmax(logits, -1)
        hard = arch.weights(logits[None], hard=True)[0]
        assert_close(hard, discrete_alpha(space, soft) + soft - soft)
        genotype = discretise(space, soft)
        assert_close(forward(plan, hard, params, x), forward_genotype(plan, genotype, params, x), rtol=1e-5, atol=1e-5)


def test_keep_ties_go_to_the_earlier_input() -> None:
    space = load("tiny")
    a = _alpha(space, "skip")  # every edge equally strong
    geno = discretise(space, a)
    assert geno.cells[1] == ((0, 2, "skip"), (0, 3, "skip"))


def test_darts_keeps_top_two_inputs_per_node() -> None:
    space = load("darts_cnn")
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        a = torch.softmax(torch.randn(space.alpha_shape, generator=g) * 2, -1)
        geno = discretise(space, a)
        for ci, (cell, spec) in enumerate(zip(geno.cells, space.cells)):
            assert spec.keep == 2
            nonzero = [k for k, o in enumerate(spec.ops) if o.name != "zero"]
            for dst in range(spec.inputs, spec.inputs + spec.nodes):
                kept = sorted((s, op) for s, d, op in cell if d == dst)
                assert len(kept) == 2, f"cell {ci} node {dst}"
                # Reference: strongest non-zero weight per candidate edge, top 2 of them.
                cands = {s: a[_row(space, ci, s, dst), nonzero] for s in range(dst)}
                top = sorted(cands, key=lambda s: -cands[s].max().item())[:2]
                expected = sorted((s, spec.ops[nonzero[int(cands[s].argmax())]].label) for s in top)
                assert kept == expected


def test_pruning_removes_nodes_that_do_not_reach_the_last_node() -> None:
    space = load("mlp_regression")  # output: last; nodes 1 and 2
    assert space.cells[0].output == "last"
    a = _alpha(space, None, e0_0_1={"linear_relu": 1.0}, e0_0_2={"skip": 1.0}, e0_1_2={"zero": 1.0})
    geno = discretise(space, a)
    assert geno.cells[0] == ((0, 2, "skip"),)  # node 1 reaches nothing: its edge 0->1 goes
    assert live_nodes(space.cells[0], geno.cells[0]) == {2}


def test_pruning_in_a_deeper_cell_keeps_live_chains() -> None:
    space = load("conv_omniglot")  # cell 1: nodes 1, 2, 3, output last
    a = _alpha(space, "conv_3x3", e1_2_3={"zero": 1.0}, e1_1_3={"zero": 1.0}, e1_1_2={"skip": 1.0})
    geno = discretise(space, a)
    # Node 2 does not feed node 3, and node 1 only feeds node 2: both are pruned.
    assert geno.cells[1] == ((0, 3, "conv_3x3"),)
    # Keep node 1 alive through node 3 and the chain returns.
    a2 = _alpha(space, "conv_3x3", e1_2_3={"zero": 1.0})
    assert geno != discretise(space, a2)
    assert discretise(space, a2).cells[1] == ((0, 1, "conv_3x3"), (0, 3, "conv_3x3"), (1, 3, "conv_3x3"))


def test_sum_output_does_not_prune_unconnected_nodes() -> None:
    space = load("tiny")  # output: sum, so every node reaches the output
    a = _alpha(space, "conv_1x1", e0_1_2={"zero": 1.0})
    assert discretise(space, a).cells[0] == ((0, 1, "conv_1x1"), (0, 2, "conv_1x1"))


def test_discretise_rejects_wrong_shape() -> None:
    with pytest.raises(GenotypeError) as ei:
        discretise(load("tiny"), torch.zeros(3, 4))
    assert str(ei.value) == "alpha has shape (3, 4); space 'tiny' expects (8, 6)"


def test_cell_dag_structure() -> None:
    spec = load("darts_cnn").cells[0]
    edges = ((0, 2, "skip"), (1, 2, "sep_conv_3x3"), (2, 3, "avg_pool_3x3"))
    g = cell_dag(spec, edges)
    assert nx.is_directed_acyclic_graph(g)
    assert set(g.nodes) == {0, 1, 2, 3, 4, 5, OUT}
    assert g.edges[1, 2]["op"] == "sep_conv_3x3"
    assert {s for s, _ in g.in_edges(OUT)} == {2, 3, 4, 5}  # concat: every node is an output


# --------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("name", SPACES)
def test_entropy_of_uniform_is_log_k(name: str) -> None:
    space = load(name)
    mask = space.alpha_mask
    k = mask.sum(-1, keepdim=True).to(torch.float64)
    uniform = mask / k  # (E, K), uniform over each edge's real ops
    expected = torch.log(k.squeeze(-1))
    assert_close(entropy(uniform, mask), expected)
    batched = uniform.expand(3, *uniform.shape)  # (B, E, K)
    assert_close(entropy(batched, mask), expected.expand(3, -1))
    one_hot = torch.zeros_like(uniform)
    one_hot[:, 0] = 1.0
    assert_close(entropy(one_hot, mask), torch.zeros(len(space.edges), dtype=torch.float64))
    if (k > 1).all():
        assert abs(entropy(uniform, mask).max().item() - math.log(space.max_ops)) < 1e-9


# ---------------------------------------------------------------- population health


def _conv_genotype(space, op: str) -> "Genotype":
    """Every edge of conv_omniglot's normal cells takes ``op``; reductions keep conv_3x3."""
    cells = []
    for spec in space.cells:
        pick = "conv_3x3" if spec.reduction else op
        cells.append(tuple((s, d, pick) for s, d in spec.edges()))
    return Genotype(space.name, tuple(cells))


def test_parametric_ops_are_the_ones_with_weights():
    from metanet.graph import parametric

    space = load("conv_omniglot")
    normal = next(i for i, c in enumerate(space.cells) if not c.reduction)
    reduction = next(i for i, c in enumerate(space.cells) if c.reduction)
    assert parametric(space, normal, 0, "conv_3x3") and parametric(space, normal, 0, "conv_1x1")
    assert not parametric(space, normal, 0, "skip") and not parametric(space, normal, 0, "avg_pool_3x3")
    assert parametric(space, reduction, 0, "skip")  # factorised reduce at stride 2 has 1x1 convolutions
    assert not parametric(space, reduction, 0, "avg_pool_3x3")


def test_population_health_by_hand():
    from metanet.graph import population_health

    space = load("conv_omniglot")
    conv, pool = _conv_genotype(space, "conv_3x3"), _conv_genotype(space, "avg_pool_3x3")
    # two families, each always its own architecture: 1 bit of mutual information
    h = population_health(space, [conv, conv, pool, pool], [0, 0, 1, 1])
    assert h["distinct"] == 2 and h["top_share"] == 0.5
    assert h["mutual_information"] == pytest.approx(1.0)
    assert h["distinct_per_family"] == {"0": 1, "1": 1}
    # the architecture does not depend on the family: 0 bits
    assert population_health(space, [conv, pool, conv, pool], [0, 0, 1, 1])["mutual_information"] == pytest.approx(0.0)
    # unknown families (-1) are left out of the per-family figures
    assert population_health(space, [conv, pool], [0, -1])["distinct_per_family"] == {"0": 1}
    # parametric share: pool has 2 reduction edges with conv_3x3 and 12 normal edges with avg_pool
    n_red = sum(len(c.edges()) for c in space.cells if c.reduction)
    n_all = sum(len(c.edges()) for c in space.cells)
    assert population_health(space, [pool])["parametric_share"] == pytest.approx(n_red / n_all)
    assert population_health(space, [conv])["parametric_share"] == 1.0
    mask = space.alpha_mask.double()
    uniform = (mask / mask.sum(-1, keepdim=True))[None]  # (1, edges, ops): uniform over each edge's real ops
    expected = mask.sum(-1).log().mean().item()
    assert population_health(space, [conv], alphas=uniform)["mean_entropy"] == pytest.approx(expected, rel=1e-6)
