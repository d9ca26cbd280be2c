"""Fuzzing what users type: invalid search spaces and invalid command lines.

Every generated input is invalid by construction. Each must end in exactly one line on
stderr (``metanet: error: ...``), exit status 2, no traceback, nothing on stdout, and no
output folder left behind. ``metanet.cli.main`` runs in-process for speed; two inputs also
run as real processes to check the exit status the shell sees.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from metanet.cli import main
from metanet.ops import OPS
from metanet.space import SPACES_DIR, builtin_spaces
from metanet.tasks import TASKS
from metanet.trainer import TrainConfig, train

SPACES = {name: yaml.safe_load((SPACES_DIR / f"{name}.yaml").read_text()) for name in builtin_spaces()}
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _check_one_line(code: int, out: str, err: str, *, argv) -> None:
    assert code == 2, (argv, out, err)
    assert err.startswith("metanet: error: ") and err.count("\n") == 1 and err.endswith("\n"), (argv, err)
    assert "Traceback" not in err and out == "", (argv, out)


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------------ search spaces


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)
_not_int = st.sampled_from(["3", 2.5, None, [1], {"a": 1}, True, "all"])


def _is_image(doc: dict) -> bool:
    return len(doc["task"]["input"]) == 3


@st.composite
def _bad_document(draw) -> tuple[str, str]:
    """(space name, YAML text) that ``spaces validate`` must refuse."""
    name = draw(st.sampled_from(sorted(SPACES)))
    doc = copy.deepcopy(SPACES[name])
    image = _is_image(doc)
    i = draw(st.integers(0, len(doc["cells"]) - 1))
    cell = doc["cells"][i]
    kind = draw(st.sampled_from([
        "drop_required", "unknown_key", "task_input", "task_outputs", "task_kind", "cells_empty", "op_name", "ops_empty",
        "op_domain", "nodes", "inputs", "keep", "output", "allow_zero", "cell_type", "width", "stem_op", "head_op",
        "hyper", "even_kernel", "duplicate_op", "name", "reductions", "tag", "syntax", "duplicate_key", "not_a_mapping",
    ]))  # fmt: skip
    event(f"space: {kind}")
    if kind == "drop_required":
        del doc[draw(st.sampled_from(["name", "task", "stem", "cells", "head"]))]
    elif kind == "unknown_key":
        where = draw(st.sampled_from(["top", "task", "stem", "cell", "head"]))
        key = "x_" + draw(_names)
        {"top": doc, "task": doc["task"], "stem": doc["stem"], "cell": cell, "head": doc["head"]}[where][key] = 1
    elif kind == "task_input":
        doc["task"]["input"] = draw(st.sampled_from([[], [0], [1, 2], [1, 28], "1", [-1, 8, 8], [1.5], [1, 2, 3, 4], None]))
    elif kind == "task_outputs":
        doc["task"]["outputs"] = draw(st.sampled_from([0, -3, "5", 2.5, None, True, [5]]))
    elif kind == "task_kind":
        doc["task"]["kind"] = draw(st.sampled_from(["classify", "regresion", "", 3, None]))
    elif kind == "cells_empty":
        doc["cells"] = draw(st.sampled_from([[], {}, "cells", None]))
    elif kind == "op_name":
        ops = list(cell.get("ops") or doc["cell"]["ops"])
        bad = draw(_names.filter(lambda s: s not in OPS))
        ops[draw(st.integers(0, len(ops) - 1))] = bad
        cell["ops"] = ops
    elif kind == "ops_empty":
        cell["ops"] = draw(st.sampled_from([[], "conv_3x3", None, 3]))
    elif kind == "op_domain":  # an op of the other domain
        cell["ops"] = ["linear_relu"] if image else ["conv_3x3"]
    elif kind == "nodes":
        cell["nodes"] = draw(st.sampled_from([0, -1, 17, 100]) | _not_int)
    elif kind == "inputs":
        cell["inputs"] = draw(st.sampled_from([0, 3, -1]) | _not_int)
    elif kind == "keep":
        cell.update(inputs=1, keep=draw(st.sampled_from([2, 5, 0, -1, "some"])))
    elif kind == "output":
        cell["output"] = draw(st.sampled_from(["avg", "mean", 1, None, ""]))
    elif kind == "allow_zero":
        cell["allow_zero"] = draw(st.sampled_from(["yes", 1, 0, "false", None]))
    elif kind == "cell_type":
        cell["type"] = draw(st.sampled_from(["mlp", "dense"] if image else ["normal", "reduction", "dense"]))
    elif kind == "width":
        cell["channels" if image else "width"] = draw(st.sampled_from([0, -8]) | _not_int)
    elif kind == "stem_op":
        doc["stem"]["op"] = draw(st.sampled_from(["linear", "conv_4x4", "", None] if image else ["conv_3x3", "lin", None]))
    elif kind == "head_op":
        doc["head"]["op"] = draw(st.sampled_from(["linear", "pool", None] if image else ["global_pool_linear", "softmax", 1]))
    elif kind == "hyper":  # a hyper-parameter the op does not take
        cell["ops"] = [{"op": "skip", draw(st.sampled_from(["kernel", "width", "x"])): 3}]
    elif kind == "even_kernel":
        if not image:
            doc["cells"] = []  # vector ops take no kernel: fall back to another invalid edit
        else:
            cell["ops"] = [{"op": "conv_3x3", "kernel": draw(st.sampled_from([2, 4, 0]))}]
    elif kind == "duplicate_op":
        op = (cell.get("ops") or doc["cell"]["ops"])[0]
        cell["ops"] = [op, op]
    elif kind == "name":
        doc["name"] = draw(st.sampled_from(["", None, 3, ["a"]]))
    elif kind == "reductions":
        if image:
            doc["task"]["input"] = [1, 2, 2]
            doc["cells"] = [{"type": "reduction", "channels": 4}] * 3
        else:
            doc["cells"].append({"type": "reduction", "width": 4})
    text = yaml.safe_dump(doc, sort_keys=False)
    if kind == "tag":
        tag = draw(st.sampled_from(["!!python/object/apply:os.system ['touch MARKER']", "!!python/name:os.system", "!!python/object/new:os.system ['touch MARKER']"]))
        text = text.replace(f"name: {doc['name']}\n", f"name: {tag}\n", 1)
    elif kind == "syntax":
        text = text + draw(st.sampled_from(["cells: [\n", "\tname: x\n", "- listed\n", "head: {op: linear\n", "a: b: c\n"]))
    elif kind == "duplicate_key":
        text = text + f"name: {draw(_names)}\n"
    elif kind == "not_a_mapping":
        text = draw(st.sampled_from(["", "- 1\n- 2\n", "just text\n", "42\n", "null\n"]))
    return name, text


@FUZZ
@given(_bad_document())
def test_invalid_spaces_fail_with_one_line(work, capsys, case):
    name, text = case
    path = work / "space.yaml"
    path.write_text(text)
    code, out, err = _run(["spaces", "validate", path], capsys)
    _check_one_line(code, out, err, argv=(name, text))
    assert str(path) in err
    assert not Path("MARKER").exists() and not (work / "MARKER").exists()


# ------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def cli_files(work) -> dict[str, Path]:
    """A tiny run, support sets good and bad, a plain file, a folder without a run."""
    run = work / "run"
    train(TrainConfig(space="mlp_regression", tasks="sinusoid", steps=1, meta_batch=2, val_tasks=2, val_every=1, eval_inner_steps=1, strategy="loop", dim=16, latent=8), run)
    x = np.linspace(-1, 1, 5, dtype=np.float32)[:, None]
    y = np.sin(x)[:, 0]
    files = {"run": run, "plain": work / "plain.txt", "empty_dir": work / "empty"}
    files["plain"].write_text("hello")
    files["empty_dir"].mkdir()
    for key, arrays in {
        "good": {"x": x, "y": y},
        "nan_x": {"x": np.where(x > 0.5, np.nan, x), "y": y},
        "inf_y": {"x": x, "y": np.full_like(y, np.inf)},
        "empty": {"x": x[:0], "y": y[:0]},
        "shape": {"x": np.zeros((5, 1, 8, 8), np.float32), "y": y},
        "lengths": {"x": x, "y": y[:3]},
        "no_y": {"x": x},
        "strings": {"x": np.array(["a"] * 5), "y": y},
    }.items():
        files[key] = work / f"{key}.npz"
        np.savez(files[key], **arrays)
    return files


_BAD_POS_INT = st.sampled_from(["0", "-1", "-7", "abc", "1.5", "", "nan", "1e3", " "])
_BAD_NONNEG_INT = st.sampled_from(["-1", "x", "0.5", ""])
_BAD_POS_FLOAT = st.sampled_from(["0", "-0.1", "nan", "inf", "-inf", "x", ""])


@st.composite
def _bad_train(draw, f) -> tuple[list, Path]:
    out = f["run"].parent / "new" / draw(_names)
    base = ["train", "--steps", "1", "--quiet"]
    kind = draw(st.sampled_from(["pos_int", "nonneg_int", "pos_float", "nonneg_float", "entropy", "choice", "tasks", "space", "orders",
                                 "dangling", "unknown_flag", "no_out", "resume_nowhere", "resume_plain_dir", "mismatch",
                                 "out_is_file", "no_data", "existing_run", "resume_with_flag"]))  # fmt: skip
    event(f"train: {kind}")
    if kind == "pos_int":
        flag = draw(st.sampled_from(["--steps", "--meta-batch", "--ways", "--shots", "--queries", "--val-every", "--val-tasks", "--log-every", "--ckpt-every", "--max-nonfinite"]))
        argv = base + [flag, draw(_BAD_POS_INT), "--out", out]
    elif kind == "nonneg_int":
        argv = base + [draw(st.sampled_from(["--inner-steps", "--eval-inner-steps", "--seed"])), draw(_BAD_NONNEG_INT), "--out", out]
    elif kind == "pos_float":
        argv = base + [draw(st.sampled_from(["--meta-lr", "--inner-lr", "--temperature", "--final-temperature", "--minutes"])), draw(_BAD_POS_FLOAT), "--out", out]
    elif kind == "nonneg_float":
        argv = base + ["--beta", draw(st.sampled_from(["-1", "nan", "inf", "x"])), "--out", out]
    elif kind == "entropy":
        argv = base + ["--entropy-weight", draw(st.sampled_from(["nan", "inf", "-inf", "x", ""])), "--out", out]
    elif kind == "choice":
        flag = draw(st.sampled_from(["--strategy", "--arch", "--weights"]))
        argv = base + [flag, draw(_names.filter(lambda s: s not in ("auto", "loop", "vmap", "conditional", "shared", "fixed", "vae", "off"))), "--out", out]
    elif kind == "tasks":
        argv = base + ["--tasks", draw(_names.filter(lambda s: s not in TASKS)), "--out", out]
    elif kind == "space":
        argv = base + ["--space", draw(_names.filter(lambda s: s not in builtin_spaces())), "--out", out]
    elif kind == "orders":
        argv = base + ["--first-order", "--reptile", "--out", out]
    elif kind == "dangling":
        argv = base + ["--out", out, draw(st.sampled_from(["--steps", "--space", "--tasks", "--meta-lr"]))]
    elif kind == "unknown_flag":
        argv = base + ["--out", out, "--x-" + draw(_names), "1"]
    elif kind == "no_out":
        argv = base
    elif kind == "resume_nowhere":
        argv = ["train", "--resume", "--out", out]
    elif kind == "resume_plain_dir":
        argv = ["train", "--resume", "--out", f["empty_dir"]]
    elif kind == "mismatch":
        argv = base + ["--space", draw(st.sampled_from(["tiny", "conv4", "conv_omniglot", "darts_cnn"])), "--tasks", draw(st.sampled_from(["sinusoid", "multimodal"])), "--out", out]
    elif kind == "out_is_file":
        argv = base + ["--out", f["plain"]]
    elif kind == "no_data":
        argv = base + ["--tasks", "omniglot", "--data-root", out.parent / "nodata", "--out", out]
    elif kind == "existing_run":
        argv = base + ["--out", f["run"]]
    else:
        argv = ["train", "--resume", "--out", f["run"], draw(st.sampled_from(["--steps", "--meta-batch", "--seed"])), "3"]
    return argv, out.parent


@st.composite
def _bad_evaluate(draw, f) -> tuple[list, Path]:
    run = f["run"]
    kind = draw(st.sampled_from(["episodes", "inner", "shots", "tasks", "no_data", "split", "not_a_run", "missing", "file", "flag"]))
    event(f"evaluate: {kind}")
    argv = {
        "episodes": lambda: ["evaluate", run, "--episodes", draw(_BAD_POS_INT)],
        "inner": lambda: ["evaluate", run, "--inner-steps", draw(_BAD_NONNEG_INT)],
        "shots": lambda: ["evaluate", run, draw(st.sampled_from(["--shots", "--queries", "--ways"])), draw(_BAD_POS_INT)],
        "tasks": lambda: ["evaluate", run, "--tasks", draw(_names.filter(lambda s: s not in TASKS))],
        "no_data": lambda: ["evaluate", run, "--tasks", "omniglot", "--data-root", f["empty_dir"] / "none"],
        "split": lambda: ["evaluate", run, "--split", draw(st.sampled_from(["val", "train", "x"]))],
        "not_a_run": lambda: ["evaluate", f["empty_dir"]],
        "missing": lambda: ["evaluate", f["empty_dir"] / draw(_names)],
        "file": lambda: ["evaluate", f["plain"]],
        "flag": lambda: ["evaluate", run, "--x-" + draw(_names)],
    }[kind]()
    return argv, f["empty_dir"] / "never"


@st.composite
def _bad_spaces(draw, f) -> tuple[list, Path]:
    kind = draw(st.sampled_from(["action", "validate_none", "show_count", "missing", "folder", "unknown"]))
    event(f"spaces: {kind}")
    argv = {
        "action": lambda: ["spaces", draw(_names.filter(lambda s: s not in ("list", "validate", "show")))],
        "validate_none": lambda: ["spaces", "validate"],
        "show_count": lambda: ["spaces", "show"] + draw(st.sampled_from([[], ["tiny", "conv4"]])),
        "missing": lambda: ["spaces", draw(st.sampled_from(["validate", "show"])), f["empty_dir"] / (draw(_names) + ".yaml")],
        "folder": lambda: ["spaces", "validate", f["empty_dir"]],
        "unknown": lambda: ["spaces", "show", draw(_names.filter(lambda s: s not in builtin_spaces()))],
    }[kind]()
    return argv, f["empty_dir"] / "never"


@st.composite
def _bad_generate(draw, f) -> tuple[list, Path]:
    out = f["run"].parent / "gen" / draw(_names)
    kind = draw(st.sampled_from(["support", "missing_npz", "plain", "adapt", "metadata", "no_out", "no_support", "not_a_run"]))
    event(f"generate: {kind}")
    good = ["--support", f["good"]]
    argv = {
        "support": lambda: ["generate", f["run"], "--support", f[draw(st.sampled_from(["nan_x", "inf_y", "empty", "shape", "lengths", "no_y", "strings"]))], "--out", out],
        "missing_npz": lambda: ["generate", f["run"], "--support", f["empty_dir"] / "none.npz", "--out", out],
        "plain": lambda: ["generate", f["run"], "--support", f["plain"], "--out", out],
        "adapt": lambda: ["generate", f["run"], *good, "--adapt-steps", draw(_BAD_NONNEG_INT), "--out", out],
        "metadata": lambda: ["generate", f["run"], *good, "--metadata", draw(st.sampled_from(["0", "sinusoid", "x"])), "--out", out],
        "no_out": lambda: ["generate", f["run"], *good],
        "no_support": lambda: ["generate", f["run"], "--out", out],
        "not_a_run": lambda: ["generate", f["empty_dir"], *good, "--out", out],
    }[kind]()
    return argv, out.parent


@st.composite
def _bad_inspect(draw, f) -> tuple[list, Path]:
    out = f["run"].parent / "insp" / "g.png"
    kind = draw(st.sampled_from(["format", "png_no_out", "bad_support", "no_support", "missing", "diff", "out_folder", "population"]))
    event(f"inspect: {kind}")
    good = ["--support", f["good"]]
    argv = {
        "format": lambda: ["inspect", f["run"], *good, "--format", draw(_names.filter(lambda s: s not in ("text", "dot", "graphml", "json", "png")))],
        "png_no_out": lambda: ["inspect", f["run"], *good, "--format", "png"],
        "bad_support": lambda: ["inspect", f["run"], "--support", f[draw(st.sampled_from(["nan_x", "empty", "shape", "lengths", "no_y"]))]],
        "no_support": lambda: ["inspect", f["run"]],
        "missing": lambda: ["inspect", f["empty_dir"] / draw(_names)],
        "diff": lambda: ["inspect", f["run"], *good, "--diff", f["empty_dir"] / "none.json"],
        "out_folder": lambda: ["inspect", f["run"], *good, "--out", out],
        "population": lambda: ["inspect", f["run"], "--population", f["good"]],
    }[kind]()
    return argv, out.parent


@settings(FUZZ, max_examples=400)
@given(st.data())
def test_invalid_command_lines_fail_with_one_line(cli_files, capsys, data):
    make = data.draw(st.sampled_from([_bad_train, _bad_evaluate, _bad_spaces, _bad_generate, _bad_inspect]))
    argv, out = data.draw(make(cli_files))
    run_before = sorted((p.name, p.stat().st_mtime_ns) for p in cli_files["run"].iterdir())
    code, stdout, err = _run(argv, capsys)
    _check_one_line(code, stdout, err, argv=argv)
    assert not out.exists(), argv
    assert sorted((p.name, p.stat().st_mtime_ns) for p in cli_files["run"].iterdir()) == run_before
    assert list(cli_files["empty_dir"].iterdir()) == []


def test_real_exit_status_and_no_traceback_in_a_subprocess(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"name: !!python/object/apply:os.system ['touch {tmp_path / 'MARKER'}']\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv in (["spaces", "validate", str(evil)], ["train", "--steps", "-1", "--out", str(tmp_path / "r")]):
        p = subprocess.run([sys.executable, "-m", "metanet", *argv], capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 2, p.stderr
        assert p.stderr.startswith("metanet: error: ") and p.stderr.count("\n") == 1 and p.stdout == ""
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "r").exists()
