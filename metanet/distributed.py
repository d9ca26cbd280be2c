"""Process-group helpers for multi-process meta-training on torch.distributed.

``torchrun --nproc_per_node N -m metanet train ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.
``setup`` turns those into a ``Context``: it initialises the default process group when
``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA) and picks the device, ``cuda:LOCAL_RANK``
when CUDA is available, else the CPU. With one process nothing is initialised and every
collective below is a no-op, so the trainer has one code path.

The meta-batch is sharded by ``shard``: rank r owns a contiguous block of the B tasks, the
blocks of all ranks partition ``range(B)``, and the sizes differ by at most one.
``shard_loss`` is a rank's share of the meta-objective and ``Context.all_reduce_step``
sums the gradients and metrics of one step, so that N ranks take the step one process
would take with the whole meta-batch. ``per_task_gradients`` computes the same share's
gradients with one backward per task (the ``task`` strategy: memory of one task's graph),
and with the tasks shared among threads that each run on one core (``threads``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .meta import Generated, MetaNet, meta_loss, outer_loss
from .tasks import Episode

__all__ = ["Context", "setup", "shard", "shard_loss", "meta_gradients", "per_task_gradients", "PER_TASK", "THREADS", "env_rank", "env_world_size"]


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """This process's ``RANK`` as torchrun sets it (0 when unset)."""
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


@dataclass
class Context:
    """Who this process is in the job, and the collectives the trainer needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this context initialised the process group (and destroys it)

    @property
    def distributed(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files or prints."""
        return self.rank == 0

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over all ranks, in place (returns ``t``)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``t`` with rank ``src``'s ``t``, in place (returns ``t``)."""
        if self.distributed:
            dist.broadcast(t, src)
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (pickled: only for objects this job made)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        # nccl moves objects through the current CUDA device; gloo through the CPU
        dist.broadcast_object_list(box, src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def all_reduce_step(self, params: list[torch.nn.Parameter], finite: bool, metrics: dict[str, float]) -> tuple[bool, dict[str, float]]:
        """Sum gradients and (weighted) metrics over the ranks; False if any rank's loss was non-finite.

        A parameter gets a gradient if any rank gave it one (the sum, absent ones counted as
        zero) and keeps None otherwise, as one process would.
        """
        keys = sorted(metrics)
        info = torch.tensor([float(finite)] + [float(p.grad is not None) for p in params] + [metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        self.all_reduce_sum(info)
        n = len(params)
        reduced = {k: float(v) for k, v in zip(keys, info[1 + n :].tolist())}
        if int(info[0].item()) < self.world_size:
            return False, reduced
        present = info[1 : 1 + n].tolist()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        self.all_reduce_sum(flat)
        offset = 0
        for p, there in zip(params, present):
            size = p.numel()
            p.grad = flat[offset : offset + size].view_as(p) if there > 0 else None
            offset += size
        return True, reduced

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            dist.barrier()

    def close(self, clean: bool = True) -> None:
        """Destroy the process group if this context created it.

        Args:
            clean: every rank got here in step (wait for all before closing connections);
                False after an error, which the other ranks may not have seen.
        """
        if self.owns_group and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def train_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """The device a process trains on: ``device``, where a GPU without an index (``cuda``)
    means this process's own, ``cuda:LOCAL_RANK``; None: that GPU when CUDA is available,
    else the CPU."""
    if device is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    return torch.device("cuda", local_rank) if dev.type == "cuda" and dev.index is None else dev


def setup(device: str | torch.device | None = None) -> Context:
    """The job context from torchrun's environment; initialises the process group if needed.

    Args:
        device: the device to train on (``train_device``); None picks ``cuda:LOCAL_RANK``
            when CUDA is available, else the CPU.
    """
    world = env_world_size()
    rank = env_rank()
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = train_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    elif world > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # nccl waits 10 minutes by default, gloo 30: the other ranks wait in a collective while
        # rank 0 alone decodes a dataset, times the paths or validates, so both wait 30; and
        # each rank's collectives run on its own GPU
        extra = {"timeout": datetime.timedelta(minutes=30), "device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank, **extra)
        owns = True
    return Context(rank, world, local_rank, dev, owns)


def shard(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous block of ``range(n)``; blocks differ in size by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


# ------------------------------------------------------------------- sharded meta-batches


def shard_loss(model: MetaNet, episode: Episode, part: slice, noise: torch.Generator, **kw: Any) -> tuple[Tensor, dict[str, float]]:
    """This rank's share of the meta-objective of ``episode``, the whole meta-batch.

    The generators, the inner loop and the losses run on the tasks in ``part`` only; the
    noise is drawn from ``noise`` exactly as one process draws it for all B tasks
    (``MetaNet.generate``'s ``part``), so each task gets the same noise. The loss and
    the metrics are those tasks' means weighted by ``len(part) / B``, so that their sums
    over the ranks are the whole meta-batch's.

    Args:
        model: the meta-learner.
        episode: the meta-batch, the same on every rank.
        part: this rank's block of tasks (``shard``).
        noise: the generator of the VAE and Gumbel noise, in the same state on every rank.
        **kw: ``meta_loss``'s keyword arguments (``temperature``, ``gumbel``, ``hard`` and
            ``strategy`` are required).
    """
    b = episode.batch_size
    if part.start == 0 and part.stop == b:
        return meta_loss(model, episode, generator=noise, **kw)
    mine, step_kw = _generate(model, episode, part, noise, kw)
    loss, m = outer_loss(model, mine, episode.slice(part), **step_kw)
    w = (part.stop - part.start) / b
    return loss * w, {k: v * w for k, v in m.items()}


PER_TASK = "task"  # the task strategy: the loop executor, one backward per task
THREADS = "threads"  # the task strategy with the tasks shared among the intra-op threads, one core each


def per_task_gradients(model: MetaNet, episode: Episode, part: slice, noise: torch.Generator, inputs: Sequence[Tensor], context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext, workers: int = 1, **kw: Any) -> tuple[Tensor, tuple[Tensor | None, ...], dict[str, float]]:
    """``shard_loss`` and its gradients with respect to ``inputs``, one backward per task.

    The generators run once on the tasks of ``part`` (the same noise as ``shard_loss``);
    their outputs are cut into per-task leaves, and each task runs its inner loop,
    query loss and backward alone, so that its graph is freed before the next task's is
    built: the memory of one task's adaptation instead of the meta-batch's. The collected
    gradients of the generated tensors are then backpropagated into the generators once.
    The loss and the gradients are ``shard_loss``'s (a sum of per-task terms, each weighted
    ``1 / B``), up to float rounding.

    With ``workers > 1`` (on a CPU) the tasks are dealt round-robin to that many threads,
    each running its tasks with one intra-op thread, so that the cores work on different
    tasks instead of splitting each operation of one task among them: a small
    convolution keeps one core busier than it keeps two. The torch thread count is set
    to 1 meanwhile (it is process-wide) and restored after. The per-worker sums are added
    in a fixed order, so the result does not depend on which thread finishes first. Once a
    worker raises (or the caller is interrupted), the others take no further task, and the
    first error in worker order is raised.

    Args:
        model, episode, part, noise: as for ``shard_loss``.
        inputs: the tensors to differentiate with respect to (the model's parameters).
        context: a factory of the context the forward passes run in (the arithmetic,
            ``meta.precision``); the backward passes run outside it.
        workers: threads to share the tasks among (1: the calling thread alone; on
            another device than the CPU always 1).
        **kw: ``meta_loss``'s keyword arguments; ``strategy`` is ignored (the tasks run
            one at a time).
    """
    b = episode.batch_size
    inputs = list(inputs)
    with context():
        mine, step_kw = _generate(model, episode, part, noise, {**kw, "strategy": "loop"})
    named = mine.tensors()
    outputs = {name: t for name, t in named.items() if t.requires_grad}  # what carries gradient into the generators

    failed = threading.Event()  # set by a worker that raised: the others stop at their next task

    def run(tasks: range, threads: int | None = None) -> _TaskSums:
        """The tasks ``tasks`` (offsets into ``part``), each alone; on ``threads`` intra-op threads."""
        try:
            return tasks_of(tasks, threads)
        except BaseException:
            failed.set()
            raise

    def tasks_of(tasks: range, threads: int | None) -> _TaskSums:
        if threads is not None:
            torch.set_num_threads(threads)
        sums = _TaskSums({}, [None] * len(inputs), torch.zeros((), device=episode.support_x.device), {})
        for t in tasks:
            if failed.is_set():
                break
            fields = {name: v[t : t + 1].detach().requires_grad_(name in outputs) for name, v in named.items()}
            one = Generated.from_tensors(fields)
            with context():
                loss, m = outer_loss(model, one, episode.slice(slice(part.start + t, part.start + t + 1)), **step_kw)
            leaves = [fields[name] for name in outputs]
            grads = torch.autograd.grad(loss / b, leaves + inputs, allow_unused=True)
            sums.cotangents[t] = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
            sums.direct = _add(sums.direct, grads[len(leaves) :])
            sums.total = sums.total + loss.detach() / b
            for k, v in m.items():
                sums.metrics[k] = sums.metrics.get(k, 0.0) + v / b
        return sums

    n = part.stop - part.start
    workers = max(1, min(workers, n)) if episode.support_x.device.type == "cpu" else 1
    if workers == 1:
        shares = [run(range(n))]
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # once here: the workers' own calls then only set their thread's count
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="metanet-task") as pool:
                futures = [pool.submit(run, range(j, n, workers), 1) for j in range(workers)]
                try:
                    shares = [f.result() for f in futures]
                except BaseException:  # a worker's error, or an interrupt here: the others stop too
                    failed.set()
                    raise
        finally:
            torch.set_num_threads(threads)
    direct: list[Tensor | None] = [None] * len(inputs)  # the parameters used inside the tasks (step sizes, heads)
    total = torch.zeros((), device=episode.support_x.device)
    metrics: dict[str, float] = {}
    cotangents: dict[int, list[Tensor]] = {}
    for share in shares:
        direct = _add(direct, share.direct)
        total = total + share.total
        for k, v in share.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v
        cotangents.update(share.cotangents)
    through = torch.autograd.grad(list(outputs.values()), inputs, [torch.cat([cotangents[t][i] for t in range(n)]) for i in range(len(outputs))], allow_unused=True) if outputs else [None] * len(inputs)
    return total, tuple(_add(direct, through)), metrics


@dataclass
class _TaskSums:
    """One worker's share of ``per_task_gradients``: each task's gradients of the generated
    tensors (by task offset), and the sums of the direct gradients, losses and metrics."""

    cotangents: dict[int, list[Tensor]]
    direct: list[Tensor | None]
    total: Tensor
    metrics: dict[str, float]


def _add(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Elementwise sums of two gradient lists, None standing for zero."""
    return [x if y is None else (y if x is None else x + y) for x, y in zip(a, b)]


def meta_gradients(model: MetaNet, episode: Episode, part: slice, noise: torch.Generator, inputs: Sequence[Tensor], context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext, **kw: Any) -> tuple[Tensor, tuple[Tensor | None, ...], dict[str, float]]:
    """``shard_loss``, its gradients with respect to ``inputs`` and its metrics, by the
    strategy in ``kw``: ``task`` backpropagates one task at a time
    (``per_task_gradients``), ``threads`` too, with the tasks shared among as many threads
    as torch's intra-op threads, the others the whole share at once. The forward passes
    run in ``context()``, the backward passes outside it."""
    if kw.get("strategy") in (PER_TASK, THREADS):
        workers = torch.get_num_threads() if kw["strategy"] == THREADS else 1
        return per_task_gradients(model, episode, part, noise, inputs, context, workers, **kw)
    with context():
        loss, m = shard_loss(model, episode, part, noise, **kw)
    return loss, torch.autograd.grad(loss, list(inputs), allow_unused=True), m


def _generate(model: MetaNet, episode: Episode, part: slice, noise: torch.Generator, kw: dict[str, Any]) -> tuple[Generated, dict[str, Any]]:
    """The generators on the tasks ``part`` of ``episode`` with ``meta_loss``'s keywords
    ``kw`` (the noise drawn as for all of them: ``MetaNet.generate``'s ``part``), and the
    keywords left for ``outer_loss``."""
    mine = model.generate(episode.support_x, episode.support_y, episode.metadata, temperature=kw.get("temperature", 1.0), gumbel=kw.get("gumbel", False), hard=kw.get("hard", False), sample=model.config.weights == "vae", generator=noise, strategy=kw["strategy"], op_dropout=kw.get("op_dropout", 0.0), part=part)
    return mine, {k: v for k, v in kw.items() if k not in ("gumbel", "hard", "op_dropout")}

