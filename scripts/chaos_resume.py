"""Kill a training run with SIGKILL at random moments, resume it each time, compare with an unkilled run.

    python scripts/chaos_resume.py                 # 60 steps, 6 kills, report + one JSON line
    python scripts/chaos_resume.py --kills 10 --seed 3 --keep runs/chaos

Both runs are ``metanet train`` processes (mlp_regression on sinusoids, a checkpoint every
``--ckpt-every`` steps, a validation every ``--val-every``). The chaos run is killed
``--kills`` times: the first kill lands at a random moment of the first launch (possibly
while the folder and config are being written), the others after a random number of
new steps plus a random fraction of a step, so kills fall inside steps, validations and
checkpoint writes alike. After every kill each ``*.pt`` in the run folder must load, and
the run is continued with ``metanet train --resume`` (a fresh ``metanet train`` if the
kill came before the run's config was written).

At the end the final ``last.pt`` and ``best.pt`` (model, optimizer, step, RNG) must be
bitwise equal to the unkilled run's, and ``metrics.jsonl`` must hold the same rows (wall
times aside), with no step logged twice. Exit status 1 if anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from metanet import checkpoint as ckpt


def _command(args: argparse.Namespace, out: Path, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "metanet", "train", "--quiet", "--out", str(out)]
    if resume:
        return base + ["--resume"]
    return base + ["--space", "mlp_regression", "--tasks", "sinusoid", "--steps", str(args.steps), "--meta-batch", "8",
                   "--val-every", str(args.val_every), "--val-tasks", "8", "--eval-inner-steps", "2", "--log-every", "1",
                   "--ckpt-every", str(args.ckpt_every), "--strategy", "loop", "--seed", str(args.seed)]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _rows(run: Path) -> list[bytes]:
    p = run / "metrics.jsonl"
    return p.read_bytes().splitlines() if p.exists() else []


def _logged_steps(run: Path) -> int:
    """Training rows in metrics.jsonl (complete lines only)."""
    data = (run / "metrics.jsonl").read_bytes() if (run / "metrics.jsonl").exists() else b""
    return sum(1 for line in data.split(b"\n")[:-1] if b'"val"' not in line)


def _check_checkpoints(run: Path) -> tuple[int, list[str], int | None]:
    """Load every ``*.pt`` in the run: (how many loaded, errors, last.pt's step)."""
    loaded, errors, step = 0, [], None
    for p in sorted(run.glob("*.pt")):
        try:
            state = ckpt.load_checkpoint(p)
        except ckpt.CheckpointError as e:
            errors.append(str(e))
            continue
        loaded += 1
        if p.name == ckpt.LAST:
            step = state["state"]["step"]
    return loaded, errors, step


def _how(resume: bool, start: int) -> str:
    if not resume:
        return "metanet train from scratch"
    return f"metanet train --resume from step {start}" if start else "metanet train --resume (no checkpoint yet: from step 0)"


def _without_time(rows: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for line in rows:
        row = json.loads(line)
        row.pop("time", None)
        out.append(row)
    return out


def _max_diff(a: Any, b: Any, where: str = "") -> tuple[float, list[str]]:
    """Largest absolute difference between two checkpoint states, and the keys that differ at all."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return float("inf"), [where]
        if torch.equal(a, b):
            return 0.0, []
        d = float((a.double() - b.double()).abs().max()) if a.is_floating_point() else float("inf")
        return d, [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return float("inf"), [where]
        worst, keys = 0.0, []
        for k in a:
            if k == "elapsed":  # wall time
                continue
            d, ks = _max_diff(a[k], b[k], f"{where}.{k}" if where else str(k))
            worst, keys = max(worst, d), keys + ks
        return worst, keys
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return float("inf"), [where]
        worst, keys = 0.0, []
        for i, (x, y) in enumerate(zip(a, b)):
            d, ks = _max_diff(x, y, f"{where}[{i}]")
            worst, keys = max(worst, d), keys + ks
        return worst, keys
    if type(a).__module__ == "numpy":  # the numpy RNG state
        import numpy as np

        return (0.0, []) if np.array_equal(a, b) else (float("inf"), [where])
    return (0.0, []) if a == b else (float("inf"), [where])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--val-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the run and of the kill times")
    p.add_argument("--keep", help="keep both run folders here (default: a temp folder, removed)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    ref, run = root / "reference", root / "chaos"
    for d in (ref, run):
        shutil.rmtree(d, ignore_errors=True)
    env = _env()
    try:
        t0 = time.perf_counter()
        done = subprocess.run(_command(args, ref, False), env=env, capture_output=True, text=True)
        ref_wall = time.perf_counter() - t0
        if done.returncode != 0:
            print(f"reference run failed:\n{done.stderr}", file=sys.stderr)
            return 1
        print(f"reference: {args.steps} steps uninterrupted in {ref_wall:.1f}s")

        kills, launches, checked, unreadable, stale = 0, 0, 0, [], 0
        events = []
        while True:
            resume = (run / "config.yaml").exists()
            before = _logged_steps(run) if resume else 0
            start = (_check_checkpoints(run)[2] or 0) if resume else 0  # where the launch continues from
            launches += 1
            proc = subprocess.Popen(_command(args, run, resume), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            killed = False
            if kills < args.kills:
                if kills == 0:  # anywhere in the first launch, set-up included
                    deadline = time.perf_counter() + rng.uniform(0.2, 0.5 * ref_wall)
                    while time.perf_counter() < deadline and proc.poll() is None:
                        time.sleep(0.01)
                else:  # after a random number of new steps, then a random part of a step
                    remaining = args.steps - before
                    target = before + rng.randint(1, max(1, remaining // (args.kills - kills + 1)))
                    while proc.poll() is None and _logged_steps(run) < target:
                        time.sleep(0.005)
                    time.sleep(rng.uniform(0.0, 0.1))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
            out, err = proc.communicate()
            if not killed:
                if proc.returncode != 0:
                    print(f"launch {launches} failed (exit {proc.returncode}):\n{err}", file=sys.stderr)
                    return 1
                events.append(f"launch {launches}: {_how(resume, start)}, ran to the end")
                break
            kills += 1
            stale += sum(1 for f in run.glob(".*.tmp-*")) if run.exists() else 0
            n, errors, step = _check_checkpoints(run) if run.exists() else (0, [], None)
            checked += n
            unreadable += errors
            logged = _logged_steps(run) if run.exists() else 0
            if not (run / "config.yaml").exists():
                where = "before the run's config was written"
            else:
                where = f"at step {logged + 1} (last.pt: {'none yet' if step is None else f'step {step}'}, {logged - (step or 0)} logged step(s) to replay)"
            events.append(f"launch {launches}: {_how(resume, start)}, SIGKILL {where}; {n} checkpoint(s) load, {len(errors)} do not")

        for e in events:
            print(e)
        diffs = {}
        for name in (ckpt.LAST, ckpt.BEST):
            a, b = ckpt.load_checkpoint(ref / name), ckpt.load_checkpoint(run / name)
            diffs[name] = _max_diff(a, b)
        rows_ref, rows_run = _rows(ref), _rows(run)
        steps = [(r["step"], "val" in r) for r in _without_time(rows_run)]
        duplicates = len(steps) - len(set(steps))
        rows_equal = _without_time(rows_ref) == _without_time(rows_run)
        bitwise = all(d == 0.0 and not keys for d, keys in diffs.values())
        ok = kills >= args.kills and not unreadable and bitwise and rows_equal and duplicates == 0
        print(f"kills: {kills}, launches: {launches}, checkpoints loaded after kills: {checked}, unreadable: {len(unreadable)}, temp files of killed writers seen: {stale}")
        for name, (d, keys) in diffs.items():
            print(f"{name}: max |difference| vs the unkilled run {d:g}" + (f" in {', '.join(keys[:5])}" if keys else " (bitwise equal: model, optimizer, step, RNG)"))
        print(f"metrics.jsonl: {len(rows_run)} rows, {'identical to' if rows_equal else 'DIFFERENT from'} the unkilled run's (wall times aside), {duplicates} duplicated")
        for e in unreadable:
            print(f"unreadable: {e}")
        print("OK" if ok else "FAILED")
        print(json.dumps({
            "steps": args.steps, "kills": kills, "launches": launches, "checkpoints_loaded_after_kills": checked,
            "unreadable": len(unreadable), "last_max_abs_diff": diffs[ckpt.LAST][0], "best_max_abs_diff": diffs[ckpt.BEST][0],
            "bitwise_equal": bitwise, "metrics_rows_equal": rows_equal, "duplicated_rows": duplicates, "ok": ok,
        }))  # fmt: skip
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
