"""Training GRU4Rec: session-parallel mini-batches and the sampled-loss training loop.

Session-parallel mini-batches (ICLR 2016): the ``batch_size`` slots of a mini-batch each
follow one session, one event per step; when a session has no next event its slot's hidden
state is reset and the slot takes the next session (sessions in order of their first
event, never shuffled). When no session is left, the slot is dropped and the batch shrinks,
so the last events of an epoch are trained on, not thrown away.

The same loop warm-starts from an existing model (learning while serving): the item map
and the network grow with the new items, and known items keep their rows. When the model
carries its optimizer state (a model trained by this code and saved in artifact format 3),
the fine-tune resumes from it, grown like the network: Adagrad's accumulators then keep
the step sizes where the model's training left them, instead of starting over with steps
the size of the learning rate.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from model.config import GRU4RecConfig
from model.data import ClickLog, ItemMap
from model.errors import UserError
from model.inference import Recommender, select_device
from model.losses import make_loss
from model.network import GRU4RecNetwork
from model.optim import AdagradMomentum, grow_rows
from model.sampling import PopularitySampler
from model.train_step import TrainingStep


@dataclass(frozen=True)
class Batch:
    """One step of session-parallel training.

    Before the step, the caller keeps the state rows ``keep`` (None: all rows) and then
    zeroes the rows flagged in ``reset`` (slots that start a new session).
    """

    inputs: np.ndarray
    targets: np.ndarray
    keep: np.ndarray | None
    reset: np.ndarray


def session_parallel_batches(
    items: np.ndarray, starts: np.ndarray, ends: np.ndarray, batch_size: int
) -> Iterator[Batch]:
    """Yield the steps of one epoch over sessions ``items[starts[k]:ends[k]]``, in order k."""
    usable = (ends - starts) >= 2
    starts, ends = starts[usable], ends[usable]
    n_sessions = len(starts)
    slots = min(batch_size, n_sessions)
    position = starts[:slots].copy()
    end = ends[:slots].copy()
    next_session = slots
    reset = np.ones(slots, dtype=bool)
    keep: np.ndarray | None = None
    while len(position):
        yield Batch(items[position], items[position + 1], keep, reset)
        position += 1
        finished = np.flatnonzero(position + 1 >= end)
        reset = np.zeros(len(position), dtype=bool)
        keep = None
        if len(finished):
            n_new = min(len(finished), n_sessions - next_session)
            refill = finished[:n_new]
            position[refill] = starts[next_session : next_session + n_new]
            end[refill] = ends[next_session : next_session + n_new]
            next_session += n_new
            reset[refill] = True
            if n_new < len(finished):
                alive = np.ones(len(position), dtype=bool)
                alive[finished[n_new:]] = False
                keep = np.flatnonzero(alive)
                position, end, reset = position[keep], end[keep], reset[keep]


@dataclass(frozen=True)
class TrainingSessions:
    """A click log encoded for training: item indexes and session bounds in time order."""

    items: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @property
    def n_events(self) -> int:
        return int((self.ends - self.starts).sum())

    @property
    def n_predictions(self) -> int:
        return int(np.maximum(self.ends - self.starts - 1, 0).sum())

    @classmethod
    def from_log(cls, log: ClickLog, item_map: ItemMap) -> TrainingSessions:
        """Encode ``log`` with ``item_map`` (grown by the log's new items)."""
        item_map.add(log.item_ids)
        offsets = log.session_offsets()
        starts, ends = offsets[:-1], offsets[1:]
        order = np.argsort(log.times[starts], kind="stable")
        return cls(items=log.item_indexes(item_map), starts=starts[order], ends=ends[order])


class TrainingDiverged(UserError):
    """The loss became infinite or NaN: the setting (a learning rate too high) cannot train.

    A :class:`UserError` for a user who chose the setting; a hyperparameter search tells it
    apart from other errors, because it condemns one trial, not the search.
    """


@dataclass(frozen=True)
class TrainStats:
    epochs: int
    n_events: int
    final_loss: float
    train_seconds: float
    epoch_losses: tuple[float, ...]
    resumed_optimizer: bool = False  # a warm start continued the base's optimizer state

    @property
    def events_per_s(self) -> float:
        return self.n_events * self.epochs / max(self.train_seconds, 1e-9)


def train(
    log: ClickLog,
    config: GRU4RecConfig | None = None,
    *,
    seed: int = 0,
    device: str | None = None,
    base: Recommender | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    resume_optimizer: bool = True,
    on_epoch: Callable[[int, Recommender], None] | None = None,
) -> tuple[Recommender, TrainStats]:
    """Train GRU4Rec on ``log``; warm-start from ``base`` when given.

    ``max_batches`` stops each epoch early (benchmarks on logs too large to finish).

    ``on_epoch(epoch, model)``, when given, is called after each epoch (numbered from 1)
    with the model as trained so far, so that a caller can evaluate it on held-out data
    (its time counts in ``train_seconds``). It must not change the model; an exception it
    raises stops the training and propagates (how a hyperparameter search prunes a trial).

    Warm-starting keeps ``base``'s weights and item indexes, adds rows for items first seen
    in ``log``, and adds ``log``'s item counts to the popularity used for fallbacks. If
    ``base`` carries its optimizer state and ``resume_optimizer`` is set, training resumes
    from that state (new items' rows start at zero); otherwise from a fresh one.
    ``base`` itself is left untouched. The returned model carries its optimizer state.
    """
    config = config or (base.config if base else GRU4RecConfig())
    torch_device = select_device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    resume: dict[str, torch.Tensor] | None = None
    item_map = base.item_map.copy() if base else ItemMap()
    sessions = TrainingSessions.from_log(log, item_map)
    if sessions.n_predictions == 0:
        raise UserError(f"{log.source}: no session has two or more events; nothing to train on")
    if base is not None:
        if (
            base.config.layers != config.layers
            or base.config.embedding != config.embedding
            or base.config.constrained_embedding != config.constrained_embedding
        ):
            raise UserError(
                "warm start needs the base model's architecture "
                "(layers, embedding, constrained_embedding)"
            )
        network = GRU4RecNetwork(config, base.network.n_items)
        network.load_state_dict(base.network.state_dict())
        network.grow(len(item_map), generator=generator)
        popularity = np.zeros(len(item_map))
        popularity[: len(base.popularity)] = base.popularity
        if resume_optimizer and base.optimizer_state is not None:
            resume = grow_rows(base.optimizer_state, network.ITEM_PARAMETERS, len(item_map))
    else:
        network = GRU4RecNetwork(config, len(item_map), generator=generator)
        popularity = np.zeros(len(item_map))
    counts = np.bincount(sessions.items, minlength=len(item_map)).astype(np.float64)
    popularity += counts
    network.to(torch_device)

    def after_epoch(epoch: int) -> None:
        if on_epoch is not None:
            on_epoch(epoch, Recommender(network, item_map, popularity, config))
            network.train()  # the Recommender put it in evaluation mode

    stats, optimizer_state = _fit(
        network,
        sessions,
        counts,
        config,
        seed,
        torch_device,
        progress,
        max_batches,
        resume,
        after_epoch,
    )
    network.eval()
    return Recommender(
        network, item_map, popularity, config, optimizer_state=optimizer_state
    ), stats


def _fit(
    network: GRU4RecNetwork,
    sessions: TrainingSessions,
    support: np.ndarray,
    config: GRU4RecConfig,
    seed: int,
    device: torch.device,
    progress: bool,
    max_batches: int | None,
    resume: dict[str, torch.Tensor] | None,
    after_epoch: Callable[[int], None],
) -> tuple[TrainStats, dict[str, torch.Tensor]]:
    network.train()
    sampler = PopularitySampler(
        support,
        config.sample_alpha,
        config.sample_store_size,
        torch.Generator(device).manual_seed(seed),
        device,
    )
    log_q = (
        log_q_correction(support, config)
        if config.loss == "cross-entropy" and config.logq > 0
        else None
    )
    optimizer = AdagradMomentum(config.learning_rate, config.momentum, config.nesterov)
    step = TrainingStep(network, optimizer, make_loss(config.loss, config.bpreg), log_q)
    named = dict(network.named_parameters())
    if resume is not None:
        try:
            optimizer.import_state(named, resume, step.flat)
        except ValueError as exc:
            raise UserError(f"cannot resume the base model's optimizer state: {exc}") from None
    epoch_losses: list[float] = []
    started = time.perf_counter()
    for epoch in range(config.n_epochs):
        bar = tqdm(
            total=sessions.n_predictions,
            desc=f"epoch {epoch + 1}/{config.n_epochs}",
            unit="ev",
            file=sys.stderr,
            disable=not progress,
            leave=True,
            mininterval=0.5,
        )
        usable = int(((sessions.ends - sessions.starts) >= 2).sum())
        state = network.initial_state(min(config.batch_size, usable), device)
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        epoch_start = time.perf_counter()
        for batch in session_parallel_batches(
            sessions.items, sessions.starts, sessions.ends, config.batch_size
        ):
            if batch.keep is not None:
                state = state[torch.from_numpy(batch.keep).to(device)]
            if batch.reset.any():
                state[torch.from_numpy(batch.reset).to(device)] = 0.0
            inputs = torch.from_numpy(batch.inputs).to(device)
            targets = torch.from_numpy(batch.targets).to(device)
            out_items = torch.cat([targets, sampler.sample(config.n_sample)])
            state, loss = step(state, inputs, out_items)
            loss_sum += loss
            n_steps += 1
            if n_steps == max_batches:
                break
            if progress and n_steps % 200 == 0:
                _show(bar, n_steps * config.batch_size, loss_sum.item() / n_steps, epoch_start)
        epoch_loss = loss_sum.item() / max(n_steps, 1)
        if not math.isfinite(epoch_loss):
            raise TrainingDiverged(
                f"training diverged in epoch {epoch + 1} (loss {epoch_loss}); "
                f"try a lower learning_rate than {config.learning_rate}"
            )
        _show(bar, sessions.n_predictions, epoch_loss, epoch_start)
        bar.close()
        epoch_losses.append(epoch_loss)
        after_epoch(epoch + 1)
    n_events = sessions.n_events if max_batches is None else n_steps * config.batch_size
    stats = TrainStats(
        epochs=config.n_epochs,
        n_events=n_events,
        final_loss=epoch_losses[-1],
        train_seconds=time.perf_counter() - started,
        epoch_losses=tuple(epoch_losses),
        resumed_optimizer=resume is not None,
    )
    return stats, optimizer.export_state(named, step.flat)


def log_q_correction(
    support: np.ndarray, config: GRU4RecConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """logQ terms for the two kinds of sampled columns (Hidasi & Czapp 2023).

    A column's score is lowered by ``logq * log Q(item)``, Q being how likely the item was to
    be drawn as a candidate: the in-batch targets come from the data, so Q ~ popularity;
    the shared extra negatives were drawn with popularity^alpha. Both use raw counts, as
    the authors' code does.
    """
    log_support = torch.from_numpy(np.log(np.maximum(support, 1.0))).float()
    return config.logq * log_support, config.logq * config.sample_alpha * log_support


def _show(bar: tqdm, done: int, loss: float, epoch_start: float) -> None:
    bar.n = min(done, bar.total)
    rate = done / max(time.perf_counter() - epoch_start, 1e-9)
    bar.set_postfix(loss=f"{loss:.4f}", ev_s=f"{rate:,.0f}", refresh=True)
