"""Search spaces: every ready YAML loads, structure invariants, and every bad input's message."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metanet.ops import OPS
from metanet.space import SearchSpace, SpaceError, builtin_path, builtin_spaces, load, loads

SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
YAMLS = sorted(SPACES_DIR.glob("*.yaml"))


def test_there_are_ready_spaces_and_builtin_names_match_files() -> None:
    assert len(YAMLS) >= 1
    assert builtin_spaces() == [p.stem for p in YAMLS]
    for p in YAMLS:
        assert builtin_path(p.stem).resolve() == p.resolve()


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_ready_space_loads(path: Path) -> None:
    space = load(path)
    assert isinstance(space, SearchSpace)
    assert space.name == path.stem  # `load("tiny")` finds tiny.yaml: the names must agree
    assert load(path.stem) == space  # by built-in name
    assert space.text == path.read_text()
    domain = space.task.domain
    for cell in space.cells:
        for op in cell.ops:
            assert OPS[op.name].domain in (domain, "any")


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_round_trip_and_structure(path: Path) -> None:
    space = load(path)
    again = loads(space.text, "other-source")
    assert again == space and hash(again) == hash(space)
    n_edges = sum(c.nodes * (c.nodes - 1) // 2 + c.inputs * c.nodes for c in space.cells)
    assert len(space.edges) == n_edges
    assert [e.index for e in space.edges] == list(range(n_edges))
    assert space.alpha_shape == (n_edges, max(len(c.ops) for c in space.cells))
    mask = space.alpha_mask
    assert mask.dtype == torch.bool and tuple(mask.shape) == space.alpha_shape
    for e in space.edges:
        k = len(space.cells[e.cell].ops)
        expected = torch.zeros(space.alpha_shape[1], dtype=torch.bool)
        expected[:k] = True
        assert torch.equal(mask[e.index], expected), f"row {e.index}"
        cell = space.cells[e.cell]
        assert 0 <= e.src < e.dst < cell.inputs + cell.nodes and e.dst >= cell.inputs
    with pytest.raises(dataclasses.FrozenInstanceError):
        space.name = "x"  # type: ignore[misc]


# ------------------------------------------------------------------------- bad inputs

BASE: dict[str, Any] = {
    "name": "t",
    "task": {"kind": "classification", "input": [1, 8, 8], "outputs": 3},
    "stem": {"op": "conv_3x3", "channels": 4},
    "cell": {"nodes": 2, "ops": ["zero", "skip", "conv_1x1", "conv_3x3"], "allow_zero": True},
    "cells": [
        {"type": "normal", "channels": 4},
        {"type": "reduction", "channels": 4, "inputs": 2, "keep": 1, "ops": ["skip", "conv_1x1", "conv_3x3", "avg_pool_3x3"]},
    ],
    "head": {"op": "global_pool_linear"},
}

VECTOR: dict[str, Any] = {
    "name": "v",
    "task": {"kind": "regression", "input": [1], "outputs": 1},
    "stem": {"op": "linear", "width": 8},
    "cells": [{"type": "mlp", "width": 8, "ops": ["skip", "linear_relu"]}],
    "head": {"op": "linear"},
}


def _text(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def test_base_documents_are_valid() -> None:
    assert len(loads(_text(BASE)).edges) == 3 + 5
    assert loads(_text(VECTOR)).task.domain == "vector"


def _set(path: tuple, value: Any, base: dict = BASE) -> Callable[[], dict]:
    """A document equal to ``base`` with the value at ``path`` replaced (or deleted)."""

    def make() -> dict:
        d = copy.deepcopy(base)
        node = d
        for k in path[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return d

    return make


_DELETE = object()

# (id, document maker, exact expected message after "<string>: ")
BAD = [
    ("unknown-op", _set(("cells", 1, "ops", 3), "conv_3x4"),
     "cells[1].ops[3]: unknown op 'conv_3x4'; registered image ops: "
     + ", ".join(sorted(n for n, o in OPS.items() if o.domain in ("image", "any")))
     + "; did you mean 'conv_3x3'?"),
    ("op-of-other-domain", _set(("cells", 0, "ops"), ["skip", "linear_relu"]),
     "cells[0].ops[1]: op 'linear_relu' works on vectors, not images; expected one of "),
    ("unknown-top-key", _set(("cels",), []), "unknown key 'cels'; expected one of name, description, task, norm, stem, cell, cells, head; did you mean 'cells'?"),
    ("unknown-cell-key", _set(("cells", 0, "chanels"), 4), "cells[0]: unknown key 'chanels'; expected one of "),
    ("unknown-default-key", _set(("cell", "node"), 3), "cell: unknown key 'node'; expected one of "),
    ("unknown-task-key", _set(("task", "output"), 3), "task: unknown key 'output'; expected one of kind, input, outputs; did you mean 'outputs'?"),
    ("unknown-hyper", _set(("cells", 1, "ops", 1), {"op": "conv_3x3", "dilaton": 2}),
     "cells[1].ops[1].dilaton: op 'conv_3x3' has no hyper-parameter 'dilaton'; it takes: kernel, dilation"),
    ("hyper-of-op-without-any", _set(("cells", 1, "ops", 1), {"op": "skip", "kernel": 3}),
     "cells[1].ops[1].kernel: op 'skip' has no hyper-parameter 'kernel'; it takes: (none)"),
    ("op-mapping-without-op", _set(("cells", 1, "ops", 1), {"kernel": 3}), "cells[1].ops[1]: an op given as a mapping needs the key 'op'"),
    ("channels-str", _set(("cells", 0, "channels"), "16"), "cells[0].channels: expected an integer, got str '16'"),
    ("nodes-bool", _set(("cells", 0, "nodes"), True), "cells[0].nodes: expected an integer, got bool True"),
    ("nodes-float", _set(("cells", 0, "nodes"), 2.5), "cells[0].nodes: expected an integer, got float 2.5"),
    ("nodes-too-many", _set(("cells", 0, "nodes"), 17), "cells[0].nodes: expected an integer between 1 and 16, got 17"),
    ("channels-zero", _set(("stem", "channels"), 0), "stem.channels: expected an integer >= 1, got 0"),
    ("inputs-three", _set(("cells", 1, "inputs"), 3), "cells[1].inputs: expected an integer between 1 and 2, got 3"),
    ("input-shape", _set(("task", "input"), "28x28"), "task.input: expected [C, H, W] or [D], got '28x28'"),
    ("input-two-dims", _set(("task", "input"), [28, 28]), "task.input: expected [C, H, W] or [D], got [28, 28]"),
    ("input-dim-str", _set(("task", "input"), [1, "a", 8]), "task.input[1]: expected an integer, got str 'a'"),
    ("task-list", _set(("task",), [1, 2]), "task: expected a mapping, got list [1, 2]"),
    ("cells-mapping", _set(("cells",), {"a": 1}), "cells: expected a non-empty list of cells, got {'a': 1}"),
    ("cells-empty", _set(("cells",), []), "cells: expected a non-empty list of cells, got []"),
    ("ops-empty", _set(("cells", 0, "ops"), []), "cells[0].ops: expected a non-empty list of ops, got []"),
    ("allow-zero-str", _set(("cells", 0, "allow_zero"), "yes"), "cells[0].allow_zero: expected true or false, got 'yes'"),
    ("name-int", _set(("name",), 12), "name: expected a non-empty string, got 12"),
    ("description-list", _set(("description",), ["a"]), "description: expected a string, got list"),
    ("kind", _set(("task", "kind"), "clasification"),
     "task.kind: got 'clasification'; expected one of classification, regression; did you mean 'classification'?"),
    ("norm", _set(("norm",), "layer"), "norm: got 'layer'; expected one of batch, none"),
    ("output", _set(("cells", 0, "output"), "mean"), "cells[0].output: got 'mean'; expected one of sum, concat, last"),
    ("preact", _set(("cells", 0, "preact"), "gelu"), "cells[0].preact: got 'gelu'; expected one of "),
    ("stem-op-for-domain", _set(("stem", "op"), "linear"), "stem.op: got 'linear'; expected one of conv_1x1, conv_3x3, conv_5x5"),
    ("head-op-for-domain", _set(("head", "op"), "linear"), "head.op: got 'linear'; expected one of global_pool_linear; did you mean 'global_pool_linear'?"),
    ("missing-task", _set(("task",), _DELETE), "missing required key 'task'"),
    ("missing-cells", _set(("cells",), _DELETE), "missing required key 'cells'"),
    ("missing-type", _set(("cells", 0, "type"), _DELETE), "cells[0]: missing required key 'type'"),
    ("missing-channels", _set(("cells", 0, "channels"), _DELETE), "cells[0]: missing required key 'channels'"),
    ("missing-stem-channels", _set(("stem", "channels"), _DELETE), "stem: missing required key 'channels'"),
    ("missing-outputs", _set(("task", "outputs"), _DELETE), "task: missing required key 'outputs'"),
    ("missing-ops", _set(("cell", "ops"), _DELETE), "cells[0]: missing required key 'ops'"),
    ("keep-gt-inputs", _set(("cells", 1, "keep"), 3), "cells[1].keep: expected 'all' or an integer <= inputs (2), got 3"),
    ("keep-word", _set(("cells", 1, "keep"), "some"), "cells[1].keep: expected an integer, got str 'some'"),
    ("cell-type-for-image", _set(("cells", 0, "type"), "mlp"), "cells[0].type: got 'mlp'; expected one of normal, reduction"),
    ("cell-type-typo", _set(("cells", 1, "type"), "reduce"),
     "cells[1].type: got 'reduce'; expected one of normal, reduction; did you mean 'reduction'?"),
    ("cell-type-for-vector", _set(("cells", 0, "type"), "normal", VECTOR), "cells[0].type: got 'normal'; expected one of mlp"),
    ("vector-cell-channels", _set(("cells", 0), {"type": "mlp", "channels": 8, "ops": ["skip"]}, VECTOR),
     "cells[0].channels: vector cells are sized by 'width', not 'channels'"),
    ("image-op-in-vector", _set(("cells", 0, "ops"), ["skip", "conv_3x3"], VECTOR),
     "cells[0].ops[1]: op 'conv_3x3' works on images, not vectors; expected one of "),
    ("duplicate-op", _set(("cells", 0, "ops"), ["skip", "conv_1x1", "skip"]), "cells[0].ops[2]: op 'skip' is listed twice"),
    # a key written once in the shared `cell:` block is named there, not in the cell that inherits it
    ("shared-op-typo", _set(("cell", "ops", 3), "conv_3x4"), "cell.ops[3]: unknown op 'conv_3x4'; registered image ops: "),
    ("shared-nodes", _set(("cell", "nodes"), 0), "cell.nodes: expected an integer between 1 and 16, got 0"),
    ("shared-allow-zero", _set(("cell", "allow_zero"), "no"), "cell.allow_zero: expected true or false, got 'no'"),
    ("duplicate-op-same-hyper", _set(("cells", 0, "ops"), [{"op": "conv_3x3", "dilation": 2}, {"op": "conv_3x3", "dilation": 2}]),
     "cells[0].ops[1]: op 'conv_3x3[dilation=2]' is listed twice"),
    ("even-kernel", _set(("cells", 1, "ops", 1), {"op": "conv_3x3", "kernel": 4}), "cells[1].ops[1].kernel: expected an odd kernel size, got 4"),
    ("kernel-str", _set(("cells", 1, "ops", 1), {"op": "conv_3x3", "kernel": "3"}), "cells[1].ops[1].kernel: expected an integer, got str '3'"),
    ("only-zero", _set(("cells", 0), {"type": "normal", "channels": 4, "ops": ["zero"], "allow_zero": False}),
     "cells[0].ops: every op is 'zero': the cell would output 0 whatever its input; add a real op"),
    ("only-zero-allowed", _set(("cells", 0), {"type": "normal", "channels": 4, "ops": ["zero"], "allow_zero": True}),
     "cells[0].ops: every op is 'zero': the cell would output 0 whatever its input; add a real op"),
    ("too-many-reductions", _set(("cells",), [{"type": "reduction", "channels": 4}] * 4),
     "cells: 4 reduction cells need inputs of at least 16 pixels, got 8x8"),
    ("not-a-mapping", lambda: [1, 2, 3], "expected a mapping, got list [1, 2, 3]"),
]


@pytest.mark.parametrize("make,expected", [pytest.param(m, e, id=i) for i, m, e in BAD])
def test_bad_input_message(make: Callable[[], Any], expected: str) -> None:
    with pytest.raises(SpaceError) as ei:
        loads(_text(make()))
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("<string>: ")
    body = msg[len("<string>: "):]
    if expected.endswith(" "):  # the rest lists the valid names
        assert body.startswith(expected), body
    else:
        assert body == expected


def test_messages_name_the_source_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(_text(_set(("cells", 1, "ops", 3), "sep_conv_3x4")()))
    with pytest.raises(SpaceError) as ei:
        load(p)
    assert str(ei.value).startswith(f"{p}: cells[1].ops[3]: unknown op 'sep_conv_3x4'; ")
    assert str(ei.value).endswith("did you mean 'sep_conv_3x3'?")


def _marker_yaml(marker: Path, where: str) -> str:
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    if where == "top":
        return f"{tag}\n"
    doc = _text(BASE).replace("name: t", f"name: {tag}")
    assert tag in doc
    return doc


@pytest.mark.parametrize("where", ["top", "name"])
def test_python_tag_refused_and_never_executed(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "MARKER"
    text = _marker_yaml(marker, where)
    p = tmp_path / "evil.yaml"
    p.write_text(text)
    line = 1
    col = 1 if where == "top" else 7
    for call, source in ((lambda: loads(text), "<string>"), (lambda: load(p), str(p))):
        with pytest.raises(SpaceError) as ei:
            call()
        msg = str(ei.value)
        assert "\n" not in msg
        assert msg == (
            f"{source}: line {line}, column {col}: YAML tag '!!python/object/apply:os.system' is not allowed; "
            "search spaces are plain data"
        )
    assert not marker.exists()


def test_local_tag_refused() -> None:
    with pytest.raises(SpaceError) as ei:
        loads("name: !custom x\n")
    assert str(ei.value) == "<string>: line 1, column 7: YAML tag '!custom' is not allowed; search spaces are plain data"


def test_unhashable_key_is_not_reported_as_a_tag() -> None:
    with pytest.raises(SpaceError) as ei:
        loads("? [1, 2]\n: 3\n")
    msg = str(ei.value)
    assert "\n" not in msg and "tag" not in msg
    assert msg.startswith("<string>: line 1, column 3: ")
    assert "unhashable key" in msg


def test_duplicate_key_refused_with_position() -> None:
    text = builtin_path("tiny").read_text()
    n_lines = len(text.splitlines())
    with pytest.raises(SpaceError) as ei:
        loads(text + "name: other\n")
    assert str(ei.value) == f"<string>: line {n_lines + 1}, column 1: YAML error: found duplicate key 'name'"
    nested = _text(BASE).replace("- type: normal\n", "- type: normal\n  type: reduction\n")
    assert nested != _text(BASE)
    with pytest.raises(SpaceError, match=r"^<string>: line \d+, column 3: YAML error: found duplicate key 'type'$"):
        loads(nested)


def test_anchors_and_merge_keys_still_work() -> None:
    text = _text({k: v for k, v in BASE.items() if k != "cells"}) + (
        "cells:\n"
        "  - &first {type: normal, channels: 4}\n"
        "  - {<<: *first, type: reduction, channels: 8}\n"
    )
    space = loads(text)
    assert [(c.type, c.channels) for c in space.cells] == [("normal", 4), ("reduction", 8)]


def test_yaml_syntax_error_reports_line_and_column() -> None:
    text = "name: x\ntask: {kind: classification\n  input: [1, 2]\n"
    with pytest.raises(SpaceError) as ei:
        loads(text)
    assert str(ei.value) == "<string>: line 3, column 8: YAML syntax error: expected ',' or '}', but got ':'"


def test_yaml_bad_indentation_reports_line() -> None:
    text = "name: x\ntask:\n  kind: regression\n input: [1]\n"
    with pytest.raises(SpaceError) as ei:
        loads(text)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("<string>: line 4, column 2: YAML syntax error: ")


def test_nonexistent_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(SpaceError) as ei:
        load(p)
    assert str(ei.value) == f"{p}: no such file; give a YAML path or a built-in space: {', '.join(builtin_spaces())}"


def test_unknown_builtin_name_suggests() -> None:
    with pytest.raises(SpaceError) as ei:
        load("tinny")
    assert str(ei.value) == f"tinny: no such file; give a YAML path or a built-in space: {', '.join(builtin_spaces())}; did you mean 'tiny'?"


def test_directory_is_not_a_space(tmp_path: Path) -> None:
    with pytest.raises(SpaceError) as ei:
        load(tmp_path)
    assert str(ei.value) == f"{tmp_path}: cannot read a YAML text (IsADirectoryError)"


def test_empty_document() -> None:
    with pytest.raises(SpaceError) as ei:
        loads("")
    assert str(ei.value) == "<string>: the file is empty; expected a mapping with name, task, stem, cells and head"


# -------------------------------------------------------------------------- fuzzing

_PATHS = [
    ("name",), ("task",), ("task", "kind"), ("task", "input"), ("task", "outputs"), ("stem",), ("stem", "op"),
    ("stem", "channels"), ("cell", "nodes"), ("cell", "ops"), ("cell", "allow_zero"), ("cells",), ("cells", 0),
    ("cells", 0, "type"), ("cells", 0, "channels"), ("cells", 1, "inputs"), ("cells", 1, "keep"),
    ("cells", 1, "ops", 0), ("cells", 1, "ops"), ("head",), ("head", "op"), ("norm",),
]
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=False) | st.sampled_from(
        ["", "all", "skip", "conv_3x3", "reduction", "normal", "mlp", "zero", "linear", "sum", "last"]
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["op", "kernel", "type", "x"]), inner, max_size=2),
    max_leaves=4,
)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_PATHS), _values), min_size=1, max_size=3))
def test_fuzzed_documents_load_or_fail_with_one_line(edits: list) -> None:
    doc = copy.deepcopy(BASE)
    for path, value in edits:
        node = doc
        try:
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed the container
    try:
        loads(_text(doc))
    except SpaceError as e:
        assert "\n" not in str(e) and str(e).startswith("<string>: ")

