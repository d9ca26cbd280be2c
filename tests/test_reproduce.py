"""scripts/reproduce.py: the smoke run writes every row, plot and figure; the statistics and
the metanet-vs-MAML sentence it takes from metanet.results are right on hand-made numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from metanet.meta import evaluate
from metanet.results import ablation_pairs, aggregate_seeds, format_stat, pool, summary_lines, table_markdown, verdict, verdict_lines
from metanet.tasks import Multimodal, Sinusoid, default_data_root, fixed_episodes, shared_data_root

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce.py"

# The rows the brief asks for, per table (written out here, not read from the script).
BASELINES = ["maml", "fomaml", "reptile", "metasgd", "metanas"]
ABLATIONS = ["metanet-no-archgen", "metanet-no-weightgen", "metanet-first-order", "metanet-unfused"]
EXPECTED = {
    "sinusoid": (["5-shot", "10-shot", "20-shot"], BASELINES + ["metanet"] + ABLATIONS),
    "multimodal": (["5-shot"], BASELINES + ["metanet"] + ABLATIONS + ["metanet-no-metadata"]),
    "omniglot": (["2-way 1-shot", "2-way 2-shot", "3-way 1-shot", "3-way 2-shot"], BASELINES + ["protonet", "protomaml", "metanet"] + ABLATIONS),
    "miniimagenet": (["2-way 1-shot", "2-way 2-shot", "3-way 1-shot", "3-way 2-shot"], ["maml", "protonet", "protomaml", "metanet"]),
    "multidomain": (["2-way 1-shot", "2-way 2-shot", "3-way 1-shot", "3-way 2-shot"], ["maml", "protonet", "protomaml", "metanas", "metanet", "metanet-no-archgen"]),
}


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("metanet_reproduce_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


# ------------------------------------------------------------------------ the sentence


def stat(mean: float, ci: float = 0.01, n: int = 600) -> dict:
    return {"mean": mean, "ci95": ci, "n": n}


def test_verdict_mse_lower_is_a_win_with_the_percentage():
    s = verdict("MSE", stat(0.5), stat(0.8))
    assert s == "metanet is 37.5% lower MSE than MAML (0.5 vs 0.8)"


def test_verdict_mse_higher_does_not_beat():
    s = verdict("MSE", stat(0.9), stat(0.6))
    assert s == "metanet does not beat MAML: 50.0% higher MSE (0.9 vs 0.6)"


def test_verdict_a_win_inside_the_intervals_is_called_not_significant():
    s = verdict("MSE", stat(0.70, ci=0.05), stat(0.75, ci=0.05))
    assert s.startswith("metanet is 6.7% lower MSE than MAML")
    assert s.endswith("the 95% intervals overlap, so the difference is not significant")
    assert "not significant" not in verdict("MSE", stat(0.70, ci=0.02), stat(0.75, ci=0.02))


def test_verdict_equal_is_not_a_win():
    assert verdict("MSE", stat(0.5), stat(0.5)) == "metanet does not beat MAML: equal MSE (0.5 vs 0.5)"


def test_verdict_tiny_and_huge_ratios():
    assert "metanet is >99.9% lower MSE" in verdict("MSE", stat(0.001), stat(5.0))
    assert "does not beat MAML: 900.0% higher MSE" in verdict("MSE", stat(5.0), stat(0.5))


def test_verdict_accuracy_in_points():
    assert verdict("accuracy", stat(0.95), stat(0.90)) == "metanet is 5.00 points higher accuracy than MAML (95.00% vs 90.00%)"
    assert verdict("accuracy", stat(0.85), stat(0.90)) == "metanet does not beat MAML: 5.00 points lower accuracy (85.00% vs 90.00%)"


def test_verdict_non_finite_and_empty():
    assert verdict("MSE", stat(math.nan), stat(0.5)) == "cannot compare metanet with MAML: metanet has a non-finite MSE"
    assert verdict("MSE", stat(0.5), stat(math.inf)) == "cannot compare metanet with MAML: MAML has a non-finite MSE"
    assert verdict("MSE", stat(math.nan, n=0), stat(0.5)) == "cannot compare metanet with MAML: no test tasks"
    diverged = {**stat(math.nan, n=600), "nonfinite": 3}
    assert verdict("MSE", stat(0.5), diverged) == "cannot compare metanet with MAML: MAML diverged on 3 of 600 test tasks"
    assert format_stat(diverged, "MSE") == "diverged on 3 of 600 tasks"


def test_pool_counts_diverged_tasks():
    ok = summary(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    bad = summary(torch.tensor([0.1, math.inf, math.nan, 0.2], dtype=torch.float64))
    assert bad["nonfinite"] == 2
    pooled = pool([ok, bad])
    assert math.isnan(pooled["mean"]) and (pooled["n"], pooled["nonfinite"]) == (7, 2)
    agg = aggregate_seeds([ok, bad])
    assert math.isnan(agg["mean"]) and agg["nonfinite"] == 2


def test_summary_counts_wins_and_losses():
    def row(*means):
        return {"aggregate": {str(k): stat(m, ci=0.05) for k, m in zip((1, 10), means)}, "per_seed": [{}]}

    t = {"metric": "MSE", "eval_steps": [1, 10], "settings": ["5-shot", "10-shot"], "rows": {
        "5-shot": {"metanet": row(0.50, 0.30), "maml": row(0.80, 0.32)},  # a clear win, a win inside the intervals
        "10-shot": {"metanet": row(0.90, 0.40), "maml": row(0.60, 0.20)},  # two losses
    }}  # fmt: skip
    assert summary_lines(t) == [
        "**Summary: metanet beats MAML in 2 of 4 (setting, steps) cells at this budget "
        "(1 with non-overlapping 95% intervals) and does not beat MAML in 2.**", "",
    ]


# -------------------------------------------------------------------------- statistics


def summary(t: torch.Tensor) -> dict:
    """What metanet.meta.evaluate reports for these scores."""
    from metanet.meta import _summary

    return _summary(t.tolist())


def test_pool_equals_the_statistics_of_all_scores_together():
    g = torch.Generator().manual_seed(0)
    groups = [torch.rand(n, generator=g, dtype=torch.float64) * (i + 1) for i, n in enumerate((7, 1, 30, 12))]
    pooled = pool([summary(x) for x in groups] + [{"mean": math.nan, "ci95": math.nan, "n": 0}])
    direct = summary(torch.cat(groups))
    assert pooled["n"] == direct["n"] == 50
    assert pooled["mean"] == pytest.approx(direct["mean"], rel=1e-12)
    assert pooled["ci95"] == pytest.approx(direct["ci95"], rel=1e-9)


def test_aggregate_seeds_means_the_seed_means_and_pools_the_interval():
    g = torch.Generator().manual_seed(1)
    seeds = [torch.rand(20, generator=g, dtype=torch.float64) + s for s in range(3)]
    agg = aggregate_seeds([summary(x) for x in seeds])
    assert agg["mean"] == pytest.approx(sum(x.mean().item() for x in seeds) / 3)
    assert agg["ci95"] == pytest.approx(summary(torch.cat(seeds))["ci95"])
    assert agg["seed_sd"] == pytest.approx(torch.stack([x.mean() for x in seeds]).std().item())
    assert (agg["n"], agg["seeds"]) == (60, 3)


def test_test_episodes_are_fixed_episodes_sampled_lazily(rp):
    dist = Sinusoid(shots=5, queries=7)
    lazy = list(rp.TestEpisodes(dist, 11, 4, seed=3))
    eager = fixed_episodes(dist, 11, 4, seed=3)
    assert [e.batch_size for e in lazy] == [4, 4, 3]
    for a, b in zip(lazy, eager):
        torch.testing.assert_close(a.support_x, b.support_x, rtol=0, atol=0)
        torch.testing.assert_close(a.query_y, b.query_y, rtol=0, atol=0)
    assert len(list(rp.TestEpisodes(dist, 11, 4, seed=3, limit=1))) == 1


def test_family_episodes_keep_only_that_family(rp):
    eps = rp.TestEpisodes(Multimodal(shots=5, queries=5), 40, 10, seed=0)
    kept = [t for ep in rp.FamilyEpisodes(eps, 2) for t in ep.metadata.tolist()]
    total = sum(int((ep.metadata == 2).sum()) for ep in eps)
    assert kept and set(kept) == {2} and len(kept) == total


# ------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(("argv", "message"), [
    (["--methods", "mamll"], "unknown method 'mamll'"),
    (["--table", "sinusiod"], "did you mean 'sinusoid'?"),
    (["--minutes", "0"], "--minutes must be positive, got 0.0"),
])  # fmt: skip
def test_bad_arguments_name_the_problem(rp, capsys, argv, message):
    with pytest.raises(SystemExit):
        rp.main(argv)
    assert message in capsys.readouterr().err


def test_a_row_that_clashes_with_the_command_is_refused_before_anything_runs(rp, tmp_path, capsys):
    """The implicit order runs in fp32 only: ``--precision bf16`` with an iMAML row stops at
    once with one line naming the row and the clash, and writes nothing."""
    out = tmp_path / "out"
    argv = ["--table", "omniglot", "--methods", "maml", "imaml", "--ways", "5", "--shots", "1", "--precision", "bf16", "--data-root", str(tmp_path), "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        rp.main(argv)
    assert str(e.value) == (
        "scripts/reproduce.py: omniglot 5-way 1-shot imaml: order implicit differentiates the solution of a proximal "
        "inner problem, not the steps: it serves plain SGD steps of the weights in fp32, not precision bf16"
    )
    assert not out.exists()


# ---------------------------------------------------------------------- the smoke run


@pytest.fixture(scope="module")
def smoke(rp, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    data = rp.main(["--smoke", "--out", str(out)])
    return out, data


def _tables() -> list[str]:
    return ["sinusoid", "multimodal"] + (["omniglot"] if default_data_root() is not None else []) + (["miniimagenet"] if shared_data_root("miniimagenet") is not None else []) + (["multidomain"] if all(shared_data_root(d) for d in ("omniglot", "miniimagenet", "chars74k_fnt")) else [])


def _section(md: str, title: str, level: str) -> str:
    """The text from a heading to the next heading of the same or a higher level."""
    start = md.index(f"\n{level} {title}\n")
    ends = [m.start() for m in re.finditer(r"\n#{1,%d} " % len(level), md) if m.start() > start]
    return md[start : ends[0] if ends else len(md)]


@pytest.mark.slow
def test_smoke_markdown_has_every_row(smoke):
    out, data = smoke
    md = (out / "RESULTS.md").read_text()
    assert "generated by `scripts/reproduce.py`; do not edit it by hand" in md
    assert f"`python scripts/reproduce.py --smoke --out {out}`" in md
    assert re.search(r"\(\d{4}-\d\d-\d\d \d\d:\d\d UTC\)", md)
    for table in _tables():
        title = data["tables"][table]["title"]
        section = _section(md, title, "##")
        settings, methods = EXPECTED[table]
        for setting in settings:
            block = _section(section, setting, "###")
            rows = [line for line in block.splitlines() if line.startswith("| ") and "`python scripts/reproduce.py" in line]
            assert sorted(r.split(" | ")[0].lstrip("| ") for r in rows) == sorted(methods)
            for r in rows:  # budget, seeds and the row's own command
                cells = r.split(" | ")
                assert cells[-3:-1] == ["2 meta-steps", "1"]
                assert f"--methods {cells[0].lstrip('| ')} " in cells[-1] and "--smoke" in cells[-1]
    if "omniglot" not in _tables():
        assert "Omniglot few-shot classification: skipped (no Omniglot data found" in md


@pytest.mark.slow
def test_smoke_verdicts_follow_the_numbers(smoke):
    out, data = smoke
    md = (out / "RESULTS.md").read_text()
    for table in _tables():
        t = data["tables"][table]
        for setting in t["settings"]:
            rows = t["rows"][setting]
            for k in t["eval_steps"]:
                sentence = verdict(t["metric"], rows["metanet"]["aggregate"][str(k)], rows["maml"]["aggregate"][str(k)])
                assert re.search(r"^(metanet is >?[\d.]+(%| points) (lower MSE|higher accuracy) than MAML|metanet does not beat MAML: )", sentence)
                assert sentence in _section(_section(md, t["title"], "##"), setting, "###")
        assert "**Summary: metanet beats MAML in " in _section(md, t["title"], "##")


@pytest.mark.slow
def test_smoke_json_pngs_and_population(smoke):
    out, _ = smoke
    text = (out / "results" / "results.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["format"] == "metanet.reproduce" and set(data["tables"]) == set(_tables())
    for table in _tables():
        t = data["tables"][table]
        for name in ("learning", "adaptation", "cost"):
            png = out / "results" / f"{table}_{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        first = t["settings"][0]
        assert (out / "results" / t["rows"][first]["metanet"]["per_seed"][0]["population_png"]).is_file()
        for setting in t["settings"]:
            for method, row in t["rows"][setting].items():
                seed = row["per_seed"][0]
                assert seed["train"]["step"] == 2
                assert len(row["curve"]) == 3  # smoke: 0..2 adaptation steps
                assert seed["cost"]["generation_ms"] > 0
                pop = seed["population"]
                if seed["config"]["arch"] == "fixed":
                    assert pop is None
                else:
                    assert pop["tasks"] == seed["test"]["n"]
                    assert pop["collapsed"] == (pop["distinct"] == 1)
                    for freq in pop["freq"]:
                        assert sum(freq) == pytest.approx(1.0)
            if "metanet-unfused" in t["rows"][setting]:
                check = t["rows"][setting]["metanet-unfused"]["per_seed"][0]["fused_check"]
                assert check["rel_diff"] < 1e-10  # fused and unfused mixed ops are the same function (float64)
    if "multidomain" in data["tables"]:  # per training domain, and the left-out domain
        fams = data["tables"]["multidomain"]["rows"]["2-way 1-shot"]["metanet"]["families"]
        assert list(fams) == ["omniglot", "miniimagenet", "chars74k_fnt (left out)"]
        pop = data["tables"]["multidomain"]["rows"]["2-way 1-shot"]["metanet"]["per_seed"][0]["population"]
        assert 0.0 <= pop["mutual_information"] <= 1.0 and 0.0 <= pop["parametric_share"] <= 1.0
    if "miniimagenet" in data["tables"]:  # trained once per method (1-shot), scored at every shot
        rows = data["tables"]["miniimagenet"]["rows"]
        for method, row in rows["2-way 2-shot"].items():
            trained = rows["2-way 1-shot"][method]["per_seed"][0]
            assert row["per_seed"][0]["train"] == trained["train"] and row["per_seed"][0]["config"]["shots"] == 1
            assert row["per_seed"][0]["test"]["shots"] == 2 and trained["test"]["shots"] == 1
    mm = data["tables"]["multimodal"]
    fams = mm["rows"]["5-shot"]["metanet"]["families"]
    assert list(fams) == ["sinusoid", "linear", "quadratic", "l1", "tanh"]
    assert all(f["1"]["n"] > 0 for f in fams.values())  # the smoke's test tasks cover every family
    assert sum(f["1"]["n"] for f in fams.values()) == mm["test"]["n"]


def _seed_model(data: dict, table: str, setting: str, method: str) -> tuple[dict, object]:
    """Seed 0's saved figures of a smoke row, and its final model."""
    from metanet.trainer import load_run

    seed = data["tables"][table]["rows"][setting][method]["per_seed"][0]
    return seed, load_run(seed["run_dir"], "last")[0]


@pytest.mark.slow
def test_smoke_scores_are_metanet_evaluate_on_the_fixed_test_tasks(smoke):
    # Re-evaluate one saved run by hand: the table cell must be exactly evaluate's mean.
    _, data = smoke
    seed, model = _seed_model(data, "sinusoid", "10-shot", "maml")
    test = seed["test"]
    episodes = fixed_episodes(Sinusoid(shots=10, queries=test["queries"]), test["n"], test["batch"], test["seed"])
    assert evaluate(model, episodes, 1)["mean"] == pytest.approx(seed["scores"]["1"]["mean"], rel=1e-6)


@pytest.mark.slow
def test_a_failed_run_is_reported_in_its_row_not_fatal(rp, smoke):
    out, _ = smoke
    args = rp.parse_args(["--smoke", "--table", "sinusoid", "--shots", "5", "--reuse", "--out", str(out)])
    jobs = rp.plan_jobs(args, ["sinusoid"], out / "runs", out / "results")
    results = [rp._run_job_safely(job) for job in jobs]  # finished runs: read back, not retrained
    assert all(r.get("reused") for r in results)
    bad = dict(jobs[0], cfg=dict(jobs[0]["cfg"], space="no_such_space"), run_dir=str(out / "bad"), reuse=False)
    assert jobs[0]["method"] == "maml"
    results[0] = rp._run_job_safely(bad)
    assert results[0]["error"].startswith(("ConfigError", "SpaceError", "FileNotFoundError"))
    t = rp.collect("sinusoid", jobs, results, args, "python scripts/reproduce.py ...")
    md = "\n".join(table_markdown("sinusoid", t, "results"))
    row = next(line for line in md.splitlines() if line.startswith("| maml |"))
    assert row.split(" | ")[1:4] == ["-", "failed", "failed"]
    assert f"- `maml` seed 0 failed: {results[0]['error']}" in md
    assert "- cannot compare: maml failed in every seed." in md
    rp.plot_table("sinusoid", t, out / "failed_plots")  # the plots skip the failed row


@pytest.mark.slow
def test_reuse_with_another_output_folder_does_not_redo_a_run(rp, smoke, capsys):
    """Where the plots go is not what a job computes: a finished run stays finished."""
    out, _ = smoke
    args = rp.parse_args(["--smoke", "--table", "sinusoid", "--methods", "metanet", "--shots", "5", "--reuse", "--out", str(out / "elsewhere")])
    jobs = rp.plan_jobs(args, ["sinusoid"], out / "runs", out / "elsewhere" / "results")
    assert all("elsewhere" in j["population_png"] for j in jobs)
    assert all(rp._run_job_safely(j).get("reused") for j in jobs)
    assert all(Path(j["population_png"]).is_file() for j in jobs)  # the plot follows to the new report
    changed = dict(jobs[0], cfg=dict(jobs[0]["cfg"], inner_lr=0.5), run_dir=str(out / "changed"))
    Path(changed["run_dir"]).mkdir()
    (Path(changed["run_dir"]) / "result.json").write_text((Path(jobs[0]["run_dir"]) / "result.json").read_text())
    redone = rp._run_job_safely(changed)
    assert redone.get("reused") is None and "error" not in redone, redone  # another job: redone, and said why
    assert "redone, its saved job differs in cfg.inner_lr, run_dir" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(default_data_root() is None, reason="needs ../shared/data/omniglot")
def test_the_other_meta_learners_are_rows_of_the_same_table(rp, tmp_path):
    methods = ["matchingnet", "relationnet", "mann", "lstm-meta", "metanet-lstm"]
    data = rp.main(["--smoke", "--table", "omniglot", "--methods", *methods, "--ways", "2", "--shots", "1", "--out", str(tmp_path)])
    rows = data["tables"]["omniglot"]["rows"]["2-way 1-shot"]
    assert list(rows) == methods
    for name, row in rows.items():
        assert not row["errors"], (name, row["errors"])
        assert all(0.0 <= a["mean"] <= 1.0 for a in row["aggregate"].values())
    md = (tmp_path / "RESULTS.md").read_text()
    assert all(f"| {m} |" in md for m in methods)


@pytest.mark.slow
def test_rerun_of_one_table_reuses_runs_and_keeps_the_others(rp, smoke):
    out, _ = smoke
    last = out / "runs" / "sinusoid" / "5shot" / "maml" / "seed0" / "last.pt"
    before = last.stat().st_mtime_ns
    rp.main(["--smoke", "--table", "sinusoid", "--methods", "maml", "metanet", "--shots", "5", "--reuse", "--out", str(out)])
    assert last.stat().st_mtime_ns == before  # not retrained
    data = json.loads((out / "results" / "results.json").read_text())
    assert set(data["tables"]) == set(_tables())  # the other tables stay
    t = data["tables"]["sinusoid"]  # and so do the settings this command did not run, with their own command
    assert t["settings"] == ["5-shot", "10-shot", "20-shot"] and list(t["rows"]["5-shot"])[-2:] == ["maml", "metanet"]
    carried = {m: row["meta"]["command"] for m, row in t["rows"]["5-shot"].items() if m not in ("maml", "metanet")}  # the rows it did not run stay
    assert carried and set(carried.values()) == {f"python scripts/reproduce.py --smoke --out {out}"}
    assert "--shots 5 --reuse" in t["setting_meta"]["5-shot"]["command"] == t["command"]
    assert t["setting_meta"]["10-shot"]["command"] == t["setting_meta"]["20-shot"]["command"] == f"python scripts/reproduce.py --smoke --out {out}"
    md = (out / "RESULTS.md").read_text()
    assert "--table sinusoid --methods maml metanet --shots 5 --reuse" in md
    section = _section(md, t["title"], "##")
    assert "From an earlier command than the table's:" not in _section(section, "5-shot", "###")
    assert "from an earlier command than this setting's (same budget, seeds and test tasks):\n\n- Command: `python scripts/reproduce.py --smoke" in _section(section, "5-shot", "###")
    for setting in ("10-shot", "20-shot"):
        block = _section(section, setting, "###")
        assert f"From an earlier command than the table's:\n\n- Command: `python scripts/reproduce.py --smoke --out {out}`" in block
    assert f"- Sinusoid regression: `python scripts/reproduce.py --smoke --out {out}`" in md  # both commands listed at the top


@pytest.mark.slow
def test_curve_and_multi_step_evaluate_equal_evaluate_at_every_step(rp, smoke):
    _, data = smoke
    seed, model = _seed_model(data, "multimodal", "5-shot", "metanet")
    test = seed["test"]
    episodes = rp.TestEpisodes(Multimodal(shots=5, queries=test["queries"]), test["n"], test["batch"], test["seed"], limit=1)
    multi = evaluate(model, episodes, [3, 0, 1, 2])  # one pass per task, adapting on
    assert sorted(multi) == [0, 1, 2, 3]
    for k in range(4):
        single = evaluate(model, episodes, k)
        assert multi[k]["n"] == single["n"] and multi[k]["mean"] == pytest.approx(single["mean"], rel=1e-6)
        assert multi[k]["ci95"] == pytest.approx(single["ci95"], rel=1e-5)
    curve = [multi[k]["mean"] for k in range(3)]
    assert seed["curve"] == pytest.approx(curve, rel=1e-6)  # what the run recorded (smoke: 0..2 steps)


def test_a_learning_curve_is_kept_evenly_thinned_and_finite(rp, tmp_path):
    lines = [{"step": i, "time": float(i), "query_loss": None if i == 7 else 1.0 / (i + 1)} for i in range(501)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    curve = rp.learning_curve(str(tmp_path), points=50)
    assert len(curve) == 50 and curve[0] == [0.0, 1.0] and curve[-1] == [500.0, 1.0 / 501]
    assert all(t != 7.0 for t, _ in curve) and [t for t, _ in curve] == sorted(t for t, _ in curve)
    assert rp.learning_curve(str(tmp_path), points=1000) == [[float(i), 1.0 / (i + 1)] for i in range(501) if i != 7]
    assert rp.learning_curve(str(tmp_path / "elsewhere")) == []


def test_verdicts_name_the_strongest_other_baseline():
    def row(mean):
        return {"aggregate": {"1": stat(mean, ci=0.01)}, "per_seed": [{}]}

    rows = {"maml": row(0.50), "protonet": row(0.90), "reptile": row(0.60), "metanet": row(0.85), "metanet-first-order": row(0.95)}
    lines = verdict_lines(rows, ["1"], "accuracy")
    assert any("metanet is 35.00 points higher accuracy than MAML" in line for line in lines)
    best = [line for line in lines if "best other baseline" in line]
    assert best == ["- against the best other baseline, accuracy after 1 step: metanet does not beat protonet: 5.00 points lower accuracy (85.00% vs 90.00%)."]


def test_the_best_metanet_recipe_meets_maml_too():
    def row(mean, ci=0.01):
        return {"aggregate": {"1": stat(mean, ci=ci), "10": stat(mean / 2, ci=ci)}, "per_seed": [{}]}

    rows = {"maml": row(2.0), "metanet": row(3.0), "metanet-remedies": row(0.4), "metanet-no-archgen-remedies": row(0.1), "metanet-mlp": row(0.5),
            "metanet-unfused": row(0.05)}
    rows["metanet"]["aggregate"]["10"] = stat(float("nan"))  # diverged: not a candidate
    lines = verdict_lines(rows, ["1", "10"], "MSE")
    best = [line for line in lines if "best metanet recipe" in line]
    assert best == [
        "- the best metanet recipe here (metanet-remedies, by the last column), MSE after 1 step: metanet-remedies is 80.0% lower MSE than MAML (0.4 vs 2).",
        "- the best metanet recipe here (metanet-remedies, by the last column), MSE after 10 steps: metanet-remedies is 80.0% lower MSE than MAML (0.2 vs 1).",
    ]  # neither the shared-architecture ablation nor the unfused executor (metanet's maths) is a recipe, however good
    del rows["metanet-remedies"], rows["metanet-mlp"]
    rows["metanet"] = row(0.3)
    assert not [line for line in verdict_lines(rows, ["1", "10"], "MSE") if "best metanet recipe" in line]  # the default is the best


def test_the_twin_is_found_by_configuration_where_the_rows_record_one():
    base = {"arch": "conditional", "weights": "vae", "param_prior": 0.0, "arch_hidden": 0, "arch_norm": False, "seed": 0, "data_root": "a"}

    def row(mean, **cfg):
        return {"aggregate": {"1": stat(mean)}, "per_seed": [{"config": {**base, **cfg}}]}

    rows = {"metanet": row(0.70), "metanet-no-archgen": row(0.75, arch="shared", data_root="b"),
            "metanet-norm": row(0.80, arch_norm=True), "metanet-mlp": row(0.78, arch_hidden=64, seed=1),
            "metanet-prior": row(0.85, param_prior=0.5), "metanet-no-archgen-prior": row(0.84, arch="shared", param_prior=0.5),
            "metanet-gumbel": row(0.6, gumbel=True),  # no shared run with its options: no pair
            "metanet-remedies": row(0.9, param_prior=0.5, arch_hidden=64)}
    assert ablation_pairs(rows) == [("metanet", "metanet-no-archgen"), ("metanet-norm", "metanet-no-archgen"), ("metanet-mlp", "metanet-no-archgen"),
                                    ("metanet-prior", "metanet-no-archgen-prior"), ("metanet-remedies", "metanet-no-archgen-prior")]
    rows["metanet-no-archgen-prior"]["per_seed"][0]["config"]["op_dropout"] = 0.3  # a name alone does not make a twin
    assert ("metanet-prior", "metanet-no-archgen-prior") not in ablation_pairs(rows)


def test_each_conditional_row_meets_its_shared_architecture_twin():
    def row(mean, ci=0.01):
        return {"aggregate": {"1": stat(mean, ci=ci)}, "per_seed": [{}]}

    rows = {"protonet": row(0.80), "metanet": row(0.70), "metanet-no-archgen": row(0.75), "metanet-prior": row(0.85),
            "metanet-no-archgen-prior": row(0.84, ci=0.02), "metanet-mlp": row(0.9)}
    lines = verdict_lines(rows, ["1"], "accuracy")  # no maml row: the other comparisons still stand
    assert lines[0] == "Verdict, metanet against the other rows at the same budget (computed from the rows above):"
    assert "- against the best other baseline, accuracy after 1 step: metanet does not beat protonet: 10.00 points lower accuracy (70.00% vs 80.00%)." in lines
    twins = [line for line in lines if "no-archgen" in line]
    assert twins == [
        "- accuracy after 1 step: metanet does not beat metanet-no-archgen: 5.00 points lower accuracy (70.00% vs 75.00%).",
        "- accuracy after 1 step: metanet-prior is 1.00 points higher accuracy than metanet-no-archgen-prior (85.00% vs 84.00%); the 95% intervals overlap, so the difference is not significant.",
    ]  # metanet-mlp has no twin row: no line
    rows["metanet-no-archgen-prior"]["per_seed"] = []  # a twin that failed in every seed is not compared
    assert [line for line in verdict_lines(rows, ["1"], "accuracy") if "no-archgen-prior" in line] == []
    del rows["metanet"]  # a table run with a remedy row and not the default recipe: the verdicts speak for it
    lines = verdict_lines(rows, ["1"], "accuracy")
    assert lines[0] == "Verdict, metanet-prior against the other rows at the same budget (computed from the rows above):"
    assert "- against the best other baseline, accuracy after 1 step: metanet-prior is 5.00 points higher accuracy than protonet (85.00% vs 80.00%)." in lines
    t = {"settings": ["s"], "eval_steps": [1], "metric": "accuracy", "rows": {"s": dict(rows, maml=row(0.5))}}
    assert summary_lines(t)[0] == ("**Summary: metanet-prior beats MAML in 1 of 1 (setting, steps) cells at this budget "
                                   "(1 with non-overlapping 95% intervals) and does not beat MAML in 0.**")


def test_a_failed_run_stays_failed_under_reuse(rp, tmp_path, monkeypatch):
    job = {"run_dir": str(tmp_path / "run"), "reuse": True, "cfg": {"seed": 0}}
    (tmp_path / "run").mkdir()
    calls = []

    def failing(j):
        calls.append(j)
        raise FloatingPointError("10 non-finite losses in a row\nmore")

    monkeypatch.setattr(rp, "train", lambda *a, **k: failing(None))
    assert rp._run_job_safely(job) == {"error": "FloatingPointError: 10 non-finite losses in a row"}
    assert len(calls) == 1
    again = rp._run_job_safely(job)  # reused: the failure, not a new training
    assert again == {"error": "FloatingPointError: 10 non-finite losses in a row", "reused": True} and len(calls) == 1


def test_reuse_reads_runs_saved_before_a_config_field_existed(rp, tmp_path, monkeypatch):
    """A run saved before TrainConfig had ``precision`` ran in float32: ``--reuse`` takes it
    for an fp32 job without retraining, and retrains it for a bf16 job."""
    import dataclasses

    monkeypatch.setattr(rp, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    cfg = dataclasses.asdict(rp.TrainConfig(seed=0))
    job = {"run_dir": str(tmp_path / "run"), "reuse": True, "cfg": cfg}
    (tmp_path / "run").mkdir()
    old_cfg = {k: v for k, v in cfg.items() if k != "precision"}
    (tmp_path / "run" / "result.json").write_text(json.dumps({"job": {"run_dir": job["run_dir"], "cfg": old_cfg}, "scores": {}}))
    assert rp.run_job(job)["reused"] is True
    bf16 = dict(job, cfg=dict(cfg, precision="bf16"))
    with pytest.raises(AssertionError, match="retrained"):
        rp.run_job(bf16)


def test_precision_reaches_every_row_and_its_command(rp):
    args = rp.parse_args(["--table", "sinusoid", "--methods", "maml", "--shots", "5", "--precision", "bf16"])
    table = rp.TABLES["sinusoid"]
    setting = rp.settings_for("sinusoid", args)[0]
    assert rp.make_config(table, setting, rp.METHODS["maml"], 0, args).precision == "bf16"
    assert "--precision bf16" in rp.row_command("sinusoid", setting.label, "maml", args)
    default = rp.parse_args(["--table", "sinusoid", "--methods", "maml", "--shots", "5"])
    assert rp.make_config(table, setting, rp.METHODS["maml"], 0, default).precision == "fp32"
    assert "--precision" not in rp.row_command("sinusoid", setting.label, "maml", default)


def test_remedy_rows_run_only_when_named_and_carry_their_options(rp, tmp_path):
    remedies = [m for m in rp.METHODS.values() if not m.default]
    assert {m.name for m in remedies} >= {"metanet-warmup", "metanet-prior", "metanet-opdrop", "metanet-mlp", "metanet-remedies"}
    default = rp.plan_jobs(rp.parse_args(["--table", "multimodal"]), ["multimodal"], tmp_path, tmp_path)
    assert not {j["method"] for j in default} & {m.name for m in remedies}
    named = rp.plan_jobs(rp.parse_args(["--table", "multimodal", "--methods", "metanet", "metanet-remedies"]), ["multimodal"], tmp_path, tmp_path)
    cfg = next(j["cfg"] for j in named if j["method"] == "metanet-remedies")
    assert (cfg["arch_warmup"], cfg["param_prior"], cfg["op_dropout"], cfg["arch_hidden"]) == (0.25, 0.5, 0.3, 64)


def test_the_machine_line_names_the_cpus_the_runs_trained_on(rp):
    """Figures depend on the CPU: the report names each run's (capability, model), and
    says how many runs, or which commands, predate that record."""
    from metanet.results import _run_lines

    rows = {"5-shot": {"maml": {"per_seed": [{"cpu": "AVX2, AMD EPYC"}, {"cpu": None}]}, "metanet": {"per_seed": [{"cpu": "AVX512, Intel Xeon"}]}}}
    assert rp._cpus(rows) == "AVX2, AMD EPYC; AVX512, Intel Xeon; not recorded for 1 run(s)"
    meta = {"command": "c", "date": "d", "budget": "1 min", "seeds": 1, "test": {"n": 1, "queries": 1, "ways": 0},
            "machine": {"torch": "2.x", "cpus": 2, "parallel_runs": 1, "cpu": rp._cpus({"s": {"m": {"per_seed": [{"cpu": "AVX2, AMD EPYC"}]}}})}}
    assert _run_lines(meta)[2] == "- Machine: torch 2.x, 2 CPUs, one thread per run, 1 run(s) at a time; trained on: AVX2, AMD EPYC."
    del meta["machine"]["cpu"]  # a command from before the record: said so, not left out
    assert _run_lines(meta)[2].endswith("; trained on: CPU not recorded.")
