"""Adagrad with momentum that touches only the item rows a mini-batch used.

GRU4Rec's item matrices have one row per item but a mini-batch uses a few thousand rows at
most; a dense optimizer would decay the momentum of, and rewrite, every row at every step.
Here the training step hands over the gradient of the rows it used (duplicates already
summed), so the cost of a step does not grow with the catalogue.

Update of a parameter or row (g: gradient, a: accumulated squares, v: velocity):

    a += g^2;  u = g / sqrt(a + eps);  v = mu * v - lr * u
    p += v                       (heavy-ball momentum, the authors' PyTorch code: default)
    p += mu * v - lr * u         (Nesterov momentum, their Theano code: ``nesterov=True``)

The accumulator starts at zero (no large initial value) and nothing else decays. On
rsc15-100k the heavy-ball form gave the authors' published MRR@20 (0.351 vs 0.345 with
Nesterov, same seed), so it is the default.

For speed, an item matrix's accumulator and velocity live side by side in one tensor (one
gather and one scatter per step instead of two each), and the small dense parameters are
updated as one flat vector (see :class:`FlatParameters`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EPSILON = 1e-6


class FlatParameters:
    """Makes several parameters views of one flat vector, with a flat gradient beside it.

    Updating ten small matrices costs ten times the per-operation overhead of updating
    one vector of the same total size; GRU4Rec's dense weights are small enough that the
    overhead dominates.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.values = torch.cat([p.detach().reshape(-1) for p in params])
        self.grad = torch.zeros_like(self.values)
        self.grads: list[torch.Tensor] = []
        offset = 0
        for param in params:
            size = param.numel()
            param.data = self.values[offset:offset + size].view_as(param)
            self.grads.append(self.grad[offset:offset + size].view_as(param))
            offset += size


class AdagradMomentum:
    """Adagrad with (heavy-ball or Nesterov) momentum, for flat vectors and item rows."""

    def __init__(self, lr: float, momentum: float, nesterov: bool = False) -> None:
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self._state: dict[int, torch.Tensor] = {}

    def _state_of(self, param: torch.Tensor) -> torch.Tensor:
        """``[accumulator | velocity]`` along the last dimension."""
        key = id(param)
        if key not in self._state:
            self._state[key] = torch.zeros((*param.shape[:-1], 2 * param.shape[-1]),
                                           dtype=param.dtype, device=param.device)
        return self._state[key]

    @torch.no_grad()
    def step_flat(self, flat: FlatParameters) -> None:
        """Update a flat parameter vector from its flat gradient."""
        flat.values.add_(self._change(flat.grad, self._state_of(flat.values)))

    @torch.no_grad()
    def step_rows(self, param: torch.nn.Parameter, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Update rows ``rows`` (unique) of ``param`` with their summed gradient ``grad``."""
        state_all = self._state_of(param)
        state = state_all.index_select(0, rows)
        change = self._change(grad, state)
        state_all.index_copy_(0, rows, state)
        param.index_add_(0, rows, change)

    def _change(self, grad: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Update ``state`` (accumulator and velocity, in place); return the step to add."""
        width = grad.shape[-1]
        acc, velocity = state[..., :width], state[..., width:]
        acc.addcmul_(grad, grad)
        scaled = grad / (acc + EPSILON).sqrt_()
        velocity.mul_(self.momentum).add_(scaled, alpha=-self.lr)
        if self.nesterov:
            return velocity * self.momentum - self.lr * scaled
        return velocity
