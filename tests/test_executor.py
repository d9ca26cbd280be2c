"""The executor against its references: fused vs unfused, vmap vs loop, supernet vs genotype,
and a float64 gradcheck of the second-order meta-gradient on the tiny space."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from metanet import executor as X
from metanet.graph import Genotype, discretise
from metanet.space import SearchSpace, builtin_path, builtin_spaces, load, loads

SPACES = builtin_spaces()
DT = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these small float64 convs gain nothing from more, and on a busy
    2-core machine spinning OpenMP workers made darts_cnn's tests ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _projected_space() -> SearchSpace:
    """tiny, but cell 1 projects BOTH inputs (8 channels), keeps one input per node and lets
    `zero` win: a genotype may ignore input 0 (and its projection weight) entirely, and a
    node of the reduction cell may lose every input."""
    text = builtin_path("tiny").read_text()
    old = "- {type: reduction, channels: 4, inputs: 2, keep: 1, allow_zero: false}"
    assert old in text
    return loads(text.replace(old, "- {type: reduction, channels: 8, inputs: 2, keep: 1, allow_zero: true}"), "tiny-projected")


@functools.lru_cache(maxsize=None)
def _plan(name: str) -> X.Plan:
    return X.compile(_projected_space() if name == "tiny-projected" else load(name))


def _batch(plan: X.Plan, B: int, N: int, seed: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Per-task soft alpha (B, E, K), distinct per-task weights {name: (B, ...)}, inputs (B, N, ...)."""
    space = plan.space
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((B, *space.alpha_shape), generator=g, dtype=DT)
    alpha = torch.softmax(logits.masked_fill(~space.alpha_mask, float("-inf")), -1)
    base = X.init_params(plan, g)
    params = {k: (v.to(DT) + 0.1 * torch.randn((B, *v.shape), generator=g, dtype=DT)) for k, v in base.items()}
    x = torch.randn((B, N, *space.task.input), generator=g, dtype=DT)
    return alpha, params, x


def _outputs_and_grads(plan: X.Plan, alpha, params, x, **kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
    alpha = alpha.clone().requires_grad_(True)
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    y = X.run(plan, alpha, params, x, **kw)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(99), dtype=DT)
    grads = torch.autograd.grad((y * r).sum(), [alpha, *params.values()])
    return y, list(grads)


def _n(name: str) -> int:
    return 2 if name == "darts_cnn" else 3  # darts_cnn is the slow one


@pytest.mark.parametrize("name", SPACES)
def test_fused_equals_unfused(name: str) -> None:
    plan = _plan(name)
    alpha, params, x = _batch(plan, B=2, N=_n(name), seed=0)
    y0, g0 = _outputs_and_grads(plan, alpha, params, x, fused=False)
    y1, g1 = _outputs_and_grads(plan, alpha, params, x, fused=True)
    assert y0.shape == (2, _n(name), plan.space.task.outputs)
    assert torch.isfinite(y0).all()
    assert_close(y1, y0)
    names = ["alpha", *params]
    for n, a, b in zip(names, g1, g0):
        assert_close(a, b, msg=lambda m, n=n: f"gradient of {n}: {m}")


def _vmap_cases() -> list:
    """Every space unfused; fused too where some edge merges ops or the stem hands over
    channels-last (else it is the same path)."""
    out = []
    for name in SPACES:
        out.append(pytest.param(name, False, id=f"{name}-unfused"))
        plan = _plan(name)
        if plan.stem_channels_last or any(e.merged for cp in plan.cells for e in cp.edges):
            out.append(pytest.param(name, True, id=f"{name}-fused"))
    return out


def test_some_space_merges_ops() -> None:
    assert any("-fused" in p.id for p in _vmap_cases())


@pytest.mark.parametrize("name,fused", _vmap_cases())
def test_vmap_equals_loop(name: str, fused: bool) -> None:
    plan = _plan(name)
    alpha, params, x = _batch(plan, B=2, N=_n(name), seed=1)
    y0, g0 = _outputs_and_grads(plan, alpha, params, x, fused=fused, strategy="loop")
    y1, g1 = _outputs_and_grads(plan, alpha, params, x, fused=fused, strategy="vmap")
    assert_close(y1, y0)
    for n, a, b in zip(["alpha", *params], g1, g0):
        assert_close(a, b, msg=lambda m, n=n: f"gradient of {n}: {m}")


def test_tasks_are_independent() -> None:
    """Changing task 1's weights leaves task 0's output alone (no cross-task leakage)."""
    plan = _plan("tiny")
    alpha, params, x = _batch(plan, B=2, N=3, seed=2)
    for strategy in ("loop", "vmap"):
        y = X.run(plan, alpha, params, x, strategy=strategy)
        params2 = {k: torch.cat([v[:1], v[1:] * 2.0]) for k, v in params.items()}
        y2 = X.run(plan, alpha, params2, x, strategy=strategy)
        assert_close(y2[0], y[0])
        assert not torch.allclose(y2[1], y[1])


def _random_alphas(space: SearchSpace, count: int, seed: int) -> list[torch.Tensor]:
    """Soft encodings; in some of them `zero` wins on many edges (all edges for the last)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        a = torch.rand(space.alpha_shape, generator=g, dtype=DT) * space.alpha_mask
        if i % 2 == 1 or i == count - 1:
            for e in space.edges:
                ops = space.cells[e.cell].ops
                zero = [k for k, o in enumerate(ops) if o.name == "zero"]
                if zero and (i == count - 1 or torch.rand((), generator=g) < 0.5):
                    a[e.index, zero[0]] = 2.0
        out.append(a)
    return out


@pytest.mark.parametrize("name", [*SPACES, "tiny-projected"])
def test_one_hot_supernet_equals_genotype_network(name: str) -> None:
    plan = _plan(name)
    space = plan.space
    _, params, x = _batch(plan, B=1, N=_n(name), seed=3)
    params = {k: v[0] for k, v in params.items()}
    x = x[0]
    seen: set[Genotype] = set()
    for a in _random_alphas(space, 4, seed=4):
        geno = discretise(space, a)
        seen.add(geno)
        onehot = geno.to_alpha(space).to(DT)
        expected = X.forward_genotype(plan, geno, params, x)
        assert_close(X.forward(plan, onehot, params, x), expected)
        assert_close(X.forward(plan, onehot, params, x, fused=True), expected)
    if len(space.cells[0].ops) > 1:
        assert len(seen) > 1  # the alphas did produce different architectures


@pytest.mark.parametrize("name", [*SPACES, "tiny-projected"])
def test_genotype_reads_only_its_slot_names(name: str) -> None:
    plan = _plan(name)
    space = plan.space
    _, params, x = _batch(plan, B=1, N=2, seed=5)
    params, x = {k: v[0] for k, v in params.items()}, x[0]
    alphas = _random_alphas(space, 4, seed=6)
    if name == "tiny-projected":  # input 0 of cell 1 loses everywhere
        for a in alphas:
            for e in space.edges:
                if e.cell == 1 and e.src == 0:
                    a[e.index] = 0.0
    for a in alphas:
        geno = discretise(space, a)
        names = plan.slot_names(geno)
        assert len(names) == len(set(names)) and set(names) <= set(params)
        only = {k: params[k] for k in names}
        assert_close(X.forward_genotype(plan, geno, only, x), X.forward_genotype(plan, geno, params, x))
        if name == "tiny-projected":
            assert "cells.1.pre0.w" not in names


@pytest.mark.parametrize("name", ["tiny", "tiny-projected", "conv_omniglot", "mlp_regression"])
def test_every_slot_name_is_needed_and_a_missing_weight_is_named(name: str) -> None:
    plan = _plan(name)
    space = plan.space
    _, params, x = _batch(plan, B=1, N=2, seed=7)
    params, x = {k: v[0] for k, v in params.items()}, x[0]
    geno = discretise(space, _random_alphas(space, 1, seed=8)[0])
    names = plan.slot_names(geno)
    for missing in names:
        with pytest.raises(KeyError) as ei:
            X.forward_genotype(plan, geno, {k: params[k] for k in names if k != missing}, x)
        assert ei.value.args[0] == missing


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_supernet_missing_weight_is_named(strategy: str) -> None:
    plan = _plan("tiny")
    alpha, params, x = _batch(plan, B=2, N=2, seed=9)
    victim = "cells.1.e2_3.conv_3x3.w"
    assert victim in params
    del params[victim]
    with pytest.raises(KeyError) as ei:
        X.run(plan, alpha, params, x, strategy=strategy)
    assert ei.value.args[0] == victim


def test_bad_strategy_message() -> None:
    plan = _plan("tiny")
    alpha, params, x = _batch(plan, B=1, N=2, seed=10)
    with pytest.raises(ValueError) as ei:
        X.run(plan, alpha, params, x, strategy="pmap")
    assert str(ei.value) == "strategy must be one of loop, vmap, got 'pmap'"


def test_plan_slots_match_op_shapes() -> None:
    """Every candidate op's weights are slots with the registry's declared shapes."""
    for name in SPACES:
        plan = _plan(name)
        shapes = plan.shapes()
        for cp in plan.cells:
            for e in cp.edges:
                for call in e.ops:
                    declared = call.op.shapes(cp.spec.channels, e.stride, **dict(call.kwargs))
                    assert {t: shapes[n] for t, n in call.params} == {t: s for t, (s, _) in declared.items()}


# ------------------------------------------------------------ second-order meta-gradient


def _meta_loss_fn(plan: X.Plan, params: dict, xs, ys, xq, yq, strategy: str, lr: float = 0.1):
    """alpha (B, E, K) -> query loss after one inner SGD step on the support loss."""

    def meta_loss(alpha: torch.Tensor) -> torch.Tensor:
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        support = F.cross_entropy(X.run(plan, alpha, p, xs, strategy=strategy).flatten(0, 1), ys.flatten())
        grads = torch.autograd.grad(support, list(p.values()), create_graph=True)
        fast = {k: v - lr * gk for (k, v), gk in zip(p.items(), grads)}
        return F.cross_entropy(X.run(plan, alpha, fast, xq, strategy=strategy).flatten(0, 1), yq.flatten())

    return meta_loss


def _meta_setup(seed: int = 11):
    plan = _plan("tiny")
    alpha, params, _ = _batch(plan, B=2, N=2, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    xs = torch.randn(2, 2, 1, 8, 8, generator=g, dtype=DT)  # (B, N, C, H, W)
    xq = torch.randn(2, 2, 1, 8, 8, generator=g, dtype=DT)
    ys = torch.randint(0, 3, (2, 2), generator=g)
    yq = torch.randint(0, 3, (2, 2), generator=g)
    return plan, alpha, params, xs, ys, xq, yq


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_second_order_meta_gradient_gradcheck(strategy: str) -> None:
    torch.manual_seed(0)  # fast_mode draws its random directions from the global generator
    plan, alpha, params, xs, ys, xq, yq = _meta_setup()
    fn = _meta_loss_fn(plan, params, xs, ys, xq, yq, strategy)
    # fast_mode compares the analytic and numerical derivatives along random directions
    # instead of building the full 96-entry Jacobian: the same check, ~50x cheaper.
    assert torch.autograd.gradcheck(fn, (alpha.clone().requires_grad_(True),), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_second_order_meta_gradient_vmap_equals_loop() -> None:
    plan, alpha, params, xs, ys, xq, yq = _meta_setup(seed=13)
    grads = []
    for strategy in ("loop", "vmap"):
        a = alpha.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_meta_loss_fn(plan, params, xs, ys, xq, yq, strategy)(a), [a])
        grads.append(g)
    assert grads[0].abs().sum() > 0
    assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["tiny-projected", "mlp_regression"])
def test_genotype_network_vmap_equals_loop(name: str) -> None:
    """Discrete networks, including nodes that lost every input, batch over tasks too."""
    plan = _plan(name)
    _, params, x = _batch(plan, B=2, N=3, seed=14)
    for a in _random_alphas(plan.space, 4, seed=4):
        geno = discretise(plan.space, a)
        batched = torch.func.vmap(lambda p, xb: X.forward_genotype(plan, geno, p, xb))(params, x)
        looped = torch.stack([X.forward_genotype(plan, geno, {k: v[b] for k, v in params.items()}, x[b]) for b in range(2)])
        assert_close(batched, looped)


def test_out_edges_of_a_node_without_inputs_are_skipped_exactly() -> None:
    """A node with no kept input outputs zeros; its zero-to-zero out-edges are not run."""
    plan = X.compile(load("conv_omniglot"))
    space = plan.space
    ci = next(i for i, c in enumerate(space.cells) if c.nodes == 3)
    cells = [tuple((s, d, c.ops[1].label) for s, d in c.edges()) for c in space.cells]
    # node 1 loses its only input (0 -> 1); 1 -> 2 and 1 -> 3 stay, and node 2 is fed by 1 only
    cells[ci] = ((0, 3, "conv_3x3"), (1, 2, "conv_3x3"), (1, 3, "avg_pool_3x3"), (2, 3, "skip"))
    geno = Genotype(space.name, tuple(cells))
    geno.validate(space)
    (calls, live) = plan.resolve(geno)[ci]
    assert [(e.src, e.dst) for e, _ in calls] == [(0, 3)]  # 1 has no input; then 2 has none
    names = plan.slot_names(geno)
    assert f"cells.{ci}.e0_3.conv_3x3.w" in names and f"cells.{ci}.e1_2.conv_3x3.w" not in names
    g = torch.Generator().manual_seed(9)
    params = {k: v.to(DT) for k, v in X.init_params(plan, g).items()}
    x = torch.randn(4, 1, 12, 12, generator=g, dtype=DT)
    expected = X.forward(plan, geno.to_alpha(space).to(DT), params, x)  # the one-hot supernet runs every edge
    assert_close(X.forward_genotype(plan, geno, {k: params[k] for k in names}, x), expected)
