"""The LSTM inner optimizer against plain SGD, a float64 gradcheck, and a run that uses it."""

from __future__ import annotations

import pytest
import torch

from metanet import space as spaces
from metanet.inner import LSTMRule, preprocess
from metanet.meta import MetaNet, ModelConfig, adapt_discrete, evaluate, generate_networks, sgd
from metanet.tasks import Episode
from metanet.trainer import TrainConfig, load_run, train


def _episode(b=2, ways=3, shots=1, queries=2, size=8, seed=0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    n_s, n_q = ways * shots, ways * queries
    return Episode(
        torch.randn(b, n_s, 1, size, size, generator=g, dtype=torch.float64),
        torch.arange(ways).repeat_interleave(shots).expand(b, n_s).contiguous(),
        torch.randn(b, n_q, 1, size, size, generator=g, dtype=torch.float64),
        torch.arange(ways).repeat_interleave(queries).expand(b, n_q).contiguous(),
    )


def _model(optimizer: str) -> MetaNet:
    torch.manual_seed(0)
    return MetaNet(spaces.load("tiny"), 0, ModelConfig(dim=8, latent=4, inner_lr=0.1, inner_optimizer=optimizer)).double()


def test_preprocess_matches_its_two_regimes() -> None:
    x = torch.tensor([2.0, -1e-3, 1e-6, 0.0], dtype=torch.float64)
    f = preprocess(x)
    torch.testing.assert_close(f[:2, 0], torch.log(x[:2].abs()) / 10)
    torch.testing.assert_close(f[:2, 1], torch.sign(x[:2]))
    torch.testing.assert_close(f[2:, 0], torch.full((2,), -1.0, dtype=torch.float64))
    torch.testing.assert_close(f[2:, 1], x[2:] * torch.exp(torch.tensor(10.0, dtype=torch.float64)))


@pytest.mark.parametrize("create_graph", [True, False])
def test_lstm_rule_at_its_start_reproduces_sgd_exactly(create_graph: bool) -> None:
    """Training (second and first order) and evaluation: the same adapted weights as SGD."""
    sgd_model, lstm_model = _model("sgd"), _model("lstm")
    lstm_model.load_state_dict(sgd_model.state_dict(), strict=False)
    ep = _episode()
    out = []
    for model in (sgd_model, lstm_model):
        gen = model.generate(ep.support_x, ep.support_y)
        _, adapted = model.adapt(gen, ep.support_x, ep.support_y, 3, create_graph=create_graph)
        out.append(adapted)
    for k in out[0]:
        assert torch.equal(out[0][k], out[1][k]), k
    nets = [generate_networks(m, ep) for m in (sgd_model, lstm_model)]
    for m, n in zip((sgd_model, lstm_model), nets):
        n[0].params = adapt_discrete(m.plan, n[0].genotype, n[0].params, ep.support_x[0], ep.support_y[0], 3, m.step_size, m.kind, m.inner_rule)
    for k in nets[0][0].params:
        assert torch.equal(nets[0][0].params[k], nets[1][0].params[k]), k


def test_a_moved_lstm_rule_is_not_sgd_and_keeps_a_state() -> None:
    rule = LSTMRule().double()
    with torch.no_grad():
        rule.readout.weight.normal_(0, 0.5)
        rule.forget_scale.fill_(0.3)
    v, g = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    loss = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    new, state = rule.step(v, g, loss, 0.1, None)
    assert not torch.allclose(new, v - 0.1 * g)
    again, _ = rule.step(v, g, loss, 0.1, state)
    assert not torch.equal(again, new)  # the state carries over steps
    assert state[0].shape == (10, rule.hidden)


def test_the_first_step_skips_the_zero_state_and_equals_the_cell() -> None:
    """The rule's first step (zero state) computes what ``nn.LSTMCell`` computes from a
    zero state, in value and in first and second derivatives (float64)."""
    rule = LSTMRule().double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a moved cell, its two biases apart
        for p in rule.cell.parameters():
            p.normal_(0, 0.5, generator=g)
    x = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    zeros = torch.zeros(7, rule.hidden, dtype=torch.float64)
    params = [x, rule.cell.weight_ih, rule.cell.bias_ih, rule.cell.bias_hh]
    w = torch.randn(2, 7, rule.hidden, dtype=torch.float64, generator=g)

    def grads(h: torch.Tensor, c: torch.Tensor) -> list[torch.Tensor]:
        first = torch.autograd.grad((w[0] * h.tanh() + w[1] * c * h).sum(), params, create_graph=True)
        return [h, c, *first, *torch.autograd.grad(sum((t * t).sum() for t in first), params)]

    for ours, cell in zip(grads(*rule._first(x)), grads(*rule.cell(x, (zeros, zeros)))):
        torch.testing.assert_close(ours, cell, rtol=1e-12, atol=1e-12)


def test_lstm_meta_gradient_gradcheck() -> None:
    """float64 gradcheck of the second-order meta-gradient through the LSTM rule (2 inner
    steps), with respect to the rule's own weights and the generators'."""
    model = _model("lstm")
    with torch.no_grad():  # away from the SGD start, so that every part of the rule matters
        model.inner_rule.readout.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
        model.inner_rule.forget_scale.fill_(0.2)
    episode = _episode()
    names = ["inner_rule.readout.weight", "inner_rule.forget_scale", "inner_rule.cell.weight_ih", "arch.bias", "weights.base.head__w"]
    named = dict(model.named_parameters())
    inputs = tuple(named[n].detach().clone().requires_grad_() for n in names)

    def objective(*tensors):
        loss, _ = torch.func.functional_call(model, dict(zip(names, tensors)), (episode,), {"inner_steps": 2, "order": "second", "generator": torch.Generator().manual_seed(1)})
        return loss

    assert torch.autograd.gradcheck(objective, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_sgd_refuses_checkpointing_a_learned_rule() -> None:
    with pytest.raises(ValueError, match="do not carry a learned rule's state"):
        sgd(lambda p, c: p["w"].sum(), {"w": torch.ones(2)}, 1, lambda k, c: 0.1, create_graph=True, checkpoint=True, rule=LSTMRule())


def test_a_run_with_the_lstm_optimizer_saves_and_reloads_it(tmp_path) -> None:
    cfg = TrainConfig(space="mlp_regression", tasks="sinusoid", steps=3, meta_batch=2, val_every=3, val_tasks=2, eval_inner_steps=2, strategy="loop", inner_optimizer="lstm")
    train(cfg, tmp_path / "run")
    model, loaded = load_run(tmp_path / "run")
    assert loaded.inner_optimizer == "lstm" and model.inner_rule is not None
    assert model.inner_rule.forget_scale.item() != 0.0  # meta-trained away from SGD
    from metanet.tasks import Sinusoid

    episodes = [Sinusoid().sample(2, torch.Generator().manual_seed(5))]
    assert evaluate(model, episodes, 2)["n"] == 2


def test_evaluating_at_several_step_counts_equals_each_alone_with_the_lstm_rule() -> None:
    """The rule's state lives within one adaptation: ``evaluate(.., [0, 1, 3])`` scores the
    counts along one 3-step adaptation, which must equal each count adapted alone from the
    generated weights (the slow reference); adapting on from the 1-step weights with a
    fresh state would give another figure (checked too)."""
    import dataclasses

    from metanet.meta import evaluate_task
    from metanet.tasks import Sinusoid

    torch.manual_seed(0)
    model = MetaNet(spaces.load("mlp_regression"), 0, ModelConfig(dim=8, latent=4, inner_lr=0.01, inner_optimizer="lstm")).double()
    with torch.no_grad():
        model.inner_rule.readout.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
        model.inner_rule.forget_scale.fill_(0.2)
    raw = Sinusoid(shots=5, queries=10).sample(2, torch.Generator().manual_seed(3))
    ep = Episode(*(t.double() for t in (raw.support_x, raw.support_y, raw.query_x, raw.query_y)))
    along = evaluate(model, [ep], [3, 0, 1])
    for k in (0, 1, 3):
        assert along[k] == evaluate(model, [ep], k), k
    net = generate_networks(model, ep)[0]
    _, after_one = evaluate_task(model, net, ep.support_x[0], ep.support_y[0], ep.query_x[0], ep.query_y[0], 1)
    on, _ = evaluate_task(model, dataclasses.replace(net, params=after_one), ep.support_x[0], ep.support_y[0], ep.query_x[0], ep.query_y[0], 2)
    fresh, _ = evaluate_task(model, net, ep.support_x[0], ep.support_y[0], ep.query_x[0], ep.query_y[0], 3)
    assert on != fresh
