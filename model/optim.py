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

For speed, an item matrix's accumulator and velocity live side by side in one tensor, and
the small dense parameters are updated as one flat vector (see :class:`FlatParameters`).
On the CPU both are updated in place by :mod:`model.native`'s C kernel where a C compiler
is available (~5x faster on the item rows); otherwise by the torch ops below, which are
the reference (with packed state: one gather and one row-add per step instead of two each).

**Carrying the state.** :meth:`AdagradMomentum.export_state` gives the state per named
parameter, each packed like the item matrices' (``[accumulator | velocity]`` along the last
dimension, the parameter's leading shape), and :meth:`AdagradMomentum.import_state` puts
such a state back, so that a warm-started fine-tune continues the optimisation where the
model's training left it instead of with a fresh accumulator (whose first steps have the
size of the learning rate on every coordinate). :func:`grow_rows` adds zero rows for new
items, whose first steps are then those of any item at the start of training.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch

from model.native import adagrad_momentum_rows_

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
        self.params = list(params)
        self.offsets: list[int] = []
        offset = 0
        for param in params:
            size = param.numel()
            param.data = self.values[offset : offset + size].view_as(param)
            self.grads.append(self.grad[offset : offset + size].view_as(param))
            self.offsets.append(offset)
            offset += size


class AdagradMomentum:
    """Adagrad with (heavy-ball or Nesterov) momentum, for flat vectors and item rows."""

    def __init__(
        self, lr: float, momentum: float, nesterov: bool = False, native: bool = True
    ) -> None:
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.native = native  # use model.native's C kernel where it is available
        self._state: dict[int, torch.Tensor] = {}

    def _state_of(self, param: torch.Tensor) -> torch.Tensor:
        """``[accumulator | velocity]`` along the last dimension."""
        key = id(param)
        if key not in self._state:
            self._state[key] = torch.zeros(
                (*param.shape[:-1], 2 * param.shape[-1]), dtype=param.dtype, device=param.device
            )
        return self._state[key]

    @torch.no_grad()
    def step_flat(self, flat: FlatParameters) -> None:
        """Update a flat parameter vector from its flat gradient."""
        state = self._state_of(flat.values)
        if not self._native_update(
            flat.values.view(1, -1), state.view(1, -1), None, flat.grad.view(1, -1)
        ):
            flat.values.add_(self._advance(flat.grad, state))

    @torch.no_grad()
    def step_rows(self, param: torch.nn.Parameter, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Update rows ``rows`` (unique) of ``param`` with their summed gradient ``grad``."""
        state_all = self._state_of(param)
        if self._native_update(param, state_all, rows, grad):
            return
        state_change, change = self._change(grad, state_all.index_select(0, rows))
        state_all.index_add_(0, rows, state_change)
        param.index_add_(0, rows, change)

    @torch.no_grad()
    def export_state(
        self, params: Mapping[str, torch.Tensor], flat: FlatParameters | None = None
    ) -> dict[str, torch.Tensor]:
        """The state of each named parameter, packed ``[accumulator | velocity]`` along
        its last dimension (copies). Parameters inside ``flat`` are cut out of the flat
        state; parameters never stepped are left out."""
        flat_ids = _flat_index(flat)
        out: dict[str, torch.Tensor] = {}
        for name, param in params.items():
            if id(param) in flat_ids:
                assert flat is not None
                if id(flat.values) not in self._state:
                    continue
                size, offset = param.numel(), flat.offsets[flat_ids[id(param)]]
                state, total = self._state[id(flat.values)], flat.values.numel()
                acc = state[offset : offset + size].view_as(param)
                velocity = state[total + offset : total + offset + size].view_as(param)
                out[name] = _pack(acc, velocity)
            elif id(param) in self._state:
                out[name] = self._state[id(param)].clone()
        return out

    @torch.no_grad()
    def import_state(
        self,
        params: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor],
        flat: FlatParameters | None = None,
    ) -> None:
        """Resume from ``state`` (as :meth:`export_state` gives it) for every parameter in
        ``params``; raise ``ValueError`` if a parameter's state is missing or misshapen.
        A flat vector's parameters must be all given a state or none."""
        if set(state) != set(params):
            raise ValueError(
                f"optimizer state names {sorted(state)} do not match the "
                f"parameters {sorted(params)}"
            )
        for name, param in params.items():
            expected = packed_shape(param)
            if tuple(state[name].shape) != expected:
                raise ValueError(
                    f"optimizer state of {name} has shape "
                    f"{tuple(state[name].shape)}, expected {expected}"
                )
        flat_ids = _flat_index(flat)
        for name, param in params.items():
            if id(param) not in flat_ids:
                self._state[id(param)] = state[name].to(param.device, param.dtype).clone()
        if flat is not None and flat_ids:
            total = flat.values.numel()
            packed = self._state_of(flat.values)
            in_flat = {id(p): name for name, p in params.items() if id(p) in flat_ids}
            if len(in_flat) != len(flat.params):
                raise ValueError("the optimizer state covers only part of the flat parameters")
            for param, offset in zip(flat.params, flat.offsets):
                size = param.numel()
                acc, velocity = _unpack(state[in_flat[id(param)]].to(packed.device, packed.dtype))
                packed[offset : offset + size] = acc.reshape(-1)
                packed[total + offset : total + offset + size] = velocity.reshape(-1)

    def _native_update(
        self,
        param: torch.Tensor,
        state: torch.Tensor,
        rows: torch.Tensor | None,
        grad: torch.Tensor,
    ) -> bool:
        return self.native and adagrad_momentum_rows_(
            param.data, state, rows, grad, self.lr, self.momentum, EPSILON, self.nesterov
        )

    def _advance(self, grad: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Update ``state`` (accumulator and velocity) in place; return the step to add.
        For the flat vector, whose state is contiguous (in place is ~40 % faster)."""
        width = grad.shape[-1]
        acc, velocity = state[..., :width], state[..., width:]
        acc.addcmul_(grad, grad)
        scaled = (acc + EPSILON).rsqrt_().mul_(grad)
        velocity.mul_(self.momentum).add_(scaled, alpha=-self.lr)
        if self.nesterov:
            return velocity * self.momentum - self.lr * scaled
        return velocity

    def _change(self, grad: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same rule as :meth:`_advance` for gathered rows, as changes to add to
        ``state`` (packed like it) and to the parameter: adding rows (``index_add_``) is
        several times faster on the CPU than overwriting them (``index_copy_``), and
        in-place updates of a gathered state's two strided halves are slower than this."""
        width = grad.shape[-1]
        acc, velocity = state[..., :width], state[..., width:]
        acc_change = grad * grad
        scaled = torch.add(acc, acc_change).add_(EPSILON).rsqrt_().mul_(grad)
        # new velocity = mu * v - lr * scaled = v + ((mu - 1) * v - lr * scaled)
        velocity_change = torch.mul(velocity, self.momentum - 1.0).add_(scaled, alpha=-self.lr)
        new_velocity = velocity + velocity_change
        state_change = torch.cat([acc_change, velocity_change], dim=-1)
        if self.nesterov:
            return state_change, new_velocity.mul_(self.momentum).add_(scaled, alpha=-self.lr)
        return state_change, new_velocity


def packed_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of a parameter's packed state: its own with a last dimension twice as wide."""
    return (*param.shape[:-1], 2 * param.shape[-1])


def grow_rows(
    state: Mapping[str, torch.Tensor], item_names: Collection[str], n_rows: int
) -> dict[str, torch.Tensor]:
    """``state`` with the item matrices' states (``item_names``) grown to ``n_rows`` rows:
    old rows kept, new rows zero (a fresh accumulator and no velocity), as
    :meth:`model.network.GRU4RecNetwork.grow` grows the weights."""
    grown = dict(state)
    for name in item_names:
        if name not in grown:
            continue
        old = grown[name]
        extra = n_rows - old.shape[0]
        if extra < 0:
            raise ValueError(
                f"cannot shrink the optimizer state of {name} from {old.shape[0]} to {n_rows} rows"
            )
        if extra:
            grown[name] = torch.cat([old, old.new_zeros((extra, *old.shape[1:]))])
    return grown


def _pack(acc: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    return torch.cat([acc, velocity], dim=-1)


def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = packed.shape[-1] // 2
    return packed[..., :width], packed[..., width:]


def _flat_index(flat: FlatParameters | None) -> dict[int, int]:
    return {} if flat is None else {id(p): k for k, p in enumerate(flat.params)}
