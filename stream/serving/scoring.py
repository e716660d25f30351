"""Apply a batch of clicks to their sessions' states with one batched model call.

This is the worker's computation with Kafka taken out (so it is tested on its own):
given the clicks of a micro-batch, in input order, and the stored state of each session,
it returns each click's new state and top-N list. It goes through
:class:`model.inference.Recommender` exactly as offline evaluation does.

- Two clicks of one session in a batch are applied in order: the batch is cut into
  "waves" (the first click of every session, then the second, ...), one GRU step each;
  then the states after every click of the batch are ranked in one call.
- A click whose offset is not above the session's last applied offset is a replay after a
  crash: it is reported as a duplicate and changes nothing (idempotent state).
- A state computed by another model version is rebuilt from the session's recent items
  under the current model before the click is applied.
- The lists obey the model's catalogue rules (:mod:`model.rules`): unavailable items never,
  and with ``exclude_seen`` not the session's recent items either. A list is shorter than
  ``top_n`` only when fewer items are left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.inference import Recommender
from model.rules import RECENT_ITEMS, seen_indexes
from stream.kafka.wire import Click
from stream.serving.state import SessionState


@dataclass(frozen=True, slots=True)
class SourcedClick:
    """A click and where it was read from (the idempotence key)."""

    click: Click
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one click produced; ``state`` is None for a replayed duplicate."""

    state: SessionState | None
    items: tuple[str, ...]
    scores: tuple[float, ...]
    known_item: bool
    rebuilt: bool


def apply_clicks(
    recommender: Recommender,
    clicks: Sequence[SourcedClick],
    stored: dict[str, SessionState | None],
    top_n: int,
    exclude_seen: bool = False,
) -> list[Outcome]:
    """New state and recommendations for each click, in input order."""
    outcomes: list[Outcome | None] = [None] * len(clicks)
    current = dict(stored)
    seen: dict[str, int] = {}
    waves: list[list[int]] = []
    for i, sourced in enumerate(clicks):
        wave = seen.get(sourced.click.session_id, 0)
        seen[sourced.click.session_id] = wave + 1
        if wave == len(waves):
            waves.append([])
        waves[wave].append(i)
    advanced: list[_Advanced] = []
    for wave_clicks in waves:
        fresh = []
        for i in wave_clicks:
            state = current.get(clicks[i].click.session_id)
            if state is not None and clicks[i].offset <= state.last_offset:
                outcomes[i] = Outcome(None, (), (), False, False)
            else:
                fresh.append(i)
        if fresh:
            advanced.append(_advance_wave(recommender, clicks, fresh, current))
    if advanced:
        # One ranking for the whole batch, not one per wave: the product with the item
        # matrix reads all of it (4 MB in int8 at 40k items) whatever the number of rows.
        hidden = torch.cat([a.hidden for a in advanced])
        started = torch.cat([a.started for a in advanced])
        recently_seen = (
            seen_indexes(recommender.item_map, [s.recent_items for a in advanced for s in a.states])
            if exclude_seen
            else None
        )
        top_items, top_scores = recommender.top_k(hidden, started, top_n, recently_seen)
        item_id = recommender.item_map.ids.__getitem__
        rows = zip(top_items.tolist(), top_scores.tolist())
        for done in advanced:
            for i, state, known, rebuilt in zip(done.clicks, done.states, done.known, done.rebuilt):
                items, scores = next(rows)
                if items[-1] < 0:  # shortened by the rules: item -1 pads the list
                    scores = scores[: items.index(-1)]
                    items = items[: len(scores)]
                outcomes[i] = Outcome(
                    state, tuple(map(item_id, items)), tuple(scores), known, rebuilt
                )
    return outcomes  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class _Advanced:
    """A wave's clicks applied: their new states, as tensors for ranking and as states."""

    clicks: list[int]
    hidden: torch.Tensor
    started: torch.Tensor
    states: list[SessionState]
    known: list[bool]
    rebuilt: list[bool]


def _advance_wave(
    recommender: Recommender,
    clicks: Sequence[SourcedClick],
    wave: list[int],
    current: dict[str, SessionState | None],
) -> _Advanced:
    """Apply one click per session (``wave``) and update ``current``."""
    states = [current.get(clicks[i].click.session_id) for i in wave]
    fresh = [
        (j, s)
        for j, s in enumerate(states)
        if s is not None and s.model_version == recommender.version
    ]
    stale = [
        (j, s)
        for j, s in enumerate(states)
        if s is not None and s.model_version != recommender.version
    ]
    hidden = torch.zeros(len(wave), recommender.state_size)
    started = torch.zeros(len(wave), dtype=torch.bool)
    if fresh:
        index = torch.tensor([j for j, _ in fresh])
        hidden[index] = torch.from_numpy(np.stack([s.hidden for _, s in fresh]))
        started[index] = torch.tensor([s.started for _, s in fresh])
    if stale:
        rebuilt_hidden, rebuilt_started = rebuild_states(
            recommender, [s.recent_items for _, s in stale]
        )
        index = torch.tensor([j for j, _ in stale])
        hidden[index] = rebuilt_hidden.to(hidden.device)
        started[index] = rebuilt_started
    items = torch.tensor(
        [recommender.item_map.index_of(clicks[i].click.item_id) for i in wave], dtype=torch.int64
    )
    new_hidden = recommender.step(hidden, items)
    new_started = started | (items >= 0)
    new_hidden_np = new_hidden.cpu().numpy()
    started_flags = new_started.tolist()
    new_states = []
    for j, i in enumerate(wave):
        sourced = clicks[i]
        previous = states[j]
        recent = (previous.recent_items if previous else ()) + (sourced.click.item_id,)
        state = SessionState(
            hidden=new_hidden_np[j].copy(),
            recent_items=recent[-RECENT_ITEMS:],
            last_offset=sourced.offset,
            last_time=max(sourced.click.timestamp, previous.last_time if previous else 0.0),
            started=started_flags[j],
            model_version=recommender.version,
            partition=sourced.partition,
        )
        current[sourced.click.session_id] = state
        new_states.append(state)
    stale_set = {j for j, _ in stale}
    return _Advanced(
        wave,
        new_hidden,
        new_started.to(recommender.device),
        new_states,
        (items >= 0).tolist(),
        [j in stale_set for j in range(len(wave))],
    )


def rebuild_states(
    recommender: Recommender, histories: Sequence[Sequence[str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (and started flags) of sessions replayed from their item histories."""
    longest = max((len(h) for h in histories), default=0)
    index = np.full((len(histories), longest), -1, dtype=np.int64)
    for row, history in enumerate(histories):
        index[row, : len(history)] = [recommender.item_map.index_of(i) for i in history]
    hidden = recommender.initial_states(len(histories))
    for position in range(longest):
        hidden = recommender.step(hidden, torch.from_numpy(index[:, position]))
    return hidden, torch.from_numpy((index >= 0).any(axis=1))
