"""Checkpoints that are never half-written and never run code when loaded.

Every file this package writes goes through ``atomic_write``: the bytes land in a temp
file beside the target (``.<name>.tmp-<pid>``), are flushed and fsynced, and only then
renamed over the target (``os.replace``), after which the folder itself is fsynced. A
process killed at any moment leaves either the old file or the new one at the final
path, never a mixture; a failed write removes its temp file.

``save_checkpoint`` stores a nested dict (tensors, python scalars, strings, lists, dicts,
optimizer and RNG states) with ``torch.save`` under a small header, after checking that
every value will load again with ``torch.load(weights_only=True)``: numpy arrays and
scalars (as in ``np.random.get_state()``) are stored as tensors and given back as numpy
on load, and a non-finite floating tensor is refused, since a diverged state is not worth
resuming. ``load_checkpoint`` only ever uses ``weights_only=True``: a file that needs code
to load is refused, and nothing in it runs. Plain weights go to safetensors
(``save_weights`` / ``load_weights``), which carries no code at all.

Errors are ``CheckpointError`` with a one-line message naming the file.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import pickletools
import random
import re
import struct
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

__all__ = [
    "CheckpointError",
    "FORMAT",
    "VERSION",
    "LAST",
    "BEST",
    "atomic_write",
    "atomic_write_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng",
    "restore_rng",
    "save_weights",
    "load_weights",
    "checkpoint_path",
    "latest_checkpoint",
    "prune_checkpoints",
    "remove_stale_temps",
]

log = logging.getLogger(__name__)

FORMAT = "metanet.checkpoint"
VERSION = 1
LAST = "last.pt"  # the most recent state of a run, overwritten at every save
BEST = "best.pt"  # the state with the best validation figure so far

_TAG = "__metanet__"  # marks a value encoded by this module (e.g. a numpy array)
_STEP_RE = re.compile(r"^ckpt-(\d+)\.pt$")
_TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be written or read; the message is one line."""


# ----------------------------------------------------------------------------- atomic writes


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    # The rename is only durable once the directory entry is on disk. Not possible on
    # Windows (a directory cannot be opened), where os.replace is the best there is.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems (FUSE, a few network mounts) cannot sync a folder; the file is
        # already in place and synced, so that is no reason to fail the save.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on a clean exit it replaces ``path`` atomically.

    The temp file is ``.<name>.tmp-<pid>`` in the same folder (so the rename never crosses
    file systems). On exit it is flushed, fsynced, renamed over ``path`` and the folder is
    fsynced; on any exception it is removed and ``path`` is left as it was. One writer
    per path at a time: two threads of one process writing the same path share the temp.

    Args:
        path: the final file.
        mode: ``"wb"`` (bytes) or ``"w"`` (UTF-8 text).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-write must not leave the temp behind.
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temp files left in ``folder`` by writers that were killed; return them.

    A temp file ``.<name>.tmp-<pid>`` is stale when no process ``pid`` is alive on this
    machine. Do not call this on a folder that writers on *other* machines share.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        m = _TEMP_RE.match(p.name)
        if m is None or not p.is_file():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:  # no signals here (e.g. Windows): assume alive, remove nothing
        return True
    return True


# ----------------------------------------------------------------------------- encoding


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _numpy_kind(obj: Any) -> str | None:
    # numpy is only looked up if it is already imported: a value cannot be a numpy array
    # otherwise, and this module stays importable without it.
    np = sys.modules.get("numpy")
    if np is None:
        return None
    if isinstance(obj, np.ndarray):
        return "ndarray"
    if isinstance(obj, np.generic):
        return "scalar"
    return None


def _encode(obj: Any, where: str, file: str, active: set[int]) -> Any:
    """Check one value of a state and return it in a form ``weights_only`` loading accepts."""
    if type(obj) in _TENSORS:
        _check_finite(obj, where, file)
        return obj
    if type(obj) in _LEAVES:
        return obj
    kind = _numpy_kind(obj)
    if kind is not None:
        return _encode_numpy(obj, kind, where, file)
    if type(obj) in (dict, OrderedDict, list, tuple, set):
        if id(obj) in active:
            raise CheckpointError(f"{file}: refused to save: {where or 'state'} contains itself (a reference cycle)")
        active.add(id(obj))
        try:
            return _encode_container(obj, where, file, active)
        finally:
            active.discard(id(obj))
    raise CheckpointError(f"{file}: cannot save {where or 'state'}: {_describe(obj)}")


def _encode_container(obj: Any, where: str, file: str, active: set[int]) -> Any:
    if isinstance(obj, dict):
        if _TAG in obj:
            raise CheckpointError(f"{file}: cannot save {where or 'state'}: the key {_TAG!r} is reserved by metanet")
        out = type(obj)()
        for k, v in obj.items():
            if type(k) not in _LEAVES:
                raise CheckpointError(
                    f"{file}: cannot save {where or 'state'}: key {k!r} ({type(k).__name__}) is not plain data;"
                    " expected str, int, float, bool or None keys"
                )
            out[k] = _encode(v, _join(where, k), file, active)
        if hasattr(obj, "_metadata"):  # a module state_dict's version info, plain data
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, set):
        for v in obj:
            if type(v) not in _LEAVES:
                raise CheckpointError(f"{file}: cannot save {where}: a set may only hold plain scalars, found {_describe(v)}")
        return set(obj)
    items = [_encode(v, f"{where}[{i}]", file, active) for i, v in enumerate(obj)]
    return items if isinstance(obj, list) else tuple(items)


def _encode_numpy(obj: Any, kind: str, where: str, file: str) -> dict[str, Any]:
    import numpy as np

    arr = np.asarray(obj)
    try:
        data = torch.from_numpy(np.array(arr, order="C", copy=True))  # keeps 0-d as 0-d
    except TypeError:
        raise CheckpointError(f"{file}: cannot save {where}: numpy dtype {arr.dtype} has no tensor equivalent") from None
    _check_finite(data, where, file)
    return {_TAG: "numpy", "kind": kind, "data": data}


def _decode(obj: Any) -> Any:
    """Undo ``_encode`` on a freshly loaded structure (dicts and lists are reused in place)."""
    if isinstance(obj, dict):
        if obj.get(_TAG) == "numpy":
            import numpy as np

            arr = obj["data"].numpy()
            return arr[()] if obj["kind"] == "scalar" else np.array(arr)
        for k, v in obj.items():
            obj[k] = _decode(v)
        return obj
    if isinstance(obj, list):
        obj[:] = [_decode(v) for v in obj]
        return obj
    if type(obj) is tuple:
        return tuple(_decode(v) for v in obj)
    return obj


def _describe(obj: Any) -> str:
    t = type(obj)
    name = f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__
    if isinstance(obj, torch.Generator):
        return "a torch.Generator; store its get_state() (capture_rng does)"
    if isinstance(obj, torch.Tensor):
        return f"a tensor subclass ({name}) that weights_only loading rejects; store a plain tensor"
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return f"a namedtuple ({name}); store it as a dict (obj._asdict())"
    return f"{name} is not plain data; expected tensors, numbers, strings, bytes, None, lists, tuples, sets or dicts"


def _check_finite(t: Tensor, where: str, file: str) -> None:
    if not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
        return
    values = t._values() if t.layout == torch.sparse_coo else t
    if values.layout != torch.strided:  # other sparse layouts: nothing cheap to check
        return
    bad = int((~torch.isfinite(values.detach())).sum())
    if bad:
        raise CheckpointError(
            f"{file}: refused to save: {where or 'state'} has {bad} non-finite value(s) (nan/inf);"
            " a diverged state is never checkpointed"
        )


# ----------------------------------------------------------------------------- checkpoints


def _existing_file(path: str | os.PathLike[str], what: str, what_file: str) -> Path:
    """``path`` as a Path; a one-line CheckpointError if it is missing or a folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path}: no such file (expected {what})")
    if p.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected {what_file}")
    return p


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Save a nested state atomically; it will load with ``weights_only=True``.

    ``state`` may hold tensors, python scalars, strings, bytes, lists, tuples, sets,
    dicts (``state_dict()`` of modules and optimizers), RNG states (``capture_rng()``,
    ``torch.get_rng_state()``, ``Generator.get_state()``, ``random.getstate()``,
    ``np.random.get_state()``) and numpy arrays and scalars. Python floats may be
    non-finite (``best = inf`` is a fine sentinel); floating tensors may not.

    Raises:
        CheckpointError: a value that cannot be loaded back safely, or a non-finite
            floating tensor (named by its key path, e.g. ``generator.weights.stem.w``).
            Nothing is written then.
    """
    file = str(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file}: cannot save: state must be a dict, got {type(state).__name__}")
    _check_folder(path, file)
    encoded = _encode(dict(state), "", file, set())
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "state": encoded}, buf)
    atomic_write_bytes(path, buf.getbuffer())


def _check_folder(path: str | os.PathLike[str], file: str) -> None:
    folder = Path(path).parent
    if not folder.is_dir():
        raise CheckpointError(f"{file}: cannot save: the folder {folder} does not exist")


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``, onto the CPU; nothing in it runs.

    Raises:
        CheckpointError: no such file, a truncated or corrupt file, a file that needs code
            to load (refused by ``weights_only``), or a file that is not a metanet
            checkpoint of a version this code reads.
    """
    file, p = str(path), _existing_file(path, "a metanet checkpoint", "a metanet checkpoint file")
    try:
        with warnings.catch_warnings():
            # a plain pickle of another protocol makes torch warn before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(p, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        detail = _refusal_detail(str(e))
        byte = _not_an_opcode(str(e))
        if byte is not None:  # random bytes read as a pickle end here, not a crafted pickle
            raise CheckpointError(f"{file}: not a readable checkpoint (corrupt: byte {byte} is no pickle opcode)") from None
        raise CheckpointError(f"{file}: refused: the file needs code to load (weights_only{detail}); metanet checkpoints never do") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError, struct.error) as e:
        raise CheckpointError(f"{file}: not a readable checkpoint (truncated or corrupt: {_first_sentence(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{file}: not a metanet checkpoint (expected format {FORMAT!r}, found {found!r})")
    version = payload.get("version")
    if type(version) is not int or not 1 <= version <= VERSION:
        raise CheckpointError(f"{file}: checkpoint version {version!r} is not readable here (this metanet reads versions 1..{VERSION})")
    state = payload.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a metanet checkpoint (its 'state' is a {type(state).__name__}, expected a dict)")
    return _decode(state)


def _not_an_opcode(message: str) -> int | None:
    """The byte weights_only stopped at where it is no pickle opcode at all (a corrupt
    file), rather than an opcode it does not allow (a pickle that needs code); else None."""
    m = re.search(r"Unsupported operand (\d+)", message)
    byte = None if m is None else int(m.group(1))
    return byte if byte is not None and byte not in {ord(op.code) for op in pickletools.opcodes} else None


def _refusal_detail(message: str) -> str:
    # torch wraps the unpickler's reason in paragraphs of advice; keep only the reason.
    for pattern, fmt in (
        (r"GLOBAL (\S+) was not an allowed global", ": it imports {}"),
        (r"GLOBAL (\S+) whose module", ": it imports {}"),
        (r"Unsupported operand (\d+)", ": pickle opcode {} is not allowed"),
        (r"reduce for unrecognized function (<[^>]*>|\S+)", ": it calls {}"),
    ):
        m = re.search(pattern, message)
        if m is not None:
            return fmt.format(m.group(1))
    return ""


def _first_sentence(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = text.split(". This is an internal")[0]
    return text if len(text) <= 160 else text[:157] + "..."


# ----------------------------------------------------------------------------- RNG


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Snapshot every random number source a run draws from.

    Returns a dict with ``torch`` (global CPU state), ``python`` (``random``), ``numpy``
    (global legacy state, if numpy is installed), ``cuda`` (per device, when CUDA is
    available) and ``generators``: ``{name: {"device": str, "state": ByteTensor}}`` for
    the named generators. It saves with ``save_checkpoint`` as it is.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {
        name: {"device": str(g.device), "state": g.get_state()} for name, g in (generators or {}).items()
    }
    return state


_RNG_KEYS = ("torch", "python", "numpy", "cuda", "generators")


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> dict[str, torch.Generator]:
    """Put every random number source back to a ``capture_rng`` snapshot.

    Args:
        state: a dict from ``capture_rng`` (as is, or after a save/load round trip).
        generators: generators to restore in place, by name; each name must be in the
            snapshot (``KeyError`` otherwise).

    Returns:
        One generator per name in the snapshot: the one passed in, or a new generator on
        the recorded device set to the recorded state.
    """
    unknown = sorted(set(state) - set(_RNG_KEYS), key=str)
    if unknown or not state:
        raise ValueError(f"restore_rng: expected a dict from capture_rng with keys {list(_RNG_KEYS)}, found keys {sorted(state, key=str)}")
    state = _decode(dict(state))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state:
        _restore_cuda(state["cuda"])
    saved = state.get("generators", {})
    out: dict[str, torch.Generator] = {}
    for name in generators or {}:
        if name not in saved:
            raise KeyError(f"restore_rng: no generator named {name!r} in the snapshot (it has {sorted(saved)})")
    for name, entry in saved.items():
        g = (generators or {}).get(name)
        if g is None:
            g = torch.Generator(device=entry["device"])
        g.set_state(entry["state"])
        out[name] = g
    return out


def _restore_cuda(states: list[Tensor]) -> None:
    if not torch.cuda.is_available():
        log.warning("restore_rng: the snapshot has CUDA RNG states but CUDA is not available; they are not restored")
        return
    n = torch.cuda.device_count()
    if len(states) != n:
        log.warning("restore_rng: the snapshot has %d CUDA RNG states, this machine %d devices; restoring the first %d", len(states), n, min(n, len(states)))
    for i, s in enumerate(states[:n]):
        torch.cuda.set_rng_state(s, device=i)


# ----------------------------------------------------------------------------- safetensors


def save_weights(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Save flat named tensors (and string metadata) as safetensors, atomically.

    Tensors are detached and made contiguous; a non-finite floating tensor is refused.

    Raises:
        CheckpointError: a non-string key or metadata entry, a value that is not a tensor,
            a non-finite tensor, or tensors safetensors refuses (e.g. sharing memory).
    """
    file = str(path)
    flat: dict[str, Tensor] = {}
    for k, v in tensors.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{file}: cannot save weights: key {k!r} ({type(k).__name__}) is not a str")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{file}: cannot save weights: {k} ({type(v).__name__}) is not a tensor")
        _check_finite(v, k, file)
        flat[k] = v.detach().contiguous()
    _check_folder(path, file)
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise CheckpointError(f"{file}: cannot save weights: metadata {k!r}: {v!r} must map str to str")
    try:
        data = safetensors.torch.save(flat, metadata=meta or None)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot save weights: {_first_sentence(e)}") from None
    atomic_write_bytes(path, data)


def load_weights(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a safetensors file onto the CPU; returns ``(tensors, metadata)``.

    Raises:
        CheckpointError: no such file, or a file that is not valid safetensors.
    """
    file, p = str(path), _existing_file(path, "a safetensors weights file", "a safetensors weights file")
    try:
        data = p.read_bytes()
        tensors = safetensors.torch.load(data)
        with safetensors.safe_open(p, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({_first_sentence(e)})") from None
    return tensors, metadata


# ----------------------------------------------------------------------------- run folders


def checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The file of the step checkpoint ``step`` in ``run_dir``: ``ckpt-00000100.pt``."""
    if step < 0:
        raise ValueError(f"checkpoint_path: step must be >= 0, got {step}")
    return Path(run_dir) / f"ckpt-{step:08d}.pt"


def _step_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_RE.match(p.name)
        if m is not None and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The ``ckpt-<step>.pt`` in ``run_dir`` with the highest step, or None if there is none."""
    found = _step_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the ``keep`` highest-step ``ckpt-<step>.pt`` files; return the deleted.

    ``last.pt``, ``best.pt`` and any other file are never touched.
    """
    if keep < 0:
        raise ValueError(f"prune_checkpoints: keep must be >= 0, got {keep}")
    found = _step_checkpoints(run_dir)
    doomed = [p for _, p in found[: max(len(found) - keep, 0)]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
