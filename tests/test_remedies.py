"""Options against architecture collapse: each does what it says, and nothing when off."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from metanet.config import ConfigError, TrainConfig
from metanet.meta import MetaNet, ModelConfig, meta_loss
from metanet.space import load
from metanet.tasks import Sinusoid
from metanet.trainer import build_model, build_space, train


def _tiny_model(**kw) -> MetaNet:
    torch.manual_seed(0)
    return MetaNet(load("tiny"), 0, ModelConfig(**kw))


def _episode(model: MetaNet, b: int = 3):
    g = torch.Generator().manual_seed(1)
    c, s = model.space.task.input[0], model.space.task.input[-1]
    ways = model.space.task.outputs
    sx, qx = torch.randn(b, ways, c, s, s, generator=g), torch.randn(b, 2 * ways, c, s, s, generator=g)
    sy = torch.arange(ways).repeat(b, 1)
    qy = torch.arange(ways).repeat(b, 2)
    from metanet.tasks import Episode

    return Episode(sx, sy, qx, qy, None)


def test_param_free_marks_exactly_the_ops_without_weights() -> None:
    model = _tiny_model()
    free = model.arch.param_free
    for cp in model.plan.cells:
        for e in cp.edges:
            for call in e.ops:
                assert bool(free[e.index, call.col]) == (not call.params), (e.index, call.label)
    assert free.any() and (~free & model.arch.mask).any()


def test_op_dropout_leaves_out_only_parameter_free_ops_and_is_off_at_zero() -> None:
    model = _tiny_model()
    e = torch.randn(4, model.config.dim)
    a0, _ = model.arch(e, generator=torch.Generator().manual_seed(3))
    a_off, _ = model.arch(e, generator=torch.Generator().manual_seed(3), drop=0.0)
    torch.testing.assert_close(a0, a_off, rtol=0, atol=0)
    a_all, logits = model.arch(e, generator=torch.Generator().manual_seed(3), drop=0.999999)
    free, mask = model.arch.param_free, model.arch.mask
    with_weights = (mask & ~free).any(-1)  # edges that keep an op with weights
    assert torch.all(a_all[:, with_weights][free[with_weights].expand(4, -1, -1)] == 0)
    torch.testing.assert_close(a_all.sum(-1), torch.ones_like(a_all.sum(-1)))
    torch.testing.assert_close(logits, model.arch.logits(e))  # the logits returned are undropped
    half = [model.arch(e, generator=torch.Generator().manual_seed(s), drop=0.5)[0] for s in (4, 4, 5)]
    torch.testing.assert_close(half[0], half[1], rtol=0, atol=0)  # drawn from the generator
    assert not torch.equal(half[0], half[2])


def test_param_prior_pushes_the_architecture_towards_ops_with_weights() -> None:
    model = _tiny_model(arch="shared")
    ep = _episode(model)

    def grad(prior: float) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss, m = meta_loss(model, ep, inner_steps=1, param_prior=prior, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert 0 < m["param_free"] < 1
        return model.arch.bias.grad.clone()

    extra = grad(1.0) - grad(0.0)  # the prior's own gradient on the shared logits
    free, mask = model.arch.param_free, model.arch.mask
    assert torch.all(extra[free] > 0)  # descent lowers the parameter-free logits ...
    assert torch.all(extra[mask & ~free] < 0)  # ... and raises the others


def test_arch_hidden_is_an_mlp_and_starts_near_the_shared_encoding() -> None:
    lin, mlp = _tiny_model(), _tiny_model(arch_hidden=16)
    assert isinstance(lin.arch.proj, torch.nn.Linear) and isinstance(mlp.arch.proj, torch.nn.Sequential)
    e = torch.randn(5, mlp.config.dim)
    logits = mlp.arch.logits(e)
    assert logits.shape == (5, *mlp.space.alpha_shape)
    finite = logits[torch.isfinite(logits)]
    assert finite.abs().max() < 0.2 and finite.std() > 0  # per-task, but close to the shared zeros


def test_arch_norm_makes_the_logits_blind_to_the_embedding_scale() -> None:
    """The growth of the task embedding's scale alone (x10) moves the unnormalised map's
    logits tenfold, and the normalised map's not at all; both stay per-task."""
    for hidden in (0, 16):
        plain, normed = _tiny_model(arch_hidden=hidden), _tiny_model(arch_hidden=hidden, arch_norm=True)
        normed.arch.load_state_dict(plain.arch.state_dict())  # the same parameters: only the input differs
        e = torch.randn(5, plain.config.dim) + 0.5
        mask = plain.arch.mask.expand(5, *plain.space.alpha_shape)
        torch.testing.assert_close(normed.arch.logits(10 * e)[mask], normed.arch.logits(e)[mask])
        assert normed.arch.logits(e)[mask].view(5, -1).std(0).max() > 0  # still depends on the task
        if hidden == 0:  # a linear map with zero bias: exactly ten times the per-task part
            torch.testing.assert_close(plain.arch.logits(10 * e)[mask], 10 * plain.arch.logits(e)[mask])
        expected = F.layer_norm(e, e.shape[-1:])
        torch.testing.assert_close(normed.arch.logits(e)[mask], plain.arch.logits(expected)[mask])


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(space="mlp_regression", tasks="sinusoid", steps=4, meta_batch=2, val_every=4, val_tasks=2, eval_inner_steps=1, strategy="loop", log_every=1, **kw)


def test_arch_warmup_keeps_the_architecture_generator_still_then_lets_it_learn(tmp_path, monkeypatch) -> None:
    cfg = _cfg(arch_warmup=0.5)
    start = build_model(cfg, build_space(cfg), Sinusoid().n_families)
    seen = []
    from metanet import trainer

    original = trainer._Run.step

    def step(run):
        before = [p.detach().clone() for p in run.model.arch.parameters()]
        body = [p.detach().clone() for p in run.model.weights.parameters()]
        out = original(run)
        seen.append((all(torch.equal(a, b) for a, b in zip(before, run.model.arch.parameters())), not all(torch.equal(a, b) for a, b in zip(body, run.model.weights.parameters()))))
        return out

    monkeypatch.setattr(trainer._Run, "step", step)
    train(cfg, tmp_path / "run")
    assert seen == [(True, True), (True, True), (False, True), (False, True)]
    assert sum(p.numel() for p in start.arch.parameters()) > 0


def test_arch_lr_gives_the_architecture_generator_its_own_rate(tmp_path, monkeypatch) -> None:
    from metanet import trainer

    groups = []
    original = trainer._Run.step

    def step(run):
        out = original(run)
        groups.append([(len(g["params"]), g["lr"]) for g in run.opt.param_groups])
        return out

    monkeypatch.setattr(trainer._Run, "step", step)
    cfg = _cfg(arch_lr=3e-4, schedule="constant")
    train(cfg, tmp_path / "run")
    model = build_model(cfg, build_space(cfg), 0)
    n_arch = len(list(model.arch.parameters()))
    assert groups[0] == [(len(list(model.parameters())) - n_arch, 1e-3), (n_arch, 3e-4)]
    # resume (from a last.pt written at step 2) keeps both groups and their rates
    train(dataclasses.replace(cfg, ckpt_every=1), tmp_path / "run2", stop_after=2)
    assert (tmp_path / "run2" / "last.pt").is_file()
    train(None, tmp_path / "run2", resume=True)  # type: ignore[arg-type]
    assert groups[-1] == groups[0]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("arch_warmup", 1.0, "config: arch_warmup must be a number in [0, 1), got 1.0"),
    ("op_dropout", -0.1, "config: op_dropout must be a number in [0, 1), got -0.1"),
    ("param_prior", -1.0, "config: param_prior must be a finite number >= 0, got -1.0"),
    ("arch_lr", 0.0, "config: arch_lr must be a finite number > 0 or null, got 0.0"),
    ("arch_hidden", -2, "config: arch_hidden must be an integer >= 0, got -2"),
])  # fmt: skip
def test_remedy_options_are_checked(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(TrainConfig(), **{field: value})
    assert str(e.value) == message


def test_the_weight_bound_keeps_every_modulation_inside_it_and_is_off_at_zero() -> None:
    free, bounded = _tiny_model(proto_head=False), _tiny_model(proto_head=False, weight_bound=0.5)  # the learned head: its bias is generated
    bounded.load_state_dict(free.state_dict())
    ep = _episode(free)
    for model in (free, bounded):
        with torch.no_grad():  # a decoder that has run away
            model.weights.decoder.bias.fill_(20.0)
    gen = {id(m): m.generate(ep.support_x, ep.support_y, sample=False) for m in (free, bounded)}
    base = free.weights.base
    for name in ("stem.w", "head.b"):
        key = name.replace(".", "__")
        g_free, g_bound = gen[id(free)].params[name], gen[id(bounded)].params[name]
        if name.endswith(".w"):  # a scale 1 + m per output channel
            torch.testing.assert_close(g_free, (base[key] * 21.0).expand_as(g_free))
            ratio = g_bound / base[key]
            assert (ratio < 1.5 + 1e-6).all() and (ratio > 1.49).all()
        else:  # a shift m
            torch.testing.assert_close(g_free, (base[key] + 20.0).expand_as(g_free))
            assert ((g_bound - base[key]) < 0.5 + 1e-6).all()
    # small modulations pass almost unchanged: c * tanh(m / c) = m - m^3 / (3 c^2) + ...
    m = torch.tensor(0.01)
    assert abs(0.5 * torch.tanh(m / 0.5) - m) < 2e-6
    with pytest.raises(ConfigError, match="weight_bound must be a finite number >= 0"):
        TrainConfig(weight_bound=-1.0)
