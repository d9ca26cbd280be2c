"""Generate task-specific networks for three function families, fine-tune them, compare them.

Trains a small multimodal-regression run (or reuses one), generates a network for a
sinusoid, a linear and a tanh task, fine-tunes each a few steps on its support set, writes
each architecture as PNG and DOT, and prints how the architectures differ and their query
MSE before and after fine-tuning.

Run (about 25 seconds on 2 CPU cores, most of it training):
    python scripts/generate_example.py                    # trains 1000 steps into a temp folder
    python scripts/generate_example.py --run runs/mm      # reuses a run
    python scripts/generate_example.py --train-dir runs/mm --out docs/example
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from metanet.draw import draw_genotype_png
from metanet.export import diff_genotypes, to_dot
from metanet.network import generate
from metanet.tasks import FAMILY_NAMES, Multimodal
from metanet.trainer import TrainConfig, load_run, train

FAMILIES = ("sinusoid", "linear", "tanh")


def one_task_per_family(shots: int, queries: int, seed: int) -> dict[str, tuple]:
    """A (support x, support y, query x, query y) task of each family in FAMILIES.

    Multimodal draws the family at random; its metadata says which one, so sample until
    every wanted family has appeared.
    """
    dist = Multimodal(shots=shots, queries=queries)
    gen = torch.Generator().manual_seed(seed)
    found: dict[str, tuple] = {}
    while len(found) < len(FAMILIES):
        ep = dist.sample(8, gen)
        for b, fam in enumerate(ep.metadata.tolist()):
            name = FAMILY_NAMES[fam]
            if name in FAMILIES and name not in found:
                found[name] = (ep.support_x[b], ep.support_y[b], ep.query_x[b], ep.query_y[b])
    return {name: found[name] for name in FAMILIES}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="reuse this run directory instead of training")
    p.add_argument("--train-dir", help="train into this folder (default: a temporary one)")
    p.add_argument("--steps", type=int, default=1000, help="meta-training steps (fewer: the generator has not yet told the families apart)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "example"), help="folder for the PNG and DOT graphs (default: docs/example)")
    p.add_argument("--finetune-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (Adam)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: see below)")
    args = p.parse_args()
    # The tensors of this MLP are tiny: extra intra-op threads only add synchronisation, and
    # on a busy 2-core machine they made a meta-step 25-45x slower (0.024 s -> 0.6-1.1 s).
    torch.set_num_threads(args.threads)

    tmp = None
    if args.run:
        run = Path(args.run)
    else:
        tmp = tempfile.TemporaryDirectory() if args.train_dir is None else None
        run = Path(args.train_dir or tmp.name) / "run"
        # vmap over the 25 tasks: measured several times faster than the per-task loop for
        # this MLP on CPU (DESIGN.md, "Data flow"), so skip the calibration
        cfg = TrainConfig(space="mlp_regression", tasks="multimodal", steps=args.steps, shots=10, queries=10,
                          meta_batch=25, strategy="vmap", val_every=max(args.steps // 3, 1), val_tasks=50, seed=args.seed)
        t = time.perf_counter()
        result = train(cfg, run)
        best = result["best_val"]  # None: no validation was finite yet (10 inner steps can diverge early on)
        best_text = "none finite yet" if best is None else f"{best:.3f}"
        print(f"trained {result['step']} steps in {time.perf_counter() - t:.0f} s: best validation MSE "
              f"{best_text} after {cfg.eval_inner_steps} inner steps ({run})")
    model, cfg = load_run(run)
    model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    nets = {}
    k = cfg.eval_inner_steps
    print(f"\n{'family':9s} {'ops':38s} {'weights':>7s} {'gen ms':>6s} {'MSE generated':>13s} {'fine-tuned':>10s} {f'{k} inner steps':>14s}")
    for name, (sx, sy, qx, qy) in one_task_per_family(cfg.shots, 100, args.seed + 1).items():
        metadata = FAMILY_NAMES.index(name) if cfg.use_metadata else None
        net = generate(model, sx, sy, metadata=metadata)
        before = net.metric(qx, qy)
        net.finetune(sx, sy, steps=args.finetune_steps, lr=args.lr, optimizer="adam")
        after = net.metric(qx, qy)
        # for comparison: the meta-learned inner loop (SGD, the run's step size), as `metanet evaluate` scores
        inner = generate(model, sx, sy, metadata=metadata, adapt_steps=k).metric(qx, qy)
        ops = ", ".join(net.genotype.ops()) or "(none: every edge dropped)"
        print(f"{name:9s} {ops:38s} {net.num_params():7d} {net.generation_ms:6.2f} {before:13.3f} {after:10.3f} {inner:14.3f}")
        draw_genotype_png(net.space, net.genotype, out / f"{name}.png", title=f"{name} task: generated architecture")
        (out / f"{name}.dot").write_text(to_dot(net.graph()))
        nets[name] = net
    print(f"(query MSE on 100 points; fine-tuning: {args.finetune_steps} Adam steps, lr {args.lr}, on {cfg.shots} support points)")

    for a, b in itertools.combinations(FAMILIES, 2):
        print(f"\n{a} -> {b}:")
        print(diff_genotypes(model.space, nets[a].genotype, nets[b].genotype))
    print(f"\ngraphs: {', '.join(str(out / f'{n}.png') for n in FAMILIES)} (and .dot)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
