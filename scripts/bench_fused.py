"""Fused vs naive mixed ops: time and activation memory of a supernet step.

Prints ONE JSON line. Measured side by side in one run: the two paths alternate, several
repeats, the median is reported with the ratio.

- ``edge``: one NB201-like edge (zero, skip, conv 1x1, conv 3x3, avg pool; 32 channels,
  14x14), 16 tasks x 80 images run as the executor runs them (a loop over tasks),
  forward + backward to alpha and the weights.
- ``conv_omniglot`` and ``darts_cnn``: the whole supernet, forward + backward, tasks of
  5-way 1-shot + 15 queries (80 images), a loop over tasks. Where the plan has edge
  groups (merged edges leaving one node, run as one convolution), ``fused_per_edge`` is
  the fused path with one convolution per edge, timed in the same interleaving.

Activation memory is the bytes of the distinct storages that autograd saves for the
backward (``torch.autograd.graph.saved_tensors_hooks``), not counting the weights and
inputs themselves: what the forward keeps alive until the backward, independent of the
allocator. For darts_cnn it also reports where the time goes per op (forward + backward of
each candidate op on its edge's input, summed over edges), since the planner merges
nothing there.

    python scripts/bench_fused.py            # about 5 minutes on 2 cores
    python scripts/bench_fused.py --quick    # under a minute
    python scripts/bench_fused.py --device cuda    # on a GPU, each time ending when its kernels have finished
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from _bench import bench_device, device_arg, freed_memory, freed_memory_arg, interleaved, machine  # scripts/_bench.py

from metanet import executor as X
from metanet.space import load, loads

EDGE_SPACE = """
name: nb201_edge
task: {kind: classification, input: [32, 14, 14], outputs: 5}
norm: none
stem: {op: conv_3x3, channels: 32}
cell: {nodes: 1, inputs: 1, preact: relu, output: last, ops: [zero, skip, conv_1x1, conv_3x3, avg_pool_3x3]}
cells: [{type: normal, channels: 32}]
head: {op: global_pool_linear}
"""


def _ratios(t: dict[str, float], mem: dict[str, int]) -> dict[str, float]:
    """Times (s) and saved-activation bytes of the naive and fused paths, as reported figures."""
    return {
        "naive_ms": round(1e3 * t["naive"], 1),
        "fused_ms": round(1e3 * t["fused"], 1),
        "speedup": round(t["naive"] / t["fused"], 2),
        "naive_act_mb": round(mem["naive"] / 2**20, 1),
        "fused_act_mb": round(mem["fused"] / 2**20, 1),
        "memory_ratio": round(mem["naive"] / mem["fused"], 2),
    }


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs its forward."""
    storages: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def batch(plan: X.Plan, tasks: int, images: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Per-task soft alpha, per-task weights (leaves) and inputs ``(B, N, *input)`` on ``device``."""
    space = plan.space
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((tasks, *space.alpha_shape), generator=g)
    alpha = torch.softmax(logits.masked_fill(~space.alpha_mask, float("-inf")), -1).to(device).requires_grad_(True)
    base = X.init_params(plan, g)
    params = {k: (v + 0.01 * torch.randn((tasks, *v.shape), generator=g)).to(device).requires_grad_(True) for k, v in base.items()}
    x = torch.randn((tasks, images, *space.task.input), generator=g).to(device)
    return alpha, params, x


def supernet_case(plan: X.Plan, tasks: int, images: int, repeats: int, device: torch.device) -> dict:
    alpha, params, x = batch(plan, tasks, images, device)
    leaves = [alpha, *params.values()]

    def forward(fused: bool) -> torch.Tensor:
        return X.run(plan, alpha, params, x, fused=fused, strategy="loop")

    def step(fused: bool) -> None:
        y = forward(fused)
        torch.autograd.grad(y.pow(2).mean(), leaves, allow_unused=True)

    per_edge_plan = X.compile(plan.space, X.ExecOptions(group_edges=False))

    def per_edge() -> None:  # fused, but one convolution per edge (no edge groups)
        y = X.run(per_edge_plan, alpha, params, x, fused=True, strategy="loop")
        torch.autograd.grad(y.pow(2).mean(), leaves, allow_unused=True)

    variants = {"naive": lambda: step(False), "fused": lambda: step(True)}
    groups = sum(len(cp.groups) for cp in plan.cells)
    if groups:
        variants["fused_per_edge"] = per_edge
    t = interleaved(variants, repeats, device)
    mem = {k: saved_bytes(lambda f=f: forward(f), [*leaves, x]) for k, f in (("naive", False), ("fused", True))}
    merged = sum(len(e.merged) for cp in plan.cells for e in cp.edges)
    out = {
        **_ratios(t, mem),
        "merged_ops": merged,
        "edges": sum(len(cp.edges) for cp in plan.cells),
        "edge_groups": groups,
    }
    if groups:  # what running each group of edges as one convolution gives, side by side
        out["fused_per_edge_ms"] = round(1e3 * t["fused_per_edge"], 1)
        out["speedup_of_edge_groups"] = round(t["fused_per_edge"] / t["fused"], 2)
    return out


def edge_case(tasks: int, images: int, repeats: int, device: torch.device) -> dict:
    """A single NB201 edge: naive vs merged on the edge alone."""
    plan = X.compile(loads(EDGE_SPACE, "nb201_edge"))
    alpha, params, _ = batch(plan, tasks, 1, device)
    # The source node's value (in a network: a norm's output); the edge applies the cell's
    # ReLU pre-activation. Either path keeps one full-size tensor for it (the naive convs
    # its ReLU, the fused convolution the value itself), and both are counted.
    x = torch.randn(tasks, images, 32, 14, 14, generator=torch.Generator().manual_seed(1)).to(device)
    leaves = [alpha, *params.values()]
    per_task = {k: v.unbind(0) for k, v in params.items()}

    def forward(fused: bool) -> torch.Tensor:
        outs = []
        for b in range(tasks):
            p = {k: v[b] for k, v in per_task.items()}
            outs.append(X.run_edge(plan, 0, 0, alpha[b], p, x[b], fused=fused))
        return torch.stack(outs)

    def step(fused: bool) -> None:
        torch.autograd.grad(forward(fused).pow(2).mean(), leaves, allow_unused=True)

    t = interleaved({"naive": lambda: step(False), "fused": lambda: step(True)}, repeats, device)
    mem = {k: saved_bytes(lambda f=f: forward(f), leaves) for k, f in (("naive", False), ("fused", True))}
    return _ratios(t, mem)


def op_breakdown(plan: X.Plan, images: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Share of a naive supernet step's op time per candidate op (forward + backward on
    each edge's input shape, summed over edges)."""
    g = torch.Generator().manual_seed(2)
    params = {k: v.to(device).requires_grad_(True) for k, v in X.init_params(plan, g).items()}
    res = plan.space.task.input[1]
    per_op: dict[str, float] = {}
    cache: dict[tuple, float] = {}
    scale = 1
    for cp in plan.cells:
        c = cp.spec.channels
        for e in cp.edges:
            for call in e.ops:
                key = (call.label, c, e.stride, res // scale)
                if key not in cache:
                    x = torch.randn(images, c, res // scale, res // scale, generator=g).relu().to(device).requires_grad_(True)

                    def run(call=call, x=x, c=c, s=e.stride) -> None:
                        y = call(x, params, c, s)
                        if y.requires_grad:
                            torch.autograd.grad(y.pow(2).mean(), [x])

                    cache[key] = interleaved({"op": run}, repeats, device)["op"]
                per_op[call.label] = per_op.get(call.label, 0.0) + cache[key]
        scale *= 2 if cp.spec.reduction else 1
    total = sum(per_op.values())
    return {k: round(v / total, 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=None)
    freed_memory_arg(ap)
    device_arg(ap)
    args = ap.parse_args()
    reused = freed_memory(args)
    device = bench_device(ap, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    repeats = args.repeats or (3 if quick else 7)
    tasks, images = (4, 40) if quick else (16, 80)
    out: dict = {"bench": "fused", "quick": quick, "threads": torch.get_num_threads(), "torch": torch.__version__, **machine(device), "repeats": repeats, "reuse_freed_memory": reused}
    out["edge"] = {"tasks": tasks, "images": images, "channels": 32, "size": 14, **edge_case(tasks, images, repeats, device)}
    # (tasks, images, repeats): darts_cnn's naive supernet saves ~0.6 GB per task of 80
    # images, so it runs fewer tasks (8 of them exhaust 23 GB).
    sizes = {"conv_omniglot": (2, 40, repeats) if quick else (8, 80, repeats), "darts_cnn": (1, 40, 1) if quick else (2, 80, 3),
             "conv_miniimagenet": (1, 10, repeats) if quick else (4, 80, repeats)}  # 3x84x84 RGB  # fmt: skip
    for name, (st, si, reps) in sizes.items():
        plan = X.compile(load(name))
        out[name] = {"tasks": st, "images": si, "repeats": reps, **supernet_case(plan, st, si, reps, device)}
    out["darts_cnn"]["naive_time_share_by_op"] = op_breakdown(X.compile(load("darts_cnn")), sizes["darts_cnn"][1], 1 if quick else 3, device)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
