"""The hand-written backward pass of a training step equals autograd through the network."""

from __future__ import annotations

import pytest
import torch

from model.config import GRU4RecConfig
from model.losses import make_loss
from model.network import GRU4RecNetwork
from model.train import log_q_correction
from model.train_step import TrainingStep


class GradientRecorder:
    """Stands in for the optimizer: records the gradients a step hands over."""

    def __init__(self) -> None:
        self.grads: dict[int, torch.Tensor] = {}
        self.flat_grads: list[torch.Tensor] = []

    def step_flat(self, flat) -> None:  # noqa: ANN001
        self.flat_grads = [g.clone() for g in flat.grads]

    def step_rows(self, param, rows, grad) -> None:  # noqa: ANN001
        full = torch.zeros_like(param)
        full[rows] = grad
        self.grads[id(param)] = self.grads.get(id(param), 0) + full


CONFIGS = [
    GRU4RecConfig(layers=(8,), dropout_p_hidden=0.0),
    GRU4RecConfig(layers=(8,), dropout_p_hidden=0.0, batch_size=4),  # every slot live
    GRU4RecConfig(layers=(6, 5), dropout_p_hidden=0.0, constrained_embedding=False, embedding=4),
    GRU4RecConfig(layers=(8, 6), dropout_p_hidden=0.0, constrained_embedding=False, loss="bpr-max"),
    GRU4RecConfig(
        layers=(6, 5),
        dropout_p_hidden=0.0,
        constrained_embedding=False,
        embedding=4,
        loss="top1-max",
    ),
    GRU4RecConfig(layers=(7,), dropout_p_hidden=0.0, loss="bpr"),
    GRU4RecConfig(layers=(7,), dropout_p_hidden=0.0, loss="top1"),
    # with dropout, as the defaults train (hidden 0.4): autograd replays the step's masks
    GRU4RecConfig(layers=(8,), dropout_p_hidden=0.4),
    GRU4RecConfig(layers=(8,), dropout_p_hidden=0.4, dropout_p_embed=0.3),
    GRU4RecConfig(layers=(7,), dropout_p_hidden=0.4, loss="bpr"),
    GRU4RecConfig(layers=(7,), dropout_p_hidden=0.4, loss="top1"),
    GRU4RecConfig(
        layers=(6, 5),
        dropout_p_hidden=0.4,
        dropout_p_embed=0.2,
        constrained_embedding=False,
        embedding=4,
        loss="bpr-max",
    ),
]


@pytest.mark.parametrize(
    "config",
    CONFIGS,
    ids=lambda c: (
        f"{c.loss}-{len(c.layers)}layers-"
        f"{'tied' if c.constrained_embedding else c.embedding or 'onehot'}"
        f"-batch{c.batch_size}-dropout{c.dropout_p_embed}-{c.dropout_p_hidden}"
    ),
)
def test_gradients_and_state_match_autograd(
    config: GRU4RecConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropout masks are drawn by the step; the reference forward pass applies the same
    masks in the same order (embedding, then each layer's hidden output)."""
    masks: list[torch.Tensor] = []
    draw = TrainingStep._dropout_mask

    def recorded(like: torch.Tensor, p: float) -> torch.Tensor | None:
        mask = draw(like, p)
        if mask is not None:
            masks.append(mask.clone())
        return mask

    monkeypatch.setattr(TrainingStep, "_dropout_mask", staticmethod(recorded))
    torch.manual_seed(0)
    network = GRU4RecNetwork(config, 20)
    with torch.no_grad():
        for param in network.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    state = torch.randn(4, sum(config.layers))
    inputs = torch.tensor([1, 2, 2, 7])
    # 4 targets (one repeated), then 8 samples: some drawn more than once, some also targets
    out_items = torch.tensor([3, 2, 5, 3, 9, 1, 2, 0, 9, 9, 2, 14])
    log_q = (torch.randn(20), torch.randn(20))
    recorder = GradientRecorder()
    step = TrainingStep(network, recorder, make_loss(config.loss, config.bpreg), log_q)
    new_state, loss = step(state, inputs, out_items)

    replayed = iter(masks)

    def same_masks(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
        return x * next(replayed) if p > 0 and training else x

    monkeypatch.setattr(torch.nn.functional, "dropout", same_masks)
    reference_state, output = network(state, network.input_table()[inputs])
    assert next(replayed, None) is None  # every mask the step drew was replayed
    # the step carries each layer's dropped-out output on as its state (the papers' code)
    hidden_masks = masks[len(masks) - len(config.layers) :] if config.dropout_p_hidden else []
    if hidden_masks:
        reference_state = reference_state * torch.cat(hidden_masks, dim=1)
    scores = torch.addmm(
        network.item_bias[out_items].t(), output, network.item_output[out_items].t()
    )
    scores = scores - torch.cat([log_q[0][out_items[:4]], log_q[1][out_items[4:]]])
    reference_loss = make_loss(config.loss, config.bpreg)(scores)
    # 4 live sessions in a batch of batch_size slots: the gradient is the mean loss's
    # times 4 / batch_size, so that every event weighs the same (see TrainingStep)
    (reference_loss * 4 / config.batch_size).backward()

    recorder.grads.update({id(p): g for p, g in zip(step.dense_params, recorder.flat_grads)})
    assert torch.allclose(new_state, reference_state, atol=1e-6)
    assert torch.isclose(loss, reference_loss.detach(), atol=1e-6)
    for name, param in network.named_parameters():
        assert torch.allclose(recorder.grads[id(param)], param.grad, atol=1e-6), name


def test_log_q_uses_popularity_for_targets_and_popularity_alpha_for_samples() -> None:
    support = torch.tensor([1.0, 4.0, 100.0]).numpy()
    for_targets, for_samples = log_q_correction(support, GRU4RecConfig(logq=0.5, sample_alpha=0.25))
    expected = torch.log(torch.tensor([1.0, 4.0, 100.0]))
    assert torch.allclose(for_targets, 0.5 * expected)
    assert torch.allclose(for_samples, 0.5 * 0.25 * expected)
