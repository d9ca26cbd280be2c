"""The two generators: task embedding -> soft architecture, and (task, architecture) -> weights.

``ArchitectureGenerator`` maps a task embedding to alpha logits for every edge and op, and
turns them into op weights with a tempered softmax or a (straight-through) Gumbel-softmax.
``WeightGenerator`` is a VAE-style hypernetwork: q(z | e, alpha) -> z -> initial weights,
decoded per weight slot as a learned base tensor modulated per output channel by z (a
per-channel scale for weight tensors, a shift for biases). It never maps z to all weights
with one dense matrix: its size grows with the number of output channels, not weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .executor import Plan, init_params
from .graph import Genotype, discrete_alpha, entropy

__all__ = ["ArchitectureGenerator", "WeightGenerator", "ARCH_MODES", "WEIGHT_MODES", "safe_name"]

ARCH_MODES = ("conditional", "shared", "fixed")
WEIGHT_MODES = ("vae", "off")


def safe_name(name: str) -> str:
    """A slot name usable as an nn.Module attribute (no dots)."""
    return name.replace(".", "__")


Rows = tuple[slice, int]  # a block of a meta-batch: (the block's tasks, the meta-batch's size)


def _draw(fn: Callable[..., Tensor], shape: torch.Size, rows: Rows | None, **kw: object) -> Tensor:
    """``fn(shape, **kw)`` (``torch.rand``, ``torch.randn``); with ``rows = (part, b)`` and
    ``shape[0] == len(part)``, the rows ``part`` of the draw for all ``b`` tasks, so that a
    block of tasks gets the noise it gets in the whole meta-batch and the generator ends
    in the same state."""
    if rows is None:
        return fn(shape, **kw)
    part, b = rows
    return fn((b, *shape[1:]), **kw)[part]


class ArchitectureGenerator(nn.Module):
    """Task embedding ``(B, d)`` -> op weights ``(B, edges, ops)``.

    Modes: ``conditional`` (per-task logits = shared logits + a map of the task embedding:
    linear, or with ``hidden`` > 0 an MLP with that many hidden units, expressive enough to
    give different domains different choices per edge; with ``norm`` it reads the embedding
    layer-normalised: the task encoder, trained by the weight generator too, grows the
    embedding's scale, and through an unnormalised map that scale alone saturates the
    softmax, where it passes no gradient), ``shared`` (one meta-learned
    encoding for all tasks, MetaNAS-style), and ``fixed`` (a given genotype, one-hot:
    plain MAML on a fixed network).

    ``param_free`` ``(edges, ops)`` marks the candidate ops without weights (zero, skip,
    pooling): ``drop`` in ``forward`` takes only those out, and ``param_free_share`` is the
    share of alpha they hold (the collapse that favours ops that need no training).
    """

    def __init__(self, plan: Plan, dim: int, mode: str = "conditional", genotype: Genotype | None = None, hidden: int = 0, norm: bool = False):
        super().__init__()
        if mode not in ARCH_MODES:
            raise ValueError(f"architecture mode must be one of {', '.join(ARCH_MODES)}, got {mode!r}")
        space = self.space = plan.space
        self.mode, self.shape, self.norm = mode, space.alpha_shape, norm
        self.register_buffer("mask", space.alpha_mask.clone(), persistent=False)
        free = torch.zeros(self.shape, dtype=torch.bool)
        for cp in plan.cells:
            for e in cp.edges:
                for call in e.ops:
                    free[e.index, call.col] = not call.params
        self.register_buffer("param_free", free & space.alpha_mask, persistent=False)
        # edges with an op that has weights: only there may op dropout take ops out
        self.register_buffer("droppable", self.param_free & (space.alpha_mask & ~self.param_free).any(-1, keepdim=True), persistent=False)
        if mode == "fixed":
            if genotype is None:
                if any(len(c.ops) > 1 for c in space.cells):
                    raise ValueError("a fixed architecture needs a genotype, or a space with one op per cell")
                alpha = space.alpha_mask.float()
            else:
                genotype.validate(space)
                alpha = genotype.to_alpha(space)
            self.register_buffer("fixed", alpha)
            return
        self.bias = nn.Parameter(torch.zeros(self.shape))
        if mode == "conditional":
            last = nn.Linear(hidden or dim, math.prod(self.shape))
            nn.init.normal_(last.weight, std=0.01)  # tasks start from the shared encoding
            nn.init.zeros_(last.bias)
            self.proj = last if not hidden else nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), last)

    def logits(self, e: Tensor) -> Tensor:
        """Masked alpha logits ``(B, edges, ops)``; -inf outside each cell's ops."""
        b = e.shape[0]
        if self.mode == "fixed":
            raise RuntimeError("a fixed architecture has no logits")
        out = self.bias.expand(b, *self.shape)
        if self.mode == "conditional":
            out = out + self.proj(F.layer_norm(e, e.shape[-1:]) if self.norm else e).view(b, *self.shape)
        return out.masked_fill(~self.mask, float("-inf"))

    def weights(self, logits: Tensor, temperature: float = 1.0, gumbel: bool = False, hard: bool = False, generator: torch.Generator | None = None, rows: Rows | None = None) -> Tensor:
        """Op weights from logits: tempered softmax, or Gumbel-softmax.

        ``hard``: straight-through; the forward pass runs the network ``discretise`` emits
        (``graph.discrete_alpha``: the space's keep and zero rules, every node connected),
        the backward pass the softmax's gradient. ``rows``: the logits are this block of a
        meta-batch; the noise is drawn as for the whole (``_draw``).
        """
        if gumbel:
            u = _draw(torch.rand, logits.shape, rows, generator=generator, device=logits.device, dtype=logits.dtype)
            logits = logits - torch.log(-torch.log(u.clamp_min(1e-10)))
        soft = torch.softmax(logits / temperature, dim=-1)
        if not hard:
            return soft
        return discrete_alpha(self.space, soft) + soft - soft.detach()

    def forward(self, e: Tensor, temperature: float = 1.0, gumbel: bool = False, hard: bool = False, generator: torch.Generator | None = None, drop: float = 0.0, rows: Rows | None = None) -> tuple[Tensor, Tensor | None]:
        """Op weights ``(B, edges, ops)`` and logits (None when fixed).

        ``drop``: operation-level dropout of the parameter-free ops (P-DARTS): each task's
        each such op is left out of its edge with this probability (drawn from
        ``generator``), on edges that keep an op with weights. The logits returned are
        the undropped ones. ``rows``: ``e`` is this block of a meta-batch (``weights``).
        """
        if self.mode == "fixed":
            return self.fixed.expand(e.shape[0], *self.shape), None
        logits = self.logits(e)
        used = logits
        if drop > 0:
            draw = _draw(torch.rand, logits.shape, rows, generator=generator, device=logits.device) < drop
            used = logits.masked_fill(draw & self.droppable, float("-inf"))
        return self.weights(used, temperature, gumbel, hard, generator, rows), logits

    def param_free_share(self, alpha: Tensor) -> Tensor:
        """The share of each task's alpha on parameter-free ops, mean over edges ``(B,)``."""
        return (alpha * self.param_free).sum(-1).mean(-1)

    def entropy(self, alpha: Tensor) -> Tensor:
        """Mean per-edge entropy of ``alpha`` ``(B, edges, ops)``, per task ``(B,)``."""
        return entropy(alpha, self.mask).mean(-1)


class WeightGenerator(nn.Module):
    """VAE hypernetwork: (task embedding, alpha) -> per-task initial weights and KL.

    Args:
        plan: the compiled space whose slots are generated.
        dim: task embedding size.
        latent: size of z.
        mode: ``vae`` or ``off`` (learned initial weights shared by all tasks: MAML).
        bound: a soft bound ``c`` on each decoded modulation, ``c * tanh(m / c)`` (a scale
            in ``(1 - c, 1 + c)``, a shift in ``(-c, c)``; near ``m`` while ``|m|`` is small);
            0: unbounded. Without it a spike in the query loss can push the latent, and so
            the generated weights, up until the losses overflow.
    """

    def __init__(self, plan: Plan, dim: int, latent: int = 32, mode: str = "vae", generator: torch.Generator | None = None, bound: float = 0.0):
        super().__init__()
        if mode not in WEIGHT_MODES:
            raise ValueError(f"weight mode must be one of {', '.join(WEIGHT_MODES)}, got {mode!r}")
        self.mode, self.latent, self.bound = mode, latent, bound
        self.names = [s.name for s in plan.slots]
        self.base = nn.ParameterDict({safe_name(k): nn.Parameter(v) for k, v in init_params(plan, generator).items()})
        if mode == "off":
            return
        n_alpha = math.prod(plan.space.alpha_shape)
        self.encoder = nn.Sequential(nn.Linear(dim + n_alpha, 128), nn.ReLU(), nn.Linear(128, 2 * latent))
        # One modulation per output channel of every slot, decoded from z in one matmul.
        self.sizes = [s.shape[0] for s in plan.slots]
        self.decoder = nn.Linear(latent, sum(self.sizes))
        nn.init.zeros_(self.decoder.weight)  # start at the base weights; z learns to modulate
        nn.init.zeros_(self.decoder.bias)

    def forward(self, e: Tensor, alpha: Tensor, sample: bool = True, generator: torch.Generator | None = None, rows: Rows | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
        """Generate weights.

        Args:
            e: ``(B, dim)`` task embeddings.
            alpha: ``(B, edges, ops)`` op weights.
            sample: draw z by reparameterisation; otherwise z = mu.
            rows: ``e`` is this block of a meta-batch; z's noise is drawn as for the whole
                (``_draw``).

        Returns:
            ``({slot: (B, *shape)}, kl (B,), z (B, latent) or None)``.
        """
        b = e.shape[0]
        base = {k: self.base[safe_name(k)] for k in self.names}
        if self.mode == "off":
            return {k: v.expand(b, *v.shape) for k, v in base.items()}, e.new_zeros(b), None
        stats = self.encoder(torch.cat([e, alpha.flatten(1)], dim=-1))
        mu, logvar = stats.chunk(2, dim=-1)
        logvar = logvar.clamp(-8.0, 8.0)
        if sample:
            eps = _draw(torch.randn, mu.shape, rows, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + eps * torch.exp(0.5 * logvar)
        else:
            z = mu
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)  # (B,)
        decoded = self.decoder(z)
        if self.bound > 0:
            decoded = self.bound * torch.tanh(decoded / self.bound)
        mods = decoded.split(self.sizes, dim=-1)
        out = {}
        for (k, v), m in zip(base.items(), mods):
            if v.dim() == 1:  # biases: shifted
                out[k] = v + m
            else:  # weights: scaled per output channel
                out[k] = v * (1.0 + m).view(b, -1, *([1] * (v.dim() - 1)))
        return out, kl, z
