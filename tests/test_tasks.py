"""Tests for metanet.tasks: the episode protocol, regression families and Omniglot."""

from __future__ import annotations

import ast
import json
import math
import sys
import zipfile
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import metanet.tasks as tasks
from metanet.tasks import (
    DEFAULT_VAL_ALPHABETS,
    FAMILY_NAMES,
    TASKS,
    Episode,
    Multimodal,
    Omniglot,
    Sinusoid,
    TaskDistribution,
    TaskError,
    default_data_root,
    fixed_episodes,
    make_tasks,
    register_tasks,
)

REAL_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
REAL_NPZ = REAL_ROOT / "images_background.npz"
needs_real = pytest.mark.skipif(not REAL_NPZ.is_file(), reason="real Omniglot npz absent")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def raises(fn, *fragments: str) -> str:
    """Assert ``fn()`` raises a one-line TaskError containing every fragment."""
    with pytest.raises(TaskError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_same(a: Episode, b: Episode) -> None:
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.metadata is None) == (b.metadata is None)
    if a.metadata is not None:
        assert torch.equal(a.metadata, b.metadata)


# ----------------------------------------------------------------------------- synthetic Omniglot

ALPHABETS = ("Alpha", "Beta")
PER_ALPHABET = 3
N_CHARS = len(ALPHABETS) * PER_ALPHABET


def synthetic_drawings(seed: int) -> np.ndarray:
    """(6, 20, 105, 105) bool, True = background: a stroke pattern per character, jittered."""
    rng = np.random.default_rng(seed)
    pattern = rng.random((N_CHARS, 1, 105, 105)) < 0.15
    jitter = rng.random((N_CHARS, 20, 105, 105)) < 0.01
    return ~(pattern ^ jitter)


def write_npz(root: Path, split: str, images: np.ndarray) -> None:
    np.savez_compressed(root / f"images_{split}.npz", images=images)
    entries = [
        {"alphabet": a, "first_id": 1 + i * PER_ALPHABET, "last_id": (i + 1) * PER_ALPHABET}
        for i, a in enumerate(ALPHABETS)
    ]
    (root / f"alphabets_{split}.json").write_text(json.dumps({split: entries}))


def write_pngs(root: Path, split: str, images: np.ndarray) -> None:
    from PIL import Image

    for c, drawings in enumerate(images):
        folder = root / f"images_{split}" / ALPHABETS[c // PER_ALPHABET] / f"character{c + 1:02d}"
        folder.mkdir(parents=True)
        for d, drawing in enumerate(drawings):
            Image.fromarray(drawing).save(folder / f"{c + 1:04d}_{d + 1:02d}.png")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> SimpleNamespace:
    """The same drawings as an npz root and as a PNG-folder root, both splits."""
    npz_root, png_root = tmp_path_factory.mktemp("npz"), tmp_path_factory.mktemp("png")
    images = {"background": synthetic_drawings(0), "evaluation": synthetic_drawings(1)}
    for split, drawings in images.items():
        write_npz(npz_root, split, drawings)
        write_pngs(png_root, split, drawings)
    return SimpleNamespace(npz_root=npz_root, png_root=png_root, images=images)


def small(root: Path, **kwargs) -> Omniglot:
    """A synthetic Omniglot at 21x21 (105 / 5, so area resizing is a plain 5x5 mean)."""
    kwargs = {"image_size": 21, "val_alphabets": ("Beta",), **kwargs}
    return Omniglot(root, **kwargs)


def block_mean(images: np.ndarray, factor: int = 5) -> torch.Tensor:
    """Reference preprocessing: strokes as 1.0, averaged over factor x factor blocks."""
    n, d, h, w = images.shape
    strokes = (~images).reshape(n, d, h // factor, factor, w // factor, factor).mean(axis=(3, 5))
    return torch.from_numpy(strokes).float().unsqueeze(2)  # (N, D, 1, S, S)


def identify(dist: Omniglot, x: torch.Tensor) -> torch.Tensor:
    """Find each image among all turned drawings: (N, 1, S, S) -> (N, 3) [turn, char, drawing]."""
    turned = torch.stack([dist.images.float().rot90(k, dims=(-2, -1)) for k in range(4)])
    table = turned.flatten(0, 2).flatten(1)  # (4 * C * D, S * S)
    assert len(torch.unique(table, dim=0)) == len(table), "synthetic drawings must be distinct"
    match = (x.flatten(1)[:, None] == table[None]).all(-1)  # (N, 4 * C * D)
    assert (match.sum(1) == 1).all()
    index = match.int().argmax(1)
    n_chars, n_drawings = dist.images.shape[:2]
    return torch.stack(
        [index // (n_chars * n_drawings), index // n_drawings % n_chars, index % n_drawings], 1
    )


# ----------------------------------------------------------------------------- protocol, registry


def registry_kwargs(name: str, synthetic: SimpleNamespace) -> dict:
    characters = synthetic.png_root / "images_background" / ALPHABETS[0]  # <class>/<image> folders
    mini = synthetic.png_root / "mini"
    if not mini.exists():  # mini-ImageNet's class-folder layout: <split>/<wnid>/<image>
        mini.mkdir()
        (mini / "train").symlink_to(characters, target_is_directory=True)
    return {
        "omniglot": {"root": synthetic.npz_root, "image_size": 21},
        "images": {"root": characters, "ways": 2, "image_size": 21},
        "miniimagenet": {"root": mini, "ways": 2, "image_size": 21},
        "multidomain": {"domains": (f"omniglot={synthetic.npz_root}", f"chars={characters}"), "split": "all", "ways": 2, "image_size": 21},
    }.get(name, {})


@pytest.mark.parametrize("name", sorted(TASKS))
def test_registered_distributions_follow_the_protocol(name, synthetic):
    dist = make_tasks(name, **registry_kwargs(name, synthetic))
    assert isinstance(dist, TaskDistribution)
    episode = dist.sample(3, gen())
    assert episode.batch_size == 3
    for x in (episode.support_x, episode.query_x):
        assert x.dtype == torch.float32 and x.shape[0] == 3
        assert x.shape[2:] == dist.input_shape
    for x, y in ((episode.support_x, episode.support_y), (episode.query_x, episode.query_y)):
        if dist.kind == "classification":
            assert y.dtype == torch.int64 and y.shape == x.shape[:2]
            assert 0 <= y.min() and y.max() == dist.n_outputs - 1
        else:
            assert dist.kind == "regression"
            assert y.dtype == torch.float32 and y.shape == (*x.shape[:2], dist.n_outputs)
    if dist.n_families == 0:
        assert episode.metadata is None
    else:
        assert episode.metadata.dtype == torch.int64 and episode.metadata.shape == (3,)
        assert 0 <= episode.metadata.min() and episode.metadata.max() < dist.n_families


@pytest.mark.parametrize("name", sorted(TASKS))
def test_sampling_is_deterministic_under_a_generator(name, synthetic):
    dist = make_tasks(name, **registry_kwargs(name, synthetic))
    assert_same(dist.sample(4, gen(7)), dist.sample(4, gen(7)))
    assert not torch.equal(dist.sample(4, gen(7)).query_x, dist.sample(4, gen(8)).query_x)
    torch.manual_seed(3)
    first = dist.sample(4)
    torch.manual_seed(3)
    assert_same(first, dist.sample(4))


def test_make_tasks_passes_kwargs_and_rejects_unknown_names():
    assert make_tasks("sinusoid", shots=7).sample(2, gen()).support_x.shape == (2, 7, 1)
    message = raises(lambda: make_tasks("omniglott"), "'omniglott'", "did you mean 'omniglot'")
    for name in TASKS:
        assert repr(name) in message


def test_register_tasks_adds_a_name_and_refuses_duplicates(monkeypatch):
    monkeypatch.setattr(tasks, "TASKS", dict(TASKS))

    @register_tasks("sinusoid_wide")
    def wide(**kwargs) -> Sinusoid:
        return Sinusoid(x_range=(-10.0, 10.0), **kwargs)

    assert make_tasks("sinusoid_wide").sample(1, gen()).support_x.abs().max() > 5
    raises(lambda: register_tasks("sinusoid")(Sinusoid), "'sinusoid'", "already registered")


def test_episode_task_to_and_batch_size():
    episode = Multimodal().sample(4, gen())
    one = episode.task(2)
    assert one.batch_size == 1 and episode.batch_size == 4
    assert torch.equal(one.support_x[0], episode.support_x[2])
    assert torch.equal(one.query_y[0], episode.query_y[2])
    assert torch.equal(one.metadata, episode.metadata[2:3])
    assert torch.equal(episode.task(-1).query_x, episode.query_x[3:])
    moved = episode.to("meta")
    assert moved.support_x.device.type == "meta" and moved.metadata.device.type == "meta"
    assert Sinusoid().sample(2, gen()).task(0).metadata is None


def test_fixed_episodes_are_reproducible_and_hold_n_tasks():
    dist = Sinusoid()
    torch.manual_seed(1)
    first = fixed_episodes(dist, n_tasks=10, batch=4, seed=5)
    torch.manual_seed(2)  # the global RNG plays no part
    second = fixed_episodes(dist, n_tasks=10, batch=4, seed=5)
    assert [e.batch_size for e in first] == [4, 4, 2]
    for a, b in zip(first, second):
        assert_same(a, b)
    other = fixed_episodes(dist, n_tasks=10, batch=4, seed=6)
    assert not torch.equal(first[0].support_y, other[0].support_y)
    raises(lambda: fixed_episodes(dist, n_tasks=0, batch=4, seed=0), "n_tasks", "positive int", "0")
    raises(lambda: fixed_episodes(dist, n_tasks=4, batch=2.5, seed=0), "batch", "positive int")


def test_tasks_modules_import_only_torch_numpy_and_the_stdlib():
    """metanet.tasks sits at the bottom of the import order; PIL is imported lazily."""
    allowed = {"torch", "numpy", "__future__"} | set(sys.stdlib_module_names)
    for path in sorted(Path(tasks.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{path.name} imports from outside metanet.tasks"
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root == "PIL":
                    assert node not in tree.body, f"{path.name} imports PIL at module level"
                else:
                    assert root in allowed, f"{path.name} imports {name}"


# ----------------------------------------------------------------------------- regression


def fit(basis: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched least squares: (..., N, P), (..., N) -> coefficients, max |residual|."""
    coef = torch.linalg.lstsq(basis, y.unsqueeze(-1)).solution  # (..., P, 1)
    residual = (basis @ coef).squeeze(-1) - y
    return coef.squeeze(-1), residual.abs().amax(-1)


def sinusoid_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Fit y = A sin(x - phase) = A cos(phase) sin(x) - A sin(phase) cos(x) per task."""
    coef, residual = fit(torch.stack([x.sin(), x.cos()], -1), y)
    amplitude = coef.norm(dim=-1)
    phase = torch.atan2(-coef[..., 1], coef[..., 0])
    return amplitude, phase, residual


def points(episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """All support and query points per task as float64: (B, N), (B, N)."""
    x = torch.cat([episode.support_x, episode.query_x], 1)[..., 0].double()
    y = torch.cat([episode.support_y, episode.query_y], 1)[..., 0].double()
    return x, y


def test_sinusoid_matches_maml_distribution():
    episode = Sinusoid(shots=5, queries=10).sample(400, gen())
    assert episode.support_x.shape == (400, 5, 1) and episode.query_y.shape == (400, 10, 1)
    x, y = points(episode)
    assert x.min() >= -5 and x.max() <= 5 and x.min() < -4.9 and x.max() > 4.9
    assert y.abs().max() <= 5
    amplitude, phase, residual = sinusoid_fit(x, y)
    assert residual.max() < 1e-4
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4
    # uniform draws cover their ranges
    assert amplitude.min() < 0.3 and amplitude.max() > 4.8
    assert phase.min() < 0.1 and phase.max() > math.pi - 0.1


def test_sinusoid_custom_ranges():
    dist = Sinusoid(shots=3, queries=4, amplitude=(2, 3), phase=(0.5, 1.0), x_range=(0, 1))
    x, y = points(dist.sample(100, gen()))
    assert x.min() >= 0 and x.max() <= 1
    amplitude, phase, residual = sinusoid_fit(x, y)
    assert residual.max() < 1e-4
    assert amplitude.min() > 2 - 1e-3 and amplitude.max() < 3 + 1e-3
    assert phase.min() > 0.5 - 1e-3 and phase.max() < 1.0 + 1e-3


def family_fit(name: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Best fit of one task to a family: (max |residual|, |leading coefficient|)."""
    if name == "sinusoid":
        amplitude, _, residual = sinusoid_fit(x, y)
        return residual.item(), amplitude.item()
    if name in ("linear", "quadratic"):
        powers = (1, 0) if name == "linear" else (2, 1, 0)
        coef, residual = fit(torch.stack([x**p for p in powers], -1), y)
        return residual.item(), coef[0].abs().item()
    # l1 and tanh are linear in (a, b) once the centre c is fixed: search c on a fine grid
    shape = torch.abs if name == "l1" else torch.tanh
    centres = torch.linspace(-3, 3, 6001, dtype=x.dtype)[:, None]  # (G, 1)
    feature = shape(x - centres)  # (G, N)
    coef, residual = fit(torch.stack([feature, torch.ones_like(feature)], -1), y.expand_as(feature))
    best = residual.argmin()
    return residual[best].item(), coef[best, 0].abs().item()


def test_multimodal_metadata_names_the_family_of_each_task():
    dist = Multimodal(shots=5, queries=10)
    assert dist.families == FAMILY_NAMES and dist.n_families == 5
    episode = dist.sample(60, gen())
    x, y = points(episode)
    largest = {"sinusoid": 5, "linear": 3, "quadratic": 0.15, "l1": 1, "tanh": 3}
    for b, family in enumerate(episode.metadata.tolist()):
        name = FAMILY_NAMES[family]
        residual, coefficient = family_fit(name, x[b], y[b])
        assert residual < 0.02, (b, name, residual)
        assert coefficient <= largest[name] + 0.01, (b, name, coefficient)
    assert set(episode.metadata.tolist()) == set(range(5))


def test_multimodal_linear_tasks_have_zero_second_differences():
    episode = Multimodal(families=("sinusoid", "linear")).sample(50, gen())
    x, y = points(episode)
    order = x.argsort(-1)
    x, y = x.gather(-1, order), y.gather(-1, order)
    slopes = y.diff(dim=-1) / x.diff(dim=-1)  # (B, N - 1)
    curvature = slopes.diff(dim=-1).abs().amax(-1)  # (B,)
    linear = episode.metadata == 1
    assert 0 < linear.sum() < 50
    assert curvature[linear].max() < 1e-3
    assert curvature[~linear].min() > 1e-3


def test_multimodal_families_are_drawn_uniformly():
    metadata = Multimodal(shots=1, queries=1).sample(5000, gen()).metadata
    counts = torch.bincount(metadata, minlength=5)
    assert (counts - 1000).abs().max() < 150


def test_multimodal_without_metadata_samples_the_same_tasks():
    with_meta = Multimodal().sample(8, gen(4))
    without = Multimodal(with_metadata=False)
    assert without.n_families == 0
    episode = without.sample(8, gen(4))
    assert episode.metadata is None
    assert torch.equal(episode.query_y, with_meta.query_y)


def test_multimodal_noise_has_the_requested_scale():
    dist = Multimodal(shots=10, queries=10, families=("linear",), noise_std=0.5)
    x, y = points(dist.sample(400, gen()))
    basis = torch.stack([x, torch.ones_like(x)], -1)
    coef = torch.linalg.lstsq(basis, y.unsqueeze(-1)).solution
    residual = (basis @ coef).squeeze(-1) - y  # 20 points, 2 parameters: 18 degrees of freedom
    std = residual.pow(2).sum(-1).div(18).mean().sqrt()
    assert 0.45 < std < 0.55


def test_regression_bad_inputs():
    raises(lambda: Sinusoid(shots=0), "shots must be a positive int", "0")
    raises(lambda: Sinusoid(queries=True), "queries must be a positive int")
    raises(lambda: Sinusoid(amplitude=(5, 1)), "amplitude", "low <= high", "(5, 1)")
    raises(lambda: Sinusoid(phase="pi"), "phase", "(low, high) pair")
    raises(
        lambda: Multimodal(families=("linear", "sinusiod")),
        "family 'sinusiod'",
        "did you mean 'sinusoid'",
        "'tanh'",
    )
    raises(lambda: Multimodal(families=()), "families must name at least one", "linear")
    raises(lambda: Multimodal(families=("l1", "l1")), "families must not repeat", "'l1'")
    raises(lambda: Multimodal(noise_std=-0.1), "noise_std", ">= 0", "-0.1")


# ----------------------------------------------------------------------------- Omniglot, synthetic


def test_omniglot_preprocessing_matches_a_reference(synthetic):
    dist = small(synthetic.npz_root)
    assert dist.images.shape == (N_CHARS, 20, 1, 21, 21) and dist.images.dtype == torch.float16
    expected = block_mean(synthetic.images["background"])
    torch.testing.assert_close(dist.images.float(), expected, atol=1e-3, rtol=0)
    assert dist.character_alphabets == ("Alpha",) * 3 + ("Beta",) * 3
    assert dist.input_shape == (1, 21, 21) and dist.n_outputs == 5 and dist.kind == "classification"


@pytest.mark.parametrize("split", ["background", "evaluation"])
def test_omniglot_npz_and_png_layouts_load_identically(synthetic, split):
    from_npz = small(synthetic.npz_root, split=split)
    from_png = small(synthetic.png_root, split=split)
    assert torch.equal(from_npz.images, from_png.images)
    assert from_npz.character_alphabets == from_png.character_alphabets
    assert_same(from_npz.sample(4, gen()), from_png.sample(4, gen()))
    expected = block_mean(synthetic.images[split])
    torch.testing.assert_close(from_npz.images.float(), expected, atol=1e-3, rtol=0)


def test_omniglot_resizing_is_antialiased(tmp_path):
    stripes = np.ones((2, 20, 105, 105), bool)
    stripes[..., ::2] = False  # one-pixel strokes in every other column
    np.savez(tmp_path / "images_background.npz", images=stripes)
    dist = Omniglot(tmp_path, ways=2, image_size=28)
    assert dist.images.shape == (2, 20, 1, 28, 28)
    # averaging over 3.75-pixel cells turns the stripes grey; sampling pixels would not
    assert dist.images.min() >= 0.39 and dist.images.max() <= 0.61


def test_omniglot_episode_labels_are_consistent(synthetic):
    dist = small(synthetic.npz_root, ways=4, shots=2, queries=3)
    episode = dist.sample(6, gen())
    assert episode.support_x.shape == (6, 8, 1, 21, 21)
    assert episode.query_x.shape == (6, 12, 1, 21, 21)
    assert episode.support_y.shape == (6, 8) and episode.support_y.dtype == torch.int64
    for b in range(6):
        x = torch.cat([episode.support_x[b], episode.query_x[b]])
        y = torch.cat([episode.support_y[b], episode.query_y[b]])
        found = identify(dist, x)  # (N, 3) [turn, character, drawing]
        classes = {}
        for label in range(4):
            rows = found[y == label]
            assert len(rows) == 5 and (y[:8] == label).sum() == 2
            assert (rows[:, :2] == rows[0, :2]).all(), "one label, one (character, turn) class"
            assert len(set(rows[:, 2].tolist())) == 5, "drawings of a class are distinct"
            classes[label] = tuple(rows[0, :2].tolist())
        assert len(set(classes.values())) == 4, "labels name distinct classes"


def test_omniglot_rotations_quadruple_the_classes(synthetic):
    turning, upright = small(synthetic.npz_root), small(synthetic.npz_root, rotations=False)
    assert turning.n_classes == 4 * upright.n_classes == 4 * N_CHARS
    turns_seen = {}
    for dist in (turning, upright):
        found = identify(dist, dist.sample(16, gen()).support_x.flatten(0, 1))
        turns_seen[dist.rotations] = set(found[:, 0].tolist())
    assert turns_seen == {True: {0, 1, 2, 3}, False: {0}}
    # more ways than characters needs the turned classes
    assert small(synthetic.npz_root, ways=N_CHARS + 1).sample(2, gen()).support_y.max() == N_CHARS
    raises(
        lambda: small(synthetic.npz_root, ways=N_CHARS + 1, rotations=False),
        f"ways = {N_CHARS + 1}",
        f"{N_CHARS} classes",
    )


@pytest.mark.parametrize("layout", ["npz_root", "png_root"])
def test_omniglot_train_and_val_split_background_by_alphabet(synthetic, layout):
    root = getattr(synthetic, layout)
    background = small(root)
    train, val = small(root, split="train"), small(root, split="val")
    assert set(train.character_alphabets) == {"Alpha"} and set(val.character_alphabets) == {"Beta"}
    assert torch.equal(torch.cat([train.images, val.images]), background.images)


def test_omniglot_bad_inputs(synthetic, tmp_path):
    root = synthetic.npz_root
    raises(lambda: Omniglot(tmp_path / "missing"), "root", "missing", "does not exist")
    message = raises(lambda: Omniglot(tmp_path), "no Omniglot 'background' data", str(tmp_path))
    assert "images_background.npz" in message
    assert "images_background/<alphabet>/<character>/*.png" in message
    raises(
        lambda: small(root, split="backgrund"),
        "split 'backgrund'",
        "did you mean 'background'",
        "'val'",
    )
    too_many = 4 * N_CHARS + 1
    raises(lambda: small(root, ways=too_many), f"ways = {too_many}", f"{4 * N_CHARS} classes")
    raises(lambda: small(root, shots=6, queries=15), "shots + queries = 21", "20 drawings")
    raises(lambda: small(root, ways=0), "ways must be a positive int")
    raises(
        lambda: small(root, split="val", val_alphabets=("Betta",)),
        "val alphabet 'Betta'",
        "did you mean 'Beta'",
    )
    raises(
        lambda: small(root, split="train", val_alphabets=("Alpha", "Beta")),
        "val_alphabets",
        "none for 'train'",
    )
    raises(
        lambda: small(root, split="val", val_alphabets=()), "val_alphabets must name at least one"
    )


@pytest.mark.parametrize(
    ("arrays", "fragments"),
    [
        ({"labels": np.zeros(3)}, ["images_background.npz has no 'images' array", "labels"]),
        (
            {"images": np.ones((2, 20, 105), bool)},
            ["bool array (characters, drawings, H, W)", "(2, 20, 105)"],
        ),
        ({"images": np.ones((2, 20, 105, 105), np.uint8)}, ["non-empty bool array", "uint8"]),
    ],
)
def test_omniglot_rejects_malformed_npz(tmp_path, arrays, fragments):
    np.savez(tmp_path / "images_background.npz", **arrays)
    raises(lambda: Omniglot(tmp_path), *fragments)


def test_omniglot_rejects_unreadable_npz(tmp_path):
    (tmp_path / "images_background.npz").write_bytes(b"not a zip")
    raises(lambda: Omniglot(tmp_path), "images_background.npz is not a readable npz file")


def test_omniglot_alphabet_sidecar_is_checked_and_needed_for_train(tmp_path):
    np.savez(tmp_path / "images_background.npz", images=synthetic_drawings(0)[:, :2])
    assert Omniglot(tmp_path, ways=2, shots=1, queries=1).character_alphabets is None
    train = partial(Omniglot, tmp_path, split="train", shots=1, queries=1)
    message = raises(train, "split 'train'", "alphabet")
    assert "alphabets_background.json" in message
    sidecar = {"background": [{"alphabet": "Alpha", "first_id": 1, "last_id": 5}]}
    (tmp_path / "alphabets_background.json").write_text(json.dumps(sidecar))
    raises(lambda: Omniglot(tmp_path, shots=1, queries=1), "alphabets_background.json", "ids 1..6")


def test_omniglot_rejects_empty_png_folders(tmp_path):
    (tmp_path / "images_background").mkdir()
    raises(lambda: Omniglot(tmp_path), "images_background holds no <alphabet>/<character>/ folders")
    (tmp_path / "images_background" / "Alpha" / "character01").mkdir(parents=True)
    raises(lambda: Omniglot(tmp_path), "character01 holds no .png drawings")


def test_omniglot_rejects_unreadable_and_uneven_pngs(tmp_path):
    write_pngs(tmp_path, "background", synthetic_drawings(0)[:, :3])
    first = tmp_path / "images_background" / "Alpha" / "character01"
    (first / "0001_03.png").unlink()
    raises(lambda: Omniglot(tmp_path, shots=1, queries=1), "same number of drawings", "[2, 3]")
    (first / "0001_03.png").write_bytes(b"not a png")
    raises(lambda: Omniglot(tmp_path, shots=1, queries=1), "0001_03.png is not a readable PNG")


def test_default_data_root_reads_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("METANET_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("METANET_DATA_ROOT")
    monkeypatch.chdir(tmp_path)  # the working directory no longer leads anywhere
    found = default_data_root()
    assert found == (REAL_ROOT.resolve() if REAL_ROOT.is_dir() else None)


# ----------------------------------------------------------------------------- Omniglot, real data


@pytest.fixture(scope="module")
def real_background() -> Omniglot:
    return Omniglot(REAL_ROOT)


@needs_real
def test_real_omniglot_background(real_background):
    dist = real_background
    assert dist.images.shape == (964, 20, 1, 28, 28) and dist.n_classes == 4 * 964
    assert len(set(dist.character_alphabets)) == 30
    with np.load(REAL_NPZ) as data:
        ink = 1 - data["images"].mean()
    assert abs(dist.images.float().mean().item() - ink) < 2e-3
    episode = dist.sample(32, gen())
    assert episode.support_x.shape == (32, 5, 1, 28, 28)
    assert episode.query_x.shape == (32, 75, 1, 28, 28)


@needs_real
def test_real_omniglot_train_and_val_are_disjoint_and_cover_background(real_background):
    train, val = Omniglot(REAL_ROOT, split="train"), Omniglot(REAL_ROOT, split="val")
    assert set(val.character_alphabets) == set(DEFAULT_VAL_ALPHABETS)
    assert not set(train.character_alphabets) & set(val.character_alphabets)
    union = set(train.character_alphabets) | set(val.character_alphabets)
    assert union == set(real_background.character_alphabets)
    assert (train.n_characters, val.n_characters) == (787, 177)
    in_val = torch.tensor([a in DEFAULT_VAL_ALPHABETS for a in real_background.character_alphabets])
    assert torch.equal(val.images, real_background.images[in_val])
    assert torch.equal(train.images, real_background.images[~in_val])


@needs_real
def test_real_png_folders_match_the_npz(real_background, tmp_path):
    """Lake's own PNGs (a small subset shipped beside the npz) load as the same characters."""
    with zipfile.ZipFile(REAL_ROOT / "images_background_small1.zip") as archive:
        for member in archive.namelist():
            parts = member.split("/")
            if member.endswith(".png") and parts[1] in ("Balinese", "Latin"):
                target = tmp_path / "images_background" / "/".join(parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
    from_png = Omniglot(tmp_path)
    # Lake's file names start with the character id, and npz row i is id i + 1
    ids = [
        int(next(character.glob("*.png")).name[:4])
        for alphabet in sorted((tmp_path / "images_background").iterdir())
        for character in sorted(alphabet.iterdir())
    ]
    rows = torch.tensor(ids) - 1
    assert len(ids) == 24 + 26
    assert torch.equal(from_png.images, real_background.images[rows])
    names = real_background.character_alphabets
    assert from_png.character_alphabets == tuple(names[i] for i in rows)
