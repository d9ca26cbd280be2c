"""Checkpoints: atomic writes, exact resume (RNG included), and loading that never runs code."""

from __future__ import annotations

import ast
import collections
import contextlib
import os
import pathlib
import pickle
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import metanet.checkpoint as ck
from metanet.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    atomic_write,
    atomic_write_bytes,
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    prune_checkpoints,
    remove_stale_temps,
    restore_rng,
    save_checkpoint,
    save_weights,
)


def assert_same(a, b, where="state"):
    """Deep equality that also checks types and dtypes (a float 1.0 is not a tensor 1.0)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad, where
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def trained_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


# ----------------------------------------------------------------------------- round trip


def test_nested_state_round_trips_exactly(tmp_path):
    g = torch.Generator().manual_seed(7)
    random.seed(3)
    np.random.seed(4)
    state = {
        "step": 120,
        "best": float("inf"),  # a python float sentinel may be non-finite
        "lr": 1e-3,
        "name": "conv_omniglot",
        "done": False,
        "nothing": None,
        "blob": b"\x00\x01",
        "shape": torch.Size([2, 3]),
        "dtype": torch.float64,
        "device": torch.device("cpu"),
        "history": [0.5, 0.25, (1, "a")],
        "seen": {1, 2, 3},
        "by_index": {0: torch.zeros(2), 5: "x"},
        "generator": {"weights": {"stem.w": torch.randn(4, 3, dtype=torch.float64), "ints": torch.arange(5)}},
        "half": torch.randn(3).to(torch.bfloat16),
        **trained_state(),
        "rng": {
            "torch": torch.get_rng_state(),
            "gen": g.get_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        },
        "array": np.linspace(0, 1, 5, dtype=np.float32),
        "metric": np.float64(0.75),
        "count": np.int64(9),
    }
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert_same(state, loaded)
    # a numpy scalar comes back as a numpy scalar of the same dtype, not a 0-d array
    assert type(loaded["metric"]) is np.float64 and type(loaded["count"]) is np.int64
    # the file is plain data for torch too, under a header
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "metanet.checkpoint" and raw["version"] == 1 and raw["state"]["step"] == 120


def test_loaded_optimizer_state_resumes_the_same_trajectory(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    data = [torch.randn(4, 3) for _ in range(6)]

    def step(m, o, x):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()

    for x in data[:3]:
        step(model, opt, x)
    save_checkpoint(tmp_path / LAST, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    for x in data[3:]:
        step(model, opt, x)

    state = load_checkpoint(tmp_path / LAST)
    model2 = torch.nn.Linear(3, 1)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    for x in data[3:]:
        step(model2, opt2, x)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- RNG


def draws(gen: torch.Generator) -> tuple:
    return (
        torch.rand(4).tolist(),
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        torch.randn(4, generator=gen).tolist(),
    )


@pytest.mark.parametrize("through_file", [False, True])
def test_rng_capture_restore_reproduces_draws(tmp_path, through_file):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    gen = torch.Generator().manual_seed(4)
    snap = capture_rng({"data": gen})
    first = draws(gen)
    assert draws(gen) != first  # the sources do move on, so equality below means something
    if through_file:
        save_checkpoint(tmp_path / "c.pt", {"rng": snap})
        snap = load_checkpoint(tmp_path / "c.pt")["rng"]
    gens = restore_rng(snap, {"data": gen})
    assert gens["data"] is gen
    assert draws(gen) == first


def test_restore_rng_builds_named_generators_it_is_not_given(tmp_path):
    gen = torch.Generator().manual_seed(11)
    gen.manual_seed(11)
    snap = capture_rng({"sampler": gen})
    expected = torch.randn(5, generator=gen)
    save_checkpoint(tmp_path / "c.pt", {"rng": snap})
    fresh = restore_rng(load_checkpoint(tmp_path / "c.pt")["rng"])["sampler"]
    assert fresh is not gen and fresh.device == gen.device
    assert torch.equal(torch.randn(5, generator=fresh), expected)


def test_restore_rng_errors_name_the_problem():
    snap = capture_rng({"data": torch.Generator()})
    with pytest.raises(KeyError, match=r"no generator named 'model' in the snapshot \(it has \['data'\]\)"):
        restore_rng(snap, {"model": torch.Generator()})
    with pytest.raises(ValueError, match=r"restore_rng: expected a dict from capture_rng .* found keys \['model', 'step'\]") as e:
        restore_rng({"step": 3, "model": {}})
    one_line(e)


# ----------------------------------------------------------------------------- atomic writes


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    with atomic_write(tmp_path / "g.json", "w") as f:
        f.write('{"é": 1}')
    assert (tmp_path / "g.json").read_text(encoding="utf-8") == '{"é": 1}'
    assert listing(tmp_path) == ["f.bin", "g.json"]


def test_atomic_write_failing_mid_write_keeps_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old contents")
    seen = []
    with pytest.raises(RuntimeError, match="serializer died"):
        with atomic_write(path) as f:
            f.write(b"half of the new")
            seen = listing(tmp_path)
            raise RuntimeError("serializer died")
    assert seen == [f".f.bin.tmp-{os.getpid()}", "f.bin"]  # the temp is where the name says
    assert path.read_bytes() == b"old contents"
    assert listing(tmp_path) == ["f.bin"]


def test_atomic_write_failing_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / LAST
    save_checkpoint(path, {"step": 1})

    def boom(src, dst):
        raise OSError("disk vanished")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError, match="disk vanished"):
        save_checkpoint(path, {"step": 2, "w": torch.ones(1000)})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert listing(tmp_path) == [LAST]


def test_save_failing_inside_torch_save_writes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1})

    def boom(obj, f):
        f.write(b"partial")
        raise RuntimeError("pickler crashed")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(RuntimeError, match="pickler crashed"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert listing(tmp_path) == ["c.pt"]


def test_atomic_write_interrupted_by_keyboard_keeps_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as f:
            f.write(b"new")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and listing(tmp_path) == ["f.bin"]


_WRITER = textwrap.dedent(
    """
    import os, sys
    import torch
    from metanet.checkpoint import save_checkpoint

    # torch is imported once; each run forks a writer before any torch op has started
    # a thread pool, and the test SIGKILLs that writer at a random moment.
    path, parent = sys.argv[1], os.getpid()
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            i = 0
            while os.getppid() == parent:  # never outlive the supervisor
                i += 1
                x = torch.full((1_250_000,), float(i))  # 5 MB
                save_checkpoint(path, {"i": i, "pid": os.getpid(), "x": x})
                if i == 1:
                    print("ready", os.getpid(), flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("dead", os.waitstatus_to_exitcode(status), flush=True)
    """
)


def _readline(fd: int, timeout: float = 60.0) -> str:
    """One line from a pipe, or TimeoutError: a hung writer fails the test, not the suite."""
    deadline, buf = time.monotonic() + timeout, b""
    while not buf.endswith(b"\n"):
        if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
            raise TimeoutError(f"no line from the writer within {timeout} s (got {buf!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
    return buf.decode()


def test_sigkilled_writer_never_leaves_a_corrupt_checkpoint(tmp_path):
    path = tmp_path / LAST
    rng = random.Random(0)
    writer = None
    with subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ) as proc:
        try:
            for _ in range(5):
                proc.stdin.write(b"go\n")
                word, pid = _readline(proc.stdout.fileno()).split()
                assert word == "ready"
                writer = int(pid)
                time.sleep(rng.uniform(0.0, 0.3))
                os.kill(writer, signal.SIGKILL)
                assert _readline(proc.stdout.fileno()).split() == ["dead", str(-signal.SIGKILL)]
                writer = None

                state = load_checkpoint(path)  # exists since the first "ready"; always whole
                assert state["x"].shape == (1_250_000,)
                assert torch.equal(state["x"], torch.full((1_250_000,), float(state["i"])))
                # a kill between open and rename leaves the writer's temp; it is stale now
                temp = tmp_path / f".{LAST}.tmp-{pid}"
                left = [temp] if temp.exists() else []
                assert remove_stale_temps(tmp_path) == left
                assert listing(tmp_path) == [LAST]
        finally:
            if writer is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(writer, signal.SIGKILL)
            proc.kill()


def test_remove_stale_temps_keeps_live_writers(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".a.pt.tmp-{dead.pid}").write_bytes(b"x")
    (tmp_path / f".b.pt.tmp-{os.getpid()}").write_bytes(b"x")
    (tmp_path / f".c.pt.tmp-{os.getppid()}").write_bytes(b"x")
    (tmp_path / "a.pt").write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == [tmp_path / f".a.pt.tmp-{dead.pid}"]
    assert listing(tmp_path) == sorted(["a.pt", f".b.pt.tmp-{os.getpid()}", f".c.pt.tmp-{os.getppid()}"])


# ----------------------------------------------------------------------------- refusing to load


class _SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _TouchPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("payload", [_SystemPayload, _TouchPayload])
@pytest.mark.parametrize("writer", ["pickle2", "pickle5", "torch.save"])
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, payload, writer):
    # The payload is live: unpickling it the unsafe way does create the marker.
    probe = tmp_path / "PROBE"
    pickle.loads(pickle.dumps(payload(probe)))
    assert probe.exists()

    marker = tmp_path / "MARKER"
    evil = {"format": "metanet.checkpoint", "version": 1, "state": {"x": payload(marker)}}
    path = tmp_path / "ckpt.pt"
    if writer == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=int(writer[-1])))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = one_line(e)
    assert msg.startswith(f"{path}: refused: the file needs code to load (weights_only")
    assert msg.endswith("); metanet checkpoints never do")
    if writer != "pickle5":  # protocol 5 names globals with an opcode weights_only lacks
        assert ("system" in msg) if payload is _SystemPayload else ("getattr" in msg or "touch" in msg), msg
    assert not marker.exists()


def test_torch_file_needing_numpy_globals_is_refused(tmp_path):
    path = tmp_path / "np.pt"
    torch.save({"format": "metanet.checkpoint", "version": 1, "state": {"a": np.zeros(3)}}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert one_line(e) == (
        f"{path}: refused: the file needs code to load (weights_only: it imports "
        "numpy._core.multiarray._reconstruct); metanet checkpoints never do"
    )


def test_truncated_checkpoint_is_refused(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.randn(1000), "step": 3})
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    for n in [0, 10, len(data) // 3, len(data) // 2, len(data) - 1]:
        bad.write_bytes(data[:n])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(bad)
        assert one_line(e).startswith(f"{bad}: not a readable checkpoint (truncated or corrupt: "), n


def test_random_bytes_are_called_unreadable_not_a_crafted_file(tmp_path):
    """Bytes that begin with an opcode weights_only refuses: corrupt is as likely as crafted."""
    bad = tmp_path / "best.pt"
    bad.write_bytes(bytes([211]) + bytes(range(200)))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert one_line(e) == f"{bad}: not a readable checkpoint (corrupt: byte 211 is no pickle opcode)"


def test_files_that_are_not_checkpoints(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(other)
    assert one_line(e) == f"{other}: not a metanet checkpoint (expected format 'metanet.checkpoint', found None)"

    bare = tmp_path / "bare.pt"
    torch.save(torch.zeros(2), bare)
    with pytest.raises(CheckpointError, match=r"found 'Tensor'\)$"):
        load_checkpoint(bare)

    newer = tmp_path / "newer.pt"
    torch.save({"format": "metanet.checkpoint", "version": 2, "state": {}}, newer)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(newer)
    assert one_line(e) == f"{newer}: checkpoint version 2 is not readable here (this metanet reads versions 1..1)"

    missing = tmp_path / "run" / "ckpt.pt"
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(missing)
    assert one_line(e) == f"{missing}: no such file (expected a metanet checkpoint)"
    with pytest.raises(CheckpointError, match="is a folder, expected a metanet checkpoint file"):
        load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- refusing to save


def test_non_finite_tensor_is_refused_and_nothing_written(tmp_path):
    path = tmp_path / "ckpt.pt"
    w = torch.randn(4, 3)
    w[1, 2] = float("nan")
    w[0, 0] = float("inf")
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(path, {"step": 1, "generator": {"weights": {"stem.w": w}}})
    assert one_line(e) == (
        f"{path}: refused to save: generator.weights.stem.w has 2 non-finite value(s) (nan/inf);"
        " a diverged state is never checkpointed"
    )
    assert listing(tmp_path) == []

    save_checkpoint(path, {"step": 1})
    with pytest.raises(CheckpointError, match=r"refused to save: losses\[2\] has 1 non-finite"):
        save_checkpoint(path, {"step": 2, "losses": [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(float("-inf"))]})
    with pytest.raises(CheckpointError, match=r"refused to save: optimizer\.state\.0\.exp_avg has 1 non-finite"):
        save_checkpoint(path, {"optimizer": {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}})
    with pytest.raises(CheckpointError, match=r"refused to save: stats has 1 non-finite"):
        save_checkpoint(path, {"stats": np.array([1.0, np.nan])})
    assert load_checkpoint(path) == {"step": 1}
    assert listing(tmp_path) == ["ckpt.pt"]


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize(
    "value, expected",
    [
        (torch.Generator(), "a.b: a torch.Generator; store its get_state() (capture_rng does)"),
        (Point(1, 2), f"a.b: a namedtuple ({__name__}.Point); store it as a dict (obj._asdict())"),
        (frozenset([1]), "a.b: frozenset is not plain data; expected tensors, numbers, strings, bytes, None, lists, tuples, sets or dicts"),
        ([1, object()], "a.b[1]: object is not plain data; expected tensors"),
        ({"__metanet__": 1}, "a.b: the key '__metanet__' is reserved by metanet"),
        ({(1, 2): 3}, "a.b: key (1, 2) (tuple) is not plain data; expected str, int, float, bool or None keys"),
        (np.array(["a"]), "a.b: numpy dtype <U1 has no tensor equivalent"),
    ],
)
def test_values_that_would_not_load_are_refused(tmp_path, value, expected):
    path = tmp_path / "c.pt"
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(path, {"a": {"b": value}})
    msg = one_line(e)
    assert msg.startswith(f"{path}: cannot save {expected}"), msg
    assert listing(tmp_path) == []


def test_reference_cycle_is_refused(tmp_path):
    loop: list = [1]
    loop.append(loop)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path / "c.pt", {"a": loop})
    assert one_line(e) == f"{tmp_path / 'c.pt'}: refused to save: a[1] contains itself (a reference cycle)"
    with pytest.raises(CheckpointError, match="state must be a dict, got list"):
        save_checkpoint(tmp_path / "c.pt", [1])  # type: ignore[arg-type]


def test_saving_into_a_missing_folder_names_it(tmp_path):
    for save, name in [(lambda p: save_checkpoint(p, {}), "c.pt"), (lambda p: save_weights(p, {}), "w.safetensors")]:
        path = tmp_path / "run" / name
        with pytest.raises(CheckpointError) as e:
            save(path)
        assert one_line(e) == f"{path}: cannot save: the folder {tmp_path / 'run'} does not exist"


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_with_metadata(tmp_path):
    tensors = {
        "stem.w": torch.randn(4, 3, 3, 3),
        "head.b": torch.zeros(5, dtype=torch.float64),
        "steps": torch.arange(3),
        "transposed": torch.randn(3, 5).t(),  # not contiguous: saved as its values
    }
    meta = {"genotype": '{"cells": []}', "space": "conv_omniglot"}
    path = tmp_path / "net.safetensors"
    save_weights(path, tensors, meta)
    loaded, loaded_meta = load_weights(path)
    assert loaded_meta == meta
    assert sorted(loaded) == sorted(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    save_weights(tmp_path / "bare.safetensors", {"a": torch.ones(1)})
    assert load_weights(tmp_path / "bare.safetensors")[1] == {}
    assert listing(tmp_path) == ["bare.safetensors", "net.safetensors"]


def test_safetensors_errors_are_one_line(tmp_path):
    path = tmp_path / "w.safetensors"
    bad = torch.ones(3)
    bad[1] = float("nan")
    cases = [
        ({"a.w": bad}, None, "refused to save: a.w has 1 non-finite value(s) (nan/inf); a diverged state is never checkpointed"),
        ({"a": [1.0]}, None, "cannot save weights: a (list) is not a tensor"),
        ({1: torch.ones(1)}, None, "cannot save weights: key 1 (int) is not a str"),
        ({"a": torch.ones(1)}, {"step": 3}, "cannot save weights: metadata 'step': 3 must map str to str"),
    ]
    for tensors, meta, expected in cases:
        with pytest.raises(CheckpointError) as e:
            save_weights(path, tensors, meta)  # type: ignore[arg-type]
        assert one_line(e) == f"{path}: {expected}"
    assert listing(tmp_path) == []

    save_weights(path, {"a": torch.randn(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_weights(path)
    assert one_line(e).startswith(f"{path}: not a readable safetensors file (")
    with pytest.raises(CheckpointError) as e:
        load_weights(tmp_path / "none.safetensors")
    assert one_line(e) == f"{tmp_path / 'none.safetensors'}: no such file (expected a safetensors weights file)"


# ----------------------------------------------------------------------------- run folders


def test_latest_and_prune(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in [5, 9, 10, 100]:
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    save_checkpoint(tmp_path / "ckpt-7.pt", {"step": 7})  # unpadded names count by number
    for name in [LAST, BEST, ".ckpt-00000200.pt.tmp-1", "ckpt-final.pt", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert checkpoint_path(tmp_path, 100).name == "ckpt-00000100.pt"
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 100)

    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["ckpt-00000005.pt", "ckpt-7.pt", "ckpt-00000009.pt"]
    assert listing(tmp_path) == sorted(
        [".ckpt-00000200.pt.tmp-1", BEST, "ckpt-00000010.pt", "ckpt-00000100.pt", "ckpt-final.pt", LAST, "notes.txt"]
    )
    assert load_checkpoint(latest_checkpoint(tmp_path)) == {"step": 100}
    assert prune_checkpoints(tmp_path, keep=5) == []
    with pytest.raises(ValueError, match="prune_checkpoints: keep must be >= 0, got -1"):
        prune_checkpoints(tmp_path, keep=-1)


def test_module_imports_nothing_from_metanet():
    tree = ast.parse(Path(ck.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." if node.level else node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"torch", "safetensors", "numpy", "__future__"}, imported
