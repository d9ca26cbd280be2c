"""metanet.results: pooled statistics against a direct computation over every score, the
verdict sentences, and the markdown of a small hand-made table, line for line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from metanet.results import aggregate_seeds, format_stat, from_json, merge_settings, pool, table_commands, table_markdown, to_json, verdict, verdict_lines


def summary(scores: np.ndarray) -> dict:
    """What ``meta.evaluate`` reports for a group of scores: 1.96 sample sd / sqrt(n)."""
    n = len(scores)
    ci = 1.96 * float(np.std(scores, ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": float(np.mean(scores)), "ci95": ci, "n": n, "nonfinite": int((~np.isfinite(scores)).sum())}


def cell(mean: float, ci: float = 0.01, n: int = 600) -> dict:
    return {"mean": mean, "ci95": ci, "n": n}


# ------------------------------------------------------------------------- statistics


def test_pool_equals_the_summary_of_the_concatenated_scores() -> None:
    rng = np.random.default_rng(0)
    groups = [rng.normal(i, 1 + i, size=n) for i, n in enumerate((5, 1, 40, 9, 2))]
    pooled = pool([summary(g) for g in groups] + [{"mean": math.nan, "ci95": math.nan, "n": 0}])  # an empty group counts for nothing
    direct = summary(np.concatenate(groups))
    assert pooled["n"] == direct["n"] == 57 and pooled["nonfinite"] == 0
    assert pooled["mean"] == pytest.approx(direct["mean"], rel=1e-12)
    assert pooled["ci95"] == pytest.approx(direct["ci95"], rel=1e-9)


def test_pool_of_one_group_is_that_group_and_of_none_is_empty() -> None:
    g = summary(np.array([0.3, 0.1, 0.7, 0.4]))
    assert pool([g]) == pytest.approx(g)
    empty = pool([])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["ci95"])
    single = pool([summary(np.array([2.5]))])  # one score: a mean, no interval
    assert single["mean"] == 2.5 and math.isnan(single["ci95"])


def test_pool_of_a_diverged_group_is_nan_and_counts_the_diverged_tasks() -> None:
    bad = summary(np.array([0.1, math.inf, math.nan, 0.2]))
    pooled = pool([summary(np.array([0.1, 0.2, 0.3])), bad])
    assert math.isnan(pooled["mean"]) and (pooled["n"], pooled["nonfinite"]) == (7, 2)


def test_aggregate_seeds_means_the_seed_means_not_the_pooled_mean() -> None:
    rng = np.random.default_rng(1)
    seeds = [rng.uniform(s, s + 1, size=n) for s, n in enumerate((10, 30, 20))]  # unequal sizes: the two means differ
    agg = aggregate_seeds([summary(x) for x in seeds])
    seed_means = [float(np.mean(x)) for x in seeds]
    assert agg["mean"] == pytest.approx(sum(seed_means) / 3, rel=1e-12)
    assert agg["mean"] != pytest.approx(float(np.mean(np.concatenate(seeds))))
    assert agg["ci95"] == pytest.approx(summary(np.concatenate(seeds))["ci95"], rel=1e-9)
    assert agg["seed_sd"] == pytest.approx(float(np.std(seed_means, ddof=1)), rel=1e-12)
    assert (agg["n"], agg["seeds"], agg["nonfinite"]) == (60, 3, 0)
    one = aggregate_seeds([summary(seeds[0])])
    assert one["seeds"] == 1 and math.isnan(one["seed_sd"]) and one["mean"] == pytest.approx(seed_means[0])


# ---------------------------------------------------------------------------- verdicts


def test_verdict_a_win_names_both_and_the_margin() -> None:
    assert verdict("accuracy", cell(0.62), cell(0.55), ours_name="ours", base_name="protonet") == "ours is 7.00 points higher accuracy than protonet (62.00% vs 55.00%)"
    assert verdict("MSE", cell(0.25), cell(1.0)) == "metanet is 75.0% lower MSE than MAML (0.25 vs 1)"


def test_verdict_a_loss_says_by_how_much() -> None:
    assert verdict("MSE", cell(1.2), cell(1.0)) == "metanet does not beat MAML: 20.0% higher MSE (1.2 vs 1)"
    assert verdict("accuracy", cell(0.40), cell(0.425)) == "metanet does not beat MAML: 2.50 points lower accuracy (40.00% vs 42.50%)"


def test_verdict_a_win_within_the_intervals_is_a_tie() -> None:
    close = verdict("accuracy", cell(0.51, ci=0.02), cell(0.50, ci=0.02))
    assert close == "metanet is 1.00 points higher accuracy than MAML (51.00% vs 50.00%); the 95% intervals overlap, so the difference is not significant"
    apart = verdict("accuracy", cell(0.51, ci=0.004), cell(0.50, ci=0.004))
    assert apart == "metanet is 1.00 points higher accuracy than MAML (51.00% vs 50.00%)"


def test_verdict_without_test_tasks_says_so() -> None:
    assert verdict("accuracy", cell(0.5), cell(math.nan, n=0), base_name="reptile") == "cannot compare metanet with reptile: no test tasks"


# ---------------------------------------------------------------------------- markdown


def test_format_stat_cells() -> None:
    assert format_stat(cell(0.91234, ci=0.01234), "accuracy") == "91.23% ± 1.23"
    assert format_stat(cell(0.91234, ci=math.nan, n=1), "accuracy") == "91.23%"
    assert format_stat(cell(0.123456, ci=0.00347), "MSE") == "0.1235 ± 0.0035"
    assert format_stat(cell(math.nan, n=0), "MSE") == "no test tasks"
    assert format_stat(cell(math.nan), "MSE") == "diverged (non-finite)"


def _row(mean: float, steps: float, ms: float, command: str) -> dict:
    return {"aggregate": {"1": cell(mean, ci=0.05, n=20)}, "per_seed": [{}, {}], "errors": [], "steps": steps, "generation_ms": ms, "command": command}


def test_table_markdown_of_a_small_table() -> None:
    failed = {"aggregate": {"1": cell(math.nan, ci=math.nan, n=0)}, "per_seed": [], "errors": [{"seed": 0, "run_dir": "runs/r0", "error": "FloatingPointError: boom"}], "command": "cmd-reptile"}
    t = {
        "title": "Toy regression", "metric": "MSE", "eval_steps": [1], "command": "python scripts/reproduce.py --table toy",
        "date": "2024-01-01 00:00 UTC", "smoke": False, "budget": "1 min", "seeds": 2, "settings": ["5-shot"],
        "test": {"n": 10, "queries": 4, "ways": 0}, "machine": {"torch": "2.x", "cpus": 2, "parallel_runs": 1},
        "rows": {"5-shot": {"maml": _row(0.8, 120.0, 1.234, "cmd-maml"), "reptile": failed, "metanet": _row(0.5, 80.0, 3.5, "cmd-metanet")}},
    }  # fmt: skip
    assert table_markdown("toy", t, "figs") == [
        "## Toy regression",
        "",
        "- Command: `python scripts/reproduce.py --table toy`",
        "- Date: 2024-01-01 00:00 UTC",
        "- Machine: torch 2.x, 2 CPUs, one thread per run, 1 run(s) at a time; trained on: CPU not recorded.",
        "- Budget: 1 min of meta-training per method and seed; 2 seed(s); evaluated on 10 test tasks x 4 query points (the same tasks for every method and seed).",
        "",
        "**Summary: metanet beats MAML in 1 of 1 (setting, steps) cells at this budget (1 with non-overlapping 95% intervals) and does not beat MAML in 0.**",
        "",
        "### 5-shot",
        "",
        "| method | meta-steps | MSE after 1 step | generate (ms/task) | budget | seeds | reproduce |",
        "|---|---|---|---|---|---|---|",
        "| maml | 120 | 0.8 ± 0.05 | 1.2 | 1 min | 2 | `cmd-maml` |",
        "| reptile | - | failed | - | 1 min | 0 (1 failed) | `cmd-reptile` |",
        "| metanet | 80 | **0.5 ± 0.05** | 3.5 | 1 min | 2 | `cmd-metanet` |",
        "",
        "- `reptile` seed 0 failed: FloatingPointError: boom (run directory `runs/r0`).",
        "",
        "Verdict, metanet against MAML at the same budget (computed from the rows above):",
        "",
        "- MSE after 1 step: metanet is 37.5% lower MSE than MAML (0.5 vs 0.8).",
        "",
        "![learning curves](figs/toy_learning.png)",
        "",
        "![MSE vs adaptation steps](figs/toy_adaptation.png)",
        "",
        "![cost per new task](figs/toy_cost.png)",
        "",
    ]


# -------------------------------------------------------------------------------- JSON


def _table(command: str, settings: list[str], date: str = "2024-01-01 00:00 UTC", **over) -> dict:
    t = {
        "title": "Toy", "metric": "accuracy", "eval_steps": [1], "command": command, "date": date, "smoke": False,
        "budget": "35 min", "seeds": 1, "settings": settings, "test": {"n": 600, "queries": 15, "ways": 5, "split": "val"},
        "machine": {"torch": "2.x", "cpus": 2, "parallel_runs": 2}, "rows": {s: {"maml": _row(0.5, 10.0, 1.0, f"cmd {s}")} for s in settings},
    }  # fmt: skip
    t["setting_meta"] = {s: {k: t[k] for k in ("command", "date", "budget", "seeds", "machine", "test")} for s in settings}
    return dict(t, **over)


def test_merge_keeps_the_settings_a_later_command_did_not_run_with_their_own_command() -> None:
    old = _table("cmd --ways 5 20", ["5-way 1-shot", "20-way 1-shot"])
    new = _table("cmd --ways 5", ["5-way 1-shot"], date="2024-02-02 00:00 UTC", budget="40 min")
    merged = merge_settings(old, new)
    assert merged["settings"] == ["5-way 1-shot", "20-way 1-shot"]
    assert merged["rows"]["5-way 1-shot"] is new["rows"]["5-way 1-shot"] and merged["rows"]["20-way 1-shot"] is old["rows"]["20-way 1-shot"]
    assert merged["setting_meta"]["20-way 1-shot"]["command"] == "cmd --ways 5 20"
    assert table_commands(merged) == [("cmd --ways 5", "2024-02-02 00:00 UTC"), ("cmd --ways 5 20", "2024-01-01 00:00 UTC")]
    md = "\n".join(table_markdown("toy", merged, "figs"))
    assert "- Budget: 40 min of meta-training" in md.split("### 5-way 1-shot")[0]
    block = md.split("### 20-way 1-shot")[1]
    assert "From an earlier command than the table's:\n\n- Command: `cmd --ways 5 20`\n- Date: 2024-01-01 00:00 UTC" in block
    assert "- Budget: 35 min of meta-training per method and seed; 1 seed(s); evaluated on 600 test tasks, 15 queries per class, split `val`" in block
    assert "From an earlier command" not in md.split("### 20-way 1-shot")[0]
    assert "| maml | 10 | **50.00% ± 5.00** | 1 | 35 min | 2 | `cmd 20-way 1-shot` |" in block  # each row under its own budget
    assert "| maml | 10 | **50.00% ± 5.00** | 1 | 40 min | 2 | `cmd 5-way 1-shot` |" in md
    legacy = {k: v for k, v in old.items() if k != "setting_meta"}  # saved before settings had their own meta
    assert merge_settings(legacy, new)["setting_meta"]["20-way 1-shot"]["budget"] == "35 min"


def test_merge_keeps_the_rows_a_later_command_of_the_same_setting_did_not_run() -> None:
    old = _table("cmd --methods maml", ["5-way 1-shot"])
    new = _table("cmd --methods protonet", ["5-way 1-shot"], date="2024-02-02 00:00 UTC")
    new["rows"]["5-way 1-shot"] = {"protonet": _row(0.6, 20.0, 1.0, "cmd proto")}
    merged = merge_settings(old, new)
    rows = merged["rows"]["5-way 1-shot"]
    assert list(rows) == ["maml", "protonet"] and rows["protonet"] is new["rows"]["5-way 1-shot"]["protonet"]
    assert rows["maml"]["meta"]["command"] == "cmd --methods maml" and "meta" not in old["rows"]["5-way 1-shot"]["maml"]
    assert table_commands(merged) == [("cmd --methods protonet", "2024-02-02 00:00 UTC"), ("cmd --methods maml", "2024-01-01 00:00 UTC")]
    md = "\n".join(table_markdown("toy", merged, "figs"))
    assert "Rows `maml` from an earlier command than this setting's (same budget, seeds and test tasks):\n\n- Command: `cmd --methods maml`" in md
    assert "| maml | 10 | 50.00% ± 5.00 | 1 | 35 min | 2 | `cmd 5-way 1-shot` |" in md and "**60.00% ± 5.00**" in md
    again = merge_settings(merged, dict(new, command="cmd --methods relationnet", date="2024-03-03 00:00 UTC"))  # a carried row keeps its first meta
    assert again["rows"]["5-way 1-shot"]["maml"]["meta"]["command"] == "cmd --methods maml"
    # a row is not carried into a setting scored otherwise, and a row the new command ran is its own
    other = _table("cmd", ["5-way 1-shot"], budget="40 min")
    other["setting_meta"]["5-way 1-shot"]["budget"] = "40 min"
    other["rows"]["5-way 1-shot"] = {"protonet": _row(0.6, 20.0, 1.0, "cmd proto")}
    assert merge_settings(old, other) is other
    assert "| CPU |" not in md  # no row records a CPU: no column
    elsewhere = _table("cmd", ["5-way 1-shot"])  # a row from another CPU carries, and the table says which CPU
    elsewhere["rows"]["5-way 1-shot"] = {"protonet": dict(_row(0.6, 20.0, 1.0, "cmd proto"), per_seed=[{"cpu": "AVX512, Intel Xeon"}])}
    elsewhere["setting_meta"]["5-way 1-shot"]["machine"] = dict(elsewhere["machine"], cpu="AVX512, Intel Xeon")
    old["rows"]["5-way 1-shot"]["maml"]["per_seed"] = [{"cpu": "AVX2, AMD EPYC"}]
    old["setting_meta"]["5-way 1-shot"]["machine"] = dict(old["machine"], cpu="AVX2, AMD EPYC")
    mixed = merge_settings(old, elsewhere)
    assert list(mixed["rows"]["5-way 1-shot"]) == ["maml", "protonet"]
    md = "\n".join(table_markdown("toy", mixed, "figs"))
    assert "| method | meta-steps | CPU | accuracy after 1 step |" in md
    assert "| maml | 10 | AVX2 | 50.00% ± 5.00 |" in md and "| protonet | 20 | AVX512 | **60.00% ± 5.00** |" in md
    assert merge_settings(old, _table("cmd again", ["5-way 1-shot"]))["rows"]["5-way 1-shot"]["maml"].get("meta") is None


def test_rows_carry_into_every_setting_of_a_table_without_per_setting_meta() -> None:
    """A table from before per-setting meta keeps one test, its first setting's: the rows
    of its second setting carry too (ways and shots are the setting's label)."""
    labels = ["5-way 1-shot", "5-way 5-shot"]
    old = _table("cmd --methods maml", labels, test={"n": 600, "queries": 15, "ways": 5, "shots": 1, "split": "val"})
    del old["setting_meta"]
    new = _table("cmd --methods protonet", labels, date="2024-02-02 00:00 UTC")
    for s, shots in zip(labels, (1, 5)):
        new["rows"][s] = {"protonet": _row(0.6, 20.0, 1.0, "cmd proto")}
        new["setting_meta"][s]["test"] = dict(old["test"], shots=shots)
    merged = merge_settings(old, new)
    assert all(list(merged["rows"][s]) == ["maml", "protonet"] for s in labels)
    new["setting_meta"]["5-way 5-shot"]["test"]["n"] = 100  # other test tasks: not carried
    assert list(merge_settings(old, new)["rows"]["5-way 5-shot"]) == ["protonet"]


@pytest.mark.parametrize(("distinct", "top", "note"), [
    (1, 1.0, "**the generator collapsed: every test task gets the same architecture**"),
    (2, 0.998, "**the generator nearly collapsed: one architecture covers at least 95% of the test tasks**"),
    (9, 0.40, "the generator did not collapse (test tasks get different architectures)"),
])  # fmt: skip
def test_the_population_note_calls_a_near_collapse_one(distinct, top, note) -> None:
    pop = {"distinct": distinct, "collapsed": distinct == 1, "top_share": top, "tasks": 600, "labels": ["conv", "skip"], "edges": ["c0 e0->1"], "freq": [[top, 1 - top]]}
    t = _table("cmd", ["5-way 1-shot"])
    t["rows"]["5-way 1-shot"]["metanet"] = dict(_row(0.9, 10.0, 1.0, "c"), per_seed=[{"population": pop, "config": {"arch": "conditional"}}])
    line = next(x for x in table_markdown("toy", t, "figs") if x.startswith("- Architectures of `metanet`"))
    assert line.endswith(f"; {note}.")


@pytest.mark.parametrize("change", [{"eval_steps": [1, 10]}, {"metric": "MSE"}, {"smoke": True}])
def test_merge_carries_no_setting_across_metrics_steps_or_smoke(change) -> None:
    old = _table("old", ["5-way 1-shot", "20-way 1-shot"], **change)
    new = _table("new", ["5-way 1-shot"])
    assert merge_settings(old, new) is new and merge_settings(None, new) is new


def test_json_round_trip_keeps_nan_figures_as_nan() -> None:
    data = {"aggregate": {"1": {"mean": math.nan, "ci95": math.inf, "n": 0}}, "curve": [0.5, math.nan], "population_png": None, "steps": (1.0, 2)}
    text = json.dumps(to_json(data), allow_nan=False)  # strict JSON: no NaN or Infinity tokens
    assert text == '{"aggregate": {"1": {"mean": null, "ci95": null, "n": 0}}, "curve": [0.5, null], "population_png": null, "steps": [1.0, 2]}'
    back = from_json(json.loads(text))
    assert math.isnan(back["aggregate"]["1"]["mean"]) and math.isnan(back["aggregate"]["1"]["ci95"])
    assert back["curve"][0] == 0.5 and math.isnan(back["curve"][1])
    assert back["population_png"] is None  # not a figure: stays null


def test_the_verdict_says_when_its_rows_trained_on_different_cpus() -> None:
    rows = {"maml": dict(_row(0.5, 10.0, 1.0, "cmd maml"), per_seed=[{"cpu": "AVX2, AMD EPYC"}]),
            "metanet": dict(_row(0.6, 10.0, 1.0, "cmd metanet"), per_seed=[{"cpu": "AVX512, Intel Xeon"}])}  # fmt: skip
    assert "they trained on different CPUs, column `CPU`" in verdict_lines(rows, ["1"], "accuracy")[0]
    rows["maml"]["per_seed"] = rows["metanet"]["per_seed"]
    assert verdict_lines(rows, ["1"], "accuracy")[0] == "Verdict, metanet against MAML at the same budget (computed from the rows above):"
