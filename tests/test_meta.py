"""The meta-learner against references: gradcheck, loop vs vmap, orders, training."""

import dataclasses

import pytest
import torch

from metanet import space as spaces
from metanet.meta import MetaNet, ModelConfig, meta_loss, task_loss
from metanet.tasks import Episode, Sinusoid
from metanet.trainer import TrainConfig, load_run, train


def _image_episode(b=2, ways=3, shots=1, queries=2, size=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_s, n_q = ways * shots, ways * queries
    return Episode(
        torch.randn(b, n_s, 1, size, size, generator=g, dtype=dtype),
        torch.arange(ways).repeat_interleave(shots).expand(b, n_s).contiguous(),
        torch.randn(b, n_q, 1, size, size, generator=g, dtype=dtype),
        torch.arange(ways).repeat_interleave(queries).expand(b, n_q).contiguous(),
    )


def _tiny_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=8, latent=4, inner_lr=0.1, **kw)
    return MetaNet(spaces.load("tiny"), 0, cfg).double()


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_meta_gradient_gradcheck_second_order(strategy):
    """float64 gradcheck of the second-order meta-gradient w.r.t. generator parameters."""
    model = _tiny_model()
    episode = _image_episode()
    names = ["arch.bias", "weights.decoder.bias", "weights.base.head__w", "weights.base.cells__0__e0_1__conv_3x3__w"]
    named = dict(model.named_parameters())
    inputs = tuple(named[n].detach().clone().requires_grad_() for n in names)

    def objective(*tensors):
        loss, _ = torch.func.functional_call(
            model, dict(zip(names, tensors)), (episode,),
            {"inner_steps": 2, "order": "second", "strategy": strategy, "generator": torch.Generator().manual_seed(1)},
        )  # fmt: skip
        return loss

    assert torch.autograd.gradcheck(objective, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_second_order_differs_from_first_order():
    model = _tiny_model()
    episode = _image_episode()
    grads = {}
    for order in ("second", "first"):
        model.zero_grad()
        loss, _ = meta_loss(model, episode, inner_steps=2, order=order, generator=torch.Generator().manual_seed(1))
        loss.backward()
        grads[order] = model.arch.bias.grad.clone()
    assert not torch.allclose(grads["second"], grads["first"])


@pytest.mark.parametrize("name", ["tiny", "mlp_regression"])
def test_batched_inner_loop_equals_per_task_loop(name):
    """vmap over tasks == loop over tasks == adapting each task on its own (values and meta-grads)."""
    torch.manual_seed(0)
    sp = spaces.load(name)
    model = MetaNet(sp, 0, ModelConfig(dim=8, latent=4, inner_lr=0.05)).double()
    if sp.task.kind == "classification":
        episode = _image_episode(b=3)
    else:
        ep = Sinusoid(shots=5, queries=5).sample(3, torch.Generator().manual_seed(0))
        episode = Episode(*(t.double() for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y)))
    results = {}
    for strategy in ("loop", "vmap"):
        model.zero_grad()
        gen = model.generate(episode.support_x, episode.support_y)
        _, adapted = model.adapt(gen, episode.support_x, episode.support_y, 2, create_graph=True, strategy=strategy)
        q = task_loss(model.kind, model.predict(gen.alpha, adapted, episode.query_x, strategy), episode.query_y)
        q.sum().backward()
        results[strategy] = (q.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results["loop"][0], results["vmap"][0])
    for k, g in results["loop"][1].items():
        torch.testing.assert_close(g, results["vmap"][1][k], msg=k)
    # each task alone (B = 1) gives the same per-task query loss
    gen = model.generate(episode.support_x, episode.support_y)
    for b in range(3):
        one = {k: v[b : b + 1] for k, v in gen.params.items()}
        g1 = dataclasses.replace(gen, params=one, alpha=gen.alpha[b : b + 1])
        _, adapted = model.adapt(g1, episode.support_x[b : b + 1], episode.support_y[b : b + 1], 2, create_graph=False)
        qb = task_loss(model.kind, model.predict(g1.alpha, adapted, episode.query_x[b : b + 1]), episode.query_y[b : b + 1])
        torch.testing.assert_close(qb[0], results["loop"][0][b])


def test_first_order_and_reptile_gradients_match_their_definitions():
    """MAML baseline (fixed arch, no VAE): FO grad = grad at adapted weights; Reptile = mean(theta0 - thetak)."""
    torch.manual_seed(0)
    model = MetaNet(spaces.load("mlp_maml"), 0, ModelConfig(arch="fixed", weights="off", inner_lr=0.05)).double()
    ep = Sinusoid(shots=5, queries=5).sample(4, torch.Generator().manual_seed(0))
    ep = Episode(*(t.double() for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y)))
    base = {k.replace("__", "."): p for k, p in model.weights.base.items()}
    gen = model.generate(ep.support_x, ep.support_y)
    _, adapted = model.adapt(gen, ep.support_x, ep.support_y, 3, create_graph=False)
    adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    q = task_loss(model.kind, model.predict(gen.alpha, adapted, ep.query_x), ep.query_y).mean()
    expected_fo = dict(zip(adapted, torch.autograd.grad(q, list(adapted.values()))))
    model.zero_grad()
    loss, _ = meta_loss(model, ep, inner_steps=3, order="first", beta=0.0)
    loss.backward()
    for k, p in base.items():
        torch.testing.assert_close(p.grad, expected_fo[k].sum(0), msg=k)
    model.zero_grad()
    loss, _ = meta_loss(model, ep, inner_steps=3, order="reptile", beta=0.0)
    loss.backward()
    for k, p in base.items():
        torch.testing.assert_close(p.grad, (p.detach() - adapted[k].detach()).mean(0), msg=k)


def test_meta_sgd_learns_step_sizes():
    model = _tiny_model(meta_sgd=True)
    loss, _ = meta_loss(model, _image_episode(), inner_steps=1)
    loss.backward()
    grads = [p.grad for p in model.lrs.values()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_adapt_alpha_changes_alpha_and_reaches_arch_generator():
    model = _tiny_model(adapt_alpha=True)
    ep = _image_episode()
    gen = model.generate(ep.support_x, ep.support_y)
    alpha, _ = model.adapt(gen, ep.support_x, ep.support_y, 1, create_graph=True)
    assert not torch.allclose(alpha, gen.alpha)


def test_training_reduces_sinusoid_error_and_resume_is_exact(tmp_path):
    cfg = TrainConfig(space="mlp_regression", tasks="sinusoid", steps=40, meta_batch=8, val_every=20, val_tasks=16, log_every=5, strategy="vmap", seed=3)
    full = train(cfg, tmp_path / "full")
    part = train(cfg, tmp_path / "part", stop_after=20)
    assert part == {"stopped": 20}
    resumed = train(cfg, tmp_path / "part", resume=True)
    assert resumed["step"] == full["step"] == 40
    m_full, _ = load_run(tmp_path / "full", "last")
    m_res, _ = load_run(tmp_path / "part", "last")
    for (k, a), (_, b) in zip(m_full.state_dict().items(), m_res.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    rows = [l for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"val"' in l]
    assert len(rows) == 2


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_entropy_term_is_the_entropy_of_the_soft_logits(hard):
    """The entropy term regularises the logits' softmax, also when the alpha used is one-hot."""
    model = _tiny_model()
    ep = _image_episode()
    tau = 0.7
    _, m = meta_loss(model, ep, inner_steps=1, hard=hard, temperature=tau, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs = torch.softmax(model.arch.logits(model.encoder(ep.support_x, ep.support_y, None)) / tau, -1)
    mask = model.arch.mask
    expected = -(probs * probs.clamp_min(1e-30).log()).where(mask, torch.zeros(())).sum(-1).mean()
    assert m["entropy"] > 0.1 and m["entropy"] == pytest.approx(float(expected), rel=1e-9)
    # the loss carries entropy_weight times that entropy
    loss, _ = meta_loss(model, ep, inner_steps=1, hard=hard, entropy_weight=1.0, beta=0.0, temperature=tau, generator=torch.Generator().manual_seed(1))
    loss_no, _ = meta_loss(model, ep, inner_steps=1, hard=hard, entropy_weight=0.0, beta=0.0, temperature=tau, generator=torch.Generator().manual_seed(1))
    assert float((loss - loss_no).detach()) == pytest.approx(m["entropy"], rel=1e-9)


@pytest.mark.parametrize("ways", [2, 5])  # fewer and more classes than the space's 3 outputs
def test_prototype_head_serves_any_number_of_ways(ways):
    from metanet.executor import forward_genotype
    from metanet.meta import evaluate, generate_networks

    model = _tiny_model().eval()
    ep = _image_episode(b=2, ways=ways, shots=2, queries=2)
    for b, net in enumerate(generate_networks(model, ep, ways=ways)):
        feats = forward_genotype(model.plan, net.genotype, net.params, ep.support_x[b], features=True)  # (N, C)
        protos = torch.stack([feats[ep.support_y[b] == c].mean(0) for c in range(ways)])  # by hand
        scale = model.proto_scale.exp()
        torch.testing.assert_close(net.params["head.w"], 2.0 * scale * protos)
        torch.testing.assert_close(net.params["head.b"], -scale * protos.pow(2).sum(-1))
        logits = forward_genotype(model.plan, net.genotype, net.params, ep.query_x[b])
        assert logits.shape == (2 * ways, ways)
    # evaluate reads the number of classes from the labels: the same score as with it given
    nets = generate_networks(model, ep, ways=ways)
    direct = [float((forward_genotype(model.plan, n.genotype, n.params, ep.query_x[b]).argmax(-1) == ep.query_y[b]).double().mean()) for b, n in enumerate(nets)]
    assert evaluate(model, [ep], 0)["mean"] == pytest.approx(sum(direct) / len(direct))


def test_a_learned_head_refuses_other_ways():
    from metanet.meta import generate_networks

    model = _tiny_model(proto_head=False)
    with pytest.raises(ValueError, match="learned for 3-way tasks .* cannot classify 5-way"):
        generate_networks(model, _image_episode(ways=5), ways=5)
    generate_networks(model, _image_episode(ways=3), ways=3)  # its own number is fine


def _assert_same_loss_and_meta_gradients(got, ref):
    """``(loss, meta-gradients)`` pairs equal to float64 rounding, the same parameters
    reached (None on both sides or neither), and at least five with a nonzero gradient."""
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    reached = 0
    for a, b in zip(got[1], ref[1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
            reached += int(b.abs().sum() > 0)
    assert reached >= 5


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("kw", [{}, {"meta_sgd": True}, {"adapt_alpha": True}], ids=["plain", "meta_sgd", "adapt_alpha"])
def test_checkpointed_inner_steps_give_the_same_meta_gradient(strategy, kw):
    """float64: recomputing each second-order inner step in the backward pass changes no
    meta-gradient (every parameter), nor the loss."""
    model = _tiny_model(**kw)
    episode = _image_episode(b=3)
    out = {}
    for checkpoint in (False, True):
        loss, _ = meta_loss(model, episode, inner_steps=3, order="second", strategy=strategy, generator=torch.Generator().manual_seed(1), checkpoint=checkpoint)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out[checkpoint] = (loss.detach(), grads)
    _assert_same_loss_and_meta_gradients(out[True], out[False])


def test_partials_are_partial_derivatives_where_one_tensor_is_made_from_another():
    """``_partials`` differentiates with respect to each tensor alone, as torch.func.grad
    does: with b = 2a, d(a b)/da is b (not b + 2a), and the result is differentiable."""
    from metanet.meta import _partials

    x = torch.tensor([1.5, -0.5], dtype=torch.float64, requires_grad=True)
    a = x * 1.0
    params = {"a": a, "b": 2.0 * a, "c": torch.ones(2, dtype=torch.float64)}  # c: no gradient, reaches nothing

    def loss(p, _):
        return p["a"] * p["b"]

    grads, per_task = _partials(loss, params, {})
    expected, aux = torch.func.grad(lambda p, c: (lambda per: (per.sum(), per))(loss(p, c)), has_aux=True)(params, {})
    for k in params:
        torch.testing.assert_close(grads[k], expected[k], rtol=0, atol=0)
        assert grads[k].requires_grad == expected[k].requires_grad, k
    torch.testing.assert_close(grads["a"], params["b"])
    torch.testing.assert_close(grads["c"], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(per_task, aux)
    (g,) = torch.autograd.grad((grads["a"] * grads["b"]).sum(), x)  # d/dx (2x * x) = 4x
    torch.testing.assert_close(g, 4 * x.detach())
    with torch.no_grad():  # as torch.func.grad: no graph of the gradients
        assert not any(v.requires_grad for v in _partials(loss, params, {})[0].values())
    const = {"c": torch.ones(2, dtype=torch.float64)}  # a loss that reaches nothing needing a gradient
    zero, _ = _partials(lambda p, _: p["c"].sum() * 0 + 1.0, const, {})
    torch.testing.assert_close(zero["c"], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize(
    "kw, step_kw",
    [({}, {}), ({"meta_sgd": True}, {"checkpoint": True}), ({"adapt_alpha": True}, {}), ({"inner_optimizer": "lstm"}, {}), ({"weights": "vae"}, {})],
    ids=["plain", "meta_sgd-checkpoint", "adapt_alpha", "lstm", "vae"],
)
def test_inner_steps_by_autograd_equal_func_grad(monkeypatch, strategy, kw, step_kw):
    """float64: the differentiable inner steps through ``_partials`` (torch.autograd.grad
    on aliases, the default) give the loss and every meta-gradient of the reference,
    torch.func.grad (``FUNCTIONAL_INNER_GRAD``), with the prototype head made from the
    body's weights."""
    import metanet.meta as meta

    model = _tiny_model(**kw)
    assert model.proto
    episode = _image_episode(b=3)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for functional in (True, False):
        monkeypatch.setattr(meta, "FUNCTIONAL_INNER_GRAD", functional)
        loss, _ = meta_loss(model, episode, inner_steps=2, order="second", strategy=strategy, generator=torch.Generator().manual_seed(1), **step_kw)
        out[functional] = (loss.detach(), torch.autograd.grad(loss, params, allow_unused=True))
    _assert_same_loss_and_meta_gradients(out[False], out[True])


def test_inner_steps_under_a_functorch_transform_take_func_grad():
    """Inside a functorch transform (here vmap over a batch of inputs) torch.autograd.grad
    cannot differentiate the vmapped tensors: ``sgd`` takes torch.func.grad there."""
    from metanet.meta import sgd

    def adapted(w0):
        return sgd(lambda p, c: (p["w"] ** 3).sum(), {"w": w0}, 2, lambda name, c: 0.1, create_graph=True)["w"]

    ws = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(adapted)(ws), torch.stack([adapted(w) for w in ws]))


def test_checkpointed_meta_gradient_gradcheck():
    """float64 gradcheck of the checkpointed second-order meta-gradient (2 inner steps)."""
    model = _tiny_model(meta_sgd=True)
    episode = _image_episode()
    names = ["arch.bias", "weights.base.head__w", "lrs.head__w"]
    named = dict(model.named_parameters())
    inputs = tuple(named[n].detach().clone().requires_grad_() for n in names)

    def objective(*tensors):
        loss, _ = torch.func.functional_call(
            model, dict(zip(names, tensors)), (episode,),
            {"inner_steps": 2, "order": "second", "generator": torch.Generator().manual_seed(1), "checkpoint": True},
        )  # fmt: skip
        return loss

    assert torch.autograd.gradcheck(objective, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_first_order_steps_equal_a_hand_written_func_grad_loop():
    """``sgd`` without a graph (autograd.grad on detached copies, native backward kernels)
    against the plain reference: torch.func.grad steps, added to the generated weights as
    constants; float64, values and meta-gradients."""
    model = _tiny_model()
    ep = _image_episode(b=3)
    gen = model.generate(ep.support_x, ep.support_y)
    _, fast = model.adapt(gen, ep.support_x, ep.support_y, 3, create_graph=False)

    def support(p):
        return task_loss(model.kind, model.predict(gen.alpha, p, ep.support_x), ep.support_y).sum()

    p = {k: v.detach() for k, v in gen.params.items()}
    for _ in range(3):
        g = torch.func.grad(support)(p)
        p = {k: v - model.config.inner_lr * g[k] for k, v in p.items()}
    ref = {k: gen.params[k] + (p[k] - gen.params[k]).detach() for k in p}
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-10, atol=1e-12)
    leaves = [model.arch.bias, model.weights.decoder.bias]
    outer = [task_loss(model.kind, model.predict(gen.alpha, q, ep.query_x), ep.query_y).sum() for q in (fast, ref)]
    for a, b in zip(torch.autograd.grad(outer[0], leaves, retain_graph=True), torch.autograd.grad(outer[1], leaves)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _sinusoid64(b=2, seed=0):
    ep = Sinusoid(shots=5, queries=5).sample(b, torch.Generator().manual_seed(seed))
    return type(ep)(*(t.double() for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y)))


def _named_meta_grads(model, episode, **kw):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss, _ = meta_loss(model, episode, generator=torch.Generator().manual_seed(7), **kw)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}, loss


# Smooth ops only: the inner problem's solution, and so its derivative, is smooth in the
# generated weights (with ReLUs the unrolled and the implicit derivative differed by 3e-4).
SMOOTH_MLP = """
name: smooth_mlp
task: {kind: regression, input: [1], outputs: 1}
norm: none
stem: {op: linear, width: 16, activation: tanh}
cell: {nodes: 2, inputs: 1, preact: none, output: last, ops: [linear_tanh, linear_sin], keep: all}
cells: [{type: mlp, width: 16}]
head: {op: linear}
"""


def test_implicit_meta_gradient_equals_a_long_unrolled_proximal_inner_loop():
    """iMAML against its definition (float64, a tiny smooth problem): 300 inner steps on the
    support loss plus prox/2 |w - w0|^2 solve the proximal problem to convergence, so
    backpropagating through all of them (second order) gives the implicit meta-gradient.
    Every parameter that reaches the loss only through the generated weights agrees (the
    task encoder, the VAE, the base weights); the architecture bias, whose effect through
    the adapted weights the implicit order leaves out, is not compared. A first-order
    gradient of the same loop differs, so the test can fail."""
    torch.manual_seed(0)
    model = MetaNet(spaces.loads(SMOOTH_MLP), 0, ModelConfig(dim=8, latent=4, arch="shared", inner_lr=0.05)).double()
    with torch.no_grad():  # a live VAE path (its decoder starts at zero)
        torch.nn.init.normal_(model.weights.decoder.weight, std=0.1, generator=torch.Generator().manual_seed(1))
    ep = _sinusoid64()
    ep = type(ep)(*(0.2 * t for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y)))  # a well-conditioned inner problem
    kw = dict(inner_steps=300, prox=5.0, beta=1e-3, strategy="loop")
    unrolled, loss_u = _named_meta_grads(model, ep, order="second", **kw)
    implicit, loss_i = _named_meta_grads(model, ep, order="implicit", cg_steps=40, **kw)
    first, _ = _named_meta_grads(model, ep, order="first", **kw)
    assert loss_i.item() == pytest.approx(loss_u.item(), rel=1e-12)
    compared = [n for n in unrolled if unrolled[n] is not None and unrolled[n].any() and not n.startswith("arch.")]
    assert {"encoder.features.0.weight", "weights.encoder.0.weight", "weights.decoder.weight", "weights.base.head__w"} <= set(compared)
    for n in compared:
        torch.testing.assert_close(implicit[n], unrolled[n], rtol=1e-9, atol=1e-12, msg=n)
    gap = max(float((first[n] - unrolled[n]).abs().max() / unrolled[n].abs().max()) for n in compared)
    assert gap > 1e-1


@pytest.mark.parametrize("strategy", ["vmap", "task"])
def test_implicit_meta_gradient_is_the_same_batched_and_one_task_at_a_time(strategy):
    """The implicit order's meta-gradient under vmap and with one backward per task equals
    the loop's (float64; an image space with a prototype head, VAE weights and Gumbel noise)."""
    from metanet import distributed

    model = _tiny_model()
    ep = _image_episode()
    kw = dict(inner_steps=3, order="implicit", prox=1.0, cg_steps=4, temperature=1.0, gumbel=True, hard=False)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = meta_loss(model, ep, generator=torch.Generator().manual_seed(3), strategy="loop", **kw)
    ref = torch.autograd.grad(loss, params, allow_unused=True)
    if strategy == "task":
        _, got, _ = distributed.per_task_gradients(model, ep, slice(0, 2), torch.Generator().manual_seed(3), params, strategy="task", **kw)
    else:
        loss_v, _ = meta_loss(model, ep, generator=torch.Generator().manual_seed(3), strategy="vmap", **kw)
        got = torch.autograd.grad(loss_v, params, allow_unused=True)
    assert sum(r is not None for r in ref) > 5
    for r, g in zip(ref, got):
        if r is None or g is None:
            assert (r if r is not None else g) is None or not (r if r is not None else g).any()
            continue
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_implicit_order_needs_a_proximal_term():
    model = _tiny_model()
    with pytest.raises(ValueError, match="prox > 0"):
        meta_loss(model, _image_episode(), inner_steps=1, order="implicit")
    # the model's own proximal weight (ModelConfig.prox) is the default
    kw = dict(inner_steps=2, order="implicit", cg_steps=3)
    given, _ = meta_loss(model, _image_episode(), prox=0.5, generator=torch.Generator().manual_seed(1), **kw)
    own, _ = meta_loss(_tiny_model(prox=0.5), _image_episode(), generator=torch.Generator().manual_seed(1), **kw)
    assert own.item() == given.item()


def test_an_implicit_run_validates_and_reloads_with_its_proximal_term(tmp_path):
    """``--order implicit --prox`` end to end: the run trains, its config.yaml gives the
    loaded model the proximal weight, and the validation it recorded after its last step is
    what ``evaluate`` gives the loaded model with the term, and not without it."""
    import json

    from metanet.meta import evaluate
    from metanet.tasks import fixed_episodes
    from metanet.trainer import build_tasks

    cfg = TrainConfig(space="mlp_regression", tasks="sinusoid", steps=6, meta_batch=4, inner_steps=2, inner_lr=0.05, order="implicit", prox=2.0, cg_steps=3,
                      eval_inner_steps=3, val_every=6, val_tasks=8, log_every=1, strategy="loop", seed=1)  # fmt: skip
    out = train(cfg, tmp_path / "run")
    assert out["step"] == 6 and out["nonfinite"] == 0
    model, loaded = load_run(tmp_path / "run", "last")
    assert loaded.prox == model.config.prox == 2.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recorded = [r["val"]["mean"] for r in rows if "val" in r]
    assert len(recorded) == 1
    episodes = fixed_episodes(build_tasks(cfg, "val", queries=cfg.queries, space=model.space), 8, 4, seed=cfg.seed + 10_000)
    assert evaluate(model, episodes, 3)["mean"] == pytest.approx(recorded[0], rel=1e-6)
    model.config = dataclasses.replace(model.config, prox=0.0)
    assert evaluate(model, episodes, 3)["mean"] != pytest.approx(recorded[0], rel=1e-2)


def test_evaluation_adapts_with_the_models_proximal_term():
    """Evaluation and generation adapt as the model was trained: on the support loss plus
    prox/2 |w - w0|^2, w0 the generated weights (float64). The adapted weights equal SGD on
    that loss by hand and differ from steps without the term; scoring after 1 and 4 steps
    in one pass equals 4 steps alone (the term keeps pulling towards the generated weights,
    not towards those after the first step)."""
    from metanet.executor import forward_genotype
    from metanet.meta import evaluate, evaluate_task, generate_networks
    from metanet.network import generate

    prox, lr = 2.0, 0.05
    torch.manual_seed(0)
    model = MetaNet(spaces.loads(SMOOTH_MLP), 0, ModelConfig(dim=8, latent=4, arch="shared", inner_lr=lr, prox=prox)).double().eval()
    ep = _sinusoid64()
    net = generate_networks(model, ep)[0]
    x, y = ep.support_x[0], ep.support_y[0]
    w = dict(net.params)
    for _ in range(4):
        p = {k: v.detach().requires_grad_() for k, v in w.items()}
        loss = task_loss(model.kind, forward_genotype(model.plan, net.genotype, p, x), y)
        loss = loss + prox / 2 * sum(((p[k] - net.params[k]) ** 2).sum() for k in p)
        w = {k: (p[k] - lr * g).detach() for k, g in zip(p, torch.autograd.grad(loss, list(p.values())))}
    _, adapted = evaluate_task(model, net, x, y, ep.query_x[0], ep.query_y[0], 4)
    for k in w:
        torch.testing.assert_close(adapted[k], w[k], rtol=1e-12, atol=1e-14, msg=k)
    emitted = generate(model, x, y, adapt_steps=4)  # metanet generate --adapt-steps
    for k, v in emitted.module.state_dict().items():
        torch.testing.assert_close(v, w[k.replace("__", ".")], rtol=1e-12, atol=1e-14, msg=k)
    assert evaluate(model, [ep], [1, 4])[4]["mean"] == pytest.approx(evaluate(model, [ep], 4)["mean"], rel=1e-12)
    model.config = dataclasses.replace(model.config, prox=0.0)
    _, plain = evaluate_task(model, net, x, y, ep.query_x[0], ep.query_y[0], 4)
    assert max(float((plain[k] - w[k]).abs().max()) for k in w) > 1e-4


def test_conjugate_gradient_solves_each_tasks_system_and_falls_back_on_negative_curvature():
    """``_conjugate_gradient`` (the implicit order's solver) against ``torch.linalg.solve`` on
    three tasks' own positive definite systems (float64, as many steps as unknowns), and a
    task whose matrix is negative definite keeps the right-hand side (the first-order answer)."""
    from metanet.meta import _conjugate_gradient

    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    a = m @ m.transpose(1, 2) + 0.5 * torch.eye(6, dtype=torch.float64)
    a[2] = -a[2]  # the third task: negative curvature from the first step
    rhs = torch.randn(3, 6, generator=g, dtype=torch.float64)

    def apply(v):  # two "weights" per task: the first 2 and the last 4 unknowns
        x = torch.cat([v["u"], v["w"].flatten(1)], 1)
        y = torch.einsum("bij,bj->bi", a, x)
        return {"u": y[:, :2], "w": y[:, 2:].reshape(3, 2, 2)}

    out = _conjugate_gradient(apply, {"u": rhs[:, :2], "w": rhs[:, 2:].reshape(3, 2, 2)}, steps=6)
    got = torch.cat([out["u"], out["w"].flatten(1)], 1)
    torch.testing.assert_close(got[:2], torch.linalg.solve(a[:2], rhs[:2]), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got[2], rhs[2])
