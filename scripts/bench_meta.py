"""Meta-training throughput on the fixed conv4 network: ours vs a clone-and-adapt loop.

Prints ONE JSON line. Second-order MAML, 1 inner step, 5-way 1-shot with 15 queries,
meta-batch 32, on ``search_spaces/conv4.yaml`` (conv3x3 stem + norm, 3 x (relu, conv3x3
stride 2, per-task batch norm without affine), relu, global pool, linear):

- ``ours_loop`` / ``ours_vmap``: ``MetaNet`` with the architecture fixed, the weight
  generator off and no prototype head (plain MAML on the executor), per-task loop or
  ``torch.func.vmap`` over tasks;
- ``ours_loop_whole_stem``: the loop with the stem's output made whole instead of read in
  chunks (``ExecOptions(stem_recompute=False)``; on a CPU, where the plan reads it in chunks);
- ``ours_loop_func_grad``: the loop with the differentiable inner step taken with
  ``torch.func.grad`` (``meta.FUNCTIONAL_INNER_GRAD``) instead of ``torch.autograd.grad``
  on aliases: the same graph, through functorch's dispatch;
- ``ours_loop_aten_conv_derivative``: the loop with the convolutions' differentiated
  backward left to PyTorch's own derivative of ``convolution_backward``
  (``kernels.CONV_DERIVATIVES_AS_KERNELS = False``) instead of ``kernels.conv2d_backward``'s
  functions, whose derivatives are each one convolution kernel;
- ``ours_loop_reference_paths``: the loop with the executor's fast paths switched off
  (a conv2d stem and a separate norm instead of the im2col stem with the norm folded in,
  NCHW instead of channels-last from the stem on, the plain-ops batch norm): what they
  gain, side by side;
- ``ours_threads`` (on a CPU with several threads): the per-task backward with the tasks
  shared among the threads, one intra-op thread each (``--strategy threads``);
- ``ours_loop_first_order`` / ``ours_threads_first_order``: the same two steps with
  first-order MAML (``--order first``: no backward through the support's gradient), a
  different meta-gradient, timed as the bound on what speeding up the second-order work
  alone could reach (``second_order_share``: ``1 - first / second`` for the loop, and for
  the threads where there are several; timing noise can make it slightly negative on a
  quick run);
- ``ours_loop_query_only`` / ``ours_threads_query_only`` / ``clone_loop_query_only``: no
  inner step, only the query set's forward and backward at the initial weights: ours'
  step costs at least that, so their ``speedup_vs_clone`` (the clone loop's full step
  over ours' query pass) is the most ours could reach at any cost of the support pass
  and the second order, short of a faster query pass; ``query_pass_speedup_vs_clone``
  is ours' query pass against the clone loop's, the same forward and backward;
- ``clone_loop``: what learn2learn's ``MAML.clone()`` + ``adapt`` does, in plain PyTorch:
  an ``nn.Module`` conv4, per task ``torch.autograd.grad(create_graph=True)`` on the
  support loss, the query loss of the adapted weights, backward per task;
- ``ours_loop_bf16`` / ``clone_loop_bf16``: the same two steps with the forward in bf16
  mixed precision (``metanet train --precision bf16``: ``torch.autocast``; weights,
  gradients and losses stay float32). Their FLOP/s are also given against a bf16 matmul
  peak measured in the same run, where the CPU has bf16 matrix units (``bf16_matrix_units``;
  elsewhere the bf16 peak and fractions are null). Whether bf16 keeps the accuracy is
  ``scripts/bench_precision.py``'s question, not this one's.

All run the same tasks from the same initial weights; the JSON reports the largest
relative difference of their meta-gradients (float64, 2 tasks) as a check that they
compute the same thing.
Timings alternate the variants, several repeats, median. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` on the per-task loop (convolutions and
matmuls only; it over-counts grouped convolutions, hence not on the vmap path); the peak is
a large matmul measured in the same run. ``profile_fp32`` / ``profile_bf16`` are
torch.profiler's key_averages of one ``ours_loop`` step, by self CPU time, with the share
of the step spent in the kernels that do the multiply-adds (convolutions and the stem's
matmuls) and the FLOP/s those kernels reach: what the whole step would reach if nothing
else took time. ``minor_page_faults_per_step``
counts the fresh pages each variant maps per step (glibc returns large freed blocks to
the system, so memory that is not reused is faulted in again).

``--device cuda`` runs the same variants on a GPU, each time ending when its kernels have
finished, against a GPU matmul peak; the CPU-only figures (page faults, the stem's two
paths, the profiles by self CPU time) are null there and the processes are left out.

    python scripts/bench_meta.py            # about 3 minutes on 2 cores
    python scripts/bench_meta.py --quick    # under a minute (meta-batch 4)
    python scripts/bench_meta.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import queue
import socket
import statistics
import time
import types
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from _bench import bench_device, device_arg, freed_memory, freed_memory_arg, interleaved, machine, synchronize  # scripts/_bench.py

import metanet.executor as X
import metanet.meta as meta
import metanet.kernels as kernels
from metanet.distributed import meta_gradients, per_task_gradients, setup, shard
from metanet.meta import MetaNet, ModelConfig, cpu_bf16_units, meta_loss, precision
from metanet.kernels import conv2d_im2col
from metanet.space import load
from metanet.trainer import reuse_freed_memory
from metanet.tuning import PLAN_SWITCHES, REFERENCE, choose_paths, step_timer
from metanet.tasks import Episode

WAYS, SHOTS, QUERIES, SIZE = 5, 1, 15, 28
INNER_LR = 0.4


def episode(tasks: int, seed: int = 0, shape: tuple[int, int, int] = (1, SIZE, SIZE)) -> Episode:
    """Random images of ``shape`` (C, H, W), labels grouped by class (timing does not depend on the data)."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1).contiguous()
    yq = torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1).contiguous()
    return Episode(
        torch.randn(tasks, WAYS * SHOTS, *shape, generator=g), ys,
        torch.randn(tasks, WAYS * QUERIES, *shape, generator=g), yq,
    )  # fmt: skip


def conv4_module(ways: int, c_in: int = 1, channels: int = 64) -> nn.Sequential:
    """The conv4 network as a plain nn.Module (what a learn2learn user writes)."""
    def bn() -> nn.Module:
        return nn.BatchNorm2d(channels, affine=False, track_running_stats=False)

    layers: list[nn.Module] = [nn.Conv2d(c_in, channels, 3, padding=1, bias=False), bn()]
    for _ in range(3):
        layers += [nn.ReLU(), nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False), bn()]
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, ways)]
    return nn.Sequential(*layers)


def copy_weights(model: MetaNet, net: nn.Sequential) -> None:
    """Give the clone-loop network our base weights (same initial point)."""
    base = {k: model.weights.base[k.replace(".", "__")] for k in model.weights.names}
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    names = ["stem.w"] + [f"cells.{i}.e0_1.conv_3x3.w" for i in range(3)]
    with torch.no_grad():
        for conv, name in zip(convs, names):
            conv.weight.copy_(base[name])
        net[-1].weight.copy_(base["head.w"])
        net[-1].bias.copy_(base["head.b"])


def clone_step(net: nn.Sequential, ep: Episode, steps: int = 1, meta_batch: int | None = None) -> None:
    """learn2learn-style second-order MAML: clone, adapt ``steps`` steps, query loss, backward
    per task; each task's loss weighted ``1 / meta_batch`` (default: ``ep``'s tasks)."""
    params = dict(net.named_parameters())
    b = ep.support_x.shape[0]
    scale = meta_batch or b
    for t in range(b):
        fast = params
        for _ in range(steps):
            support = F.cross_entropy(torch.func.functional_call(net, fast, (ep.support_x[t],)), ep.support_y[t])
            grads = torch.autograd.grad(support, list(fast.values()), create_graph=True)
            fast = {k: p - INNER_LR * g for (k, p), g in zip(fast.items(), grads)}
        query = F.cross_entropy(torch.func.functional_call(net, fast, (ep.query_x[t],)), ep.query_y[t])
        (query / scale).backward()


def ours_step(model: MetaNet, ep: Episode, strategy: str, arithmetic: str = "fp32", order: str = "second", inner_steps: int = 1) -> None:
    with precision(arithmetic, ep.support_x.device):
        loss, _ = meta_loss(model, ep, inner_steps=inner_steps, order=order, strategy=strategy)
    loss.backward()


def clone_step_bf16(net: nn.Sequential, ep: Episode) -> None:
    """``clone_step`` under the autocast a learn2learn user would wrap it in."""
    with torch.autocast(ep.support_x.device.type, dtype=torch.bfloat16):
        clone_step(net, ep)


def ours_per_task_step(model: MetaNet, ep: Episode, workers: int = 1, order: str = "second", inner_steps: int = 1) -> None:
    """The same meta-gradient with one backward per task (``--strategy task``,
    ``distributed.per_task_gradients``): generate for the meta-batch, cut the graph at the
    generated tensors, run each task's adaptation and query loss and backward it alone,
    then backpropagate the collected gradients into the generators. ``workers > 1``: the
    tasks shared among that many threads of one intra-op thread each (``--strategy threads``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    _, grads, _ = per_task_gradients(model, ep, slice(0, ep.support_x.shape[0]), torch.Generator(ep.support_x.device).manual_seed(0), params, workers=workers, inner_steps=inner_steps, order=order)
    for p, g in zip(params, grads):
        p.grad = g


@contextlib.contextmanager
def executing(model: MetaNet, options: X.ExecOptions = REFERENCE) -> Iterator[None]:
    """The executor with ``options``; by default without its fast paths (``tuning.REFERENCE``,
    what ``--strategy auto`` times as "reference"): conv stem without its norm folded in,
    NCHW throughout, plain-ops batch norm, one convolution per edge."""
    plan = model.plan
    model.plan = X.compile(plan.space, options)
    try:
        yield
    finally:
        model.plan = plan


def grads_of(params: list[torch.Tensor], step: Callable[[], None]) -> list[torch.Tensor | None]:
    """The gradients ``step`` leaves in ``params`` (None where it leaves none)."""
    for p in params:
        p.grad = None
    step()
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def build(space_name: str) -> tuple[MetaNet, nn.Sequential]:
    """Our conv4 (plain MAML on the executor) and the clone loop's nn.Module, same weights."""
    torch.manual_seed(0)
    space = load(space_name)
    model = MetaNet(space, 0, ModelConfig(arch="fixed", weights="off", proto_head=False, inner_lr=INNER_LR, use_metadata=False))
    net = conv4_module(space.task.outputs, space.task.input[0], space.stem.channels)
    copy_weights(model, net)
    return model, net


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def process_worker(rank: int, world: int, port: int, space_name: str, tasks: int, repeats: int, reuse: bool, results: "torch.multiprocessing.Queue") -> None:
    """Rank ``rank`` of ``world`` processes with one intra-op thread each, as ``torchrun
    --nproc_per_node`` runs ``metanet train`` (torchrun sets ``OMP_NUM_THREADS=1``): each
    process adapts its block of the meta-batch (``distributed.shard``) and one all-reduce
    per step sums the gradients. Ours and the clone loop, sharded alike, alternate; rank 0
    sends their median step times and our summed meta-gradient."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if reuse:
        reuse_freed_memory()
    ctx = setup("cpu")
    model, net = build(space_name)
    ep = episode(tasks, shape=tuple(model.space.task.input))
    part = shard(tasks, rank, world)
    params, clone_params = trainable(model), trainable(net)

    def ours() -> None:
        noise = torch.Generator().manual_seed(0)
        _, grads, _ = meta_gradients(model, ep, part, noise, params, strategy="loop", inner_steps=1, order="second", temperature=1.0, gumbel=False, hard=False)
        for p, g in zip(params, grads):
            p.grad = g
        ctx.all_reduce_step(params, True, {})

    def clone() -> None:
        for p in clone_params:
            p.grad = None
        clone_step(net, ep.slice(part), meta_batch=tasks)
        ctx.all_reduce_step(clone_params, True, {})

    def synchronised(step: Callable[[], None]) -> Callable[[], None]:
        def f() -> None:
            ctx.barrier()
            step()
            ctx.barrier()
        return f

    med = interleaved({"ours": synchronised(ours), "clone": synchronised(clone)}, repeats)
    ours()
    if rank == 0:
        # as numpy arrays: a tensor would travel as shared memory that dies with this process
        results.put((med, [None if p.grad is None else p.grad.numpy().copy() for p in params]))
    ctx.close()


def processes(space_name: str, world: int, tasks: int, repeats: int, reuse: bool) -> tuple[dict[str, float], list[torch.Tensor | None]]:
    """``process_worker`` on ``world`` processes: median step seconds and the meta-gradient."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port for the process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=process_worker, args=(r, world, port, space_name, tasks, repeats, reuse, results)) for r in range(world)]
    for p in procs:
        p.start()

    def check(finished: bool) -> None:
        """Raise if a process failed (or, once all should have ended, did not end cleanly)."""
        codes = [p.exitcode for p in procs]
        if any(c not in ((0,) if finished else (None, 0)) for c in codes):
            raise RuntimeError(f"a benchmark process failed: exit codes {codes}")

    try:
        while True:  # a process that dies leaves the others waiting in a collective: stop them all
            try:
                med, arrays = results.get(timeout=5)
                break
            except queue.Empty:
                check(finished=False)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    check(finished=True)
    return med, [None if a is None else torch.from_numpy(a) for a in arrays]


def check_agreement(model: MetaNet, net: nn.Sequential, tasks: int = 2) -> tuple[float, float]:
    """Largest relative difference of the meta-gradients, in float64 on a few tasks: ours
    vs the clone loop, and the per-task-backward variant vs ours (on the model's device)."""
    model, net = copy.deepcopy(model).double(), copy.deepcopy(net).double()
    e = episode(tasks, seed=1, shape=tuple(model.space.task.input)).to(next(net.parameters()).device)
    e = Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y)
    params = [model.weights.base[k.replace(".", "__")] for k in model.weights.names]
    g_ours = dict(zip(model.weights.names, grads_of(params, lambda: ours_step(model, e, "loop"))))
    g_clone = grads_of(list(net.parameters()), lambda: clone_step(net, e))
    g_task = dict(zip(model.weights.names, grads_of(params, lambda: ours_per_task_step(model, e))))
    order = ["stem.w"] + [f"cells.{i}.e0_1.conv_3x3.w" for i in range(3)] + ["head.w", "head.b"]
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    return max(rel(g_ours[n], c) for n, c in zip(order, g_clone)), max(rel(g_task[n], g_ours[n]) for n in order)


def convolutions_alone(net: nn.Sequential, ep: Episode, peak: float, repeats: int) -> dict[str, float]:
    """The network's convolutions after the stem, alone, channels-last, at the batch of a
    support set and of a query set: forward, input and weight gradient, as FLOP/s
    against ``peak`` (what the kernels do on the step's shapes without the rest of the
    step around them: the bound on the step's own fraction)."""
    shapes: list[tuple[tuple[int, ...], nn.Conv2d]] = []
    convs = [m for m in net if isinstance(m, nn.Conv2d)][1:]
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((tuple(i[0].shape[1:]), m))) for m in convs]
    with torch.no_grad():
        net(ep.query_x[0][:1])
    for h in hooks:
        h.remove()
    out = {}
    for name, n in (("support", ep.support_x.shape[1]), ("query", ep.query_x.shape[1])):
        flops, calls = 0, []
        for (c, h, w), conv in shapes:
            x = torch.randn(n, c, h, w, device=ep.query_x.device).contiguous(memory_format=torch.channels_last)
            k = conv.weight.detach().contiguous(memory_format=torch.channels_last)
            y = F.conv2d(x, k, stride=conv.stride, padding=conv.padding)
            g = torch.randn_like(y)
            flops += 3 * 2 * y.numel() * k[0].numel()  # forward, input gradient, weight gradient

            def call(x=x, k=k, g=g, conv=conv) -> None:
                F.conv2d(x, k, stride=conv.stride, padding=conv.padding)
                torch.ops.aten.convolution_backward(g, x, k, None, list(conv.stride), list(conv.padding), [1, 1], False, [0, 0], 1, [True, True, False])

            calls.append(call)

        def run(calls: list[Callable[[], None]] = calls) -> None:
            for c in calls:
                c()

        med = interleaved({name: run}, repeats, ep.query_x.device)
        out[f"{name}_{n}_images_fraction_of_peak"] = round(flops / med[name] / peak, 3)
    return out


def stem_paths(images: int, repeats: int) -> dict[str, dict[str, float]]:
    """A 3x3 stem to 64 channels on 28x28 inputs: F.conv2d vs kernels.conv2d_im2col, forward +
    weight gradient (what the query side of a meta-step does), for 1 and 3 input channels."""
    out = {}
    for c_in in (1, 3):
        g = torch.Generator().manual_seed(c_in)
        x = torch.randn(images, c_in, SIZE, SIZE, generator=g)
        w = torch.randn(64, c_in, 3, 3, generator=g, requires_grad=True)

        def run(conv: Callable) -> Callable[[], None]:
            def f() -> None:
                y = conv(x, w, padding=1)
                torch.autograd.grad(y, [w], grad_outputs=torch.ones_like(y))
            return f

        med = interleaved({"conv2d": run(F.conv2d), "im2col": run(conv2d_im2col)}, repeats)
        out[f"c_in={c_in}"] = {"conv2d_ms": round(1e3 * med["conv2d"], 2), "im2col_ms": round(1e3 * med["im2col"], 2), "speedup": round(med["conv2d"] / med["im2col"], 2)}
    return out


def peak_matmul_flops(n: int, repeats: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> float:
    """FLOP/s of an ``n x n`` matmul in ``dtype`` on ``device`` (median of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        synchronize(device)
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts)


def minor_faults(step: Callable[[], None]) -> int:
    """Minor page faults of one call of ``step`` (after a warm-up call): fresh pages that
    the allocator had to map, i.e. memory the step could not reuse."""
    import resource

    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def count_flops(step: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


# The kernels that do the step's multiply-adds: convolutions, forward and backward, and the
# im2col stem's batched matmuls.
PRODUCT_KERNELS = ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::bmm", "aten::mm", "aten::addmm")


def profile_step(step: Callable[[], None], k: int = 10) -> tuple[list[dict], float, float]:
    """torch.profiler's ops of one step by self CPU time: the top ``k``, the total seconds,
    and the seconds spent in ``PRODUCT_KERNELS`` (what FLOP/s of the products alone is
    measured on: the bound on the whole step's FLOP/s if everything else were free)."""
    from torch.profiler import profile

    with profile(record_shapes=False) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    products = sum(e.self_cpu_time_total for e in rows if e.key in PRODUCT_KERNELS)
    top = [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in rows[:k]]
    return top, total / 1e6, products / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="meta-batch 4, 2 repeats: under a minute")
    ap.add_argument("--meta-batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-vmap", action="store_true", help="skip the vmap strategy (slow on CPU)")
    ap.add_argument("--space", default="conv4", choices=("conv4", "conv4_miniimagenet", "conv4_miniimagenet_64"), help="the conv4 network: Omniglot's 1x28x28, 64 channels (default), or mini-ImageNet's 3x84x84 with 32 or 64 channels")
    ap.add_argument("--procs", type=int, default=None, help="also time ours and the clone loop on this many processes with one thread each, the meta-batch sharded as under torchrun (default: the thread count, at least 2; at most the meta-batch; 0 or 1: skip); their ratios to the single process are null unless it is the thread count, their peak is the measured one scaled to the processes' cores")
    freed_memory_arg(ap)
    device_arg(ap)
    args = ap.parse_args()
    dev = bench_device(ap, args.device)
    cpu = dev.type == "cpu"
    reused = freed_memory(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = args.meta_batch or (4 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 5)
    model, net = build(args.space)
    model, net = model.to(dev), net.to(dev)
    space = model.space
    ep = episode(tasks, shape=tuple(space.task.input)).to(dev)

    agree, agree_task = check_agreement(model, net)

    def ours_reference() -> None:
        with executing(model):
            ours_step(model, ep, "loop")

    def ours_whole_stem() -> None:
        with executing(model, X.ExecOptions(stem_recompute=False)):
            ours_step(model, ep, "loop")

    def ours_with(module: types.ModuleType, flag: str, value: bool) -> Callable[[], None]:
        """The loop with ``module.flag`` set to ``value`` for the step (a library switch
        between a path and its reference)."""
        def step() -> None:
            with mock.patch.object(module, flag, value):
                ours_step(model, ep, "loop")
        return step

    variants: dict[str, Callable[[], None]] = {
        "ours_loop": lambda: ours_step(model, ep, "loop"),
        "clone_loop": lambda: clone_step(net, ep),
        "ours_loop_reference_paths": ours_reference,
        "ours_loop_func_grad": ours_with(meta, "FUNCTIONAL_INNER_GRAD", True),
        "ours_loop_aten_conv_derivative": ours_with(kernels, "CONV_DERIVATIVES_AS_KERNELS", False),
        "ours_loop_per_task_backward": lambda: ours_per_task_step(model, ep),
        "ours_loop_bf16": lambda: ours_step(model, ep, "loop", "bf16"),
        "clone_loop_bf16": lambda: clone_step_bf16(net, ep),
        # first-order MAML on the same tasks: the step without the support's double
        # backward, the most any speed-up of the second-order work alone could reach
        "ours_loop_first_order": lambda: ours_step(model, ep, "loop", order="first"),
        # no inner step: the query set's forward and backward at the initial weights, in
        # both loops; ours is at least this, whatever the support and second order cost
        "ours_loop_query_only": lambda: ours_step(model, ep, "loop", inner_steps=0),
        "clone_loop_query_only": lambda: clone_step(net, ep, steps=0),
    }
    threads = torch.get_num_threads()
    if cpu and threads > 1:  # the tasks shared among the threads
        variants["ours_threads"] = lambda: ours_per_task_step(model, ep, threads)
        variants["ours_threads_first_order"] = lambda: ours_per_task_step(model, ep, threads, "first")
        variants["ours_threads_query_only"] = lambda: ours_per_task_step(model, ep, threads, inner_steps=0)
    if model.plan.stem_recompute and cpu:  # the chunked stem against the whole stem output
        variants["ours_loop_whole_stem"] = ours_whole_stem
    if not args.no_vmap:
        variants["ours_vmap"] = lambda: ours_step(model, ep, "vmap")
    med = interleaved(variants, repeats, dev)

    flops = count_flops(lambda: ours_step(model, ep, "loop"))
    clone_flops = count_flops(lambda: clone_step(net, ep))
    n = (2048 if not args.quick else 1024) * (1 if cpu else 4)
    peak = peak_matmul_flops(n, 5, device=dev)
    # Without bf16 matrix units autocast emulates bf16 (about 0.3 GFLOP/s for this matmul on
    # an AVX2 CPU, minutes per repeat): no peak to compare with, so none is measured.
    bf16_units = cpu_bf16_units() if cpu else True
    peak_bf16 = peak_matmul_flops(n, 5, torch.bfloat16, dev) if bf16_units is not False else None
    achieved = flops / med["ours_loop"]
    # what --strategy auto would choose here: each candidate timed on this step (metanet.tuning)
    step = {"inner_steps": 1, "order": "second"}
    tuned = choose_paths(model, ep, step, timer=step_timer(model, ep, step, "fp32", repeats=min(repeats, 3)))

    def flags(plan: X.Plan) -> dict[str, bool]:
        return {k: bool(getattr(plan, k)) for k in PLAN_SWITCHES}

    with executing(model):
        reference_flags = flags(model.plan)
    out = {
        "bench": "meta",
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **machine(dev),
        "network": args.space,
        "input": list(space.task.input),
        "setting": f"{WAYS}-way {SHOTS}-shot, {QUERIES} queries, second order, 1 inner step",
        "meta_batch": tasks,
        "repeats": repeats,
        "reuse_freed_memory": reused,
        "paths": {"ours_loop": flags(model.plan), "ours_loop_reference_paths": reference_flags},
        "auto_paths": {"chosen": tuned.describe(), "step_s": {k: round(v, 3) for k, v in tuned.times.items()}},
        "step_s": {k: round(v, 3) for k, v in med.items()},
        "tasks_per_s": {k: round(tasks / v, 2) for k, v in med.items()},
        "speedup_vs_clone": {k: round(med["clone_loop"] / v, 2) for k, v in med.items() if k != "clone_loop"},
        "meta_grad_max_rel_diff_vs_clone": float(f"{agree:.2e}"),
        "per_task_backward_max_rel_diff_vs_ours_loop": float(f"{agree_task:.2e}"),
        "gflop_per_step": round(flops / 1e9, 2),
        "clone_gflop_per_step": round(clone_flops / 1e9, 2),
        "achieved_gflops": round(achieved / 1e9, 1),
        "clone_achieved_gflops": round(clone_flops / med["clone_loop"] / 1e9, 1),
        "peak_matmul_gflops": round(peak / 1e9, 1),
        "fraction_of_peak": round(achieved / peak, 3),
        "bf16_speedup_vs_clone_bf16": round(med["clone_loop_bf16"] / med["ours_loop_bf16"], 2),
        "achieved_gflops_bf16": round(flops / med["ours_loop_bf16"] / 1e9, 1),
        "bf16_matrix_units": bf16_units,
        "peak_matmul_gflops_bf16": round(peak_bf16 / 1e9, 1) if peak_bf16 else None,
        "fraction_of_bf16_peak": round(flops / med["ours_loop_bf16"] / peak_bf16, 3) if peak_bf16 else None,
        "achieved_gflops_threads": round(flops / med["ours_threads"] / 1e9, 1) if "ours_threads" in med else None,
        "fraction_of_peak_threads": round(flops / med["ours_threads"] / peak, 3) if "ours_threads" in med else None,
        # the share of ours' step that the second order (the support's double backward) takes
        "second_order_share": {k: round(1 - med[f"{k}_first_order"] / med[k], 3) for k in ("ours_loop", "ours_threads") if f"{k}_first_order" in med},
        # the query pass alone (no inner step), the clone loop's against ours'
        "query_pass_speedup_vs_clone": {k: round(med["clone_loop_query_only"] / med[f"{k}_query_only"], 2) for k in ("ours_loop", "ours_threads") if f"{k}_query_only" in med},
        # the CPU's: fresh pages of host memory, and the stem's product against its convolution
        "minor_page_faults_per_step": {k: minor_faults(variants[k]) for k in ("ours_loop", "clone_loop", "ours_loop_per_task_backward", "ours_threads") if k in variants} if cpu else None,
        "stem_fwd_wgrad_75_images": stem_paths(WAYS * QUERIES, 5 if args.quick else 15) if cpu else None,
        "convolutions_alone": convolutions_alone(net, ep, peak, 5 if args.quick else 15),
    }
    world = min(max(2, threads) if args.procs is None else args.procs, tasks) if cpu else 0  # every process needs a task
    if world > 1:
        # one process's meta-gradient at one thread, as the processes run (float32 sums
        # in another order differ by more than the all-reduce's rounding on this step)
        torch.set_num_threads(1)
        single = grads_of(trainable(model), lambda: ours_step(model, ep, "loop"))
        torch.set_num_threads(threads)
        med_p, grads_p = processes(args.space, world, tasks, repeats, reused)
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads_p, single) if b is not None)
        # against the single process only on as many cores; the peak scaled to the cores used
        same = world == threads
        peak_p = peak * world / threads
        out["processes"] = {
            "processes": world,
            "threads_each": 1,
            "step_s": {"ours": round(med_p["ours"], 3), "clone": round(med_p["clone"], 3)},
            "speedup_vs_clone_loop": round(med["clone_loop"] / med_p["ours"], 2) if same else None,
            "speedup_vs_clone_processes": round(med_p["clone"] / med_p["ours"], 2),
            "clone_speedup_vs_clone_loop": round(med["clone_loop"] / med_p["clone"], 2) if same else None,
            "achieved_gflops": round(flops / med_p["ours"] / 1e9, 1),
            "peak_matmul_gflops": round(peak_p / 1e9, 1),
            "fraction_of_peak": round(flops / med_p["ours"] / peak_p, 3),
            "meta_grad_max_rel_diff_vs_ours_loop": float(f"{diff:.2e}"),
        }
    for name, arithmetic, top_peak in (("fp32", "fp32", peak), ("bf16", "bf16", peak_bf16)):
        if not cpu:  # self CPU time: on a GPU it measures the launches, not the kernels
            out[f"profile_{name}"] = None
            continue
        top, total_s, products_s = profile_step(lambda: ours_step(model, ep, "loop", arithmetic))
        out[f"profile_{name}"] = {
            "top_ops": top,
            "product_kernels_share": round(products_s / total_s, 3),
            "product_kernels_gflops": round(flops / products_s / 1e9, 1),
            "product_kernels_fraction_of_peak": round(flops / products_s / top_peak, 3) if top_peak else None,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
