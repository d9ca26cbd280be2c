"""The training config: one budget, checks from the field declarations, per-task defaults,
and a command line whose every option has help."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from metanet.cli import build_parser
from metanet.config import DEFAULT_STEPS, ConfigError, TrainConfig, add_train_options, config_from_options, validate_new_run
from metanet.trainer import train


def test_minutes_alone_is_the_budget_and_no_budget_is_the_default_steps() -> None:
    assert (TrainConfig(minutes=3).max_steps, TrainConfig(minutes=3).minutes) == (None, 3)
    assert (TrainConfig().steps, TrainConfig().max_steps, TrainConfig().minutes) == (None, DEFAULT_STEPS, None)
    assert (TrainConfig(steps=7).max_steps, TrainConfig(steps=7).minutes) == (7, None)
    assert dataclasses.replace(TrainConfig(), minutes=5.0).max_steps is None  # the default is not a given budget


def test_a_minutes_run_trains_for_its_minutes(tmp_path) -> None:
    cfg = TrainConfig(space="mlp_regression", tasks="sinusoid", minutes=0.02, meta_batch=2, val_every=10**6, val_tasks=2, eval_inner_steps=1, strategy="loop")
    result = train(cfg, tmp_path / "run")
    assert result["elapsed"] >= 0.02 * 60 and result["step"] > 1


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"steps": 10, "minutes": 2.0}, "config: steps=10 and minutes=2.0 both given; a run has one budget, give one of them"),
        ({"meta_batch": 0}, "config: meta_batch must be a positive integer, got 0"),
        ({"inner_lr": float("nan")}, "config: inner_lr must be a finite number > 0, got nan"),
        ({"strategy": "vamp"}, "config: strategy must be one of auto, loop, vmap, task, threads, got 'vamp' (did you mean 'vmap'?)"),
        ({"hard": 1}, "config: hard must be true or false, got 1"),
        ({"domain_weights": "1,x"}, "config: domain_weights must be comma-separated numbers >= 0 with a positive sum, one per domain, got '1,x'"),
        ({"minutes": -1.0}, "config: minutes must be a finite number > 0 or null, got -1.0"),
        ({"checkpoint_steps": True, "precision": "bf16"}, "config: checkpoint_steps needs precision fp32: a recomputed step runs outside the forward's autocast; use one or the other"),
        ({"op_dropout": 0.2, "adapt_alpha": True}, "config: op_dropout does not reach an inner loop that adapts the architecture (adapt_alpha); use one or the other"),
        ({"order": "implicit"}, "config: order implicit needs prox > 0, the weight of the proximal term its inner problem is solved with (iMAML's lambda, e.g. --prox 1.0)"),
        ({"order": "implicit", "prox": 1.0, "inner_optimizer": "lstm"}, "config: order implicit differentiates the solution of a proximal inner problem, not the steps: it serves plain SGD steps of the weights in fp32, not inner_optimizer lstm"),
        ({"order": "implicit", "prox": 1.0, "precision": "bf16"}, "config: order implicit differentiates the solution of a proximal inner problem, not the steps: it serves plain SGD steps of the weights in fp32, not precision bf16"),
        ({"prox": -1.0}, "config: prox must be a finite number >= 0, got -1.0"),
        ({"head": "matching", "inner_steps": 0, "eval_inner_steps": 0, "prox": 1.0}, "config: head matching has no inner loop for prox to act in; give prox 0 (got 1.0)"),
        ({"order": "implicit", "prox": 1.0, "inner_steps": 0}, "config: order implicit needs inner_steps >= 1: its gradient is that of the proximal problem's solution, which the inner steps approach (got 0)"),
        ({"order": "implicit", "prox": 1.0, "compile": True}, "config: order implicit cannot be compiled: its Hessian-vector products are a double backward, which torch.compile does not support; use one or the other"),
    ],
)
def test_a_bad_config_is_refused_when_built(given: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig(**given)
    assert str(e.value) == message


def test_replace_cannot_make_a_contradiction() -> None:
    with pytest.raises(ConfigError, match="both given"):
        dataclasses.replace(TrainConfig(steps=5), minutes=1.0)
    assert dataclasses.replace(TrainConfig(steps=5), steps=None, minutes=1.0).minutes == 1.0


def test_a_config_written_with_both_budgets_reads_as_the_steps_run_it_was(caplog) -> None:
    with caplog.at_level("WARNING", logger="metanet.config"):
        cfg = TrainConfig.from_dict({"steps": 1000, "minutes": 3.0}, "old/config.yaml")
    assert (cfg.steps, cfg.minutes) == (1000, None) and "old/config.yaml: steps and minutes both given" in caplog.text


def test_from_dict_names_the_file() -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"ways": -1}, "run/config.yaml")
    assert str(e.value) == "run/config.yaml: ways must be a positive integer, got -1"


def test_task_defaults_come_from_the_task_class_under_what_is_given() -> None:
    cfg = TrainConfig.for_tasks("omniglot", shots=5)
    assert (cfg.space, cfg.queries, cfg.shots, cfg.meta_batch) == ("conv_omniglot", 15, 5, 16)
    assert TrainConfig.for_tasks("sinusoid") == TrainConfig()


def test_options_and_config_agree_on_every_field() -> None:
    parser = argparse.ArgumentParser()
    add_train_options(parser)
    assert config_from_options(vars(parser.parse_args([]))) == TrainConfig()
    args = vars(parser.parse_args(["--tasks", "miniimagenet", "--no-metadata", "--minutes", "2", "--order", "first", "--meta-sgd"]))
    cfg = config_from_options(args)
    assert (cfg.space, cfg.use_metadata, cfg.minutes, cfg.steps, cfg.order, cfg.meta_sgd) == ("conv_miniimagenet", False, 2.0, None, "first", True)
    dests = {a.dest for a in parser._actions} - {"help"}
    assert dests == {f.name for f in dataclasses.fields(TrainConfig)}


def _options(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.Action]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _options(sub, f"{prefix} {name}")
        else:
            out.append((prefix, action))
    return out


def test_every_option_of_every_subcommand_has_help() -> None:
    options = _options(build_parser(), "metanet")
    assert len(options) > 60
    missing = [f"{where} {a.option_strings or a.dest}" for where, a in options if not a.help]
    assert not missing, missing


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"ways": 1}, "config: ways must be an integer >= 2 (a task tells at least two classes apart), got 1"),
        ({"checkpoint_steps": True, "order": "first"}, "config: checkpoint_steps bounds the memory of second-order inner steps; order first keeps no graph of them to recompute"),
        ({"checkpoint_steps": True, "order": "reptile"}, "config: checkpoint_steps bounds the memory of second-order inner steps; order reptile keeps no graph of them to recompute"),
        ({"meta_sgd": True, "inner_optimizer": "lstm"}, "config: meta_sgd learns a step size per weight for SGD steps, inner_optimizer lstm learns the whole update; use one or the other"),
    ],
)
def test_settings_earlier_runs_saved_still_load_but_start_no_new_run(given: dict, message: str, tmp_path) -> None:
    """A run's config.yaml from before these refusals loads (evaluate, generate); a new
    run with the same settings is refused before anything is written."""
    cfg = TrainConfig.from_dict(given, "run/config.yaml")
    with pytest.raises(ConfigError) as e:
        validate_new_run(cfg)
    assert str(e.value) == message
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
