"""What a user types or points at, wrong: one line on stderr, exit 2, nothing half-written.

Also: the non-finite guard (skipped steps, the stop after N in a row, no NaN in last.pt),
the checkpoint format-version check on resume, and crafted pickles and YAML tags that must
never run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml

from metanet import checkpoint as ckpt
from metanet import tasks
from metanet.cli import main
from metanet.tasks import DEFAULT_VAL_ALPHABETS, Episode, Sinusoid
from metanet.trainer import FORMAT_VERSION, TrainConfig, train

QUICK = dict(steps=2, meta_batch=2, val_tasks=2, val_every=2, eval_inner_steps=1, log_every=1, strategy="loop", dim=16, latent=8)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    assert err.startswith("metanet: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real (tiny) sinusoid run."""
    out = tmp_path_factory.mktemp("runs") / "reg"
    train(TrainConfig(space="mlp_regression", tasks="sinusoid", **QUICK), out)
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@dataclasses.dataclass(frozen=True)
class _Images28:
    """3-way 1x28x28 episodes: the input shape of conv_omniglot, not of tiny."""

    shots: int = 1
    queries: int = 1
    kind: ClassVar[str] = "classification"
    input_shape: ClassVar[tuple[int, ...]] = (1, 28, 28)
    n_outputs: ClassVar[int] = 3
    n_families: ClassVar[int] = 0

    def sample(self, batch, generator=None):
        y = torch.arange(3).expand(batch, 3).contiguous()
        return Episode(torch.rand(batch, 3, 1, 28, 28, generator=generator), y, torch.rand(batch, 3, 1, 28, 28, generator=generator), y)


@pytest.fixture
def images28():
    tasks.register_tasks("_test_images28")(_Images28)
    yield "_test_images28"
    del tasks.TASKS["_test_images28"]


def _fake_omniglot(root: Path) -> Path:
    """3 training characters (12 classes with rotations) and one of each validation alphabet."""
    root.mkdir()
    images = np.ones((3 + len(DEFAULT_VAL_ALPHABETS), 20, 28, 28), dtype=bool)
    np.savez(root / "images_background.npz", images=images)
    spans = [{"alphabet": "Latin", "first_id": 1, "last_id": 3}]
    spans += [{"alphabet": a, "first_id": 4 + i, "last_id": 4 + i} for i, a in enumerate(DEFAULT_VAL_ALPHABETS)]
    (root / "alphabets_background.json").write_text(json.dumps({"background": spans}))
    return root


# ------------------------------------------------------------------------- train: bad input


def _train_cases(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    bad_data, omniglot = tmp_path / "emptydata", tmp_path / "omni"
    return {
        "space for other tasks": (["--space", "conv_omniglot", "--tasks", "sinusoid"], ["space 'conv_omniglot' is for classification but tasks 'sinusoid' are regression"]),
        "unknown tasks": (["--tasks", "sinusiod"], ["task distribution 'sinusiod' is not one of", "(did you mean 'sinusoid'?)"]),
        "unknown space": (["--space", "mlp_regresion"], ["mlp_regresion: no such file; give a YAML path or a built-in space:", "did you mean 'mlp_regression'?"]),
        "negative steps": (["--steps", "-3"], ["argument --steps: expected a positive integer, got -3"]),
        "zero meta-batch": (["--meta-batch", "0"], ["argument --meta-batch: expected a positive integer, got 0"]),
        "steps not a number": (["--steps", "ten"], ["argument --steps: expected a positive integer, got 'ten'"]),
        "meta-lr zero": (["--meta-lr", "0"], ["argument --meta-lr: expected a positive number, got 0"]),
        "entropy weight nan": (["--entropy-weight", "nan"], ["argument --entropy-weight: expected a finite number, got nan"]),
        "negative inner steps": (["--inner-steps", "-1"], ["argument --inner-steps: expected an integer >= 0, got -1"]),
        "unknown flag": (["--stpes", "3"], ["unrecognized arguments: --stpes 3"]),
        "bad strategy": (["--strategy", "fast"], ["argument --strategy: invalid choice: 'fast'"]),
        "bad precision": (["--precision", "fp16"], ["argument --precision: invalid choice: 'fp16'"]),
        "compile with bf16": (["--compile", "--precision", "bf16"], ["compile needs precision fp32, got 'bf16'", "use --compile or --precision bf16, not both"]),
        "two orders": (["--first-order", "--reptile"], ["--first-order and --reptile exclude each other"]),
        "fixed arch without one": (["--arch", "fixed"], ["space 'mlp_regression': a fixed architecture needs a genotype, or a space with one op per cell"]),
        "no data folder": (["--tasks", "omniglot", "--data-root", str(tmp_path / "nowhere")], ["does not exist or is not a folder"]),
        "malformed data folder": (["--tasks", "omniglot", "--data-root", str(bad_data)], ["no Omniglot 'background' data in", "expected images_background.npz (bool images [characters, drawings, H, W]) or images_background/<alphabet>/<character>/*.png"]),
        "more ways than classes": (["--tasks", "omniglot", "--data-root", str(omniglot), "--ways", "20"], ["ways = 20 exceeds the 12 classes of split 'train'"]),
        "space yaml missing": (["--space", str(tmp_path / "none.yaml")], ["none.yaml: no such file"]),
    }


CASES = list(_train_cases(Path("/nonexistent")).keys())


@pytest.mark.parametrize("case", CASES)
def test_train_bad_input_is_one_line_and_leaves_no_folder(case, tmp_path, capsys):
    extra, fragments = _train_cases(tmp_path)[case]
    (tmp_path / "emptydata").mkdir()
    _fake_omniglot(tmp_path / "omni")
    out = tmp_path / "deep" / "run"
    code, out_text, err = run_cli(["train", "--steps", "2", "--quiet", "--out", out, *extra], capsys)
    one_line_error(code, err, *fragments)
    assert out_text == ""
    assert not (tmp_path / "deep").exists()


def test_train_space_shape_that_does_not_match_the_tasks(images28, tmp_path, capsys):
    code, _, err = run_cli(["train", "--space", "tiny", "--tasks", images28, "--ways", "3", "--out", tmp_path / "r"], capsys)
    one_line_error(code, err, "space 'tiny' expects inputs [1, 8, 8] but tasks '_test_images28' give [1, 28, 28]")
    code, _, err = run_cli(["train", "--space", "conv_omniglot", "--tasks", images28, "--ways", "5", "--out", tmp_path / "r"], capsys)
    one_line_error(code, err, "tasks '_test_images28' are 3-way but the config asks for 5 ways")
    assert not (tmp_path / "r").exists()


def test_train_refuses_a_file_as_out_and_an_existing_run(run_dir, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(*run_cli(["train", "--out", f], capsys)[::2], f"{f} is a file; --out needs a folder for the run")
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    one_line_error(*run_cli(["train", "--out", run_dir], capsys)[::2], "already holds a run; use --resume to continue it or --overwrite to start again")
    one_line_error(*run_cli(["train", "--resume", "--steps", "9", "--out", run_dir], capsys)[::2], "train --resume: --steps cannot change a run being resumed")
    one_line_error(*run_cli(["train", "--resume", "--no-fused", "--out", run_dir], capsys)[::2], "train --resume: --no-fused cannot change a run being resumed")
    one_line_error(*run_cli(["train", "--resume", "--inner-steps", "0", "--out", run_dir], capsys)[::2], "train --resume: --inner-steps cannot change a run being resumed")
    one_line_error(*run_cli(["train", "--resume", "--overwrite", "--out", run_dir], capsys)[::2], "--resume and --overwrite exclude each other")
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    # a folder of other files (a generated network, notes): not without --overwrite
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    one_line_error(*run_cli(["train", "--out", other], capsys)[::2], f"train: --out {other} is not empty and holds no run; give a new or empty folder, or --overwrite to write the run among its files")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    cut = tmp_path / "cut"  # a start killed between space.yaml and config.yaml: started again
    cut.mkdir()
    (cut / "space.yaml").write_text((run_dir / "space.yaml").read_text())
    (cut / ".config.yaml.tmp-1").write_text("")
    code, _, err = run_cli(["train", "--steps", "1", "--val-every", "1", "--val-tasks", "1", "--eval-inner-steps", "1", "--strategy", "loop", "--quiet", "--out", cut], capsys)
    assert code == 0, err


def test_resume_and_evaluate_on_folders_without_a_run(tmp_path, capsys):
    one_line_error(*run_cli(["train", "--resume", "--out", tmp_path / "none"], capsys)[::2], f"train --resume: {tmp_path / 'none'}: no such run directory")
    one_line_error(*run_cli(["train", "--resume", "--out", tmp_path], capsys)[::2], f"train --resume: {tmp_path}: not a metanet run directory (missing config.yaml)")
    assert list(tmp_path.iterdir()) == []
    one_line_error(*run_cli(["evaluate", tmp_path], capsys)[::2], f"{tmp_path}: not a metanet run directory (missing config.yaml)")
    one_line_error(*run_cli(["evaluate", tmp_path / "none"], capsys)[::2], "none: no such run directory")


def test_evaluate_bad_input(run_dir, tmp_path, capsys, images28):
    one_line_error(*run_cli(["evaluate", run_dir, "--tasks", "omniglot", "--data-root", tmp_path / "x"], capsys)[::2], "does not exist or is not a folder")
    one_line_error(*run_cli(["evaluate", run_dir, "--tasks", images28], capsys)[::2], "space 'mlp_regression' is for regression but tasks '_test_images28' are classification")
    one_line_error(*run_cli(["evaluate", run_dir, "--split", "val"], capsys)[::2], "--split applies to image datasets (omniglot, miniimagenet, images, multidomain), not to tasks 'sinusoid'")
    one_line_error(*run_cli(["evaluate", run_dir, "--episodes", "0"], capsys)[::2], "argument --episodes: expected a positive integer, got 0")
    one_line_error(*run_cli(["evaluate", run_dir, "--tasks", "sinusiod"], capsys)[::2], "(did you mean 'sinusoid'?)")


def test_a_run_whose_files_are_damaged(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path / "run")
    (run / "config.yaml").write_text("steps: [unclosed\n")
    one_line_error(*run_cli(["train", "--resume", "--out", run], capsys)[::2], "config.yaml: not a readable config")
    (run / "config.yaml").write_text("stepz: 3\n")
    one_line_error(*run_cli(["evaluate", run], capsys)[::2], "config.yaml: unknown key 'stepz' (did you mean 'steps'?)")
    (run / "config.yaml").write_text(yaml.safe_dump({**yaml.safe_load((run_dir / "config.yaml").read_text()), "meta_batch": -4}))
    one_line_error(*run_cli(["train", "--resume", "--out", run], capsys)[::2], "config.yaml: meta_batch must be a positive integer, got -4")
    (run / "config.yaml").write_text(yaml.safe_dump({**yaml.safe_load((run_dir / "config.yaml").read_text()), "dim": 8}))
    one_line_error(*run_cli(["evaluate", run], capsys)[::2], "best.pt: does not match the run's config.yaml")
    (run / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
    (run / "last.pt").write_bytes((run_dir / "last.pt").read_bytes()[:500])
    one_line_error(*run_cli(["train", "--resume", "--out", run], capsys)[::2], "last.pt: not a readable checkpoint (truncated or corrupt")


# ------------------------------------------------------------------ checkpoint format version


def test_resume_refuses_another_format_version(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path / "run")
    state = ckpt.load_checkpoint(run / "last.pt")
    state["format_version"] = FORMAT_VERSION + 1
    ckpt.save_checkpoint(run / "last.pt", state)
    code, _, err = run_cli(["train", "--resume", "--out", run], capsys)
    one_line_error(code, err, f"last.pt: a training checkpoint of format version {FORMAT_VERSION + 1}; this metanet resumes version {FORMAT_VERSION} only")
    ckpt.save_checkpoint(run / "best.pt", state)
    one_line_error(*run_cli(["evaluate", run], capsys)[::2], f"best.pt: not a metanet training checkpoint this version reads (format version {FORMAT_VERSION + 1}")
    del state["format_version"]
    ckpt.save_checkpoint(run / "last.pt", state)
    one_line_error(*run_cli(["train", "--resume", "--out", run], capsys)[::2], "a training checkpoint of format version None")


def test_resume_drops_the_metrics_rows_after_the_checkpoint(tmp_path):
    """A run killed between checkpoints logs some steps twice unless resume cuts them off."""
    cfg = TrainConfig(space="mlp_regression", tasks="sinusoid", steps=6, ckpt_every=2, meta_batch=2, val_every=3, val_tasks=2, eval_inner_steps=1, log_every=1, strategy="loop")
    train(cfg, tmp_path / "full")
    assert train(cfg, tmp_path / "part", stop_after=5) == {"stopped": 5}  # last.pt at step 4
    with (tmp_path / "part" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "time": 0.1, "lo')  # a row cut short by the kill
    assert ckpt.load_checkpoint(tmp_path / "part" / "last.pt")["state"]["step"] == 4
    train(None, tmp_path / "part", resume=True)

    def rows(run):
        return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "part") == rows(tmp_path / "full")
    assert [r["step"] for r in rows(tmp_path / "full")] == [1, 2, 3, 3, 4, 5, 6, 6]
    full, part = ckpt.load_checkpoint(tmp_path / "full" / "last.pt"), ckpt.load_checkpoint(tmp_path / "part" / "last.pt")
    for k in full["model"]:
        assert torch.equal(full["model"][k], part["model"][k]), k


# ----------------------------------------------------------------------- non-finite guard


class _NaNSinusoid(Sinusoid):
    """Sinusoids whose support targets are NaN on the sampling calls listed in ``BAD``."""

    BAD: ClassVar[set[int]] = set()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "calls", 0)

    def sample(self, batch, generator=None):
        ep = super().sample(batch, generator)
        call = self.calls
        object.__setattr__(self, "calls", call + 1)
        if call in self.BAD:
            return dataclasses.replace(ep, support_y=torch.full_like(ep.support_y, float("nan")))
        return ep


@pytest.fixture
def nan_tasks():
    tasks.register_tasks("_test_nan")(_NaNSinusoid)
    yield _NaNSinusoid
    _NaNSinusoid.BAD = set()
    del tasks.TASKS["_test_nan"]


def _all_finite(state) -> bool:
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(_all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(_all_finite(v) for v in state)
    return True


def test_nonfinite_steps_are_skipped_and_counted(nan_tasks, tmp_path):
    nan_tasks.BAD = {1, 2}  # the 2nd and 3rd training steps (the validation set is drawn by another instance)
    cfg = TrainConfig(space="mlp_regression", tasks="_test_nan", steps=5, meta_batch=2, val_every=5, val_tasks=2, eval_inner_steps=1, log_every=1, strategy="loop", max_nonfinite=3)
    result = train(cfg, tmp_path / "run")
    assert result["step"] == 5 and result["nonfinite"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "val" not in r]
    assert [r["skipped"] for r in steps] == [False, True, True, False, False]
    assert [r["nonfinite"] for r in steps] == [0, 1, 2, 2, 2]
    assert steps[1]["loss"] is None and steps[0]["loss"] is not None  # logged as JSON null, not NaN
    saved = ckpt.load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["state"]["nonfinite"] == 2 and _all_finite(saved["model"]) and _all_finite(saved["optimizer"])


def test_nonfinite_in_a_row_stops_with_a_message_naming_the_step(nan_tasks, tmp_path, capsys):
    nan_tasks.BAD = set(range(4, 100))  # every step from step 4 on
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--tasks", "_test_nan", "--steps", "20", "--meta-batch", "2", "--val-every", "2", "--val-tasks", "2",
                            "--eval-inner-steps", "1", "--strategy", "loop", "--max-nonfinite", "3", "--log-every", "1", "--quiet", "--out", out], capsys)  # fmt: skip
    one_line_error(code, err, "3 non-finite losses or gradients in a row, the last at step 6; lower --meta-lr or --inner-lr (last.pt holds the last finite state)")
    saved = ckpt.load_checkpoint(out / "last.pt")
    assert saved["state"]["step"] == 6 and saved["state"]["nonfinite"] == 2  # the validation between the bad steps
    assert _all_finite(saved["model"]) and _all_finite(saved["optimizer"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"val"' not in x]
    assert [r["nonfinite"] for r in rows][-2:] == [1, 2]  # the third bad step raised before its row
    nan_tasks.BAD = set(range(100))  # from the first step: no checkpoint to point to
    code, _, err = run_cli(["train", "--tasks", "_test_nan", "--steps", "20", "--meta-batch", "2", "--val-every", "10", "--val-tasks", "2", "--eval-inner-steps", "1",
                            "--strategy", "loop", "--max-nonfinite", "3", "--quiet", "--out", tmp_path / "early"], capsys)  # fmt: skip
    one_line_error(code, err, "3 non-finite losses or gradients in a row, the last at step 2; lower --meta-lr or --inner-lr (no checkpoint was written yet)")
    assert not (tmp_path / "early" / "last.pt").exists()


# --------------------------------------------------------------- crafted files never run


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_as_last_pt_never_runs(run_dir, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    run = _copy_run(run_dir, tmp_path / "run")
    (run / "best.pt").unlink()
    evil = {"format": "metanet.checkpoint", "version": 1, "state": {"format_version": 1, "model": _Evil(marker)}}
    (run / "last.pt").write_bytes(pickle.dumps(evil))
    one_line_error(*run_cli(["evaluate", run], capsys)[::2], "last.pt: refused: the file needs code to load (weights_only")
    one_line_error(*run_cli(["train", "--resume", "--out", run], capsys)[::2], "last.pt: refused: the file needs code to load (weights_only")
    torch.save(evil, run / "last.pt")
    one_line_error(*run_cli(["train", "--resume", "--out", run], capsys)[::2], "it imports")
    one_line_error(*run_cli(["inspect", run, "--support", tmp_path / "s.npz"], capsys)[::2])
    assert not marker.exists()


def test_crafted_yaml_never_runs(run_dir, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\ntask: {{kind: regression, input: [1], outputs: 1}}\n")
    one_line_error(*run_cli(["spaces", "validate", evil], capsys)[::2], "YAML tag '!!python/object/apply:os.system' is not allowed; search spaces are plain data")
    one_line_error(*run_cli(["train", "--space", evil, "--out", tmp_path / "r"], capsys)[::2], "is not allowed")
    run = _copy_run(run_dir, tmp_path / "run")
    (run / "config.yaml").write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    one_line_error(*run_cli(["evaluate", run], capsys)[::2], "config.yaml: not a readable config")
    one_line_error(*run_cli(["train", "--resume", "--out", run], capsys)[::2], "config.yaml: not a readable config")
    (run / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
    (run / "space.yaml").write_text(evil.read_text())
    one_line_error(*run_cli(["train", "--resume", "--out", run], capsys)[::2], "is not allowed")
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_a_run_keeps_its_dataset_folders_absolute(tmp_path, monkeypatch):
    """A relative --data-root, --split-file or NAME=FOLDER domain is stored absolute, so the
    run's config.yaml works from any working folder (evaluate, generate, --resume)."""
    from metanet.cli import _absolute_folders

    monkeypatch.chdir(tmp_path)
    got = _absolute_folders({"data_root": "data/omni", "split_file": "s.csv", "domains": "omniglot, mine=./my/imgs:invert,x=/abs/y", "ways": 5})
    assert got == {
        "data_root": str(tmp_path / "data" / "omni"), "split_file": str(tmp_path / "s.csv"),
        "domains": f"omniglot, mine={tmp_path / 'my' / 'imgs'}:invert,x=/abs/y", "ways": 5,
    }  # fmt: skip
    assert _absolute_folders({"data_root": None, "domains": None}) == {"data_root": None, "domains": None}


def test_evaluate_reports_diverged_tasks_as_null_and_counts_them(run_dir, tmp_path, capsys):
    """A task whose adaptation diverges has a non-finite MSE: the JSON line stays valid
    JSON (null, not NaN), counts such tasks, and a warning says so."""
    run = _copy_run(run_dir, tmp_path / "run")
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("inner_lr: 0.01\n", "inner_lr: 1.0e+30\n"))
    code, out, err = run_cli(["evaluate", run, "--episodes", "3", "--inner-steps", "2"], capsys)
    assert code == 0, err
    line = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in the JSON line"))
    assert line["mse"] is None and line["ci95"] is None and line["nonfinite"] == 3 and line["episodes"] == 3
    assert err == "metanet: warning: 3 of 3 tasks diverged (non-finite mse); mse and ci95 are null\n"
    code, out, _ = run_cli(["evaluate", run_dir, "--episodes", "3"], capsys)
    line = json.loads(out)
    assert line["nonfinite"] == 0 and math.isfinite(line["mse"]) and math.isfinite(line["ci95"])


def test_a_run_without_best_pt_is_loaded_from_last_pt_with_a_warning(run_dir, tmp_path, capsys, caplog):
    run = _copy_run(run_dir, tmp_path / "run")
    (run / "best.pt").unlink()
    with caplog.at_level("WARNING", logger="metanet.rundir"):
        code, out, err = run_cli(["evaluate", run, "--episodes", "2"], capsys)
    assert code == 0, err
    assert json.loads(out)["episodes"] == 2
    assert f"{run} has no best.pt (no finite validation yet): using last.pt" in caplog.messages


def test_output_into_a_closed_pipe_ends_without_a_traceback():
    """`metanet spaces show X | head -1`: the reader goes away before metanet writes."""
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "metanet", "spaces", "show", "darts_cnn"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 1 and proc.stderr == ""


def test_argument_errors_name_the_command_once_and_a_bare_metanet_prints_its_help(capsys):
    assert run_cli(["train", "--steps", "-1"], capsys)[::2] == (2, "metanet: error: train: argument --steps: expected a positive integer, got -1\n")
    assert run_cli(["spaces", "list", "--x"], capsys)[::2] == (2, "metanet: error: unrecognized arguments: --x\n")
    code, out, err = run_cli([], capsys)
    assert code == 2 and out.startswith("usage: metanet ") and "{spaces,train,evaluate,generate,inspect}" in out and err == ""


def test_a_bad_flag_under_torchrun_is_said_by_local_rank_0_alone(capsys, monkeypatch):
    """Every rank parses the same command line: local rank 0 (one per machine, whose ranks
    share its stderr) says what is wrong, the others only exit with the same status."""
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("LOCAL_RANK", rank)
        code, _, err = run_cli(["train", "--steps", "-1"], capsys)
        assert code == 2 and (err == "metanet: error: train: argument --steps: expected a positive integer, got -1\n") == said and (err == "") != said


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--tasks", "sinusoid", "--ways", "3"], "train: --ways applies to classification tasks, not to 'sinusoid' (regression)"),
    (["train", "--tasks", "sinusoid", "--data-root", "/x"], "train: --data-root applies to tasks omniglot, miniimagenet, images, multidomain, not to 'sinusoid'"),
    (["train", "--tasks", "omniglot", "--split-file", "s.csv"], "train: --split-file applies to tasks images, not to 'omniglot'"),
    (["train", "--tasks", "omniglot", "--domains", "omniglot"], "train: --domains applies to tasks multidomain, not to 'omniglot'"),
    (["train", "--tasks", "multimodal", "--no-rotations"], "train: --no-rotations applies to tasks omniglot, not to 'multimodal'"),
])  # fmt: skip
def test_an_option_the_tasks_do_not_read_is_refused_not_ignored(argv, message, tmp_path, capsys):
    one_line_error(*run_cli([*argv, "--out", tmp_path / "r"], capsys)[::2], message)
    assert not (tmp_path / "r").exists()


def test_evaluate_refuses_an_option_the_tasks_do_not_read(run_dir, capsys):
    one_line_error(*run_cli(["evaluate", run_dir, "--ways", "5"], capsys)[::2], "evaluate: --ways applies to classification tasks, not to 'sinusoid' (regression)")
    one_line_error(*run_cli(["evaluate", run_dir, "--domains", "omniglot"], capsys)[::2], "evaluate: --domains applies to tasks multidomain, not to 'sinusoid'")


def test_version_verbose_after_the_command_and_a_stray_argument_to_spaces_list(capsys):
    import tomllib

    from metanet import __version__

    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["version"] == __version__
    from metanet.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"metanet {__version__}\n"
    assert build_parser().parse_args(["spaces", "list", "-v"]).verbose is True
    assert build_parser().parse_args(["-v", "spaces", "list"]).verbose is True
    assert build_parser().parse_args(["spaces", "list"]).verbose is False
    one_line_error(*run_cli(["spaces", "list", "extra"], capsys)[::2], "spaces list: takes no arguments, got 'extra' (spaces show NAME describes one)")
