"""``metanet generate`` and ``metanet inspect`` on real (tiny) runs: files, formats, errors."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import ClassVar

import networkx as nx
import numpy as np
import pytest
import torch

from metanet import export as ex
from metanet import tasks
from metanet.cli import main
from metanet.network import generate, generate_batch, load_generated
from metanet.tasks import Episode, Multimodal
from metanet.trainer import TrainConfig, load_run, train

PNG = b"\x89PNG\r\n\x1a\n"
FILES = ["alpha.txt", "genotype.json", "graph.dot", "graph.graphml", "graph.json", "graph.png", "model.pt2", "network.json", "space.yaml", "summary.txt", "weights.safetensors"]


@dataclasses.dataclass(frozen=True)
class _TinyImages:
    """3-way episodes of 1x8x8 images whose brightness is the class: the ``tiny`` space's tasks."""

    shots: int = 2
    queries: int = 2
    kind: ClassVar[str] = "classification"
    input_shape: ClassVar[tuple[int, ...]] = (1, 8, 8)
    n_outputs: ClassVar[int] = 3
    n_families: ClassVar[int] = 0

    def sample(self, batch, generator=None):
        def part(n):
            y = (torch.arange(3 * n) % 3).expand(batch, -1).contiguous()  # (B, 3n)
            x = torch.randn(batch, 3 * n, 1, 8, 8, generator=generator) + y[..., None, None, None].float()
            return x, y

        return Episode(*part(self.shots), *part(self.queries))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real run directories: multimodal regression (with metadata) and tiny images."""
    root = tmp_path_factory.mktemp("runs")
    quick = dict(steps=2, meta_batch=2, val_tasks=2, val_every=2, eval_inner_steps=1, log_every=1, strategy="loop", dim=16, latent=8)
    train(TrainConfig(space="mlp_regression", tasks="multimodal", inner_lr=0.001, **quick), root / "reg")
    tasks.TASKS["_test_tiny_images"] = _TinyImages
    try:
        train(TrainConfig(space="tiny", tasks="_test_tiny_images", ways=3, inner_lr=0.05, **quick), root / "img")
    finally:
        del tasks.TASKS["_test_tiny_images"]
    return {"reg": root / "reg", "img": root / "img"}


@pytest.fixture(scope="module")
def diverse_run(runs, tmp_path_factory):
    """The regression run with its task-conditional architecture logits scaled up, so that
    tasks of different families get different architectures (two training steps barely
    move them)."""
    from metanet import checkpoint as ckpt

    run = tmp_path_factory.mktemp("diverse") / "reg"
    shutil.copytree(runs["reg"], run)
    for name in ("best.pt", "last.pt"):
        state = ckpt.load_checkpoint(run / name)
        state["model"]["arch.proj.weight"] *= 1000.0
        ckpt.save_checkpoint(run / name, state)
    return run


def _support(kind, seed=0, tasks_=None):
    """x, y arrays of one support set (or ``tasks_`` of them) for the run ``kind``."""
    g = torch.Generator().manual_seed(seed)
    b = tasks_ or 1
    if kind == "reg":
        ep = Multimodal(shots=10, queries=1).sample(b, g)
        x, y = ep.support_x, ep.support_y[..., 0]
    else:
        ep = _TinyImages(shots=3).sample(b, g)
        x, y = ep.support_x, ep.support_y
    if tasks_ is None:
        x, y = x[0], y[0]
    return x.numpy(), y.numpy()


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("metanet: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


def _no_leftovers(folder, keep=()):
    hidden = [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name not in keep]
    assert hidden == [], hidden


# ------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("kind", ["reg", "img"])
def test_generate_writes_every_file_and_they_agree_with_the_api(kind, runs, tmp_path, capsys):
    x, y = _support(kind)
    sup = _npz(tmp_path / "support.npz", x=x, y=y)
    out = tmp_path / "net"
    meta = ["--metadata", "tanh"] if kind == "reg" else []
    code, stdout, err = _run(["generate", runs[kind], "--support", sup, "--adapt-steps", 2, "--out", out, *meta], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert all((out / f).stat().st_size > 0 for f in FILES)
    _no_leftovers(tmp_path)

    # the folder is the network the API generates from the same run and support set
    model, _ = load_run(runs[kind])
    api = generate(model, x, y, metadata=4 if kind == "reg" else None, adapt_steps=2)
    saved = load_generated(out)
    assert saved.genotype == api.genotype
    assert saved.metadata == (4 if kind == "reg" else None)
    for k, v in api.module.state_dict().items():
        assert torch.equal(saved.module.state_dict()[k], v), k
    xt = torch.as_tensor(x)
    with torch.no_grad():
        expected = saved.module(xt)
        torch.testing.assert_close(torch.export.load(out / "model.pt2").module()(xt), expected)

    # graph files: networkx reads them back as the same graph
    g = api.graph()
    for h in (nx.node_link_graph(json.loads((out / "graph.json").read_text()), edges="edges"), nx.read_graphml(out / "graph.graphml")):
        assert set(map(str, h.nodes)) == set(g.nodes)
        assert {(str(u), str(v)) for u, v in h.edges} == set(g.edges)
        assert {d["op"] for *_, d in h.edges(data=True)} == {d["op"] for *_, d in g.edges(data=True)}
    assert (out / "graph.dot").read_text().startswith("digraph")
    assert (out / "graph.png").read_bytes()[:8] == PNG
    assert (out / "alpha.txt").read_text().strip() == ex.describe_soft(api.space, api.alpha)
    assert json.loads((out / "genotype.json").read_text())["space"] == api.space.name

    summary = (out / "summary.txt").read_text()
    assert f"parameters: {api.num_params()}\n" in summary
    assert f"FLOPs per sample: {api.flops_per_sample(xt):.0f} " in summary
    assert "generation time: " in summary and " ms" in summary
    assert "adaptation: 2 steps" in summary
    assert ex.describe_genotype(api.space, api.genotype) in summary
    assert "parameters:" in stdout and f"wrote {out}" in stdout


def test_generate_overwrite_replaces_a_network_and_nothing_else(runs, tmp_path, capsys):
    x, y = _support("reg")
    sup = _npz(tmp_path / "s.npz", x=x, y=y)
    out = tmp_path / "net"
    code, _, err = _run(["generate", runs["reg"], "--support", sup, "--out", out], capsys)
    assert code == 0, err
    first = (out / "weights.safetensors").stat().st_mtime_ns
    code, _, err = _run(["generate", runs["reg"], "--support", sup, "--out", out], capsys)
    _one_line_error(code, err, f"generate: --out {out} holds a network; use --overwrite to replace it")
    code, _, err = _run(["generate", runs["reg"], "--support", sup, "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == FILES and (out / "weights.safetensors").stat().st_mtime_ns != first
    # a folder of other files, the run itself or a folder holding it: never replaced, --overwrite or not
    other = tmp_path / "notes"
    other.mkdir()
    (other / "old.txt").write_text("old")
    for flags in ([], ["--overwrite"]):
        code, _, err = _run(["generate", runs["reg"], "--support", sup, "--out", other, *flags], capsys)
        _one_line_error(code, err, f"generate: --out {other} is not empty and holds no saved network; give a new or empty folder")
        assert sorted(p.name for p in other.iterdir()) == ["old.txt"]
    run = Path(runs["reg"])
    before = sorted(p.name for p in run.iterdir())
    for target in (run, run.parent):
        code, _, err = _run(["generate", run, "--support", sup, "--out", target, "--overwrite"], capsys)
        _one_line_error(code, err, f"generate: --out {target} would replace the run {run}; give another folder")
    assert sorted(p.name for p in run.iterdir()) == before
    _no_leftovers(tmp_path)


def _bad_cases():
    xr, yr = _support("reg")
    xi, yi = _support("img")
    nan_x = xr.copy()
    nan_x[3, 0] = np.nan
    nan_y = yr.copy()
    nan_y[1] = np.nan
    far = yi.copy()
    far[0] = -1
    # (run, npz arrays or a special file, extra args, message fragments)
    return {
        "missing npz": ("reg", None, [], ["--support", "nothere.npz: no such file"]),
        "npz without y": ("reg", {"x": xr}, [], ["has no array 'y' (it holds x); expected x (inputs) and y (targets)"]),
        "npz without x, y": ("reg", {"a": xr}, [], ["has no array 'x' or 'y' (it holds a)"]),
        "not an npz": ("reg", "text", [], ["not an .npz file; expected numpy.savez output with arrays x and y"]),
        "x of images for an mlp": ("reg", {"x": xi, "y": yi}, [], ["x has shape (9, 1, 8, 8); space 'mlp_regression' expects (N, 1)"]),
        "x of vectors for images": ("img", {"x": xr, "y": yr}, [], ["x has shape (10, 1); space 'tiny' expects (N, 1, 8, 8)"]),
        "NaN in x": ("reg", {"x": nan_x, "y": yr}, [], ["x holds NaN or infinite values"]),
        "NaN in y": ("reg", {"x": xr, "y": nan_y}, [], ["y holds NaN or infinite values"]),
        "label out of range": ("img", {"x": xi, "y": far}, [], ["y holds class id -1; class ids start at 0"]),
        "fractional labels": ("img", {"x": xi, "y": yi + 0.5}, [], ["y must hold integer class ids, got fractional values"]),
        "x and y lengths": ("reg", {"x": xr, "y": yr[:4]}, [], ["y has shape (4,) but x has (10, 1)"]),
        "metadata out of range": ("reg", {"x": xr, "y": yr}, ["--metadata", "9"], ["--metadata '9': expected a family id 0 to 4 (-1: unknown) or a name (sinusoid, linear, quadratic, l1, tanh)"]),
        "metadata for a run without": ("img", {"x": xi, "y": yi}, ["--metadata", "0"], ["--metadata: this run was trained without task metadata"]),
        "adapt steps": ("reg", {"x": xr, "y": yr}, ["--adapt-steps", "-1"], ["argument --adapt-steps: expected an integer >= 0, got -1"]),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_generate_bad_input_is_one_line_and_writes_nothing(case, runs, tmp_path, capsys):
    kind, arrays, extra, fragments = _bad_cases()[case]
    sup = tmp_path / "nothere.npz"
    if arrays == "text":
        sup = tmp_path / "text.npz"
        sup.write_text("not numpy")
    elif arrays is not None:
        sup = _npz(tmp_path / "s.npz", **arrays)
    out = tmp_path / "deep" / "net"
    code, _, err = _run(["generate", runs[kind], "--support", sup, "--out", out, *extra], capsys)
    _one_line_error(code, err, *fragments)
    assert not (tmp_path / "deep").exists()
    _no_leftovers(tmp_path)


def test_generate_from_a_folder_that_is_not_a_run(tmp_path, capsys):
    x, y = _support("reg")
    sup = _npz(tmp_path / "s.npz", x=x, y=y)
    code, _, err = _run(["generate", tmp_path / "nope", "--support", sup, "--out", tmp_path / "o"], capsys)
    _one_line_error(code, err, "nope: no such run directory")
    code, _, err = _run(["generate", tmp_path, "--support", sup, "--out", tmp_path / "o"], capsys)
    _one_line_error(code, err, "not a metanet run directory (missing config.yaml)")
    assert not (tmp_path / "o").exists()


def test_generate_without_matplotlib_still_writes_the_rest(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    x, y = _support("reg")
    code, _, err = _run(["generate", runs["reg"], "--support", _npz(tmp_path / "s.npz", x=x, y=y), "--out", tmp_path / "net"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == [f for f in FILES if f != "graph.png"]
    assert "graph.png not drawn (needs matplotlib: pip install 'metanet[plot]')" in (tmp_path / "net" / "summary.txt").read_text()


# ------------------------------------------------------------------------------- inspect


@pytest.fixture()
def reg_task(runs, tmp_path):
    x, y = _support("reg")
    model, _ = load_run(runs["reg"])
    return _npz(tmp_path / "s.npz", x=x, y=y), generate(model, x, y)


def test_inspect_text_dot_and_json_of_a_run(runs, reg_task, capsys):
    sup, net = reg_task
    code, out, err = _run(["inspect", runs["reg"], "--support", sup], capsys)
    assert code == 0, err
    assert out.strip() == ex.describe_genotype(net.space, net.genotype)
    code, out, _ = _run(["inspect", runs["reg"], "--support", sup, "--format", "dot"], capsys)
    assert out == ex.to_dot(net.graph())
    code, out, _ = _run(["inspect", runs["reg"], "--support", sup, "--format", "json"], capsys)
    h = nx.node_link_graph(json.loads(out), edges="edges")
    assert set(h.edges) == set(net.graph().edges)
    code, out, _ = _run(["inspect", runs["reg"], "--support", sup, "--format", "text", "--soft"], capsys)
    assert out.strip() == ex.describe_soft(net.space, net.alpha)
    code, out, _ = _run(["inspect", runs["reg"], "--support", sup, "--format", "json", "--soft"], capsys)
    soft = nx.node_link_graph(json.loads(out), edges="edges")
    assert sum(d["kind"] == "op" for *_, d in soft.edges(data=True)) == len(net.space.edges)


@pytest.mark.parametrize("soft", [False, True])
def test_inspect_graphml_and_png_files_of_a_run(soft, runs, reg_task, tmp_path, capsys):
    sup, net = reg_task
    flag = ["--soft"] if soft else []
    code, out, err = _run(["inspect", runs["reg"], "--support", sup, "--format", "graphml", "--out", tmp_path / "g.graphml", *flag], capsys)
    assert code == 0, err
    g = nx.read_graphml(tmp_path / "g.graphml")
    ref = net.soft_graph() if soft else net.graph()
    assert set(g.nodes) == set(ref.nodes) and set(g.edges) == set(ref.edges)
    back = ex.read_graphml(tmp_path / "g.graphml")
    assert {(u, v): d for u, v, d in back.edges(data=True)} == {(u, v): d for u, v, d in ref.edges(data=True)}
    code, out, _ = _run(["inspect", runs["reg"], "--support", sup, "--format", "graphml", *flag], capsys)
    assert out.startswith("<?xml") and "graphml" in out
    code, _, err = _run(["inspect", runs["reg"], "--support", sup, "--format", "png", "--out", tmp_path / "g.png", *flag], capsys)
    assert code == 0, err
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("fmt", ["text", "dot", "json", "graphml", "png"])
def test_inspect_a_saved_genotype_in_every_format(fmt, runs, tmp_path, capsys):
    x, y = _support("img")
    net = generate(runs["img"], x, y)
    net.save(tmp_path / "net")
    target = tmp_path / f"out.{fmt}"
    code, out, err = _run(["inspect", tmp_path / "net" / "genotype.json", "--format", fmt, "--out", target], capsys)
    assert code == 0, err
    g = net.graph()
    if fmt == "text":
        assert target.read_text().strip() == ex.describe_genotype(net.space, net.genotype)
    elif fmt == "dot":
        assert target.read_text() == ex.to_dot(g)
    elif fmt == "json":
        assert nx.node_link_graph(json.loads(target.read_text()), edges="edges").edges == g.edges
    elif fmt == "graphml":
        assert set(nx.read_graphml(target).edges) == set(g.edges)
    else:
        assert target.read_bytes()[:8] == PNG
    # the saved folder itself works as the source too
    code, out2, _ = _run(["inspect", tmp_path / "net", "--format", "text"], capsys)
    assert out2.strip() == ex.describe_genotype(net.space, net.genotype)


def test_inspect_genotype_json_finds_its_space(runs, tmp_path, capsys):
    x, y = _support("reg")
    net = generate(runs["reg"], x, y)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "genotype.json").write_text(net.genotype.to_json())
    code, out, err = _run(["inspect", alone / "genotype.json"], capsys)  # the built-in space
    assert code == 0, err
    assert out.strip() == ex.describe_genotype(net.space, net.genotype)
    (alone / "genotype.json").write_text(net.genotype.to_json().replace('"mlp_regression"', '"my_space"'))
    code, _, err = _run(["inspect", alone / "genotype.json"], capsys)
    _one_line_error(code, err, "is a genotype of space 'my_space': no space.yaml beside it and no built-in space of that name")
    (alone / "space.yaml").write_text(net.space.text.replace("name: mlp_regression", "name: my_space"))
    code, out, err = _run(["inspect", alone / "genotype.json"], capsys)  # space.yaml beside wins
    assert code == 0, err
    assert "genotype of space 'my_space'" in out
    (alone / "space.yaml").write_text(net.space.text)
    code, _, err = _run(["inspect", alone / "genotype.json"], capsys)
    _one_line_error(code, err, "is a genotype of space 'my_space', but", "space.yaml defines 'mlp_regression'")


def test_inspect_diff_of_two_tasks_and_of_two_genotypes(diverse_run, tmp_path, capsys):
    model, _ = load_run(diverse_run)
    nets, sups = [], []
    for seed in range(5):  # find two tasks whose architectures differ; an npz may carry metadata
        x, y = _support("reg", seed=seed)
        nets.append(generate(model, x, y, metadata=seed))
        sups.append(_npz(tmp_path / f"s{seed}.npz", x=x, y=y, metadata=np.array(seed)))
    j = next(k for k in range(1, len(nets)) if nets[k].genotype != nets[0].genotype)
    expected = ex.diff_genotypes(model.space, nets[0].genotype, nets[j].genotype)
    assert expected != "identical"
    code, out, err = _run(["inspect", diverse_run, "--support", sups[0], "--diff", sups[j]], capsys)
    assert code == 0, err
    assert out.strip().endswith(expected)
    assert out.splitlines()[:2] == [f"--- {sups[0]} (generated by {diverse_run})", f"+++ {sups[j]}"]
    nets[0].save(tmp_path / "a")
    nets[j].save(tmp_path / "b")
    code, out, err = _run(["inspect", tmp_path / "a" / "genotype.json", "--diff", tmp_path / "b" / "genotype.json"], capsys)
    assert code == 0, err
    assert out.strip().endswith(expected)
    code, out, _ = _run(["inspect", tmp_path / "a" / "genotype.json", "--diff", tmp_path / "a" / "genotype.json"], capsys)
    assert out.strip().endswith("identical")


def test_inspect_population_writes_a_heatmap_and_prints_frequencies(diverse_run, tmp_path, capsys):
    x, y = _support("reg", tasks_=8)
    families = np.arange(8) % 5
    pop = _npz(tmp_path / "pop.npz", x=x, y=y, metadata=families)
    code, out, err = _run(["inspect", diverse_run, "--population", pop, "--out", tmp_path / "pop.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "pop.png").read_bytes()[:8] == PNG
    model, _ = load_run(diverse_run)
    genotypes = [n.genotype for n in generate_batch(model, x, y, metadata=families)]
    freq, labels = ex.op_frequency(model.space, genotypes)
    lines = out.strip().splitlines()
    assert lines[0].startswith("op frequency over 8 tasks")
    assert lines[1].split() == labels
    for e in model.space.edges:
        row = lines[2 + e.index].split()
        assert [float(v) for v in row[-len(labels):]] == pytest.approx(freq[e.index].tolist(), abs=5e-4)
    distinct = len(set(genotypes))
    assert distinct > 1
    assert lines[-1] == f"wrote {tmp_path / 'pop.png'}"
    at = lines.index(f"{distinct} distinct architectures among 8 tasks")
    from metanet.graph import population_health

    health = population_health(model.space, genotypes, families.tolist())
    assert lines[at + 1] == f"kept edges with weights (not pooling, skip or zero): {100 * health['parametric_share']:.1f}%"
    assert lines[-2] == f"mutual information between family and architecture: {health['mutual_information']:.3f} bits"


@pytest.mark.parametrize(("metadata", "message"), [
    (np.arange(3), "metadata must be one family id or one per task (8), got 3 values"),
    (np.array(["sine"] * 8), "metadata must hold numeric family ids, got <U4 values"),
])  # fmt: skip
def test_inspect_population_checks_its_metadata_before_drawing(runs, tmp_path, capsys, metadata, message):
    x, y = _support("reg", tasks_=8)
    pop = _npz(tmp_path / "pop.npz", x=x, y=y, metadata=metadata)
    code, _, err = _run(["inspect", runs["reg"], "--population", pop, "--out", tmp_path / "pop.png"], capsys)
    _one_line_error(code, err, f"inspect: {message}")
    assert not (tmp_path / "pop.png").exists()


@pytest.mark.parametrize("soft", [False, True])
def test_inspect_png_without_matplotlib_says_how_to_install_it(soft, runs, reg_task, tmp_path, capsys, monkeypatch):
    sup, _ = reg_task
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = _run(["inspect", runs["reg"], "--support", sup, "--format", "png", "--out", tmp_path / "g.png"] + (["--soft"] if soft else []), capsys)
    _one_line_error(code, err, "PNG output needs matplotlib: pip install 'metanet[plot]'")
    assert not (tmp_path / "g.png").exists()


def test_inspect_bad_input_is_one_line(runs, reg_task, tmp_path, capsys):
    sup, net = reg_task
    net.save(tmp_path / "net")
    gjson = tmp_path / "net" / "genotype.json"
    (tmp_path / "empty").mkdir()
    cases = [
        (["inspect", runs["reg"]], "a run directory needs --support FILE.npz (one task's support set) or --population FILE.npz"),
        (["inspect", tmp_path / "missing"], "no such run directory or genotype file"),
        (["inspect", tmp_path / "empty"], "is neither a run directory (no config.yaml) nor a saved network (no genotype.json)"),
        (["inspect", gjson, "--soft"], "--soft needs a run directory"),
        (["inspect", runs["reg"], "--support", sup, "--format", "png"], "--format png needs --out FILE.png"),
        (["inspect", runs["reg"], "--support", sup, "--soft", "--diff", sup], "--soft and --diff exclude each other"),
        (["inspect", gjson, "--diff", sup], "a support set needs a run directory to generate from"),
        (["inspect", runs["reg"], "--support", sup, "--diff", sup, "--format", "dot"], "--diff prints text; --format dot does not apply"),
        (["inspect", runs["reg"], "--support", sup, "--format", "dot", "--out", tmp_path / "no" / "g.dot"], "does not exist"),
        (["inspect", runs["img"], "--support", sup], "x has shape (10, 1); space 'tiny' expects (N, 1, 8, 8)"),
        (["inspect", runs["reg"], "--population", sup], "x has shape (10, 1); space 'mlp_regression' expects (T, N, 1)"),
        (["inspect", runs["reg"], "--support", sup, "--format", "svg"], "argument --format: invalid choice: 'svg'"),
    ]
    for argv, fragment in cases:
        code, _, err = _run(argv, capsys)
        _one_line_error(code, err, fragment)
    shutil.rmtree(tmp_path / "net")
    _no_leftovers(tmp_path)


def test_a_failure_while_writing_leaves_no_folder_behind(runs, tmp_path, capsys, monkeypatch):
    x, y = _support("reg")
    sup = _npz(tmp_path / "s.npz", x=x, y=y)

    def broken(g):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "to_dot", broken)
    with pytest.raises(RuntimeError, match="disk full"):  # not a user mistake: not turned into one line
        main(["generate", str(runs["reg"]), "--support", sup, "--out", str(tmp_path / "net")])
    assert not (tmp_path / "net").exists()
    _no_leftovers(tmp_path)


def test_a_prototype_head_network_has_one_output_per_support_class(runs, tmp_path, capsys):
    """A run with the prototype head serves any number of classes (as evaluate --ways
    does): the generated network has as many outputs as its support set has classes, so
    no class the support set lacks gets a constant logit; a class id left out is refused."""
    model, _ = load_run(runs["img"])
    assert model.proto and model.space.task.outputs == 3
    g = torch.Generator().manual_seed(5)
    for ways in (2, 3, 5):
        y = torch.arange(ways).repeat_interleave(2)
        x = torch.randn(len(y), 1, 8, 8, generator=g)
        net = generate(model, x, y)
        assert net.module(x).shape == (len(y), ways) and net.space.task.outputs == ways
        out = tmp_path / f"net{ways}"
        code, _, err = _run(["generate", runs["img"], "--support", _npz(tmp_path / f"s{ways}.npz", x=x.numpy(), y=y.numpy()), "--out", out], capsys)
        assert code == 0, err
        saved = load_generated(out)
        assert json.loads((out / "network.json").read_text())["outputs"] == ways
        torch.testing.assert_close(saved.module(x), net.module(x))
        assert torch.export.load(out / "model.pt2").module()(x).shape == (len(y), ways)
    x = torch.randn(6, 1, 8, 8, generator=g)
    with pytest.raises(ValueError, match="y has no example of class 1; the network's head is built from every class 0 to 2 of the support set"):
        generate(model, x, torch.tensor([0, 0, 2, 2, 0, 2]))
    with pytest.raises(ValueError, match="y holds one class; a task tells at least two classes apart"):
        generate(model, x, torch.zeros(6, dtype=torch.long))
    learned = load_run(runs["img"])[0]
    learned.proto = False  # a learned head keeps the space's outputs
    with pytest.raises(ValueError, match="this network has 3 classes"):
        generate(learned, torch.randn(8, 1, 8, 8), torch.arange(4).repeat_interleave(2))
    assert generate(learned, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])).module(torch.randn(4, 1, 8, 8)).shape == (4, 3)
