"""One GRU4Rec training step with a hand-written backward pass.

A step is tiny (32 sessions, one GRU step, ~2,000 sampled items) and runs ~20,000 times
per epoch, so autograd's bookkeeping and the scatter kernels behind an indexed gather's
gradient cost more than the arithmetic. The step is therefore written out: the forward
pass keeps what the backward pass needs, the backward pass is the chain rule of the
network in :mod:`model.network` (which stays the reference: a test checks these gradients
against autograd through it), and only the loss, a function of the score matrix, goes
through autograd so every loss in :mod:`model.losses` works unchanged.

Item rows are gathered once per step (the unique items of the batch); their gradient is
accumulated per unique row and handed to the optimizer by index, so nothing scales with
the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.losses import LossFunction, cross_entropy, cross_entropy_item_major
from model.network import GRU4RecNetwork
from model.optim import AdagradMomentum, FlatParameters


@dataclass
class _LayerCache:
    layer_input: torch.Tensor
    previous: torch.Tensor
    reset: torch.Tensor
    update: torch.Tensor
    candidate: torch.Tensor
    hidden_candidate: torch.Tensor
    dropout_mask: torch.Tensor | None


class TrainingStep:
    """Forward, backward and update for one session-parallel mini-batch."""

    def __init__(
        self,
        network: GRU4RecNetwork,
        optimizer: AdagradMomentum,
        loss_fn: LossFunction,
        log_q: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        self.network = network
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.log_q = log_q
        self.layers = network.config.layers
        self.batch_size = network.config.batch_size
        self.p_embed = network.config.dropout_p_embed
        self.p_hidden = network.config.dropout_p_hidden
        item_params = network.item_parameters()
        self.dense_params = [
            p for p in network.parameters() if all(p is not q for q in item_params)
        ]
        self.flat = FlatParameters(self.dense_params)
        self._grad_of = {id(p): g for p, g in zip(self.dense_params, self.flat.grads)}

    @staticmethod
    def _unique(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted distinct items and each item's position among them.

        A sort of the batch's few thousand ids: its cost does not grow with the catalogue,
        which a catalogue-sized marking table's does (1 ms per step at a million items).
        """
        return torch.unique(items, sorted=True, return_inverse=True)

    @staticmethod
    def _dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor | None:
        if p <= 0:
            return None
        keep = 1.0 - p
        return torch.rand_like(like).lt_(keep).mul_(1.0 / keep)  # bernoulli_ is 2x slower

    @torch.no_grad()
    def __call__(
        self, state: torch.Tensor, inputs: torch.Tensor, out_items: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one batch: ``inputs`` are clicked items, ``out_items`` the targets
        (first ``len(inputs)``) then the shared negatives. Returns (new state, loss)."""
        net = self.network
        n = len(inputs)
        tied = net.item_input is None
        if tied:
            rows, inverse = self._unique(torch.cat([inputs, out_items]))
            in_inverse, out_inverse = inverse[:n], inverse[n:]
            in_rows = out_rows = rows
            out_table = in_table = net.item_output.index_select(0, rows)
        else:
            assert net.item_input is not None  # not tied
            in_rows, in_inverse = self._unique(inputs)
            out_rows, out_inverse = self._unique(out_items)
            in_table = net.item_input.index_select(0, in_rows)
            out_table = net.item_output.index_select(0, out_rows)
        x = in_table.index_select(0, in_inverse)
        out_bias = net.item_bias.index_select(0, out_rows)

        embed_mask = None if net.one_hot else self._dropout_mask(x, self.p_embed)
        if embed_mask is not None:
            x = x * embed_mask
        caches: list[_LayerCache] = []
        new_states = []
        offset = 0
        for i, units in enumerate(self.layers):
            previous = state[:, offset : offset + units]
            offset += units
            if i == 0 and net.one_hot:
                gates_x = x + net.biases[i]
            else:
                gates_x = torch.addmm(net.biases[i], x, net.input_weights[i - net.one_hot])
            gates_h = torch.addmm(net.hidden_biases[i], previous, net.hidden_weights[i])
            reset_update = torch.sigmoid(gates_x[:, : 2 * units] + gates_h[:, : 2 * units])
            reset, update = reset_update[:, :units], reset_update[:, units:]
            hidden_candidate = gates_h[:, 2 * units :]
            candidate = torch.tanh(gates_x[:, 2 * units :] + reset * hidden_candidate)
            hidden = candidate + update * (previous - candidate)
            mask = self._dropout_mask(hidden, self.p_hidden)
            caches.append(
                _LayerCache(x, previous, reset, update, candidate, hidden_candidate, mask)
            )
            x = hidden * mask if mask is not None else hidden
            new_states.append(x)  # the dropped-out state is carried on, as in the papers' code

        # Score each distinct item once, then spread the rows to the sampled layout
        # (duplicates included): cheaper than gathering a weight row per sampled column.
        # Items are kept along dim 0 (item x batch), where gathers and scatters are fast.
        unique_scores = torch.addmm(out_bias, out_table, x.t())
        if self.loss_fn is cross_entropy:
            loss, d_unique_scores = self._cross_entropy(
                unique_scores, out_rows, out_items, out_inverse, n
            )
        else:
            loss, d_unique_scores = self._any_loss(unique_scores, out_items, out_inverse, n)
        if n < self.batch_size:
            # The last steps of an epoch have fewer live sessions than slots. Their events
            # get the weight of any other (the loss's gradient over batch_size, not n):
            # a mean over one row gave it 32x the usual gradient, whose square then
            # inflated Adagrad's accumulators of the shared GRU weights at every epoch
            # end (rsc15-100k, seeds 0-2: Recall@20 0.675-0.678 before, 0.679-0.680
            # after; MRR@20 0.346-0.352 before, 0.354-0.358 after).
            d_unique_scores *= n / self.batch_size
        out_grad = d_unique_scores @ x
        bias_grad = d_unique_scores.sum(dim=1, keepdim=True)
        d_x = d_unique_scores.t() @ out_table
        for i in reversed(range(len(self.layers))):
            d_x = self._layer_backward(i, caches[i], d_x)
        if embed_mask is not None:
            d_x = d_x * embed_mask

        self.optimizer.step_flat(self.flat)
        if tied:
            out_grad.index_add_(0, in_inverse, d_x)
            used_as_output = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
            used_as_output[out_inverse] = True
            outputs = used_as_output.nonzero().squeeze(1)
            self.optimizer.step_rows(net.item_output, rows, out_grad)
            self.optimizer.step_rows(
                net.item_bias, rows.index_select(0, outputs), bias_grad.index_select(0, outputs)
            )
        else:
            assert net.item_input is not None  # not tied
            in_grad = torch.zeros_like(in_table).index_add_(0, in_inverse, d_x)
            self.optimizer.step_rows(net.item_input, in_rows, in_grad)
            self.optimizer.step_rows(net.item_output, out_rows, out_grad)
            self.optimizer.step_rows(net.item_bias, out_rows, bias_grad)
        return torch.cat(new_states, dim=1), loss.detach()

    def _cross_entropy(
        self,
        unique_scores: torch.Tensor,
        out_rows: torch.Tensor,
        out_items: torch.Tensor,
        out_inverse: torch.Tensor,
        n: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy over the sampled columns, computed once per distinct negative.

        A negative drawn ``c`` times adds ``c`` equal terms to each row's softmax
        denominator, i.e. one term with ``log c`` added to its score, and its gradient is
        the sum of its copies'. So the softmax runs over the ``n`` target columns plus one
        row per distinct negative (about half of the 2,048 draws on rsc15-100k), and
        nothing is spread to the sampled layout and gathered back. Same loss and gradient
        as :func:`model.losses.cross_entropy` on the full sampled matrix.
        """
        target_scores = unique_scores.index_select(0, out_inverse[:n])
        copies = torch.bincount(out_inverse[n:], minlength=len(out_rows))
        negative_scores = unique_scores + copies.to(unique_scores.dtype).log_().unsqueeze(1)
        if self.log_q is not None:
            for_targets, for_samples = self.log_q
            target_scores -= for_targets.index_select(0, out_items[:n]).unsqueeze(1)
            negative_scores -= for_samples.index_select(0, out_rows).unsqueeze(1)
        loss, d_scores = cross_entropy_item_major(torch.cat([target_scores, negative_scores]))
        d_unique_scores = d_scores[n:].index_add_(0, out_inverse[:n], d_scores[:n])
        return loss, d_unique_scores

    def _any_loss(
        self,
        unique_scores: torch.Tensor,
        out_items: torch.Tensor,
        out_inverse: torch.Tensor,
        n: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Any loss of :mod:`model.losses` on the sampled layout, differentiated by autograd."""
        scores_by_item = unique_scores.index_select(0, out_inverse)
        if self.log_q is not None:
            for_targets, for_samples = self.log_q
            scores_by_item -= torch.cat(
                [
                    for_targets.index_select(0, out_items[:n]),
                    for_samples.index_select(0, out_items[n:]),
                ]
            ).unsqueeze(1)
        with torch.enable_grad():
            scores = scores_by_item.t().contiguous().requires_grad_()
            loss = self.loss_fn(scores)
            loss.backward()
        assert scores.grad is not None  # a leaf that requires grad, after backward()
        d_scores_by_item = scores.grad.t().contiguous()
        d_unique_scores = torch.zeros_like(unique_scores).index_add_(
            0, out_inverse, d_scores_by_item
        )
        return loss, d_unique_scores

    def _layer_backward(self, i: int, cache: _LayerCache, d_output: torch.Tensor) -> torch.Tensor:
        """Gradients of layer ``i``'s weights (into the flat gradient); returns d(layer input)."""
        net = self.network
        d_hidden = d_output * cache.dropout_mask if cache.dropout_mask is not None else d_output
        update, candidate, reset = cache.update, cache.candidate, cache.reset
        d_candidate_pre = d_hidden * (1 - update) * (1 - candidate * candidate)
        d_update_pre = d_hidden * (cache.previous - candidate) * update * (1 - update)
        d_reset_pre = d_candidate_pre * cache.hidden_candidate * reset * (1 - reset)
        d_gates_x = torch.cat([d_reset_pre, d_update_pre, d_candidate_pre], dim=1)
        d_gates_h = torch.cat([d_reset_pre, d_update_pre, d_candidate_pre * reset], dim=1)
        grad = self._grad_of
        torch.mm(cache.previous.t(), d_gates_h, out=grad[id(net.hidden_weights[i])])
        torch.sum(d_gates_x, dim=0, out=grad[id(net.biases[i])])
        torch.sum(d_gates_h, dim=0, out=grad[id(net.hidden_biases[i])])
        if i == 0 and net.one_hot:
            return d_gates_x  # the gradient of the item's row of one-hot input weights
        weights = net.input_weights[i - net.one_hot]
        torch.mm(cache.layer_input.t(), d_gates_x, out=grad[id(weights)])
        return d_gates_x @ weights.t()
