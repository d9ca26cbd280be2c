"""Search spaces: YAML in, validated frozen dataclasses out.

A space is data. This module is the only place that reads its YAML; everything past
``load`` works on the typed, frozen ``SearchSpace``. Errors name the file, the YAML path
(``cells[1].ops[3]``), the bad value and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml

from .ops import ACTIVATIONS, OPS, suggest

__all__ = [
    "SpaceError",
    "TaskSpec",
    "StemSpec",
    "HeadSpec",
    "OpChoice",
    "CellSpec",
    "Edge",
    "SearchSpace",
    "load",
    "loads",
    "builtin_spaces",
    "builtin_path",
]

# The ready spaces live at the repository root (``search_spaces/``), beside the package.
SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"


class SpaceError(ValueError):
    """A search space file or text that is not valid; the message is one line."""


# ----------------------------------------------------------------------------- types


@dataclass(frozen=True)
class TaskSpec:
    """What the networks of a space consume and produce."""

    kind: str  # "classification" | "regression"
    input: tuple[int, ...]  # (C, H, W) or (D,)
    outputs: int

    @property
    def domain(self) -> str:
        return "image" if len(self.input) == 3 else "vector"


@dataclass(frozen=True)
class StemSpec:
    """First layer: a conv (images) or a linear layer (vectors) to ``channels``."""

    op: str
    channels: int
    kernel: int = 3
    activation: str = "none"


@dataclass(frozen=True)
class HeadSpec:
    """Last layer: ``global_pool_linear`` (images) or ``linear`` (vectors)."""

    op: str


@dataclass(frozen=True)
class OpChoice:
    """A candidate op on every edge of a cell, with its hyper-parameters."""

    name: str
    hyper: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """Unique display name: the op name, plus any overridden hyper-parameters."""
        if not self.hyper:
            return self.name
        return self.name + "[" + ",".join(f"{k}={v}" for k, v in self.hyper) + "]"

    @property
    def kwargs(self) -> dict[str, Any]:
        """Hyper-parameters with the registry defaults filled in."""
        return {**OPS[self.name].defaults, **dict(self.hyper)}


@dataclass(frozen=True)
class CellSpec:
    """One cell: a DAG of ``nodes`` intermediate nodes over ``inputs`` cell inputs."""

    type: str  # "normal" | "reduction" | "mlp"
    channels: int
    nodes: int
    inputs: int  # how many previous cells' outputs feed this cell (1 or 2)
    preact: str  # activation applied once to every edge input, shared by all ops
    output: str  # "sum" | "concat" | "last"
    ops: tuple[OpChoice, ...]
    keep: int | None  # inputs kept per node at discretisation; None = all
    allow_zero: bool  # may `zero` win at discretisation

    @property
    def reduction(self) -> bool:
        return self.type == "reduction"

    @property
    def out_channels(self) -> int:
        return self.channels * self.nodes if self.output == "concat" else self.channels

    def edges(self) -> tuple[tuple[int, int], ...]:
        """(src, dst) pairs: node j (numbered after the inputs) sees every node before it."""
        n = self.inputs + self.nodes
        return tuple((i, j) for j in range(self.inputs, n) for i in range(j))

    def stride(self, src: int) -> int:
        """Edges leaving a reduction cell's inputs halve the resolution."""
        return 2 if self.reduction and src < self.inputs else 1


@dataclass(frozen=True)
class Edge:
    """A candidate edge, with its row in the alpha matrix."""

    index: int
    cell: int
    src: int
    dst: int


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space. Build it with ``load`` or ``loads``."""

    name: str
    task: TaskSpec
    norm: str  # "batch" (per task, no running buffers) | "none"
    stem: StemSpec
    cells: tuple[CellSpec, ...]
    head: HeadSpec
    text: str  # the YAML it came from, kept for checkpoints
    description: str = ""

    @cached_property
    def edges(self) -> tuple[Edge, ...]:
        """Every candidate edge of every cell, in alpha-row order."""
        out: list[Edge] = []
        for ci, cell in enumerate(self.cells):
            for src, dst in cell.edges():
                out.append(Edge(len(out), ci, src, dst))
        return tuple(out)

    @property
    def max_ops(self) -> int:
        return max(len(c.ops) for c in self.cells)

    @property
    def alpha_shape(self) -> tuple[int, int]:
        """(edges, ops): the shape of one task's soft architecture encoding."""
        return (len(self.edges), self.max_ops)

    @cached_property
    def alpha_mask(self) -> torch.Tensor:
        """(edges, ops) bool: True where a column is a real candidate op of that edge."""
        mask = torch.zeros(self.alpha_shape, dtype=torch.bool)
        for e in self.edges:
            mask[e.index, : len(self.cells[e.cell].ops)] = True
        return mask

    def __hash__(self) -> int:  # the YAML text determines everything else
        return hash((self.name, self.text))


# --------------------------------------------------------------------------- parsing

_TOP_KEYS = ("name", "description", "task", "norm", "stem", "cell", "cells", "head")
_CELL_KEYS = ("type", "channels", "width", "nodes", "inputs", "preact", "output", "ops", "keep", "allow_zero")
_CELL_DEFAULTS: dict[str, Any] = {
    "nodes": 2,
    "inputs": 1,
    "output": "sum",
    "keep": "all",
    "allow_zero": False,
}
_STEMS = {"image": ("conv_1x1", "conv_3x3", "conv_5x5"), "vector": ("linear",)}
_HEADS = {"image": ("global_pool_linear",), "vector": ("linear",)}
_CELL_TYPES = {"image": ("normal", "reduction"), "vector": ("mlp",)}


class _Ctx:
    """Formats errors as ``file: path: message``."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, msg: str) -> SpaceError:
        where = f"{path}: " if path else ""
        return SpaceError(f"{self.source}: {where}{msg}")


def _type_name(v: Any) -> str:
    return type(v).__name__ if v is not None else "nothing"


def _mapping(ctx: _Ctx, v: Any, path: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
    if v is None and not path:  # an empty file
        raise ctx.fail(path, "the file is empty; expected a mapping with name, task, stem, cells and head")
    if not isinstance(v, Mapping):
        raise ctx.fail(path, f"expected a mapping, got {_type_name(v)} {v!r}")
    for k in v:
        if k not in keys:
            raise ctx.fail(
                path, f"unknown key '{k}'; expected one of {', '.join(keys)}{suggest(str(k), keys)}"
            )
    return v


def _int(ctx: _Ctx, v: Any, path: str, lo: int = 1, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ctx.fail(path, f"expected an integer, got {_type_name(v)} {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ctx.fail(path, f"expected an integer {rng}, got {v}")
    return v


def _choice(ctx: _Ctx, v: Any, path: str, valid: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in valid:
        raise ctx.fail(
            path, f"got {v!r}; expected one of {', '.join(valid)}{suggest(str(v), valid)}"
        )
    return v


def _require(ctx: _Ctx, m: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in m:
        raise ctx.fail(path, f"missing required key '{key}'")
    return m[key]


def _parse_task(ctx: _Ctx, v: Any) -> TaskSpec:
    m = _mapping(ctx, v, "task", ("kind", "input", "outputs"))
    kind = _choice(ctx, _require(ctx, m, "kind", "task"), "task.kind", ("classification", "regression"))
    inp = _require(ctx, m, "input", "task")
    if not isinstance(inp, list) or len(inp) not in (1, 3):
        raise ctx.fail("task.input", f"expected [C, H, W] or [D], got {inp!r}")
    shape = tuple(_int(ctx, d, f"task.input[{i}]") for i, d in enumerate(inp))
    outputs = _int(ctx, _require(ctx, m, "outputs", "task"), "task.outputs")
    return TaskSpec(kind, shape, outputs)


def _parse_op(ctx: _Ctx, v: Any, path: str, domain: str) -> OpChoice:
    if isinstance(v, Mapping):
        if "op" not in v:
            raise ctx.fail(path, "an op given as a mapping needs the key 'op'")
        name, hyper = v["op"], {k: x for k, x in v.items() if k != "op"}
    else:
        name, hyper = v, {}
    valid = tuple(sorted(n for n, o in OPS.items() if o.domain in (domain, "any")))
    if not isinstance(name, str) or name not in OPS:
        raise ctx.fail(
            path,
            f"unknown op {name!r}; registered {domain} ops: {', '.join(valid)}{suggest(str(name), valid)}",
        )
    if name not in valid:
        raise ctx.fail(path, f"op '{name}' works on {OPS[name].domain}s, not {domain}s; expected one of {', '.join(valid)}")
    defaults = OPS[name].defaults
    for k, x in hyper.items():
        if k not in defaults:
            keys = tuple(defaults) or ("(none)",)
            raise ctx.fail(f"{path}.{k}", f"op '{name}' has no hyper-parameter '{k}'; it takes: {', '.join(keys)}")
        _int(ctx, x, f"{path}.{k}")
        if k == "kernel" and x % 2 == 0:
            raise ctx.fail(f"{path}.{k}", f"expected an odd kernel size, got {x}")
    return OpChoice(name, tuple(sorted(hyper.items())))


def _parse_cell(ctx: _Ctx, v: Any, defaults: Mapping[str, Any], path: str, domain: str, shared: Mapping[str, Any]) -> CellSpec:
    own = _mapping(ctx, v, path, _CELL_KEYS)
    m = {**defaults, **own}

    def at(key: str) -> str:  # where the user wrote `key`: this cell, or the shared `cell:` block
        return f"cell.{key}" if key in shared and key not in own else f"{path}.{key}"

    ctype = _choice(ctx, _require(ctx, m, "type", path), at("type"), _CELL_TYPES[domain])
    width_key = "channels" if domain == "image" else "width"
    other = "width" if domain == "image" else "channels"
    if other in m and width_key not in m:
        raise ctx.fail(at(other), f"{domain} cells are sized by '{width_key}', not '{other}'")
    channels = _int(ctx, _require(ctx, m, width_key, path), at(width_key))
    nodes = _int(ctx, m["nodes"], at("nodes"), 1, 16)
    inputs = _int(ctx, m["inputs"], at("inputs"), 1, 2)
    preact = _choice(ctx, m.get("preact", "relu" if domain == "image" else "none"), at("preact"), tuple(ACTIVATIONS))
    output = _choice(ctx, m["output"], at("output"), ("sum", "concat", "last"))
    ops_v = _require(ctx, m, "ops", path)
    if not isinstance(ops_v, list) or not ops_v:
        raise ctx.fail(at("ops"), f"expected a non-empty list of ops, got {ops_v!r}")
    ops = tuple(_parse_op(ctx, o, f"{at('ops')}[{i}]", domain) for i, o in enumerate(ops_v))
    labels = [o.label for o in ops]
    for i, lab in enumerate(labels):
        if labels.index(lab) != i:
            raise ctx.fail(f"{at('ops')}[{i}]", f"op '{lab}' is listed twice")
    keep_v = m["keep"]
    if keep_v == "all":
        keep = None
    else:
        keep = _int(ctx, keep_v, at("keep"))
        if keep > inputs:  # the first intermediate node only has `inputs` candidates
            raise ctx.fail(at("keep"), f"expected 'all' or an integer <= inputs ({inputs}), got {keep}")
    allow_zero = m["allow_zero"]
    if not isinstance(allow_zero, bool):
        raise ctx.fail(at("allow_zero"), f"expected true or false, got {allow_zero!r}")
    if all(o.name == "zero" for o in ops):  # allow_zero lets zero win among real ops, not stand alone
        raise ctx.fail(at("ops"), "every op is 'zero': the cell would output 0 whatever its input; add a real op")
    return CellSpec(ctype, channels, nodes, inputs, preact, output, ops, keep, allow_zero)


def _parse(data: Any, ctx: _Ctx, text: str) -> SearchSpace:
    top = _mapping(ctx, data, "", _TOP_KEYS)
    name = _require(ctx, top, "name", "")
    if not isinstance(name, str) or not name:
        raise ctx.fail("name", f"expected a non-empty string, got {name!r}")
    description = top.get("description", "")
    if not isinstance(description, str):
        raise ctx.fail("description", f"expected a string, got {_type_name(description)}")
    task = _parse_task(ctx, _require(ctx, top, "task", ""))
    domain = task.domain
    norm = _choice(ctx, top.get("norm", "batch" if domain == "image" else "none"), "norm", ("batch", "none"))

    sm = _mapping(ctx, _require(ctx, top, "stem", ""), "stem", ("op", "channels", "width", "activation"))
    stem_op = _choice(ctx, _require(ctx, sm, "op", "stem"), "stem.op", _STEMS[domain])
    width_key = "channels" if domain == "image" else "width"
    stem = StemSpec(
        op=stem_op,
        channels=_int(ctx, _require(ctx, sm, width_key, "stem"), f"stem.{width_key}"),
        kernel=int(stem_op[5]) if domain == "image" else 1,
        activation=_choice(ctx, sm.get("activation", "none"), "stem.activation", tuple(ACTIVATIONS)),
    )
    hm = _mapping(ctx, _require(ctx, top, "head", ""), "head", ("op",))
    head = HeadSpec(_choice(ctx, _require(ctx, hm, "op", "head"), "head.op", _HEADS[domain]))

    defaults = dict(_CELL_DEFAULTS)
    shared = _mapping(ctx, top["cell"], "cell", _CELL_KEYS) if "cell" in top else {}
    defaults.update(shared)
    cells_v = _require(ctx, top, "cells", "")
    if not isinstance(cells_v, list) or not cells_v:
        raise ctx.fail("cells", f"expected a non-empty list of cells, got {cells_v!r}")
    cells = tuple(
        _parse_cell(ctx, c, defaults, f"cells[{i}]", domain, shared) for i, c in enumerate(cells_v)
    )
    if domain == "image":
        _, h, w = task.input
        n_red = sum(c.reduction for c in cells)
        if min(h, w) < 2**n_red:
            raise ctx.fail("cells", f"{n_red} reduction cells need inputs of at least {2**n_red} pixels, got {h}x{w}")
    return SearchSpace(name, task, norm, stem, cells, head, text, description)


class _SafeUniqueLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a repeated key (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"found duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def loads(text: str, source: str = "<string>") -> SearchSpace:
    """Parse and validate a search space from YAML text.

    Raises:
        SpaceError: one line naming ``source``, the YAML path and what was expected.
    """
    ctx = _Ctx(source)
    try:
        data = yaml.load(text, Loader=_SafeUniqueLoader)  # safe: no Python tags
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = e.problem or ""
        if "tag '" not in problem:  # e.g. "found unhashable key": not a tag at all
            raise ctx.fail("", f"{where}YAML error: {problem or e.context}") from None
        # Show the tag as written: 'tag:yaml.org,2002:python/...' is spelt '!!python/...'.
        tag = problem.split("tag '", 1)[1].rstrip("'").replace("tag:yaml.org,2002:", "!!")
        raise ctx.fail("", f"{where}YAML tag '{tag}' is not allowed; search spaces are plain data") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ctx.fail("", f"{where}YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ctx.fail("", f"YAML error: {str(e).splitlines()[0]}") from None
    return _parse(data, ctx, text)


def load(path: str | Path) -> SearchSpace:
    """Load a search space from a YAML file, or a built-in space by name (``tiny``)."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and (SPACES_DIR / f"{p.name}.yaml").exists():
        p = SPACES_DIR / f"{p.name}.yaml"
    try:
        text = p.read_text()
    except FileNotFoundError:
        names = builtin_spaces()
        raise SpaceError(
            f"{path}: no such file; give a YAML path or a built-in space: {', '.join(names)}{suggest(str(path), names)}"
        ) from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
        raise SpaceError(f"{path}: cannot read a YAML text ({type(e).__name__})") from None
    return loads(text, str(path))


def builtin_spaces() -> list[str]:
    """Names of the ready spaces shipped with metanet."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def builtin_path(name: str) -> Path:
    """Path of a built-in space's YAML file."""
    return SPACES_DIR / f"{name}.yaml"

