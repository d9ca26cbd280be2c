"""Learned inner-loop update rules: a coordinate-wise LSTM meta-learner.

``LSTMRule`` is Ravi & Larochelle's (2017) LSTM meta-learner as an update rule of the
inner loop (``meta.sgd``): every weight coordinate reads its gradient and its task's
support loss (preprocessed as in Andrychowicz et al. 2016), carries an LSTM state across
the inner steps, and is updated as an LSTM cell state would be,

    theta_t = f_t * theta_{t-1} - i_t * grad_t,

with a learned forget gate ``f_t = 1 - s * sigmoid(a_t)`` and a learned step size
``i_t = lr * exp(b_t)``, where ``(a_t, b_t)`` are read from the coordinate's LSTM state
and ``lr`` is the model's step size (Meta-SGD's per weight where it has them). The gate
read-out and ``s`` start at zero, so the rule starts as plain SGD exactly and meta-training
moves it away. It is meta-learned like every other part: through the inner steps with
second-order MAML.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LSTMRule", "preprocess"]

_P = 10.0  # Andrychowicz et al.'s preprocessing constant


def preprocess(x: Tensor) -> Tensor:
    """``(..., 2)`` features of ``x`` on every scale: ``(log|x| / p, sign x)`` where
    ``|x| >= exp(-p)``, else ``(-1, exp(p) x)`` (Andrychowicz et al. 2016, p = 10)."""
    big = x.abs() >= math.exp(-_P)
    log = torch.log(x.abs().clamp_min(math.exp(-_P))) / _P
    first = torch.where(big, log, torch.full_like(x, -1.0))
    second = torch.where(big, torch.sign(x), x * math.exp(_P))
    return torch.stack([first, second], -1)


class LSTMRule(nn.Module):
    """A coordinate-wise LSTM update rule for the inner loop (see the module docstring).

    Args:
        hidden: the LSTM state size per coordinate.
    """

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.hidden = hidden
        self.cell = nn.LSTMCell(4, hidden)  # input: gradient and loss features
        self.readout = nn.Linear(hidden, 2)  # (forget gate logit, log step-size scale)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)
        self.forget_scale = nn.Parameter(torch.zeros(()))

    def step(self, v: Tensor, g: Tensor, loss: Tensor, lr: Tensor | float, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One update of the weights ``v`` from their gradient ``g``.

        Args:
            v, g: the weights and their gradient, same shape (a leading task dimension or
                none).
            loss: the support loss, broadcastable to ``v`` (per task: ``(B, 1, ...)``).
            lr: the base step size (a number, or per weight).
            state: the LSTM state ``(h, c)``, each ``(v.numel(), hidden)``; None at the
                first step.

        Returns:
            The new weights and the new state.
        """
        n = v.numel()
        loss_features = preprocess(loss).expand(*v.shape, 2)  # one loss per task, read by each of its weights
        x = torch.cat([preprocess(g).reshape(n, 2), loss_features.reshape(n, 2)], -1)
        h, c = self._first(x) if state is None else self.cell(x, state)
        out = self.readout(h)
        forget = 1.0 - self.forget_scale * torch.sigmoid(out[:, 0]).view_as(v)
        step = lr * torch.exp(out[:, 1]).view_as(v)
        return forget * v - step * g, (h, c)

    def _first(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``self.cell(x, (0, 0))`` without the terms that vanish on a zero state.

        With ``h = c = 0`` the hidden product and the forget gate drop out:
        ``c' = sigmoid(i) tanh(g)``, ``h' = sigmoid(o) tanh(c')``, with ``(i, g, o)`` read
        from ``x`` alone. Training takes one inner step, so this is every step the rule
        takes there; it skips a quarter of the gates and the ``(n, hidden)`` product, and
        their derivatives of every order (tests/test_inner.py checks it against the cell).
        """
        k = self.hidden
        on = x.device  # LSTMCell's gate order is (i, f, g, o)
        rows = torch.cat([torch.arange(0, k, device=on), torch.arange(2 * k, 4 * k, device=on)])
        gates = F.linear(x, self.cell.weight_ih[rows], (self.cell.bias_ih + self.cell.bias_hh)[rows])
        i, g, o = gates.chunk(3, 1)
        c = torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
