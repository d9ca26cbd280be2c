"""bf16 mixed precision vs float32 meta-training: speed, and accuracy at the same steps.

Prints ONE JSON line. Trains one method on 5-way 1-shot Omniglot (15 queries per class,
second order, 1 inner step) twice from the same seed for the same number of meta-steps,
once with ``--precision fp32`` and once with ``--precision bf16``:

- ``--method maml`` (default): MAML's conv4 network (``search_spaces/conv4.yaml``, inner
  lr 0.4, learned head);
- ``--method metanet``: metanet on ``conv_omniglot`` (task-conditioned architecture
  trained hard, VAE weights, prototype head, fused mixed ops; inner lr 0.1).

Both runs train at the same time, one thread each, so each has one of the machine's
cores (until the faster one finishes: the speed ratio then understates it). Each is then
scored by ``metanet evaluate`` on the same fixed episodes of the held-out validation
alphabets (split ``val``), in float32: the discrete network and its adaptation are
float32 whatever the training precision.

Reported per precision: seconds per meta-step and tasks per second over the whole run
(validation excluded), the test accuracy after 1 inner step with its 95% interval, and the
validation accuracies during training; then the speed ratio and the accuracy difference.
Needs the Omniglot background set (``../shared/data/omniglot`` or ``METANET_DATA_ROOT``).

    python scripts/bench_precision.py                 # 500 steps, about 17 minutes on 2 cores
    python scripts/bench_precision.py --method metanet --steps 300 --meta-batch 8
    python scripts/bench_precision.py --quick         # 10 steps of 4 tasks, 100 episodes: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16")


# What each method trains: MAML's conv4 (fixed architecture, learned init and head), or
# metanet itself (conv_omniglot: task-conditioned architecture trained hard, VAE weights,
# prototype head, fused mixed ops), with the settings of the README's Omniglot runs.
METHODS = {
    "maml": ["--space", "conv4", "--arch", "fixed", "--weights", "off", "--no-proto-head", "--inner-lr", "0.4"],
    "metanet": ["--space", "conv_omniglot", "--hard", "--inner-lr", "0.1"],
}


def train_command(method: str, out: Path, precision: str, steps: int, meta_batch: int, val_every: int, seed: int) -> list[str]:
    return [
        sys.executable, "-m", "metanet", "train", "--tasks", "omniglot", *METHODS[method], "--ways", "5", "--shots", "1",
        "--queries", "15", "--meta-batch", str(meta_batch), "--inner-steps", "1", "--eval-inner-steps", "1",
        "--steps", str(steps), "--val-every", str(val_every), "--val-tasks", "100",
        "--strategy", "loop", "--precision", precision, "--seed", str(seed), "--quiet", "--out", str(out),
    ]  # fmt: skip


def metrics(run: Path) -> tuple[float, list[float]]:
    """Training seconds (validation excluded) and the validation accuracies of a run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val"]["mean"] for r in rows if "val" in r]
    train_rows = [r for r in rows if "query_loss" in r]
    return train_rows[-1]["time"], vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 steps of 4 tasks, 100 test episodes (a smoke run: minutes in bf16 on a CPU without bf16 units)")
    ap.add_argument("--method", choices=sorted(METHODS), default="maml")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step (default 16; --quick 4)")
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep the two runs here (default: a temporary folder)")
    args = ap.parse_args()
    steps = args.steps or (10 if args.quick else 500)
    args.meta_batch = args.meta_batch or (4 if args.quick else 16)
    episodes = args.episodes or (100 if args.quick else 600)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        runs = {p: root / f"{args.method}_{p}" for p in PRECISIONS}
        procs = {p: subprocess.Popen(train_command(args.method, runs[p], p, steps, args.meta_batch, max(steps // 4, 1), args.seed), env=env, stdout=subprocess.PIPE, text=True) for p in PRECISIONS}
        for p, proc in procs.items():
            out, _ = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"bench_precision: the {p} run failed (exit {proc.returncode})")
        scores = {}
        for p in PRECISIONS:  # one at a time, both threads
            res = subprocess.run([sys.executable, "-m", "metanet", "evaluate", str(runs[p]), "--episodes", str(episodes), "--inner-steps", "1", "--seed", "1234"], check=True, stdout=subprocess.PIPE, text=True)
            scores[p] = json.loads(res.stdout.strip().splitlines()[-1])
        result: dict = {"bench": "precision", "quick": args.quick, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "method": args.method, "space": METHODS[args.method][1], "seed": args.seed, "setting": "Omniglot 5-way 1-shot, 15 queries, second order, 1 inner step", "steps": steps, "meta_batch": args.meta_batch, "threads_per_run": 1, "test_episodes": episodes}
        for p in PRECISIONS:
            seconds, vals = metrics(runs[p])
            result[p] = {
                "step_s": round(seconds / steps, 3),
                "tasks_per_s": round(steps * args.meta_batch / seconds, 2),
                "accuracy": round(scores[p]["accuracy"], 4),
                "ci95": round(scores[p]["ci95"], 4),
                "val_curve": [round(v, 4) for v in vals],
            }
        result["speedup_bf16_vs_fp32"] = round(result["fp32"]["step_s"] / result["bf16"]["step_s"], 2)
        result["accuracy_bf16_minus_fp32"] = round(result["bf16"]["accuracy"] - result["fp32"]["accuracy"], 4)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
