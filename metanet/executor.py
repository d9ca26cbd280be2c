"""Run a compiled ``Plan`` with explicit weights, per task or batched.

Execution is functional. ``forward`` runs ONE task: ``alpha`` (edges, ops) holds the op
weights (probabilities, or one-hot), ``params`` the network weights, ``x`` the inputs.
``run`` takes a meta-batch with a leading task dimension on all three and executes it as
a loop over tasks or with ``torch.func.vmap`` (which lowers per-task convolutions to
grouped ones); both compute the same thing. ``forward_genotype`` runs a discrete network,
touching only the weights of its kept edges. Every execution choice is the plan's
(``metanet.plan``); this module keeps no switches of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .graph import Genotype
from .kernels import FoldedStem, batch_norm, batch_norm_reference, conv2d_batch_norm, conv2d_im2col, conv2d_im2col_batch_norm, folded_stem, relu_conv2d
from .ops import activation, get_op
from .plan import IM2COL_MAX_FAN_IN, STRATEGIES, CellPlan, EdgePlan, ExecOptions, InputPlan, OpCall, Params, Plan, Slot, compile, init_params, param_count

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
    "param_count",
    "STRATEGIES",
    "IM2COL_MAX_FAN_IN",
]

# ----------------------------------------------------------------------------- running


def _norm(plan: Plan, x: Tensor) -> Tensor:
    if plan.space.norm != "batch":
        return x
    return batch_norm(x) if plan.native_norm else batch_norm_reference(x)


def _stem(plan: Plan, params: Params, x: Tensor, fused: bool = False) -> Tensor | _LazyStem:
    stem, w = plan.space.stem, params["stem.w"]
    pad = stem.kernel // 2
    cl = fused and plan.stem_channels_last
    if cl and plan.image and not plan.stem_im2col:  # a convolution stem passes the order on
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last, also under vmap
    if fused and plan.stem_recompute and torch.is_grad_enabled():  # the folded stem, kept as its operands until read
        return _LazyStem(folded_stem(x, w, padding=pad, im2col=plan.stem_im2col, channels_last=cl and plan.stem_im2col))
    if plan.stem_im2col and plan.space.norm == "batch":
        # the norm folded into the stem's weights (kernels.conv2d_im2col_batch_norm): exact,
        # and no pass of the norm over the full-size stem output, forward or backward
        return activation(stem.activation)(conv2d_im2col_batch_norm(x, w, padding=pad, channels_last=cl))  # (N, C, H, W)
    if plan.stem_im2col:
        y = conv2d_im2col(x, w, padding=pad)  # (N, C, H, W)
    elif plan.stem_fold:  # exact: the norm folded into the weights and a bias
        return activation(stem.activation)(conv2d_batch_norm(x, w, padding=pad))
    elif plan.image:
        y = F.conv2d(x, w, padding=pad)  # (N, C, H, W)
    else:
        y = F.linear(x, w, params["stem.b"])  # (N, W)
    return activation(stem.activation)(_norm(plan, y))


class _LazyStem:
    """The folded stem's output (``Plan.stem_recompute``), made when first read whole: a
    ReLU convolution reads it through ``FoldedStem.relu_conv2d`` instead, which never
    stores it."""

    __slots__ = ("stem", "_value")

    def __init__(self, stem: FoldedStem) -> None:
        self.stem, self._value = stem, None

    @property
    def value(self) -> Tensor:
        if self._value is None:
            self._value = self.stem.output()
        return self._value


def _whole(state: Tensor | _LazyStem) -> Tensor:
    return state.value if isinstance(state, _LazyStem) else state


def _head(plan: Plan, params: Params, x: Tensor, features: bool = False) -> Tensor:
    if plan.image:
        x = F.relu(x).mean((2, 3))  # (N, C)
    if features:
        return x
    return F.linear(x, params["head.w"], params["head.b"])  # (N, outputs)


def _cell_input(plan: Plan, cp: CellPlan, ip: InputPlan, params: Params, x: Tensor | _LazyStem, fused: bool) -> Tensor | _LazyStem:
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

    __slots__ = ("_node", "_preact", "_pre")

    def __init__(self, node: Tensor | _LazyStem, preact: str) -> None:
        self._node, self._preact, self._pre = node, preact, None

    @property
    def value(self) -> Tensor:
        return _whole(self._node)

    @property
    def like(self) -> Tensor:
        """A tensor of the value's dtype and device, without making a lazy stem's output."""
        return self._node.stem.wm if isinstance(self._node, _LazyStem) else self._node

    @property
    def chunked(self) -> bool:
        """Whether this is a lazy stem that a ReLU convolution reads in chunks here
        (``FoldedStem.chunked``): a lone convolution then runs through ``conv`` too."""
        return self._preact == "relu" and isinstance(self._node, _LazyStem) and self._node.stem.chunked()

    @property
    def pre(self) -> Tensor:
        if self._pre is None:
            self._pre = activation(self._preact)(self.value)
        return self._pre

    def conv(self, kernel: Tensor, stride: int, padding: int) -> Tensor:
        """``conv2d(pre, kernel)``; after a ReLU, ``kernels.relu_conv2d`` on the value, which
        keeps only the value (saved by the norm anyway) for the backward, not its ReLU, or
        on a lazy stem ``FoldedStem.relu_conv2d``, which keeps nothing full-size."""
        if self.chunked:
            return self._node.stem.relu_conv2d(kernel, stride, padding)
        if self._preact == "relu":
            return relu_conv2d(self.value, kernel, stride=stride, padding=padding)
        return F.conv2d(self.pre, kernel, stride=stride, padding=padding)


EdgeFn = Callable[[CellPlan, EdgePlan, _Source], Tensor]


def _network(plan: Plan, params: Params, x: Tensor, cell_edges: Callable[[int], list[tuple[EdgePlan, EdgeFn]]], cell_live: Callable[[int], set[int]], features: bool, fused: bool = False) -> Tensor:
    """Stem, cells and head; ``cell_edges(i)`` gives the edges to run in cell i.

    Edges receive their source as a ``_Source``: plain ops read its shared pre-activation
    (computed once per source node), the fused path's convolutions take the node value
    and apply a ReLU pre-activation themselves (``kernels.relu_conv2d``, which keeps less
    for the backward). ``fused`` also routes the cell-input projections through it."""
    states: list[Tensor | _LazyStem] = [_stem(plan, params, x, fused)]
    # the stem's output is channels-last but the rest of the network is not: its readers'
    # outputs go back to NCHW (Plan.stem_channels_last)
    to_nchw = fused and plan.stem_channels_last and not plan.channels_last
    for ci, cp in enumerate(plan.cells):
        spec = cp.spec
        edges = cell_edges(ci)
        used = {e.src for e, _ in edges}
        nodes: dict[int, Tensor | _LazyStem] = {}
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
                ref = _whole(states[-1])[:, :1]
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
    return _head(plan, params, _whole(states[-1]), features)


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
            return src.conv(_merged_kernel(e, alpha[e.index], params, c, src.like), e.stride, e.merged_size // 2)
        if e.index not in grouped:  # the group's first edge: run the whole group's convolution
            kernel = torch.cat([_merged_kernel(f, alpha[f.index], params, c, src.like) for f in group])  # (m*c, c, k, k)
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
            if call.dense and src.chunked:  # the op weight scales the kernel, not the output
                kernel = w[call.col] * call.kernel(params, c, e.stride, src.like)
                terms.append(src.conv(kernel, e.stride, call.kernel_size // 2))
            else:
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
