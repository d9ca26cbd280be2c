"""Generate a task's discrete network: a plain ``nn.Module``, its genotype and its weights.

``generate(run_or_model, support_x, support_y)`` runs the trained generators on ONE task's
support set (no task dimension), discretises the architecture by the space's rule and
materialises the result as a ``DiscreteNetwork``: an ``nn.Module`` holding exactly the
genotype's weights as parameters, whose ``forward`` is ``executor.forward_genotype``.
No generator code is needed to run, fine-tune, save, reload or export it.

Generation is ``meta.generate_networks`` and optional adaptation is ``meta.adapt_discrete``
with the model's step sizes and proximal term, exactly as ``meta.evaluate_task`` calls it:
the network a user gets is the network that validation scores.

A saved network is a folder (``GeneratedNetwork.save``, written whole or not at all)::

    genotype.json         the architecture (graph.Genotype JSON)
    weights.safetensors   the module's state_dict (names: slot names with '.' -> '__')
    space.yaml            the search space text
    network.json          space name, kind, input, outputs, soft encoding, latent, timings
    model.pt2             the module as a torch.export program (any batch size)
    graph.json, graph.graphml, graph.dot, graph.png   the architecture as a graph
    alpha.txt, summary.txt                            the soft encoding; a summary

``space.yaml`` is the text of the space as written; a run may have resized its classifier
to ``ways`` outputs, which ``network.json`` records and ``load_generated`` applies.

Per-task batch norm (``norm: batch``) normalises with the statistics of the batch it is
given (transductive, as in the inner loop), so predictions depend on the batch: feed a
whole query set at once, not single examples.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .compile import clock
from .executor import Plan, compile, forward_genotype
from .generators import safe_name
from .graph import Genotype
from .meta import MetaNet, TaskNetwork, adapt_discrete, generate_networks, task_loss, task_metric
from .space import SearchSpace, loads
from .tasks import Episode

__all__ = [
    "GenerateError",
    "ProductWarning",
    "DiscreteNetwork",
    "GeneratedNetwork",
    "generate",
    "generate_batch",
    "load_generated",
    "check_support",
    "read_network_info",
    "space_for",
    "FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "metanet.generated"
FORMAT_VERSION = 1
OPTIMIZERS = ("sgd", "adam")


class ProductWarning(UserWarning):
    """A part of a network product that could not be written (the rest was)."""


class GenerateError(ValueError):
    """Bad input to ``generate`` or a saved network that cannot be read; one line."""


# ------------------------------------------------------------------------------ module


class DiscreteNetwork(nn.Module):
    """A discrete network of a search space as a plain ``nn.Module``.

    Holds only the weights ``plan.slot_names(genotype)`` names, as parameters called
    ``safe_name(slot)`` (``cells.0.e0_1.conv_3x3.w`` -> ``cells__0__e0_1__conv_3x3__w``).

    Args:
        plan: the compiled space.
        genotype: the architecture (validated against the space).
        params: ``{slot: tensor}`` without a task dimension; may hold more slots than used.
    """

    def __init__(self, plan: Plan, genotype: Genotype, params: Mapping[str, Tensor]):
        super().__init__()
        genotype.validate(plan.space)
        self.plan, self.genotype = plan, genotype
        self.slots = tuple(plan.slot_names(genotype))
        shapes = plan.shapes()
        for name in self.slots:
            value = params[name]  # a missing weight is a KeyError naming it
            if tuple(value.shape) != shapes[name]:
                raise GenerateError(f"weight {name} has shape {tuple(value.shape)}, expected {shapes[name]}")
            self.register_parameter(safe_name(name), nn.Parameter(value.detach().clone()))

    def weights(self) -> dict[str, Tensor]:
        """``{slot name: parameter}``, the form ``executor.forward_genotype`` reads."""
        return {name: getattr(self, safe_name(name)) for name in self.slots}

    def forward(self, x: Tensor) -> Tensor:
        """Outputs ``(N, outputs)`` for inputs ``(N, *input)``."""
        return forward_genotype(self.plan, self.genotype, self.weights(), x)

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"space={self.plan.space.name!r}, ops={len(self.genotype.ops())}, weights={n}"


# --------------------------------------------------------------------------- the product


class GeneratedNetwork:
    """One task's generated network: module, genotype, soft encoding, latent, timings.

    Attributes:
        module: the ``DiscreteNetwork`` (fine-tune, save or export it like any module).
        genotype: its architecture.
        alpha: the soft encoding ``(edges, ops)`` it was discretised from.
        latent: the VAE latent ``(latent,)`` (None without a weight generator).
        embedding: the task embedding ``(dim,)`` (None for a reloaded network).
        space: the search space (with the run's number of outputs).
        generation_ms: encode + generate + discretise + materialise, in milliseconds.
        adapt_steps: inner-loop steps applied after generation.
        adapt_ms: time of those steps, in milliseconds.
    """

    def __init__(self, module: DiscreteNetwork, alpha: Tensor, latent: Tensor | None = None, embedding: Tensor | None = None, *, generation_ms: float = float("nan"), adapt_steps: int = 0, adapt_ms: float = 0.0, metadata: int | None = None, example_x: Tensor | None = None):
        self.module = module
        self.alpha, self.latent, self.embedding = alpha, latent, embedding
        self.generation_ms, self.adapt_steps, self.adapt_ms = generation_ms, adapt_steps, adapt_ms
        self.metadata = metadata
        self.example_x = example_x  # (N, *input): a support set, the default export example

    @property
    def genotype(self) -> Genotype:
        return self.module.genotype

    @property
    def space(self) -> SearchSpace:
        return self.module.plan.space

    @property
    def kind(self) -> str:
        return self.space.task.kind

    def __repr__(self) -> str:
        return f"GeneratedNetwork(space={self.space.name!r}, ops={self.genotype.ops()}, params={self.num_params()}, generation_ms={self.generation_ms:.2f})"

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(x)

    def num_params(self) -> int:
        """Number of weights of the module."""
        return sum(p.numel() for p in self.module.parameters())

    def graph(self) -> nx.DiGraph:
        """The discrete network as a networkx DiGraph (``export.genotype_graph``)."""
        from .export import genotype_graph

        return genotype_graph(self.space, self.genotype)

    def soft_graph(self) -> nx.DiGraph:
        """The soft encoding as a networkx DiGraph (``export.soft_graph``)."""
        from .export import soft_graph

        return soft_graph(self.space, self.alpha)

    def loss(self, x: Tensor, y: Tensor) -> float:
        """Mean loss (cross-entropy or MSE) of the module on ``(x, y)``, without gradients."""
        x, y = check_support(self.space, x, y, like=self._weight())
        with torch.no_grad():
            return float(task_loss(self.kind, self.module(x)[None], y[None])[0])

    def metric(self, x: Tensor, y: Tensor) -> float:
        """Accuracy (classification) or MSE (regression) of the module on ``(x, y)``."""
        x, y = check_support(self.space, x, y, like=self._weight())
        with torch.no_grad():
            return float(task_metric(self.kind, self.module(x)[None], y[None])[0])

    def finetune(self, x: Tensor, y: Tensor, steps: int, lr: float, optimizer: str = "sgd") -> list[float]:
        """Full-batch fine-tuning of ``module`` with a plain torch optimizer.

        Args:
            x: ``(N, *input)``.
            y: ``(N,)`` class ids, or ``(N,)`` / ``(N, outputs)`` regression targets.
            steps: optimizer steps.
            lr: learning rate.
            optimizer: ``sgd`` or ``adam``.

        Returns:
            The loss before each step, then the loss after the last (``steps + 1`` values).
        """
        if optimizer not in OPTIMIZERS:
            raise GenerateError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if not (isinstance(steps, int) and steps >= 0):
            raise GenerateError(f"steps must be an integer >= 0, got {steps!r}")
        if not (lr > 0 and math.isfinite(lr)):
            raise GenerateError(f"lr must be a positive number, got {lr!r}")
        x, y = check_support(self.space, x, y, like=self._weight())
        params = list(self.module.parameters())
        opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
        losses = []
        for _ in range(steps):
            loss = task_loss(self.kind, self.module(x)[None], y[None])[0]
            losses.append(float(loss.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses.append(self.loss(x, y))
        return losses

    def summary(self, x: Tensor | None = None) -> str:
        """A few lines: space, ops, weights, FLOPs per sample, generation and adaptation time."""
        task = self.space.task
        counts: dict[str, int] = {}
        for op in self.genotype.ops():
            counts[op] = counts.get(op, 0) + 1
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"
        x = self._example(x)
        lines = [
            f"space: {self.space.name} ({task.kind}, input {list(task.input)}, {task.outputs} outputs)",
            f"ops: {len(self.genotype.ops())} kept edges: {ops}",
            f"parameters: {self.num_params()}",
            f"FLOPs per sample: {self.flops_per_sample(x):.0f} (forward, batch of {x.shape[0]})",
            f"generation time: {self.generation_ms:.2f} ms (encode + generate + discretise + materialise)",
            f"adaptation: {self.adapt_steps} steps" + (f", {self.adapt_ms:.2f} ms" if self.adapt_steps else ""),
        ]
        if self.metadata is not None:
            lines.append(f"metadata: family {self.metadata}")
        return "\n".join(lines)

    def flops_per_sample(self, x: Tensor | None = None) -> float:
        """Forward FLOPs per input sample (``FlopCounterMode`` on the module, batch ``x``)."""
        from torch.utils.flop_counter import FlopCounterMode

        x = self._example(x)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            self.module(x)
        return fc.get_total_flops() / x.shape[0]

    def _weight(self) -> Tensor:
        return next(self.module.parameters())

    def _example(self, x: Tensor | None) -> Tensor:
        if x is not None:
            return x
        if self.example_x is not None:
            return self.example_x
        return torch.randn(4, *self.space.task.input, generator=torch.Generator().manual_seed(0)).to(self._weight())

    # ---------------------------------------------------------------- save and export

    def network_info(self) -> dict[str, Any]:
        """The contents of ``network.json``."""
        task = self.space.task
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "space_name": self.space.name,
            "kind": task.kind,
            "input": list(task.input),
            "outputs": task.outputs,
            "alpha": self.alpha.detach().cpu().tolist(),
            "latent": None if self.latent is None else self.latent.detach().cpu().tolist(),
            "metadata": self.metadata,
            "adapt_steps": self.adapt_steps,
            "generation_ms": self.generation_ms if math.isfinite(self.generation_ms) else None,
            "params": self.num_params(),
        }

    def save(self, folder: str | Path, *, support_y: Tensor | None = None, about: Mapping[str, str] | None = None, replace: bool = False) -> Path:
        """Write the whole network product to ``folder`` at once.

        The files: ``genotype.json``, ``weights.safetensors``, ``space.yaml`` and
        ``network.json`` (what ``load_generated`` reads), ``model.pt2`` (``torch.export``,
        any batch size), ``graph.json``, ``graph.graphml``, ``graph.dot``, ``graph.png``
        (with matplotlib), ``alpha.txt`` (the soft encoding) and ``summary.txt``. They are
        written into a temporary sibling folder that is then renamed to ``folder``: a
        reader finds the old product or the whole new one, never a part of one, and after
        an error the old folder is back and no temporary one is left (a process killed
        between the two renames leaves the old folder as ``.NAME.old-PID`` beside it).

        A ``torch.export`` failure or a missing matplotlib does not lose the rest: the file
        is left out, ``summary.txt`` says why, and a ``ProductWarning`` is issued.

        Args:
            folder: the product folder: created, or replaced if it is empty or holds a
                saved network (``network.json``); any other folder only with ``replace``.
            support_y: the support targets of ``example_x``; ``summary.txt`` then gives
                the network's support loss and metric.
            about: leading ``key: value`` lines of ``summary.txt`` (e.g. the run).
            replace: replace ``folder`` whatever it holds.

        Raises:
            GenerateError: ``folder`` is a file, or a non-empty folder that is not a saved
                network, without ``replace``.
        """
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise GenerateError(f"{folder} is a file; give a folder for the network")
        if not replace and folder.is_dir() and any(folder.iterdir()) and not (folder / "network.json").is_file():
            raise GenerateError(f"{folder} is not empty and holds no saved network; give replace=True to replace it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            self._write_product(tmp, support_y, about or {})
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not folder.exists():
                os.replace(old, folder)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return folder

    def _write_product(self, folder: Path, support_y: Tensor | None, about: Mapping[str, str]) -> None:
        from . import export as ex
        from .draw import draw_genotype_png

        ckpt.atomic_write_bytes(folder / "genotype.json", (self.genotype.to_json() + "\n").encode())
        ckpt.save_weights(folder / "weights.safetensors", self.module.state_dict(), {"format": FORMAT, "space": self.space.name})
        ckpt.atomic_write_bytes(folder / "space.yaml", self.space.text.encode())
        ckpt.atomic_write_bytes(folder / "network.json", (json.dumps(self.network_info(), indent=1, sort_keys=True) + "\n").encode())
        exported = "model.pt2 (torch.export, any batch size)"
        try:
            self.export(folder / "model.pt2")
        except Exception as e:  # noqa: BLE001 -- an export limitation must not lose the rest
            exported = f"model.pt2 not written: torch.export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            warnings.warn(exported, ProductWarning, stacklevel=3)
        g = self.graph()
        ckpt.atomic_write_bytes(folder / "graph.json", (ex.to_json(g) + "\n").encode())
        ex.to_graphml(g, folder / "graph.graphml")
        ckpt.atomic_write_bytes(folder / "graph.dot", ex.to_dot(g).encode())
        png = "graph.png"
        try:
            draw_genotype_png(self.space, self.genotype, folder / "graph.png")
        except ImportError:
            png = "graph.png not drawn (needs matplotlib: pip install 'metanet[plot]')"
        ckpt.atomic_write_bytes(folder / "alpha.txt", (ex.describe_soft(self.space, self.alpha) + "\n").encode())
        lines = [f"{k}: {v}" for k, v in about.items()]
        lines.append(self.summary())
        if support_y is not None and self.example_x is not None:
            x = self.example_x
            lines.append(f"support {'accuracy' if self.kind == 'classification' else 'mse'}: {self.metric(x, support_y):.6g} (loss {self.loss(x, support_y):.6g})")
        lines += [f"files: genotype.json, weights.safetensors, space.yaml, network.json, {exported}, graph.json, graph.graphml, graph.dot, {png}, alpha.txt, summary.txt", "", ex.describe_genotype(self.space, self.genotype)]
        ckpt.atomic_write_bytes(folder / "summary.txt", ("\n".join(lines) + "\n").encode())

    def export(self, path: str | Path, example_x: Tensor | None = None, *, dynamic_batch: bool = True) -> Path:
        """Write the module as a ``torch.export`` program (``model.pt2``) to ``path``.

        The file loads with ``torch.export.load`` and runs with torch alone. With
        ``dynamic_batch`` the batch size is symbolic (any size); otherwise it is fixed to
        the example's. Like the module, a space with per-task batch norm (``norm: batch``)
        normalises over the batch it is given: feed whole sets, not single examples.

        Args:
            path: the ``.pt2`` file.
            example_x: example inputs ``(N, *input)``; default the support set.
            dynamic_batch: export a symbolic batch dimension.
        """
        program = self.exported_program(example_x, dynamic_batch=dynamic_batch)
        buf = io.BytesIO()
        torch.export.save(program, buf)
        ckpt.atomic_write_bytes(path, buf.getvalue())
        return Path(path)

    def exported_program(self, example_x: Tensor | None = None, *, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
        """The ``torch.export.ExportedProgram`` that ``export`` saves, on the CPU (a network
        on a GPU is exported from a CPU copy, so that the program loads on any machine)."""
        x = self._example(example_x).detach()
        module = self.module
        if x.device.type != "cpu" or self._weight().device.type != "cpu":
            module, x = copy.deepcopy(module).cpu(), x.cpu()
        dynamic = None
        if dynamic_batch:
            dynamic = ({0: torch.export.Dim("batch", min=1)},)
        return torch.export.export(module, (x,), dynamic_shapes=dynamic)


# ------------------------------------------------------------------------------ inputs


def check_support(space: SearchSpace, x: Any, y: Any, *, tasks: bool = False, like: Tensor | None = None, any_ways: bool = False) -> tuple[Tensor, Tensor]:
    """Validate and convert a support set for ``space``.

    Args:
        space: the search space (its task kind, input shape and outputs).
        x: ``(N, *input)`` (``(T, N, *input)`` with ``tasks``), array-like.
        y: ``(N,)`` class ids or regression targets, or ``(N, outputs)`` targets
            (with ``tasks``: a leading ``T``).
        tasks: the arrays carry a leading task dimension.
        like: a weight of the network: inputs and targets take its dtype and device
            (default: float32 where ``x`` is).
        any_ways: classification by a head built from the support set's class prototypes
            (``MetaNet.any_ways``): any number of classes ``K >= 2``, ids ``0..K-1`` each
            with an example in every task, instead of the space's outputs.

    Returns:
        ``(x, y)``: float inputs and int64 class ids ``(.., N)`` or float targets
        ``(.., N, outputs)``.

    Raises:
        GenerateError: a shape, dtype, range or finiteness problem, in one line.
    """
    task = space.task
    lead = 2 if tasks else 1
    want = "(T, N, " if tasks else "(N, "
    want_x = want + ", ".join(map(str, task.input)) + ")"
    x = _tensor(x, "x")
    y = _tensor(y, "y")
    if x.dim() != lead + len(task.input) or tuple(x.shape[lead:]) != tuple(task.input):
        raise GenerateError(f"x has shape {tuple(x.shape)}; space '{space.name}' expects {want_x}")
    x = x.to(like.dtype) if like is not None else x.float()
    if min(x.shape[:lead]) < 1:
        raise GenerateError(f"x has shape {tuple(x.shape)}: the support set is empty")
    if not bool(torch.isfinite(x).all()):
        raise GenerateError("x holds NaN or infinite values")
    if tuple(y.shape[:lead]) != tuple(x.shape[:lead]):
        raise GenerateError(f"y has shape {tuple(y.shape)} but x has {tuple(x.shape)}: expected {want}) with the same leading size{'s' if tasks else ''}")
    if task.kind == "classification":
        if y.dim() != lead:
            raise GenerateError(f"y has shape {tuple(y.shape)}; classification expects class ids {want.rstrip(', ')})")
        if y.is_floating_point():
            if not bool(torch.isfinite(y).all()):
                raise GenerateError("y holds NaN or infinite values")
            if not bool((y == y.round()).all()):
                raise GenerateError("y must hold integer class ids, got fractional values")
        elif y.dtype == torch.bool:
            raise GenerateError("y must hold integer class ids, got booleans")
        y = y.long()
        if any_ways:
            _check_classes(y, tasks)
        else:
            bad = (y < 0) | (y >= task.outputs)
            if bool(bad.any()):
                raise GenerateError(f"y holds class id {int(y[bad][0])}; this network has {task.outputs} classes (ids 0 to {task.outputs - 1})")
    else:
        if y.dim() == lead:
            y = y[..., None]
        if y.dim() != lead + 1 or y.shape[-1] != task.outputs:
            raise GenerateError(f"y has shape {tuple(y.shape)}; space '{space.name}' expects {want.rstrip(', ')}) or {want}{task.outputs}) targets")
        y = y.to(x.dtype)
        if not bool(torch.isfinite(y).all()):
            raise GenerateError("y holds NaN or infinite values")
    if like is not None:
        x, y = x.to(like.device), y.to(like.device)
    return x.contiguous(), y.contiguous()


def _check_classes(y: Tensor, tasks: bool) -> None:
    """Class ids ``0..K-1`` (``K >= 2``), each with an example in every task's support set:
    a prototype head has one output per class, built from that class's examples."""
    if bool((y < 0).any()):
        raise GenerateError(f"y holds class id {int(y[y < 0][0])}; class ids start at 0")
    ways = int(y.max()) + 1
    if ways < 2:
        raise GenerateError("y holds one class; a task tells at least two classes apart")
    for t, row in enumerate(y.reshape(-1, y.shape[-1]).tolist()):
        absent = sorted(set(range(ways)) - set(row))
        if absent:
            where = f" of task {t}" if tasks else ""
            raise GenerateError(f"y{where} has no example of class {absent[0]}; the network's head is built from every class 0 to {ways - 1} of the support set")


def _tensor(v: Any, name: str) -> Tensor:
    if isinstance(v, Tensor):
        return v.detach()
    try:
        return torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError) as e:
        raise GenerateError(f"{name} is not a numeric array ({str(e).splitlines()[0]})") from None


def _metadata(model: MetaNet, metadata: Any, tasks: int) -> Tensor | None:
    """Family ids ``(T,)`` for the encoder, checked against the model's families."""
    if metadata is None:
        return None
    families = model.encoder.n_families if model.encoder.family is not None else 0
    if families == 0:
        raise GenerateError("this model was trained without task metadata; leave metadata out")
    m = _tensor(metadata, "metadata")
    if m.is_floating_point() and not bool((m == m.round()).all()):
        raise GenerateError("metadata must be integer family ids")
    m = m.long().reshape(-1)
    if m.numel() == 1 and tasks > 1:
        m = m.expand(tasks)
    if m.numel() != tasks:
        raise GenerateError(f"metadata has {m.numel()} ids for {tasks} tasks")
    bad = (m < -1) | (m >= families)
    if bool(bad.any()):
        raise GenerateError(f"metadata id {int(m[bad][0])} is out of range: this model knows families 0 to {families - 1} (-1: unknown)")
    return m.contiguous()


def _model(run_or_model: MetaNet | str | Path) -> MetaNet:
    if isinstance(run_or_model, MetaNet):
        return run_or_model
    from .trainer import load_run

    return load_run(run_or_model)[0]


def _weight(model: MetaNet) -> Tensor:
    """A generator weight: support sets take its dtype and device."""
    return next(model.parameters())


# ---------------------------------------------------------------------------- generate


def generate(run_or_model: MetaNet | str | Path, support_x: Any, support_y: Any, metadata: int | Tensor | None = None, adapt_steps: int = 0, sample: bool = False) -> GeneratedNetwork:
    """Generate the discrete network (architecture + weights) for one task.

    Args:
        run_or_model: a run directory (its ``best.pt``) or a ``MetaNet``.
        support_x: ``(N, *input)`` support inputs, no task dimension.
        support_y: ``(N,)`` class ids, or ``(N,)`` / ``(N, outputs)`` regression targets.
        metadata: the task's family id (models trained with metadata; -1: unknown).
        adapt_steps: inner-loop steps on the support set after generation, with the
            model's step sizes and proximal term (as ``meta.evaluate_task``).
        sample: draw the VAE latent (global torch RNG) instead of taking its mean.

    Returns:
        The ``GeneratedNetwork``; its ``generation_ms`` excludes loading and adaptation.
    """
    model = _model(run_or_model)
    x, y = check_support(model.space, support_x, support_y, like=_weight(model), any_ways=model.any_ways)
    meta = _metadata(model, metadata, 1)
    return _generate(model, x[None], y[None], meta, adapt_steps, sample)[0]


def generate_batch(run_or_model: MetaNet | str | Path, support_x: Any, support_y: Any, metadata: Any = None, adapt_steps: int = 0, sample: bool = False) -> list[GeneratedNetwork]:
    """``generate`` for T tasks at once: ``support_x`` is ``(T, N, *input)``, ``support_y`` ``(T, N[, out])``.

    The generators run batched over the tasks (``meta.generate_networks``), so the
    weights may differ from one-task ``generate`` in the last bits; each network's
    ``generation_ms`` is the batch's time divided by T. ``metadata``: one id per task,
    or one for all.
    """
    model = _model(run_or_model)
    x, y = check_support(model.space, support_x, support_y, tasks=True, like=_weight(model), any_ways=model.any_ways)
    return _generate(model, x, y, _metadata(model, metadata, x.shape[0]), adapt_steps, sample)


def _generate(model: MetaNet, x: Tensor, y: Tensor, meta: Tensor | None, adapt_steps: int, sample: bool) -> list[GeneratedNetwork]:
    """Checked support sets ``(T, N, ...)`` in, one network per task out."""
    if isinstance(adapt_steps, bool) or not (isinstance(adapt_steps, int) and adapt_steps >= 0):
        raise GenerateError(f"adapt_steps must be an integer >= 0, got {adapt_steps!r}")
    if model.head is not None:
        raise GenerateError(f"this model's {model.config.head} head classifies queries by comparing them with the support set, so it has no standalone network to emit; score it with metanet evaluate")
    t = x.shape[0]
    meta = None if meta is None else meta.to(x.device)
    plan, ways = model.plan, (int(y.max()) + 1 if model.any_ways else None)
    if ways == model.space.task.outputs:
        ways = None  # the model's own plan
    elif ways is not None:  # as many outputs as the support set has classes
        plan = compile(dataclasses.replace(model.space, task=dataclasses.replace(model.space.task, outputs=ways)))
    start = clock(x)
    nets: list[TaskNetwork] = generate_networks(model, Episode(x, y, x, y, meta), sample=sample, ways=ways)
    modules = [DiscreteNetwork(plan, n.genotype, n.params) for n in nets]
    ms = 1e3 * (clock(x) - start) / t
    out = []
    for b, (net, module) in enumerate(zip(nets, modules)):
        adapt_ms = 0.0
        if adapt_steps:
            start = clock(x)
            params = adapt_discrete(plan, net.genotype, net.params, x[b], y[b], adapt_steps, model.step_size, model.kind, model.inner_rule, prox=model.config.prox)
            with torch.no_grad():
                for name, value in params.items():
                    getattr(module, safe_name(name)).copy_(value)
            adapt_ms = 1e3 * (clock(x) - start)
        out.append(GeneratedNetwork(
            module, net.alpha, net.latent, net.embedding, generation_ms=ms, adapt_steps=adapt_steps, adapt_ms=adapt_ms,
            metadata=None if meta is None else int(meta[b]), example_x=x[b],
        ))  # fmt: skip
    return out


# -------------------------------------------------------------------------------- load


def _read(folder: Path, name: str) -> str:
    path = folder / name
    if not path.is_file():
        raise GenerateError(f"{folder}: not a saved network (missing {name})")
    return path.read_text()


def read_network_info(folder: str | Path) -> dict[str, Any]:
    """The checked contents of ``folder/network.json``."""
    folder = Path(folder)
    try:
        info = json.loads(_read(folder, "network.json"))
    except json.JSONDecodeError as e:
        raise GenerateError(f"{folder / 'network.json'}: not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise GenerateError(f"{folder / 'network.json'}: expected a JSON object with \"format\": \"{FORMAT}\"")
    if info.get("format_version") != FORMAT_VERSION:
        raise GenerateError(f"{folder / 'network.json'}: format_version {info.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("space_name", "kind", "input", "outputs"):
        if key not in info:
            raise GenerateError(f"{folder / 'network.json'}: missing key '{key}'")
    return info


def space_for(text: str, info: Mapping[str, Any], source: str) -> SearchSpace:
    """Parse a saved space and give it the saved task outputs; check it matches ``info``."""
    space = loads(text, source)
    if space.name != info["space_name"]:
        raise GenerateError(f"{source}: space '{space.name}' does not match network.json's '{info['space_name']}'")
    outputs = int(info["outputs"])
    if space.task.outputs != outputs:
        space = dataclasses.replace(space, task=dataclasses.replace(space.task, outputs=outputs))
    if space.task.kind != info["kind"] or list(space.task.input) != list(info["input"]):
        raise GenerateError(f"{source}: space '{space.name}' is {space.task.kind} on {list(space.task.input)}, but network.json says {info['kind']} on {info['input']}")
    return space


def load_generated(folder: str | Path, device: torch.device | str | None = None) -> GeneratedNetwork:
    """Rebuild a network written by ``GeneratedNetwork.save`` from its files alone.

    Raises:
        GenerateError, GenotypeError, SpaceError, CheckpointError: a missing or
            inconsistent file, in one line naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GenerateError(f"{folder}: no such folder (expected a saved network)")
    info = read_network_info(folder)
    space = space_for(_read(folder, "space.yaml"), info, str(folder / "space.yaml"))
    genotype = Genotype.from_json(_read(folder, "genotype.json"), str(folder / "genotype.json"))
    genotype.validate(space)
    plan = compile(space)
    tensors, _ = ckpt.load_weights(folder / "weights.safetensors")
    names = plan.slot_names(genotype)
    expected = {safe_name(n) for n in names}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the genotype does not use"
        raise GenerateError(f"{folder / 'weights.safetensors'}: {what}")
    params = {n: tensors[safe_name(n)] for n in names}
    try:
        module = DiscreteNetwork(plan, genotype, params)
    except GenerateError as e:
        raise GenerateError(f"{folder / 'weights.safetensors'}: {e}") from None
    if device is not None:
        module = module.to(device)
    alpha = torch.tensor(info["alpha"]) if info.get("alpha") is not None else genotype.to_alpha(space)
    latent = torch.tensor(info["latent"]) if info.get("latent") is not None else None
    ms = info.get("generation_ms")
    return GeneratedNetwork(module, alpha, latent, None, generation_ms=float("nan") if ms is None else float(ms), adapt_steps=int(info.get("adapt_steps", 0)), metadata=info.get("metadata"))

