"""Recall@K and MRR@K measured on the output stream itself (prequential evaluation).

The recommendation published after a session's click is judged by the session's next
click: a hit at rank r if that item is r-th in the list. This is the offline protocol of
:mod:`model.evaluate` applied to what the stream actually published, so on a replayed
test log the two must agree (targets the model does not know are skipped in both).

Messages are de-duplicated by their ``source`` (partition, offset), which at-least-once
delivery may repeat, and ordered by it, which is a session's click order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OnlineQuality:
    k: int
    n_predictions: int
    n_skipped_unknown: int
    hits: int
    reciprocal_rank_sum: float

    @property
    def recall(self) -> float:
        return self.hits / self.n_predictions if self.n_predictions else 0.0

    @property
    def mrr(self) -> float:
        return self.reciprocal_rank_sum / self.n_predictions if self.n_predictions else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {f"recall@{self.k}": self.recall, f"mrr@{self.k}": self.mrr,
                "n_predictions": self.n_predictions,
                "n_skipped_unknown": self.n_skipped_unknown}


def rank_of(recommendations: list[Mapping[str, Any]], item_id: str) -> int | None:
    """1-based rank of ``item_id`` in a published list, or None when it is not there."""
    return rank_in([entry["item_id"] for entry in recommendations], item_id)


def rank_in(item_ids: Sequence[str], item_id: str) -> int | None:
    """1-based rank of ``item_id`` among ``item_ids``, or None when it is not there."""
    try:
        return item_ids.index(item_id) + 1
    except ValueError:
        return None


def online_quality(messages: Iterable[Mapping[str, Any]], k: int,
                   known_items: Container[str]) -> OnlineQuality:
    """Quality of the published lists (decoded output messages) at cutoff ``k``."""
    by_session: dict[str, dict[tuple[int, int], Mapping[str, Any]]] = defaultdict(dict)
    for message in messages:
        source = (message["source"]["partition"], message["source"]["offset"])
        by_session[message["session_id"]].setdefault(source, message)
    predictions = skipped = hits = 0
    reciprocal = 0.0
    for answers in by_session.values():
        ordered = [answers[source] for source in sorted(answers)]
        for current, following in zip(ordered, ordered[1:]):
            target = following["item_id"]
            if target not in known_items:
                skipped += 1
                continue
            predictions += 1
            rank = rank_of(current["recommendations"][:k], target)
            if rank is not None:
                hits += 1
                reciprocal += 1.0 / rank
    return OnlineQuality(k, predictions, skipped, hits, reciprocal)
