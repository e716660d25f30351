"""The GRU4Rec network: item input, stacked GRU cells, sampled or full item output.

GRU4Rec trains with one time step per mini-batch (the hidden state is carried between steps
but not back-propagated through), so the network is written as stacked single-step GRU
cells rather than ``nn.GRU``: that keeps the per-step overhead low and lets the caller
reset individual rows of the state when a session ends.

The hidden state of all layers is one flat ``(batch, sum(layers))`` tensor, which is exactly
what the stream stores per session.

Input variants (all from the papers):
- ``constrained_embedding`` (default): input and output share one item matrix whose width is
  the last layer's size ("tied" embeddings, Hidasi & Czapp 2023);
- ``embedding > 0``: a separate input embedding of that width;
- otherwise one-hot input, implemented as its exact equivalent: a per-item row of the first
  layer's input weights (an embedding of width ``3 * layers[0]``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from model.config import GRU4RecConfig


class GRU4RecNetwork(nn.Module):
    """GRU4Rec. ``n_items`` can grow later (see :meth:`grow`) without touching old rows."""

    #: The parameters with one row per item (``item_input`` only without tied embeddings).
    ITEM_PARAMETERS = ("item_output", "item_bias", "item_input")

    def __init__(
        self, config: GRU4RecConfig, n_items: int, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.n_items = n_items
        layers = config.layers
        last = layers[-1]
        if config.constrained_embedding:
            input_width = last
        elif config.embedding:
            input_width = config.embedding
        else:
            input_width = 0
        # Item-indexed matrices: a mini-batch updates only the rows it touched.
        self.item_output = nn.Parameter(torch.empty(n_items, last))
        self.item_bias = nn.Parameter(torch.zeros(n_items, 1))  # a column: rows like the others
        self.item_input = (
            None
            if config.constrained_embedding
            else nn.Parameter(torch.empty(n_items, input_width or 3 * layers[0]))
        )
        self.one_hot = input_width == 0
        self.input_weights = nn.ParameterList()
        self.hidden_weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        # A hidden-side bias too, as in torch's GRUCell that the authors' code uses: its
        # candidate part sits inside the reset gate, so it is not redundant with ``biases``.
        self.hidden_biases = nn.ParameterList()
        previous = input_width
        for i, units in enumerate(layers):
            if not (i == 0 and self.one_hot):
                self.input_weights.append(nn.Parameter(torch.empty(previous, 3 * units)))
            self.hidden_weights.append(nn.Parameter(torch.empty(units, 3 * units)))
            self.biases.append(nn.Parameter(torch.zeros(3 * units)))
            self.hidden_biases.append(nn.Parameter(torch.zeros(3 * units)))
            previous = units
        self.reset_parameters(generator)

    @property
    def state_size(self) -> int:
        return sum(self.config.layers)

    def item_parameters(self) -> list[nn.Parameter]:
        """Parameters with one row per item (updated by row, grown with the catalogue)."""
        params = [self.item_output, self.item_bias]
        if self.item_input is not None:
            params.append(self.item_input)
        return params

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Glorot-style uniform initialisation, as in the papers' code."""
        scale = self.config.init_scale
        for name, param in self.named_parameters():
            gated = name.startswith(("input_weights", "hidden_weights")) or (
                name == "item_input" and self.one_hot
            )
            if param.dim() == 2 and name != "item_bias" and not gated:
                _glorot_uniform_(param.data, scale, generator=generator)
            elif gated:
                # GRU matrices hold three gates side by side: each is initialised as the
                # (fan_in x units) matrix it is, not as one three-times-wider matrix.
                _glorot_uniform_(
                    param.data,
                    scale,
                    fan=(param.shape[0], param.shape[1] // 3),
                    generator=generator,
                )
            else:
                param.data.zero_()

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(batch, self.state_size, device=device or self.item_output.device)

    def input_table(self) -> torch.Tensor:
        """The item-indexed matrix whose rows are the network's inputs."""
        return self.item_output if self.item_input is None else self.item_input

    def step(self, state: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Advance each row's state by its clicked item (inference)."""
        return self(state, self.input_table()[items])[0]

    def forward(self, state: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One GRU step for a batch of input rows ``x`` (rows of :meth:`input_table`).

        Returns the new state and the last layer's output after hidden dropout (the output
        that is scored). Training gathers ``x`` itself so that it can update only the rows
        it used; inference goes through :meth:`step`.
        """
        if not self.one_hot:
            x = F.dropout(x, self.config.dropout_p_embed, self.training)
        new_states = []
        offset = 0
        for i, units in enumerate(self.config.layers):
            h = state[:, offset : offset + units]
            offset += units
            if i == 0 and self.one_hot:
                gates_x = x + self.biases[i]
            else:
                gates_x = torch.addmm(self.biases[i], x, self.input_weights[i - self.one_hot])
            gates_h = torch.addmm(self.hidden_biases[i], h, self.hidden_weights[i])
            r_x, z_x, n_x = gates_x.chunk(3, dim=1)
            r_h, z_h, n_h = gates_h.chunk(3, dim=1)
            reset = torch.sigmoid(r_x + r_h)
            update = torch.sigmoid(z_x + z_h)
            candidate = torch.tanh(n_x + reset * n_h)
            h = torch.lerp(candidate, h, update)  # update * h + (1 - update) * candidate
            new_states.append(h)
            x = F.dropout(h, self.config.dropout_p_hidden, self.training)
        return torch.cat(new_states, dim=1), x

    def score_all(self, output: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each row of the last layer's output (inference)."""
        return torch.addmm(self.item_bias.t(), output, self.item_output.t())

    def last_output(self, state: torch.Tensor) -> torch.Tensor:
        return state[:, -self.config.layers[-1] :]

    @torch.no_grad()
    def grow(self, n_items: int, generator: torch.Generator | None = None) -> None:
        """Add rows for new items (Glorot-initialised like the rest); old rows are kept.
        (:func:`model.optim.grow_rows` grows an optimizer state to match.)"""
        extra = n_items - self.n_items
        if extra < 0:
            raise ValueError(f"cannot shrink the catalogue from {self.n_items} to {n_items}")
        if extra == 0:
            return
        for name in self.ITEM_PARAMETERS:
            old = getattr(self, name)
            if old is None:
                continue
            rows = torch.zeros((extra, *old.shape[1:]), dtype=old.dtype, device=old.device)
            if name != "item_bias":
                fan = (
                    old.shape[0],
                    old.shape[1] // 3 if self.one_hot and name == "item_input" else old.shape[1],
                )
                _glorot_uniform_(rows, self.config.init_scale, fan=fan, generator=generator)
            setattr(self, name, nn.Parameter(torch.cat([old.data, rows])))
        self.n_items = n_items


def _glorot_uniform_(
    tensor: torch.Tensor,
    scale: float,
    fan: tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
) -> None:
    rows, cols = fan or tensor.shape
    bound = scale * math.sqrt(6.0 / (rows + cols))
    tensor.uniform_(-bound, bound, generator=generator)
