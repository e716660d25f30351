"""Recall@K and MRR@K of what the stream published, judged by the session's next click.

Prequential evaluation: the list published after a session's click is judged by the
session's next click, a hit at rank r if that item is r-th in the list. This is the offline
protocol of :mod:`model.evaluate` applied to what was actually published, so on a replayed
test log the two agree. A next click on an item the model that published the list does not
know is counted apart, never as a miss (as offline, where such targets are skipped).

One implementation, two uses: a worker judges its own answers as it publishes them
(:class:`PrequentialQuality`, exported per model version), and :func:`online_quality`
judges a recorded output topic (the demo, the benchmarks, the tests).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stream.registry import DEFAULT_KEEP

#: Cut-offs a worker exports (``streamrec_online_hits_total{k}``) and MRR's cut-off.
ONLINE_KS = (5, 20)
MRR_CUTOFF = 20
#: Sessions whose last published list a worker keeps to judge (least recently clicked
#: dropped first).
MAX_TRACKED_SESSIONS = 200_000
#: Model versions whose quality a worker keeps and exports: as many as a registry retains
#: by default, the most recently served. A worker that follows a trainer for months would
#: otherwise export a series for every version it ever served.
MAX_TRACKED_VERSIONS = DEFAULT_KEEP


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
        return {
            f"recall@{self.k}": self.recall,
            f"mrr@{self.k}": self.mrr,
            "n_predictions": self.n_predictions,
            "n_skipped_unknown": self.n_skipped_unknown,
        }


def rank_of(recommendations: list[Mapping[str, Any]], item_id: str) -> int | None:
    """1-based rank of ``item_id`` in a published list, or None when it is not there."""
    return rank_in([entry["item_id"] for entry in recommendations], item_id)


def rank_in(item_ids: Sequence[str], item_id: str) -> int | None:
    """1-based rank of ``item_id`` among ``item_ids``, or None when it is not there."""
    try:
        return item_ids.index(item_id) + 1
    except ValueError:
        return None


class PrequentialQuality:
    """Recall@k for each of ``ks`` and MRR@``mrr_cutoff`` of published lists, per version.

    Keeps each session's last published list (bounded: least recently clicked dropped
    first) with the version and the item map of the model that produced it, and the
    counts of the ``max_versions`` versions that published most recently: an older
    version's counts are dropped, and its lists still waiting for a next click are no
    longer judged.
    """

    def __init__(
        self,
        ks: Sequence[int] = ONLINE_KS,
        mrr_cutoff: int = MRR_CUTOFF,
        max_sessions: int = MAX_TRACKED_SESSIONS,
        max_versions: int = MAX_TRACKED_VERSIONS,
    ) -> None:
        self.ks = tuple(ks)
        self.mrr_cutoff = mrr_cutoff
        self.max_sessions = max_sessions
        self.max_versions = max_versions
        self._versions: OrderedDict[str, None] = OrderedDict()  # least recent first
        self._depth = max(*self.ks, mrr_cutoff)
        self._previous: OrderedDict[str, tuple[Sequence[str], str, Container[str]]] = OrderedDict()
        self.predictions: dict[str, int] = defaultdict(int)
        self.skipped_unknown: dict[str, int] = defaultdict(int)
        self.hits: dict[tuple[str, int], int] = defaultdict(int)
        self.reciprocal_rank_sum: dict[str, float] = defaultdict(float)

    def observe(
        self,
        session_id: str,
        item_id: str,
        published: Sequence[str],
        version: str,
        known_items: Container[str],
    ) -> None:
        """A click of ``session_id`` on ``item_id`` was answered with ``published``; clicks
        of a session must come in click order."""
        previous = self._previous.pop(session_id, None)
        if previous is not None and previous[1] in self._versions:
            self._judge(*previous, target=item_id)
        self._previous[session_id] = (published, version, known_items)
        if len(self._previous) > self.max_sessions:
            self._previous.popitem(last=False)
        self._versions[version] = None
        self._versions.move_to_end(version)
        if len(self._versions) > self.max_versions:
            self._drop_version(self._versions.popitem(last=False)[0])

    def _drop_version(self, version: str) -> None:
        self.predictions.pop(version, None)
        self.skipped_unknown.pop(version, None)
        self.reciprocal_rank_sum.pop(version, None)
        for k in self.ks:
            self.hits.pop((version, k), None)

    def _judge(
        self, items: Sequence[str], version: str, known: Container[str], target: str
    ) -> None:
        if target not in known:
            self.skipped_unknown[version] += 1
            return
        self.predictions[version] += 1
        rank = rank_in(items[: self._depth], target)
        if rank is None:
            return
        for k in self.ks:
            if rank <= k:
                self.hits[(version, k)] += 1
        if rank <= self.mrr_cutoff:
            self.reciprocal_rank_sum[version] += 1.0 / rank

    def forget(self, session_ids: Iterable[str]) -> None:
        for session_id in session_ids:
            self._previous.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._previous)


def online_quality(
    messages: Iterable[Mapping[str, Any]], k: int, known_items: Container[str]
) -> OnlineQuality:
    """Quality of the published lists (decoded output messages) at cutoff ``k``.

    Messages are de-duplicated by their ``source`` (partition, offset), which at-least-once
    delivery may repeat, and ordered by it, which is a session's click order."""
    by_session: dict[str, dict[tuple[int, int], Mapping[str, Any]]] = defaultdict(dict)
    for message in messages:
        source = (message["source"]["partition"], message["source"]["offset"])
        by_session[message["session_id"]].setdefault(source, message)
    judged = PrequentialQuality(ks=(k,), mrr_cutoff=k, max_sessions=len(by_session) + 1)
    for session_id, answers in by_session.items():
        for source in sorted(answers):
            answer = answers[source]
            judged.observe(
                session_id,
                answer["item_id"],
                [entry["item_id"] for entry in answer["recommendations"]],
                "",
                known_items,
            )
    return OnlineQuality(
        k,
        judged.predictions[""],
        judged.skipped_unknown[""],
        judged.hits[("", k)],
        judged.reciprocal_rank_sum[""],
    )
