"""Reproduce the results tables: every method is a configuration of the same trainer.

MAML, first-order MAML, Reptile, Meta-SGD, ProtoNet, MetaNAS-style shared search and
metanet (with its ablations) are rows of ``METHODS``: ``TrainConfig`` overrides, trained
by ``metanet.trainer.train`` with the same wall-clock budget per method and seed, then
evaluated by ``metanet.meta.evaluate`` (generate, discretise, adapt the discrete network
k steps on the support set, score the query set) on fixed test tasks that every method
and seed shares. Writes ``OUT/RESULTS.md``, ``OUT/results/results.json`` and the PNG plots
in ``OUT/results/``; run directories (checkpoints, ``metrics.jsonl``) go to ``--runs``.

    python scripts/reproduce.py --smoke                       # every row, tiny budget, temp dir
    python scripts/reproduce.py --table sinusoid multimodal --minutes 0.3 --seeds 3 --jobs 2
    python scripts/reproduce.py --table omniglot --minutes 10 --seeds 1 --data-root DIR
    python scripts/reproduce.py --table miniimagenet --methods metanet protonet --minutes 60 --jobs 2
    python scripts/reproduce.py --table sinusoid --methods maml metanet --shots 5 --out /tmp/row

Running several tables by separate commands into the same ``--out`` merges them: each
table keeps the command and date that produced it, and so does each setting of a table
that a later command did not run (``--ways 20`` after ``--ways 5``), and so does each row
of a setting that a later command ran without that method, where both scored the setting
with the same budget, seeds and test tasks (a row from another CPU says so): to
add rows to a setting, run it with the new methods alone (or with every row and
``--reuse``: finished runs are not redone). A
table with ``train_shots`` (mini-ImageNet, multi-domain) trains each method once, at that
many shots, and scores the same model at every shot setting: its prototype head serves
any shot and way.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metanet.config import ConfigError
from metanet.draw import draw_population_png
from metanet.export import op_frequency
from metanet.graph import population_health
from metanet.meta import MetaNet, evaluate, generate_networks, meta_loss
from metanet.network import generate_batch
from metanet.results import aggregate_seeds, from_json, merge_settings, pool, table_commands, table_markdown, to_json
from metanet.tasks import Episode, default_data_root, domain_folder, make_tasks, shared_data_root
from metanet.tuning import cpu_model
from metanet.trainer import TrainConfig, load_run, train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs"
TEST_SEED = 20_170_703  # test tasks: one fixed set for every method and seed
CURVE_STEPS = 10  # adaptation curves: 0..CURVE_STEPS inner steps (smoke: 2); cost: as many steps
NEVER = 10**12  # val_every: validate only once, after the budget
RESULTS_FORMAT = "metanet.reproduce"
RESULTS_VERSION = 1


# ---------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A method as ``TrainConfig`` overrides; ``search`` methods use the searchable space."""

    name: str
    about: str
    overrides: dict[str, Any] = field(default_factory=dict)
    search: bool = True  # searchable space (mlp_regression / conv_omniglot) or the fixed one
    tables: tuple[str, ...] = ("sinusoid", "multimodal", "omniglot")
    # the image tables beyond omniglot take only the main baselines and metanet
    default: bool = True  # run unless --methods names others; False: only when named


_FIXED = {"arch": "fixed", "weights": "off", "proto_head": False}
_REMEDY_TABLES = ("multimodal", "omniglot", "multidomain")
# metanet-remedies and its shared-architecture twin share these (the MLP map exists only where the architecture is conditional)
_REMEDIES = {"arch_warmup": 0.25, "param_prior": 0.5, "op_dropout": 0.3}
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("maml", "MAML: fixed network, learned initial weights, second order", dict(_FIXED), search=False,
           tables=("sinusoid", "multimodal", "omniglot", "miniimagenet", "multidomain")),
    Method("fomaml", "first-order MAML", dict(_FIXED, order="first"), search=False),
    Method("reptile", "Reptile, 5 inner steps", dict(_FIXED, order="reptile", inner_steps=5), search=False),
    Method("metasgd", "Meta-SGD: MAML + a learned step size per weight", dict(_FIXED, meta_sgd=True), search=False),
    # iMAML rows on Omniglot only: from the sinusoid table's initial weights (mlp_maml, inner lr 0.01) five inner
    # steps diverge, second order as well (loss 56.7 before the steps, 3917 after one, NaN after five), and 12-second
    # runs of both iMAML rows stopped on non-finite losses in 7 of 9 (setting, seed) pairs each
    Method("imaml", "iMAML: MAML with the implicit gradient of a proximal inner problem (lambda 1, 5 inner steps, 5 conjugate-gradient steps); evaluation adapts with the same term",
           dict(_FIXED, order="implicit", prox=1.0, inner_steps=5), search=False, tables=("omniglot",), default=False),
    Method("protonet", "prototypical network: conv4 features, prototype head, no inner steps",
           {"arch": "fixed", "weights": "off", "proto_head": True, "inner_steps": 0, "eval_inner_steps": 0},
           search=False, tables=("omniglot", "miniimagenet", "multidomain")),
    Method("protomaml", "Proto-MAML: MAML on conv4 with the prototype head metanet uses (inner lr 0.1)",
           {"arch": "fixed", "weights": "off", "proto_head": True, "inner_lr": 0.1}, search=False, tables=("omniglot", "miniimagenet", "multidomain")),
    # the other meta-learners of the literature, on the same fixed conv4 and the same trainer
    *(Method(name, about, {"arch": "fixed", "weights": "off", "proto_head": False, "head": head, "inner_steps": 0, "eval_inner_steps": 0},
             search=False, tables=("omniglot", "miniimagenet"), default=False) for name, about, head in (
        ("matchingnet", "Matching Networks: cosine attention over the support set (no full-context embeddings); no inner loop (the same at every step count; 'generate' is the time to classify a task)", "matching"),
        ("relationnet", "Relation Networks: a learned relation module scores (query, class) pairs; no inner loop (the same at every step count; 'generate' is the time to classify a task)", "relation"),
        ("mann", "memory-augmented network: LSTM controller, LRU memory over the support sequence; no inner loop (the same at every step count; 'generate' is the time to classify a task)", "memory"),
    )),
    Method("lstm-meta", "LSTM meta-learner (Ravi & Larochelle): MAML whose inner update is a learned coordinate-wise LSTM", dict(_FIXED, inner_optimizer="lstm"),
           search=False, tables=("omniglot", "miniimagenet"), default=False),
    Method("metanas", "MetaNAS-style: one meta-learned soft architecture for all tasks, learned init",
           {"arch": "shared", "weights": "off"}, tables=("sinusoid", "multimodal", "omniglot", "multidomain")),
    Method("metanet", "metanet: task-conditional architecture + VAE weight generator", {},
           tables=("sinusoid", "multimodal", "omniglot", "miniimagenet", "multidomain")),
    Method("metanet-lstm", "metanet with the LSTM inner optimizer", {"inner_optimizer": "lstm"}, tables=("omniglot", "miniimagenet"), default=False),
    Method("metanet-no-archgen", "ablation: shared architecture, VAE weights", {"arch": "shared", "weights": "vae"},
           tables=("sinusoid", "multimodal", "omniglot", "multidomain")),
    Method("metanet-no-weightgen", "ablation: conditional architecture, learned init", {"arch": "conditional", "weights": "off"}),
    Method("metanet-no-metadata", "ablation: task metadata withheld", {"use_metadata": False}, tables=("multimodal",)),
    Method("metanet-first-order", "ablation: first-order outer gradient", {"order": "first"}),
    Method("metanet-implicit", "metanet with iMAML's implicit outer gradient (lambda 1, 5 inner steps); evaluation adapts with the same proximal term",
           {"order": "implicit", "prox": 1.0, "inner_steps": 5}, tables=("omniglot",), default=False),
    Method("metanet-unfused", "ablation: unfused mixed ops (same maths, slower)", {"fused": False}),
    # remedies against architecture collapse, one at a time and together; run when named (--methods)
    *(Method(name, about, over, tables=_REMEDY_TABLES, default=False) for name, about, over in (
        ("metanet-warmup", "remedy: the architecture generator frozen for the first 25% of the budget", {"arch_warmup": 0.25}),
        ("metanet-archlr", "remedy: the architecture generator on its own learning rate, 3e-4", {"arch_lr": 3e-4}),
        ("metanet-prior", "remedy: a prior against parameter-free ops (weight 0.5)", {"param_prior": 0.5}),
        ("metanet-opdrop", "remedy: operation-level dropout of parameter-free ops, p = 0.3", {"op_dropout": 0.3}),
        ("metanet-mlp", "remedy: an MLP (64 hidden) from the task embedding to the architecture", {"arch_hidden": 64}),
        ("metanet-norm", "remedy: the architecture map reads the task embedding layer-normalised", {"arch_norm": True}),
        ("metanet-prior-norm", "remedies: the prior (0.5) and the layer-normalised architecture map", {"param_prior": 0.5, "arch_norm": True}),
        ("metanet-gumbel", "remedy: per-task Gumbel architectures, temperature 1 -> 0.3", {"gumbel": True, "final_temperature": 0.3}),
        ("metanet-adaptalpha", "remedy: the inner loop adapts the architecture logits too", {"adapt_alpha": True}),
        ("metanet-remedies", "remedies together: warm-up, prior, op dropout, MLP", {**_REMEDIES, "arch_hidden": 64}),
        ("metanet-prior-warmup", "remedies: the prior (0.5) and the warm-up (25%)", {"param_prior": 0.5, "arch_warmup": 0.25}),
        # the shared-architecture ablation under the same prior: whether a prior's gain comes from conditioning
        ("metanet-no-archgen-prior", "ablation of metanet-prior: shared architecture, VAE weights, the same prior", {"arch": "shared", "weights": "vae", "param_prior": 0.5}),
        ("metanet-no-archgen-remedies", "ablation of metanet-remedies: shared architecture, VAE weights, the same warm-up, prior and op dropout",
         {"arch": "shared", "weights": "vae", **_REMEDIES}),
    )),
)}  # fmt: skip


# ----------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Table:
    """One results table: its task distribution, settings, spaces and evaluation."""

    name: str
    title: str
    kind: str  # regression | classification
    fixed_space: str
    search_space: str
    eval_steps: tuple[int, ...]  # table columns: metric after k inner steps
    train: dict[str, Any]  # TrainConfig fields shared by every row
    strategy: str  # default task-execution strategy (DESIGN: loop is faster for conv4 on CPU)
    per_family: bool = False
    search_train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields for the searchable-space rows only
    train_shots: int | None = None  # train once at this many shots and score every shot setting with that model
    test_queries: int = 5  # classification: query images per class of a test task

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "MSE"


TABLES: dict[str, Table] = {t.name: t for t in (
    # The searchable rows of every table train the straight-through argmax architecture
    # (hard=True): for these keep-all spaces that is exactly the discrete network they are
    # scored with. Trained soft (1-min multimodal runs), metanet's discrete network scored
    # 8.9 test MSE after 1 step against a training loss near 0.5; trained hard, 0.81.
    Table("sinusoid", "Sinusoid regression", "regression", "mlp_maml", "mlp_regression", (1, 10),
          {"tasks": "sinusoid", "queries": 10, "meta_batch": 25, "inner_steps": 1, "eval_inner_steps": 10, "inner_lr": 0.01}, "auto",
          search_train={"hard": True}),
    # The searchable rows bound the VAE's weight modulation (--weight-bound 3): unbounded, 3-minute runs diverged in
    # training in 2 of 6 (metanet seed 1 and its shared-architecture ablation seed 0, the latent's KL rising from
    # 40 to 26,000 over 80 steps after a loss spike).
    Table("multimodal", "Multimodal regression (5 function families)", "regression", "mlp_maml", "mlp_regression", (1, 10),
          {"tasks": "multimodal", "queries": 10, "meta_batch": 25, "inner_steps": 1, "eval_inner_steps": 10, "inner_lr": 0.01}, "auto",
          per_family=True, search_train={"hard": True, "weight_bound": 3.0}),
    Table("omniglot", "Omniglot few-shot classification", "classification", "conv4", "conv_omniglot", (0, 1, 10),
          {"tasks": "omniglot", "queries": 5, "meta_batch": 16, "inner_steps": 1, "eval_inner_steps": 3, "inner_lr": 0.4}, "loop",
          # the searchable rows train the straight-through argmax architecture (the discrete network they are scored
          # with: no discretisation gap) with the prototype head, at the inner lr that suits that head
          search_train={"hard": True, "inner_lr": 0.1}),
    # 84x84 RGB, 5-way; one training per method (1-shot) scored at 1 and 5 shots, 15 queries per class as in the papers
    Table("miniimagenet", "mini-ImageNet few-shot classification", "classification", "conv4_miniimagenet", "conv_miniimagenet", (0, 1, 10),
          {"tasks": "miniimagenet", "queries": 15, "meta_batch": 4, "inner_steps": 1, "eval_inner_steps": 3, "inner_lr": 0.01}, "loop",
          search_train={"hard": True, "inner_lr": 0.1}, train_shots=1, test_queries=15),
    # each task from one domain (--domains), all as 3x28x28 RGB, the domain id as metadata; scored per domain on
    # held-apart classes and on a domain left out of training (--left-out); trained once (1-shot), scored at 1 and 5 shots
    Table("multidomain", "Multi-domain few-shot classification", "classification", "conv4_multidomain", "conv_multidomain", (0, 1, 10),
          {"tasks": "multidomain", "queries": 5, "meta_batch": 12, "inner_steps": 1, "eval_inner_steps": 3, "inner_lr": 0.1}, "loop",
          per_family=True, search_train={"hard": True, "inner_lr": 0.1}, train_shots=1, test_queries=5),
)}  # fmt: skip
TABLE_ORDER = tuple(TABLES)

DEFAULT_SHOTS = {"sinusoid": (5, 10, 20), "multimodal": (5,), "omniglot": (1, 5), "miniimagenet": (1, 5), "multidomain": (1, 5)}
DEFAULT_WAYS = {"omniglot": (5, 20), "miniimagenet": (5,), "multidomain": (5,)}  # mini-ImageNet's 16 validation classes allow no 20-way task
SMOKE_WAYS = (2, 3)
SMOKE_SHOTS = {"sinusoid": (5, 10, 20), "multimodal": (5,), "omniglot": (1, 2), "miniimagenet": (1, 2), "multidomain": (1, 2)}


@dataclass(frozen=True)
class Setting:
    """One block of rows: a table at one (ways, shots)."""

    table: str
    shots: int
    ways: int = 0  # 0: regression

    @property
    def label(self) -> str:
        return f"{self.ways}-way {self.shots}-shot" if self.ways else f"{self.shots}-shot"

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "").replace("-", "")

    def args(self) -> list[str]:
        return (["--ways", str(self.ways)] if self.ways else []) + ["--shots", str(self.shots)]


# ----------------------------------------------------------------------- test episodes


class TestEpisodes:
    """The episodes of ``fixed_episodes(dist, n_tasks, batch, seed)``, sampled lazily.

    Re-iterable, and holds no images: 600 20-way 5-shot Omniglot tasks would be 376 MB.
    ``limit`` keeps the first ``limit`` episodes.
    """

    def __init__(self, dist: Any, n_tasks: int, batch: int, seed: int, limit: int | None = None):
        self.dist, self.n_tasks, self.batch, self.seed, self.limit = dist, n_tasks, batch, seed, limit

    def __iter__(self) -> Iterator[Episode]:
        generator = torch.Generator().manual_seed(self.seed)  # as fixed_episodes
        sizes = [self.batch] * (self.n_tasks // self.batch) + ([self.n_tasks % self.batch] if self.n_tasks % self.batch else [])
        for size in sizes[: self.limit]:
            yield self.dist.sample(size, generator)


class FamilyEpisodes:
    """The tasks of ``episodes`` whose metadata is ``family``."""

    def __init__(self, episodes: TestEpisodes, family: int):
        self.episodes, self.family = episodes, family

    def __iter__(self) -> Iterator[Episode]:
        for ep in self.episodes:
            keep = ep.metadata == self.family  # (B,)
            if bool(keep.any()):
                yield Episode(ep.support_x[keep], ep.support_y[keep], ep.query_x[keep], ep.query_y[keep], ep.metadata[keep])


def _worker_setup() -> None:
    """One intra-op thread per run: runs in parallel processes do not compete for cores."""
    torch.set_num_threads(1)


def _test_dist(test: dict[str, Any], domains: str | None = None) -> Any:
    if test["tasks"] == "multidomain":  # the held-apart classes of the training domains, or the given (left-out) ones
        names = tuple(test["domains"].split(","))
        return make_tasks("multidomain", domains=tuple(domains.split(",")) if domains else names, data_root=test["data_root"], split=test["split"] if not domains else "all",
                                      ways=test["ways"], shots=test["shots"], queries=test["queries"], family_names=names)  # fmt: skip
    if test["tasks"] == "miniimagenet":
        return make_tasks("miniimagenet", root=test["data_root"], split=test["split"], ways=test["ways"], shots=test["shots"], queries=test["queries"])
    if test["tasks"] == "omniglot":
        return make_tasks("omniglot", root=test["data_root"], split=test["split"], ways=test["ways"], shots=test["shots"], queries=test["queries"], rotations=test["rotations"])
    kw = {"with_metadata": True} if test["tasks"] == "multimodal" else {}  # metadata to split by family
    return make_tasks(test["tasks"], shots=test["shots"], queries=test["queries"], **kw)


# ------------------------------------------------------------------------------ a job


_NOT_IDENTITY = ("reuse", "population_png")  # how a job is run and where its plot goes, not what it computes


def _job_spec(job: dict[str, Any]) -> dict[str, Any]:
    """What identifies a job's result (``--reuse`` compares it): the job without its reuse
    mode and its plot's path (another ``--out`` must not retrain a finished run)."""
    return {k: v for k, v in job.items() if k not in _NOT_IDENTITY}


def _differences(saved: Any, spec: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys (``cfg.inner_lr``) where a saved job differs from ``spec``."""
    if not isinstance(saved, dict):
        return [prefix.rstrip(".") or "job"]
    out = []
    for k in sorted(set(saved) | set(spec), key=str):
        a, b = saved.get(k), spec.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _with_new_defaults(saved_job: Any, spec: dict[str, Any]) -> Any:
    """A saved job as it reads today: the config keys of ``spec`` that the saved job lacks
    (fields ``TrainConfig`` gained after the run, e.g. ``precision``) take their defaults,
    which are the behaviour the run had; so a new field does not make ``--reuse`` retrain
    every finished run."""
    if not (isinstance(saved_job, dict) and isinstance(saved_job.get("cfg"), dict) and isinstance(spec.get("cfg"), dict)):
        return saved_job
    defaults = dataclasses.asdict(TrainConfig())
    added = {k: defaults[k] for k in spec["cfg"] if k not in saved_job["cfg"] and k in defaults}
    return dict(saved_job, cfg={**added, **saved_job["cfg"]})


def _carry_population_png(old: Any, job: dict[str, Any]) -> None:
    """A reused run's population plot (drawn at ``old``), copied to where this job's report links it."""
    new = job.get("population_png")
    if isinstance(old, str) and new and old != new and Path(old).is_file():
        Path(new).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(old, new)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (table, setting, method, seed), evaluate it on the test tasks, return figures.

    With ``job["reuse"]`` a finished run whose saved job equals this one is not redone;
    with ``job["reuse"] == "training"`` its training is kept and the evaluation redone.
    """
    run_dir = Path(job["run_dir"])
    cached = run_dir / "result.json"
    spec = _job_spec(job)
    saved = None
    if job["reuse"] and cached.is_file():
        saved = from_json(json.loads(cached.read_text()))
        saved_job = _with_new_defaults(saved.get("job"), spec)
        saved_job = _job_spec(saved_job) if isinstance(saved_job, dict) else saved_job
        if saved_job != spec:
            print(f"{run_dir}: redone, its saved job differs in {', '.join(_differences(saved_job, spec)[:5])}", file=sys.stderr, flush=True)
            saved = None
        elif "error" in saved:  # a run that failed stays failed: --reuse must not retrain it until it passes
            return {"error": saved["error"], "reused": True}
        elif job["reuse"] != "training":
            _carry_population_png(saved.get("population_png") or (saved.get("job") or {}).get("population_png"), job)
            saved["reused"] = True
            return saved
    cfg = TrainConfig(**job["cfg"])
    if saved is not None:
        summary, train_wall = saved["train"], saved["train_wall_s"]
    elif job.get("train_dir"):  # trained by the job of the table's train_shots setting
        trained = from_json(json.loads((Path(job["train_dir"]) / "result.json").read_text()))
        if "error" in trained:
            raise RuntimeError(f"its training run failed: {trained['error']}")
        summary, train_wall, cpu = trained["train"], trained["train_wall_s"], trained.get("cpu")
    else:
        cpu = f"{torch.backends.cpu.get_cpu_capability()}, {cpu_model()}"  # what the figures depend on
        t0 = time.perf_counter()
        summary = train(cfg, run_dir)
        train_wall = time.perf_counter() - t0
    model, _ = load_run(job.get("train_dir") or run_dir, "last")  # validation runs only after the budget: last = final
    test = job["test"]
    dist = _test_dist(test)
    episodes = TestEpisodes(dist, test["n"], test["batch"], test["seed"])
    t0 = time.perf_counter()
    result: dict[str, Any] = {"job": spec, "train": summary, "train_wall_s": train_wall, "cpu": cpu, "population_png": job.get("population_png")}
    steps = job["eval_steps"]
    if job["per_family"]:
        present = torch.cat([ep.metadata for ep in episodes]).bincount(minlength=len(dist.families))  # (F,) tasks per family
        empty = {"mean": math.nan, "ci95": math.nan, "n": 0}
        families = {
            name: {str(k): v for k, v in evaluate(model, FamilyEpisodes(episodes, f), steps).items()} if present[f] else {str(k): dict(empty) for k in steps}
            for f, name in enumerate(dist.families)
        }
        result["families"] = families
        result["scores"] = {str(k): pool([families[name][str(k)] for name in families]) for k in steps}
        if test.get("left_out"):  # a domain never trained on: its own test tasks, every class, the unknown-domain id
            left = TestEpisodes(_test_dist(test, test["left_out"]), test["n"], test["batch"], test["seed"])
            families[f"{test['left_out']} (left out)"] = {str(k): v for k, v in evaluate(model, left, steps).items()}
    else:
        result["scores"] = {str(k): v for k, v in evaluate(model, episodes, steps).items()}
    limit = max(1, math.ceil(job["curve_tasks"] / test["batch"]))
    curve = evaluate(model, TestEpisodes(dist, test["n"], test["batch"], test["seed"], limit=limit), range(job["curve_steps"] + 1))
    result["curve"] = [curve[k]["mean"] for k in sorted(curve)]
    result["curve_tasks"] = min(test["n"], limit * test["batch"])
    result["cost"] = _cost(model, next(iter(episodes)), job["cost_tasks"], job["curve_steps"], job["cost_repeats"])
    if cfg.arch != "fixed":
        result["population"] = _population(model, episodes, job.get("population_png"))
    if not cfg.fused:
        result["fused_check"] = _fused_check(model, next(iter(episodes)), cfg)
    result["eval_wall_s"] = time.perf_counter() - t0
    run_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(to_json(result), indent=1, allow_nan=False))
    return result


def _cost(model: MetaNet, ep: Episode, tasks: int, steps: int, repeats: int) -> dict[str, float]:
    """Per new task: generation time (generators + discretise + build the module) and ``steps`` inner steps.

    Generation is timed ``repeats`` more times after a warm-up, and the fastest kept. An
    episodic head (Matching, Relation, memory networks) emits no network: its cost per
    new task is classifying the task's queries from its support set (``evaluate``).
    """
    t = min(tasks, ep.batch_size)
    if model.head is not None:
        sub = ep.slice(slice(0, t))

        def classify_ms() -> float:
            start = time.perf_counter()
            evaluate(model, [sub], 0)
            return 1e3 * (time.perf_counter() - start) / t

        ms = min(classify_ms() for _ in range(1 + repeats))
        body = [sum(v.numel() for k, v in net.params.items() if not k.startswith("head.")) for net in generate_networks(model, sub)]  # the linear head is unused
        weights = sum(body) / t + sum(p.numel() for p in model.head.parameters())
        return {"generation_ms": ms, "adapt_ms": 0.0, "adapt_steps": 0, "params": weights, "tasks": t}
    meta = ep.metadata[:t] if ep.metadata is not None and model.encoder.family is not None else None
    args = (model, ep.support_x[:t], ep.support_y[:t], meta)
    if repeats:
        generate_batch(*args)  # warm-up
    nets = generate_batch(*args, adapt_steps=steps)
    gen_ms = min([sum(n.generation_ms for n in nets) / t] + [sum(n.generation_ms for n in generate_batch(*args)) / t for _ in range(repeats)])
    return {
        "generation_ms": gen_ms,
        "adapt_ms": sum(n.adapt_ms for n in nets) / t,
        "adapt_steps": steps,
        "params": sum(n.num_params() for n in nets) / t,
        "tasks": t,
    }


def _population(model: MetaNet, episodes: TestEpisodes, png: str | None) -> dict[str, Any]:
    """The test tasks' genotypes: how many distinct, op frequency per edge, collapse."""
    genotypes, families, alphas = [], [], []
    for ep in episodes:
        nets = generate_networks(model, ep)
        genotypes += [net.genotype for net in nets]
        alphas += [net.alpha for net in nets]
        families += ep.metadata.tolist() if ep.metadata is not None else []
    health = population_health(model.space, genotypes, families or None, torch.stack(alphas))
    freq, labels = op_frequency(model.space, genotypes)
    counts: dict[str, int] = {}
    for g in genotypes:
        counts[g.to_json()] = counts.get(g.to_json(), 0) + 1
    top = max(counts, key=counts.get)
    if png:
        draw_population_png(model.space, genotypes, png)
    return {
        "tasks": len(genotypes),
        "distinct": len(counts),
        "top_share": counts[top] / len(genotypes),
        "collapsed": len(counts) == 1,
        "labels": labels,
        "edges": [f"c{e.cell} e{e.src}->{e.dst}" for e in model.space.edges],
        "freq": freq.tolist(),
        "top_genotype": json.loads(top),
        **{k: health[k] for k in ("parametric_share", "mean_entropy", "distinct_per_family", "mutual_information") if k in health},
    }


def _fused_check(model: MetaNet, ep: Episode, cfg: TrainConfig, tasks: int = 4) -> dict[str, float]:
    """The meta-objective of a few test tasks with fused and with unfused mixed ops, same weights.

    In float64: float32 convolutions differ from run to run in the last bits, and a small
    loss turns that into a relative difference of 1e-4, which would hide what is checked.
    """
    b = min(tasks, ep.batch_size)

    def f64(t: torch.Tensor | None) -> torch.Tensor | None:
        return t[:b].double() if t is not None and t.is_floating_point() else (None if t is None else t[:b])

    ep64 = Episode(f64(ep.support_x), f64(ep.support_y), f64(ep.query_x), f64(ep.query_y), f64(ep.metadata))
    losses = {}
    for fused in (True, False):
        m = MetaNet(model.space, model.encoder.n_families, dataclasses.replace(model.config, fused=fused))
        m.load_state_dict(model.state_dict())
        m.double().train()
        loss, _ = meta_loss(m, ep64, inner_steps=cfg.inner_steps, order=cfg.order, beta=cfg.beta, strategy="loop", generator=torch.Generator().manual_seed(0), cg_steps=cfg.cg_steps)
        losses["fused" if fused else "unfused"] = float(loss.detach())
    diff = abs(losses["fused"] - losses["unfused"])
    return {**losses, "abs_diff": diff, "rel_diff": diff / max(abs(losses["fused"]), 1e-12), "dtype": "float64", "tasks": b}


# ----------------------------------------------------------------------- planning jobs


def _budget(args: argparse.Namespace) -> dict[str, Any]:
    if args.steps is not None:
        return {"steps": args.steps, "minutes": None}
    return {"steps": None, "minutes": args.minutes}


def budget_label(args: argparse.Namespace) -> str:
    """The per-method, per-seed budget in words."""
    if args.steps is not None:
        return f"{args.steps} meta-steps"
    m = args.minutes
    return f"{m:g} min" if m >= 1 else f"{60 * m:g} s"


def settings_for(table: str, args: argparse.Namespace) -> list[Setting]:
    """The settings of a table, from ``--shots``/``--ways`` or the defaults."""
    shots = tuple(args.shots) if args.shots else (SMOKE_SHOTS if args.smoke else DEFAULT_SHOTS)[table]
    if TABLES[table].kind == "classification":
        ways = tuple(args.ways) if args.ways else (SMOKE_WAYS if args.smoke else DEFAULT_WAYS[table])
        return [Setting(table, s, w) for w in ways for s in shots]
    return [Setting(table, s) for s in shots]


def methods_for(table: str, args: argparse.Namespace) -> list[Method]:
    wanted = args.methods or [m for m in METHODS if METHODS[m].default]
    return [METHODS[m] for m in wanted if table in METHODS[m].tables]


def seeds_for(table: str, args: argparse.Namespace) -> int:
    if args.smoke:
        return 1
    return args.seeds or (1 if TABLES[table].kind == "classification" else 3)


def eval_steps_for(table: str, args: argparse.Namespace) -> list[int]:
    """The table's columns: metric after k inner steps (smoke: at most 2 steps)."""
    steps = TABLES[table].eval_steps
    return sorted({min(k, 2) for k in steps}) if args.smoke else list(steps)


def make_config(table: Table, setting: Setting, method: Method, seed: int, args: argparse.Namespace) -> TrainConfig:
    """The trainer configuration of one row and seed."""
    fields = dict(table.train, **(table.search_train if method.search else {}))
    if args.meta_batch:
        fields["meta_batch"] = args.meta_batch
    if args.precision != "fp32":
        fields["precision"] = args.precision
    fields.update(
        space=table.search_space if method.search else table.fixed_space,
        shots=setting.shots,
        seed=seed,
        strategy=args.strategy or ("loop" if args.smoke else table.strategy),
        val_every=NEVER,  # one validation, after the budget: every method spends it on training
        val_tasks=args.val_tasks,
        **_budget(args),
    )
    if setting.ways:
        fields.update(ways=setting.ways, data_root=str(_data_root(table.name, args)), rotations=True)
    if table.train_shots is not None:
        fields["shots"] = table.train_shots
    if table.name == "multidomain":
        fields["domains"] = args.domains
    if args.smoke:
        fields.update(meta_batch=1 if setting.ways else 2, log_every=1, eval_inner_steps=1, **({"queries": 1} if setting.ways else {}))
    fields.update(method.overrides)
    return TrainConfig(**fields)


def _data_root(table: str, args: argparse.Namespace) -> Path | None:
    return {"miniimagenet": args.mini_data_root, "multidomain": args.domains_root}.get(table, args.data_root)


def _test_split(table: str, args: argparse.Namespace) -> str:
    """``--eval-split`` in the table's own split names (Omniglot's test set is ``evaluation``)."""
    if table == "miniimagenet":
        return "test" if args.eval_split in ("test", "evaluation") else "val"
    return "evaluation" if args.eval_split in ("test", "evaluation") else "val"


def plan_jobs(args: argparse.Namespace, tables: Sequence[str], runs: Path, figures: Path) -> list[dict[str, Any]]:
    """Every (table, setting, method, seed) job, seeds outermost so load drift hits all methods alike."""
    jobs = []
    for table_name in tables:
        table = TABLES[table_name]
        n_seeds = seeds_for(table_name, args)
        for seed in range(n_seeds):
            settings = settings_for(table_name, args)
            for i, setting in enumerate(settings):
                test = {
                    "tasks": table.train["tasks"], "shots": setting.shots, "ways": setting.ways,
                    "queries": args.test_queries or (1 if args.smoke and setting.ways else (table.test_queries if setting.ways else (10 if args.smoke else 100))),
                    "n": args.test_tasks or ((2 if setting.ways else 20) if args.smoke else 600),
                    "batch": (2 if setting.ways else 10) if args.smoke else 25, "seed": TEST_SEED,
                    "split": _test_split(table_name, args), "data_root": str(_data_root(table_name, args)) if setting.ways else None, "rotations": True,
                }  # fmt: skip
                if table_name == "multidomain":
                    test.update(domains=args.domains, left_out=args.left_out)
                for method in methods_for(table_name, args):
                    try:  # a clash of the command's options with a row's: one line, before anything runs
                        cfg = make_config(table, setting, method, seed, args)
                    except ConfigError as e:
                        raise SystemExit(f"scripts/reproduce.py: {table_name} {setting.label} {method.name}: {str(e).removeprefix('config: ')}") from None
                    draw = method.name == "metanet" and seed == 0 and (i == 0 or not args.smoke)  # smoke: one per table
                    png = figures / f"{table_name}_{setting.slug}_population.png" if draw else None
                    trainer = Setting(table_name, table.train_shots, setting.ways) if table.train_shots not in (None, setting.shots) else None
                    if trainer not in settings:  # that setting is not run: this job trains (at train_shots) itself
                        trainer = None
                    jobs.append({
                        "table": table_name, "setting": setting.label, "method": method.name, "seed": seed,
                        "cfg": dataclasses.asdict(cfg), "test": test, "eval_steps": eval_steps_for(table_name, args),
                        "per_family": table.per_family, "curve_tasks": 2 if args.smoke else args.curve_tasks,
                        "curve_steps": 2 if args.smoke else CURVE_STEPS, "cost_tasks": 1 if args.smoke else 10, "cost_repeats": 0 if args.smoke else 2,
                        "population_png": str(png) if png else None,
                        "run_dir": str(runs / table_name / setting.slug / method.name / f"seed{seed}"), "reuse": "training" if args.reevaluate else args.reuse,
                        "train_dir": str(runs / table_name / trainer.slug / method.name / f"seed{seed}") if trainer else None,
                    })  # fmt: skip
    return jobs


def _run_job_safely(job: dict[str, Any]) -> dict[str, Any]:
    """``run_job``, with a failure (a diverged run, say) recorded instead of ending the whole table."""
    try:
        return run_job(job)
    except Exception as e:  # noqa: BLE001 - any failure of one run is reported in its row
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        run_dir = Path(job["run_dir"])
        if run_dir.is_dir():  # recorded, so that --reuse reports the failure instead of retraining
            (run_dir / "result.json").write_text(json.dumps(to_json({"job": _job_spec(job), "error": error}), indent=1, allow_nan=False))
        return {"error": error}


def run_jobs(jobs: list[dict[str, Any]], n_workers: int) -> list[dict[str, Any]]:
    """Run the jobs that train, then the jobs that score another job's training."""
    first = [i for i, j in enumerate(jobs) if not j.get("train_dir")]
    second = [i for i, j in enumerate(jobs) if j.get("train_dir")]
    out: list[dict[str, Any]] = [{}] * len(jobs)
    for part in (first, second):
        for i, res in zip(part, _run_batch([jobs[i] for i in part], n_workers)):
            out[i] = res
    return out


def _run_batch(jobs: list[dict[str, Any]], n_workers: int) -> list[dict[str, Any]]:
    """Run jobs in this process (``n_workers`` 1) or in spawned single-threaded workers."""

    def report(i: int, job: dict[str, Any], res: dict[str, Any]) -> None:
        k = str(job["eval_steps"][-1])
        if "error" in res:
            print(f"[{i + 1}/{len(jobs)}] {job['table']} {job['setting']} {job['method']} seed {job['seed']}: FAILED {res['error']}", flush=True)
            return
        tr = res["train"]
        print(f"[{i + 1}/{len(jobs)}] {job['table']} {job['setting']} {job['method']} seed {job['seed']}: "
              f"{tr['step']} steps in {tr['elapsed']:.1f} s ({tr['strategy']}), "
              f"eval {res['eval_wall_s']:.1f} s, metric@{k} {res['scores'][k]['mean']:.4g}"
              + (" (reused)" if res.get("reused") else ""), flush=True)  # fmt: skip

    if n_workers <= 1:
        out = []
        for i, job in enumerate(jobs):
            out.append(_run_job_safely(job))
            report(i, job, out[-1])
        return out
    import concurrent.futures as cf
    import multiprocessing as mp

    out: list[dict[str, Any] | None] = [None] * len(jobs)
    with cf.ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn"), initializer=_worker_setup) as pool_:
        futures = {pool_.submit(_run_job_safely, job): i for i, job in enumerate(jobs)}
        for done, fut in enumerate(cf.as_completed(futures)):
            i = futures[fut]
            out[i] = fut.result()
            report(done, jobs[i], out[i])
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------- collecting


def collect(table_name: str, jobs: list[dict[str, Any]], results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The table's JSON: per setting and method, per-seed figures and their aggregate."""
    table = TABLES[table_name]
    rows: dict[str, dict[str, Any]] = {}
    for job, res in zip(jobs, results):
        if job["table"] != table_name:
            continue
        row = rows.setdefault(job["setting"], {}).setdefault(job["method"], {"per_seed": [], "errors": []})
        if "error" in res:
            row["errors"].append({"seed": job["seed"], "run_dir": job["run_dir"], "error": res["error"]})
            continue
        row["per_seed"].append({
            "seed": job["seed"], "run_dir": job["run_dir"], "train": res["train"], "scores": res["scores"],
            "families": res.get("families"), "curve": res["curve"], "curve_tasks": res["curve_tasks"], "cost": res["cost"],
            "population": res.get("population"), "fused_check": res.get("fused_check"), "learning": learning_curve(job["run_dir"]),
            "population_png": Path(job["population_png"]).name if job.get("population_png") and Path(job["population_png"]).is_file() else None,
            "config": job["cfg"], "test": job["test"], "cpu": res.get("cpu"),
        })  # fmt: skip
    ks = [str(k) for k in eval_steps_for(table_name, args)]
    for setting, methods in rows.items():
        for name, row in methods.items():
            row["command"] = row_command(table_name, setting, name, args)
            seeds = row["per_seed"]
            if not seeds:  # every seed failed
                row["aggregate"] = {k: {"mean": math.nan, "ci95": math.nan, "n": 0, "seeds": 0, "seed_sd": math.nan} for k in ks}
                row.update(curve=[], steps=math.nan, generation_ms=math.nan, adapt_ms=math.nan)
                continue
            row["aggregate"] = {k: aggregate_seeds([s["scores"][k] for s in seeds]) for k in ks}
            if seeds[0]["families"]:
                fams = seeds[0]["families"]
                row["families"] = {f: {k: aggregate_seeds([s["families"][f][k] for s in seeds]) for k in fams[f]} for f in fams}
            row["curve"] = [sum(c) / len(seeds) for c in zip(*(s["curve"] for s in seeds))]
            row["steps"] = sum(s["train"]["step"] for s in seeds) / len(seeds)
            row["generation_ms"] = sum(s["cost"]["generation_ms"] for s in seeds) / len(seeds)
            row["adapt_ms"] = sum(s["cost"]["adapt_ms"] for s in seeds) / len(seeds)
    settings = [s.label for s in settings_for(table_name, args) if s.label in rows]
    meta = {
        "command": command, "date": _now(), "budget": budget_label(args), "seeds": seeds_for(table_name, args),
        "machine": {"torch": torch.__version__, "cpus": os.cpu_count(), "threads_per_run": 1, "parallel_runs": args.jobs, "cpu": _cpus(rows)},
    }  # fmt: skip
    tests = {s: next(j["test"] for j in jobs if j["table"] == table_name and j["setting"] == s) for s in settings}
    return {
        "title": table.title, "metric": table.metric, "eval_steps": eval_steps_for(table_name, args), "smoke": args.smoke,
        **meta, "settings": settings, "rows": rows, "test": tests[settings[0]] if settings else None,
        "setting_meta": {s: dict(meta, test=tests[s]) for s in settings},
    }  # fmt: skip


def _cpus(rows: dict[str, dict[str, Any]]) -> str:
    """The CPUs (capability, model) the table's runs trained on, and how many predate that record."""
    seen = [s.get("cpu") for methods in rows.values() for row in methods.values() for s in row["per_seed"]]
    known = sorted({c for c in seen if c})
    missing = sum(1 for c in seen if not c)
    return "; ".join(known + ([f"not recorded for {missing} run(s)"] if missing else []))


_FORWARDED = ("minutes", "steps", "meta_batch", "test_tasks", "test_queries", "curve_tasks", "val_tasks", "eval_split", "strategy", "precision")


def row_command(table: str, setting: str, method: str, args: argparse.Namespace) -> str:
    """The command that reproduces one row (into its own folder)."""
    parts = ["python", "scripts/reproduce.py"] + (["--smoke"] if args.smoke else [])
    parts += ["--table", table, "--methods", method]
    s = next(x for x in settings_for(table, args) if x.label == setting)
    parts += s.args()
    defaults = vars(build_parser().parse_args([]))
    for name in _FORWARDED:
        value = getattr(args, name)
        if value != defaults[name] and not (args.smoke and name in ("minutes", "steps", "val_tasks")):
            parts += [f"--{name.replace('_', '-')}", str(value)]
    if not args.smoke:
        parts += ["--seeds", str(seeds_for(table, args))]
    if table == "omniglot" and args.data_root_given:
        parts += ["--data-root", str(args.data_root)]
    if table == "miniimagenet" and args.mini_data_root_given:
        parts += ["--mini-data-root", str(args.mini_data_root)]
    if table == "multidomain":
        for k in ("domains", "left_out"):
            if getattr(args, k) != defaults[k]:
                parts += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        if args.domains_root_given:
            parts += ["--domains-root", str(args.domains_root)]
    parts += ["--out", f"runs/row-{table}-{s.slug}-{method}"]
    return shlex.join(parts)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------------------- markdown


def write_markdown(path: Path, data: dict[str, Any], figures_rel: str) -> None:
    """Render RESULTS.md from results.json's data."""
    tables = data["tables"]
    shown = [TABLES[name] for name in TABLE_ORDER if name in tables]
    lines = [
        "# metanet results",
        "",
        "<!-- Generated by scripts/reproduce.py. Do not edit by hand: re-run the command below. -->",
        "This file is generated by `scripts/reproduce.py`; do not edit it by hand.",
        "",
    ]
    for name in TABLE_ORDER:
        if name in tables:
            lines += [f"- {tables[name]['title']}: `{cmd}` ({date})" for cmd, date in table_commands(tables[name])]
    for name, why in data.get("skipped", {}).items():
        lines.append(f"- {TABLES[name].title}: skipped ({why})")
    lines += [
        "",
        "How to read the tables:",
        "",
        "- Every method is a configuration of the same trainer (`metanet.trainer.train`) and is evaluated by the same "
        "path (`metanet.meta.evaluate`: generate the network, discretise its architecture, adapt the discrete network "
        "k steps on the support set, score the query set). The final model of each run is evaluated.",
        "- Budget: wall-clock meta-training time per method and seed (validation runs only once, after the budget, so "
        "every method spends the budget on training); faster methods make more meta-steps.",
        "- A cell is the mean over seeds of the per-seed mean over the test tasks, ± the half-width of a 95% confidence "
        "interval over all test tasks pooled across seeds (1.96 sd / sqrt(n)). That interval does not contain seed-to-seed "
        "variation; `results/results.json` gives the per-seed means and their sd (`seed_sd`). Best value per column in bold.",
        "- Inner-loop learning rates (Meta-SGD: its learned step sizes): "
        + "; ".join(f"{t.title}: {t.train['inner_lr']}" + (f" ({t.search_train['inner_lr']} for the searchable-space rows)" if "inner_lr" in t.search_train else "") for t in shown) + ".",
        "- Settings that only the searchable-space rows use: "
        + ("; ".join(f"{t.title}: " + ", ".join(f"{k}={v}" for k, v in t.search_train.items()) for t in shown if t.search_train) or "none") + ".",
        "",
        "Methods (`TrainConfig` overrides on top of each table's shared settings):",
        "",
        "| method | what | overrides | space |",
        "|---|---|---|---|",
    ]
    present = {m for t in tables.values() for rows in t["rows"].values() for m in rows}
    for m in METHODS.values():
        if not m.default and m.name not in present:  # a row run only when named: listed where it ran
            continue
        ov = ", ".join(f"{k}={v}" for k, v in m.overrides.items()) or "(defaults: arch=conditional, weights=vae)"
        names = dict.fromkeys(t.search_space if m.search else t.fixed_space for t in shown if t.name in m.tables)
        if not names:  # the method has no row in the tables shown
            continue
        space = ("searchable" if m.search else "fixed") + f" ({' / '.join(names)})"
        lines.append(f"| {m.name} | {m.about} | {ov} | {space} |")
    lines.append("")
    for name in TABLE_ORDER:
        if name in tables:
            lines += table_markdown(name, tables[name], figures_rel)
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------- plots


def _figure(n_panels: int, rows: int = 1) -> tuple[Any, list[list[Any]]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.2 * n_panels + 1.8, 9.0), 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [[fig.add_subplot(rows, n_panels, r * n_panels + c + 1) for c in range(n_panels)] for r in range(rows)]
    return fig, axes


def _colours(names: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {n: cmap(METHODS_INDEX.get(n, i) % 20) for i, n in enumerate(names)}


METHODS_INDEX = {name: i for i, name in enumerate(METHODS)}


def _style(method: str, colour: dict[str, Any]) -> dict[str, Any]:
    """Baselines dashed, metanet and its ablations solid, metanet itself thick."""
    m = METHODS.get(method)
    dashed = m is not None and not m.name.startswith("metanet")
    return {"color": colour[method], "lw": 2.4 if method == "metanet" else 1.2, "ls": "--" if dashed else "-"}


def learning_curve(run_dir: str, points: int = 200) -> list[list[float]]:
    """``[time, query loss]`` of a run's logged meta-steps (finite ones), at most ``points``
    of them evenly spaced: kept in ``results.json`` so that the report draws a run's curve
    on a machine that does not hold the run."""
    path = Path(run_dir) / "metrics.jsonl"
    logged = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    pts = [[r["time"], r["query_loss"]] for r in logged if r.get("query_loss") is not None and math.isfinite(r["query_loss"])]  # null: non-finite
    if len(pts) <= points:
        return pts
    return [pts[round(i * (len(pts) - 1) / (points - 1))] for i in range(points)]


def plot_table(name: str, t: dict[str, Any], figures: Path) -> list[Path]:
    """Learning curves, metric vs adaptation steps, and cost per new task for one table."""
    from matplotlib.ticker import MaxNLocator

    settings, metric = t["settings"], t["metric"]
    methods = list(dict.fromkeys(m for s in settings for m in t["rows"][s]))
    colour = _colours(methods)
    log_y = metric == "MSE"
    paths = []

    fig, axes = _figure(len(settings))
    for ax, setting in zip(axes[0], settings):
        for method, row in t["rows"][setting].items():
            for i, seed in enumerate(row["per_seed"]):
                pts = seed.get("learning") or learning_curve(seed["run_dir"])
                if not pts:
                    continue
                times, losses = zip(*pts)
                w = max(1, len(losses) // 50)  # moving average over ~2% of the run
                smooth = [sum(losses[max(0, j - w + 1): j + 1]) / len(losses[max(0, j - w + 1): j + 1]) for j in range(len(losses))]
                ax.plot(times, smooth, alpha=1.0 if i == 0 else 0.45, label=method if i == 0 else None, **_style(method, colour))
        ax.set(title=setting, xlabel="meta-training wall time (s)", ylabel="training query loss (after the inner steps)")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    paths.append(_finish(fig, axes, f"{t['title']}: learning curves ({t['budget']} per method and seed; lines are seeds)", figures / f"{name}_learning.png"))

    fig, axes = _figure(len(settings))
    for ax, setting in zip(axes[0], settings):
        for method, row in t["rows"][setting].items():
            if not row["curve"]:
                continue
            curve = [100 * v if metric == "accuracy" else v for v in row["curve"]]
            ax.plot(range(len(curve)), curve, marker="o", ms=3, label=method, **_style(method, colour))
        n = next((r["per_seed"][0]["curve_tasks"] for r in t["rows"][setting].values() if r["per_seed"]), 0)
        ax.set(title=f"{setting} ({n} test tasks)", xlabel="inner steps on the support set", ylabel=f"query {metric}" + (" (%)" if metric == "accuracy" else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log_y:
            ax.set_yscale("log")
            # A diverging curve (MSE to 1e28) would flatten every other one: clip the axis
            # at 10x the worst MSE before adaptation; what leaves the top diverged.
            starts = [r["curve"][0] for r in t["rows"][setting].values() if r["curve"] and math.isfinite(r["curve"][0])]
            if starts:
                ax.set_ylim(top=10 * max(starts))
                ax.text(0.99, 0.98, "off the top: diverging", transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.4")
        ax.grid(alpha=0.3)
    paths.append(_finish(fig, axes, f"{t['title']}: {metric} vs adaptation steps (mean over seeds)", figures / f"{name}_adaptation.png"))

    fig, axes = _figure(len(settings))
    for ax, setting in zip(axes[0], settings):
        rows = t["rows"][setting]
        names = list(rows)
        gen = [rows[m]["generation_ms"] for m in names]
        adapt = [rows[m]["adapt_ms"] for m in names]
        ys = range(len(names))
        ax.barh([y - 0.2 for y in ys], gen, height=0.4, color="#4477aa", label="generate (encode, generators, discretise, build)")
        steps = next((r["per_seed"][0]["cost"]["adapt_steps"] for r in rows.values() if r["per_seed"]), 0)
        ax.barh([y + 0.2 for y in ys], adapt, height=0.4, color="#ee6677", label=f"adapt {steps} inner steps")
        ax.set_yticks(list(ys), names, fontsize=8)
        ax.invert_yaxis()
        ax.set(title=setting, xlabel="milliseconds per new task")
        ax.grid(axis="x", alpha=0.3)
    paths.append(_finish(fig, axes, f"{t['title']}: cost per new task (1 CPU thread)", figures / f"{name}_cost.png"))
    return paths


def _finish(fig: Any, axes: list[list[Any]], title: str, path: Path) -> Path:
    """One legend of every panel's labels beside the last panel, the figure's title, and save it."""
    labelled: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    axes[0][-1].legend(list(labelled.values()), list(labelled), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Methods: " + ", ".join(METHODS))  # fmt: skip
    p.add_argument("--table", nargs="+", default=["all"], metavar="NAME", help=f"tables to run: {', '.join(TABLE_ORDER)} or all (default: all)")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods (default: every method that applies to the table)")
    p.add_argument("--shots", nargs="+", type=int, help="shots per setting (default: sinusoid 5 10 20, multimodal 5, omniglot 1 5)")
    p.add_argument("--ways", nargs="+", type=int, help="omniglot ways (default: 5 20)")
    p.add_argument("--minutes", type=float, default=1.0, help="wall-clock meta-training budget per method and seed (default: 1)")
    p.add_argument("--steps", type=int, help="a budget in meta-steps instead of minutes")
    p.add_argument("--meta-batch", type=int, help="tasks per meta-step for every row (default: the table's: 25 regression, 16 omniglot)")
    p.add_argument("--seeds", type=int, help="seeds per method (default: 3 for regression, 1 for omniglot)")
    p.add_argument("--test-tasks", type=int, help="test tasks per setting (default: 600)")
    p.add_argument("--test-queries", type=int, help="query points per test task (default: 100; omniglot: 5 per class)")
    p.add_argument("--curve-tasks", type=int, default=100, help="test tasks for the metric-vs-steps curves (default: 100)")
    p.add_argument("--val-tasks", type=int, default=25, help="validation tasks, scored once after the budget (default: 25)")
    p.add_argument("--eval-split", default="val", choices=("val", "evaluation", "test"), help="test split: val (omniglot: alphabets held out of the background set; mini-ImageNet: its 16 validation classes) or test (omniglot: images_evaluation; mini-ImageNet: test.csv); evaluation is the same as test")
    p.add_argument("--data-root", help="omniglot folder (default: metanet.tasks.default_data_root())")
    p.add_argument("--mini-data-root", help="mini-ImageNet folder (default: ../shared/data/miniimagenet)")
    p.add_argument("--domains", default="omniglot,miniimagenet", help="multidomain: the training domains (metanet train --domains; default: omniglot,miniimagenet)")
    p.add_argument("--left-out", default="chars74k_fnt", help="multidomain: a domain left out of training, scored on all its classes (default: chars74k_fnt; chars74k_fnt:invert flips its intensities)")
    p.add_argument("--domains-root", help="multidomain: the folder holding the named domains (default: ../shared/data)")
    p.add_argument("--strategy", choices=("auto", "loop", "vmap"), help="task execution (default: auto for regression, loop for omniglot)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="arithmetic of every row's meta-training (metanet train --precision; default fp32)")
    p.add_argument("--out", help="output folder for RESULTS.md and results/ (default: docs/; --smoke: a new temp folder)")
    p.add_argument("--runs", help="folder for the run directories (default: runs/reproduce for docs/, else OUT/runs)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one thread each (use at most the number of idle cores)")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs whose job is unchanged (re-render without retraining)")
    p.add_argument("--reevaluate", action="store_true", help="like --reuse, but evaluate the reused runs again (after a change to the evaluation)")
    p.add_argument("--smoke", action="store_true", help="every row at a tiny budget (2 steps, 1 seed, a few test tasks): tests the pipeline")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    tables = []
    for t in args.table:
        if t == "all":
            tables += list(TABLE_ORDER)
        elif t in TABLES:
            tables.append(t)
        else:
            close = difflib.get_close_matches(t, [*TABLE_ORDER, "all"], n=1)
            p.error(f"unknown table {t!r}: choose from {', '.join(TABLE_ORDER)}, all" + (f" (did you mean {close[0]!r}?)" if close else ""))
    args.tables = list(dict.fromkeys(tables))
    for m in args.methods or []:
        if m not in METHODS:
            close = difflib.get_close_matches(m, list(METHODS), n=1)
            p.error(f"unknown method {m!r}: choose from {', '.join(METHODS)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    for name in ("minutes", "steps", "meta_batch", "seeds", "test_tasks", "test_queries", "curve_tasks", "val_tasks", "jobs"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    for name in ("shots", "ways"):
        if any(v <= 0 for v in getattr(args, name) or []):
            p.error(f"--{name} must be positive")
    if args.smoke:
        args.steps, args.val_tasks = 2, 1
    args.data_root_given = args.data_root is not None
    args.data_root = Path(args.data_root) if args.data_root else default_data_root()
    args.mini_data_root_given = args.mini_data_root is not None
    args.mini_data_root = Path(args.mini_data_root) if args.mini_data_root else shared_data_root("miniimagenet")
    args.domains_root_given = args.domains_root is not None
    args.domains_root = Path(args.domains_root) if args.domains_root else shared_data_root()
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the tables, write the outputs; returns the results.json data."""
    args = parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "scripts/reproduce.py", *given])
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="metanet-smoke-")) if args.smoke else DEFAULT_OUT)
    figures = out / "results"
    runs = Path(args.runs) if args.runs else (REPO / "runs" / "reproduce" if out.resolve() == DEFAULT_OUT.resolve() else out / "runs")
    skipped: dict[str, str] = {}
    tables = list(args.tables)
    if "omniglot" in tables:
        reason = None
        if args.data_root is None:
            reason = "no Omniglot data found: give --data-root DIR or set METANET_DATA_ROOT"
        elif not args.data_root.is_dir():
            reason = f"the Omniglot folder {args.data_root} does not exist"
        elif args.eval_split == "evaluation" and not any((args.data_root / f).exists() for f in ("images_evaluation.npz", "images_evaluation")):
            reason = f"--eval-split evaluation needs images_evaluation(.npz) in {args.data_root}"
        if reason:
            skipped["omniglot"] = reason
            tables.remove("omniglot")
            print(f"omniglot: skipped ({reason})")
    if "multidomain" in tables:
        root = args.domains_root
        names = [*args.domains.split(","), args.left_out]
        missing = [] if root is None else [n for n in names if "=" not in n and not domain_folder(n, root).is_dir()]
        if root is None or missing:
            why = "no ../shared/data folder: give --domains-root DIR" if root is None else f"no domain folder {missing[0]!r} in {root}"
            skipped["multidomain"] = why
            tables.remove("multidomain")
            print(f"multidomain: skipped ({why})")
    if "miniimagenet" in tables:
        root, reason = args.mini_data_root, None
        if root is None:
            reason = "no mini-ImageNet data found: give --mini-data-root DIR"
        elif not root.is_dir():
            reason = f"the mini-ImageNet folder {root} does not exist"
        if reason:
            skipped["miniimagenet"] = reason
            tables.remove("miniimagenet")
            print(f"miniimagenet: skipped ({reason})")
    jobs = plan_jobs(args, tables, runs, figures)  # refuses a clash before anything is written
    figures.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    _worker_setup()
    t0 = time.perf_counter()
    try:
        print(f"{len(jobs)} runs into {runs}; outputs in {out}", flush=True)
        results = run_jobs(jobs, args.jobs)
    finally:
        torch.set_num_threads(prev_threads)
    json_path = figures / "results.json"
    data: dict[str, Any] = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "tables": {}, "skipped": {}}
    if json_path.is_file():  # merge: tables run by earlier commands stay
        old = from_json(json.loads(json_path.read_text()))
        if old.get("format") == RESULTS_FORMAT and old.get("version") == RESULTS_VERSION:
            data = old
    for name in tables:  # settings of the table that this command did not run stay, with their own command
        data["tables"][name] = merge_settings(data["tables"].get(name), collect(name, jobs, results, args, command))
        data["skipped"].pop(name, None)
        plot_table(name, data["tables"][name], figures)
    for name, why in skipped.items():
        if name not in data["tables"]:
            data["skipped"][name] = why
    json_path.write_text(json.dumps(to_json(data), indent=1, allow_nan=False))
    write_markdown(out / "RESULTS.md", data, "results")
    print(f"wrote {out / 'RESULTS.md'} and {figures}/ in {time.perf_counter() - t0:.1f} s")
    return data


if __name__ == "__main__":
    main()
