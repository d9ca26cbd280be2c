"""The package's imports run one way, and no module-level variable changes at run time.

Layers, lowest first; a module imports only from lower layers (or its own package's
lower modules, for ``metanet.tasks``), at the top of the file or inside a function alike:

    kernels -> ops, checkpoint, compile, results, tasks -> space -> graph -> plan -> executor, export
    -> encoders, generators, draw, inner, heads -> meta -> config, distributed -> tuning -> rundir -> trainer
    -> network -> cli -> the package's __init__ and __main__
"""

from __future__ import annotations

import ast
import copy
import importlib
import pkgutil
import runpy
import sys
import types
from pathlib import Path

import pytest
import torch

import metanet

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "metanet"

LAYERS = [
    {"kernels"},
    {"ops", "checkpoint", "compile", "tasks", "results"},
    {"space"},
    {"graph"},
    {"plan"},
    {"executor", "export"},
    {"encoders", "generators", "draw", "inner", "heads"},
    {"meta"},
    {"config", "distributed"},
    {"tuning"},
    {"rundir"},
    {"trainer"},
    {"network"},
    {"cli"},
    {"__main__", "__init__"},  # the package's entry points
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
TASKS_ORDER = ["base", "regression", "omniglot", "images", "__init__"]  # inside metanet.tasks


def _imports(text: str, module: tuple[str, ...]) -> set[str]:
    """The ``metanet`` modules that ``text``, the source of ``module`` (``("metanet",
    "ops")``), imports: absolute or relative, at the top or inside a function."""
    package = list(module[:-1])  # a package's __init__ sits in the package too
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                if node.module:
                    found.add(".".join([*base, *node.module.split(".")]))
                else:  # from . import x
                    found |= {".".join([*base, a.name]) for a in node.names}
            elif node.module and node.module.split(".")[0] == "metanet":
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "metanet"}
    return found


def _violations(module: tuple[str, ...], targets: set[str]) -> list[str]:
    """The imports of ``module`` that break the layering."""
    me, bad = module[1], []
    for target in sorted(targets):
        names = target.split(".")[1:]
        if not names or target == ".".join(module):
            continue
        if me == "tasks":  # the task distributions sit at the bottom, in their own order
            ok = names[0] == "tasks" and (TASKS_ORDER.index(names[1]) < TASKS_ORDER.index(module[-1]) if len(names) > 1 else module[-1] == "__init__")
        else:
            ok = names[0] in RANK and RANK[names[0]] < RANK[me]
        if not ok:
            bad.append(f"{'/'.join(module)}.py imports {target}")
    return bad


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module(path: Path) -> tuple[str, ...]:
    return path.relative_to(ROOT).with_suffix("").parts


def test_every_module_has_a_layer() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert top == set(RANK), f"modules without a layer: {sorted(top - set(RANK))}, layers without a module: {sorted(set(RANK) - top)}"
    assert {p.stem for p in (PACKAGE / "tasks").glob("*.py")} == set(TASKS_ORDER)


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path: Path) -> None:
    module = _module(path)
    assert not _violations(module, _imports(path.read_text(), module))


def test_the_check_catches_upward_imports() -> None:
    """Not vacuous: a late upward import in ops, and tasks importing the executor, are caught."""
    ops = ("metanet", "ops")
    text = (PACKAGE / "ops.py").read_text() + "\n\ndef _late():\n    from .trainer import train\n"
    assert _violations(ops, _imports(text, ops)) == ["metanet/ops.py imports metanet.trainer"]
    images = ("metanet", "tasks", "images")
    assert _violations(images, _imports("from ..executor import run\nfrom .base import Episode\n", images)) == ["metanet/tasks/images.py imports metanet.executor"]
    assert _violations(("metanet", "meta"), _imports("from . import network\n", ("metanet", "meta"))) == ["metanet/meta.py imports metanet.network"]


# ---------------------------------------------------------------- module state at run time


def _modules() -> list[types.ModuleType]:
    names = ["metanet", *(m.name for m in pkgutil.walk_packages(metanet.__path__, "metanet."))]
    return [importlib.import_module(n) for n in names if not n.endswith("__main__")]


# Module-level memo caches of pure functions (the same arguments, the same value): they
# fill at run time without changing what anything computes. Any other cache is state.
PURE_CACHES = {"metanet.plan._constant_kernel", "metanet.executor._constant_kernel", "metanet.tasks.omniglot._strokes"}


def _state(modules: list[types.ModuleType]) -> dict[tuple[str, str], object]:
    """Every module-level binding: the object's identity, and a deep copy of plain data;
    for a memo cache outside ``PURE_CACHES``, its size."""
    out: dict[tuple[str, str], object] = {}
    for mod in modules:
        for name, value in vars(mod).items():
            if name.startswith("__") or isinstance(value, types.ModuleType):
                continue
            if hasattr(value, "cache_info") and f"{mod.__name__}.{name}" not in PURE_CACHES:
                out[(mod.__name__, name)] = (id(value), value.cache_info().currsize)
                continue
            try:
                data = copy.deepcopy(value) if isinstance(value, (dict, list, set, tuple, int, float, str, bool, frozenset, type(None))) else None
            except Exception:  # noqa: BLE001 - not plain data: identity only
                data = None
            out[(mod.__name__, name)] = (id(value), data)
    return out


def _diff(before: dict, after: dict) -> list[str]:
    changed = [f"{m}.{n}" for (m, n) in before if (m, n) not in after]
    changed += [f"{m}.{n} (new)" for (m, n) in after if (m, n) not in before]
    for key, (ident, data) in before.items():
        if key in after:
            ident2, data2 = after[key]
            if ident != ident2 or (data is not None and not _same(data, data2)):
                changed.append(f"{key[0]}.{key[1]}")
    return changed


def _same(a: object, b: object) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. tensors inside: compare by repr
        return repr(a) == repr(b)


def test_no_module_global_changes_during_training_and_a_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from metanet.trainer import TrainConfig, train

    modules = _modules()
    before = _state(modules)
    train(TrainConfig(space="mlp_regression", tasks="sinusoid", steps=2, meta_batch=2, val_every=2, val_tasks=2, eval_inner_steps=1, strategy="auto"), tmp_path / "run")
    monkeypatch.setattr(sys, "argv", ["bench_meta.py", "--quick"])
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # as when run as a script: its helpers beside it
    monkeypatch.chdir(tmp_path)
    torch_threads = torch.get_num_threads()
    runpy.run_path(str(ROOT / "scripts" / "bench_meta.py"), run_name="__main__")
    torch.set_num_threads(torch_threads)
    assert capsys.readouterr().out.strip().startswith('{"bench": "meta"')
    changed = _diff(before, _state(modules))
    assert not changed, f"module-level variables changed at run time: {changed}"


def test_the_state_check_sees_a_flipped_switch_and_a_grown_cache() -> None:
    mod = types.ModuleType("fake")
    mod.SWITCH, mod.CACHE, mod.fn = True, {}, len
    before = _state([mod])
    mod.SWITCH = False
    mod.CACHE["k"] = 1
    mod.fn = sum
    assert sorted(_diff(before, _state([mod]))) == ["fake.CACHE", "fake.SWITCH", "fake.fn"]


def test_the_state_check_sees_a_cache_that_is_not_declared_pure() -> None:
    import functools

    mod = types.ModuleType("fake")
    mod.memo = functools.lru_cache(maxsize=None)(lambda x: x)
    before = _state([mod])
    mod.memo(1)
    assert _diff(before, _state([mod])) == ["fake.memo"]
