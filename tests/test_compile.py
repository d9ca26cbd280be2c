"""metanet.compile against eager: a compiled discrete network, and the checked meta-step.

Compiling is slow on 2 cores, so the setups are the smallest there are (the tiny space,
mlp_maml with 2 tasks) and ``mode=None``; inductor's on-disk cache makes reruns fast.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.testing import assert_close

from metanet import executor as X
from metanet.compile import CheckedStep, checked_compile, compare_outputs, compile_network
from metanet.network import DiscreteNetwork
from metanet.graph import discretise
from metanet.meta import MetaNet, ModelConfig, meta_loss, task_loss
from metanet.space import load
from metanet.tasks import Episode, Sinusoid


def _network(seed: int = 0) -> tuple[DiscreteNetwork, torch.Tensor, torch.Tensor]:
    plan = X.compile(load("tiny"))
    g = torch.Generator().manual_seed(seed)
    alpha = torch.rand(plan.space.alpha_shape, generator=g) * plan.space.alpha_mask
    net = DiscreteNetwork(plan, discretise(plan.space, alpha), X.init_params(plan, g))
    x = torch.randn(6, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    return net, x, y


@pytest.mark.slow
def test_compiled_network_equals_eager_forward_and_finetuning_step() -> None:
    eager, x, y = _network()
    twin, _, _ = _network()  # same weights, compiled
    compiled = compile_network(twin)
    assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
    for net in (eager, compiled):  # one SGD step on each
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        loss = task_loss("classification", net(x)[None], y[None])[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [(a - b).abs().max() for a, b in zip(eager.parameters(), _network()[0].parameters())]
    assert max(moved) > 1e-3  # the step did something
    for (name, a), b in zip(eager.named_parameters(), twin.parameters()):
        assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


def _meta_step() -> tuple[callable, tuple, list[torch.Tensor]]:
    """A second-order MAML step on mlp_maml (2 tasks, 1 inner step): loss and meta-gradients."""
    torch.manual_seed(0)
    model = MetaNet(load("mlp_maml"), 0, ModelConfig(arch="fixed", weights="off", proto_head=False, dim=8, inner_lr=0.1))
    ep = Sinusoid(shots=5, queries=5).sample(2, torch.Generator().manual_seed(0))
    params = [p for p in model.weights.parameters()]

    def step(sx, sy, qx, qy):
        loss, _ = meta_loss(model, Episode(sx, sy, qx, qy), inner_steps=1, order="second")
        return loss, torch.autograd.grad(loss, params)

    def first_order(sx, sy, qx, qy):
        loss, _ = meta_loss(model, Episode(sx, sy, qx, qy), inner_steps=1, order="first")
        return loss, torch.autograd.grad(loss, params)

    return step, first_order, (ep.support_x, ep.support_y, ep.query_x, ep.query_y)


@pytest.mark.slow
def test_checked_compile_of_a_maml_step_matches_eager() -> None:
    step, _, example = _meta_step()
    checked = checked_compile(step, example, mode=None)
    assert isinstance(checked, CheckedStep)
    # Whichever path was chosen, what it returns is the eager meta-gradient.
    same, err, why = compare_outputs(checked(*example), step(*example))
    assert same, why
    if checked.compiled:
        assert checked.max_rel_error < 1e-4
    else:  # a fallback must say why
        assert checked.reason


def test_a_wrong_compiled_gradient_is_detected_and_falls_back(caplog) -> None:
    """Inject the failure of PyTorch issue 181581: a "compiled" step whose meta-gradient
    silently lost its second-order part (here: the first-order gradient)."""
    step, first_order, example = _meta_step()
    dropped = lambda f: first_order  # noqa: E731 - the "compiler" returns the wrong step
    with caplog.at_level(logging.WARNING, logger="metanet.compile"):
        checked = checked_compile(step, example, compiler=dropped)
    assert not checked.compiled and checked.fn is step
    assert "compiled outputs differ from eager ([1][" in checked.reason
    assert any("meta-step not compiled, running eager" in r.getMessage() for r in caplog.records)
    same, _, _ = compare_outputs(checked(*example), step(*example))
    assert same


def test_a_small_perturbation_is_detected_and_a_tiny_one_is_not() -> None:
    step, _, example = _meta_step()

    def perturbed(scale: float):
        def compiler(f):
            def g(*args):
                loss, grads = f(*args)
                return loss, tuple(gr + scale * gr.abs().max() for gr in grads)
            return g
        return compiler

    assert not checked_compile(step, example, compiler=perturbed(1e-2)).compiled
    assert checked_compile(step, example, compiler=perturbed(1e-7)).compiled


def test_a_failing_compiler_falls_back_with_the_error(caplog) -> None:
    step, _, example = _meta_step()

    def broken(f):
        def g(*args):
            raise RuntimeError("backend exploded\nmore lines")
        return g

    with caplog.at_level(logging.WARNING, logger="metanet.compile"):
        checked = checked_compile(step, example, compiler=broken)
    assert not checked.compiled
    assert checked.reason == "compilation failed (RuntimeError: backend exploded)"
    assert any("backend exploded" in r.getMessage() for r in caplog.records)


def test_compare_outputs_messages() -> None:
    a = torch.ones(3)
    assert compare_outputs((a, {"w": a}), (a, {"w": a}))[0]
    ok, _, why = compare_outputs((a, {"w": a * 2}), (a, {"w": a}))
    assert not ok and why.startswith("[1]['w']: max |difference| 1")
    ok, _, why = compare_outputs((a,), (a, a))
    assert not ok and why.startswith("structure differs")
    ok, _, why = compare_outputs((a[:2],), (a,))
    assert not ok and why == "[0]: shape (2,) vs (3,)"
    assert compare_outputs((torch.zeros(2),), (None,))[0]  # unused input: None vs zeros
    assert not compare_outputs((a,), (None,))[0]
    ok, _, why = compare_outputs((torch.tensor([float("nan")]),), (torch.zeros(1),))
    assert not ok and why == "[0]: non-finite values"


def test_compile_network_rejects_a_non_module() -> None:
    with pytest.raises(TypeError) as ei:
        compile_network(42)
    assert str(ei.value) == "compile_network expects an nn.Module or a GeneratedNetwork, got int"


# ------------------------------------------------------------ metanet train --compile


def _losses(run) -> list[float]:
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _compile_cfg(**kw):
    from metanet.trainer import TrainConfig

    # VAE weights: the step draws noise, so the check must not shift the run's random stream.
    base = dict(space="mlp_regression", tasks="sinusoid", steps=6, meta_batch=3, val_every=3, val_tasks=3, log_every=1, strategy="vmap", dim=8, latent=4, seed=5)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("compiler", ["identity", "broken"])
def test_train_compile_check_leaves_the_run_identical_to_eager(compiler: str, tmp_path, monkeypatch) -> None:
    """The first-step check draws the step's noise twice and restores it: with a compiler
    that returns the eager step (accepted) or raises (rejected, eager fallback), the run's
    losses are exactly those of a run without --compile."""
    import functools

    from metanet import trainer

    def broken(f):
        def g(*args):
            raise RuntimeError("inductor exploded")
        return g

    fake = (lambda f: f) if compiler == "identity" else broken
    monkeypatch.setattr(trainer, "checked_compile", functools.partial(checked_compile, compiler=fake))
    eager = trainer.train(_compile_cfg(), tmp_path / "eager")
    checked = trainer.train(_compile_cfg(compile=True), tmp_path / "checked")
    assert "compile" not in eager
    assert checked["compile"]["compiled"] is (compiler == "identity")
    if compiler == "broken":
        assert "inductor exploded" in checked["compile"]["reason"]
    assert _losses(tmp_path / "checked") == _losses(tmp_path / "eager")
    assert checked["best_val"] == eager["best_val"]


@pytest.mark.slow
def test_cli_train_compile_uses_the_compiled_step_and_follows_eager(tmp_path) -> None:
    """A real torch.compile of the second-order VAE meta-step through the CLI: accepted by the
    check, and its losses follow the eager run's to float tolerance."""
    import json
    import subprocess
    import sys

    args = ["--space", "mlp_regression", "--tasks", "sinusoid", "--steps", "6", "--meta-batch", "3", "--val-every", "3", "--val-tasks", "3", "--log-every", "1", "--strategy", "vmap", "--seed", "5", "--quiet"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = subprocess.run([sys.executable, "-m", "metanet", "train", *args, *extra, "--out", str(tmp_path / name)], capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    info = runs["compiled"]["compile"]
    assert info["compiled"], info
    assert info["max_rel_error"] < 1e-4
    assert_close(torch.tensor(_losses(tmp_path / "compiled")), torch.tensor(_losses(tmp_path / "eager")), rtol=1e-3, atol=1e-5)

