"""Op registry: pure functional candidate ops, their weight shapes and linear-kernel forms.

Every op maps a tensor of ``c`` channels (or features) to ``c`` channels, for ONE task:
images are ``(N, C, H, W)``, vectors ``(N, D)``. Weights are arguments, never attributes.
The cell's shared pre-activation (``preact`` in the YAML) is applied by the executor before
any op sees its input, so an op here is "what happens after the pre-activation".

Ops that are linear after the pre-activation also declare ``kernel``: a dense
``(c, c, k, k)`` convolution kernel (stride as the op's, padding ``k // 2``) that computes
exactly the same thing. The fused executor sums those kernels, weighted by alpha, into one
convolution per edge.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import batch_norm, conv2d

__all__ = [
    "OpDef",
    "OPS",
    "register_op",
    "get_op",
    "activation",
    "ACTIVATIONS",
    "suggest",
]

Params = Mapping[str, Tensor]
ShapeFn = Callable[..., dict[str, tuple[tuple[int, ...], str]]]


@dataclass(frozen=True)
class OpDef:
    """A registered candidate op.

    Attributes:
        name: the exact YAML string.
        domain: ``"image"`` or ``"vector"``: the tensors the op accepts.
        fn: ``fn(x, params, *, c, stride, **hyper) -> Tensor`` for one task.
        shapes: ``shapes(c, stride, **hyper) -> {tensor: (shape, init)}`` where init is
            ``"fan_in"`` (He-normal over the trailing dims), ``"zeros"`` or ``"ones"``.
        defaults: hyper-parameters and their default values; YAML may override them.
        kernel: ``kernel(params, *, c, stride, like, **hyper) -> (c, c, k, k)`` linear form
            (``like`` gives device and dtype), or None when the op is not linear. It may
            itself return None where there is nothing to compute (``zero``).
        cost: multiply-adds per output position (per pixel or per row) as a function of
            ``c`` and the hyper-parameters; the fused planner compares these.
        doc: one line shown by ``metanet spaces show``.
        zero_to_zero: the op maps an all-zero input to zeros whatever its weights (no
            bias, no constant). A discrete network then skips the op on the out-edges of
            a node with no inputs (``executor.Plan.resolve``); False is always safe.
    """

    name: str
    domain: str
    fn: Callable[..., Tensor]
    shapes: ShapeFn
    defaults: Mapping[str, Any] = field(default_factory=dict)
    kernel: Callable[..., Tensor | None] | None = None
    cost: Callable[..., float] = lambda c, **_: 0.0
    doc: str = ""
    zero_to_zero: bool = False

    def kernel_size(self, stride: int, **hyper: Any) -> int | None:
        """Side of the dense linear-form kernel, or None if the op has no linear form."""
        if self.kernel is None:
            return None
        return _KERNEL_SIZE[self.name](stride=stride, **{**self.defaults, **hyper})


OPS: dict[str, OpDef] = {}
_KERNEL_SIZE: dict[str, Callable[..., int | None]] = {}


def suggest(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """A "; did you mean 'x'?" suffix for the closest valid name, or ''."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def register_op(
    name: str,
    *,
    domain: str,
    shapes: ShapeFn,
    defaults: Mapping[str, Any] | None = None,
    kernel: Callable[..., Tensor | None] | None = None,
    kernel_size: Callable[..., int | None] | None = None,
    cost: Callable[..., float] | None = None,
    doc: str = "",
    zero_to_zero: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator registering ``fn`` under the exact YAML string ``name``."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in OPS:
            raise KeyError(f"op '{name}' is already registered")
        if (kernel is None) != (kernel_size is None):
            raise ValueError(f"op '{name}': kernel and kernel_size go together")
        OPS[name] = OpDef(
            name=name,
            domain=domain,
            fn=fn,
            shapes=shapes,
            defaults=dict(defaults or {}),
            kernel=kernel,
            cost=cost or (lambda c, **_: 0.0),
            doc=doc,
            zero_to_zero=zero_to_zero,
        )
        if kernel_size is not None:
            _KERNEL_SIZE[name] = kernel_size
        return fn

    return deco


def get_op(name: str) -> OpDef:
    """The registered op ``name``; a KeyError lists the valid names otherwise."""
    try:
        return OPS[name]
    except KeyError:
        valid = sorted(OPS)
        raise KeyError(
            f"unknown op '{name}'; registered ops: {', '.join(valid)}{suggest(name, valid)}"
        ) from None


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda x: x,
    "relu": F.relu,
    "tanh": torch.tanh,
    "sin": torch.sin,
    "sigmoid": torch.sigmoid,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation called ``name`` (a key of ``ACTIVATIONS``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        valid = sorted(ACTIVATIONS)
        raise KeyError(
            f"unknown activation '{name}'; expected one of {', '.join(valid)}{suggest(name, valid)}"
        ) from None


def _pad_kernel(k: Tensor, size: int) -> Tensor:
    """Zero-pad a square kernel ``(..., k, k)`` to ``(..., size, size)``, centred."""
    p = (size - k.shape[-1]) // 2
    return F.pad(k, (p, p, p, p)) if p else k


def _dilate(k: Tensor, dilation: int) -> Tensor:
    """The dense kernel equal to ``k`` applied with ``dilation`` (holes filled with zeros).

    Built by padding and reshaping, not by in-place writes, so it works under vmap.
    """
    if dilation == 1:
        return k
    d, size = dilation, (k.shape[-1] - 1) * dilation + 1
    k = F.pad(k.unsqueeze(-1), (0, d - 1)).flatten(-2)[..., :size]  # spread columns
    return F.pad(k.unsqueeze(-2), (0, 0, 0, d - 1)).flatten(-3, -2)[..., :size, :]  # rows


def _eye_kernel(c: int, size: int, like: Tensor, fill: float | None = None) -> Tensor:
    """``(c, c, size, size)`` kernel mapping channel i to i only: a centred identity tap,
    or every tap equal to ``fill`` (a depthwise box filter)."""
    eye = torch.eye(c, dtype=like.dtype, device=like.device)[:, :, None, None]
    if fill is None:
        return _pad_kernel(eye, size)
    return eye.expand(c, c, size, size) * fill


# ------------------------------------------------------------------------ image ops


def _zero_fn(x: Tensor, params: Params, *, c: int, stride: int) -> Tensor:
    return x[..., ::stride, ::stride] * 0.0 if x.dim() == 4 else x * 0.0


register_op(
    "zero",
    domain="any",
    zero_to_zero=True,
    shapes=lambda c, stride: {},
    kernel=lambda params, *, c, stride, like: None,  # the fused path simply drops it
    kernel_size=lambda stride: 1,
    doc="no connection (output zeros)",
)(_zero_fn)


def _skip_shapes(c: int, stride: int) -> dict:
    if stride == 1:
        return {}
    return {"w1": ((c // 2, c, 1, 1), "fan_in"), "w2": ((c - c // 2, c, 1, 1), "fan_in")}


def _skip_kernel(params: Params, *, c: int, stride: int, like: Tensor) -> Tensor:
    if stride == 1:
        return _eye_kernel(c, 1, like)
    # Factorised reduce as one 3x3 stride-2 kernel: the first half of the output channels
    # reads the centre tap, the second half the (+1, +1) tap.
    return torch.cat([F.pad(params["w1"], (1, 1, 1, 1)), F.pad(params["w2"], (2, 0, 2, 0))])


@register_op(
    "skip",
    domain="any",
    zero_to_zero=True,
    shapes=_skip_shapes,
    kernel=_skip_kernel,
    kernel_size=lambda stride: 1 if stride == 1 else 3,
    cost=lambda c, stride=1: float(c if stride == 1 else c * c),
    doc="identity; factorised reduce (two shifted 1x1 convs) at stride 2",
)
def _skip(x: Tensor, params: Params, *, c: int, stride: int) -> Tensor:
    if stride == 1:
        return x
    a = F.conv2d(x, params["w1"], stride=2)
    shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))  # keeps odd sizes aligned with `a`
    b = F.conv2d(shifted, params["w2"], stride=2)
    return torch.cat([a, b], dim=1)


def _conv(kernel: int, dilation: int = 1, doc: str = "") -> None:
    name = f"conv_{kernel}x{kernel}"

    def fn(x: Tensor, params: Params, *, c: int, stride: int, kernel: int, dilation: int) -> Tensor:
        pad = dilation * (kernel - 1) // 2
        return conv2d(x, params["w"], stride, pad, dilation)

    register_op(
        name,
        domain="image",
        zero_to_zero=True,
        shapes=lambda c, stride, kernel, dilation: {"w": ((c, c, kernel, kernel), "fan_in")},
        defaults={"kernel": kernel, "dilation": dilation},
        kernel=lambda params, *, c, stride, like, kernel, dilation: _dilate(params["w"], dilation),
        kernel_size=lambda stride, kernel, dilation: (kernel - 1) * dilation + 1,
        cost=lambda c, kernel=kernel, dilation=dilation, stride=1: float(kernel * kernel * c * c),
        doc=doc or f"{kernel}x{kernel} convolution",
    )(fn)


for _k in (1, 3, 5):
    _conv(_k)


def _dw_pw(kernel: int, dilation: int, name: str, doc: str) -> None:
    """Depthwise (dilated) conv then pointwise conv: linear, so it has a kernel form."""

    def fn(x: Tensor, params: Params, *, c: int, stride: int, kernel: int, dilation: int) -> Tensor:
        pad = dilation * (kernel - 1) // 2
        y = F.conv2d(x, params["dw"], stride=stride, padding=pad, dilation=dilation, groups=c)
        return F.conv2d(y, params["pw"])

    def kern(params: Params, *, c: int, stride: int, like: Tensor, kernel: int, dilation: int) -> Tensor:
        dw = _dilate(params["dw"], dilation)  # (c, 1, k', k')
        return params["pw"][:, :, 0, 0, None, None] * dw[:, 0][None]  # (c, c, k', k')

    register_op(
        name,
        domain="image",
        zero_to_zero=True,
        shapes=lambda c, stride, kernel, dilation: {
            "dw": ((c, 1, kernel, kernel), "fan_in"),
            "pw": ((c, c, 1, 1), "fan_in"),
        },
        defaults={"kernel": kernel, "dilation": dilation},
        kernel=kern,
        kernel_size=lambda stride, kernel, dilation: (kernel - 1) * dilation + 1,
        cost=lambda c, kernel=kernel, dilation=dilation, stride=1: float(kernel * kernel * c + c * c),
        doc=doc,
    )(fn)


_dw_pw(3, 2, "dil_conv_3x3", "3x3 depthwise conv, dilation 2, then 1x1 conv")
_dw_pw(5, 2, "dil_conv_5x5", "5x5 depthwise conv, dilation 2, then 1x1 conv")


def _sep_conv(kernel: int) -> None:
    """DARTS separable conv: (dw -> pw) -> norm -> relu -> (dw -> pw); not linear."""

    def fn(x: Tensor, params: Params, *, c: int, stride: int, kernel: int) -> Tensor:
        pad = (kernel - 1) // 2
        y = F.conv2d(x, params["dw1"], stride=stride, padding=pad, groups=c)
        y = F.relu(batch_norm(F.conv2d(y, params["pw1"])))
        y = F.conv2d(y, params["dw2"], padding=pad, groups=c)
        return F.conv2d(y, params["pw2"])

    register_op(
        f"sep_conv_{kernel}x{kernel}",
        domain="image",
        zero_to_zero=True,
        shapes=lambda c, stride, kernel: {
            "dw1": ((c, 1, kernel, kernel), "fan_in"),
            "pw1": ((c, c, 1, 1), "fan_in"),
            "dw2": ((c, 1, kernel, kernel), "fan_in"),
            "pw2": ((c, c, 1, 1), "fan_in"),
        },
        defaults={"kernel": kernel},
        cost=lambda c, kernel=kernel, stride=1: float(2 * (kernel * kernel * c + c * c)),
        doc=f"two stacked {kernel}x{kernel} depthwise-separable convs",
    )(fn)


for _k in (3, 5):
    _sep_conv(_k)


@register_op(
    "avg_pool_3x3",
    domain="image",
    zero_to_zero=True,
    shapes=lambda c, stride: {},
    # count_include_pad=True makes it a constant depthwise kernel, hence linear.
    kernel=lambda params, *, c, stride, like: _eye_kernel(c, 3, like, fill=1.0 / 9.0),
    kernel_size=lambda stride: 3,
    cost=lambda c, stride=1: float(9 * c),
    doc="3x3 average pooling (zero padding counted)",
)
def _avg_pool(x: Tensor, params: Params, *, c: int, stride: int) -> Tensor:
    return F.avg_pool2d(x, 3, stride=stride, padding=1, count_include_pad=True)


@register_op(
    "max_pool_3x3",
    domain="image",
    zero_to_zero=True,
    shapes=lambda c, stride: {},
    cost=lambda c, stride=1: float(9 * c),
    doc="3x3 max pooling",
)
def _max_pool(x: Tensor, params: Params, *, c: int, stride: int) -> Tensor:
    # Inputs follow a ReLU or a norm; -inf padding is what max pooling means.
    return F.max_pool2d(x, 3, stride=stride, padding=1)



# ----------------------------------------------------------------------- vector ops


def _linear_act(name: str, act: str) -> None:
    f = ACTIVATIONS[act]

    def fn(x: Tensor, params: Params, *, c: int, stride: int) -> Tensor:
        return f(F.linear(x, params["w"], params["b"]))

    register_op(
        name,
        domain="vector",
        shapes=lambda c, stride: {"w": ((c, c), "fan_in"), "b": ((c,), "zeros")},
        cost=lambda c, stride=1: float(c * c),
        doc=f"fully connected layer, then {act}" if act != "none" else "fully connected layer",
    )(fn)


for _name, _act in (
    ("linear", "none"),
    ("linear_relu", "relu"),
    ("linear_tanh", "tanh"),
    ("linear_sin", "sin"),
    ("linear_sigmoid", "sigmoid"),
):
    _linear_act(_name, _act)


def init_tensor(shape: tuple[int, ...], init: str, generator: torch.Generator | None = None) -> Tensor:
    """A fresh tensor for a weight slot: He-normal over the trailing dims, zeros or ones."""
    if init == "zeros":
        return torch.zeros(shape)
    if init == "ones":
        return torch.ones(shape)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
