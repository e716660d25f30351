"""Adagrad with Nesterov momentum that touches only the item rows a mini-batch used.

GRU4Rec's item matrices have one row per item but a mini-batch uses a few thousand rows at
most; a dense optimizer would decay the momentum of, and rewrite, every row at every step.
Here the training loop hands over the gradient of the rows it gathered (duplicates already
summed), so the cost of a step does not grow with the catalogue.

Update of a parameter or row (g: gradient, a: accumulated squares, v: velocity):
    a += g^2;  u = g / sqrt(a + eps);  v = mu * v - lr * u;  p += mu * v - lr * u
The accumulator starts at zero (no large initial value) and nothing else decays.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

EPSILON = 1e-6


class AdagradNesterov:
    """Adagrad + Nesterov momentum; dense parameters by ``.grad``, item rows by index."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float) -> None:
        self.lr = lr
        self.momentum = momentum
        self._state: dict[torch.nn.Parameter, tuple[torch.Tensor, torch.Tensor]] = {
            p: (torch.zeros_like(p), torch.zeros_like(p)) for p in params}

    @torch.no_grad()
    def step_dense(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Update whole parameters from their ``.grad`` (and clear it)."""
        for param in params:
            if param.grad is None:
                continue
            acc, velocity = self._state[param]
            grad = param.grad
            acc.addcmul_(grad, grad)
            self._apply(param, grad / (acc + EPSILON).sqrt_(), velocity)
            param.grad = None

    @torch.no_grad()
    def step_rows(self, param: torch.nn.Parameter, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Update rows ``rows`` (unique) of ``param`` with their summed gradient ``grad``."""
        acc_all, velocity_all = self._state[param]
        acc = acc_all.index_select(0, rows).addcmul_(grad, grad)
        acc_all.index_copy_(0, rows, acc)
        scaled = grad / (acc + EPSILON).sqrt_()
        if self.momentum > 0:
            velocity = velocity_all.index_select(0, rows)
            velocity.mul_(self.momentum).add_(scaled, alpha=-self.lr)
            velocity_all.index_copy_(0, rows, velocity)
            param.index_add_(0, rows, velocity * self.momentum - self.lr * scaled)
        else:
            param.index_add_(0, rows, scaled, alpha=-self.lr)

    def _apply(self, param: torch.Tensor, scaled: torch.Tensor, velocity: torch.Tensor) -> None:
        if self.momentum > 0:
            velocity.mul_(self.momentum).add_(scaled, alpha=-self.lr)
            param.add_(velocity, alpha=self.momentum).add_(scaled, alpha=-self.lr)
        else:
            param.add_(scaled, alpha=-self.lr)
