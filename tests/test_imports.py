"""Every module imports alone in a fresh interpreter, and `import metanet` is warning-free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "metanet"
MODULES = sorted(
    ".".join(("metanet", *p.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__")
    for p in PKG.rglob("*.py")
    if p.stem != "__main__"  # running the CLI is what importing it means
)

# One interpreter pays for the third-party imports once, then forks a child per module: each
# child starts with no metanet module loaded, so it imports that module alone, as
# `python -c "import metanet.X"` would, for a fraction of the time (torch alone takes ~2 s).
_DRIVER = r"""
import importlib, json, os, sys, traceback
for dep in sys.argv[2].split(","):  # third-party only, paid once
    if dep:
        importlib.import_module(dep)
assert not any(m == "metanet" or m.startswith("metanet.") for m in sys.modules)
results = {}
for name in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            msg = ""
        except BaseException:
            msg = traceback.format_exc()
        os.write(w, (msg or "ok").encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        results[name] = f.read()
    os.waitpid(pid, 0)
print("RESULTS " + json.dumps(results))
"""


def _fresh(module: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def import_results() -> dict[str, str]:
    """{module: "ok" or the traceback of importing it alone}."""
    if not hasattr(os, "fork"):  # no fork: one fresh interpreter per module
        return {m: "ok" if (r := _fresh(m)).returncode == 0 else r.stderr for m in MODULES}
    res = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(MODULES), "networkx,numpy,torch,yaml"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


def test_modules_found() -> None:
    assert {"metanet", "metanet.ops", "metanet.space", "metanet.graph", "metanet.executor"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module: str, import_results: dict[str, str]) -> None:
    assert import_results[module] == "ok", f"import {module} failed:\n{import_results[module]}"


def test_a_broken_module_is_reported(tmp_path: Path) -> None:
    """The driver reports a failing import (guards against a check that cannot fail)."""
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("")
    (tmp_path / "brokenpkg" / "bad.py").write_text("from . import missing_sibling\n")
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(["brokenpkg", "brokenpkg.bad"]), ""],
        capture_output=True, text=True, timeout=120, env=env,
    )
    results = json.loads(res.stdout.splitlines()[-1][len("RESULTS "):])
    assert results["brokenpkg"] == "ok"
    assert "ImportError" in results["brokenpkg.bad"] and "missing_sibling" in results["brokenpkg.bad"]


def test_import_metanet_is_warning_free_and_light() -> None:
    code = "import sys, metanet; assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'"
    res = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.stdout == ""
