"""Next-item evaluation as in the GRU4Rec papers: Recall@K and MRR@K over the full catalogue.

For every event of a test session but the last, the scorer ranks the session's next item
against every item it knows. A target the scorer does not know cannot be ranked: it is
skipped and counted (``n_skipped_unknown``), never silently dropped. Ties are resolved by
``ties``: ``conservative`` (the target ranks below every item with an equal score, the
default and the papers' choice), ``optimistic`` (above them) or ``median``.

Any model that implements :class:`SessionScorer` is evaluated by the same loop: GRU4Rec
through :class:`RecommenderScorer` and the baselines in :mod:`model.baselines`. Analyses
that need more than the totals (:mod:`model.report`) pass ``on_batch`` and receive each
step's scores and ranks, so they never run a second loop that could drift from this one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from model.data import ClickLog, ItemMap
from model.errors import UserError
from model.inference import Recommender
from model.rules import RECENT_ITEMS

TIE_MODES = ("conservative", "optimistic", "median")
DEFAULT_KS = (1, 5, 10, 20)


class SessionScorer(Protocol):
    """What the evaluation loop needs of a model; states are opaque to it."""

    item_map: ItemMap

    def start(self, n: int) -> Any:
        """States for ``n`` new sessions."""

    def advance(self, states: Any, items: np.ndarray) -> Any:
        """States after one click per row; rows whose item is -1 keep their state."""

    def score(self, states: Any, rows: np.ndarray) -> torch.Tensor | TopLists:
        """Scores of all items for the given rows, shape ``(len(rows), n_items)``, or
        only the lists of a ranking that scores nothing else (:class:`TopLists`)."""


@dataclass(frozen=True)
class TopLists:
    """Rankings that score only the items they list, every other item ``-inf``: what an
    approximate ranking serves. Ranks are counted from the lists alone, exactly as from
    the dense rows (:meth:`dense`), which at a million items would be a 4 MB row per
    prediction to fill and then scan: that made approximate evaluation 30x slower than
    the index's own search."""

    items: torch.Tensor  # (rows, depth) item indexes
    values: torch.Tensor  # (rows, depth) their scores
    n_items: int

    @property
    def device(self) -> torch.device:
        return self.values.device

    def dense(self) -> torch.Tensor:
        scores = torch.full((len(self.items), self.n_items), -torch.inf, device=self.values.device)
        # a list the rules shortened ends in item -1 (score -inf): not an item
        row, column = (self.items >= 0).nonzero(as_tuple=True)
        scores[row, self.items[row, column]] = self.values[row, column]
        return scores

    def ranks(self, targets: torch.Tensor, ties: str) -> torch.Tensor:
        """:func:`target_ranks` of ``targets``: a listed target ranks among the lists'
        scores; one not listed ties with every unlisted item at ``-inf``, below the list."""
        listed = self.items == targets.unsqueeze(1)
        target_scores = torch.where(listed, self.values, -torch.inf).amax(dim=1, keepdim=True)
        greater = (self.values > target_scores).sum(dim=1).double()
        equal = (self.values == target_scores).sum(dim=1).double()
        depth = self.items.shape[1]
        equal = torch.where(listed.any(dim=1), equal, float(self.n_items - depth))
        if ties == "conservative":
            return greater + equal
        if ties == "optimistic":
            return greater + 1
        return greater + (equal + 1) / 2


class RecommenderScorer:
    """GRU4Rec through :class:`Recommender`: the same calls the stream makes.

    A recommender that ranks approximately (:meth:`Recommender.use_ranking`) is evaluated
    on what it would serve: its top ``depth`` items keep their (exact) scores and every
    other item scores ``-inf``, so Recall@K and MRR@K for K up to ``depth`` are those of
    the served lists.

    The catalogue rules (:mod:`model.rules`) are the recommender's: its unavailable items
    score ``-inf``, and with ``exclude_seen`` so do the items of each session's last
    :data:`~model.rules.RECENT_ITEMS` clicks, as the stream leaves them out.
    """

    def __init__(
        self, recommender: Recommender, depth: int = max(DEFAULT_KS), exclude_seen: bool = False
    ) -> None:
        self.recommender = recommender
        self.item_map = recommender.item_map
        self.depth = depth
        self.exclude_seen = exclude_seen

    def start(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            self.recommender.initial_states(n),
            torch.zeros(n, dtype=torch.bool, device=self.recommender.device),
            torch.full((n, RECENT_ITEMS), -1, dtype=torch.int64),
        )

    def advance(
        self, states: tuple[torch.Tensor, torch.Tensor, torch.Tensor], items: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, started, recent = states
        items_t = torch.from_numpy(items)
        return (
            self.recommender.step(hidden, items_t),
            started | (items_t >= 0).to(started.device),
            torch.cat([recent[:, 1:], items_t.unsqueeze(1)], dim=1),
        )

    def score(
        self, states: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows: np.ndarray
    ) -> torch.Tensor | TopLists:
        hidden, started, recent = states
        index = torch.from_numpy(rows).to(hidden.device)
        seen = recent[torch.from_numpy(rows)] if self.exclude_seen else None
        if not self.recommender.approximate:
            return self.recommender.scores(hidden[index], started[index], seen)
        items, values = self.recommender.top_k(hidden[index], started[index], self.depth, seen)
        return TopLists(items, values, self.recommender.n_items)


@dataclass
class EvaluationResult:
    ks: tuple[int, ...]
    hits: dict[int, float] = field(default_factory=dict)
    reciprocal_ranks: dict[int, float] = field(default_factory=dict)
    n_predictions: int = 0
    n_skipped_unknown: int = 0

    def recall(self, k: int) -> float:
        return self.hits[k] / self.n_predictions if self.n_predictions else 0.0

    def mrr(self, k: int) -> float:
        return self.reciprocal_ranks[k] / self.n_predictions if self.n_predictions else 0.0

    def to_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {}
        for k in self.ks:
            out[f"recall@{k}"] = self.recall(k)
            out[f"mrr@{k}"] = self.mrr(k)
        out["n_predictions"] = self.n_predictions
        out["n_skipped_unknown"] = self.n_skipped_unknown
        return out


@dataclass(frozen=True)
class PredictionBatch:
    """The predictions of one evaluation step, exactly as the metrics counted them.

    Given to ``evaluate(on_batch=...)`` so that breakdowns (by position, by session length,
    the top-K lists behind catalogue coverage) come from the same scores and ranks as the
    totals. ``scores`` is only valid during the call: copy what you keep.
    """

    sessions: np.ndarray  # each prediction's session index in the evaluated log
    position: int  # clicks seen so far in these sessions: 1 = after the first click
    targets: np.ndarray  # item index (in the scorer's item map) of the next click
    ranking: torch.Tensor | TopLists  # what the scorer returned, one row per prediction
    ranks: torch.Tensor  # 1-based rank of the target under the tie mode (CPU, float64)

    @property
    def scores(self) -> torch.Tensor:
        """Scores of every item, one row per prediction (filled in for top lists)."""
        return self.ranking.dense() if isinstance(self.ranking, TopLists) else self.ranking


def target_ranks(scores: torch.Tensor | TopLists, targets: torch.Tensor, ties: str) -> torch.Tensor:
    """1-based rank of each row's target among all columns (float: median can be x.5)."""
    if isinstance(scores, TopLists):
        return scores.ranks(targets, ties)
    target_scores = scores.gather(1, targets.unsqueeze(1))
    # One pass over the row for the two usual modes, counted in int32: at a million items
    # the counting, not the scoring, took half of an evaluation.
    if ties == "conservative":  # every item scoring at least the target's, itself included
        return (scores >= target_scores).sum(dim=1, dtype=torch.int32).double()
    greater = (scores > target_scores).sum(dim=1, dtype=torch.int32).double()
    if ties == "optimistic":
        return greater + 1
    equal = (scores == target_scores).sum(dim=1, dtype=torch.int32).double()  # with itself
    return greater + (equal + 1) / 2


def evaluate(
    scorer: SessionScorer,
    log: ClickLog,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "conservative",
    sessions_per_batch: int = 512,
    on_batch: Callable[[PredictionBatch], None] | None = None,
) -> EvaluationResult:
    """Recall@K and MRR@K of ``scorer`` on every next-click prediction in ``log``.

    ``on_batch``, when given, sees every step's predictions (see :class:`PredictionBatch`).
    """
    if ties not in TIE_MODES:
        raise UserError(f"unknown tie mode {ties!r}; use one of {', '.join(TIE_MODES)}")
    if not ks or any(k < 1 for k in ks):
        raise UserError(f"cutoffs must be positive integers, got {list(ks)}")
    ks = tuple(sorted(set(int(k) for k in ks)))
    result = EvaluationResult(
        ks=ks, hits=dict.fromkeys(ks, 0.0), reciprocal_ranks=dict.fromkeys(ks, 0.0)
    )
    items = log.item_indexes(scorer.item_map)
    offsets = log.session_offsets()
    for first in range(0, log.n_sessions, sessions_per_batch):
        starts = offsets[first : first + sessions_per_batch + 1]
        _evaluate_sessions(scorer, items, starts[:-1], starts[1:], ties, result, first, on_batch)
    return result


def _evaluate_sessions(
    scorer: SessionScorer,
    items: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    ties: str,
    result: EvaluationResult,
    first_session: int,
    on_batch: Callable[[PredictionBatch], None] | None,
) -> None:
    """Walk a group of sessions position by position, all sessions at once."""
    lengths = ends - starts
    states = scorer.start(len(starts))
    for position in range(int(lengths.max()) - 1):
        active = lengths > position + 1
        clicked = np.where(active, items[np.minimum(starts + position, ends - 1)], -1)
        states = scorer.advance(states, clicked)
        rows = np.flatnonzero(active)
        targets = items[starts[rows] + position + 1]
        known = targets >= 0
        result.n_skipped_unknown += int((~known).sum())
        rows, targets = rows[known], targets[known]
        if len(rows) == 0:
            continue
        scores = scorer.score(states, rows)
        ranks = target_ranks(scores, torch.from_numpy(targets).to(scores.device), ties).cpu()
        result.n_predictions += len(rows)
        for k in result.ks:
            hit = ranks <= k
            result.hits[k] += float(hit.sum())
            result.reciprocal_ranks[k] += float((hit / ranks).sum())
        if on_batch is not None:
            on_batch(PredictionBatch(first_session + rows, position + 1, targets, scores, ranks))
