"""Loading image datasets once, and the share of a meta-step spent sampling episodes.

Prints ONE JSON line.

- ``load``: constructing ``MiniImageNet`` for the train and val splits (48,000 JPEGs,
  84x84 RGB) with an empty decoded-image cache (decode every file, write the cache) and
  again with the cache written (read the files to check their key, load the array), in a
  temporary cache folder that is removed afterwards.
- ``sampling``: one meta-batch of episodes (``dist.sample``) against one meta-training
  step on it (second-order MAML, 1 inner step, loop strategy, one thread), interleaved,
  median; ``share`` is sampling / (sampling + step). For mini-ImageNet 5-way 1-shot with
  15 queries, meta-batch 4, on conv4_miniimagenet (MAML) and conv_miniimagenet (metanet),
  and for multi-domain episodes (3x28x28, meta-batch 12) on conv_multidomain.
- ``input_shape``: the multi-domain input side (28, 42, 56) against the meta-step time of
  conv_multidomain at that side (random images, meta-batch 4, interleaved): what the
  default 3x28x28 saves.

``--quick`` runs the same code on a small generated image folder (no data needed).

    python scripts/bench_data.py            # about 2 minutes on 2 cores
    python scripts/bench_data.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _bench import interleaved
from metanet.meta import MetaNet, ModelConfig, meta_loss
from metanet.space import builtin_path, load, loads
from metanet.tasks import Episode
from metanet.tasks import ImageFolder, MiniImageNet, MultiDomain, shared_data_root


def _fake_folder(root: Path, classes: int = 8, per_class: int = 20, size: int = 84) -> Path:
    from PIL import Image

    g = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.jpg")
    return root


def load_times(make) -> dict:
    """Seconds to build the distributions with an empty cache, then with the cache written."""
    cache = Path(tempfile.mkdtemp(prefix="metanet-bench-cache-"))
    old = os.environ.get("METANET_CACHE")
    os.environ["METANET_CACHE"] = str(cache)
    try:
        t = time.perf_counter()
        dists = make()
        first = time.perf_counter() - t
        t = time.perf_counter()
        make()
        cached = time.perf_counter() - t
        size = sum(f.stat().st_size for f in cache.glob("*.npz"))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if old is None:
            os.environ.pop("METANET_CACHE")
        else:
            os.environ["METANET_CACHE"] = old
    images = sum(int(d.store.images.shape[0]) for d in dists)
    return {"images": images, "first_load_s": round(first, 2), "cached_load_s": round(cached, 2), "speedup": round(first / cached, 1), "cache_mb": round(size / 2**20, 1)}


def sampling_share(dist, space: str, meta_batch: int, config: ModelConfig, repeats: int, hard: bool = False) -> dict:
    """Median ms to sample a meta-batch and to run a meta-step on it, interleaved."""
    torch.manual_seed(0)
    sp = load(space)
    model = MetaNet(sp, dist.n_families, config)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    ep = dist.sample(meta_batch, g)

    def sample() -> None:
        dist.sample(meta_batch, g)

    def step() -> None:
        loss, _ = meta_loss(model, ep, inner_steps=1, order="second", hard=hard, strategy="loop", generator=g)
        torch.autograd.grad(loss, params, allow_unused=True)

    t = interleaved({"sample": sample, "step": step}, repeats)
    return {"space": space, "meta_batch": meta_batch, "sample_ms": round(1e3 * t["sample"], 2), "step_ms": round(1e3 * t["step"], 1), "share": round(t["sample"] / (t["sample"] + t["step"]), 4)}


def input_sides(sides: list[int], meta_batch: int, repeats: int) -> dict:
    """Meta-step ms of conv_multidomain with its input resized to each side, interleaved."""
    text = builtin_path("conv_multidomain").read_text()
    g = torch.Generator().manual_seed(0)
    steps = {}
    for side in sides:
        space = loads(text.replace("input: [3, 28, 28]", f"input: [3, {side}, {side}]"), f"conv_multidomain_{side}")
        torch.manual_seed(0)
        model = MetaNet(space, 0, ModelConfig(inner_lr=0.1))
        params = [p for p in model.parameters() if p.requires_grad]
        y = torch.arange(5).repeat_interleave(1).expand(meta_batch, -1).contiguous()
        yq = torch.arange(5).repeat_interleave(15).expand(meta_batch, -1).contiguous()
        ep = Episode(torch.rand(meta_batch, 5, 3, side, side, generator=g), y, torch.rand(meta_batch, 75, 3, side, side, generator=g), yq)

        def step(model=model, params=params, ep=ep) -> None:
            loss, _ = meta_loss(model, ep, inner_steps=1, order="second", hard=True, strategy="loop", generator=g)
            torch.autograd.grad(loss, params, allow_unused=True)

        steps[str(side)] = step
    t = interleaved(steps, repeats)
    base = t[str(sides[0])]
    return {"meta_batch": meta_batch, "step_ms": {k: round(1e3 * v, 1) for k, v in t.items()}, "vs_first": {k: round(v / base, 2) for k, v in t.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small generated image folder instead of mini-ImageNet")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    maml = ModelConfig(arch="fixed", weights="off", proto_head=False, inner_lr=0.01)
    ours = ModelConfig(inner_lr=0.1)  # stepped with the straight-through argmax architecture (--hard), as trained
    out: dict = {"bench": "data", "quick": args.quick, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    tmp = Path(tempfile.mkdtemp(prefix="metanet-bench-data-"))
    try:
        if args.quick:
            root = _fake_folder(tmp / "images")
            out["dataset"] = f"generated: 8 classes x 20 JPEGs, 84x84 RGB in {root.name}/"
            out["load"] = load_times(lambda: [ImageFolder(root, split="all", ways=5, shots=1, queries=15, image_size=84, channels=3, cache=True)])
            dist = ImageFolder(root, split="all", ways=5, shots=1, queries=15, image_size=84, channels=3)
            out["sampling"] = {"conv4_miniimagenet": sampling_share(dist, "conv4_miniimagenet", 2, maml, 1)}
            out["input_shape"] = input_sides([28, 42], 1, 1)
        else:
            root = shared_data_root("miniimagenet")
            if root is None:
                raise SystemExit("bench_data: no mini-ImageNet folder (../shared/data/miniimagenet); use --quick")
            out["dataset"] = "mini-ImageNet train + val (Ravi layout, 48,000 JPEGs, 84x84 RGB)"
            out["load"] = load_times(lambda: [MiniImageNet(root, split=s) for s in ("train", "val")])
            dist = MiniImageNet(root, split="train", ways=5, shots=1, queries=15)
            out["sampling"] = {
                "conv4_miniimagenet": sampling_share(dist, "conv4_miniimagenet", 4, maml, args.repeats),
                "conv_miniimagenet": sampling_share(dist, "conv_miniimagenet", 4, ours, args.repeats, hard=True),
            }
            multi = MultiDomain(data_root=shared_data_root(), split="train", ways=5, shots=1, queries=15)
            out["sampling"]["conv_multidomain"] = sampling_share(multi, "conv_multidomain", 12, ours, args.repeats, hard=True)
            out["input_shape"] = input_sides([28, 42, 56], 4, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
