"""Compile a search space into a ``Plan`` once: its structure, weight slots and execution choices.

``compile(space, options)`` walks the cell graphs once and returns a frozen ``Plan``: the
weight slots (names, shapes, inits), the preprocessing of each cell input, every
candidate edge with its ops, and, per edge, which linear ops the fused path merges into
one convolution (decided by counting multiply-adds), with the execution choices of
``ExecOptions`` (the im2col stem, the folded convolution stem, channels-last layouts, edge
groups, the norm kernel) worked out together. Nothing re-walks the graph per step; ``metanet.executor`` runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from .graph import Genotype, live_nodes
from .ops import OpDef, get_op, init_tensor
from .space import CellSpec, SearchSpace

__all__ = ["Slot", "OpCall", "EdgePlan", "InputPlan", "CellPlan", "Plan", "ExecOptions", "compile", "init_params", "param_count", "STRATEGIES", "IM2COL_MAX_FAN_IN"]

Params = Mapping[str, Tensor]
STRATEGIES = ("loop", "vmap")
# The image stem runs as unfold + matmul when it has at most this many inputs per output
# (C_in * k * k). CPU convolution kernels are slow for 1-channel inputs (about 6 GFLOP/s
# against 100+ for 64 channels); scripts/bench_meta.py measures both paths.
IM2COL_MAX_FAN_IN = 9


@dataclass(frozen=True)
class Slot:
    """One weight tensor of the supernet."""

    name: str
    shape: tuple[int, ...]
    init: str  # "fan_in" | "zeros" | "ones"


@dataclass(frozen=True)
class OpCall:
    """A candidate op on one edge, bound to its alpha column and weight names."""

    col: int
    label: str
    op: OpDef
    kwargs: tuple[tuple[str, Any], ...]
    params: tuple[tuple[str, str], ...]  # (op's tensor name, slot name)
    kernel_size: int | None  # side of the linear form, None if not linear
    # a plain convolution: its linear form is its own weight, at its own cost (conv_3x3,
    # not a separable, dilated or pooling op); see executor._Source.chunked
    dense: bool = False

    def __call__(self, x: Tensor, params: Params, c: int, stride: int) -> Tensor:
        return self.op.fn(x, {k: params[n] for k, n in self.params}, c=c, stride=stride, **dict(self.kwargs))

    def kernel(self, params: Params, c: int, stride: int, like: Tensor) -> Tensor | None:
        p = {k: params[n] for k, n in self.params}
        return self.op.kernel(p, c=c, stride=stride, like=like, **dict(self.kwargs))


@dataclass(frozen=True)
class EdgePlan:
    """A candidate edge ``src -> dst`` of a cell and how the fused path runs it."""

    index: int  # row of alpha
    src: int
    dst: int
    stride: int
    ops: tuple[OpCall, ...]
    merged: tuple[int, ...]  # positions in `ops` merged into one convolution (fused path)
    merged_size: int  # kernel side of that convolution
    separate: tuple[int, ...]  # positions run one by one on the fused path (zero dropped)


@dataclass(frozen=True)
class InputPlan:
    """How cell input ``j`` is made from a previous state: identity, or act-1x1-norm."""

    state: int  # index into the list of states (stem output, cell 0 output, ...)
    stride: int
    weight: str | None  # slot name of the 1x1 projection, None for identity
    bias: str | None


@dataclass(frozen=True)
class CellPlan:
    """A compiled cell."""

    spec: CellSpec
    inputs: tuple[InputPlan, ...]
    edges: tuple[EdgePlan, ...]
    # Fused path: edges (by ``EdgePlan.index``) whose merged convolutions run as ONE
    # convolution, their kernels stacked along the output channels (same source node,
    # stride and kernel size). Every group has at least two edges; the others run alone.
    groups: tuple[tuple[int, ...], ...] = ()

    @cached_property
    def group_of(self) -> dict[int, tuple[EdgePlan, ...]]:
        """``EdgePlan.index`` -> the edges of its group (for the edges in a group)."""
        by_index = {e.index: e for e in self.edges}
        return {i: tuple(by_index[j] for j in g) for g in self.groups for i in g}


@dataclass(frozen=True)
class ExecOptions:
    """The execution choices ``compile`` makes for a space; the defaults are the fast paths.

    Every choice gives the same maths (the tests compare each with its reference); they
    differ only in speed. ``None`` lets ``compile`` decide from the space.
    """

    stem_im2col: bool | None = None  # None: for few input channels (IM2COL_MAX_FAN_IN)
    channels_last: bool = True  # the channels-last layouts where the plan allows them
    group_edges: bool = True  # fused path: one convolution for edges sharing a source
    native_norm: bool = True  # kernels.batch_norm (one native kernel); False: kernels.batch_norm_reference
    stem_fold: bool = True  # a convolution stem with its batch norm folded in (kernels.conv2d_batch_norm)
    stem_recompute: bool = True  # fused path: ReLU convolutions read a folded stem in chunks (kernels.FoldedStem.relu_conv2d)


@dataclass(frozen=True)
class Plan:
    """A compiled search space: static structure, weight slots and execution choices.

    Build with ``compile(space, options)``: the layout flags are worked out together there;
    ``__post_init__`` refuses the combinations that cannot run (channels-last without the
    channels-last stem, a channels-last stem without batch norm, a folded convolution stem
    on an im2col stem), not every one that ``compile`` would not choose.
    """

    space: SearchSpace
    cells: tuple[CellPlan, ...]
    slots: tuple[Slot, ...]
    stem_im2col: bool = False  # run the image stem as unfold + matmul (few input channels)
    # Fused path: the stem hands its output over in channels-last order (free for the
    # im2col stem with its norm folded in; a convolution stem reads its image in that
    # order, a copy of a few input channels), which the strided 3x3 convolution after it
    # runs ~1.3x faster on, forward and backward; set only where every reader of the stem
    # output is a convolution of kernel >= 3, whose outputs go back to NCHW (see
    # _channels_last).
    stem_channels_last: bool = False
    # ... and the whole network stays channels-last, where every edge of every cell is
    # such a convolution: no projection, pooling, 1x1 convolution or edge group.
    channels_last: bool = False
    # Fused path: run the merged convolutions of an edge group as one (CellPlan.groups);
    # False: one convolution per edge, the same maths.
    group_edges: bool = True
    # the batch norm of cell outputs: kernels.batch_norm, or the plain-ops reference
    native_norm: bool = True
    # a convolution stem (not im2col) with its batch norm folded into its weights and a
    # bias (kernels.conv2d_batch_norm): no norm pass over the full-size stem output; the
    # im2col stem always folds its norm
    stem_fold: bool = False
    # Fused path, a stem with its norm folded in (im2col or stem_fold), no activation, and
    # one convolution after a ReLU reading it: it runs through the stem a chunk of images
    # at a time, recomputing each chunk for the backward (kernels.FoldedStem.relu_conv2d), so
    # the full-size stem output is neither kept nor read back from memory
    stem_recompute: bool = False

    def __post_init__(self) -> None:
        if self.stem_im2col and not self.image:
            raise ValueError("Plan: stem_im2col needs an image space")
        if self.stem_channels_last and not (self.image and self.space.norm == "batch"):
            raise ValueError("Plan: stem_channels_last needs an image space with batch norm; build plans with compile(space, ExecOptions(...))")
        if self.stem_fold and (self.stem_im2col or not self.image or self.space.norm != "batch"):
            raise ValueError("Plan: stem_fold needs a convolution stem (not im2col) of an image space with batch norm")
        if self.channels_last and not self.stem_channels_last:
            raise ValueError("Plan: channels_last needs stem_channels_last; build plans with compile(space, ExecOptions(...))")
        if self.stem_recompute and not (self.space.norm == "batch" and (self.stem_im2col or self.stem_fold) and self.space.stem.activation == "none"):
            raise ValueError("Plan: stem_recompute needs an image stem with its batch norm folded in (stem_im2col or stem_fold) and no stem activation")

    @property
    def image(self) -> bool:
        return self.space.task.domain == "image"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {s.name: s.shape for s in self.slots}

    def slot_names(self, genotype: Genotype) -> list[str]:
        """The weights a discrete network uses: stem, head, live preprocessing and kept ops."""
        used = {s.name for s in self.slots if s.name.startswith(("stem.", "head."))}
        for cp, cell in zip(self.cells, genotype.cells):
            srcs = {s for s, _, _ in cell}
            for j, ip in enumerate(cp.inputs):
                if j in srcs:
                    used |= {n for n in (ip.weight, ip.bias) if n}
        for cell_calls, _ in self.resolve(genotype):
            for _, call in cell_calls:
                used |= {n for _, n in call.params}
        return [s.name for s in self.slots if s.name in used]

    def resolve(self, genotype: Genotype) -> tuple[tuple[tuple[tuple[EdgePlan, OpCall], ...], frozenset[int]], ...]:
        """Per cell: the genotype's kept ``(edge, op call)`` pairs and its live nodes.

        Worked out once per genotype and cached on the plan, so running or fine-tuning a
        discrete network does not re-walk the cell graphs at every step.
        """
        cached = self._resolved.get(genotype)
        if cached is None:
            cells = []
            for cp, kept in zip(self.cells, genotype.cells):
                by_edge = {(e.src, e.dst): e for e in cp.edges}
                call_of = {(s, d, label): next(c for c in by_edge[(s, d)].ops if c.label == label) for s, d, label in kept}
                live = live_nodes(cp.spec, kept)
                kept = _without_empty_sources(cp.spec, kept, lambda k: call_of[k].op.zero_to_zero)
                calls = tuple((by_edge[k[:2]], call_of[k]) for k in kept)
                cells.append((calls, frozenset(live)))
            cached = self._resolved[genotype] = tuple(cells)
        return cached

    @cached_property
    def _resolved(self) -> dict[Genotype, tuple]:
        return {}


# ----------------------------------------------------------------------------- compile


def _without_empty_sources(spec: CellSpec, kept: tuple[tuple[int, int, str], ...], zero_to_zero: Callable[[tuple[int, int, str]], bool]) -> tuple[tuple[int, int, str], ...]:
    """``kept`` without the ``zero_to_zero`` edges leaving an intermediate node with no input.

    Such a node outputs zeros, and a ``zero_to_zero`` op (every built-in image op: no
    biases, and the per-task batch norm of zeros is zero) maps them to zeros, so the edge
    adds nothing: running it is exact but wasted work and weights. Repeated, since
    dropping edges can leave another node without inputs.
    """
    kept = tuple(kept)
    while True:
        fed = {d for _, d, _ in kept}
        out = tuple(k for k in kept if k[0] < spec.inputs or k[0] in fed or not zero_to_zero(k))
        if len(out) == len(kept):
            return out
        kept = out


def _merge_choice(calls: tuple[OpCall, ...], c: int, stride: int) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """Pick which linear ops to merge on an edge so that multiply-adds are smallest.

    Costs are per output position: a dense k x k conv costs k*k*c*c; each op's own cost
    comes from the registry. Merging only pays when several ops share the kernel.
    """
    live = [i for i, call in enumerate(calls) if call.op.name != "zero"]
    cost = {i: calls[i].op.cost(c, stride=stride, **dict(calls[i].kwargs)) for i in live}
    linear = sorted((calls[i].kernel_size, i) for i in live if calls[i].kernel_size is not None)
    best: tuple[float, tuple[int, ...], int] = (sum(cost.values()), (), 0)
    for size in sorted({k for k, _ in linear}):
        group = tuple(i for k, i in linear if k <= size)
        if len(group) < 2:
            continue
        total = size * size * c * c + sum(v for i, v in cost.items() if i not in group)
        if total <= best[0]:
            best = (total, group, size)
    _, merged, size = best
    return tuple(sorted(merged)), size, tuple(i for i in live if i not in merged)


def _source_groups(edges: list[EdgePlan]) -> tuple[tuple[int, ...], ...]:
    """Edges whose merged kernels can share one convolution: same source, stride and size.

    One convolution with ``m * c`` output channels instead of ``m`` with ``c`` each: one pass
    over the input, larger matrix products, and in the backward one input gradient instead
    of ``m`` summed ones. The result is the same up to float rounding.
    """
    by_key: dict[tuple[int, int, int], list[int]] = {}
    for e in edges:
        if e.merged:
            by_key.setdefault((e.src, e.stride, e.merged_size), []).append(e.index)
    return tuple(tuple(g) for g in by_key.values() if len(g) > 1)


def _reads_channels_last(e: EdgePlan) -> bool:
    """Whether edge ``e`` on the fused path may read a channels-last input: it runs only
    k x k convolutions, k >= 3 (merged, or ``conv_*`` ops), and not only zero."""
    if (e.merged and e.merged_size < 3) or not (e.merged or e.separate):
        return False
    return all(e.ops[i].op.name.startswith("conv_") and (e.ops[i].kernel_size or 0) >= 3 for i in e.separate)


def _stem_read_by_convolutions(cells: list[CellPlan], group_edges: bool) -> bool:
    """Whether the stem's output is read on the fused path by exactly one convolution, after
    a ReLU (a cell-input projection, or one edge or edge group of merged and plain
    convolutions), so that nothing needs the output whole and nothing remakes it twice
    (``Plan.stem_recompute``)."""
    readers = 0
    for cp in cells:
        for j, ip in enumerate(cp.inputs):
            edges = [e for e in cp.edges if e.src == j]
            if ip.state != 0 or (ip.weight is None and not edges):
                continue
            if cp.spec.preact != "relu":
                return False
            if ip.weight is not None:  # the cell-input projection, a 1x1 convolution
                readers += 1
                continue
            if not all((e.merged or e.separate) and all(e.ops[i].dense for i in e.separate) for e in edges):
                return False  # pooling, a separable convolution or a zero-only edge
            merged = [e for e in edges if e.merged]  # one convolution each, or one per edge group
            groups = {g for g in cp.groups if any(e.index in g for e in merged)} if group_edges else set()
            in_group = {i for g in groups for i in g}
            readers += len(groups) + sum(e.index not in in_group for e in merged) + sum(len(e.separate) for e in edges)
    return readers == 1


def _channels_last(space: SearchSpace, cells: list[CellPlan]) -> tuple[bool, bool]:
    """``(stem_channels_last, channels_last)`` of the fused path.

    The stem of an image space with batch norm can give its output in channels-last order
    (the folded im2col stem for free, a convolution stem from its image read in that
    order), and the convolutions that read it are faster so. That is allowed only where every reader of
    the stem is a k x k convolution, k >= 3, and not a projection, pooling or 1x1
    convolution: a channels-last 1x1 stride-2 weight gradient corrupts the heap on some
    oneDNN builds (compile.py), and other ops would run in, and pass on, an order they
    may be slow in. If every edge of every cell qualifies (and no edge group splits a
    channels-last output), the whole network stays channels-last; otherwise the stem's
    readers' outputs go back to NCHW (executor._network).
    """
    if not (space.task.domain == "image" and space.norm == "batch"):
        return False, False
    stem_readers, everything = True, True
    for cp in cells:
        for ip in cp.inputs:
            if ip.weight is not None:
                everything = False
                stem_readers &= ip.state != 0
        for e in cp.edges:
            ok = _reads_channels_last(e)
            everything &= ok
            if e.src < cp.spec.inputs and cp.inputs[e.src].state == 0:
                stem_readers &= ok
        everything &= not cp.groups and cp.spec.output != "concat"
    return stem_readers, stem_readers and everything


def compile(space: SearchSpace, options: ExecOptions = ExecOptions()) -> Plan:  # noqa: B008 - frozen
    """Compile ``space`` into a Plan: weight slots, input preprocessing, edges, fusion, and
    the execution choices of ``options``."""
    image = space.task.domain == "image"
    slots: list[Slot] = []

    def add(name: str, shape: tuple[int, ...], init: str) -> str:
        slots.append(Slot(name, tuple(shape), init))
        return name

    c_in = space.task.input[0]
    stem = space.stem
    if image:
        add("stem.w", (stem.channels, c_in, stem.kernel, stem.kernel), "fan_in")
    else:
        add("stem.w", (stem.channels, c_in), "fan_in")
        add("stem.b", (stem.channels,), "zeros")
    # (channels, resolution divisor) of each state: stem output, then each cell's output.
    states: list[tuple[int, int]] = [(stem.channels, 1)]
    cells: list[CellPlan] = []
    for ci, spec in enumerate(space.cells):
        c = spec.channels
        ref_scale = states[-1][1]
        inputs: list[InputPlan] = []
        for j in range(spec.inputs):
            state = max(len(states) - spec.inputs + j, 0)
            c_prev, scale = states[state]
            stride = ref_scale // scale
            if c_prev == c and stride == 1:
                inputs.append(InputPlan(state, 1, None, None))
                continue
            pre = f"cells.{ci}.pre{j}"
            if image:
                w = add(f"{pre}.w", (c, c_prev, 1, 1), "fan_in")
                inputs.append(InputPlan(state, stride, w, None))
            else:
                w = add(f"{pre}.w", (c, c_prev), "fan_in")
                inputs.append(InputPlan(state, 1, w, add(f"{pre}.b", (c,), "zeros")))
        edges: list[EdgePlan] = []
        index = {(e.src, e.dst): e.index for e in space.edges if e.cell == ci}
        for src, dst in spec.edges():
            stride = spec.stride(src)
            calls = []
            for col, choice in enumerate(spec.ops):
                kw = choice.kwargs
                prefix = f"cells.{ci}.e{src}_{dst}.{choice.label}"
                names = tuple(
                    (t, add(f"{prefix}.{t}", shape, init))
                    for t, (shape, init) in get_op(choice.name).shapes(c, stride, **kw).items()
                )
                ksize = get_op(choice.name).kernel_size(stride, **kw) if image else None
                dense = ksize is not None and get_op(choice.name).cost(c, stride=stride, **kw) == ksize * ksize * c * c
                calls.append(OpCall(col, choice.label, get_op(choice.name), tuple(sorted(kw.items())), names, ksize, dense))
            calls_t = tuple(calls)
            merged, size, separate = _merge_choice(calls_t, c, stride) if image else ((), 0, tuple(i for i, cl in enumerate(calls_t) if cl.op.name != "zero"))
            edges.append(EdgePlan(index[(src, dst)], src, dst, stride, calls_t, merged, size, separate))
        cells.append(CellPlan(spec, tuple(inputs), tuple(edges), _source_groups(edges)))
        scale = ref_scale * (2 if spec.reduction else 1)
        states.append((spec.out_channels, scale))
    c_last = states[-1][0]
    add("head.w", (space.task.outputs, c_last), "fan_in")
    add("head.b", (space.task.outputs,), "zeros")
    names = [s.name for s in slots]
    assert len(names) == len(set(names)), "duplicate slot names"
    im2col = image and (c_in * stem.kernel * stem.kernel <= IM2COL_MAX_FAN_IN if options.stem_im2col is None else options.stem_im2col)
    stem_cl, cl = _channels_last(space, cells) if options.channels_last else (False, False)
    fold = options.stem_fold and image and space.norm == "batch" and not im2col
    recompute = options.stem_recompute and image and space.norm == "batch" and (im2col or fold) and stem.activation == "none" and _stem_read_by_convolutions(cells, options.group_edges)
    return Plan(space, tuple(cells), tuple(slots), stem_im2col=im2col, stem_channels_last=stem_cl, channels_last=cl, group_edges=options.group_edges, native_norm=options.native_norm, stem_fold=fold, stem_recompute=recompute)


def init_params(plan: Plan, generator: torch.Generator | None = None, names: list[str] | None = None) -> dict[str, Tensor]:
    """Fresh weights for every slot (or the given slot names), without a task dimension."""
    wanted = set(names) if names is not None else None
    return {s.name: init_tensor(s.shape, s.init, generator) for s in plan.slots if wanted is None or s.name in wanted}


def param_count(plan: Plan, names: list[str] | None = None) -> int:
    """Number of weights in the supernet, or in the given slots."""
    wanted = set(names) if names is not None else None
    return sum(math.prod(s.shape) for s in plan.slots if wanted is None or s.name in wanted)
