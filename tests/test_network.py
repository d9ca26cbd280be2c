"""Generated networks against references: the supernet, evaluate_task, torch.export, a reload."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.testing import assert_close

from metanet import space as spaces
from metanet.executor import forward
from metanet.network import DiscreteNetwork, GenerateError, generate, generate_batch, load_generated
from metanet.generators import safe_name
from metanet.meta import MetaNet, ModelConfig, evaluate_task, generate_networks, task_metric
from metanet.tasks import Episode, Multimodal

SPACES = ["mlp_regression", "tiny"]


def _model(name, n_families=0, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, latent=8, **{"inner_lr": 0.001 if name == "mlp_regression" else 0.05, **kw})
    return MetaNet(spaces.load(name), n_families, cfg)


def _task(name, seed=0, n=10, queries=12):
    """One task's support and query sets (no task dimension) for space ``name``."""
    g = torch.Generator().manual_seed(seed)
    if name == "mlp_regression":
        ep = Multimodal(shots=n, queries=queries).sample(1, g)
        return ep.support_x[0], ep.support_y[0], ep.query_x[0], ep.query_y[0]
    ways = 3
    x = torch.randn(n + queries, 1, 8, 8, generator=g)
    y = torch.arange(n + queries) % ways
    x = x + y.float()[:, None, None, None]  # learnable: the mean brightness is the class
    return x[:n], y[:n], x[n:], y[n:]


@pytest.mark.parametrize("name", SPACES)
def test_module_holds_only_the_genotype_weights_and_equals_the_one_hot_supernet(name):
    model = _model(name)
    sx, sy, qx, _ = _task(name)
    net = generate(model, sx, sy)
    used = model.plan.slot_names(net.genotype)
    assert {n for n, _ in net.module.named_parameters()} == {safe_name(n) for n in used}
    assert len(used) < len(model.plan.slots)  # a strict subset of the supernet's weights
    assert list(net.module.buffers()) == []
    # reference: the supernet with the genotype's one-hot encoding and ALL generated weights
    # (the module's own where it has them: a classifier's head may come from prototypes)
    with torch.no_grad():
        gen = model.generate(sx[None], sy[None])
        full = {k: v[0] for k, v in gen.params.items()}
        mine = {k: v.detach() for k, v in net.module.weights().items()}
        ref = forward(model.plan, net.genotype.to_alpha(model.space), {**full, **mine}, qx, fused=False)
        out = net.module(qx)
    assert out.shape == (len(qx), model.space.task.outputs)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for n in used:  # the module's weights are the generated ones
        if not (model.proto and n.startswith("head.")):
            assert torch.equal(mine[n], full[n]), n


@pytest.mark.parametrize("name", SPACES)
def test_adapted_generate_gives_the_query_metric_of_evaluate_task(name):
    model = _model(name, meta_sgd=True)  # step sizes come from the model, per weight
    sx, sy, qx, qy = _task(name)
    steps = 3
    net = generate(model, sx, sy, adapt_steps=steps)
    with torch.no_grad():
        ours = float(task_metric(model.kind, net.module(qx)[None], qy[None])[0])
    ep = Episode(sx[None], sy[None], qx[None], qy[None])
    ref_net = generate_networks(model, ep)[0]
    ref, ref_params = evaluate_task(model, ref_net, sx, sy, qx, qy, steps)
    assert ours == ref  # the same code path: equal floats
    assert net.genotype == ref_net.genotype
    for k, v in ref_params.items():
        assert torch.equal(getattr(net.module, safe_name(k)).detach(), v)
    unadapted = generate(model, sx, sy)
    assert any(not torch.equal(v, getattr(unadapted.module, safe_name(k)).detach()) for k, v in ref_params.items())
    assert net.adapt_steps == steps and net.adapt_ms > 0


@pytest.mark.parametrize("name", SPACES)
def test_export_matches_the_module_for_any_batch_size(name, tmp_path):
    model = _model(name)
    sx, sy, qx, _ = _task(name)
    net = generate(model, sx, sy)
    path = net.export(tmp_path / "model.pt2")
    program = torch.export.load(path).module()
    with torch.no_grad():
        for x in (sx, qx, qx[:2], qx[:1]):  # batch 10, 12, 2 and 1: the batch dimension is symbolic
            assert_close(program(x), net.module(x))


def test_exported_program_runs_in_a_process_without_metanet(tmp_path):
    cases = {}
    for name in SPACES:
        sx, sy, qx, _ = _task(name)
        net = generate(_model(name), sx, sy)
        net.export(tmp_path / f"{name}.pt2")
        with torch.no_grad():
            cases[name] = {"x": qx, "y": net.module(qx)}
    torch.save({f"{n}.{k}": v for n, c in cases.items() for k, v in c.items()}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        for name in {SPACES!r}:
            program = torch.export.load({str(tmp_path)!r} + f"/{{name}}.pt2").module()
            torch.testing.assert_close(program(io[name + ".x"]), io[name + ".y"])
        assert "metanet" not in sys.modules, sorted(m for m in sys.modules if m.startswith("metanet"))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("name", SPACES)
def test_saved_network_reloads_from_its_files_alone(name, tmp_path):
    model = _model(name)
    sx, sy, qx, _ = _task(name)
    net = generate(model, sx, sy, adapt_steps=1)
    net.save(tmp_path / "net")
    # the whole product (what load_generated reads, and the exports, graphs and summary)
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == ["alpha.txt", "genotype.json", "graph.dot", "graph.graphml", "graph.json", "graph.png", "model.pt2", "network.json", "space.yaml", "summary.txt", "weights.safetensors"]
    del model
    back = load_generated(tmp_path / "net")
    assert back.genotype == net.genotype
    assert torch.equal(back.alpha, net.alpha)
    assert back.latent is not None and torch.equal(back.latent, net.latent)
    assert back.module.state_dict().keys() == net.module.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(back.module(qx), net.module(qx))
    info = json.loads((tmp_path / "net" / "network.json").read_text())
    assert (info["space_name"], info["kind"], info["input"], info["outputs"]) == (name, back.kind, list(back.space.task.input), back.space.task.outputs)


def test_reload_keeps_a_runs_number_of_classes(tmp_path):
    """A run resizes the classifier to ``ways``; space.yaml still says 3, network.json says 5."""
    space = spaces.load("tiny")
    five = dataclasses.replace(space, task=dataclasses.replace(space.task, outputs=5))
    torch.manual_seed(0)
    model = MetaNet(five, 0, ModelConfig(dim=16, latent=8))
    x = torch.randn(10, 1, 8, 8)
    net = generate(model, x, torch.arange(10) % 5)
    net.save(tmp_path / "net")
    assert "outputs: 3" in (tmp_path / "net" / "space.yaml").read_text()
    back = load_generated(tmp_path / "net")
    assert back.space.task.outputs == 5
    with torch.no_grad():
        assert back.module(x).shape == (10, 5)
        assert torch.equal(back.module(x), net.module(x))


def test_load_generated_names_the_bad_file(tmp_path):
    net = generate(_model("tiny"), *_task("tiny")[:2])
    net.save(tmp_path / "net")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenerateError, match="empty: not a saved network \\(missing network.json\\)"):
        load_generated(tmp_path / "empty")
    with pytest.raises(GenerateError, match="nowhere: no such folder"):
        load_generated(tmp_path / "nowhere")
    from metanet.checkpoint import load_weights, save_weights

    tensors, meta = load_weights(tmp_path / "net" / "weights.safetensors")
    save_weights(tmp_path / "net" / "weights.safetensors", {**tensors, "cells__0__e0_1__conv_1x1__w": torch.zeros(4, 4, 1, 1)}, meta)
    with pytest.raises(GenerateError, match=r"weights.safetensors: has cells__0__e0_1__conv_1x1__w, which the genotype does not use"):
        load_generated(tmp_path / "net")
    del tensors[next(iter(tensors))]
    save_weights(tmp_path / "net" / "weights.safetensors", tensors, meta)
    with pytest.raises(GenerateError, match=r"weights.safetensors: lacks "):
        load_generated(tmp_path / "net")


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_finetune_reduces_the_support_loss(name, optimizer):
    sx, sy, _, _ = _task(name)
    net = generate(_model(name), sx, sy)
    before = {k: v.detach().clone() for k, v in net.module.state_dict().items()}
    lr = {"sgd": 0.002 if name == "mlp_regression" else 0.2, "adam": 0.01}[optimizer]
    losses = net.finetune(sx, sy, steps=20, lr=lr, optimizer=optimizer)
    assert len(losses) == 21
    assert losses[-1] < 0.7 * losses[0], losses
    assert losses[-1] == net.loss(sx, sy)
    assert any(not torch.equal(before[k], v) for k, v in net.module.state_dict().items())


def test_the_module_is_a_plain_module_any_optimizer_can_train():
    sx, sy, _, _ = _task("mlp_regression")
    net = generate(_model("mlp_regression"), sx, sy)
    assert isinstance(net.module, torch.nn.Module) and isinstance(net.module, DiscreteNetwork)
    opt = torch.optim.RMSprop(net.module.parameters(), lr=1e-3)
    first = None
    for _ in range(10):
        loss = (net.module(sx) - sy).pow(2).mean()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert net.loss(sx, sy) < first


def test_regression_targets_with_or_without_the_output_dim_give_the_same_network():
    model = _model("mlp_regression")
    sx, sy, qx, _ = _task("mlp_regression")
    a, b = generate(model, sx, sy), generate(model, sx.numpy(), sy[:, 0].numpy())
    c = generate(model, sx.double().numpy(), sy.double().numpy())  # numpy's default float64
    assert a.genotype == b.genotype == c.genotype
    with torch.no_grad():
        assert torch.equal(a.module(qx), b.module(qx))
        assert torch.equal(a.module(qx), c.module(qx))


def test_inputs_take_the_models_dtype():
    model = _model("tiny").double()
    sx, sy, qx, qy = _task("tiny")
    net = generate(model, sx, sy, adapt_steps=1)  # float32 inputs, float64 model
    assert all(p.dtype == torch.float64 for p in net.module.parameters())
    assert net.finetune(sx, sy, 2, 0.01)[-1] == net.loss(sx, sy)
    assert 0.0 <= net.metric(qx, qy) <= 1.0


def test_generation_is_timed_and_deterministic_unless_sampled():
    model = _model("mlp_regression")
    sx, sy, qx, _ = _task("mlp_regression")
    a, b = generate(model, sx, sy), generate(model, sx, sy)
    assert 0 < a.generation_ms < 60_000
    with torch.no_grad():
        assert torch.equal(a.module(qx), b.module(qx))
        torch.manual_seed(1)
        c = generate(model, sx, sy, sample=True)
        assert not torch.equal(c.latent, a.latent)


def test_generate_batch_matches_one_task_at_a_time():
    model = _model("tiny")
    tasks = [_task("tiny", seed=s) for s in range(3)]
    nets = generate_batch(model, torch.stack([t[0] for t in tasks]), torch.stack([t[1] for t in tasks]))
    for net, (sx, sy, qx, _) in zip(nets, tasks):
        one = generate(model, sx, sy)
        assert net.genotype == one.genotype
        with torch.no_grad():
            assert_close(net.module(qx), one.module(qx))


def test_metadata_reaches_the_encoder():
    model = _model("mlp_regression", n_families=5)
    sx, sy, _, _ = _task("mlp_regression")
    a, b = generate(model, sx, sy, metadata=0), generate(model, sx, sy, metadata=3)
    assert not torch.equal(a.embedding, b.embedding)
    assert a.metadata == 0 and b.metadata == 3


@pytest.mark.parametrize(
    "name, x, y, meta, message",
    [
        ("mlp_regression", torch.zeros(5, 2), torch.zeros(5), None, r"x has shape \(5, 2\); space 'mlp_regression' expects \(N, 1\)"),
        ("mlp_regression", torch.zeros(5, 1), torch.zeros(4), None, r"y has shape \(4,\) but x has \(5, 1\)"),
        ("mlp_regression", torch.zeros(5, 1), torch.zeros(5, 2), None, r"y has shape \(5, 2\); space 'mlp_regression' expects \(N\) or \(N, 1\) targets"),
        ("mlp_regression", torch.tensor([[0.0], [float("nan")]]), torch.zeros(2), None, "x holds NaN or infinite values"),
        ("mlp_regression", torch.zeros(2, 1), torch.tensor([0.0, float("inf")]), None, "y holds NaN or infinite values"),
        ("mlp_regression", torch.zeros(2, 1), torch.zeros(2), 0, "this model was trained without task metadata"),
        ("tiny", torch.zeros(3, 1, 8, 8), torch.tensor([0, 1, 3]), None, "y has no example of class 2; the network's head is built from every class 0 to 3 of the support set"),
        ("tiny", torch.zeros(3, 1, 8, 8), torch.tensor([0, 1, -1]), None, "y holds class id -1; class ids start at 0"),
        ("tiny", torch.zeros(3, 1, 8, 8), torch.tensor([0, -1, 2]), None, r"y holds class id -1"),
        ("tiny", torch.zeros(2, 1, 8, 8), torch.tensor([0.0, 0.5]), None, "y must hold integer class ids, got fractional values"),
        ("tiny", torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]), None, r"x has shape \(2, 1, 28, 28\); space 'tiny' expects \(N, 1, 8, 8\)"),
        ("tiny", torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), None, "the support set is empty"),
    ],
)
def test_bad_support_sets_are_refused_with_a_one_line_message(name, x, y, meta, message):
    with pytest.raises(GenerateError, match=message) as info:
        generate(_model(name), x, y, metadata=meta)
    assert "\n" not in str(info.value)


def test_bad_metadata_and_steps_are_refused():
    model = _model("mlp_regression", n_families=5)
    sx, sy, _, _ = _task("mlp_regression")
    with pytest.raises(GenerateError, match=r"metadata id 5 is out of range: this model knows families 0 to 4 \(-1: unknown\)"):
        generate(model, sx, sy, metadata=5)
    with pytest.raises(GenerateError, match="adapt_steps must be an integer >= 0, got -1"):
        generate(model, sx, sy, adapt_steps=-1)
    net = generate(model, sx, sy, metadata=-1)
    with pytest.raises(GenerateError, match="optimizer must be one of sgd, adam, got 'lbfgs'"):
        net.finetune(sx, sy, 1, 0.1, optimizer="lbfgs")


def test_save_replaces_a_saved_network_but_not_a_foreign_folder(tmp_path):
    model = _model("mlp_regression")
    sx, sy, _, _ = _task("mlp_regression")
    net = generate(model, sx, sy)
    net.save(tmp_path / "net")
    net.save(tmp_path / "net")  # a saved network: replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(GenerateError, match="is not empty and holds no saved network; give replace=True"):
        net.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "net"]  # no temporary folder left


def test_a_failed_save_puts_the_old_folder_back(tmp_path, monkeypatch):
    from metanet import export

    model = _model("mlp_regression")
    sx, sy, _, _ = _task("mlp_regression")
    net = generate(model, sx, sy)
    net.save(tmp_path / "net")
    before = {p.name: p.read_bytes() for p in (tmp_path / "net").iterdir()}
    monkeypatch.setattr(export, "to_dot", lambda g: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        net.save(tmp_path / "net")
    assert {p.name: p.read_bytes() for p in (tmp_path / "net").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]
