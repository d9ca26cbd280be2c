"""Execution paths chosen by measurement: the fastest candidate wins, the reference is
among the candidates, the choice is cached on disk per key (safely, atomically), and a
run records and keeps its paths. Timings here are injected: no test depends on speed."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from metanet import space as spaces
from metanet.meta import MetaNet, ModelConfig
from metanet.plan import ExecOptions, compile
from metanet.tasks import Episode
from metanet.trainer import TrainConfig, train
from metanet.tuning import REFERENCE, candidates, choose_paths, path_key, runs_as

STEP = {"inner_steps": 1, "order": "second", "strategy": "auto"}


pytestmark = pytest.mark.usefixtures("two_threads")  # whatever the machine: the ``threads`` strategy is a candidate


def _setup(size: int = 8):
    torch.manual_seed(0)
    model = MetaNet(spaces.load("tiny"), 0, ModelConfig(dim=8, latent=4))
    g = torch.Generator().manual_seed(0)
    ep = Episode(torch.randn(2, 3, 1, size, size, generator=g), torch.arange(3).expand(2, 3).contiguous(), torch.randn(2, 3, 1, size, size, generator=g), torch.arange(3).expand(2, 3).contiguous())
    return model, ep


def _timer(costs: dict[tuple[str, ExecOptions], float], calls: list, other: float = 1.0):
    """Injected seconds per (strategy, options); ``other`` for the rest."""
    def timer(strategy: str, options: ExecOptions) -> float:
        calls.append((strategy, options))
        return costs.get((strategy, options), other)

    return timer


def test_the_fastest_candidate_wins_and_options_run_under_the_faster_strategy() -> None:
    model, ep = _setup()
    slow_norm = dataclasses.replace(ExecOptions(), native_norm=False)
    calls: list = []
    choice = choose_paths(model, ep, STEP, timer=_timer({("loop", ExecOptions()): 0.9, ("vmap", ExecOptions()): 0.5, ("vmap", slow_norm): 0.4}, calls))
    assert (choice.strategy, choice.options) == ("vmap", slow_norm) and not choice.cached
    assert [s for s, _ in calls[:4]] == ["loop", "vmap", "task", "threads"]
    assert [s for s, _ in calls[4:]] == ["vmap"] * (len(calls) - 4)  # the option candidates under vmap
    assert ("vmap", REFERENCE) in calls  # the reference is always a candidate
    assert choice.times["vmap -native_norm"] == 0.4 and "vmap reference" in choice.times
    assert choice.describe() == "vmap, without native_norm"


def test_regression_spaces_time_only_the_strategy() -> None:
    assert [c[0] for c in candidates(False)] == ["loop", "vmap", "task"]
    assert [c[0] for c in candidates(False, threads=True)] == ["loop", "vmap", "task", "threads"]
    assert [c[0] for c in candidates(True)][-1] == "reference"


def test_threads_are_a_candidate_only_with_several_threads_and_tasks_on_a_cpu() -> None:
    model, ep = _setup()
    for threads, tasks, timed in ((2, 2, True), (1, 2, False), (2, 1, False)):
        torch.set_num_threads(threads)
        calls: list = []
        one = Episode(*(t[:tasks] for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y)))
        choose_paths(model, one, STEP, timer=_timer({}, calls))
        assert (("threads", ExecOptions()) in calls) == timed, (threads, tasks)


def test_a_measurement_slower_than_the_reference_is_not_chosen() -> None:
    model, ep = _setup()
    choice = choose_paths(model, ep, STEP, timer=_timer({("loop", ExecOptions()): 2.0, ("vmap", ExecOptions()): 3.0, ("loop", REFERENCE): 1.5}, [], other=9.0))
    assert (choice.strategy, choice.options) == ("loop", REFERENCE)


def test_the_choice_is_cached_per_key_and_read_back_without_timing(tmp_path) -> None:
    model, ep = _setup()
    costs = {("vmap", ExecOptions()): 0.1}
    first = choose_paths(model, ep, STEP, cache=tmp_path, timer=_timer(costs, []))
    files = list((tmp_path / "paths").iterdir())
    assert len(files) == 1 and not files[0].name.startswith(".")  # no temporary left behind
    calls: list = []
    again = choose_paths(model, ep, STEP, cache=tmp_path, timer=_timer(costs, calls))
    assert again.cached and not calls and (again.strategy, again.options) == (first.strategy, first.options)
    # other shapes (another key): measured again, in a file of their own
    _, other = _setup(size=10)
    calls = []
    choose_paths(model, other, STEP, cache=tmp_path, timer=_timer(costs, calls))
    assert calls and len(list((tmp_path / "paths").iterdir())) == 2
    assert path_key(model, ep, STEP, "fp32") != path_key(model, other, STEP, "fp32")
    assert path_key(model, ep, STEP, "fp32") == path_key(model, ep, dict(STEP, strategy="loop"), "fp32")  # the strategy is chosen, not a key


@pytest.mark.parametrize("damage", ["", "{not json", '{"key": 1}', "[1, 2]", "KEY-BAD-STRATEGY"])
def test_a_damaged_or_foreign_cache_file_is_measured_again(tmp_path, damage) -> None:
    model, ep = _setup()
    choose_paths(model, ep, STEP, cache=tmp_path, timer=_timer({}, []))
    (path,) = (tmp_path / "paths").iterdir()
    if damage == "KEY-BAD-STRATEGY":
        data = json.loads(path.read_text())
        data["strategy"] = "__import__('os')"
        damage = json.dumps(data)
    path.write_text(damage)
    calls: list = []
    choice = choose_paths(model, ep, STEP, cache=tmp_path, timer=_timer({}, calls))
    assert calls and not choice.cached and choice.strategy in ("loop", "vmap")
    assert json.loads(path.read_text())["strategy"] in ("loop", "vmap")  # rewritten whole


def test_an_unwritable_cache_is_only_a_cache(tmp_path) -> None:
    model, ep = _setup()
    blocker = tmp_path / "file"
    blocker.write_text("")
    choice = choose_paths(model, ep, STEP, cache=blocker, timer=_timer({}, []))  # 'paths' cannot be made under a file
    assert choice.strategy == "loop"


def test_a_run_with_strategy_auto_records_its_paths_and_a_resume_keeps_them(tmp_path, monkeypatch) -> None:
    """The chosen options are the plan the run trains with, they are saved, and a resume
    (which does not choose again) builds its plan from them."""
    from metanet import checkpoint as ckpt
    from metanet import trainer
    from metanet.tuning import PathChoice
    from test_images import make_folder

    chosen = ExecOptions(channels_last=False, group_edges=False)
    asked: list = []
    monkeypatch.setattr(trainer, "choose_paths", lambda *a, **k: asked.append(1) or PathChoice("loop", chosen, {"loop": 1.0}))
    built: list = []
    real = trainer.compile_plan
    monkeypatch.setattr(trainer, "compile_plan", lambda space, options: built.append(options) or real(space, options))
    root = make_folder(tmp_path / "data", classes=20, per_class=3)
    cfg = TrainConfig(space="tiny", tasks="images", data_root=str(root), ways=3, shots=1, queries=1, steps=2, meta_batch=2, val_every=2, val_tasks=2, eval_inner_steps=1, strategy="auto")
    train(cfg, tmp_path / "run")
    state = ckpt.load_checkpoint(tmp_path / "run" / "last.pt")["state"]
    assert asked == [1] and built == [chosen] and state["strategy"] == "loop" and ExecOptions(**state["exec_options"]) == chosen
    train(dataclasses.replace(cfg, steps=4), tmp_path / "run", resume=True)
    assert asked == [1] and built == [chosen, chosen]  # not chosen again; the saved paths rebuilt


def test_timing_the_real_meta_step_tries_every_candidate_and_restores_the_plan() -> None:
    model, ep = _setup()
    plan = model.plan
    choice = choose_paths(model, ep, STEP)
    assert model.plan is plan and all(p.grad is None for p in model.parameters())
    distinct = {(s or choice.strategy, runs_as(compile(model.space, o))) for _, s, o in candidates(True, threads=True)}
    assert len(choice.times) == len(distinct) and all(t > 0 for t in choice.times.values())


def test_a_switch_that_does_not_apply_is_not_timed_and_cannot_be_chosen() -> None:
    """conv4 has an im2col stem (no convolution stem to fold) and no edge groups: turning
    those switches off runs the same step, so it is not timed again, and a noisy faster
    measurement of it cannot be chosen (it was, as "loop, without stem_fold", once)."""
    torch.manual_seed(0)
    model = MetaNet(spaces.load("conv4"), 0, ModelConfig(arch="fixed", weights="off", proto_head=False, use_metadata=False))
    g = torch.Generator().manual_seed(0)
    ep = Episode(torch.randn(2, 5, 1, 28, 28, generator=g), torch.arange(5).expand(2, 5).contiguous(), torch.randn(2, 5, 1, 28, 28, generator=g), torch.arange(5).expand(2, 5).contiguous())
    inert = [dataclasses.replace(ExecOptions(), **{name: False}) for name in ("stem_fold", "group_edges")]
    calls: list = []
    choice = choose_paths(model, ep, STEP, timer=_timer({("loop", o): 0.5 for o in inert}, calls, other=1.0))
    assert (choice.strategy, choice.options) == ("loop", ExecOptions())
    assert not any(o in inert for _, o in calls)
    assert set(choice.times) == {"loop", "vmap", "task", "threads", "loop -channels_last", "loop -stem_im2col", "loop -native_norm", "loop -stem_recompute", "loop reference"}


def test_a_candidate_within_timing_noise_does_not_replace_the_fast_paths() -> None:
    model, ep = _setup()
    no_groups = dataclasses.replace(ExecOptions(), group_edges=False)
    choice = choose_paths(model, ep, STEP, timer=_timer({("loop", ExecOptions()): 1.0, ("loop", no_groups): 0.98}, [], other=5.0))
    assert (choice.strategy, choice.options) == ("loop", ExecOptions())
