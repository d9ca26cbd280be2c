"""Peak memory of a second-order meta-step against the number of inner steps.

Prints ONE JSON line. conv4 second-order MAML (5-way 1-shot, 15 queries, 28x28, the
``bench_meta`` setting) at 1, 5, 10 and 20 inner steps: metanet's meta-step keeping every
inner step's activations, metanet's with ``--checkpoint-steps`` (each inner step
recomputed in the backward pass), ``--order implicit`` (iMAML: the inner steps keep no
graph; a proximal term of weight ``PROX`` and ``CG_STEPS`` conjugate-gradient steps; a
different meta-gradient, so only its memory and time compare), all three again with one
backward per task (``--strategy task``: the graph of one task's adaptation at a time), and
the clone-and-adapt loop a learn2learn user writes (one backward per task). Each figure is measured in a fresh
process, after one warm-up step on one task: the rise of the step's peak resident set (``VmHWM``, reset
just before the step through ``/proc/self/clear_refs``) over the resident set then, in
MB; the step's wall time beside it. With ``--device cuda`` the figure is the rise of the
GPU's peak allocated memory over what was allocated before the step
(``torch.cuda.max_memory_allocated``, reset just before it). ``ratio_10_to_1`` (``ratio_5_to_1`` with ``--quick``)
is each path's peak at that many inner steps over its 1-step peak (the goal: at most 1.5
with checkpointing).

    python scripts/bench_memory.py            # about 3 minutes on 2 cores
    python scripts/bench_memory.py --quick    # 1 and 5 steps, meta-batch 2: seconds
    python scripts/bench_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from _bench import bench_device, device_arg, machine, synchronize  # scripts/_bench.py
from bench_meta import INNER_LR, clone_step, conv4_module, copy_weights, episode  # scripts/bench_meta.py
from metanet.distributed import per_task_gradients
from metanet.meta import MetaNet, ModelConfig, meta_loss
from metanet.space import load


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` figure (``VmRSS``, ``VmHWM``: the peak since the last reset), in MB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> bool:
    """Start the peak (``VmHWM``) afresh from the current resident set; False where the
    kernel does not allow it (the peak is then the process's, ``ru_maxrss``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


PROX, CG_STEPS = 1.0, 5  # the implicit order's proximal weight and conjugate-gradient steps


def run(path: str, model: MetaNet, net: torch.nn.Sequential, ep, steps: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {"order": "second", "checkpoint": path.endswith("_checkpointed")}
    if path.endswith("_implicit"):
        kw.update(order="implicit", prox=PROX, cg_steps=CG_STEPS)
    if path == "clone_loop":
        clone_step(net, ep, steps)
    elif path.startswith("ours_per_task"):
        per_task_gradients(model, ep, slice(0, ep.support_x.shape[0]), torch.Generator(ep.support_x.device).manual_seed(0), params, inner_steps=steps, **kw)
    else:
        loss, _ = meta_loss(model, ep, inner_steps=steps, strategy="loop", **kw)
        torch.autograd.grad(loss, params, allow_unused=True)


def one(path: str, steps: int, tasks: int, device: torch.device) -> dict[str, float]:
    """Build, then run one meta-step of ``path`` on ``device`` and measure its peak; in this process."""
    torch.manual_seed(0)
    model = MetaNet(load("conv4"), 0, ModelConfig(arch="fixed", weights="off", proto_head=False, inner_lr=INNER_LR))
    ep = episode(tasks).to(device)
    net = conv4_module(5)
    copy_weights(model, net)
    model, net = model.to(device), net.to(device)
    run(path, model, net, episode(1, seed=1).to(device), 1)  # first-call costs (kernels, their caches) are not the step's
    synchronize(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before, reset = torch.cuda.memory_allocated(device) / 2**20, True
    else:
        reset = _reset_peak()
        before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    run(path, model, net, ep, steps)
    synchronize(device)
    wall = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rise_mb": round(peak - before, 1), "step_s": round(wall, 3), "peak_of": "step" if reset else "process"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 5 inner steps, meta-batch 2")
    ap.add_argument("--tasks", type=int, help="meta-batch (default: 8; quick: 2)")
    ap.add_argument("--one", nargs=2, metavar=("PATH", "STEPS"), help=argparse.SUPPRESS)  # a child process
    device_arg(ap)
    args = ap.parse_args()
    device = bench_device(ap, args.device)
    tasks = args.tasks or (2 if args.quick else 8)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), tasks, device)))
        return
    steps = (1, 5) if args.quick else (1, 5, 10, 20)
    paths = ("ours", "ours_checkpointed", "ours_implicit", "ours_per_task", "ours_per_task_checkpointed", "ours_per_task_implicit", "clone_loop")
    out: dict = {"bench": "memory", "quick": args.quick, "threads": torch.get_num_threads(), "torch": torch.__version__,
                 **machine(device), "network": "conv4",
                 "setting": "5-way 1-shot, 15 queries, 28x28, second order; the _implicit paths iMAML", "meta_batch": tasks, "inner_steps": list(steps)}  # fmt: skip
    here = Path(__file__).resolve()
    for path in paths:
        out[path] = {}
        for k in steps:  # a fresh process per figure: peaks do not carry over
            res = subprocess.run([sys.executable, str(here), "--one", path, str(k), "--tasks", str(tasks), "--device", args.device], capture_output=True, text=True, check=True)
            out[path][str(k)] = json.loads(res.stdout.strip().splitlines()[-1])
    hi = "10" if "10" in out["ours"] else str(steps[-1])
    out[f"ratio_{hi}_to_1"] = {p: round(out[p][hi]["peak_rise_mb"] / max(out[p]["1"]["peak_rise_mb"], 1e-9), 2) for p in paths}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
