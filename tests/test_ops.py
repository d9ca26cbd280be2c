"""Tests generated from the op registry: every op, its weight shapes and its linear form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from metanet.kernels import batch_norm
from metanet.ops import OPS, activation, get_op, init_tensor, register_op

C = 5  # odd on purpose: the factorised reduce splits channels into c//2 and c - c//2
N = 3


def _cases(strides_for_image: tuple[int, ...] = (1, 2)) -> list:
    """(op, domain, stride) for every registered op on every kind of tensor it accepts."""
    out = []
    for name in sorted(OPS):
        dom = OPS[name].domain
        if dom in ("image", "any"):
            out += [pytest.param(name, "image", s, id=f"{name}-image-s{s}") for s in strides_for_image]
        if dom in ("vector", "any"):
            out.append(pytest.param(name, "vector", 1, id=f"{name}-vector"))
    return out


def _linear_cases() -> list:
    """(op, hyper overrides, stride) for every op with a linear form, plus a few overrides."""
    out = []
    for name in sorted(OPS):
        if OPS[name].kernel is not None and OPS[name].domain in ("image", "any"):
            out += [pytest.param(name, {}, s, id=f"{name}-s{s}") for s in (1, 2)]
    overrides = [("conv_3x3", {"dilation": 2}), ("conv_3x3", {"kernel": 5}), ("dil_conv_3x3", {"dilation": 3}),
                 ("conv_1x1", {"kernel": 3, "dilation": 2})]
    for name, hyper in overrides:
        tag = ",".join(f"{k}={v}" for k, v in hyper.items())
        out += [pytest.param(name, hyper, s, id=f"{name}[{tag}]-s{s}") for s in (1, 2)]
    return out


def _params(name: str, c: int, stride: int, hyper: dict, dtype=torch.float32, seed: int = 0) -> dict:
    op = OPS[name]
    g = torch.Generator().manual_seed(seed)
    shapes = op.shapes(c, stride, **{**op.defaults, **hyper})
    # Random values even for "zeros" inits, so a bias that is never used is caught.
    return {k: torch.randn(shape, generator=g, dtype=dtype) for k, (shape, _) in shapes.items()}


def _input(domain: str, size: int = 7, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (N, C, size, size) if domain == "image" else (N, C)
    return torch.randn(shape, generator=g, dtype=dtype)


def _run(name: str, x: torch.Tensor, params: dict, stride: int, hyper: dict | None = None) -> torch.Tensor:
    op = OPS[name]
    return op.fn(x, params, c=C, stride=stride, **{**op.defaults, **(hyper or {})})


# ---------------------------------------------------------------------------- every op


@pytest.mark.parametrize("name,domain,stride", _cases())
def test_forward_shape(name: str, domain: str, stride: int) -> None:
    x = _input(domain, size=7)
    y = _run(name, x, _params(name, C, stride, {}), stride)
    expected = (N, C, math.ceil(7 / stride), math.ceil(7 / stride)) if domain == "image" else (N, C)
    assert tuple(y.shape) == expected
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name,domain,stride", _cases())
def test_backward_and_declared_shapes(name: str, domain: str, stride: int) -> None:
    op = OPS[name]
    declared = op.shapes(C, stride, **op.defaults)
    g = torch.Generator().manual_seed(2)
    params = {}
    for k, (shape, init) in declared.items():
        assert init in ("fan_in", "zeros", "ones"), f"{name}.{k}: unknown init {init!r}"
        t = init_tensor(shape, init, generator=g)
        assert tuple(t.shape) == tuple(shape)
        # Perturb so that zero-initialised biases still carry a gradient signal.
        params[k] = (t + 0.1 * torch.randn(shape, generator=g)).requires_grad_(True)
    x = _input(domain).requires_grad_(True)
    y = _run(name, x, params, stride)
    r = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad((y * r).sum(), [x, *params.values()], allow_unused=True)
    gx, gp = grads[0], dict(zip(params, grads[1:]))
    assert gx is not None and torch.isfinite(gx).all()
    # Every op but `zero` depends on its input.
    assert (gx.abs().sum() > 0) == (name != "zero")
    for k, grad in gp.items():
        assert grad is not None, f"{name}: declared weight {k!r} is never used"
        assert tuple(grad.shape) == tuple(declared[k][0])
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0, f"{name}: declared weight {k!r} has no effect"


@pytest.mark.parametrize("name,domain,stride", _cases())
def test_no_nan_on_large_and_constant_inputs(name: str, domain: str, stride: int) -> None:
    params = _params(name, C, stride, {})
    for x in (_input(domain) * 1e3, torch.ones_like(_input(domain))):
        y = _run(name, x, params, stride)
        assert not torch.isnan(y).any()


# ------------------------------------------------------------------------ linear forms


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("name,hyper,stride", _linear_cases())
def test_kernel_form_equals_op(name: str, hyper: dict, stride: int, size: int) -> None:
    op = OPS[name]
    kw = {**op.defaults, **hyper}
    x = _input("image", size=size, dtype=torch.float64)
    params = _params(name, C, stride, hyper, dtype=torch.float64)
    y = _run(name, x, params, stride, hyper)
    kernel = op.kernel(params, c=C, stride=stride, like=x, **kw)
    if name == "zero":  # nothing to compute: the fused path drops it
        assert kernel is None
        assert_close(y, torch.zeros_like(y), rtol=0, atol=0)
        return
    k = kernel.shape[-1]
    assert tuple(kernel.shape) == (C, C, k, k)
    assert kernel.dtype == torch.float64
    assert k == op.kernel_size(stride, **hyper)
    assert_close(F.conv2d(x, kernel, stride=stride, padding=k // 2), y)


@pytest.mark.parametrize("name", sorted(OPS))
def test_kernel_size_none_iff_no_linear_form(name: str) -> None:
    op = OPS[name]
    for stride in (1, 2):
        size = op.kernel_size(stride)
        if op.kernel is None:
            assert size is None
        else:
            assert isinstance(size, int) and size % 2 == 1


def test_dilated_kernel_reference() -> None:
    """conv_3x3 with dilation 2 as a dense kernel: taps at even offsets, zeros between."""
    w = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    k = OPS["conv_3x3"].kernel({"w": w}, c=1, stride=1, like=w, kernel=3, dilation=2)
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, ::2, ::2] = w[0, 0]
    assert_close(k, expected)


# ---------------------------------------------------------------------------- registry


def test_registry_rejects_duplicate_name() -> None:
    before = OPS["skip"]
    with pytest.raises(KeyError) as ei:
        register_op("skip", domain="any", shapes=lambda c, stride: {})(lambda x, params, *, c, stride: x)
    assert ei.value.args[0] == "op 'skip' is already registered"
    assert OPS["skip"] is before


def test_registry_kernel_and_kernel_size_go_together() -> None:
    with pytest.raises(ValueError, match=r"^op '_test_half_linear': kernel and kernel_size go together$"):
        register_op(
            "_test_half_linear", domain="image", shapes=lambda c, stride: {}, kernel=lambda params, **_: None
        )(lambda x, params, *, c, stride: x)
    assert "_test_half_linear" not in OPS


def test_get_op_unknown_lists_valid_and_suggests() -> None:
    with pytest.raises(KeyError) as ei:
        get_op("conv_3x4")
    msg = ei.value.args[0]
    assert msg.startswith("unknown op 'conv_3x4'; registered ops: ")
    assert msg.endswith("; did you mean 'conv_3x3'?")
    listed = msg.split("registered ops: ")[1].split(";")[0].split(", ")
    assert listed == sorted(OPS)
    assert "\n" not in msg


def test_get_op_unknown_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(KeyError) as ei:
        get_op("qqqqqqqq")
    assert "did you mean" not in ei.value.args[0]
    assert ei.value.args[0].startswith("unknown op 'qqqqqqqq'; registered ops: ")


def test_activation_unknown_suggests() -> None:
    with pytest.raises(KeyError) as ei:
        activation("rellu")
    assert ei.value.args[0] == "unknown activation 'rellu'; expected one of none, relu, sigmoid, sin, tanh; did you mean 'relu'?"


def test_init_tensor_fan_in_scale_and_generator() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = init_tensor((64, 32, 3, 3), "fan_in", g1), init_tensor((64, 32, 3, 3), "fan_in", g2)
    assert_close(a, b, rtol=0, atol=0)
    assert abs(a.std().item() - math.sqrt(2.0 / (32 * 9))) < 0.01
    assert_close(init_tensor((3,), "zeros"), torch.zeros(3))
    assert_close(init_tensor((3,), "ones"), torch.ones(3))


# -------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("shape", [(6, 3, 5, 5), (8, 4)], ids=["image", "vector"])
def test_batch_norm_statistics_and_reference(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(4)
    scale = torch.tensor([0.5, 3.0, 10.0, 2.0][: shape[1]])
    shift = torch.tensor([-2.0, 1.0, 7.0, 0.0][: shape[1]])
    view = (1, -1, 1, 1) if len(shape) == 4 else (1, -1)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale.view(view) + shift.view(view))
    y = batch_norm(x)
    dims = (0, 2, 3) if len(shape) == 4 else (0,)
    assert_close(y.mean(dims), torch.zeros(shape[1], dtype=torch.float64), atol=1e-12, rtol=0)
    assert_close(y.var(dims, unbiased=False), torch.ones(shape[1], dtype=torch.float64), atol=1e-3, rtol=0)
    ref = F.batch_norm(x, None, None, training=True, eps=1e-5)
    assert_close(y, ref)


def test_batch_norm_vmap_equals_loop_including_second_order() -> None:
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(3, 4, 2, 3, 3, generator=g, dtype=torch.float64)  # (B, N, C, H, W)
    r = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (batch_norm(x) * r).pow(2).sum()

    def second(x: torch.Tensor) -> torch.Tensor:  # a function of the first-order gradient
        return (torch.func.grad(loss)(x) * r).sum()

    assert_close(torch.func.vmap(batch_norm)(xs), torch.stack([batch_norm(x) for x in xs]))
    assert_close(torch.func.vmap(torch.func.grad(loss))(xs), torch.stack([torch.func.grad(loss)(x) for x in xs]))
    assert_close(torch.func.vmap(torch.func.grad(second))(xs), torch.stack([torch.func.grad(second)(x) for x in xs]))
