"""Omniglot N-way K-shot episodes (Lake et al. 2015), held whole in memory.

``root`` holds one or both of Omniglot's split files, ``background`` and ``evaluation``,
in either layout (the npz wins when both are present):

- ``images_<split>.npz`` with an array ``images``, bool (characters, drawings, H, W), True
  for the white background. Alphabet names come from an optional sidecar
  ``alphabets_<split>.json``: ``{"<split>": [{"alphabet", "first_id", "last_id"}, ...]}``
  where row i of ``images`` is character id i + 1. The npz's own ``labels`` array only
  repeats the row index, so it is not read.
- ``images_<split>/<alphabet>/<character>/*.png``, Lake's folders of 105x105 drawings on a
  white background, read in sorted name order.

Splits: ``background`` and ``evaluation`` are the files; ``train`` and ``val`` divide
``background`` by alphabet, ``val`` being ``val_alphabets`` (default
``DEFAULT_VAL_ALPHABETS``). Images are turned into strokes of 1.0 on 0.0 and resized with
area averaging (antialiased) once, at construction.
"""

from __future__ import annotations

import functools

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Episode, TaskError, _check_positive, _unknown, shared_data_root

__all__ = ["Omniglot", "SPLITS", "DEFAULT_VAL_ALPHABETS", "default_data_root", "shared_data_root"]

SPLITS: tuple[str, ...] = ("background", "evaluation", "train", "val")

# Every sixth of the 30 background alphabets in sorted name order, starting with the
# first: 177 of the 964 background characters.
DEFAULT_VAL_ALPHABETS: tuple[str, ...] = (
    "Alphabet_of_the_Magi",
    "Bengali",
    "Futurama",
    "Japanese_(hiragana)",
    "N_Ko",
)

_CHUNK = 64  # characters resized at once: bounds the float32 copy to about 56 MB


def default_data_root() -> Path | None:
    """Return the folder of the Omniglot files, or None when there is none.

    ``METANET_DATA_ROOT`` if set; else ``shared_data_root("omniglot")``.
    """
    env = os.environ.get("METANET_DATA_ROOT")
    if env:
        return Path(env)
    return shared_data_root("omniglot")


@dataclass(frozen=True)
class _Characters:
    """The raw drawings of one split file."""

    images: np.ndarray  # (characters, drawings, H, W) bool, True = background
    alphabets: tuple[str, ...] | None  # alphabet of each character, None when unknown
    source: str  # file or folder name, for messages


def _read_alphabets(path: Path, file_split: str, n: int) -> tuple[str, ...] | None:
    """Read the alphabet of each of ``n`` characters from a sidecar JSON, if present."""
    if not path.is_file():
        return None
    expected = (
        f"{path.name} must map {file_split!r} to a list of "
        f"{{alphabet, first_id, last_id}} covering ids 1..{n} once each"
    )
    try:
        entries = json.loads(path.read_text())[file_split]
        spans = sorted((int(e["first_id"]), int(e["last_id"]), str(e["alphabet"])) for e in entries)
    except (KeyError, TypeError, ValueError):
        raise TaskError(expected) from None
    if [i for first, last, _ in spans for i in range(first, last + 1)] != list(range(1, n + 1)):
        raise TaskError(expected)
    return tuple(name for first, last, name in spans for _ in range(first, last + 1))


def _read_npz(path: Path, file_split: str) -> _Characters:
    """Read ``images_<split>.npz`` and its optional alphabet sidecar."""
    try:
        with np.load(path) as data:
            found = data.files
            images = data["images"] if "images" in found else None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise TaskError(f"{path.name} is not a readable npz file ({err})") from None
    if images is None:
        listed = ", ".join(found) or "nothing"
        raise TaskError(f"{path.name} has no 'images' array (found: {listed})")
    if images.dtype != np.bool_ or images.ndim != 4 or 0 in images.shape:
        raise TaskError(
            f"{path.name}: 'images' must be a non-empty bool array (characters, drawings, H, W), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    sidecar = path.with_name(f"alphabets_{file_split}.json")
    return _Characters(images, _read_alphabets(sidecar, file_split, len(images)), path.name)


def _read_png(path: Path) -> np.ndarray:
    """Read one drawing as a bool array, True for the white background."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L")) >= 128  # (H, W)
    except OSError:  # includes PIL's UnidentifiedImageError
        raise TaskError(f"{path} is not a readable PNG image") from None


def _read_folders(folder: Path) -> _Characters:
    """Read Lake's ``<alphabet>/<character>/*.png`` tree in sorted name order."""
    characters = [
        (alphabet.name, character)
        for alphabet in sorted(p for p in folder.iterdir() if p.is_dir())
        for character in sorted(p for p in alphabet.iterdir() if p.is_dir())
    ]
    if not characters:
        raise TaskError(f"{folder} holds no <alphabet>/<character>/ folders of PNG drawings")
    drawings = []
    for _, character in characters:
        files = sorted(character.glob("*.png"))
        if not files:
            raise TaskError(f"{character} holds no .png drawings")
        drawings.append([_read_png(f) for f in files])
    counts = sorted({len(d) for d in drawings})
    if len(counts) > 1:
        raise TaskError(
            f"{folder}: every character needs the same number of drawings, found {counts}"
        )
    sizes = sorted({x.shape for d in drawings for x in d})
    if len(sizes) > 1:
        raise TaskError(f"{folder}: every drawing needs the same size, found {sizes}")
    images = np.stack([np.stack(d) for d in drawings])  # (characters, drawings, H, W)
    return _Characters(images, tuple(a for a, _ in characters), folder.name)


def _read_split(root: Path, file_split: str) -> _Characters:
    """Find and read one split file of ``root`` in whichever layout it has."""
    npz, folder = root / f"images_{file_split}.npz", root / f"images_{file_split}"
    if npz.is_file():
        return _read_npz(npz, file_split)
    if folder.is_dir():
        return _read_folders(folder)
    raise TaskError(
        f"no Omniglot {file_split!r} data in {str(root)!r}: expected {npz.name} "
        f"(bool images [characters, drawings, H, W]) or {folder.name}/<alphabet>/<character>/*.png"
    )


def _to_strokes(images: np.ndarray, size: int) -> Tensor:
    """Turn white-background drawings into strokes of 1.0 resized to ``size``."""
    n, drawings = images.shape[:2]
    background = torch.from_numpy(images)  # (N, D, H, W) bool
    out = torch.empty(n, drawings, 1, size, size, dtype=torch.float16)
    for start in range(0, n, _CHUNK):
        strokes = background[start : start + _CHUNK].logical_not().float()  # (n, D, H, W)
        resized = F.interpolate(strokes.flatten(0, 1).unsqueeze(1), size=(size, size), mode="area")
        out[start : start + _CHUNK] = resized.view(-1, drawings, 1, size, size)
    return out  # (N, D, 1, S, S)


def _signature(root: Path, file_split: str) -> tuple:
    """What identifies a split file's contents: its path, size and modification time (a
    PNG folder: its own, its alphabet and its character folders' times, which change
    when a drawing is added, removed or renamed; a drawing rewritten in place under the
    same name keeps them, a case the memo below does not see)."""
    npz, folder = root / f"images_{file_split}.npz", root / f"images_{file_split}"
    sidecar = root / f"alphabets_{file_split}.json"
    paths = [npz, sidecar] if npz.is_file() else [folder, *sorted(folder.glob("*")), *sorted(folder.glob("*/*"))] if folder.is_dir() else []
    return tuple((str(p), st.st_size, st.st_mtime_ns) for p in paths if p.exists() and (st := p.stat()))


@functools.lru_cache(maxsize=6)
def _strokes(root: Path, file_split: str, signature: tuple, split: str, val_alphabets: tuple[str, ...], size: int) -> tuple[Tensor, tuple[str, ...] | None]:
    """The strokes ``(characters, drawings, 1, S, S)`` and alphabets of one split, read and
    resized once per process for a given file ``signature`` (the results report builds a
    split for every job it scores). The tensor is shared by the distributions built from
    it, which only read it."""
    chars = _read_split(root, file_split)
    if split in ("train", "val"):
        chars = _by_alphabet(chars, split, val_alphabets)
    return _to_strokes(chars.images, size), chars.alphabets


def _by_alphabet(chars: _Characters, split: str, val_alphabets: tuple[str, ...]) -> _Characters:
    """Keep the characters of the train or val alphabets of the background split."""
    if chars.alphabets is None:
        raise TaskError(
            f"split {split!r} needs the alphabet of each character, which "
            f"{chars.source} lacks: add alphabets_background.json beside it"
        )
    known = sorted(set(chars.alphabets))
    if not val_alphabets:
        raise TaskError("val_alphabets must name at least one background alphabet")
    for name in val_alphabets:
        if name not in known:
            raise _unknown("val alphabet", name, known)
    if set(val_alphabets) == set(known):
        raise TaskError(
            "val_alphabets hold every background alphabet, leaving none for 'train'"
        )
    want_val = split == "val"
    keep = np.array([(a in val_alphabets) == want_val for a in chars.alphabets])
    alphabets = tuple(a for a, k in zip(chars.alphabets, keep) if k)
    return _Characters(chars.images[keep], alphabets, chars.source)


@dataclass(frozen=True, eq=False)
class Omniglot:
    """N-way K-shot classification episodes over Omniglot characters."""

    root: str | Path
    split: str = "background"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    rotations: bool = True
    image_size: int = 28
    val_alphabets: tuple[str, ...] = DEFAULT_VAL_ALPHABETS
    # set at construction: (characters, drawings, 1, S, S) float16, stroke 1.0 on 0.0
    images: Tensor = field(init=False, repr=False)
    # alphabet of each character, None when the layout does not say
    character_alphabets: tuple[str, ...] | None = field(init=False, repr=False)

    kind: ClassVar[str] = "classification"
    # what a training config takes unless told otherwise (config.TrainConfig.for_tasks)
    train_defaults: ClassVar[dict[str, object]] = {"queries": 15, "shots": 1, "inner_lr": 0.4, "meta_batch": 16, "space": "conv_omniglot"}
    n_families: ClassVar[int] = 0

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "queries", "image_size"):
            _check_positive(name, getattr(self, name))
        if self.split not in SPLITS:
            raise _unknown("split", self.split, SPLITS)
        val = self.val_alphabets
        object.__setattr__(self, "val_alphabets", (val,) if isinstance(val, str) else tuple(val))
        root = Path(self.root)
        if not root.is_dir():
            raise TaskError(f"root {str(root)!r} does not exist or is not a folder")
        file_split = "evaluation" if self.split == "evaluation" else "background"
        strokes, alphabets = _strokes(root.resolve(), file_split, _signature(root, file_split), self.split, self.val_alphabets, self.image_size)
        n_drawings = strokes.shape[1]
        if self.shots + self.queries > n_drawings:
            raise TaskError(
                f"shots + queries = {self.shots + self.queries} exceeds the {n_drawings} "
                f"drawings per character"
            )
        n_classes = len(strokes) * (4 if self.rotations else 1)
        if self.ways > n_classes:
            raise TaskError(
                f"ways = {self.ways} exceeds the {n_classes} classes of split {self.split!r}"
            )
        object.__setattr__(self, "images", strokes)
        object.__setattr__(self, "character_alphabets", alphabets)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(1, image_size, image_size)."""
        return (1, self.image_size, self.image_size)

    @property
    def n_outputs(self) -> int:
        """Number of classes per task (ways)."""
        return self.ways

    @property
    def n_characters(self) -> int:
        """Number of characters in the split."""
        return self.images.shape[0]

    @property
    def n_classes(self) -> int:
        """Number of classes: characters, times 4 rotations when ``rotations``."""
        return self.n_characters * (4 if self.rotations else 1)

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Episode:
        """Sample ``batch`` episodes; examples are grouped by label, labels in random class order.

        Class ``c`` is character ``c % n_characters`` turned by ``c // n_characters`` quarter
        turns; each task draws ``ways`` distinct classes and, per class, ``shots + queries``
        distinct drawings.
        """
        n_drawings, size = self.images.shape[1], self.image_size
        per_class = self.shots + self.queries
        # top-k of uniform noise: distinct classes, in random order, so label i is a random class
        noise = torch.rand(batch, self.n_classes, generator=generator)  # (B, classes)
        classes = noise.topk(self.ways).indices  # (B, W)
        draws = torch.rand(batch, self.ways, n_drawings, generator=generator).argsort(dim=2)
        draws = draws[..., :per_class]  # (B, W, K + Q)
        characters = (classes % self.n_characters)[..., None]  # (B, W, 1)
        x = self.images[characters, draws].float()  # (B, W, K + Q, 1, S, S)
        if self.rotations:
            turns = classes // self.n_characters  # (B, W)
            for k in range(1, 4):
                turned = turns == k
                x[turned] = x[turned].rot90(k, dims=(-2, -1))
        labels = torch.arange(self.ways)  # (W,)
        return Episode(
            x[:, :, : self.shots].reshape(batch, -1, 1, size, size),
            labels.repeat_interleave(self.shots).repeat(batch, 1),  # (B, W * K)
            x[:, :, self.shots :].reshape(batch, -1, 1, size, size),
            labels.repeat_interleave(self.queries).repeat(batch, 1),  # (B, W * Q)
        )
