"""The training configuration: one frozen ``TrainConfig``, its checks and its command-line options.

Every field is declared once, with its default, its check and its help text (the field's
metadata). ``validate_config`` and the ``metanet train`` options are generated from
those declarations, so a new field gets its check and its ``--flag`` with help in one
place. The model's fields take their defaults from ``ModelConfig``.

A run has one budget: ``steps`` or ``minutes``. ``TrainConfig(minutes=3)`` trains for
three minutes; ``TrainConfig()`` for ``DEFAULT_STEPS`` steps; giving both is refused.

Per task distribution the defaults that suit it (``conv_omniglot`` for ``omniglot``, 15
queries, ...) come from the task class's ``train_defaults``; ``TrainConfig.for_tasks``
applies them under whatever the caller gives.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .executor import STRATEGIES as _EXEC_STRATEGIES
from .generators import ARCH_MODES, WEIGHT_MODES
from .heads import HEADS
from .meta import INNER_OPTIMIZERS, ORDERS, PRECISIONS, ModelConfig
from .tasks.base import did_you_mean

__all__ = ["TrainConfig", "ConfigError", "DEFAULT_STEPS", "VERSION", "validate_config", "validate_new_run", "task_defaults", "add_train_options", "config_from_options", "option_flag", "number_type", "STRATEGIES", "SCHEDULES", "ARCHS", "WEIGHTS"]

VERSION = "0.1.0"  # the package's (metanet.__version__); pyproject.toml holds the same
log = logging.getLogger(__name__)
DEFAULT_STEPS = 1000  # the budget of a config that names neither steps nor minutes
STRATEGIES = ("auto", *_EXEC_STRATEGIES, "task", "threads")  # auto: time them on the first step; task: loop, one backward per task; threads: task, the tasks shared among the threads
SCHEDULES = ("cosine", "constant")
ARCHS, WEIGHTS = ARCH_MODES, WEIGHT_MODES


class ConfigError(ValueError):
    """A training configuration that cannot run; the message is one line."""


# The checks a field can name (its metadata "check"): (what the error says it must be, test).
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _weights_ok(v: Any) -> bool:
    try:
        w = [float(x) for x in v.split(",")]
    except (ValueError, AttributeError):
        return False
    return all(math.isfinite(x) and x >= 0 for x in w) and sum(w) > 0


_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "pos_int": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "ways": ("an integer >= 2 (a task tells at least two classes apart)", lambda v: _is_int(v) and v >= 2),
    "nonneg_int": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "pos_float": ("a finite number > 0", lambda v: _is_num(v) and v > 0),
    "nonneg_float": ("a finite number >= 0", lambda v: _is_num(v) and v >= 0),
    "finite": ("a finite number", _is_num),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "name": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "opt_name": ("a non-empty string or null", lambda v: v is None or (isinstance(v, str) and bool(v))),
    "opt_pos_int": ("a positive integer or null", lambda v: v is None or (_is_int(v) and v >= 1)),
    "opt_pos_float": ("a finite number > 0 or null", lambda v: v is None or (_is_num(v) and v > 0)),
    "weights": ("comma-separated numbers >= 0 with a positive sum, one per domain", lambda v: v is None or _weights_ok(v)),
    "share": ("a number in [0, 1)", lambda v: _is_num(v) and 0 <= v < 1),
}

_MODEL_DEFAULTS = {f.name: f.default for f in fields(ModelConfig)}


def _field(default: Any, check: str | tuple[str, ...], help: str, *, flag: str | None = None) -> Any:
    """A config field: its default, its check (a name in ``_CHECKS`` or a tuple of choices),
    its help text, and its command-line flag where that is not ``--name-with-dashes``
    (``--no-x`` for a boolean whose default is true)."""
    return field(default=default, metadata={"check": check, "help": help, "flag": flag})


def _model(name: str, check: str | tuple[str, ...], help: str, *, flag: str | None = None) -> Any:
    """A field of ``ModelConfig``, with its default."""
    return _field(_MODEL_DEFAULTS[name], check, help, flag=flag)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; written to ``RUN_DIR/config.yaml``. Checked when built (``ConfigError``)."""

    # what to learn from
    space: str = _field("mlp_regression", "name", "search space: a YAML file or a built-in name (metanet spaces list)")
    tasks: str = _field("sinusoid", "name", "task distribution: sinusoid, multimodal, omniglot, miniimagenet, images (any <root>/<class>/<image> folder), multidomain")
    ways: int = _field(5, "pos_int", "classification: classes per task (at least 2)")
    shots: int = _field(5, "pos_int", "support examples per class (regression: per task)")
    queries: int = _field(10, "pos_int", "query examples per class (regression: per task) that score the adapted network")
    data_root: str | None = _field(None, "opt_name", "dataset folder (omniglot, miniimagenet, images); for multidomain the folder that holds the named domains (default: ../shared/data)")
    rotations: bool = _field(True, "bool", "omniglot: no rotated characters (90, 180, 270 degrees) as new classes", flag="--no-rotations")
    split_file: str | None = _field(None, "opt_name", "images: CSV of class,split lines assigning classes to train/val/test (default: a seeded 60/20/20 split of the classes)")
    domains: str | None = _field(None, "opt_name", "multidomain: comma-separated domains: omniglot, miniimagenet, a folder name under --data-root, or NAME=FOLDER, each optionally followed by :invert (intensities flipped, x -> 1 - x) (default: omniglot,miniimagenet,chars74k_fnt)")
    domain_weights: str | None = _field(None, "weights", "multidomain: comma-separated sampling weights, one per domain (default: equal)")
    # the meta-step
    meta_batch: int = _field(25, "pos_int", "tasks per meta-step")
    inner_steps: int = _field(1, "nonneg_int", "inner-loop (adaptation) steps per task during meta-training")
    eval_inner_steps: int = _field(10, "nonneg_int", "adaptation steps when validating")
    order: str = _field("second", ORDERS, "meta-gradient: second (MAML), first (first-order MAML), reptile, or implicit (iMAML: the implicit gradient of a proximal inner problem, memory independent of --inner-steps; needs --prox)")
    prox: float = _model("prox", "nonneg_float", "weight lambda of a proximal term lambda/2 |w - w0|^2 in each task's support loss, tying the adapted weights to the generated ones, in meta-training and in evaluation alike (iMAML's regulariser; order implicit needs it > 0)")
    cg_steps: int = _field(5, "pos_int", "order implicit: conjugate-gradient steps that solve for the implicit meta-gradient")
    beta: float = _field(1e-3, "nonneg_float", "weight of the VAE's KL term in the outer loss")
    entropy_weight: float = _field(0.0, "finite", "weight of the architecture's mean edge entropy in the outer loss (> 0 pushes towards one op per edge)")
    temperature: float = _field(1.0, "pos_float", "softmax temperature of the architecture logits at the start")
    final_temperature: float = _field(1.0, "pos_float", "temperature at the end of the budget (annealed geometrically)")
    gumbel: bool = _field(False, "bool", "sample each task's architecture with Gumbel noise")
    hard: bool = _field(False, "bool", "train the discrete architecture (straight-through argmax), the network generate emits")
    strategy: str = _field("auto", STRATEGIES, "task execution: loop (one task at a time), vmap (batched), task (one task at a time, each with its own backward: the memory of one task's graph), threads (task, with the tasks shared among the intra-op threads, each on one core: the memory of one task's graph per thread), auto (time them, and the executor's fast paths, on the first step; the choice is cached per machine and shape)")
    compile: bool = _field(False, "bool", "torch.compile the meta-step; kept only if its meta-gradients match eager on the first step (compiling takes tens of seconds)")
    precision: str = _field("fp32", PRECISIONS, "arithmetic of the meta-step's forward: fp32, or bf16 mixed precision (autocast; fast where the CPU has AMX/AVX512-BF16 or on a GPU)")
    meta_lr: float = _field(1e-3, "pos_float", "Adam learning rate of the outer loop")
    clip: float = _field(10.0, "pos_float", "meta-gradient norm clip")
    schedule: str = _field("cosine", SCHEDULES, "meta learning-rate schedule over the budget")
    checkpoint_steps: bool = _field(False, "bool", "second order: recompute each inner step in the backward pass instead of keeping its activations (memory of one inner step, not of --inner-steps; about one more forward per step)")
    # against architecture collapse (conditional and shared architectures)
    arch_lr: float | None = _field(None, "opt_pos_float", "the architecture generator's own Adam learning rate, on the same schedule (default: --meta-lr)")
    arch_warmup: float = _field(0.0, "share", "share of the budget before the architecture generator learns: the weights train on the near-uniform supernet first")
    param_prior: float = _field(0.0, "nonneg_float", "weight of a prior against parameter-free ops: the share of the architecture softmax on zero, skip and pooling")
    op_dropout: float = _field(0.0, "share", "operation-level dropout: each parameter-free op is left out of a task's edge with this probability during meta-training (P-DARTS)")
    # the budget and the run
    steps: int | None = _field(None, "opt_pos_int", f"budget in meta-steps (default: {DEFAULT_STEPS} unless --minutes is given)")
    minutes: float | None = _field(None, "opt_pos_float", "budget in minutes of wall clock of the meta-steps and validations, not counting the data's loading or the path timing of --strategy auto before them (instead of --steps)")
    seed: int = _field(0, "nonneg_int", "seed of the tasks, the initial weights and the generators' noise")
    val_every: int = _field(250, "pos_int", "meta-steps between validations (and last.pt checkpoints); one more at the end")
    val_tasks: int = _field(100, "pos_int", "fixed validation tasks")
    log_every: int = _field(10, "pos_int", "meta-steps between rows of metrics.jsonl")
    max_nonfinite: int = _field(10, "pos_int", "stop after this many non-finite steps in a row")
    ckpt_every: int | None = _field(None, "opt_pos_int", "also write last.pt every this many steps (default: at validations only)")
    # the model (ModelConfig's fields)
    arch: str = _model("arch", ARCHS, "architecture: conditional (generated per task), shared (one learned for all tasks), fixed (the space's single op per edge)")
    weights: str = _model("weights", WEIGHTS, "initial weights: vae (generated per task by the VAE hypernetwork) or off (one learned initialisation, as MAML)")
    dim: int = _model("dim", "pos_int", "task embedding size")
    latent: int = _model("latent", "pos_int", "VAE latent size")
    inner_lr: float = _model("inner_lr", "pos_float", "inner-loop step size")
    meta_sgd: bool = _model("meta_sgd", "bool", "learn a step size per weight (Meta-SGD; the same as --inner-optimizer metasgd)")
    inner_optimizer: str = _model("inner_optimizer", INNER_OPTIMIZERS, "the inner loop's update: sgd, metasgd (a learned step size per weight) or lstm (a coordinate-wise LSTM meta-learner, Ravi & Larochelle 2017, starting as SGD)")
    adapt_alpha: bool = _model("adapt_alpha", "bool", "adapt the architecture logits in the inner loop too")
    use_metadata: bool = _model("use_metadata", "bool", "withhold task metadata (family or domain id) from the generators", flag="--no-metadata")
    fused: bool = _model("fused", "bool", "run mixed ops unfused (the reference path)", flag="--no-fused")
    proto_head: bool = _model("proto_head", "bool", "classification: learn the head's initial weights instead of taking them from class prototypes (plain MAML)", flag="--no-proto-head")
    weight_bound: float = _model("weight_bound", "nonneg_float", "VAE weights: a soft bound c on each generated per-channel modulation, c * tanh(m / c), against a latent that runs away after a loss spike (0: unbounded)")
    head: str = _model("head", HEADS, "classification: linear (the space's head, from prototypes unless --no-proto-head), or an episodic head with no inner loop: matching (Matching Networks), relation (Relation Networks), memory (a memory-augmented network, Santoro et al. 2016)")
    arch_hidden: int = _model("arch_hidden", "nonneg_int", "conditional architectures: hidden units of an MLP from the task embedding to the architecture logits (0: a linear map)")
    arch_norm: bool = _model("arch_norm", "bool", "conditional architectures: the map to the logits reads the task embedding layer-normalised, so that the embedding's growing scale cannot saturate the architecture softmax")

    def __post_init__(self) -> None:
        validate_config(self)

    @property
    def max_steps(self) -> int | None:
        """The step budget: ``steps``, else ``DEFAULT_STEPS`` when no ``minutes`` are given,
        else None (a time budget)."""
        if self.steps is not None:
            return self.steps
        return DEFAULT_STEPS if self.minutes is None else None

    @classmethod
    def for_tasks(cls, tasks: str = "sinusoid", **given: Any) -> TrainConfig:
        """A config for ``tasks`` with that distribution's defaults under ``given``."""
        return cls(tasks=tasks, **{**task_defaults(tasks), **given})

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in _MODEL_DEFAULTS})

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """A config from plain data (``config.yaml``), every value checked (``ConfigError``)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted((k for k in data if k not in known), key=str)
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r}{did_you_mean(str(unknown[0]), known)}")
        if data.get("steps") is not None and data.get("minutes") is not None:
            # written before a run had one budget: the steps ended such a run
            log.warning("%s: steps and minutes both given; reading it as the run it was, steps=%s", source, data["steps"])
            data = {**data, "minutes": None}
        try:
            return cls(**data)
        except ConfigError as e:  # the same check, named after the file
            raise ConfigError(f"{source}: {str(e).removeprefix('config: ')}") from None


def validate_config(cfg: TrainConfig, source: str = "config") -> None:
    """Check every field's type and range; raise ``ConfigError`` naming the first bad one."""
    for f in fields(cfg):
        v, check = getattr(cfg, f.name), f.metadata["check"]
        if isinstance(check, tuple):
            if v not in check:
                raise ConfigError(f"{source}: {f.name} must be one of {', '.join(check)}, got {v!r}{did_you_mean(str(v), check)}")
        elif not _CHECKS[check][1](v):
            raise ConfigError(f"{source}: {f.name} must be {_CHECKS[check][0]}, got {v!r}")
    if cfg.steps is not None and cfg.minutes is not None:
        raise ConfigError(f"{source}: steps={cfg.steps} and minutes={cfg.minutes} both given; a run has one budget, give one of them")
    if cfg.checkpoint_steps and cfg.precision != "fp32":
        raise ConfigError(f"{source}: checkpoint_steps needs precision fp32: a recomputed step runs outside the forward's autocast; use one or the other")
    if cfg.op_dropout > 0 and cfg.adapt_alpha:
        raise ConfigError(f"{source}: op_dropout does not reach an inner loop that adapts the architecture (adapt_alpha); use one or the other")
    if cfg.checkpoint_steps and cfg.inner_optimizer == "lstm":
        raise ConfigError(f"{source}: checkpoint_steps does not carry the LSTM inner optimizer's state through a recomputed step; use one or the other")
    if cfg.head != "linear" and (cfg.inner_steps or cfg.eval_inner_steps):
        raise ConfigError(f"{source}: head {cfg.head} compares queries with the support set and has no inner loop; give inner_steps 0 and eval_inner_steps 0 (got {cfg.inner_steps} and {cfg.eval_inner_steps})")
    if cfg.head != "linear" and cfg.prox > 0:
        raise ConfigError(f"{source}: head {cfg.head} has no inner loop for prox to act in; give prox 0 (got {cfg.prox})")
    if cfg.head != "linear" and cfg.order == "reptile":
        raise ConfigError(f"{source}: head {cfg.head} has no inner steps, and reptile's update comes from inner steps; use order second or first")
    if cfg.order == "implicit":
        if not cfg.prox > 0:
            raise ConfigError(f"{source}: order implicit needs prox > 0, the weight of the proximal term its inner problem is solved with (iMAML's lambda, e.g. --prox 1.0)")
        if cfg.inner_steps < 1:
            raise ConfigError(f"{source}: order implicit needs inner_steps >= 1: its gradient is that of the proximal problem's solution, which the inner steps approach (got {cfg.inner_steps})")
        clashes = [name for name, on in (("meta_sgd", cfg.meta_sgd), ("inner_optimizer " + cfg.inner_optimizer, cfg.inner_optimizer != "sgd"), ("adapt_alpha", cfg.adapt_alpha), ("checkpoint_steps", cfg.checkpoint_steps), ("precision " + cfg.precision, cfg.precision != "fp32"), ("head " + cfg.head, cfg.head != "linear")) if on]
        if clashes:
            raise ConfigError(f"{source}: order implicit differentiates the solution of a proximal inner problem, not the steps: it serves plain SGD steps of the weights in fp32, not {clashes[0]}")
        if cfg.compile:
            # Measured (sinusoid, vmap): the compile failed after 35 s, "torch.compile with
            # aot_autograd does not currently support double backward", and the run went on eager.
            raise ConfigError(f"{source}: order implicit cannot be compiled: its Hessian-vector products are a double backward, which torch.compile does not support; use one or the other")
    if cfg.compile and cfg.precision != "fp32":
        # Measured: the compiled bf16 sinusoid step differed from eager bf16 by 1.8e-4, and
        # bf16 meta-gradients differ from fp32 ones by per cent; a tolerance that admits
        # that rounding could not tell a dropped second-order graph from it.
        raise ConfigError(
            f"{source}: compile needs precision fp32, got {cfg.precision!r}: the compiled step is checked"
            " against eager to rtol 1e-4, which bf16 rounding exceeds; use --compile or --precision bf16, not both"
        )


def validate_new_run(cfg: TrainConfig, source: str = "config") -> None:
    """What a run about to start must pass beyond ``validate_config``: settings that
    earlier versions accepted (so that a saved run's config.yaml still loads), refused for
    new runs; raise ``ConfigError`` naming the first."""
    what, ok = _CHECKS["ways"]
    if not ok(cfg.ways):
        raise ConfigError(f"{source}: ways must be {what}, got {cfg.ways}")
    if cfg.checkpoint_steps and cfg.order in ("first", "reptile"):
        raise ConfigError(f"{source}: checkpoint_steps bounds the memory of second-order inner steps; order {cfg.order} keeps no graph of them to recompute")
    if cfg.meta_sgd and cfg.inner_optimizer == "lstm":
        raise ConfigError(f"{source}: meta_sgd learns a step size per weight for SGD steps, inner_optimizer lstm learns the whole update; use one or the other")


def task_defaults(tasks: str) -> dict[str, Any]:
    """The training defaults of the task distribution registered as ``tasks`` (``train_defaults``)."""
    from .tasks import TASKS

    return dict(getattr(TASKS.get(tasks), "train_defaults", {}))


# ------------------------------------------------------------------------ command line


_CASTS = {"ways": int, "pos_int": int, "nonneg_int": int, "opt_pos_int": int, "pos_float": float, "nonneg_float": float, "finite": float, "opt_pos_float": float, "share": float}
# how the command line words each check (a number typed, never null)
_TYPED = {"share": "a number in [0, 1)", "ways": "an integer >= 2", "pos_int": "a positive integer", "opt_pos_int": "a positive integer", "nonneg_int": "an integer >= 0", "pos_float": "a positive number", "opt_pos_float": "a positive number", "nonneg_float": "a number >= 0", "finite": "a finite number"}


def number_type(check: str) -> Callable[[str], Any]:
    """An argparse type for a numeric check (``pos_int``, ``nonneg_int``, ``pos_float``,
    ``nonneg_float``, ``finite``): parse the text, then require the check."""
    cast = _CASTS[check]
    what, ok = _TYPED[check], _CHECKS[check][1]

    def parse(text: str) -> Any:
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v

    return parse


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def option_flag(name: str) -> str:
    """The ``metanet train`` flag of a config field (``use_metadata``: ``--no-metadata``), or ``--name``."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    return _flag(by_name[name]) if name in by_name else "--" + name.replace("_", "-")


def _per_task(name: str) -> str:
    """``"; omniglot: 15, images: 15"``: the task distributions with their own default."""
    from .tasks import TASKS

    own = [f"{task}: {defaults[name]}" for task in TASKS if name in (defaults := task_defaults(task))]
    return "; " + ", ".join(own) if own else ""


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One option per ``TrainConfig`` field, with its help; unset options stay None (the
    config's or the task's default then applies, see ``config_from_options``)."""
    for f in fields(TrainConfig):
        check, help = f.metadata["check"], f.metadata["help"]
        flag = _flag(f)
        if check == "bool":
            parser.add_argument(flag, dest=f.name, action="store_const", const=not f.default, default=None, help=help)
            continue
        default = "" if f.default is None else f" (default: {f.default}{_per_task(f.name)})"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help + default}
        if isinstance(check, tuple):
            kw["choices"] = check
        elif check in _CASTS:
            kw["type"] = number_type(check)
        parser.add_argument(flag, **kw)


def config_from_options(options: dict[str, Any]) -> TrainConfig:
    """The config for parsed ``add_train_options`` values (None: not given)."""
    given = {f.name: options[f.name] for f in fields(TrainConfig) if options.get(f.name) is not None}
    return TrainConfig.for_tasks(given.pop("tasks", TrainConfig.tasks), **given)
