"""Generating a network for a new task, and the memory of second- vs first-order meta-training.

Prints ONE JSON line.

- ``generate``: ``metanet.network.generate(model, support_x, support_y)`` = encode the
  support set, run both generators, discretise, materialise the ``nn.Module`` (the
  library's own ``generation_ms`` and the wall time of the call), for mlp_regression
  (10-shot sinusoid) and conv_omniglot (5-way 1-shot) with default (untrained) models.
  Measured interleaved with one fine-tuning step of the generated network on the same
  support set (``GeneratedNetwork.finetune``, SGD), so the figure is also a ratio
  (generation time in fine-tuning steps). A stage breakdown comes from the profiler.
- ``meta_memory``: peak RSS growth of one meta-training step (forward + backward) on
  conv_omniglot, 5-way 1-shot, 15 queries, default model, second vs first order, each in a
  fresh subprocess (after a warm-up step with one task), alternating, median. Saved-tensor
  hooks cannot be used here: torch.func.grad (the inner loop) does not support them.

    python scripts/bench_generate.py            # about 2 minutes on 2 cores
    python scripts/bench_generate.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from metanet.meta import MetaNet, ModelConfig
from metanet.network import generate
from metanet.space import load
from metanet.tasks import Episode, Sinusoid


def omniglot_like(tasks: int, shots: int, queries: int, seed: int = 0) -> Episode:
    """Random 1x28x28 images with grouped labels (time and memory do not depend on pixels)."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(5).repeat_interleave(shots).expand(tasks, -1).contiguous()
    yq = torch.arange(5).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return Episode(torch.rand(tasks, 5 * shots, 1, 28, 28, generator=g), ys, torch.rand(tasks, 5 * queries, 1, 28, 28, generator=g), yq)


def generation(space_name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MetaNet(load(space_name), 0, ModelConfig()).eval()
    if space_name == "conv_omniglot":
        ep = omniglot_like(1, 1, 15)
    else:
        ep = Sinusoid(shots=10, queries=10).sample(1, torch.Generator().manual_seed(0))
    sx, sy = ep.support_x[0], ep.support_y[0]
    sy = sy if space_name == "conv_omniglot" else sy[:, 0]
    nets = []

    def gen() -> None:
        nets.append(generate(model, sx, sy))

    gen()
    net = nets[-1]

    def finetune() -> None:
        net.finetune(sx, sy, steps=1, lr=1e-3)

    gen_wall: list[float] = []
    ft: list[float] = []
    for _ in range(repeats + 1):  # the first round is a warm-up
        t = time.perf_counter()
        gen()
        gen_wall.append(time.perf_counter() - t)
        t = time.perf_counter()
        finetune()
        ft.append(time.perf_counter() - t)
    lib_ms = statistics.median(n.generation_ms for n in nets[2:])
    wall_ms = 1e3 * statistics.median(gen_wall[1:])
    ft_ms = 1e3 * statistics.median(ft[1:])
    return {
        "generation_ms": round(lib_ms, 2),
        "generate_call_ms": round(wall_ms, 2),
        "finetune_step_ms": round(ft_ms, 2),
        "generation_in_finetune_steps": round(lib_ms / ft_ms, 2),
        "ops": len(net.genotype.ops()),
        "params": net.num_params(),
        "stages": stages(model, sx, sy),
    }


def stages(model: MetaNet, sx: torch.Tensor, sy: torch.Tensor) -> dict[str, float]:
    """Self CPU ms of one ``generate`` call by library function (profiler, with stack)."""
    from torch.profiler import profile, record_function

    import metanet.meta as M
    import metanet.network as N

    wrapped = {
        "encode": (model.encoder, "forward"),
        "arch_generator": (model.arch, "forward"),
        "weight_generator": (model.weights, "forward"),
    }
    originals = {}
    for label, (obj, attr) in wrapped.items():
        fn = getattr(obj, attr)
        originals[label] = (obj, attr, fn)

        def traced(*a, _fn=fn, _label=label, **k):
            with record_function(_label):
                return _fn(*a, **k)

        setattr(obj, attr, traced)
    patched = {
        "prototype_head(supernet)": (M, "run"),
        "discretise": (M, "discretise"),
        "prototype_head(discrete)": (M, "forward_genotype"),
        "materialise": (N, "DiscreteNetwork"),
    }
    module_orig = {}
    for label, (mod, attr) in patched.items():
        fn = getattr(mod, attr)
        module_orig[label] = (mod, attr, fn)

        def traced2(*a, _fn=fn, _label=label, **k):
            with record_function(_label):
                return _fn(*a, **k)

        setattr(mod, attr, traced2)
    try:
        generate(model, sx, sy)
        with profile() as prof:
            generate(model, sx, sy)
    finally:
        for obj, attr, _ in originals.values():
            delattr(obj, attr)  # back to the class's method
        for mod, attr, fn in module_orig.values():
            setattr(mod, attr, fn)
    labels = set(wrapped) | set(patched)
    out = {e.key: round(e.cpu_time_total / 1e3, 2) for e in prof.key_averages() if e.key in labels}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


CHILD = r"""
import resource, sys, torch
from metanet.meta import MetaNet, ModelConfig, meta_loss
from metanet.space import load
sys.path.insert(0, {scripts!r})
from bench_generate import omniglot_like
torch.manual_seed(0)
order, tasks = {order!r}, {tasks}
model = MetaNet(load("conv_omniglot"), 0, ModelConfig())
def step(ep):
    loss, _ = meta_loss(model, ep, inner_steps=1, order=order, generator=torch.Generator().manual_seed(0))
    loss.backward()
    model.zero_grad(set_to_none=True)
step(omniglot_like(1, 1, 15, seed=1))  # warm-up: lazy allocations, kernel caches
ep = omniglot_like(tasks, 1, 15)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step(ep)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def meta_memory(tasks: int, repeats: int, threads: int) -> dict:
    from pathlib import Path

    scripts = str(Path(__file__).resolve().parent)
    res: dict[str, list[int]] = {"second": [], "first": []}
    for _ in range(repeats):
        for order in res:
            code = f"import torch; torch.set_num_threads({threads})\n" + CHILD.format(scripts=scripts, order=order, tasks=tasks)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            res[order].append(int(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(v) for k, v in res.items()}
    return {
        "space": "conv_omniglot",
        "meta_batch": tasks,
        "setting": "5-way 1-shot, 15 queries, 1 inner step, default model (conditional arch, VAE weights)",
        "second_order_peak_rss_mb": round(med["second"] / 2**20, 1),
        "first_order_peak_rss_mb": round(med["first"] / 2**20, 1),
        "ratio": round(med["second"] / max(med["first"], 1), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, meta-batch 2: under a minute")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--meta-batch", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 21
    out: dict = {"bench": "generate", "quick": args.quick, "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    out["mlp_regression"] = generation("mlp_regression", repeats)
    out["conv_omniglot"] = generation("conv_omniglot", repeats)
    tasks = args.meta_batch or (2 if args.quick else 8)
    out["meta_memory"] = meta_memory(tasks, 1 if args.quick else 3, torch.get_num_threads())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
