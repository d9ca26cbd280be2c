"""Image-folder, mini-ImageNet and multi-domain episodes on tiny generated image folders.

Every layout (class folders, Ravi's images/ + <split>.csv, <split>/<wnid>/ folders), the
decoded-image cache (a hit, a changed file, a damaged cache file), the class-level splits,
and every bad input the loaders name: the message, not only the exception type.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metanet.cli import main
from metanet.tasks import ImageFolder, MiniImageNet, MultiDomain, domain_name, fixed_episodes, make_tasks
from metanet.tasks.images import cache_dir, load_store
from test_tasks import gen, raises  # one-line TaskError with every fragment


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test gets its own decoded-image cache folder."""
    monkeypatch.setenv("METANET_CACHE", str(tmp_path / "cache"))




def _image(path: Path, value: int, size: int = 12, mode: str = "L") -> None:
    """An image whose pixels all hold ``value`` (RGB: value, value // 2, 255 - value)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        array = np.full((size, size), value, dtype=np.uint8)
    else:
        array = np.stack([np.full((size, size), v, dtype=np.uint8) for v in (value, value // 2, 255 - value)], -1)
    Image.fromarray(array, mode).save(path)


def make_folder(root: Path, classes: int = 6, per_class: int = 4, ext: str = ".png", mode: str = "L", size: int = 12) -> Path:
    """``root/c<i>/<j><ext>``; image j of class i has pixel value 10 * i + j."""
    for i in range(classes):
        for j in range(per_class):
            _image(root / f"c{i}" / f"{j}{ext}", 10 * i + j, size, mode)
    return root


def make_ravi(root: Path, splits=(("train", 6), ("val", 3)), per_class: int = 5) -> Path:
    """Ravi's layout: ``images/<wnid><index>.jpg`` + ``<split>.csv`` (RGB, 84 -> 16 pixels here)."""
    k = 0
    for split, n in splits:
        lines = ["filename,label"]
        for c in range(n):
            wnid = f"n{split[:2]}{c:05d}"
            for j in range(per_class):
                name = f"{wnid}{j:08d}.jpg"
                _image(root / "images" / name, 20 * c + j, 16, "RGB")
                lines.append(f"{name},{wnid}")
                k += 1
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


# ------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("ext", [".png", ".jpg", ".ppm", ".bmp"])
def test_image_folder_reads_every_format_and_keeps_labels_with_their_images(tmp_path, ext):
    root = make_folder(tmp_path / "data", ext=ext)
    dist = ImageFolder(root, split="all", ways=3, shots=2, queries=2)
    assert dist.input_shape == (1, 12, 12) and dist.n_classes == 6
    ep = dist.sample(5, gen())
    assert ep.support_x.shape == (5, 6, 1, 12, 12) and ep.query_x.shape == (5, 6, 1, 12, 12)
    assert ep.support_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    # a class's images have pixel values 10 * class + j: support and query of one label come from one class
    tol = 3 if ext == ".jpg" else 0
    for b in range(5):
        for label in range(3):
            values = torch.cat([ep.support_x[b][ep.support_y[b] == label], ep.query_x[b][ep.query_y[b] == label]]).mul(255).round()
            classes = (values.flatten(1)[:, 0] + tol).div(10).floor()
            assert classes.unique().numel() == 1, (b, label, values.flatten(1)[:, 0])
    # distinct images per class within a task
    first = ep.support_x[0, ep.support_y[0] == 0].flatten(1)[:, 0]
    assert first.unique().numel() == 2


def test_image_folder_converts_channels_and_resizes(tmp_path):
    root = make_folder(tmp_path / "rgb", mode="RGB", size=16)
    rgb = ImageFolder(root, ways=2, shots=1, queries=1)
    assert rgb.input_shape == (3, 16, 16)
    gray = ImageFolder(root, ways=2, shots=1, queries=1, channels=1, image_size=8)
    assert gray.input_shape == (1, 8, 8)
    ep = gray.sample(2, gen())
    assert ep.support_x.shape == (2, 2, 1, 8, 8) and 0.0 <= float(ep.support_x.min()) <= float(ep.support_x.max()) <= 1.0


def test_image_folder_seeded_fraction_split_is_disjoint_and_covers_every_class(tmp_path):
    root = make_folder(tmp_path / "data", classes=10)
    parts = {s: set(ImageFolder(root, split=s, ways=1, shots=1, queries=1).store.classes) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert parts["train"] | parts["val"] | parts["test"] == {f"c{i}" for i in range(10)}
    assert not (parts["train"] & parts["val"]) and not (parts["val"] & parts["test"])
    other = set(ImageFolder(root, split="train", ways=1, shots=1, queries=1, split_seed=1).store.classes)
    assert other != parts["train"]  # the seed chooses the split


def test_image_folder_split_file(tmp_path):
    root = make_folder(tmp_path / "data")
    split = tmp_path / "split.csv"
    split.write_text("class,split\nc0,train\nc1,train\nc2,val\nc3,test\n")
    assert ImageFolder(root, split="train", ways=2, shots=1, queries=1, split_file=split).store.classes == ("c0", "c1")
    assert ImageFolder(root, split="val", ways=1, shots=1, queries=1, split_file=split).store.classes == ("c2",)


def test_mini_imagenet_ravi_layout(tmp_path):
    root = make_ravi(tmp_path / "mini")
    dist = MiniImageNet(root, split="train", ways=5, shots=1, queries=2, image_size=8)
    assert dist.input_shape == (3, 8, 8) and dist.n_classes == 6
    ep = dist.sample(3, gen())
    assert ep.support_x.shape == (3, 5, 3, 8, 8) and ep.query_x.shape == (3, 10, 3, 8, 8)
    assert MiniImageNet(root, split="val", ways=3, shots=1, queries=1, image_size=8).n_classes == 3


def test_mini_imagenet_class_folder_layout(tmp_path):
    root = tmp_path / "mini"
    make_folder(root / "test", classes=5, per_class=3, ext=".jpg", mode="RGB", size=16)
    dist = MiniImageNet(root, split="test", ways=5, shots=1, queries=2, image_size=16)
    assert dist.store.classes == tuple(f"c{i}" for i in range(5))
    assert dist.sample(2, gen()).support_x.shape == (2, 5, 3, 16, 16)


def test_multidomain_tasks_come_from_one_domain_with_its_id(tmp_path):
    make_folder(tmp_path / "a", classes=4, per_class=3)  # gray, pixel values < 40
    b = make_folder(tmp_path / "b", classes=4, per_class=3, mode="RGB", size=20)
    dist = MultiDomain(domains=("a", f"bee={b}"), data_root=tmp_path, split="all", ways=2, shots=1, queries=1, image_size=10, channels=3)
    assert dist.names == ("a", "bee") and dist.n_families == 2 and dist.input_shape == (3, 10, 10)
    ep = dist.sample(40, gen())
    assert ep.support_x.shape == (40, 2, 3, 10, 10)
    assert set(ep.metadata.tolist()) == {0, 1}
    for t in range(40):
        x = ep.support_x[t]
        gray = bool((x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all())
        assert gray == (int(ep.metadata[t]) == 0)  # domain a is grayscale, replicated to RGB
    weighted = MultiDomain(domains=("a", f"bee={b}"), data_root=tmp_path, split="all", ways=2, shots=1, queries=1, image_size=10, weights=(1.0, 0.0))
    assert set(weighted.sample(20, gen()).metadata.tolist()) == {0}
    hidden = MultiDomain(domains=("a",), data_root=tmp_path, split="all", ways=2, shots=1, queries=1, image_size=10, with_metadata=False)
    assert hidden.sample(3, gen()).metadata is None and hidden.n_families == 0


def test_multidomain_left_out_domain_gets_the_unknown_id(tmp_path):
    make_folder(tmp_path / "a", classes=3, per_class=2)
    make_folder(tmp_path / "new", classes=3, per_class=2)
    dist = MultiDomain(domains=("new",), data_root=tmp_path, split="all", ways=2, shots=1, queries=1, image_size=8, family_names=("a", "b"))
    assert dist.n_families == 2
    assert dist.sample(4, gen()).metadata.tolist() == [-1] * 4


def test_an_invert_entry_flips_that_domain_alone(tmp_path):
    make_folder(tmp_path / "a", classes=3, per_class=2)
    b = make_folder(tmp_path / "b", classes=3, per_class=2)
    kw = dict(data_root=tmp_path, split="all", ways=2, shots=1, queries=1, image_size=8, channels=1)
    plain = MultiDomain(domains=("a", f"bee={b}"), **kw).sample(30, gen())
    flipped_dist = MultiDomain(domains=("a:invert", f"bee={b}"), **kw)
    flipped = flipped_dist.sample(30, gen())
    assert flipped_dist.names == ("a", "bee") and domain_name("a:invert") == "a" and domain_name(f"bee={b}:invert") == "bee"
    a = plain.metadata == 0
    assert 0 < int(a.sum()) < 30 and torch.equal(flipped.metadata, plain.metadata)
    assert torch.allclose(flipped.support_x[a], 1.0 - plain.support_x[a]) and torch.allclose(flipped.query_x[a], 1.0 - plain.query_x[a])
    assert torch.equal(flipped.support_x[~a], plain.support_x[~a])  # the other domain as stored
    raises(lambda: MultiDomain(domains=(":invert",), **kw), "has no name")


def test_fixed_episodes_are_reproducible(tmp_path):
    root = make_folder(tmp_path / "data")
    dist = make_tasks("images", root=root, ways=3, shots=1, queries=1)
    a, b = fixed_episodes(dist, 5, 2, seed=3), fixed_episodes(dist, 5, 2, seed=3)
    assert all(torch.equal(x.support_x, y.support_x) and torch.equal(x.query_y, y.query_y) for x, y in zip(a, b))


# -------------------------------------------------------------------------------- cache


def test_cache_is_hit_and_keyed_by_content(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", classes=3, per_class=2)
    first = ImageFolder(root, ways=2, shots=1, queries=1)
    files = list(cache_dir().glob("images-*.npz"))
    assert len(files) == 1 and not list(root.rglob("*.npz")) and not list(root.rglob("*.json"))  # outside the data folder
    import metanet.tasks.images as images

    calls, hashed = [], []
    real, real_key = images._decode, images._cache_key
    monkeypatch.setattr(images, "_decode", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(images, "_cache_key", lambda *a: hashed.append(a) or real_key(*a))
    again = ImageFolder(root, ways=2, shots=1, queries=1)
    assert calls == [] and torch.equal(first.store.images, again.store.images)
    assert hashed == []  # unchanged names, sizes and times: the index gives the key without reading the files
    (cache_dir() / "index.json").write_text("{not json")  # a damaged index costs a read of the files, nothing else
    assert torch.equal(ImageFolder(root, ways=2, shots=1, queries=1).store.images, first.store.images)
    assert len(hashed) == 1 and calls == []
    _image(root / "c1" / "0.png", 200)  # same name, new bytes: a new key, decoded again
    changed = ImageFolder(root, ways=2, shots=1, queries=1)
    assert len(calls) == 6 and len(list(cache_dir().glob("images-*.npz"))) == 2
    assert int(changed.store.images[2].max()) == 200


def test_a_damaged_cache_file_is_decoded_again(tmp_path):
    root = make_folder(tmp_path / "data", classes=3, per_class=2)
    good = ImageFolder(root, ways=2, shots=1, queries=1).store.images
    (cached,) = cache_dir().glob("images-*.npz")
    cached.write_bytes(b"not an npz")
    assert torch.equal(ImageFolder(root, ways=2, shots=1, queries=1).store.images, good)
    with np.load(cached, allow_pickle=False) as data:  # rewritten whole
        assert data["images"].shape == (6, 1, 12, 12)


def test_cache_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("METANET_CACHE", "off")
    assert cache_dir() is None
    root = make_folder(tmp_path / "data", classes=2, per_class=2)
    store = load_store([("a", sorted((root / "c0").iterdir()))], 12, 1)
    assert store.images.shape == (2, 1, 12, 12) and not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- bad input


def test_bad_image_folders(tmp_path):
    raises(lambda: ImageFolder(tmp_path / "nope"), "nope", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    raises(lambda: ImageFolder(empty), "holds no class folders", "<root>/<class>/<image>")
    texts = tmp_path / "texts"
    (texts / "a").mkdir(parents=True)
    (texts / "a" / "notes.txt").write_text("hello")
    raises(lambda: ImageFolder(texts), "no class folder holds an image file")
    bad = make_folder(tmp_path / "bad", classes=2, per_class=2)
    (bad / "c1" / "9.png").write_bytes(b"\x89PNG not really")
    raises(lambda: ImageFolder(bad, ways=2, shots=1, queries=1), "9.png", "not a readable image")
    small = make_folder(tmp_path / "small", classes=3, per_class=2)
    raises(lambda: ImageFolder(small, ways=2, shots=2, queries=1), "class 'c0' has 2 images", "shots + queries = 3")
    raises(lambda: ImageFolder(small, ways=4, shots=1, queries=1), "3 classes, fewer than ways = 4")
    raises(lambda: ImageFolder(small, split="tets"), "split 'tets'", "did you mean 'test'")


def test_truncated_jpeg_is_named(tmp_path):
    root = make_folder(tmp_path / "data", classes=2, per_class=2, ext=".jpg", mode="RGB", size=32)
    target = root / "c1" / "1.jpg"
    target.write_bytes(target.read_bytes()[:200])
    raises(lambda: ImageFolder(root, ways=2, shots=1, queries=1), "1.jpg", "not a readable image")


def test_bad_split_files(tmp_path):
    root = make_folder(tmp_path / "data", classes=3, per_class=2)
    raises(lambda: ImageFolder(root, split="train", split_file=tmp_path / "missing.csv"), "missing.csv", "does not exist")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("c0,train\nc9,val\n")
    raises(lambda: ImageFolder(root, split="train", ways=1, shots=1, queries=1, split_file=wrong), "wrong.csv:2", "'c9'", "not a folder")
    odd = tmp_path / "odd.csv"
    odd.write_text("c0,trian\n")
    raises(lambda: ImageFolder(root, split="train", split_file=odd), "odd.csv:1", "'trian'", "did you mean 'train'")
    none = tmp_path / "none.csv"
    none.write_text("c0,train\n")
    raises(lambda: ImageFolder(root, split="val", split_file=none), "no class is assigned to split 'val'")


def test_bad_mini_imagenet_roots(tmp_path):
    root = make_ravi(tmp_path / "mini")
    raises(lambda: MiniImageNet(root, split="test"), "no mini-ImageNet split 'test'", "test.csv + images/", "test/<wnid>/*.jpg")
    raises(lambda: MiniImageNet(root, split="testing"), "split 'testing'", "did you mean 'test'")
    (root / "val.csv").write_text("filename,label\nn_missing00000001.jpg,n_missing\n")
    raises(lambda: MiniImageNet(root, split="val"), "val.csv:2", "n_missing00000001.jpg", "not in")
    (root / "train.csv").write_text("filename,label\nonly_one_column\n")
    raises(lambda: MiniImageNet(root, split="train"), "train.csv:2", "expected 'filename,label'")
    few = make_ravi(tmp_path / "few", splits=(("train", 6),), per_class=2)
    raises(lambda: MiniImageNet(few, ways=5, shots=1, queries=15, image_size=8), "has 2 images, fewer than shots + queries = 16")


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/metanet-pickle-ran"),))


@pytest.mark.parametrize("name", ["mini-imagenet-cache-train.pkl", "miniImageNet_category_split_train_phase_train.pickle"])
def test_pickle_caches_are_refused_and_never_loaded(tmp_path, name):
    folder = tmp_path / "mini"
    folder.mkdir()
    (folder / name).write_bytes(pickle.dumps({"image_data": _Boom()}))
    for root in (folder, folder / name):
        msg = raises(lambda: MiniImageNet(root), name, "pickle caches are refused", "arbitrary code", "train.csv")
        assert "images/" in msg
    raises(lambda: ImageFolder(folder), "pickle caches are refused")
    assert not Path("/tmp/metanet-pickle-ran").exists()


def test_bad_multidomain(tmp_path):
    make_folder(tmp_path / "a", classes=3, per_class=2)
    raises(lambda: MultiDomain(domains=("a", "nowhere"), data_root=tmp_path, split="all", ways=2, shots=1, queries=1), "domain 'nowhere'", "does not exist")
    raises(lambda: MultiDomain(domains=("a", "a"), data_root=tmp_path, split="all"), "'a' twice")
    raises(lambda: MultiDomain(domains=("a",), data_root=tmp_path, split="all", weights=(1.0, 2.0)), "weights (--domain-weights) must be 1 numbers")
    raises(lambda: MultiDomain(domains=("a:invrt",), data_root=tmp_path, split="all"), "domain 'a:invrt': unknown suffix ':invrt' (did you mean ':invert'?)")
    raises(lambda: MultiDomain(domains=(), data_root=tmp_path), "at least one domain")
    raises(lambda: MultiDomain(domains=("a",), data_root=tmp_path, channels=2), "channels must be 1 (grayscale) or 3")


# ------------------------------------------------------------------------------- the CLI


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


QUICK = ["--steps", "2", "--meta-batch", "2", "--val-every", "2", "--val-tasks", "2", "--strategy", "loop", "--quiet"]


def test_cli_trains_on_an_image_folder_and_evaluates_any_way(tmp_path, capsys):
    root = make_folder(tmp_path / "data", classes=12, per_class=4, mode="RGB", size=20)
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--tasks", "images", "--data-root", root, "--space", "tiny", "--ways", "2", "--shots", "1", "--queries", "1", *QUICK, "--out", run], capsys)
    assert code == 0, err
    # trained 2-way (prototype head): scored 3-way 2-shot on all 12 classes, resized to the space's input
    code, out, err = run_cli(["evaluate", run, "--split", "all", "--ways", "3", "--shots", "2", "--queries", "1", "--episodes", "4", "--inner-steps", "1"], capsys)
    assert code == 0, err
    line = json.loads(out)
    assert line["ways"] == 3 and line["shots"] == 2 and line["episodes"] == 4 and 0.0 <= line["accuracy"] <= 1.0


def test_cli_refuses_other_ways_for_a_learned_head(tmp_path, capsys):
    root = make_folder(tmp_path / "data", classes=12, per_class=4)
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--tasks", "images", "--data-root", root, "--space", "tiny", "--no-proto-head", "--ways", "2", "--shots", "1", "--queries", "1", *QUICK, "--out", run], capsys)
    assert code == 0, err
    code, _, err = run_cli(["evaluate", run, "--split", "all", "--ways", "3", "--episodes", "2"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "learned for 2-way tasks" in err and "cannot classify 3-way" in err


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--tasks", "images"], ["images needs --data-root DIR"]),
        (["--tasks", "images", "--data-root", "{tmp}/nope"], ["does not exist"]),
        (["--tasks", "miniimagenet", "--data-root", "{tmp}/pk/x.pkl", "--space", "tiny"], ["pickle caches are refused"]),
        (["--tasks", "multidomain", "--domain-weights", "1,x"], ["domain_weights must be comma-separated numbers"]),
        (["--tasks", "images", "--data-root", "{tmp}/data", "--ways", "2", "--shots", "1", "--queries", "1", "--space", "mlp_regression"], ["space 'mlp_regression' is for regression", "'images' are classification"]),
        (["--tasks", "images", "--data-root", "{tmp}/data", "--ways", "1"], ["config: ways must be an integer >= 2 (a task tells at least two classes apart), got 1"]),
    ],
)
def test_cli_bad_image_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, fragments):
    make_folder(tmp_path / "data", classes=3, per_class=2)
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "x.pkl").write_bytes(pickle.dumps([1]))
    run = tmp_path / "run"
    argv = ["train", *[a.replace("{tmp}", str(tmp_path)) for a in extra], *QUICK, "--out", run]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith("metanet: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    assert not run.exists()


def test_cli_multidomain_leave_one_domain_out(tmp_path, capsys):
    for name in ("a", "b", "left_out"):
        make_folder(tmp_path / name, classes=10, per_class=3)
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--tasks", "multidomain", "--data-root", tmp_path, "--domains", "a,b", "--domain-weights", "1,2", "--space", "tiny", "--ways", "2", "--shots", "1", "--queries", "1", *QUICK, "--out", run], capsys)
    assert code == 0, err
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["domains"] == "a,b" and saved["domain_weights"] == "1,2"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    arch = [r["arch"] for r in rows if "arch" in r][-1]  # architecture health at validation
    assert arch["tasks"] == 2 and 0.0 <= arch["parametric_share"] <= 1.0 and arch["mean_entropy"] > 0
    assert set(arch["distinct_per_family"]) <= {"0", "1"} and arch["mutual_information"] >= 0.0
    # the left-out domain through the run's own task distribution (unknown-domain metadata) ...
    code, out, err = run_cli(["evaluate", run, "--domains", "left_out", "--split", "all", "--episodes", "3", "--inner-steps", "0"], capsys)
    assert code == 0, err
    line = json.loads(out)
    assert line["episodes"] == 3 and line["domains"] == "left_out"  # the line says what it scored
    # ... and as a plain image folder, resized and converted to the space's input
    code, out, err = run_cli(["evaluate", run, "--tasks", "images", "--data-root", tmp_path / "left_out", "--split", "all", "--episodes", "3", "--inner-steps", "0"], capsys)
    assert code == 0, err
    line = json.loads(out)
    assert line["tasks"] == "images" and line["data_root"] == str(tmp_path / "left_out") and "domains" not in line


def test_training_warns_once_when_the_generator_collapses(tmp_path, caplog, monkeypatch):
    import logging

    import metanet.trainer as trainer
    from metanet.trainer import TrainConfig, train

    real = trainer.population_health

    def collapsed(*args, **kwargs):  # the conditional generator's validation tasks, all given one genotype
        return {**real(*args, **kwargs), "distinct": 1}

    root = make_folder(tmp_path / "data", classes=12, per_class=3)
    cfg = dict(space="tiny", tasks="images", data_root=str(root), ways=2, shots=1, queries=1, steps=4, val_every=2, val_tasks=10, meta_batch=2, strategy="loop")
    # a shared architecture is one network for all tasks by construction: no warning
    with caplog.at_level(logging.WARNING, logger="metanet.trainer"):
        train(TrainConfig(**cfg, arch="shared"), tmp_path / "shared")
    assert not [r for r in caplog.records if "same architecture" in r.getMessage()]
    rows = [json.loads(line) for line in (tmp_path / "shared" / "metrics.jsonl").read_text().splitlines()]
    assert [r["arch"]["distinct"] for r in rows if "arch" in r] == [1, 1]
    monkeypatch.setattr(trainer, "population_health", collapsed)
    with caplog.at_level(logging.WARNING, logger="metanet.trainer"):
        train(TrainConfig(**cfg, arch="conditional"), tmp_path / "run")
    collapse = [r.getMessage() for r in caplog.records if "same architecture" in r.getMessage()]
    assert len(collapse) == 1 and "all 10 validation tasks" in collapse[0]  # two validations, one warning


def test_inspect_population_prints_the_health_figures(tmp_path, capsys):
    root = make_folder(tmp_path / "data", classes=12, per_class=3)
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--tasks", "images", "--data-root", root, "--space", "tiny", "--ways", "2", "--shots", "1", "--queries", "1", *QUICK, "--out", run], capsys)
    assert code == 0, err
    ep = ImageFolder(root, split="all", ways=2, shots=1, queries=1, image_size=8).sample(6, gen())
    pop = tmp_path / "pop.npz"
    np.savez(pop, x=ep.support_x.numpy(), y=ep.support_y.numpy(), metadata=np.array([0, 0, 0, 1, 1, 1]))
    code, out, err = run_cli(["inspect", run, "--population", pop], capsys)
    assert code == 0, err
    assert "kept edges with weights" in out and "mean per-edge entropy" in out
    assert "distinct architectures per family (id: count): 0:" in out and "mutual information between family and architecture" in out
