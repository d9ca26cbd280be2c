"""N-way K-shot episodes over folders of images: any image folder, mini-ImageNet, several domains.

Every image is decoded once, at construction, into one compact uint8 array
``(images, C, S, S)`` with class offsets (``ImageStore``); episodes are then gathered from
memory and scaled to [0, 1]. Decoding 48,000 JPEGs takes seconds, so the decoded array is
kept in an on-disk cache (``METANET_CACHE``; default ``~/.cache/metanet``, never inside a
data folder) under a key made from the files' bytes, the class names, the image size and
the channels: a changed file is a new key. An index (``index.json``) maps the files'
paths, sizes and modification times to that key, so that loading an unchanged dataset
does not read its files. Cache files are written atomically (temporary file, fsync,
rename) and read with ``numpy.load(allow_pickle=False)`` and ``json``; an unreadable
cache file is ignored and decoded again.

Layouts:

- ``ImageFolder``: ``<root>/<class>/<image>`` (png, jpg, jpeg, ppm, pgm, bmp; grayscale or
  RGB), the torchvision ImageFolder convention. Class-level splits come from a split file
  (CSV lines ``class,split``) or from a seeded fraction of the sorted class names.
- ``MiniImageNet``: Ravi & Larochelle's ``images/`` + ``<split>.csv`` (``filename,label``),
  or class folders ``<split>/<wnid>/*.jpg``. Pickle caches are refused: unpickling runs code.
- ``MultiDomain``: each task from one domain (Omniglot, mini-ImageNet, any image folder),
  all mapped to one input shape, the domain id as task metadata.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .base import Episode, TaskError, _check_positive, _unknown
from .omniglot import Omniglot

__all__ = [
    "ImageStore",
    "ImageFolder",
    "MiniImageNet",
    "MultiDomain",
    "IMAGE_EXTENSIONS",
    "IMAGE_SPLITS",
    "MINI_SPLITS",
    "DEFAULT_DOMAINS",
    "cache_dir",
    "load_store",
    "domain_folder",
    "domain_name",
    "strip_invert",
    "INVERT",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".bmp")
PICKLE_SUFFIXES: tuple[str, ...] = (".pkl", ".pickle")
IMAGE_SPLITS: tuple[str, ...] = ("train", "val", "test", "all")
MINI_SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test classes
DEFAULT_DOMAINS: tuple[str, ...] = ("omniglot", "miniimagenet", "chars74k_fnt")
_CACHE_VERSION = 1


# ------------------------------------------------------------------------------ decoding


@dataclass(frozen=True, eq=False)
class ImageStore:
    """Decoded images of several classes, held in one array."""

    images: Tensor  # (N, C, S, S) uint8
    offsets: Tensor  # (classes + 1,) int64: class c is images[offsets[c]:offsets[c + 1]]
    classes: tuple[str, ...]

    @property
    def counts(self) -> Tensor:
        """Images per class ``(classes,)``."""
        return self.offsets[1:] - self.offsets[:-1]


def cache_dir() -> Path | None:
    """The decoded-image cache folder, or None when ``METANET_CACHE`` is ``off``."""
    env = os.environ.get("METANET_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "metanet"


def _decode(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as ``(channels, size, size)`` uint8, resized with area averaging when smaller."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")  # decodes the whole file
            if image.size != (size, size):
                shrink = image.size[0] >= size and image.size[1] >= size
                image = image.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's UnidentifiedImageError is an OSError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TaskError(f"{path}: not a readable image ({reason})") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _digest(files: Sequence[tuple[str, Sequence[Path]]], head: str, describe: Callable[[Path], list[bytes]]) -> str:
    """A blake2b digest of ``head``, the class names and ``describe(path)`` of every file."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{head}\n".encode())
    for name, paths in files:
        h.update(f"class {name} {len(paths)}\n".encode())
        for p in paths:
            try:
                parts = describe(p)
            except OSError as err:
                raise TaskError(f"{p}: cannot be read ({err.strerror or err})") from None
            for part in parts:
                h.update(part)
    return h.hexdigest()


def _cache_key(files: Sequence[tuple[str, Sequence[Path]]], size: int, channels: int) -> str:
    """A digest of the class names, file names and bytes, the image size and the channels."""

    def content(p: Path) -> list[bytes]:
        data = p.read_bytes()
        return [f"{p.name} {len(data)}\n".encode(), data]

    return _digest(files, f"metanet-images v{_CACHE_VERSION} {size} {channels}", content)


def _read_cache(path: Path, n_images: int, n_classes: int, size: int, channels: int) -> ImageStore | None:
    """The store saved at ``path``, or None when it is missing or not what the key promises."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            images, offsets, classes = data["images"], data["offsets"], data["classes"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        log.warning("ignoring unreadable image cache %s (%s)", path, err)
        return None
    if images.dtype != np.uint8 or images.shape != (n_images, channels, size, size) or offsets.shape != (n_classes + 1,) or classes.shape != (n_classes,):
        log.warning("ignoring image cache %s: its arrays do not match the data", path)
        return None
    return ImageStore(torch.from_numpy(images), torch.from_numpy(offsets.astype(np.int64)), tuple(str(c) for c in classes))


def _write_cache(path: Path, store: ImageStore) -> None:
    """Save ``store`` atomically: a temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=store.images.numpy(), offsets=store.offsets.numpy(), classes=np.array(store.classes, dtype=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_store(files: Sequence[tuple[str, Sequence[Path]]], size: int, channels: int, cache: bool = True) -> ImageStore:
    """Decode the images of each ``(class name, files)`` once, through the on-disk cache.

    Args:
        files: the classes in label order, each with its image files in order.
        size: the square side every image is resized to.
        channels: 1 (grayscale) or 3 (RGB).
        cache: read and write the cache (``cache_dir()``); False decodes every time.
    """
    n_images = sum(len(paths) for _, paths in files)
    folder = cache_dir() if cache else None
    path = None
    if folder is not None:
        # The content key costs a read of every file; the index maps the files' names,
        # sizes and modification times to it, so an unchanged dataset skips that read.
        quick = _stat_key(files, size, channels)
        known = _read_index(folder).get(quick)
        if known is not None:
            store = _read_cache(folder / f"images-{known}.npz", n_images, len(files), size, channels)
            if store is not None:
                return store
        key = _cache_key(files, size, channels)
        path = folder / f"images-{key}.npz"
        store = _read_cache(path, n_images, len(files), size, channels)
        if store is not None:
            _remember(folder, quick, key)
            return store
    images = np.empty((n_images, channels, size, size), dtype=np.uint8)
    i = 0
    for _, paths in files:
        for p in paths:
            images[i] = _decode(p, size, channels)
            i += 1
    offsets = np.cumsum([0] + [len(paths) for _, paths in files]).astype(np.int64)
    store = ImageStore(torch.from_numpy(images), torch.from_numpy(offsets), tuple(name for name, _ in files))
    if path is not None:
        try:
            _write_cache(path, store)
            _remember(path.parent, quick, key)
        except OSError as err:  # a read-only or full cache folder costs speed, not correctness
            log.warning("could not write the image cache %s (%s)", path, err)
    return store


_INDEX = "index.json"


def _stat_key(files: Sequence[tuple[str, Sequence[Path]]], size: int, channels: int) -> str:
    """A digest of the class names and the files' resolved paths, sizes and modification times."""

    def stat(p: Path) -> list[bytes]:
        st = p.stat()
        return [f"{p.resolve()} {st.st_size} {st.st_mtime_ns}\n".encode()]

    return _digest(files, f"metanet-images-stat v{_CACHE_VERSION} {size} {channels}", stat)


def _read_index(folder: Path) -> dict[str, str]:
    """The cache's ``{stat key: content key}`` index; empty when missing or unreadable."""
    try:
        index = json.loads((folder / _INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in index.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(index, dict) else {}


def _remember(folder: Path, quick: str, key: str) -> None:
    """Add ``quick -> key`` to the index, written atomically (a lost race loses an entry, nothing else)."""
    index = _read_index(folder)
    index[quick] = key
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / _INDEX)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ sampling


def _check_classes(store: ImageStore, ways: int, per_class: int, source: str, split: str) -> None:
    """Raise unless the store has ``ways`` classes and each has ``per_class`` images."""
    if len(store.classes) < ways:
        raise TaskError(f"{source}: split {split!r} has {len(store.classes)} classes, fewer than ways = {ways}")
    counts = store.counts
    small = (counts < per_class).nonzero().flatten()
    if len(small):
        c = int(small[0])
        raise TaskError(f"{source}: class {store.classes[c]!r} has {int(counts[c])} images, fewer than shots + queries = {per_class}")


def _sample_store(store: ImageStore, ways: int, shots: int, queries: int, batch: int, generator: torch.Generator | None) -> Episode:
    """``batch`` episodes: ``ways`` distinct random classes, ``shots + queries`` distinct images each."""
    per_class = shots + queries
    counts = store.counts  # (classes,)
    classes = torch.rand(batch, len(store.classes), generator=generator).topk(ways).indices  # (B, W)
    n = counts[classes]  # (B, W)
    longest = int(counts.max())
    noise = torch.rand(batch, ways, longest, generator=generator)  # (B, W, longest)
    noise = noise.masked_fill(torch.arange(longest) >= n[..., None], 2.0)  # images a class lacks sort last
    draws = noise.argsort(dim=2)[..., :per_class]  # (B, W, K + Q)
    x = store.images[store.offsets[classes][..., None] + draws]  # (B, W, K + Q, C, S, S) uint8
    x = x.float().div_(255.0)
    shape = x.shape[-3:]
    labels = torch.arange(ways)
    return Episode(
        x[:, :, :shots].reshape(batch, -1, *shape),
        labels.repeat_interleave(shots).repeat(batch, 1),  # (B, W * K)
        x[:, :, shots:].reshape(batch, -1, *shape),
        labels.repeat_interleave(queries).repeat(batch, 1),  # (B, W * Q)
    )


def _check_common(ways: int, shots: int, queries: int, image_size: int | None, channels: int | None) -> None:
    for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
        _check_positive(name, value)
    if image_size is not None:
        _check_positive("image_size", image_size)
    if channels is not None and channels not in (1, 3):
        raise TaskError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


# -------------------------------------------------------------------------- image folders


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _refuse_pickles(root: Path, accepted: str) -> None:
    """Raise when ``root`` is, or (being no valid layout) holds, a pickle file; else when it is no folder."""
    found = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if found and found[0].suffix.lower() in PICKLE_SUFFIXES:
        raise TaskError(f"{found[0]}: pickle caches are refused (unpickling a file can run arbitrary code); accepted layouts: {accepted}")
    if not root.is_dir():
        raise TaskError(f"{root} is not a folder; expected {accepted}")


def _folder(root: str | Path, what: str, accepted: str) -> Path:
    """``root`` as a Path, after checking that it is a folder (a pickle file is refused as such)."""
    root = Path(root)
    if not root.exists():
        raise TaskError(f"{what} {str(root)!r} does not exist")
    if not root.is_dir():
        _refuse_pickles(root, accepted)
    return root


def _read_split_file(path: Path, classes: Sequence[str], split: str) -> list[str]:
    """The classes a ``class,split`` CSV assigns to ``split`` (a header line ``class,split`` is allowed)."""
    if not path.is_file():
        raise TaskError(f"split file {str(path)!r} does not exist")
    known, chosen = set(classes), []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"split file {path}: cannot be read ({err})") from None
    for i, row in enumerate(csv.reader(lines), start=1):
        if not row or (i == 1 and [c.strip() for c in row] == ["class", "split"]):
            continue
        if len(row) != 2:
            raise TaskError(f"{path}:{i}: expected 'class,split', got {','.join(row)!r}")
        name, which = row[0].strip(), row[1].strip()
        if which not in MINI_SPLITS:
            raise _unknown(f"{path}:{i}: split", which, MINI_SPLITS)
        if name not in known:
            raise TaskError(f"{path}:{i}: class {name!r} is not a folder of the image root")
        if which == split:
            chosen.append(name)
    if split != "all" and not chosen:
        raise TaskError(f"split file {path}: no class is assigned to split {split!r}")
    return sorted(chosen) if split != "all" else list(classes)


def _split_by_fraction(classes: Sequence[str], split: str, fractions: tuple[float, float, float], seed: int) -> list[str]:
    """A seeded, class-level split: the sorted classes permuted, then cut by ``fractions``."""
    if split == "all":
        return list(classes)
    if len(fractions) != 3 or any(not (f >= 0) for f in fractions) or not sum(fractions) > 0:
        raise TaskError(f"fractions must be three numbers >= 0 (train, val, test) with a positive sum, got {fractions!r}")
    n = len(classes)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    total = sum(fractions)
    n_train = round(n * fractions[0] / total)
    n_val = round(n * fractions[1] / total)
    cut = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}[split]
    chosen = sorted(classes[i] for i in order[cut[0] : cut[1]])
    if not chosen:
        raise TaskError(f"split {split!r} gets no class: {n} classes cut by fractions {fractions}")
    return chosen


def _first_image_shape(path: Path) -> tuple[int, int, int]:
    """``(channels, height, width)`` of an image, read from its header."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return (1 if image.mode in ("1", "L", "I", "I;16", "F") else 3, image.size[1], image.size[0])
    except (OSError, SyntaxError, ValueError) as err:
        raise TaskError(f"{path}: not a readable image ({str(err).splitlines()[0]})") from None


class _StoreEpisodes:
    """Episodes sampled from an ``ImageStore`` (shared by the image distributions)."""

    store: ImageStore
    ways: int
    shots: int
    queries: int
    kind: ClassVar[str] = "classification"
    n_families: ClassVar[int] = 0
    # what a training config takes unless told otherwise (config.TrainConfig.for_tasks)
    train_defaults: ClassVar[dict[str, object]] = {"queries": 15, "shots": 1, "inner_lr": 0.4, "meta_batch": 16, "space": "conv_omniglot"}


    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(channels, image_size, image_size)``."""
        return tuple(self.store.images.shape[1:])

    @property
    def n_outputs(self) -> int:
        """Number of classes per task (ways)."""
        return self.ways

    @property
    def n_classes(self) -> int:
        """Number of classes in the split."""
        return len(self.store.classes)

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Episode:
        """Sample ``batch`` episodes; examples grouped by label, labels a random order of classes."""
        return _sample_store(self.store, self.ways, self.shots, self.queries, batch, generator)


@dataclass(frozen=True, eq=False)
class ImageFolder(_StoreEpisodes):
    """N-way K-shot episodes over ``<root>/<class>/<image>``.

    Args:
        root: the folder of class folders.
        split: ``train``, ``val``, ``test`` (a class-level split) or ``all`` (every class).
        image_size: square side of the episodes' images; None: the first image's side.
        channels: 1 or 3; None: the first image's (grayscale gives 1, anything else 3).
        split_file: CSV of ``class,split`` lines; None: split by ``fractions`` with ``split_seed``.
        cache: use the on-disk decoded-image cache.
    """

    root: str | Path
    split: str = "all"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    image_size: int | None = None
    channels: int | None = None
    split_file: str | Path | None = None
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    split_seed: int = 0
    cache: bool = True
    store: ImageStore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_common(self.ways, self.shots, self.queries, self.image_size, self.channels)
        if self.split not in IMAGE_SPLITS:
            raise _unknown("split", self.split, IMAGE_SPLITS)
        accepted = "<root>/<class>/<image> with png, jpg, jpeg, ppm, pgm or bmp files"
        root = _folder(self.root, "image folder", accepted)
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            _refuse_pickles(root, accepted)
            raise TaskError(f"{root} holds no class folders; expected {accepted}")
        files = {p.name: _image_files(p) for p in folders}
        empty = [name for name, paths in files.items() if not paths]
        if len(empty) == len(files):
            raise TaskError(f"{root}: no class folder holds an image file ({', '.join(IMAGE_EXTENSIONS)})")
        if empty:
            raise TaskError(f"{root / empty[0]}: holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
        names = list(files)
        if self.split_file is not None:
            chosen = _read_split_file(Path(self.split_file), names, self.split)
        else:
            chosen = _split_by_fraction(names, self.split, tuple(self.fractions), self.split_seed)
        c0, h0, w0 = _first_image_shape(files[chosen[0]][0])
        size = self.image_size
        if size is None:
            if h0 != w0:
                raise TaskError(f"{files[chosen[0]][0]}: images are {w0}x{h0}, not square; give image_size to resize them")
            size = h0
        channels = self.channels or c0
        store = load_store([(name, files[name]) for name in chosen], size, channels, self.cache)
        _check_classes(store, self.ways, self.shots + self.queries, str(root), self.split)
        object.__setattr__(self, "store", store)


# --------------------------------------------------------------------------- mini-ImageNet


def _ravi_files(root: Path, csv_path: Path) -> list[tuple[str, list[Path]]]:
    """``(wnid, files)`` per class from a Ravi split file ``filename,label``, classes in first-seen order."""
    images = root / "images"
    if not images.is_dir():
        raise TaskError(f"{csv_path}: the Ravi layout needs the folder {images} beside it")
    by_class: dict[str, list[Path]] = {}
    try:
        lines = csv_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"{csv_path}: cannot be read ({err})") from None
    for i, row in enumerate(csv.reader(lines), start=1):
        if i == 1 and [c.strip() for c in row] == ["filename", "label"]:
            continue
        if not row:
            continue
        if len(row) != 2:
            raise TaskError(f"{csv_path}:{i}: expected 'filename,label', got {','.join(row)!r}")
        name, label = row[0].strip(), row[1].strip()
        path = images / name
        if not path.is_file():
            raise TaskError(f"{csv_path}:{i}: names {name!r}, which is not in {images}")
        by_class.setdefault(label, []).append(path)
    if not by_class:
        raise TaskError(f"{csv_path}: lists no images")
    return list(by_class.items())


def _class_folder_files(folder: Path) -> list[tuple[str, list[Path]]]:
    """``(wnid, files)`` per class folder of ``<split>/<wnid>/*``, in sorted order."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise TaskError(f"{folder} holds no class folders (<wnid>/*.jpg)")
    out = []
    for c in classes:
        paths = _image_files(c)
        if not paths:
            raise TaskError(f"{c}: holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
        out.append((c.name, paths))
    return out


@dataclass(frozen=True, eq=False)
class MiniImageNet(_StoreEpisodes):
    """N-way K-shot episodes over mini-ImageNet (Ravi & Larochelle's split).

    ``root`` holds ``images/`` and ``<split>.csv`` (the Ravi layout) or ``<split>/<wnid>/``
    class folders; ``split`` is ``train``, ``val`` or ``test``. Images are resized to
    ``image_size`` (84, their own size, by default) and converted to ``channels``.
    """

    root: str | Path
    split: str = "train"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    image_size: int = 84
    channels: int = 3
    cache: bool = True
    store: ImageStore = field(init=False, repr=False)
    train_defaults: ClassVar[dict[str, object]] = {"queries": 15, "shots": 1, "inner_lr": 0.1, "meta_batch": 4, "space": "conv_miniimagenet"}

    def __post_init__(self) -> None:
        _check_common(self.ways, self.shots, self.queries, self.image_size, self.channels)
        if self.split not in MINI_SPLITS:
            raise _unknown("split", self.split, MINI_SPLITS)
        accepted = "images/ + train.csv, val.csv, test.csv (Ravi) or <split>/<wnid>/*.jpg class folders"
        root = _folder(self.root, "mini-ImageNet root", accepted)
        csv_path, folder = root / f"{self.split}.csv", root / self.split
        if csv_path.is_file():
            files = _ravi_files(root, csv_path)
        elif folder.is_dir():
            files = _class_folder_files(folder)
        else:
            _refuse_pickles(root, accepted)
            raise TaskError(f"no mini-ImageNet split {self.split!r} in {root}: expected {csv_path.name} + images/ or {folder.name}/<wnid>/*.jpg")
        store = load_store(files, self.image_size, self.channels, self.cache)
        _check_classes(store, self.ways, self.shots + self.queries, str(root), self.split)
        object.__setattr__(self, "store", store)


# ---------------------------------------------------------------------------- multi-domain


INVERT = ":invert"  # a domain entry's suffix: its intensities are flipped, x -> 1 - x


def strip_invert(entry: str) -> tuple[str, bool]:
    """``(entry without the suffix, whether it asked for inverted intensities)``."""
    entry = entry.strip()
    return (entry[: -len(INVERT)], True) if entry.endswith(INVERT) else (entry, False)


def domain_name(entry: str) -> str:
    """The name of a domain entry: ``NAME`` of ``NAME=FOLDER``, else the entry's last path part."""
    name, sep, _ = strip_invert(entry)[0].partition("=")
    return name.strip() if sep else Path(name.strip()).name


def domain_folder(entry: str, data_root: Path | None) -> Path:
    """The folder a domain entry names: ``FOLDER`` of ``NAME=FOLDER``, else ``NAME`` under ``data_root``."""
    name, sep, where = strip_invert(entry)[0].partition("=")
    if sep:
        return Path(where.strip())
    name = name.strip()
    return data_root / name if data_root is not None and not Path(name).is_absolute() else Path(name)


def _parse_domain(entry: str, data_root: Path | None) -> tuple[str, str, Path, bool]:
    """``(name, kind, folder, invert)`` of a domain entry: ``omniglot``, ``miniimagenet``, ``NAME``
    or ``NAME=FOLDER``, each optionally followed by ``:invert``."""
    bare, invert = strip_invert(entry)
    suffix = bare.rpartition(":")[2].strip()
    if ":" in bare and suffix != bare.strip() and difflib.get_close_matches(suffix, [INVERT[1:]], n=1, cutoff=0.6):
        raise TaskError(f"domain {entry!r}: unknown suffix ':{suffix}' (did you mean '{INVERT}'?)")
    if not bare.partition("=")[0].strip():
        raise TaskError(f"domain {entry!r} has no name; expected omniglot, miniimagenet, FOLDER or NAME=FOLDER (optionally followed by {INVERT})")
    name = domain_name(bare)
    kind = name if name in ("omniglot", "miniimagenet") else "images"
    return name, kind, domain_folder(bare, data_root), invert


def _domain_split(kind: str, split: str) -> str:
    """A multi-domain split as the domain's own split name (Omniglot's test set is ``evaluation``)."""
    if kind == "omniglot":
        return {"test": "evaluation", "all": "background"}.get(split, split)
    if kind == "miniimagenet" and split == "all":
        raise TaskError("split 'all' does not apply to mini-ImageNet (its splits are train, val, test)")
    return split


@dataclass(frozen=True, eq=False)
class MultiDomain:
    """Episodes from several image domains: each task from one domain, all in one input shape.

    Args:
        domains: domain entries: ``omniglot``, ``miniimagenet`` (their folders under
            ``data_root``), an image folder's name under ``data_root``, a folder path, or
            ``NAME=FOLDER``; an entry ending in ``:invert`` has its intensities flipped
            (``x -> 1 - x``), so that a folder of dark glyphs on a light background matches
            Omniglot's strokes, which are 1 on a background of 0.
        data_root: where named domains live (``../shared/data`` layout).
        split: ``train``, ``val``, ``test`` or ``all``, applied to every domain (Omniglot:
            its alphabet split; ``test`` is its evaluation file).
        image_size, channels: the common input shape ``(channels, image_size, image_size)``.
        weights: sampling weight per domain (default: equal).
        family_names: the domain names whose position is the metadata id (default: the
            domains); a domain outside it gets id -1 (unknown), as a left-out domain does.
        with_metadata: attach the domain id to each task.
    """

    domains: tuple[str, ...] = DEFAULT_DOMAINS
    data_root: str | Path | None = None
    split: str = "train"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    image_size: int = 28
    channels: int = 3
    weights: tuple[float, ...] | None = None
    family_names: tuple[str, ...] | None = None
    with_metadata: bool = True
    cache: bool = True
    names: tuple[str, ...] = field(init=False)
    parts: tuple[Any, ...] = field(init=False, repr=False)
    inverted: tuple[bool, ...] = field(init=False, repr=False)

    kind: ClassVar[str] = "classification"
    train_defaults: ClassVar[dict[str, object]] = {"queries": 15, "shots": 1, "inner_lr": 0.1, "meta_batch": 12, "space": "conv_multidomain"}

    def __post_init__(self) -> None:
        _check_common(self.ways, self.shots, self.queries, self.image_size, self.channels)
        if self.split not in IMAGE_SPLITS:
            raise _unknown("split", self.split, IMAGE_SPLITS)
        domains = (self.domains,) if isinstance(self.domains, str) else tuple(self.domains)
        if not domains:
            raise TaskError("domains must name at least one domain")
        root = None if self.data_root is None else Path(self.data_root)
        parsed = [_parse_domain(d, root) for d in domains]
        names = tuple(name for name, _, _, _ in parsed)
        if len(set(names)) != len(names):
            raise TaskError(f"domains name {sorted(n for n in names if names.count(n) > 1)[0]!r} twice")
        weights = (1.0,) * len(names) if self.weights is None else tuple(float(w) for w in self.weights)
        if len(weights) != len(names) or any(not (w >= 0) for w in weights) or not sum(weights) > 0:
            raise TaskError(f"weights (--domain-weights) must be {len(names)} numbers >= 0 (one per domain) with a positive sum, got {self.weights!r}")
        parts = []
        common = dict(ways=self.ways, shots=self.shots, queries=self.queries, image_size=self.image_size)
        for name, kind, folder, _ in parsed:
            split = _domain_split(kind, self.split)
            try:
                if kind == "omniglot":
                    parts.append(Omniglot(folder, split=split, **common))
                elif kind == "miniimagenet":
                    parts.append(MiniImageNet(folder, split=split, channels=self.channels, cache=self.cache, **common))
                else:
                    parts.append(ImageFolder(folder, split=split, channels=self.channels, cache=self.cache, **common))
            except TaskError as err:
                raise TaskError(f"domain {name!r}: {err}") from None
        object.__setattr__(self, "domains", domains)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "parts", tuple(parts))
        object.__setattr__(self, "inverted", tuple(invert for _, _, _, invert in parsed))
        object.__setattr__(self, "family_names", names if self.family_names is None else tuple(self.family_names))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(channels, image_size, image_size)``."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def n_outputs(self) -> int:
        """Number of classes per task (ways)."""
        return self.ways

    @property
    def families(self) -> tuple[str, ...]:
        """The domain name of each metadata id."""
        return self.family_names

    @property
    def n_families(self) -> int:
        """Metadata ids: one per name of ``family_names``, 0 without metadata."""
        return len(self.family_names) if self.with_metadata else 0

    def _channels(self, x: Tensor, domain: int) -> Tensor:
        """Domain ``domain``'s images in the common channels, inverted where its entry asked."""
        if self.inverted[domain]:
            x = 1.0 - x
        if x.shape[-3] == self.channels:
            return x
        if self.channels == 3:  # grayscale domain in an RGB input
            return x.expand(*x.shape[:-3], 3, *x.shape[-2:])
        return x.mean(-3, keepdim=True)

    def sample(self, batch: int, generator: torch.Generator | None = None) -> Episode:
        """Sample ``batch`` tasks, each from a domain drawn by ``weights``; metadata: the domain id."""
        domain = torch.multinomial(torch.tensor(self.weights), batch, replacement=True, generator=generator)  # (B,)
        sx = sy = qx = qy = None
        for d, part in enumerate(self.parts):
            where = (domain == d).nonzero().flatten()
            if not len(where):
                continue
            ep = part.sample(len(where), generator)
            if sx is None:
                shape = (batch, ep.support_x.shape[1], *self.input_shape)
                sx, qx = torch.empty(shape), torch.empty(batch, ep.query_x.shape[1], *self.input_shape)
                sy, qy = torch.empty(batch, ep.support_y.shape[1], dtype=torch.long), torch.empty(batch, ep.query_y.shape[1], dtype=torch.long)
            sx[where], qx[where] = self._channels(ep.support_x, d), self._channels(ep.query_x, d)
            sy[where], qy[where] = ep.support_y, ep.query_y
        ids = torch.tensor([self.family_names.index(n) if n in self.family_names else -1 for n in self.names])
        metadata = ids[domain] if self.with_metadata else None
        assert sx is not None and sy is not None and qx is not None and qy is not None
        return Episode(sx, sy, qx, qy, metadata)
