"""The meta-learner: generators + inner loop + outer loop, and the one evaluation path.

``MetaNet`` holds the task encoder, the architecture generator, the weight generator and
(optionally) Meta-SGD step sizes. For a meta-batch it generates per-task op weights and
initial weights, adapts the weights with k gradient steps on each task's support set, and
returns the query loss; the outer loop backpropagates through the adaptation into both
generators (second order), or not (first order), or uses Reptile's update, or the
implicit gradient of a proximal inner problem (iMAML).

The task dimension is data throughout. The batched inner loop takes one gradient of the
SUM of per-task support losses with respect to the stacked per-task weights: tasks are
independent, so each task's slice of that gradient is its own gradient.

Evaluation has one code path, ``evaluate_task``: generate, discretise the architecture,
build the discrete network, adapt it k steps on the support set, score the query set. The
``generate`` API, ``metanet evaluate`` and validation during training all call it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import TaskEncoder
from .executor import Plan, compile, forward_genotype, run
from .generators import ArchitectureGenerator, WeightGenerator, safe_name
from .graph import Genotype, discretise
from .heads import class_means, make_head
from .inner import LSTMRule
from .kernels import whole_stem
from .space import SearchSpace

__all__ = [
    "ModelConfig",
    "MetaNet",
    "Generated",
    "task_loss",
    "adapt_discrete",
    "evaluate_task",
    "meta_loss",
    "outer_loss",
    "sgd",
    "ORDERS",
    "INNER_OPTIMIZERS",
    "PRECISIONS",
    "precision",
    "cpu_bf16_units",
    "bf16_warning",
]

ORDERS = ("second", "first", "reptile", "implicit")
INNER_OPTIMIZERS = ("sgd", "metasgd", "lstm")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes a MetaNet (the trainer's knobs live in TrainConfig)."""

    arch: str = "conditional"  # conditional | shared | fixed
    weights: str = "vae"  # vae | off
    dim: int = 64  # task embedding
    latent: int = 32  # VAE latent
    inner_lr: float = 0.01
    prox: float = 0.0  # every inner loop's proximal weight: support loss + prox / 2 |w - w0|^2 (iMAML's lambda)
    meta_sgd: bool = False  # learn a step size per weight
    adapt_alpha: bool = False  # the inner loop also adapts the alpha logits
    alpha_lr: float = 0.1
    use_metadata: bool = True
    fused: bool = True  # merged mixed ops (exact)
    proto_head: bool = True  # classification: head weights from class prototypes of the network's features
    arch_hidden: int = 0  # conditional architectures: 0 a linear map from the embedding, else an MLP's hidden units
    arch_norm: bool = False  # conditional architectures: the map reads the embedding layer-normalised (its scale cannot saturate the logits)
    inner_optimizer: str = "sgd"  # sgd | metasgd (= meta_sgd) | lstm (inner.LSTMRule, meta-learned)
    weight_bound: float = 0.0  # VAE: soft bound c on each weight modulation, c * tanh(m / c); 0: unbounded
    head: str = "linear"  # classification: linear (the space's head) | matching | relation | memory (heads.py)


@dataclass
class Generated:
    """What the generators produce for a meta-batch."""

    alpha: Tensor  # (B, edges, ops) op weights
    logits: Tensor | None  # (B, edges, ops), None for a fixed architecture
    params: dict[str, Tensor]  # {slot: (B, *shape)} initial weights
    kl: Tensor  # (B,)
    embedding: Tensor  # (B, dim)
    latent: Tensor | None  # (B, latent)

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor by name (``params.<slot>`` for the weights), None left out."""
        out = {"alpha": self.alpha, "logits": self.logits, "kl": self.kl, "embedding": self.embedding, "latent": self.latent}
        out.update({f"params.{k}": v for k, v in self.params.items()})
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> Generated:
        """The inverse of ``tensors``."""
        params = {k[len("params.") :]: v for k, v in tensors.items() if k.startswith("params.")}
        return cls(tensors["alpha"], tensors.get("logits"), params, tensors["kl"], tensors["embedding"], tensors.get("latent"))

    def slice(self, part: slice) -> Generated:
        """The tasks ``part`` of the meta-batch (e.g. one process's block under torchrun)."""
        return Generated.from_tensors({k: v[part] for k, v in self.tensors().items()})


# bf16 on a CPU without bf16 matrix units, measured: the conv4 second-order MAML step of
# bench_meta (5-way 1-shot, 15 queries, meta-batch 32) took 23.7 s against 2.757 s in
# float32 on an AVX2 CPU (8.6x slower; 9.8x in a later run); with AMX-BF16 it is 1.45x faster
# (docs/PERFORMANCE.md, bench_meta).
BF16_SLOWDOWN_WITHOUT_UNITS = 8.6


def cpu_bf16_units(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has bf16 matrix units (the ``amx_bf16`` or ``avx512_bf16`` flag of
    ``/proc/cpuinfo``) that oneDNN may use; None where that cannot be read (not Linux).

    For this machine (``cpuinfo`` None) the flags count only where oneDNN also has bf16
    kernels for the instruction set it may use: ``ONEDNN_MAX_CPU_ISA=AVX2`` (as the
    figures with the instruction set capped to AVX2 in docs/PERFORMANCE.md are taken)
    leaves the units unused, and bf16 runs as slowly as on a CPU without them.
    ``cpuinfo`` given: its flags alone (another machine's)."""
    here = cpuinfo is None
    if here:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = {w for line in cpuinfo.splitlines() if line.startswith("flags") for w in line.split(":", 1)[-1].split()}
    if not flags:
        return None
    return bool(flags & {"amx_bf16", "avx512_bf16"}) and (not here or _onednn_bf16())


def _onednn_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for the instruction set it may use (True where torch
    does not say)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else True
    except RuntimeError:
        return True


def bf16_warning(device: torch.device | str, cpuinfo: str | None = None) -> str | None:
    """What to tell a user who asks for bf16 on ``device``: a sentence where the CPU has no
    bf16 matrix units (autocast then emulates bf16, several times slower than float32),
    else None. A warning rather than a refusal: the arithmetic is right, only slow, and a
    config must run alike on every machine it travels to."""
    if torch.device(device).type != "cpu" or cpu_bf16_units(cpuinfo) is not False:
        return None
    return (f"precision bf16 on a CPU without bf16 matrix units (no amx_bf16 or avx512_bf16 flag, or oneDNN capped below them): measured "
            f"{BF16_SLOWDOWN_WITHOUT_UNITS}x slower than fp32 on such a CPU (docs/PERFORMANCE.md, bench_precision); use --precision fp32")


def precision(name: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The arithmetic of a meta-step's forward pass: ``fp32``, or ``bf16`` mixed precision.

    ``bf16`` is ``torch.autocast`` on ``device``'s type: convolutions and matrix products
    (the support and query passes, and the inner loop's gradient, which is computed inside
    the forward) run in bfloat16, while the weights, their gradients, the optimizer and
    the losses stay float32. Call the outer backward outside the context, as autocast
    asks. It pays where the device has bfloat16 matrix units (AMX or AVX512-BF16 on a
    CPU, tensor cores on a GPU); it changes the numbers, so it is a choice, never a default.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def task_loss(kind: str, pred: Tensor, y: Tensor) -> Tensor:
    """Per-task mean loss over a task's points: cross-entropy or MSE. ``pred`` is ``(..., N, out)``."""
    if kind == "classification":
        return F.cross_entropy(pred.flatten(0, -2), y.flatten(), reduction="none").view(y.shape).mean(-1)
    return (pred - y).pow(2).flatten(-2).mean(-1)


def task_metric(kind: str, pred: Tensor, y: Tensor) -> Tensor:
    """Per-task accuracy (classification) or MSE (regression)."""
    if kind == "classification":
        return (pred.argmax(-1) == y).float().mean(-1)
    return task_loss(kind, pred, y)


class MetaNet(nn.Module):
    """Task encoder + architecture generator + weight generator (+ Meta-SGD step sizes).

    Args:
        space: the search space.
        kind: ``classification`` or ``regression`` (from the task distribution).
        n_families: metadata families (0: none).
        config: the model's knobs.
        genotype: the architecture when ``config.arch == "fixed"``.
    """

    def __init__(self, space: SearchSpace, n_families: int = 0, config: ModelConfig = ModelConfig(), genotype: Genotype | None = None):
        super().__init__()
        self.space, self.config = space, config
        self.kind = space.task.kind
        self.plan: Plan = compile(space)
        self.encoder = TaskEncoder(self.kind, space.task.input, space.task.outputs, config.dim, n_families if config.use_metadata else 0)
        self.arch = ArchitectureGenerator(self.plan, config.dim, config.arch, genotype, hidden=config.arch_hidden, norm=config.arch_norm)
        self.weights = WeightGenerator(self.plan, config.dim, config.latent, config.weights, bound=config.weight_bound)
        # an episodic head (heads.py) classifies from the network's features; no linear head then
        self.head = make_head(config.head, self.plan.shapes()["head.w"][1], space.task.outputs)
        if self.head is not None and self.kind != "classification":
            raise ValueError(f"head {config.head!r} classifies; space '{space.name}' is for {self.kind}")
        self.proto = config.proto_head and self.kind == "classification" and self.head is None
        self.proto_scale = nn.Parameter(torch.zeros(())) if self.proto else None  # log scale
        if config.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {', '.join(INNER_OPTIMIZERS)}, got {config.inner_optimizer!r}")
        self.lrs = (
            nn.ParameterDict({safe_name(s.name): nn.Parameter(torch.full(s.shape, config.inner_lr)) for s in self.plan.slots})
            if config.meta_sgd or config.inner_optimizer == "metasgd"
            else None
        )
        self.inner_rule = LSTMRule() if config.inner_optimizer == "lstm" else None

    def forward(self, episode, **kwargs) -> tuple[Tensor, dict[str, float]]:
        """The meta-objective of a meta-batch (see ``meta_loss`` for the keyword arguments)."""
        return meta_loss(self, episode, **kwargs)

    def lr(self, name: str) -> Tensor | float:
        """Inner-loop step size of slot ``name``."""
        return self.lrs[safe_name(name)] if self.lrs is not None else self.config.inner_lr

    def step_size(self, name: str) -> Tensor | float:
        """``lr(name)`` as a constant: what adapting a generated network uses."""
        lr = self.lr(name)
        return lr.detach() if isinstance(lr, Tensor) else lr

    def generate(self, support_x: Tensor, support_y: Tensor, metadata: Tensor | None = None, *, temperature: float = 1.0, gumbel: bool = False, hard: bool = False, sample: bool = False, generator: torch.Generator | None = None, strategy: str = "loop", proto_head: bool = True, ways: int | None = None, op_dropout: float = 0.0, part: slice | None = None) -> Generated:
        """Run both generators on a meta-batch of support sets.

        ``op_dropout``: meta-training's operation-level dropout of parameter-free ops
        (``ArchitectureGenerator.forward``'s ``drop``).

        ``part``: generate for these tasks of the meta-batch only (one process's block
        under torchrun), as ``generate(...).slice(part)`` would, noise included: every
        task is generated from its own support set alone, and the noise is drawn for the
        whole meta-batch and cut, so ``generator`` ends in the same state.

        ``proto_head=False`` skips the supernet's prototype head (for callers that build the
        head from a discrete network's own features instead). ``ways``: the tasks' number of
        classes when it differs from the space's outputs (only a prototype head serves any
        number; see ``check_ways``).
        """
        if not self.config.use_metadata:
            metadata = None
        rows = None
        if part is not None:
            rows = (part, support_x.shape[0])
            support_x, support_y = support_x[part], support_y[part]
            metadata = metadata[part] if metadata is not None else None
        e = self.encoder(support_x, support_y, metadata, ways=ways)
        alpha, logits = self.arch(e, temperature, gumbel, hard, generator, drop=op_dropout, rows=rows)
        params, kl, z = self.weights(e, alpha, sample=sample, generator=generator, rows=rows)
        if self.proto and proto_head:
            feats = run(self.plan, alpha, params, support_x, fused=self.config.fused, strategy=strategy, features=True)
            params["head.w"], params["head.b"] = self.proto_head(feats, support_y, ways)
        return Generated(alpha, logits, params, kl, e, z)

    def check_ways(self, ways: int) -> None:
        """Raise ``ValueError`` unless this model can classify ``ways``-way tasks.

        A prototype head has one row per class of the support set, so any number of ways
        works; a learned head has exactly the space's number of outputs.
        """
        if self.head is not None:
            if not self.head.any_ways and ways != self.space.task.outputs:
                raise ValueError(f"this model's {self.config.head} head is learned for {self.space.task.outputs}-way tasks (its label input and output are per class), so it cannot classify {ways}-way tasks")
        elif self.kind == "classification" and not self.proto and ways != self.space.task.outputs:
            raise ValueError(f"this model's classifier head is learned for {self.space.task.outputs}-way tasks (trained without the prototype head), so it cannot classify {ways}-way tasks")

    def proto_head(self, feats: Tensor, y: Tensor, ways: int | None = None) -> tuple[Tensor, Tensor]:
        """Head weights from class prototypes (Proto-MAML): logits = -scale * |f - p_c|^2 + const.

        Args:
            feats: ``(B, N, C)`` support features (the head's input).
            y: ``(B, N)`` labels.
            ways: the number of classes (default: the space's outputs).

        Returns:
            ``head.w (B, ways, C)`` and ``head.b (B, ways)``.
        """
        protos = class_means(feats, y, ways or self.space.task.outputs)
        scale = self.proto_scale.exp()
        return 2.0 * scale * protos, -scale * protos.pow(2).sum(-1)

    @property
    def any_ways(self) -> bool:
        """Whether the classifier serves any number of classes (a prototype head, or an
        episodic head with nothing learned per class)."""
        return self.kind == "classification" and (self.proto or (self.head is not None and self.head.any_ways))

    def predict(self, alpha: Tensor, params: Mapping[str, Tensor], x: Tensor, strategy: str = "loop") -> Tensor:
        """Batched supernet outputs ``(B, N, out)``."""
        return run(self.plan, alpha, params, x, fused=self.config.fused, strategy=strategy)

    def predict_query(self, alpha: Tensor, params: Mapping[str, Tensor], episode, strategy: str = "loop") -> Tensor:
        """Batched supernet outputs on ``episode``'s query sets: ``predict``, or with an
        episodic head the head's logits from the support and query features."""
        if self.head is None:
            return self.predict(alpha, params, episode.query_x, strategy)
        def feats(x: Tensor) -> Tensor:
            return run(self.plan, alpha, params, x, fused=self.config.fused, strategy=strategy, features=True)
        return self.head(feats(episode.support_x), episode.support_y, feats(episode.query_x), self.space.task.outputs)

    def adapt(self, gen: Generated, x: Tensor, y: Tensor, steps: int, *, create_graph: bool, strategy: str = "loop", temperature: float = 1.0, checkpoint: bool = False, prox: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``steps`` inner SGD steps (``sgd``) on the support sets of all tasks at once.

        With ``create_graph`` the steps stay differentiable (second order); without, they
        are added to the generated weights as constants, so the outer gradient reaches
        the generators unchanged (first order). With ``adapt_alpha`` the architecture
        logits take steps too, of size ``alpha_lr``. ``checkpoint``: recompute each
        second-order step in the backward pass instead of keeping its activations (see
        ``sgd``). ``prox`` (default ``config.prox``): each task's support loss gets
        ``prox / 2 * |w - w0|^2``, the distance of its weights from the generated ones
        ``w0`` (iMAML's proximal term). Returns the (possibly adapted) op weights and the
        adapted weights.
        """
        prox = self.config.prox if prox is None else prox
        if self.head is not None and steps:
            raise ValueError(f"the {self.config.head} head compares queries with the support set; it has no inner loop (inner steps must be 0, got {steps})")
        adapt_alpha = self.config.adapt_alpha and gen.logits is not None
        start = dict(gen.params)
        if adapt_alpha:
            start[_LOGITS] = gen.logits
        # the differentiable tensors the steps read besides the adapted ones
        context = {"alpha": gen.alpha} if not adapt_alpha else {}
        if self.lrs is not None:
            context.update({f"lr:{k}": self.lrs[safe_name(k)] for k in gen.params})
        if prox:  # differentiated through with the steps (second order), else a constant
            context.update({f"w0:{k}": v if create_graph else v.detach() for k, v in gen.params.items()})

        def support_loss(p: dict[str, Tensor], c: dict[str, Tensor]) -> Tensor:
            p = dict(p)
            logits = p.pop(_LOGITS, None)
            a = self.arch.weights(logits, temperature) if adapt_alpha else c["alpha"]
            loss = task_loss(self.kind, self.predict(a, p, x, strategy), y)
            if prox:
                loss = loss + _proximal(p, {k: c[f"w0:{k}"] for k in p}, prox)
            return loss

        def lr(name: str, c: dict[str, Tensor]) -> Tensor | float:
            return self.config.alpha_lr if name == _LOGITS else c.get(f"lr:{name}", self.config.inner_lr)

        params = sgd(support_loss, start, steps, lr, create_graph=create_graph, context=context, checkpoint=checkpoint, rule=self.inner_rule)
        if not create_graph:
            params = {k: start[k] + (params[k] - start[k]).detach() for k in params}
        logits = params.pop(_LOGITS, None)
        return (self.arch.weights(logits, temperature) if adapt_alpha else gen.alpha), params


_LOGITS = "~alpha_logits"  # the architecture logits' key among the adapted tensors (no slot has it)

Loss = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]
StepSize = Callable[[str, dict[str, Tensor]], "Tensor | float"]


def sgd(loss: Loss, params: Mapping[str, Tensor], steps: int, lr: StepSize, *, create_graph: bool, context: Mapping[str, Tensor] | None = None, checkpoint: bool = False, rule: LSTMRule | None = None, after_step: Callable[[int, dict[str, Tensor]], None] | None = None) -> dict[str, Tensor]:
    """The inner loop of training and of evaluation: ``steps`` steps on ``loss`` from ``params``.

    ``loss(params, context)`` gives the support loss per task (``(B,)``, or a scalar for
    one task); the steps descend their sum. ``loss`` and ``lr(name, context)`` see
    ``context``: the tensors the steps read but do not adapt (the op weights, Meta-SGD
    step sizes), which the outer gradient reaches. Each step is SGD, ``v - lr * g``, or
    with ``rule`` the learned LSTM update (``inner.LSTMRule``), which also reads each
    task's loss and keeps a state per weight across the steps.

    ``create_graph=True``: differentiable steps (second-order MAML), taken with the
    PARTIAL derivatives with respect to each tensor even where one generated weight
    depends on another (the prototype head on the body): ``torch.autograd.grad`` with
    ``create_graph`` with respect to a fresh alias of each tensor (``_partials``), or
    ``torch.func.grad`` under ``torch.compile`` or another functorch transform. With
    ``checkpoint`` each such step keeps only its inputs and is recomputed in the backward
    pass (``_Recompute``): memory for the activations of one step instead of ``steps``,
    for one more forward per step; the meta-gradient is the same (not with ``rule``).
    ``create_graph=False``: steps from detached copies, taken with ``torch.autograd.grad``
    (nothing differentiates them again, so the backward runs native kernels); returns
    detached tensors, and ``after_step(i, params)`` (if given) sees the weights after each
    step ``i = 1..steps``. A tensor that does not reach the loss (every edge after it
    dropped) takes a zero step.
    """
    context = dict(context or {})
    if checkpoint and rule is not None:
        raise ValueError("checkpointed inner steps do not carry a learned rule's state; use one or the other")
    states: dict[str, Any] = {}

    def update(k: str, v: Tensor, g: Tensor, per_task: Tensor, c: dict[str, Tensor]) -> Tensor:
        if rule is None:
            return v - lr(k, c) * g
        task_loss_ = per_task.reshape(*per_task.shape, *([1] * (v.dim() - per_task.dim())))
        new, states[k] = rule.step(v, g, task_loss_, lr(k, c), states.get(k))
        return new

    if create_graph:
        grad_fn = torch.func.grad(lambda p, c: (lambda per: (per.sum(), per))(loss(p, c)), has_aux=True)

        def step(p: dict[str, Tensor], c: dict[str, Tensor]) -> dict[str, Tensor]:
            functional = FUNCTIONAL_INNER_GRAD or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            grads, per_task = grad_fn(p, c) if functional else _partials(loss, p, c)
            return {k: update(k, v, grads[k], per_task, c) for k, v in p.items()}

        params = dict(params)
        for _ in range(steps):
            params = _recomputed(step, params, context) if checkpoint else step(params, context)
        return params
    params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        for i in range(1, steps + 1):
            per_task = loss(params, context)
            grads = torch.autograd.grad(per_task.sum(), list(params.values()), allow_unused=True)
            with torch.no_grad():
                params = {k: (v if g is None else update(k, v, g, per_task, context)).detach().requires_grad_() for (k, v), g in zip(params.items(), grads)}
            if after_step is not None:
                after_step(i, {k: v.detach() for k, v in params.items()})
    return {k: v.detach() for k, v in params.items()}


# True: the differentiable inner steps take torch.func.grad everywhere (the reference that
# ``_partials`` is tested against).
FUNCTIONAL_INNER_GRAD = False


def _partials(loss: Loss, params: dict[str, Tensor], context: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """The partial derivatives of ``loss(params, context).sum()`` with respect to each of
    ``params``, themselves differentiable, and the per-task loss: what
    ``torch.func.grad(..., has_aux=True)`` gives, with ``torch.autograd.grad``.

    Each tensor is replaced by a fresh alias (a view of itself, or a leaf where it needs
    no gradient), so that the derivative with respect to one counts only the paths from
    that alias: where one weight was computed from another, the path through the other
    is not its. The same values and graph as ``torch.func.grad``, without its functorch
    dispatch of every op and every custom autograd Function, which costs a few
    milliseconds per task (docs/PERFORMANCE.md, ``bench_meta``'s ``ours_loop_func_grad``)."""
    create = torch.is_grad_enabled()  # as torch.func.grad: no graph of the gradients under no_grad
    with torch.enable_grad(), whole_stem():  # as under torch.func.grad: no chunked stem in a pass differentiated twice
        alias = {k: v.view_as(v) if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
        per_task = loss(alias, context)
        if not per_task.requires_grad:  # reaches none of them: zero gradients, as torch.func.grad gives
            return {k: torch.zeros_like(v) for k, v in params.items()}, per_task
        grads = torch.autograd.grad(per_task.sum(), list(alias.values()), create_graph=create, allow_unused=True)
    return {k: torch.zeros_like(params[k]) if g is None else g for k, g in zip(alias, grads)}, per_task


class _Recompute(torch.autograd.Function):
    """``fn(*inputs)`` whose graph is not kept: the backward pass runs ``fn`` again on the
    saved inputs and differentiates that. ``torch.utils.checkpoint`` does not serve here:
    its saved-tensor hooks are refused by ``torch.func.grad``, and its reentrant form by
    ``torch.autograd.grad``, which the trainer calls."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., tuple[Tensor, ...]], *inputs: Tensor) -> tuple[Tensor, ...]:
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        return tuple(t.detach() for t in fn(*inputs))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        with torch.enable_grad():
            outs = ctx.fn(*inputs)
        wrt = [t for t in inputs if t.requires_grad]
        got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True))
        return (None, *(next(got) if t.requires_grad else None for t in inputs))


def _recomputed(step: Callable[[dict[str, Tensor], dict[str, Tensor]], dict[str, Tensor]], params: dict[str, Tensor], context: dict[str, Tensor]) -> dict[str, Tensor]:
    """``step(params, context)`` through ``_Recompute``."""
    pk, ck = list(params), list(context)

    def flat(*tensors: Tensor) -> tuple[Tensor, ...]:
        out = step(dict(zip(pk, tensors[: len(pk)])), dict(zip(ck, tensors[len(pk) :])))
        return tuple(out[k] for k in pk)

    return dict(zip(pk, _Recompute.apply(flat, *params.values(), *context.values())))


def _task_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Per task, the dot product of two sets of per-task tensors ``(B, ...)``: ``(B,)``."""
    return sum((a[k] * b[k]).flatten(1).sum(1) for k in a)


def _proximal(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], prox: float) -> Tensor:
    """The proximal term ``prox / 2 * |w - w0|^2`` per task ``(B,)`` of per-task weights
    ``(B, ...)`` and their anchor (the inner loops of training and evaluation)."""
    away = {k: v - anchor[k] for k, v in params.items()}
    return 0.5 * prox * _task_dot(away, away)


def _conjugate_gradient(apply: Callable[[dict[str, Tensor]], dict[str, Tensor]], rhs: dict[str, Tensor], steps: int) -> dict[str, Tensor]:
    """``steps`` conjugate-gradient iterations for ``A x = rhs`` from ``x = 0``, every task
    its own system (``apply`` is ``x -> A x`` for all tasks at once, A block-diagonal by
    task). A task whose residual vanished, or whose search direction meets non-positive
    curvature (``A`` need not be positive definite away from a minimum), stops where it
    is; one that stops before its first step keeps ``rhs`` (``A`` taken as the identity:
    the first-order answer) rather than 0."""
    x = {k: torch.zeros_like(v) for k, v in rhs.items()}
    r = dict(rhs)
    p = dict(rhs)
    rr = _task_dot(r, r)
    moved = torch.zeros_like(rr, dtype=torch.bool)
    for _ in range(steps):
        ap = apply(p)
        pap = _task_dot(p, ap)
        ok = (pap > 0) & (rr > 0)
        moved = moved | ok
        step = torch.where(ok, rr / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x = {k: x[k] + _per_task(step, x[k]) * p[k] for k in x}
        r = {k: r[k] - _per_task(step, r[k]) * ap[k] for k in r}
        rr_new = _task_dot(r, r)
        beta = torch.where(ok, rr_new / torch.where(ok, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = {k: r[k] + _per_task(beta, p[k]) * p[k] for k in p}
        rr = rr_new
    return {k: torch.where(_per_task(moved, x[k]), x[k], rhs[k]) for k in x}


def _per_task(s: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` scalars shaped to broadcast against ``like`` ``(B, ...)``."""
    return s.reshape(-1, *([1] * (like.dim() - 1)))


def _implicit_term(model: MetaNet, gen: Generated, alpha: Tensor, adapted: dict[str, Tensor], objective: Tensor, episode, prox: float, cg_steps: int, strategy: str) -> Tensor:
    """A term of value 0 whose gradient with respect to the generated weights ``w0`` is the
    implicit meta-gradient of iMAML (Rajeswaran et al., 2019): ``(I + H / prox)^-1 g``
    per task, with ``g`` the gradient of ``objective`` at the adapted weights and ``H`` the
    Hessian of the task's support loss there, solved by ``cg_steps`` conjugate-gradient
    steps on Hessian-vector products. Exact where the adapted weights minimise the
    proximal inner problem; its memory is one support forward's double-backward graph,
    whatever the number of inner steps."""
    names = [k for k in adapted if adapted[k].requires_grad]
    wrt = [adapted[k] for k in names]
    g = torch.autograd.grad(objective, wrt, retain_graph=True, allow_unused=True)
    rhs = {k: torch.zeros_like(w) if d is None else d.detach() for k, w, d in zip(names, wrt, g)}
    support = task_loss(model.kind, model.predict(alpha.detach(), adapted, episode.support_x, strategy), episode.support_y).sum()
    first = torch.autograd.grad(support, wrt, create_graph=True, allow_unused=True)
    used = [i for i, d in enumerate(first) if d is not None and d.requires_grad]

    def apply(v: dict[str, Tensor]) -> dict[str, Tensor]:  # (I + H / prox) v
        hv = torch.autograd.grad([first[i] for i in used], [wrt[i] for i in used], [v[names[i]] for i in used], retain_graph=True, allow_unused=True) if used else ()
        out = dict(v)
        for i, h in zip(used, hv):
            if h is not None:
                out[names[i]] = v[names[i]] + h / prox
        return out

    v = _conjugate_gradient(apply, rhs, cg_steps)
    term = sum((gen.params[k] * v[k]).sum() for k in names if gen.params[k].requires_grad)
    return term - term.detach() if isinstance(term, Tensor) else objective.new_zeros(())


def meta_loss(model: MetaNet, episode, *, inner_steps: int, order: str = "second", beta: float = 1e-3, entropy_weight: float = 0.0, temperature: float = 1.0, gumbel: bool = False, hard: bool = False, strategy: str = "loop", generator: torch.Generator | None = None, op_dropout: float = 0.0, param_prior: float = 0.0, checkpoint: bool = False, prox: float | None = None, cg_steps: int = 5) -> tuple[Tensor, dict[str, float]]:
    """The outer objective for one meta-batch, and its metrics: ``MetaNet.generate`` (drawing
    the VAE, Gumbel and op-dropout noise from ``generator``), then ``outer_loss``."""
    gen = model.generate(episode.support_x, episode.support_y, episode.metadata, temperature=temperature, gumbel=gumbel, hard=hard, sample=model.config.weights == "vae", generator=generator, strategy=strategy, op_dropout=op_dropout)
    return outer_loss(model, gen, episode, inner_steps=inner_steps, order=order, beta=beta, entropy_weight=entropy_weight, temperature=temperature, strategy=strategy, param_prior=param_prior, checkpoint=checkpoint, prox=prox, cg_steps=cg_steps)


def outer_loss(model: MetaNet, gen: Generated, episode, *, inner_steps: int, order: str = "second", beta: float = 1e-3, entropy_weight: float = 0.0, temperature: float = 1.0, strategy: str = "loop", param_prior: float = 0.0, checkpoint: bool = False, prox: float | None = None, cg_steps: int = 5) -> tuple[Tensor, dict[str, float]]:
    """The outer objective of generated networks ``gen`` for ``episode``'s tasks.

    ``second``: backpropagate through the inner steps. ``first``: treat the inner gradients
    as constants. ``reptile``: a surrogate whose gradient with respect to the initial
    weights is ``theta_0 - theta_k`` (averaged over tasks). ``implicit`` (iMAML): the inner
    steps descend the support loss plus ``prox / 2 * |w - w0|^2`` without a graph, and the
    generated weights ``w0`` get the implicit gradient ``(I + H / prox)^-1 g`` (``cg_steps``
    conjugate-gradient steps; ``_implicit_term``); the op weights get the query loss's
    direct gradient only, not their effect through the adapted weights. ``prox`` (default
    the model's ``ModelConfig.prox``, which evaluation adapts with too) adds the proximal
    term to the other orders' inner loops as well. ``param_prior`` weighs the
    share of the tempered architecture softmax on parameter-free ops (a prior against
    the collapse to ops that need no training); ``entropy_weight`` its mean edge entropy.
    ``checkpoint``: recompute each second-order inner step in the backward pass (memory
    of one step's activations, not ``inner_steps``'; ``sgd``).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    prox = model.config.prox if prox is None else prox
    if order == "implicit" and not prox > 0:
        raise ValueError(f"order implicit needs a proximal term prox > 0 (iMAML's lambda), got {prox!r}")
    alpha, adapted = model.adapt(gen, episode.support_x, episode.support_y, inner_steps, create_graph=order == "second", strategy=strategy, temperature=temperature, checkpoint=checkpoint, prox=prox)
    b = episode.support_x.shape[0]
    if order == "reptile":
        with torch.no_grad():
            pred = model.predict_query(alpha, adapted, episode, strategy)
        objective = sum((p0 * (p0 - adapted[k]).detach()).sum() for k, p0 in gen.params.items()) / b
    elif order == "implicit":
        adapted = {k: v.detach().requires_grad_(gen.params[k].requires_grad) for k, v in adapted.items()}
        pred = model.predict_query(alpha, adapted, episode, strategy)
        objective = task_loss(model.kind, pred, episode.query_y).mean()
        objective = objective + _implicit_term(model, gen, alpha, adapted, objective, episode, prox, cg_steps, strategy)
    else:
        pred = model.predict_query(alpha, adapted, episode, strategy)
        objective = task_loss(model.kind, pred, episode.query_y).mean()
    query = task_loss(model.kind, pred.detach(), episode.query_y).mean()
    # Entropy and parameter-free share of the tempered softmax of the logits, not of
    # gen.alpha: with --hard (or a hard Gumbel sample) gen.alpha is one-hot in value,
    # whose entropy is 0 whatever the logits.
    soft = torch.softmax(gen.logits / temperature, -1) if gen.logits is not None else None
    ent = model.arch.entropy(soft).mean() if soft is not None else gen.kl.new_zeros(())
    free = model.arch.param_free_share(soft).mean() if soft is not None else gen.kl.new_zeros(())
    loss = objective + beta * gen.kl.mean() + entropy_weight * ent + param_prior * free
    metrics = {
        "loss": float(loss.detach()),
        "query_loss": float(query),
        "kl": float(gen.kl.detach().mean()),
        "entropy": float(ent.detach()),
        "param_free": float(free.detach()),
        "metric": float(task_metric(model.kind, pred.detach(), episode.query_y).mean()),
    }
    return loss, metrics


# --------------------------------------------------------------------- evaluation path


def adapt_discrete(plan: Plan, genotype: Genotype, params: Mapping[str, Tensor], x: Tensor, y: Tensor, steps: int, lr: Callable[[str], Tensor | float], kind: str, rule: LSTMRule | None = None, after_step: Callable[[int, dict[str, Tensor]], None] | None = None, prox: float = 0.0, anchor: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``steps`` SGD steps (``sgd``, the training inner loop's routine) of one task's
    discrete network on ``(x, y)``; returns new weights (``after_step``: as ``sgd``). Where
    every edge into a cell was dropped, the weights before it do not reach the output, and
    their step is zero. ``prox``: the loss gets ``prox / 2 * |w - w0|^2`` as in training
    (``MetaNet.adapt``), ``w0`` the weights ``anchor`` (default ``params``: the generated
    ones when adapting from them)."""
    w0 = {k: v.detach()[None] for k, v in (params if anchor is None else anchor).items()} if prox else {}  # a task dimension of 1

    def loss(p: dict[str, Tensor], c: dict[str, Tensor]) -> Tensor:
        out = task_loss(kind, forward_genotype(plan, genotype, p, x), y)
        if prox:
            out = out + _proximal({k: v[None] for k, v in p.items()}, w0, prox)[0]
        return out

    return sgd(loss, params, steps, lambda name, c: lr(name), create_graph=False, rule=rule, after_step=after_step)


@dataclass
class TaskNetwork:
    """One task's generated discrete network: genotype, weights, soft encoding, latent."""

    genotype: Genotype
    params: dict[str, Tensor]  # only the slots the genotype uses, no task dimension
    alpha: Tensor  # (edges, ops)
    latent: Tensor | None
    embedding: Tensor


def generate_networks(model: MetaNet, episode, *, sample: bool = False, ways: int | None = None) -> list[TaskNetwork]:
    """Generate each task's discrete network (architecture by the space's rule + weights).

    ``ways``: classification tasks' number of classes, where it differs from the space's
    outputs; only a prototype head or an episodic head without per-class weights serves
    any number (``MetaNet.check_ways``).
    """
    if ways is not None:
        model.check_ways(ways)
    with torch.no_grad():
        gen = model.generate(episode.support_x, episode.support_y, episode.metadata, sample=sample, proto_head=False, ways=ways)
    out = []
    for b in range(gen.alpha.shape[0]):
        g = discretise(model.space, gen.alpha[b])
        params = {k: gen.params[k][b].detach() for k in model.plan.slot_names(g)}
        if model.proto:  # prototypes of the discrete network's own features
            with torch.no_grad():
                feats = forward_genotype(model.plan, g, params, episode.support_x[b], features=True)
                w, bias = model.proto_head(feats[None], episode.support_y[b][None], ways)
            params["head.w"], params["head.b"] = w[0], bias[0]
        out.append(TaskNetwork(g, params, gen.alpha[b].detach(), None if gen.latent is None else gen.latent[b].detach(), gen.embedding[b].detach()))
    return out


def evaluate_task(model: MetaNet, net: TaskNetwork, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, steps: int, anchor: Mapping[str, Tensor] | None = None) -> tuple[float, dict[str, Tensor]]:
    """Adapt one generated network ``steps`` steps on its support set and score the query set.

    The steps descend the support loss plus the model's proximal term
    (``ModelConfig.prox``) towards ``anchor``, the generated weights (default
    ``net.params``; give them when ``net`` holds weights already adapted some steps).
    Returns the query metric (accuracy or MSE) and the adapted weights. An episodic head
    (``heads.py``) has no inner loop: it classifies the queries from the support set's
    features, whatever ``steps``.
    """
    if model.head is not None:
        with torch.no_grad():
            # support and query apart, as in training (a batch norm's statistics are per set)
            sf, qf = (forward_genotype(model.plan, net.genotype, net.params, x, features=True) for x in (support_x, query_x))
            pred = model.head(sf[None], support_y[None], qf[None], int(support_y.max()) + 1)
        return float(task_metric(model.kind, pred, query_y[None])[0]), net.params
    params = adapt_discrete(model.plan, net.genotype, net.params, support_x, support_y, steps, model.step_size, model.kind, model.inner_rule, prox=model.config.prox, anchor=anchor)
    return _query_metric(model, net.genotype, params, query_x, query_y), params


def _query_metric(model: MetaNet, genotype: Genotype, params: Mapping[str, Tensor], query_x: Tensor, query_y: Tensor) -> float:
    """One task's query metric (accuracy or MSE) of its discrete network with ``params``."""
    with torch.no_grad():
        pred = forward_genotype(model.plan, genotype, params, query_x)
    return float(task_metric(model.kind, pred[None], query_y[None])[0])


def evaluate(model: MetaNet, episodes, steps: int | Sequence[int]) -> dict:
    """Mean query metric over episodes with a 95% confidence interval, via ``evaluate_task``.

    ``steps`` an int: ``{"mean", "ci95", "n"}`` after that many inner steps. A sequence of
    step counts: ``{k: {"mean", "ci95", "n"}}``, from one pass per task that adapts on
    from one count to the next (SGD steps are sequential, so each entry equals what
    ``evaluate(model, episodes, k)`` gives) instead of one pass per count; with a learned
    update rule (``inner.LSTMRule``), whose state lives within one adaptation, one
    adaptation to the largest count scores the queries after each count on the way
    (``_scores_along``), which equals adapting each count from the generated weights.
    """
    ks = [steps] if isinstance(steps, int) else sorted(set(steps))
    scores: dict[int, list[float]] = {k: [] for k in ks}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for ep in episodes:
        ep = ep.to(device)  # fixed episodes are built on the CPU; the model may be on a GPU
        # a prototype head takes the episode's own number of classes (any N-way)
        ways = int(ep.support_y.max()) + 1 if model.any_ways else None
        for b, net in enumerate(generate_networks(model, ep, ways=ways)):
            if model.head is None and model.inner_rule is not None:
                for k, score in _scores_along(model, net, ep.support_x[b], ep.support_y[b], ep.query_x[b], ep.query_y[b], ks).items():
                    scores[k].append(score)
                continue
            done, generated = 0, net.params
            for k in ks:
                score, params = evaluate_task(model, net, ep.support_x[b], ep.support_y[b], ep.query_x[b], ep.query_y[b], k - done, anchor=generated)
                scores[k].append(score)
                if model.head is not None:  # no inner loop: the same score at every step count
                    scores.update({j: scores[j] + [score] for j in ks if j != k})
                    break
                net, done = dataclasses.replace(net, params=params), k
    model.train(was_training)
    out = {k: _summary(v) for k, v in scores.items()}
    return out[steps] if isinstance(steps, int) else out


def _scores_along(model: MetaNet, net: TaskNetwork, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """The query metric after each of the step counts ``ks`` of one adaptation with the
    model's learned update rule: what ``evaluate_task`` gives at each count alone (the rule
    is causal: its first k steps do not depend on later ones), for the steps of the largest."""
    def score(params: Mapping[str, Tensor]) -> float:
        return _query_metric(model, net.genotype, params, query_x, query_y)

    out = {0: score(net.params)} if 0 in ks else {}
    keep = set(ks)
    adapt_discrete(model.plan, net.genotype, net.params, support_x, support_y, max(ks), model.step_size, model.kind, model.inner_rule,
                   after_step=lambda i, p: out.update({i: score(p)}) if i in keep else None, prox=model.config.prox)  # fmt: skip
    return out


def _summary(scores: list[float]) -> dict[str, float]:
    """Mean, 95% CI half-width and count; ``nonfinite`` counts diverged tasks (inf/NaN metric)."""
    t = torch.tensor(scores, dtype=torch.float64)
    ci = 1.96 * t.std().item() / math.sqrt(len(scores)) if len(scores) > 1 else float("nan")
    return {"mean": t.mean().item(), "ci95": ci, "n": len(scores), "nonfinite": int((~torch.isfinite(t)).sum())}
