"""Results tables: pooled statistics, verdict sentences and their markdown.

The figures come from ``meta.evaluate`` summaries, ``{"mean", "ci95", "n", "nonfinite"}``
per group of test tasks, where ``ci95 = 1.96 * sd / sqrt(n)`` with the sample sd. ``pool``
merges such summaries exactly (as if every score had been kept); ``aggregate_seeds`` turns
one summary per seed into a table cell. ``verdict`` compares two cells in one sentence, and
``table_markdown`` renders one table of ``scripts/reproduce.py``'s ``results.json``:

    {"title", "metric" ("MSE" | "accuracy"), "eval_steps", "command", "date", "smoke",
     "budget", "seeds", "settings", "test", "machine",
     "rows": {setting: {method: {"aggregate": {k: cell}, "per_seed": [...], "errors": [...],
                                 "families"?, "steps", "generation_ms", "command", ...}}},
     "setting_meta"?: {setting: {"command", "date", "budget", "seeds", "machine", "test"}}}

The table-level fields describe the newest command; ``merge_settings`` keeps the settings
an earlier command ran and the newest did not, each with the ``setting_meta`` that produced it,
and the rows of a setting both ran whose method the newest did not run, each with its own
``"meta"`` (the same fields), where both scored that setting alike.

``to_json`` and ``from_json`` write non-finite figures as ``null`` and read them back. Pure
Python and numpy: nothing here trains, evaluates or draws.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "pool",
    "aggregate_seeds",
    "verdict",
    "format_stat",
    "summary_lines",
    "verdict_lines",
    "lead_row",
    "ablation_pairs",
    "table_markdown",
    "merge_settings",
    "table_commands",
    "to_json",
    "from_json",
]


# ------------------------------------------------------------------------- statistics


def pool(stats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Statistics of the union of groups of scores, from each group's ``evaluate`` summary.

    ``evaluate`` reports ``ci95 = 1.96 * sd / sqrt(n)`` with the sample sd (n - 1), so each
    group's sd is recovered from its ``ci95`` and the pooled sd is exact (within-group sum
    of squares plus between-group spread), as if every score had been kept. Empty groups
    are skipped; any diverged (non-finite) task makes the pooled mean NaN and is counted
    in ``nonfinite``.
    """
    stats = [s for s in stats if s["n"] > 0]
    n = sum(int(s["n"]) for s in stats)
    nonfinite = sum(int(s.get("nonfinite") or 0) for s in stats)
    if n == 0:
        return {"mean": math.nan, "ci95": math.nan, "n": 0, "nonfinite": 0}
    if nonfinite:
        return {"mean": math.nan, "ci95": math.nan, "n": n, "nonfinite": nonfinite}
    mean = sum(s["mean"] * s["n"] for s in stats) / n
    ss = 0.0
    for s in stats:
        sd = s["ci95"] * math.sqrt(s["n"]) / 1.96 if s["n"] > 1 else 0.0
        ss += (s["n"] - 1) * sd**2 + s["n"] * (s["mean"] - mean) ** 2
    ci = 1.96 * math.sqrt(ss / (n - 1)) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "ci95": ci, "n": n, "nonfinite": 0}


def aggregate_seeds(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds of the per-seed means; 95% CI over every test task pooled across seeds.

    ``seed_sd`` is the spread (sample sd) of the per-seed means, NaN for one seed: the
    pooled CI does not contain seed-to-seed variation.
    """
    means = [s["mean"] for s in per_seed]
    pooled = pool(per_seed)
    sd = float(np.std(np.asarray(means, dtype=np.float64), ddof=1)) if len(means) > 1 else math.nan
    return {"mean": sum(means) / len(means), "ci95": pooled["ci95"], "n": pooled["n"], "seeds": len(means), "seed_sd": sd, "nonfinite": pooled["nonfinite"]}


# ---------------------------------------------------------------------------- verdicts


def verdict(metric: str, ours: dict[str, float], base: dict[str, float], ours_name: str = "metanet", base_name: str = "MAML") -> str:
    """One plain sentence comparing two aggregated results at equal budget.

    MSE: "metanet is X% lower MSE than MAML" when it is lower, else "metanet does not beat
    MAML: X% higher MSE". Accuracy: the same in percentage points. A win whose 95%
    intervals overlap is called not significant.

    Args:
        metric: ``"MSE"`` (lower is better) or ``"accuracy"`` (higher is better).
        ours, base: cells as ``aggregate_seeds`` returns them (``mean``, ``ci95``, ``n``,
            optionally ``nonfinite``).
        ours_name, base_name: the names the sentence uses.
    """
    a, b = ours["mean"], base["mean"]
    if ours.get("n") == 0 or base.get("n") == 0:
        return f"cannot compare {ours_name} with {base_name}: no test tasks"
    if not (math.isfinite(a) and math.isfinite(b)):
        bad = [(n, s) for n, s in ((ours_name, ours), (base_name, base)) if not math.isfinite(s["mean"])]
        what = " and ".join(f"{n} diverged on {s['nonfinite']} of {s['n']} test tasks" if s.get("nonfinite") else f"{n} has a non-finite {metric}" for n, s in bad)
        return f"cannot compare {ours_name} with {base_name}: {what}"
    lower_is_better = metric == "MSE"
    if metric == "MSE":
        value = f"({a:.4g} vs {b:.4g})"
        pct = 100.0 * abs(a - b) / abs(b) if b != 0 else math.inf
        diff = f"{pct:.1f}%" if round(pct, 1) < 100.0 or pct >= 100.0 else ">99.9%"
    else:
        value = f"({100 * a:.2f}% vs {100 * b:.2f}%)"
        diff = f"{100 * abs(a - b):.2f} points"
    wins = a < b if lower_is_better else a > b
    if a == b:
        return f"{ours_name} does not beat {base_name}: equal {metric} {value}"
    if not wins:
        worse = "higher" if lower_is_better else "lower"
        return f"{ours_name} does not beat {base_name}: {diff} {worse} {metric} {value}"
    better = "lower" if lower_is_better else "higher"
    sentence = f"{ours_name} is {diff} {better} {metric} than {base_name} {value}"
    ca, cb = ours.get("ci95", math.nan), base.get("ci95", math.nan)
    if math.isfinite(ca) and math.isfinite(cb) and abs(a - b) <= ca + cb:
        sentence += "; the 95% intervals overlap, so the difference is not significant"
    return sentence


# ---------------------------------------------------------------------------- markdown


def format_stat(stat: dict[str, float], metric: str) -> str:
    """One table cell: ``mean ± ci95`` (accuracy in percent), or why there is no number."""
    m, ci = stat["mean"], stat["ci95"]
    if stat["n"] == 0:
        return "no test tasks"
    if not math.isfinite(m):
        nf = stat.get("nonfinite")
        return f"diverged on {nf} of {stat['n']} tasks" if nf else "diverged (non-finite)"
    if metric == "accuracy":
        return f"{100 * m:.2f}% ± {100 * ci:.2f}" if math.isfinite(ci) else f"{100 * m:.2f}%"
    return f"{m:.4g} ± {ci:.2g}" if math.isfinite(ci) else f"{m:.4g}"


def _best(rows: dict[str, Any], key: str, metric: str, get: Callable[[dict[str, Any]], dict[str, Any]]) -> str | None:
    """The method with the best finite mean in column ``key``, or None when there is none."""
    vals = {name: get(row)[key]["mean"] for name, row in rows.items() if math.isfinite(get(row)[key]["mean"])}
    if not vals:
        return None
    return (max if metric == "accuracy" else min)(vals, key=vals.get)


SETTING_META = ("command", "date", "budget", "seeds", "machine", "test")


def merge_settings(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` (a table just run) with what ``old`` (the same table from an earlier command)
    has and ``new`` does not: the settings ``new`` did not run, each keeping the command,
    date, budget, seeds and test tasks that produced it; and, in a setting both ran with the
    same budget, seeds and test tasks, the rows of the methods ``new`` did not run, each
    keeping that meta as its ``"meta"``. A row from another CPU carries too (the machines
    of this kind differ by chance): ``table_markdown`` then says which CPU each row
    trained on, since a wall-clock budget buys different work there. Nothing carries over between tables scored in
    different metrics or inner steps, or between a smoke run and a real one; a row that
    ``new`` ran is ``new``'s alone."""
    if old is None or old.get("smoke") != new.get("smoke") or old["metric"] != new["metric"] or list(old["eval_steps"]) != list(new["eval_steps"]):
        return new
    old_meta = {s: (old.get("setting_meta") or {}).get(s) or {k: old[k] for k in SETTING_META if k in old} for s in old["settings"]}
    new_meta = new.get("setting_meta") or {}
    kept = [s for s in old["settings"] if s not in new["rows"] and s in old["rows"]]
    alike = [s for s in old["settings"] if s in new["rows"] and s in old["rows"] and s in new_meta and _scored_alike(old_meta[s], new_meta[s])]
    carried = {s: {m: dict(row, meta=row.get("meta") or old_meta[s]) for m, row in old["rows"][s].items() if m not in new["rows"][s]} for s in alike}
    carried = {s: rows for s, rows in carried.items() if rows}
    if not kept and not carried:
        return new
    merged = dict(new, rows=dict(new["rows"]), setting_meta=dict(new_meta))
    for s, rows in carried.items():
        merged["rows"][s] = {**rows, **new["rows"][s]}
    for s in kept:
        merged["rows"][s] = old["rows"][s]
        merged["setting_meta"][s] = old_meta[s]
    merged["settings"] = sorted([*new["settings"], *kept], key=lambda label: [int(n) for n in re.findall(r"\d+", label)])
    return merged


def _scored_alike(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two commands' rows of one setting compare: the same budget, seeds and test
    tasks."""
    # ways and shots are the setting's own (its label): a table from before per-setting
    # meta keeps one test, its first setting's, for every setting
    tests = [{k: v for k, v in (m.get("test") or {}).items() if k not in ("ways", "shots")} for m in (a, b)]
    return all(a.get(k) == b.get(k) for k in ("budget", "seeds")) and tests[0] == tests[1]


def _row_cpu(row: dict[str, Any]) -> str:
    """The CPU capabilities a row's seeds trained on (``AVX2``, ``AVX512``), or "not recorded"."""
    caps = sorted({s["cpu"].split(",")[0] for s in row["per_seed"] if s.get("cpu")})
    return ", ".join(caps) if caps else "not recorded"


def _mixed_cpus(rows: dict[str, Any]) -> dict[str, str] | None:
    """Each trained row's CPU (``_row_cpu``) where the rows trained on more than one, else None."""
    cpus = {m: _row_cpu(r) for m, r in rows.items() if r["per_seed"]}
    return cpus if len(set(cpus.values())) > 1 else None


def _foreign(t: dict[str, Any], setting: str) -> dict[str, Any] | None:
    """The meta of a setting that an earlier command than the table's produced, else None."""
    meta = (t.get("setting_meta") or {}).get(setting)
    return meta if meta and meta.get("command") != t["command"] else None


def table_commands(t: dict[str, Any]) -> list[tuple[str, str]]:
    """``(command, date)`` of every command whose settings the table shows, the newest first."""
    out = [(t["command"], t["date"])]
    for s in t["settings"]:
        for meta in [_foreign(t, s), *_row_metas(t, s).values()]:
            if meta and (meta["command"], meta["date"]) not in out:
                out.append((meta["command"], meta["date"]))
    return out


def _row_metas(t: dict[str, Any], setting: str) -> dict[str, dict[str, Any]]:
    """The rows of a setting that an earlier command than the setting's produced: their meta, by method."""
    own = ((t.get("setting_meta") or {}).get(setting) or t)["command"]
    return {m: row["meta"] for m, row in t["rows"][setting].items() if row.get("meta") and row["meta"]["command"] != own}


def _run_lines(meta: dict[str, Any]) -> list[str]:
    """Command, date, machine and budget lines of one command's settings."""
    test = meta.get("test") or {}
    what = f"{test.get('n')} test tasks" + (f" x {test.get('queries')} query points" if not test.get("ways") else f", {test.get('queries')} queries per class")
    split = f", split `{test.get('split')}`" if test.get("ways") else ""
    m = meta["machine"]
    return [
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}",
        f"- Machine: torch {m['torch']}, {m['cpus']} CPUs, one thread per run, {m['parallel_runs']} run(s) at a time"
        + f"; trained on: {m.get('cpu') or 'CPU not recorded'}.",
        f"- Budget: {meta['budget']} of meta-training per method and seed; {meta['seeds']} seed(s); evaluated on {what}{split} (the same tasks for every method and seed).",
    ]


def _steps_header(k: str, metric: str) -> str:
    return f"{metric} after {k} step{'' if k == '1' else 's'}"


def table_markdown(name: str, t: dict[str, Any], figures_rel: str) -> list[str]:
    """The markdown section of one table, as lines.

    Args:
        name: the table's key (it names the plots, ``<name>_learning.png`` and so on).
        t: the table's entry in ``results.json`` (see the module docstring).
        figures_rel: the folder of the plots, relative to the markdown file.
    """
    metric, ks = t["metric"], [str(k) for k in t["eval_steps"]]
    out = [f"## {t['title']}", ""]
    if t["smoke"]:
        out += ["**Smoke run: a few meta-steps per method, a handful of test tasks. The numbers test the pipeline and mean nothing.**", ""]
    out += _run_lines(t) + [""]
    if any(_foreign(t, s) or _row_metas(t, s) for s in t["settings"]):
        out += ["These lines are the newest command's; a setting or row that an earlier command produced gives its own.", ""]
    out += summary_lines(t)
    for setting in t["settings"]:
        rows = t["rows"][setting]
        out += [f"### {setting}", ""]
        meta = _foreign(t, setting)
        if meta:
            out += ["From an earlier command than the table's:", "", *_run_lines(meta), ""]
        row_metas = _row_metas(t, setting)
        for cmd in dict.fromkeys(m["command"] for m in row_metas.values()):
            names = ", ".join(f"`{m}`" for m, rm in row_metas.items() if rm["command"] == cmd)
            rm = next(rm for rm in row_metas.values() if rm["command"] == cmd)
            out += [f"Rows {names} from an earlier command than this setting's (same budget, seeds and test tasks):", "", *_run_lines(rm), ""]
        cpus = _mixed_cpus(rows)
        if cpus:
            out += ["The rows trained on different CPUs (column `CPU`): a wall-clock budget buys different work on each, so compare the meta-steps too.", ""]
        head = ["method", "meta-steps", *(["CPU"] if cpus else [])] + [_steps_header(k, metric) for k in ks] + ["generate (ms/task)", "budget", "seeds", "reproduce"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        best = {k: _best(rows, k, metric, lambda r: r["aggregate"]) for k in ks}
        for method, row in rows.items():
            failed = not row["per_seed"]
            cells = [method, "-" if failed else f"{row['steps']:.0f}", *([cpus.get(method, "-")] if cpus else [])]
            for k in ks:
                c = "failed" if failed else format_stat(row["aggregate"][k], metric)
                cells.append(f"**{c}**" if best[k] == method else c)
            seeds = f"{len(row['per_seed'])}" + (f" ({len(row['errors'])} failed)" if row.get("errors") else "")
            cells += ["-" if failed else f"{row['generation_ms']:.2g}", (row.get("meta") or meta or t)["budget"], seeds, f"`{row['command']}`"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        for method, row in rows.items():
            for e in row.get("errors", []):
                out.append(f"- `{method}` seed {e['seed']} failed: {e['error']} (run directory `{e['run_dir']}`).")
        if any(row.get("errors") for row in rows.values()):
            out.append("")
        fams = next((r["families"] for r in rows.values() if r.get("families")), None)
        if fams:
            for k in ks:
                names = list(fams)
                out += [f"Per family, {_steps_header(k, metric)} (test tasks filtered by their family metadata):", ""]
                out += ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
                for method, row in rows.items():
                    if row.get("families"):
                        out.append(f"| {method} | " + " | ".join(format_stat(row["families"][f][k], metric) for f in names) + " |")
                    else:
                        out.append(f"| {method} | " + " | ".join("failed" for _ in names) + " |")
                out.append("")
        out += verdict_lines(rows, ks, metric)
        out += _population_lines(rows, figures_rel)
        out += _fused_lines(rows)
    out += [
        f"![learning curves]({figures_rel}/{name}_learning.png)",
        "",
        f"![{metric} vs adaptation steps]({figures_rel}/{name}_adaptation.png)",
        "",
        f"![cost per new task]({figures_rel}/{name}_cost.png)",
        "",
    ]
    return out


def summary_lines(t: dict[str, Any]) -> list[str]:
    """One bold line: in how many (setting, steps) cells metanet (``lead_row``) beats MAML; none without both rows."""
    outcomes, names = [], set()
    for setting in t["settings"]:
        rows = t["rows"][setting]
        ours = lead_row(rows)
        if ours and "maml" in rows and rows[ours]["per_seed"] and rows["maml"]["per_seed"]:
            names.add(ours)
            for k in t["eval_steps"]:
                outcomes.append((ours, verdict(t["metric"], rows[ours]["aggregate"][str(k)], rows["maml"]["aggregate"][str(k)], ours_name=ours)))
    if not outcomes:
        return []
    name = " / ".join(sorted(names))
    wins = [o for ours, o in outcomes if o.startswith(f"{ours} is ")]
    solid = [o for o in wins if "not significant" not in o]
    losses = [o for ours, o in outcomes if o.startswith(f"{ours} does not beat")]
    line = (f"**Summary: {name} beats MAML in {len(wins)} of {len(outcomes)} (setting, steps) cells at this budget "
            f"({len(solid)} with non-overlapping 95% intervals) and does not beat MAML in {len(losses)}.**")  # fmt: skip
    return [line, ""]


def lead_row(rows: dict[str, Any]) -> str | None:
    """The row the verdicts speak for: ``metanet``, else the first conditional metanet variant
    (a table run with a remedy row and not the default recipe), else none."""
    if "metanet" in rows:
        return "metanet"
    return next((m for m in rows if m.startswith("metanet-") and "no-" not in m), None)


def verdict_lines(rows: dict[str, Any], ks: Sequence[str], metric: str) -> list[str]:
    """The verdict list of one setting: metanet (``lead_row``) against MAML, the best other
    baseline, per family, and each conditional metanet row against its shared-architecture
    ablation; where another metanet recipe (a remedy row) scores best in the last column, it
    against MAML as well.

    Args:
        rows: the setting's rows, by method.
        ks: the columns (inner steps, as strings).
        metric: ``"MSE"`` or ``"accuracy"``.
    """
    ours = lead_row(rows)
    if ours is None:
        return ["Verdict: not computed (needs a metanet row).", ""]
    if not rows[ours]["per_seed"]:
        return [f"Verdict, {ours} at the same budget:", "", f"- cannot compare: {ours} failed in every seed.", ""]
    has_maml = "maml" in rows and rows["maml"]["per_seed"]
    where = " (computed from the rows above" + ("; they trained on different CPUs, column `CPU`" if _mixed_cpus(rows) else "") + ")"
    out = [f"Verdict, {ours} against {'MAML' if has_maml else 'the other rows'} at the same budget{where}:", ""]
    if "maml" in rows and not has_maml:
        out.append("- cannot compare: maml failed in every seed.")
    if has_maml:
        for k in ks:
            out.append(f"- {_steps_header(k, metric)}: {verdict(metric, rows[ours]['aggregate'][k], rows['maml']['aggregate'][k], ours_name=ours)}.")
        # a remedy row that beats the default recipe: the claim against MAML is stated for it too
        # (not the ablations that take a part out, nor metanet-unfused: the same maths as metanet)
        recipes = {m: r for m, r in rows.items() if m.startswith("metanet") and "no-" not in m and m != "metanet-unfused" and r["per_seed"]}
        top = _best(recipes, ks[-1], metric, lambda r: r["aggregate"])
        if top is not None and top != ours:
            for k in ks:
                out.append(f"- the best metanet recipe here ({top}, by the last column), {_steps_header(k, metric)}: {verdict(metric, rows[top]['aggregate'][k], rows['maml']['aggregate'][k], ours_name=top)}.")
    baselines = [m for m, r in rows.items() if not m.startswith("metanet") and m != "maml" and r["per_seed"]]
    for k in ks:  # the strongest other baseline of each column, not only MAML
        best = _best({m: rows[m] for m in baselines}, k, metric, lambda r: r["aggregate"]) if baselines else None
        if best is not None:
            out.append(f"- against the best other baseline, {_steps_header(k, metric)}: {verdict(metric, rows[ours]['aggregate'][k], rows[best]['aggregate'][k], ours_name=ours, base_name=best)}.")
    fams = rows[ours].get("families")
    if fams and has_maml and rows["maml"].get("families"):
        k = ks[-1]
        for f in fams:
            out.append(f"- {f}, {_steps_header(k, metric)}: {verdict(metric, fams[f][k], rows['maml']['families'][f][k], ours_name=ours)}.")
    out += [""]
    pairs = ablation_pairs(rows)
    if pairs:
        out += ["Task-conditional architecture against the same recipe with one shared architecture (each pair differs only in `arch` and the options of a conditional map alone):", ""]
        for a, b in pairs:
            for k in ks:
                out.append(f"- {_steps_header(k, metric)}: {verdict(metric, rows[a]['aggregate'][k], rows[b]['aggregate'][k], ours_name=a, base_name=b)}.")
        out += [""]
    return out


# options that act only on a task-conditional architecture map (a shared architecture has no map)
_CONDITIONAL_ONLY = {"arch_hidden": 0, "arch_norm": False}
# run bookkeeping that does not change the recipe
_BOOKKEEPING = ("seed", "data_root", "log_every", "ckpt_every")


def _recipe(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run's configuration as its shared-architecture twin would have it."""
    return {**{k: v for k, v in cfg.items() if k not in _BOOKKEEPING}, **_CONDITIONAL_ONLY, "arch": "shared"}


def ablation_pairs(rows: dict[str, Any]) -> list[tuple[str, str]]:
    """``(conditional row, its shared-architecture twin)`` for every conditional row whose twin ran too.

    Where the rows record their configuration, the twin is the row with ``arch: shared`` whose
    configuration is the same once the options of a conditional map alone (``arch_hidden``,
    ``arch_norm``) are set aside, so that metanet-norm meets metanet-no-archgen; otherwise the
    twin is found by name, ``metanet-X`` against ``metanet-no-archgen-X``.
    """
    def config(m: str) -> dict[str, Any] | None:
        seeds = rows[m]["per_seed"]
        return seeds[0].get("config") if seeds else None

    shared = [m for m in rows if (config(m) or {}).get("arch") == "shared"]
    pairs = []
    for m in rows:
        if not m.startswith("metanet") or "no-archgen" in m or not rows[m]["per_seed"]:
            continue
        named = "metanet-no-archgen" + m[len("metanet"):]
        cfg = config(m)
        if cfg is None:
            twins = [named] if named in rows and rows[named]["per_seed"] else []
        elif cfg.get("arch") == "conditional":
            twins = sorted((s for s in shared if _recipe(config(s)) == _recipe(cfg)), key=lambda s: s != named)
        else:
            twins = []
        if twins:
            pairs.append((m, twins[0]))
    return pairs


def _population_lines(rows: dict[str, Any], figures_rel: str) -> list[str]:
    """What the generated architectures of each searching row look like over the test tasks."""
    out = []
    for method, row in rows.items():
        pops = [s["population"] for s in row["per_seed"] if s.get("population")]
        if not pops:
            continue
        arch = row["per_seed"][0]["config"]["arch"]
        distinct = ", ".join(str(p["distinct"]) for p in pops)
        collapsed = sum(p["collapsed"] for p in pops)
        if arch == "shared":
            note = "one shared architecture by construction"
        elif collapsed == len(pops):
            note = "**the generator collapsed: every test task gets the same architecture**" + (" (in every seed)" if len(pops) > 1 else "")
        elif collapsed:
            note = f"**the generator collapsed to one architecture in {collapsed} of {len(pops)} seeds**"
        elif all(p["top_share"] >= 0.95 for p in pops):
            note = "**the generator nearly collapsed: one architecture covers at least 95% of the test tasks**" + (" (in every seed)" if len(pops) > 1 else "")
        else:
            note = "the generator did not collapse (test tasks get different architectures)"
        top = ", ".join(f"{100 * p['top_share']:.0f}%" for p in pops)
        health = ""
        if "parametric_share" in pops[0]:  # recorded since graph.population_health
            health += "; kept edges with weights " + ", ".join(f"{100 * p['parametric_share']:.0f}%" for p in pops)
        if "mutual_information" in pops[0]:
            per = "; ".join(", ".join(f"{f}: {n}" for f, n in p["distinct_per_family"].items()) for p in pops)
            health += "; family-genotype mutual information " + ", ".join(f"{p['mutual_information']:.2f} bits" for p in pops) + f" (distinct genotypes per family id: {per})"
        out.append(f"- Architectures of `{method}` over the {pops[0]['tasks']} test tasks: distinct genotypes per seed {distinct}; the most common covers {top}{health}; {note}.")
        if method == lead_row(rows):
            p = pops[0]
            out += ["", "  Op frequency per candidate edge (seed 0, `metanet.export.op_frequency`; rows sum to 1):", ""]
            out += ["  | edge | " + " | ".join(p["labels"]) + " |", "  |" + "---|" * (len(p["labels"]) + 1)]
            for e, fr in zip(p["edges"], p["freq"]):
                out.append(f"  | {e} | " + " | ".join(f"{v:.2f}" if v else "." for v in fr) + " |")
            out.append("")
            png = row["per_seed"][0].get("population_png")
            if png:
                out += [f"  ![metanet architectures over the test tasks]({figures_rel}/{png})", ""]
    return (["Population view of the generated architectures:", ""] + out + [""]) if out else []


def _fused_lines(rows: dict[str, Any]) -> list[str]:
    """The fused-vs-unfused check of the rows that recorded one."""
    checks = [(m, s["fused_check"]) for m, row in rows.items() for s in row["per_seed"] if s.get("fused_check")]
    if not checks:
        return []
    out = ["Fused vs unfused mixed ops (the meta-objective of a few test tasks in float64, the same trained weights, both paths):", ""]
    for m, c in checks:
        out.append(f"- `{m}` weights: fused {c['fused']:.6g}, unfused {c['unfused']:.6g}, |difference| {c['abs_diff']:.2g} (relative {c['rel_diff']:.2g}).")
    if all(rows.get(m, {}).get("per_seed") for m in ("metanet", "metanet-unfused")):
        a, b = rows["metanet"]["steps"], rows["metanet-unfused"]["steps"]
        out.append(f"- In the same budget the fused run made {a:.0f} meta-steps and the unfused one {b:.0f} ({a / max(b, 1):.2f}x): "
                   "fusion changes speed, not the function; the unfused row's accuracy differs only through the steps it did not get.")  # fmt: skip
    return out + [""]


# -------------------------------------------------------------------------------- JSON


def to_json(v: Any) -> Any:
    """``v`` with non-finite floats as ``None``: strict JSON that any parser reads."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: to_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_json(x) for x in v]
    return v


_NUMERIC = {"mean", "ci95", "seed_sd", "generation_ms", "adapt_ms"}


def from_json(v: Any, key: str | None = None) -> Any:
    """Undo ``to_json`` for the figures the markdown reads: ``None`` back to NaN.

    Args:
        v: parsed JSON.
        key: the dict key ``v`` was found under (``None`` becomes NaN only under a figure's
            key, or inside a ``curve`` list).
    """
    if isinstance(v, dict):
        return {k: from_json(x, k) for k, x in v.items()}
    if isinstance(v, list):
        return [math.nan if x is None and key == "curve" else from_json(x) for x in v]
    return math.nan if v is None and key in _NUMERIC else v
