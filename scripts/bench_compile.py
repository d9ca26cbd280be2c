"""``metanet train --compile``: the compiled meta-step against the eager one.

Prints ONE JSON line. The trainer's own step function (``trainer.step_function``: the
VAE weight generator, the conditional architecture generator and a second-order inner
step; loss and meta-gradients) on sinusoid regression with the ``mlp_regression`` space,
compiled through the same check the trainer runs (``trainer.compiled_step``), then
timed against eager on the same meta-batches: interleaved, several repeats, median.

The check compares the compiled loss and meta-gradients with eager on the first
meta-batch (``max_rel_error``); ``compile_s`` is the first compiled call, compilation
included. The loop strategy unrolls the tasks into one graph, so it compiles much longer.

    python scripts/bench_compile.py                  # vmap, meta-batch 25: about 2 minutes
    python scripts/bench_compile.py --quick          # meta-batch 4
    python scripts/bench_compile.py --strategy loop  # about 8 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json

import torch

from _bench import interleaved  # scripts/_bench.py

from metanet.trainer import TrainConfig, build_model, build_space, build_tasks, compiled_step, episode_args, step_function, step_keywords


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="meta-batch 4, 3 repeats")
    ap.add_argument("--strategy", choices=("vmap", "loop"), default="vmap")
    ap.add_argument("--meta-batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    tasks = args.meta_batch or (4 if args.quick else 25)
    repeats = args.repeats or (3 if args.quick else 15)
    cfg = TrainConfig(space="mlp_regression", tasks="sinusoid", meta_batch=tasks, strategy=args.strategy)
    space, dist = build_space(cfg), build_tasks(cfg)
    model = build_model(cfg, space, dist.n_families)
    params = [p for p in model.parameters() if p.requires_grad]
    noise, gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    eager = step_function(model, slice(0, tasks), noise, params, step_keywords(cfg, cfg.strategy))
    compiled, info = compiled_step(eager, dist.sample(tasks, gen), cfg.temperature, noise)
    episodes = [episode_args(dist.sample(tasks, gen)) for _ in range(3)]
    turn = {"eager": 0, "compiled": 0}

    def run(name: str, fn) -> None:
        fn(*episodes[turn[name] % 3], cfg.temperature)
        turn[name] += 1

    med = interleaved({"eager": lambda: run("eager", eager), "compiled": lambda: run("compiled", compiled)}, repeats)
    print(json.dumps({
        "bench": "compile",
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "space": "mlp_regression",
        "setting": f"sinusoid {cfg.shots}-shot, VAE + conditional architecture, second order, 1 inner step, {args.strategy}",
        "meta_batch": tasks,
        "repeats": repeats,
        "check": info,
        "step_ms": {k: round(1e3 * v, 2) for k, v in med.items()},
        "speedup": round(med["eager"] / med["compiled"], 2) if info["compiled"] else None,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
