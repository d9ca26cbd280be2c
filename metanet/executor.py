"""Compile a search space into a Plan once; run it with explicit weights, per task or batched.

``compile(space)`` walks the cell graphs once and returns a frozen ``Plan``: the weight
slots (names, shapes, inits), the preprocessing of each cell input, every candidate edge
with its ops, and, per edge, which linear ops the fused path merges into one convolution
(decided by counting multiply-adds). Nothing re-walks the graph per step.

Execution is functional. ``forward`` runs ONE task: ``alpha`` (edges, ops) holds the op
weights (probabilities, or one-hot), ``params`` the network weights, ``x`` the inputs.
``run`` takes a meta-batch with a leading task dimension on all three and executes it as
a loop over tasks or with ``torch.func.vmap`` (which lowers per-task convolutions to
grouped ones); both compute the same thing. ``forward_genotype`` runs a discrete network,
touching only the weights of its kept edges.
"""

from __future__ import annotations

import math
import functools
from functools import cached_property
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .graph import Genotype, live_nodes
from .ops import OpDef, activation, batch_norm, batch_norm_reference, conv2d_im2col, conv2d_im2col_batch_norm, get_op, init_tensor, relu_conv2d
from .space import CellSpec, SearchSpace

__all__ = [
    "Slot",
    "OpCall",
    "EdgePlan",
    "InputPlan",
    "CellPlan",
    "Plan",
    "ExecOptions",
    "compile",
    "forward",
    "forward_genotype",
    "run",
    "run_edge",
    "init_params",
    "STRATEGIES",
]

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
    native_norm: bool = True  # ops.batch_norm (one native kernel); False: ops.batch_norm_reference


@dataclass(frozen=True)
class Plan:
    """A compiled search space: static structure, weight slots and execution choices.

    Build with ``compile(space, options)``: the layout flags are worked out together there
    and checked here, so a plan cannot carry a combination that ``compile`` would not make.
    """

    space: SearchSpace
    cells: tuple[CellPlan, ...]
    slots: tuple[Slot, ...]
    stem_im2col: bool = False  # run the image stem as unfold + matmul (few input channels)
    # Fused path: the im2col stem with its norm folded in hands its output over in
    # channels-last order (free), which the strided 3x3 convolution after it runs ~1.3x
    # faster on, forward and backward; set only where every reader of the stem output is
    # a convolution of kernel >= 3, whose outputs go back to NCHW (see _channels_last).
    stem_channels_last: bool = False
    # ... and the whole network stays channels-last, where every edge of every cell is
    # such a convolution: no projection, pooling, 1x1 convolution or edge group.
    channels_last: bool = False
    # Fused path: run the merged convolutions of an edge group as one (CellPlan.groups);
    # False: one convolution per edge, the same maths.
    group_edges: bool = True
    # the batch norm of cell outputs: ops.batch_norm, or the plain-ops reference
    native_norm: bool = True

    def __post_init__(self) -> None:
        if self.stem_im2col and not self.image:
            raise ValueError("Plan: stem_im2col needs an image space")
        if self.stem_channels_last and not (self.stem_im2col and self.space.norm == "batch"):
            raise ValueError("Plan: stem_channels_last needs the im2col stem with batch norm folded in; build plans with compile(space, ExecOptions(...))")
        if self.channels_last and not self.stem_channels_last:
            raise ValueError("Plan: channels_last needs stem_channels_last; build plans with compile(space, ExecOptions(...))")

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


def _channels_last(space: SearchSpace, cells: list[CellPlan], stem_im2col: bool) -> tuple[bool, bool]:
    """``(stem_channels_last, channels_last)`` of the fused path.

    The folded im2col stem can give its output in channels-last order for free, and the
    convolutions that read it are faster so. That is allowed only where every reader of
    the stem is a k x k convolution, k >= 3, and not a projection, pooling or 1x1
    convolution: a channels-last 1x1 stride-2 weight gradient corrupts the heap on some
    oneDNN builds (compile.py), and other ops would run in, and pass on, an order they
    may be slow in. If every edge of every cell qualifies (and no edge group splits a
    channels-last output), the whole network stays channels-last; otherwise the stem's
    readers' outputs go back to NCHW (executor._network).
    """
    if not (stem_im2col and space.norm == "batch"):
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
                calls.append(OpCall(col, choice.label, get_op(choice.name), tuple(sorted(kw.items())), names, ksize))
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
    stem_cl, cl = _channels_last(space, cells, im2col) if options.channels_last else (False, False)
    return Plan(space, tuple(cells), tuple(slots), stem_im2col=im2col, stem_channels_last=stem_cl, channels_last=cl, group_edges=options.group_edges, native_norm=options.native_norm)


def init_params(plan: Plan, generator: torch.Generator | None = None, names: list[str] | None = None) -> dict[str, Tensor]:
    """Fresh weights for every slot (or the given slot names), without a task dimension."""
    wanted = set(names) if names is not None else None
    return {s.name: init_tensor(s.shape, s.init, generator) for s in plan.slots if wanted is None or s.name in wanted}


# ----------------------------------------------------------------------------- running


def _norm(plan: Plan, x: Tensor) -> Tensor:
    if plan.space.norm != "batch":
        return x
    return batch_norm(x) if plan.native_norm else batch_norm_reference(x)


def _stem(plan: Plan, params: Params, x: Tensor, fused: bool = False) -> Tensor:
    stem = plan.space.stem
    if plan.stem_im2col and plan.space.norm == "batch":
        # the norm folded into the stem's weights (ops.conv2d_im2col_batch_norm): exact,
        # and no pass of the norm over the full-size stem output, forward or backward
        cl = fused and plan.stem_channels_last
        y = conv2d_im2col_batch_norm(x, params["stem.w"], padding=stem.kernel // 2, channels_last=cl)  # (N, C, H, W)
        return activation(stem.activation)(y)
    if plan.stem_im2col:
        y = conv2d_im2col(x, params["stem.w"], padding=stem.kernel // 2)  # (N, C, H, W)
    elif plan.image:
        y = F.conv2d(x, params["stem.w"], padding=stem.kernel // 2)  # (N, C, H, W)
    else:
        y = F.linear(x, params["stem.w"], params["stem.b"])  # (N, W)
    return activation(stem.activation)(_norm(plan, y))


def _head(plan: Plan, params: Params, x: Tensor, features: bool = False) -> Tensor:
    if plan.image:
        x = F.relu(x).mean((2, 3))  # (N, C)
    if features:
        return x
    return F.linear(x, params["head.w"], params["head.b"])  # (N, outputs)


def _cell_input(plan: Plan, cp: CellPlan, ip: InputPlan, params: Params, x: Tensor, fused: bool) -> Tensor:
    if ip.weight is None:
        return x
    if plan.image and fused:
        return _norm(plan, _Source(x, cp.spec.preact).conv(params[ip.weight], ip.stride, 0))
    act = activation(cp.spec.preact)
    if plan.image:
        return _norm(plan, F.conv2d(act(x), params[ip.weight], stride=ip.stride))
    return F.linear(act(x), params[ip.weight], params[ip.bias])


class _Source:
    """A node's value and its pre-activation (the cell's ``preact``), computed once, when an
    edge first asks."""

    __slots__ = ("value", "_preact", "_pre")

    def __init__(self, value: Tensor, preact: str) -> None:
        self.value, self._preact, self._pre = value, preact, None

    @property
    def pre(self) -> Tensor:
        if self._pre is None:
            self._pre = activation(self._preact)(self.value)
        return self._pre

    def conv(self, kernel: Tensor, stride: int, padding: int) -> Tensor:
        """``conv2d(pre, kernel)``; after a ReLU, ``ops.relu_conv2d`` on the value, which
        keeps only the value (saved by the norm anyway) for the backward, not its ReLU."""
        if self._preact == "relu":
            return relu_conv2d(self.value, kernel, stride=stride, padding=padding)
        return F.conv2d(self.pre, kernel, stride=stride, padding=padding)


EdgeFn = Callable[[CellPlan, EdgePlan, _Source], Tensor]


def _network(plan: Plan, params: Params, x: Tensor, cell_edges: Callable[[int], list[tuple[EdgePlan, EdgeFn]]], cell_live: Callable[[int], set[int]], features: bool, fused: bool = False) -> Tensor:
    """Stem, cells and head; ``cell_edges(i)`` gives the edges to run in cell i.

    Edges receive their source as a ``_Source``: plain ops read its shared pre-activation
    (computed once per source node), the fused path's convolutions take the node value
    and apply a ReLU pre-activation themselves (``ops.relu_conv2d``, which keeps less
    for the backward). ``fused`` also routes the cell-input projections through it."""
    states = [_stem(plan, params, x, fused)]
    # the stem's output is channels-last but the rest of the network is not: its readers'
    # outputs go back to NCHW (Plan.stem_channels_last)
    to_nchw = fused and plan.stem_channels_last and not plan.channels_last
    for ci, cp in enumerate(plan.cells):
        spec = cp.spec
        edges = cell_edges(ci)
        used = {e.src for e, _ in edges}
        nodes: dict[int, Tensor] = {}
        for j, ip in enumerate(cp.inputs):
            if j in used:
                nodes[j] = _cell_input(plan, cp, ip, params, states[ip.state], fused)
        sources: dict[int, _Source] = {}
        live = cell_live(ci)
        for dst in range(spec.inputs, spec.inputs + spec.nodes):
            if dst not in live:
                continue
            terms = []
            for e, fn in edges:
                if e.dst == dst:
                    if e.src not in sources:
                        sources[e.src] = _Source(nodes[e.src], spec.preact)
                    t = fn(cp, e, sources[e.src])
                    if to_nchw and e.src < spec.inputs and cp.inputs[e.src].state == 0:
                        t = t.contiguous()
                    terms.append(t)
            if terms:
                nodes[dst] = _norm(plan, _add(terms))
            else:  # every input dropped: the node outputs zeros, exactly as in the supernet
                # Shaped from the previous state (this cell's input resolution) so that no
                # weight is read: a genotype needs only the slots of ``Plan.slot_names``.
                ref = states[-1][:, :1]
                ref = ref[..., ::2, ::2] if spec.reduction else ref
                nodes[dst] = (ref * 0.0).expand(-1, spec.channels, *ref.shape[2:])
        inner = [nodes[j] for j in range(spec.inputs, spec.inputs + spec.nodes) if j in live]
        if spec.output == "last":
            out = inner[-1]
        elif spec.output == "sum":
            out = _add(inner)
        else:
            out = torch.cat(inner, dim=1)
        states.append(out)
    return _head(plan, params, states[-1], features)


def _add(terms: list[Tensor]) -> Tensor:
    """Sum of tensors by chained adds: no ``0 + t`` pass (Python ``sum``) and no stacked copy."""
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _padded_kernel(call: OpCall, params: Params, c: int, stride: int, size: int, like: Tensor) -> Tensor:
    """``call``'s linear form ``(c, c, size, size)``, zero-padded to the merged kernel size."""
    if not call.params:  # skip at stride 1, average pooling: a constant
        return _constant_kernel(call.op.name, call.kwargs, call.kernel_size, c, stride, size, like.dtype, like.device)
    k = call.kernel(params, c, stride, like)
    p = (size - call.kernel_size) // 2
    return F.pad(k, [p] * 4) if p else k


@functools.lru_cache(maxsize=256)
def _constant_kernel(op: str, kwargs: tuple[tuple[str, Any], ...], kernel_size: int, c: int, stride: int, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The padded kernel of an op without weights: built once per (op, hyper-parameters,
    channels, stride, size, dtype, device); a pure function of its arguments."""
    k = get_op(op).kernel({}, c=c, stride=stride, like=torch.empty(0, dtype=dtype, device=device), **dict(kwargs))
    p = (size - kernel_size) // 2
    return (F.pad(k, [p] * 4) if p else k).detach()


def _merged_kernel(e: EdgePlan, w: Tensor, params: Params, c: int, like: Tensor) -> Tensor:
    """sum_k w_k K_k over the merged ops of edge ``e``: ``(c, c, size, size)``.

    A chain of ``addcmul``: one op per merged kernel (not a pad, a multiply and an add), and
    autograd saves only the kernels themselves (weights, cached constants), no stacked copy.
    """
    kernel = None
    for i in e.merged:
        call = e.ops[i]
        k = _padded_kernel(call, params, c, e.stride, e.merged_size, like)
        wk = w[call.col]
        kernel = wk * k if kernel is None else torch.addcmul(kernel, wk, k)
    return kernel


def _soft_edge(plan: Plan, alpha: Tensor, params: Params, fused: bool) -> EdgeFn:
    grouped: dict[int, Tensor] = {}  # EdgePlan.index -> its part of a group's output, until used

    def merged_conv(cp: CellPlan, e: EdgePlan, src: _Source) -> Tensor:
        c = cp.spec.channels
        group = cp.group_of.get(e.index) if plan.group_edges else None
        if group is None:
            return src.conv(_merged_kernel(e, alpha[e.index], params, c, src.value), e.stride, e.merged_size // 2)
        if e.index not in grouped:  # the group's first edge: run the whole group's convolution
            kernel = torch.cat([_merged_kernel(f, alpha[f.index], params, c, src.value) for f in group])  # (m*c, c, k, k)
            y = src.conv(kernel, e.stride, e.merged_size // 2)
            grouped.update({f.index: part for f, part in zip(group, y.split(c, dim=1))})
        return grouped.pop(e.index)

    def edge(cp: CellPlan, e: EdgePlan, src: _Source) -> Tensor:
        c, w = cp.spec.channels, alpha[e.index]  # (ops,)
        if not fused:
            return _add([w[call.col] * call(src.pre, params, c, e.stride) for call in e.ops])
        terms = []
        if e.merged:
            terms.append(merged_conv(cp, e, src))
        for i in e.separate:
            call = e.ops[i]
            terms.append(w[call.col] * call(src.pre, params, c, e.stride))
        if not terms:  # only zero candidates
            return e.ops[0](src.pre, params, c, e.stride)
        return _add(terms)

    return edge


def forward(plan: Plan, alpha: Tensor, params: Params, x: Tensor, *, fused: bool = False, features: bool = False) -> Tensor:
    """Run the supernet for one task.

    Args:
        plan: from ``compile``.
        alpha: op weights per edge, ``(edges, ops)``; rows sum to 1 for a soft encoding.
        params: weights by slot name, without a task dimension.
        x: inputs ``(N, *input)``.
        fused: merge linear ops per edge into one convolution (exact; see ``compile``).
        features: return the input of the head's linear layer ``(N, C)`` instead.

    Returns:
        ``(N, outputs)`` logits or predictions.
    """
    edge = _soft_edge(plan, alpha, params, fused)
    all_edges = [[(e, edge) for e in cp.edges] for cp in plan.cells]
    all_nodes = [set(range(cp.spec.inputs, cp.spec.inputs + cp.spec.nodes)) for cp in plan.cells]
    return _network(plan, params, x, all_edges.__getitem__, all_nodes.__getitem__, features, fused)


def run_edge(plan: Plan, cell: int, edge: int, alpha: Tensor, params: Params, source: Tensor, *, fused: bool = False) -> Tensor:
    """One soft edge of one task on its own: ``sum_k alpha_k op_k(pre(source))``, with
    ``pre`` the cell's pre-activation, the way ``forward`` runs it (``fused``: its linear ops merged into one convolution).

    Args:
        cell, edge: the cell's index in ``plan.cells`` and the edge's in ``CellPlan.edges``.
        alpha: ``(edges, ops)`` op weights of the whole space.
        source: the source node's value ``(N, C, H, W)`` (an image space).
    """
    cp = plan.cells[cell]
    return _soft_edge(plan, alpha, params, fused)(cp, cp.edges[edge], _Source(source, cp.spec.preact))


def forward_genotype(plan: Plan, genotype: Genotype, params: Params, x: Tensor, *, features: bool = False) -> Tensor:
    """Run the discrete network ``genotype`` for one task; only its weights are read."""
    resolved = plan.resolve(genotype)
    per_cell = [[(e, _discrete_edge(call, params)) for e, call in calls] for calls, _ in resolved]
    lives = [live for _, live in resolved]
    return _network(plan, params, x, per_cell.__getitem__, lives.__getitem__, features)


def _discrete_edge(call: OpCall, params: Params) -> EdgeFn:
    return lambda cp, e, src: call(src.pre, params, cp.spec.channels, e.stride)


def run(
    plan: Plan,
    alpha: Tensor,
    params: Params,
    x: Tensor,
    *,
    fused: bool = False,
    strategy: str = "loop",
    features: bool = False,
) -> Tensor:
    """Run the supernet for a meta-batch of tasks.

    Args:
        alpha: ``(B, edges, ops)`` per-task op weights.
        params: ``{name: (B, *shape)}`` per-task weights.
        x: ``(B, N, *input)``.
        strategy: ``"loop"`` (one task at a time) or ``"vmap"`` (torch.func.vmap).

    Returns:
        ``(B, N, outputs)``.
    """
    if strategy == "vmap":
        fn = lambda a, p, xb: forward(plan, a, p, xb, fused=fused, features=features)  # noqa: E731
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return torch.func.vmap(fn)(alpha, dict(params), x)
        # Autocast is unreliable inside vmap's batching rules (PyTorch issues 105442 and
        # 192617: dtypes that differ from the unbatched op; here once a conv2d that met a
        # float32 weight and a bf16 activation, not reproducible on demand). So under
        # autocast the vmapped network runs wholly in autocast's dtype, cast once here,
        # with autocast off inside; the casts stay on the tape, so the gradients reach
        # the float32 weights as float32.
        dtype = torch.get_autocast_dtype(device)
        low = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        with torch.autocast(device, enabled=False):
            return torch.func.vmap(fn)(low(alpha), {k: low(v) for k, v in params.items()}, low(x))
    if strategy != "loop":
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    # unbind, not v[b]: the backward of B selects allocates B zero-filled (B, *shape)
    # gradients per weight (quadratic in B); unbind's backward is one stack.
    per_task = {k: v.unbind(0) for k, v in params.items()}
    alphas, xs = alpha.unbind(0), x.unbind(0)
    outs = [forward(plan, alphas[b], {k: v[b] for k, v in per_task.items()}, xs[b], fused=fused, features=features) for b in range(len(xs))]
    return torch.stack(outs)


def param_count(plan: Plan, names: list[str] | None = None) -> int:
    """Number of weights in the supernet, or in the given slots."""
    wanted = set(names) if names is not None else None
    return sum(math.prod(s.shape) for s in plan.slots if wanted is None or s.name in wanted)
