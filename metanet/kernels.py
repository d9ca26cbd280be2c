"""The executor's kernels: per-task batch norm, the stem's im2col product and folded norm,
the ReLU convolution, the chunked stem and the convolution with convolution-kernel second
derivatives.

Each is the fast form of a few plain PyTorch ops with the same values and the same first
and second derivatives: custom autograd functions whose backward is written with
differentiable (and vmappable) ops, so that second-order MAML, ``torch.func.grad`` and
``vmap`` go through them. The plain-ops references are ``batch_norm_reference`` and the
ops themselves (``F.conv2d``, ``F.relu``); tests/test_perf_paths.py checks each fast form
against its reference. ``ops`` (the op registry) and the executor build on these.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "batch_norm",
    "batch_norm_reference",
    "conv2d_im2col",
    "conv2d_im2col_batch_norm",
    "conv2d_batch_norm",
    "folded_stem",
    "FoldedStem",
    "whole_stem",
    "relu_conv2d",
    "conv2d",
    "conv2d_backward",
    "CHUNK_BYTES",
    "CONV_DERIVATIVES_AS_KERNELS",
]


def batch_norm_reference(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-task batch normalisation written with plain tensor ops (the reference).

    Statistics are over the task's own batch (and spatial positions), no affine terms, no
    buffers. ``batch_norm`` computes the same thing with fewer passes over the tensor.
    """
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


class _BatchNorm(torch.autograd.Function):
    """``y = (x - mean) * r`` with ``r = rsqrt(var + eps)``; returns ``(y, r)``.

    The backward is written with differentiable ops on the OUTPUTS ``y`` and ``r`` only
    (both saved as outputs), so autograd differentiates it again for second-order MAML
    and the result is exact; ``generate_vmap_rule`` makes it work under ``vmap`` and
    ``torch.func.grad``. Compared with ``batch_norm_reference`` (mean, sub, pow, mean,
    rsqrt, mul, and the backward of each) it makes about half the full-size passes in the
    forward and the backward, which is what a meta-step on CPU spends its time on.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, dims: tuple[int, ...], eps: float) -> tuple[Tensor, Tensor]:
        # Only the VALUES of the native kernel are used (one fused pass; var_mean over
        # (0, 2, 3) is several times slower on CPU); the derivatives are ours, below.
        y, _, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
        return y, invstd.view([1, -1] + [1] * (x.dim() - 2))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        ctx.dims = inputs[1]
        ctx.save_for_backward(*output)
        ctx.set_materialize_grads(False)  # gr is None unless something used r

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, gr: Tensor | None) -> tuple[Tensor | None, None, None]:
        y, r = ctx.saved_tensors
        dims = ctx.dims
        n = math.prod(y.shape[d] for d in dims)
        if gy is None:
            gy = torch.zeros_like(y)
        if not torch.is_grad_enabled():
            # A backward that will not be differentiated again (create_graph=False; the
            # query side of a meta-step): the native fused kernel computes the same
            # r (gy - mean(gy) - y mean(gy y)) in one pass, with y as the normalised input
            # (mean 0, invstd 1) and r as the affine weight. The statistics take r's dtype:
            # under bf16 autocast the CUDA kernel keeps them (and so r) in float32 and
            # expects float32 back, the CPU kernel bf16.
            c = y.shape[1]
            dx = torch.ops.aten.native_batch_norm_backward(
                gy, y, r.reshape(c), None, None, r.new_zeros(c), r.new_ones(c), True, 0.0, [True, False, False]
            )[0]
            return (dx if gr is None else torch.addcmul(dx, y, r * r * gr / n, value=-1.0)), None, None
        # dx = r (gy - mean(gy) - y mean(gy y)) - r^2 y gr / n   (dr/dx = -r^2 y / n)
        c = r * (gy * y).mean(dims, keepdim=True)
        if gr is not None:
            c = c + r * r * gr / n
        dx = torch.addcmul(-r * gy.mean(dims, keepdim=True), gy, r)
        return torch.addcmul(dx, y, c, value=-1.0), None, None


def batch_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-task batch normalisation, no affine terms, no buffers.

    Statistics are over the task's own batch (and spatial positions), as transductive MAML
    does. Not ``F.batch_norm``: the native kernel's second-order gradients under ``vmap``
    are wrong (DESIGN.md, known pitfalls). A custom autograd function with a hand-written,
    itself differentiable backward (the forward values come from the native kernel, which
    is exact without affine terms); equal to ``batch_norm_reference`` to float tolerance in
    value and in first and second derivatives (tests/test_perf_paths.py).
    """
    if not torch.is_grad_enabled():
        return torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)[0]
    return _BatchNorm.apply(x, (0,) if x.dim() == 2 else (0, 2, 3), eps)[0]


def _patches(x: Tensor, w: Tensor, stride: int, padding: int) -> tuple[Tensor, int, int]:
    """The im2col patches of ``x`` for ``w``'s kernel, ``(N, C_in*k*k, Ho*Wo)``, and ``Ho, Wo``."""
    (h, wd), (kh, kw) = x.shape[-2:], w.shape[-2:]
    ho, wo = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    return F.unfold(x, (kh, kw), padding=padding, stride=stride), ho, wo


def conv2d_im2col(x: Tensor, w: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """``F.conv2d(x, w, stride=stride, padding=padding)`` as unfold + one matmul (im2col).

    For few input channels (a 1-channel image stem: 9 multiply-adds per output) the CPU
    convolution kernels reach a few GFLOP/s, while this is one matrix product per call.
    Its derivatives are unfold/fold and matmuls, so first and second order are exact; when
    ``x`` needs no gradient (network inputs) the unfold is a constant.

    Args:
        x: ``(N, C_in, H, W)``.
        w: ``(C_out, C_in, k, k)``.
    """
    n, c_out = x.shape[0], w.shape[0]
    cols, ho, wo = _patches(x, w, stride, padding)
    # An explicit bmm: torch.matmul would fold this into one (N*L, K) x (K, C_out) product
    # with transposing copies, and a skinny (C_out, N*L) x (N*L, K) weight gradient that
    # runs at a few GFLOP/s; per-image products need no copies (3-4x faster fwd + bwd).
    out = torch.bmm(w.reshape(c_out, -1).expand(n, -1, -1), cols)  # (N, C_out, Ho*Wo)
    return out.view(n, c_out, ho, wo)


def conv2d_im2col_batch_norm(x: Tensor, w: Tensor, stride: int = 1, padding: int = 0, eps: float = 1e-5, channels_last: bool = False) -> Tensor:
    """``batch_norm(conv2d(x, w))`` with the norm folded into the convolution's weights.

    The output's channel ``c`` is ``w_c . p`` over the input patches ``p``, so its batch
    statistics follow from the patches' own: mean ``w_c . mu`` and variance
    ``w_c^T Sigma w_c``, with ``mu`` and ``Sigma`` (``C_in k^2`` square) taken over the
    batch and positions. The normalised output is then ``(w_c / sigma_c) . (p - mu)``: one
    matrix product on centred patches. For a few-channel stem (``Sigma`` is 9 x 9 for a
    1-channel 3x3 stem) this replaces the norm's passes over the full-size output, forward
    and backward, by work on the much smaller patch tensor; the derivatives, of any order,
    are those of the plain ops, exactly. The statistics are float32 (or float64) even
    under autocast; the product runs in the input's (autocast's) dtype.

    Args:
        x: ``(N, C_in, H, W)``.
        w: ``(C_out, C_in, k, k)``, no bias (a norm without affine terms follows).
        channels_last: return the output in channels-last memory order, at no cost (the
            product is computed as ``(N, H*W, C_out)``): the same values, for a strided
            convolution that runs faster on a channels-last input (executor.Plan).
    """
    return folded_stem(x, w, stride, padding, eps, im2col=True, channels_last=channels_last).output()


def conv2d_batch_norm(x: Tensor, w: Tensor, stride: int = 1, padding: int = 0, eps: float = 1e-5) -> Tensor:
    """``batch_norm(conv2d(x, w))`` as one convolution: the norm folded into its weights
    and a bias.

    The statistics are ``conv2d_im2col_batch_norm``'s (the patches' mean ``mu`` and
    covariance ``Sigma``), the output ``conv2d(x, w / sigma) - (w / sigma) . mu``, a native
    convolution that keeps the input's memory order. For a stem with more input channels
    than im2col pays for (an RGB image: ``Sigma`` is 27 x 27), this replaces the norm's
    passes over the full-size output, forward and backward, by the patch statistics; the
    derivatives, of any order, are those of the plain ops, exactly.

    Args:
        x: ``(N, C_in, H, W)``.
        w: ``(C_out, C_in, k, k)``, no bias (a norm without affine terms follows).
    """
    if not torch.is_grad_enabled():  # no backward to spare: the plain forward is cheaper
        return batch_norm(F.conv2d(x, w, stride=stride, padding=padding), eps)
    return folded_stem(x, w, stride, padding, eps, im2col=False).output()


def folded_stem(x: Tensor, w: Tensor, stride: int = 1, padding: int = 0, eps: float = 1e-5, *, im2col: bool, channels_last: bool = False) -> FoldedStem:
    """``batch_norm(conv2d(x, w))`` with the norm folded in, as its operands: the linear map
    ``FoldedStem.output`` computes (``conv2d_im2col_batch_norm`` for ``im2col``, else
    ``conv2d_batch_norm``), or ``FoldedStem.relu_conv2d`` feeds to a ReLU convolution in
    chunks of images."""
    x, w = _autocast_operands(x, w)
    cols, ho, wo = _patches(x, w, stride, padding)
    if im2col:
        wm, _, centred = _folded_norm(cols, w, eps, centre=True)
        return FoldedStem(centred.to(x.dtype), wm.to(x.dtype), None, (ho, wo), 1, 0, channels_last)
    wm, mu, _ = _folded_norm(cols, w, eps, centre=False)
    with torch.autocast(x.device.type, enabled=False):  # in the statistics' precision
        bias = -(wm @ mu.reshape(-1))
    return FoldedStem(x, wm.reshape(w.shape).to(x.dtype), bias.to(x.dtype), (ho, wo), stride, padding, channels_last)


# the images a chunk of ``FoldedStem.relu_conv2d`` holds: their stem output about this size.
# Per task at one thread, chunks against the whole stem output (ad hoc, AVX512 CPU, 2 MiB
# L2 per core): 84x84 conv4 with 32 channels 8% faster in 1 MiB chunks, 13% in 4 MiB, 18%
# in 8 MiB (64 channels: 25% and 24% in 4 and 8 MiB); 28x28 conv4 5% slower in 1 MiB
# chunks (also with the instruction set capped to AVX2), even in 4 and 8 MiB: small
# chunks' per-call costs outweigh what they keep in the caches. (Measured while glibc
# still mapped blocks above 32 MiB afresh every step, as the whole stem output at 84x84
# is; without that, 64 channels gain 1.12x at one thread and 1.03x at two:
# docs/PERFORMANCE.md.)
CHUNK_BYTES = 8 * 2**20

_whole_stem = threading.local()


@contextlib.contextmanager
def whole_stem() -> Iterator[None]:
    """Within it (on this thread), ``FoldedStem.relu_conv2d`` makes the stem output whole
    instead of reading it in chunks: for a forward pass whose backward is itself
    differentiated (the support pass of a second-order inner step), where the chunked
    backward would remake the stem output in differentiable ops only to differentiate
    that again. ``torch.func.grad`` has the same effect (no chunks under a functorch
    transform)."""
    before = getattr(_whole_stem, "on", False)
    _whole_stem.on = True
    try:
        yield
    finally:
        _whole_stem.on = before


class FoldedStem(NamedTuple):
    """A stem convolution with its batch norm folded in (``folded_stem``), as operands.

    ``output()`` is the normalised stem output. With ``im2col``-style operands (``bias`` is
    None) ``src`` is the centred patches ``(N, K, H*W)`` and ``wm`` the folded weights
    ``(C, K)``: one matrix product; otherwise ``src`` is the image, ``wm`` the folded
    kernel and ``bias`` its bias: one convolution (``stride``, ``padding``).
    """

    src: Tensor
    wm: Tensor
    bias: Tensor | None
    size: tuple[int, int]  # the output's (H, W)
    stride: int
    padding: int
    channels_last: bool  # the im2col product's output order (a convolution keeps its input's)

    def output(self, start: int = 0, stop: int | None = None) -> Tensor:
        """The normalised stem output of images ``start:stop``, ``(n, C, H, W)``."""
        src = self.src[start:stop]
        if self.bias is not None:
            return F.conv2d(src, self.wm, self.bias, stride=self.stride, padding=self.padding)
        n, (ho, wo), c = src.shape[0], self.size, self.wm.shape[0]
        if self.channels_last:
            return torch.bmm(src.transpose(1, 2), self.wm.t().expand(n, -1, -1)).view(n, ho, wo, c).permute(0, 3, 1, 2)
        return torch.bmm(self.wm.expand(n, -1, -1), src).view(n, c, ho, wo)

    def chunk(self) -> int:
        """Images per chunk of ``relu_conv2d``: their output about ``CHUNK_BYTES``."""
        c, (ho, wo) = self.wm.shape[0], self.size
        return max(1, CHUNK_BYTES // (c * ho * wo * self.src.element_size()))

    def chunked(self) -> bool:
        """Whether ``relu_conv2d`` runs in chunks here: more than one chunk of images, on a
        CPU, with a backward to come, outside ``whole_stem`` and without autocast, ``vmap``,
        ``torch.func`` transform or ``torch.compile`` (the chunks are plain eager autograd;
        elsewhere it is ``relu_conv2d`` on ``output()``)."""
        return (
            self.src.shape[0] > self.chunk() and self.src.device.type == "cpu" and torch.is_grad_enabled() and not getattr(_whole_stem, "on", False)
            and not self.src.requires_grad and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()  # also a vmap over the kernel alone
        )  # fmt: skip

    def relu_conv2d(self, kernel: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
        """``relu_conv2d(self.output(), kernel, stride, padding)``, where ``chunked``: a chunk
        of images at a time through the stem, the ReLU and the convolution, forward and
        backward (the backward recomputes the chunk's stem output), so that the full-size
        stem output is never stored nor read back from memory (``_FoldedStemReluConv``)."""
        if not self.chunked():
            return relu_conv2d(self.output(), kernel, stride, padding)
        return _FoldedStemReluConv.apply(self, kernel, stride, padding, self.wm, self.bias)


class _FoldedStemReluConv(torch.autograd.Function):
    """``conv2d(relu(stem.output()), kernel)`` a chunk of images at a time.

    The stem output of a whole query set (75 images of 64 x 28 x 28 floats: 15 MB) is far
    larger than a core's cache, and the plain ops pass over it (or its gradient) several
    times, at memory speed. Here each chunk's stem output is made, rectified and convolved
    while it is in the cache; the backward remakes it (a product with a few multiply-adds
    per output) and runs the convolution's, the ReLU's and the stem's backward on the chunk,
    summing the weight gradients over the chunks. Nothing full-size is kept for the backward.
    Where the backward is itself differentiated (create_graph) it runs on all images at once
    with differentiable ops, so higher orders are those of the plain ops.
    """

    @staticmethod
    def forward(stem: FoldedStem, kernel: Tensor, stride: int, padding: int, wm: Tensor, bias: Tensor | None) -> Tensor:
        n, k = stem.src.shape[0], stem.chunk()
        return torch.cat([F.conv2d(stem.output(i, i + k).relu_(), kernel, stride=stride, padding=padding) for i in range(0, n, k)])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        stem, kernel, ctx.stride, ctx.padding, _, _ = inputs
        ctx.stem = stem._replace(src=None, wm=None, bias=None)
        ctx.save_for_backward(stem.src, kernel, stem.wm, stem.bias)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        src, kernel, wm, bias = ctx.saved_tensors
        stem = ctx.stem._replace(src=src, wm=wm, bias=bias)
        s, p, n = ctx.stride, ctx.padding, src.shape[0]
        need_k, need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[4], bias is not None and ctx.needs_input_grad[5]
        k = n if torch.is_grad_enabled() else stem.chunk()  # create_graph: the same ops, as one chunk (a smaller graph)
        gk = gw = gb = None
        for i in range(0, n, k):
            y = stem.output(i, i + k)
            gz, gki = conv2d_backward(g[i : i + k], F.relu(y), kernel, s, p, 1, need_w or need_b, need_k)
            gk = gki if gk is None else gk + gki
            if not (need_w or need_b):
                continue
            gy = torch.ops.aten.threshold_backward(gz, y, 0.0)
            if bias is None:  # the product's weight gradient, summed over the chunk's images
                m = gy.shape[0]
                gyf = gy.permute(0, 2, 3, 1).reshape(m, -1, gy.shape[1]) if stem.channels_last else gy.flatten(2).transpose(1, 2)
                gwi, gbi = torch.bmm(src[i : i + k], gyf).sum(0).t(), None
            else:
                _, gwi, gbi = torch.ops.aten.convolution_backward(gy, src[i : i + k], wm, [wm.shape[0]], [stem.stride] * 2, [stem.padding] * 2, [1, 1], False, [0, 0], 1, [False, need_w, need_b])
            gw = gwi if gw is None else gw + gwi
            gb = gbi if gb is None else gb + gbi
        return None, gk, None, None, gw, gb


def _autocast_operands(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` and ``w`` rounded as autocast would round a product's operands. Before a custom
    autograd function (``relu_conv2d``, ``conv2d``): its saved tensors, and so its
    backward's products, share one dtype, and the casts stay on the tape, so the gradients
    reach float32 weights as float32. Before a folded norm's statistics: the fold equals
    the vmapped network (cast to bf16 as a whole, executor.run)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), w.to(dtype)
    return x, w


def _folded_norm(cols: Tensor, w: Tensor, eps: float, centre: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(w / sigma, mu, cols - mu)`` for patches ``cols`` ``(N, K, L)``: the weights
    ``(C_out, K)`` scaled by the output channels' batch standard deviations, the patch mean
    ``(1, K, 1)`` and the centred patches (``centre``; else None, and the covariance is the
    second moment less ``mu mu^T``: one pass fewer over the patches), all float32 (or
    float64) even under autocast."""
    n, _, length = cols.shape
    stats = torch.promote_types(cols.dtype, torch.float32)
    with torch.autocast(cols.device.type, enabled=False):
        cols = cols.to(stats)
        mu = cols.mean((0, 2), keepdim=True)
        centred = cols - mu if centre else None
        c = centred if centre else cols
        cov = torch.bmm(c, c.transpose(1, 2)).sum(0) / (n * length)  # (K, K)
        if not centre:
            cov = cov - mu.reshape(-1, 1) * mu.reshape(1, -1)
        wm = w.reshape(w.shape[0], -1).to(stats)
        return wm * torch.rsqrt(((wm @ cov) * wm).sum(1, keepdim=True) + eps), mu, centred


def _conv_backward(g: Tensor, x: Tensor, w: Tensor, stride: int, padding: int, dilation: int, need_x: bool, need_w: bool) -> tuple[Tensor | None, Tensor | None]:
    gx, gw, _ = torch.ops.aten.convolution_backward(g, x, w, None, [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], 1, [need_x, need_w, False])
    return gx, gw


class _ConvInputGrad(torch.autograd.Function):
    """The input gradient of ``conv2d(x, w)`` for the output gradient ``g``, a function of
    ``g`` and ``w`` (``x`` gives only its shape) whose own derivatives, for ``gg`` against
    it, are ``conv2d(gg, w)`` (``g``) and the weight gradient of input ``gg`` and output
    gradient ``g`` (``w``): see ``conv2d_backward``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, x: Tensor, w: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
        return _conv_backward(g, x, w, stride, padding, dilation, True, False)[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        g, _, w, *ctx.conv = inputs
        ctx.save_for_backward(g, w)

    @staticmethod
    def backward(ctx: Any, gg: Tensor) -> tuple[Tensor | None, ...]:
        g, w = ctx.saved_tensors
        s, p, d = ctx.conv
        dg = F.conv2d(gg, w, stride=s, padding=p, dilation=d) if ctx.needs_input_grad[0] else None
        dw = _conv_backward(g, gg, w, s, p, d, False, True)[1] if ctx.needs_input_grad[2] else None
        return dg, None, dw, None, None, None


class _ConvWeightGrad(torch.autograd.Function):
    """The weight gradient of ``conv2d(x, w)`` for the output gradient ``g``, a function of
    ``g`` and ``x`` (``w`` gives only its shape) whose own derivatives, for ``gg`` against
    it, are ``conv2d(x, gg)`` (``g``) and the input gradient through weights ``gg``
    (``x``): see ``conv2d_backward``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, x: Tensor, w: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
        return _conv_backward(g, x, w, stride, padding, dilation, False, True)[1]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        g, x, _, *ctx.conv = inputs
        ctx.save_for_backward(g, x)

    @staticmethod
    def backward(ctx: Any, gg: Tensor) -> tuple[Tensor | None, ...]:
        g, x = ctx.saved_tensors
        s, p, d = ctx.conv
        dg = F.conv2d(x, gg, stride=s, padding=p, dilation=d) if ctx.needs_input_grad[0] else None
        dx = _conv_backward(g, x, gg, s, p, d, True, False)[0] if ctx.needs_input_grad[1] else None
        return dg, dx, None, None, None, None


# False: a differentiated convolution backward is one ``aten.convolution_backward``, which
# autograd differentiates with PyTorch's own formula: the reference that
# ``conv2d_backward`` is tested (tests/test_perf_paths.py) and timed (``bench_meta``'s
# ``ours_loop_aten_conv_derivative``) against.
CONV_DERIVATIVES_AS_KERNELS = True


def conv2d_backward(g: Tensor, x: Tensor, w: Tensor, stride: int = 1, padding: int = 0, dilation: int = 1, need_x: bool = True, need_w: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """The input and weight gradients of ``conv2d(x, w, stride=stride, padding=padding,
    dilation=dilation)`` for the output gradient ``g`` (None where not needed).

    Outside grad mode, one ``aten.convolution_backward``. In grad mode (a backward that is
    itself differentiated: the support pass of second-order MAML) each gradient is a
    function whose derivatives are each one convolution kernel: a forward, an input
    gradient or a weight gradient. PyTorch's derivative of ``convolution_backward`` takes
    the input gradient's dependence on the weights (a weight gradient of the incoming
    ``gg`` against ``g``) as a convolution with the batch and channel axes swapped: a copy
    of both operands and a kernel the size of the output, over as many input channels as
    the support set has images (64 channels, 5 images of 84x84 to 42x42: 26 ms of a 664 ms
    task, copy included, where a weight gradient on those shapes takes about 5 ms; ad hoc,
    AVX512, one thread). The values are the same kernels' (tests/test_perf_paths.py
    checks them against the plain ops, first and second order, in float64).
    ``CONV_DERIVATIVES_AS_KERNELS = False`` gives PyTorch's formula back."""
    if not (torch.is_grad_enabled() and CONV_DERIVATIVES_AS_KERNELS):
        return _conv_backward(g, x, w, stride, padding, dilation, need_x, need_w)
    gx = _ConvInputGrad.apply(g, x, w, stride, padding, dilation) if need_x else None
    gw = _ConvWeightGrad.apply(g, x, w, stride, padding, dilation) if need_w else None
    return gx, gw


class _Conv2d(torch.autograd.Function):
    """``F.conv2d`` whose backward is ``conv2d_backward``: see ``conv2d``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, w: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
        return F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, w, *ctx.conv = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        gx, gw = conv2d_backward(g, x, w, *ctx.conv, *ctx.needs_input_grad[:2])
        return gx, gw, None, None, None


def conv2d(x: Tensor, w: Tensor, stride: int = 1, padding: int = 0, dilation: int = 1) -> Tensor:
    """``F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)`` (no bias, one
    group) whose backward, where it is itself differentiated, is ``conv2d_backward``'s:
    second-order MAML through it runs each derivative as one convolution kernel. Equal to
    ``F.conv2d`` in value and in first and second derivatives (tests/test_perf_paths.py)."""
    if not torch.is_grad_enabled():
        return F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    x, w = _autocast_operands(x, w)  # what autocast does to a convolution, before the Function
    return _Conv2d.apply(x, w, stride, padding, dilation)


class _ReluConv2d(torch.autograd.Function):
    """``conv2d(relu(y), w)`` that saves ``y``, not ``relu(y)``, for the backward.

    In a norm-then-ReLU network the norm already keeps its output ``y`` for its own
    backward; ``F.conv2d(F.relu(y), w)`` keeps a second full-size tensor, ``relu(y)``,
    for the weight gradient and the ReLU's mask. Here the backward recomputes ``relu(y)``
    (one elementwise pass) and takes the mask from ``y``, so the pair keeps one tensor
    per node instead of two. The backward is ``aten.convolution_backward`` and
    ``threshold_backward``, both differentiable and vmappable, so second-order MAML
    through it is exact and it works under ``torch.func.grad`` and ``vmap``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(y: Tensor, w: Tensor, stride: int, padding: int) -> Tensor:
        # the output keeps y's memory order (oneDNN's choice); the executor decides where
        # a channels-last order goes back to NCHW (Plan.stem_channels_last, channels_last)
        return F.conv2d(F.relu(y), w, stride=stride, padding=padding)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        y, w, ctx.stride, ctx.padding = inputs
        ctx.save_for_backward(y, w)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        y, w = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[:2]
        gy, gw = conv2d_backward(g, F.relu(y), w, ctx.stride, ctx.padding, 1, need_y, need_w)
        if gy is not None:
            gy = torch.ops.aten.threshold_backward(gy, y, 0.0)  # the ReLU's mask, from y
        return gy, gw, None, None


def relu_conv2d(y: Tensor, w: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """``F.conv2d(F.relu(y), w, stride=stride, padding=padding)``, keeping only ``y`` for the
    backward (see ``_ReluConv2d``): the fused executor's edge convolution. Equal to the
    plain ops in value and in first and second derivatives (tests/test_perf_paths.py)."""
    if not torch.is_grad_enabled():
        return F.conv2d(F.relu(y), w, stride=stride, padding=padding)
    y, w = _autocast_operands(y, w)  # what autocast does to a convolution, before the Function
    return _ReluConv2d.apply(y, w, stride, padding)
