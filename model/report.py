"""The evaluation report's numbers: where GRU4Rec beats the baselines, and where it does not.

The paper's claim is that modelling the whole session beats item-to-item recommendation.
Averages hide whether that holds for the short sessions that dominate real traffic, so this
module breaks the standard metrics down by *position* (the prediction after the 1st, 2nd, ...
click) and by *session length*, and adds what a user choosing a model also asks: how much
of the catalogue a method ever recommends, and how much of it is the few most popular items.

Everything is computed from the one evaluation loop in :mod:`model.evaluate` (through its
``on_batch`` hook), so the overall numbers here are, by construction, the numbers
``streamrec evaluate`` and ``streamrec baseline`` print. Plotting and files live in
:mod:`stream.report_command`; this module only computes.

A method's *top-K list* for a prediction is the set of items whose rank, under the same tie
rule as the metrics, is at most K. A hit at K is then exactly "the target is in the list",
and a scorer that cannot tell items apart (Item-KNN after an item with few neighbours) gets
a shorter list instead of one padded with arbitrary zero-scored items, which would inflate
its coverage.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.baselines import make_baseline
from model.data import ClickLog
from model.errors import UserError
from model.evaluate import (
    EvaluationResult,
    PredictionBatch,
    RecommenderScorer,
    SessionScorer,
    evaluate,
    target_ranks,
)
from model.inference import Recommender

MODEL_NAME = "gru4rec"
BASELINES = ("itemknn", "spop", "pop")  # the paper's baselines, the one compared with first
LABELS = {"gru4rec": "GRU4Rec", "itemknn": "Item-KNN", "spop": "S-POP", "pop": "POP"}
POPULAR_SHARE = 0.01  # "popular" = the top 1% of TRAIN's items by clicks


@dataclass(frozen=True)
class Buckets:
    """Integer buckets given by their lower bounds; the last one is open (e.g. ``10+``)."""

    lows: tuple[int, ...]

    @property
    def labels(self) -> list[str]:
        labels = []
        for low, next_low in zip(self.lows, self.lows[1:]):
            labels.append(str(low) if next_low == low + 1 else f"{low}-{next_low - 1}")
        return labels + [f"{self.lows[-1]}+"]

    def index(self, values: np.ndarray) -> np.ndarray:
        """The bucket of each value (values are never below the first bound)."""
        return np.searchsorted(np.asarray(self.lows), values, side="right") - 1


POSITIONS = Buckets(tuple(range(1, 11)))  # 1, 2, ..., 9, 10+
SESSION_LENGTHS = Buckets((2, 3, 4, 5, 6, 10))  # 2, 3, 4, 5, 6-9, 10+ (tests have 2+)


@dataclass(frozen=True)
class BucketMetrics:
    """Recall@K and MRR@K over the predictions in one bucket (``None`` when it is empty)."""

    bucket: str
    n_predictions: int
    metrics: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "n_predictions": self.n_predictions, **self.metrics}


@dataclass(frozen=True)
class ListStats:
    """What the top-K lists recommend: how much of the catalogue, and how popular it is."""

    k: int
    n_items: int  # the method's catalogue
    n_recommended: int  # items in at least one list
    n_slots: int  # list entries over all predictions
    n_popular_slots: int  # of which items among TRAIN's top 1%

    @property
    def coverage(self) -> float:
        return self.n_recommended / self.n_items if self.n_items else 0.0

    @property
    def popular_share(self) -> float:
        return self.n_popular_slots / self.n_slots if self.n_slots else 0.0

    def to_dict(self, n_predictions: int) -> dict[str, Any]:
        return {
            "k": self.k,
            "n_items": self.n_items,
            "n_recommended": self.n_recommended,
            "coverage": self.coverage,
            "popular_share": self.popular_share,
            "mean_list_length": self.n_slots / n_predictions if n_predictions else 0.0,
        }


@dataclass(frozen=True)
class MethodReport:
    """One method's overall result and its breakdowns."""

    name: str
    result: EvaluationResult
    by_position: list[BucketMetrics]
    by_session_length: list[BucketMetrics]
    lists: ListStats
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": LABELS.get(self.name, self.name),
            "overall": self.result.to_dict(),
            "by_position": [b.to_dict() for b in self.by_position],
            "by_session_length": [b.to_dict() for b in self.by_session_length],
            "lists": self.lists.to_dict(self.result.n_predictions),
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class LogSummary:
    """Size and session-length distribution of a click log."""

    source: str
    n_events: int
    n_sessions: int
    n_items: int
    length_counts: np.ndarray  # length_counts[n] = sessions with n events

    @classmethod
    def of(cls, log: ClickLog) -> LogSummary:
        return cls(
            source=log.source,
            n_events=len(log),
            n_sessions=log.n_sessions,
            n_items=int(len(np.unique(log.items))),
            length_counts=np.bincount(session_lengths(log)),
        )

    def to_dict(self) -> dict[str, Any]:
        sessions = max(self.n_sessions, 1)
        return {
            "source": self.source,
            "events": self.n_events,
            "sessions": self.n_sessions,
            "items": self.n_items,
            "mean_session_length": self.n_events / sessions,
            "share_sessions_length_1_3": int(self.length_counts[:4].sum()) / sessions,
            "session_length_counts": {
                str(n): int(c) for n, c in enumerate(self.length_counts) if c
            },
        }


@dataclass(frozen=True)
class Report:
    """Everything ``report.json`` holds, plus the arrays the plots need."""

    ks: tuple[int, ...]
    ties: str
    model_version: str
    train: LogSummary
    test: LogSummary
    popular_items: int
    methods: dict[str, MethodReport]

    @property
    def list_k(self) -> int:
        return max(self.ks)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ks": list(self.ks),
            "ties": self.ties,
            "list_k": self.list_k,
            "model_version": self.model_version,
            "data": {
                "train": self.train.to_dict(),
                "test": self.test.to_dict(),
                "popular_items": self.popular_items,
            },
            "buckets": {"position": POSITIONS.labels, "session_length": SESSION_LENGTHS.labels},
            "methods": {name: method.to_dict() for name, method in self.methods.items()},
        }
        if MODEL_NAME in self.methods and "itemknn" in self.methods:
            rows = position_comparison(self, MODEL_NAME, "itemknn", self.list_k)
            out["comparison"] = {
                "method": MODEL_NAME,
                "baseline": "itemknn",
                "k": self.list_k,
                "by_position": rows,
                "note": comparison_note(rows, MODEL_NAME, "itemknn", self.list_k),
            }
        return out


def session_lengths(log: ClickLog) -> np.ndarray:
    """Events per session, in session order."""
    return np.diff(log.session_offsets())


def popular_item_ids(train: ClickLog, share: float = POPULAR_SHARE) -> list[str]:
    """TRAIN's most clicked items, the top ``share`` of its catalogue (at least one).

    Ties at the cut keep the item seen first, so the set is deterministic.
    """
    counts = np.bincount(train.items, minlength=len(train.item_ids))
    n_top = max(1, math.ceil(share * len(counts)))
    order = np.argsort(-counts, kind="stable")[:n_top]
    return [str(train.item_ids[i]) for i in order]


def top_k_lists(scores: torch.Tensor, k: int, ties: str) -> torch.Tensor:
    """Which items each row's top-``k`` list holds: those ranked ``k`` or better under the
    metrics' tie rule, so "hit at ``k``" and "target in the list" are the same event.

    Items scoring above the k-th best score are in under every rule; the items tied with it
    share one rank, taken from :func:`model.evaluate.target_ranks` itself. Cheaper than
    ranking every item (one top-k per row instead of a sort).
    """
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    kth = top.values[:, -1:]
    tied_rank = target_ranks(scores, top.indices[:, -1], ties).unsqueeze(1)
    return (scores > kth) | ((scores == kth) & (tied_rank <= k))


class _Collector:
    """Receives every evaluation step (``evaluate(on_batch=...)``) and keeps what the
    breakdowns need: per prediction its rank, position and session length; per item
    whether any top-K list held it."""

    def __init__(
        self, lengths: np.ndarray, n_items: int, popular: np.ndarray, k: int, ties: str
    ) -> None:
        self.lengths = lengths
        self.popular = torch.from_numpy(popular)
        self.k = k
        self.ties = ties
        self.ranks: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []
        self.session_lengths: list[np.ndarray] = []
        self.recommended = np.zeros(n_items, dtype=bool)
        self.n_slots = 0
        self.n_popular_slots = 0

    def __call__(self, batch: PredictionBatch) -> None:
        self.ranks.append(batch.ranks.numpy())
        self.positions.append(np.full(len(batch.sessions), batch.position, dtype=np.int64))
        self.session_lengths.append(self.lengths[batch.sessions])
        listed = top_k_lists(batch.scores, self.k, self.ties)
        self.recommended |= listed.any(dim=0).cpu().numpy()
        self.n_slots += int(listed.sum())
        self.n_popular_slots += int(listed[:, self.popular.to(listed.device)].sum())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ranks, positions and session lengths of all predictions, in evaluation order."""

        def join(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        return (
            join(self.ranks, np.float64),
            join(self.positions, np.int64),
            join(self.session_lengths, np.int64),
        )


def bucket_metrics(
    ranks: np.ndarray, values: np.ndarray, buckets: Buckets, ks: Sequence[int]
) -> list[BucketMetrics]:
    """Recall@K and MRR@K of the predictions in each bucket of ``values``.

    Same sums as :func:`model.evaluate.evaluate`, so the buckets' counts add up to the
    overall count and their count-weighted means to the overall metrics.
    """
    index = buckets.index(values)
    out = []
    for b, label in enumerate(buckets.labels):
        in_bucket = ranks[index == b]
        n = len(in_bucket)
        metrics: dict[str, float | None] = {}
        for k in ks:
            hit = in_bucket <= k
            metrics[f"recall@{k}"] = float(hit.sum()) / n if n else None
            metrics[f"mrr@{k}"] = float((hit / in_bucket).sum()) / n if n else None
        out.append(BucketMetrics(label, n, metrics))
    return out


def evaluate_method(
    name: str,
    scorer: SessionScorer,
    test: ClickLog,
    ks: Sequence[int],
    ties: str,
    popular_ids: Sequence[str],
) -> MethodReport:
    """Evaluate one scorer with the standard protocol and break its results down.

    The top-K lists use the largest K.
    """
    ks = tuple(sorted(set(int(k) for k in ks)))
    n_items = len(scorer.item_map)
    popular = np.zeros(n_items, dtype=bool)
    indexes = scorer.item_map.lookup(popular_ids)
    popular[indexes[indexes >= 0]] = True
    collector = _Collector(session_lengths(test), n_items, popular, max(ks), ties)
    started = time.perf_counter()
    result = evaluate(scorer, test, ks=ks, ties=ties, on_batch=collector)
    seconds = time.perf_counter() - started
    ranks, positions, lengths = collector.arrays()
    return MethodReport(
        name=name,
        result=result,
        by_position=bucket_metrics(ranks, positions, POSITIONS, ks),
        by_session_length=bucket_metrics(ranks, lengths, SESSION_LENGTHS, ks),
        lists=ListStats(
            k=max(ks),
            n_items=n_items,
            n_recommended=int(collector.recommended.sum()),
            n_slots=collector.n_slots,
            n_popular_slots=collector.n_popular_slots,
        ),
        seconds=seconds,
    )


def build_report(
    model: Recommender,
    train: ClickLog,
    test: ClickLog,
    ks: Sequence[int],
    ties: str = "conservative",
    progress: Callable[[str], None] = lambda message: None,
    exclude_seen: bool = False,
    compared: Mapping[str, Recommender] | None = None,
) -> Report:
    """GRU4Rec and the paper's baselines (fitted on ``train``) evaluated on ``test``;
    GRU4Rec under ``model``'s catalogue rules and ``exclude_seen`` (:mod:`model.rules`),
    as the stream serves it. ``compared`` adds more GRU4Rec models under their labels
    (a tuned one beside the default, say), evaluated the same way."""
    taken = sorted(set(compared or ()) & {MODEL_NAME, *BASELINES})
    if taken:
        raise UserError(f"label(s) {', '.join(taken)} name the report's own methods; choose others")
    ks = tuple(sorted(set(int(k) for k in ks)))
    popular_ids = popular_item_ids(train)
    methods: dict[str, MethodReport] = {}
    for name, recommender in {MODEL_NAME: model, **(compared or {})}.items():
        progress(f"evaluating {LABELS.get(name, name)} on {test.n_sessions:,} test sessions")
        methods[name] = evaluate_method(
            name,
            RecommenderScorer(recommender, depth=max(ks), exclude_seen=exclude_seen),
            test,
            ks,
            ties,
            popular_ids,
        )
        progress(f"  {_headline(methods[name])}")
    for method in BASELINES:
        progress(
            f"fitting {LABELS[method]} on {train.n_sessions:,} training sessions and evaluating it"
        )
        methods[method] = evaluate_method(
            method, make_baseline(method, train), test, ks, ties, popular_ids
        )
        progress(f"  {_headline(methods[method])}")
    return Report(
        ks=ks,
        ties=ties,
        model_version=model.version,
        train=LogSummary.of(train),
        test=LogSummary.of(test),
        popular_items=len(popular_ids),
        methods=methods,
    )


def _headline(method: MethodReport) -> str:
    k = max(method.result.ks)
    return (
        f"{LABELS.get(method.name, method.name)}: Recall@{k} {method.result.recall(k):.4f}, "
        f"MRR@{k} {method.result.mrr(k):.4f} ({method.result.n_predictions:,} predictions, "
        f"{method.seconds:.1f} s)"
    )


def position_comparison(report: Report, method: str, baseline: str, k: int) -> list[dict[str, Any]]:
    """Per position bucket: both methods' Recall@K and MRR@K and the differences."""
    rows = []
    for ours, theirs in zip(
        report.methods[method].by_position, report.methods[baseline].by_position
    ):
        row: dict[str, Any] = {"bucket": ours.bucket, "n_predictions": ours.n_predictions}
        for metric in (f"recall@{k}", f"mrr@{k}"):
            a, b = ours.metrics[metric], theirs.metrics[metric]
            row[metric] = {
                method: a,
                baseline: b,
                "difference": None if a is None or b is None else a - b,
            }
        rows.append(row)
    return rows


def comparison_note(rows: list[dict[str, Any]], method: str, baseline: str, k: int) -> str:
    """A plain-language reading of :func:`position_comparison`: where ``method`` wins, on
    what share of the predictions, and by how much (differences in absolute points)."""
    name, other = LABELS.get(method, method), LABELS.get(baseline, baseline)
    total = sum(row["n_predictions"] for row in rows)
    sentences = []
    for metric, title in ((f"recall@{k}", f"Recall@{k}"), (f"mrr@{k}", f"MRR@{k}")):
        cells = [
            (row["bucket"], row[metric]["difference"], row["n_predictions"])
            for row in rows
            if row[metric]["difference"] is not None
        ]
        ahead = [cell for cell in cells if cell[1] > 0]
        behind = [cell for cell in cells if cell[1] < 0]
        if not ahead:
            text = f"{title}: {name} does not beat {other} at any position"
        else:
            where = (
                f"at every position ({cells[0][0]} to {cells[-1][0]})"
                if len(ahead) == len(cells)
                else f"at position(s) {', '.join(bucket for bucket, _, _ in ahead)}"
            )
            share = sum(n for _, _, n in ahead) / total if total else 0.0
            text = (
                f"{title}: {name} beats {other} {where}, {share:.0%} of the predictions, "
                f"by {_spread([diff for _, diff, _ in ahead])}"
            )
        if behind:
            text += (
                f"; it is behind at position(s) "
                f"{', '.join(bucket for bucket, _, _ in behind)}, by "
                f"{_spread([diff for _, diff, _ in behind])}"
            )
        sentences.append(text + ".")
    return " ".join(sentences)


def _spread(differences: list[float]) -> str:
    low, high = min(differences, key=abs), max(differences, key=abs)
    return f"{low:+.3f}" if low == high else f"{low:+.3f} to {high:+.3f}"
