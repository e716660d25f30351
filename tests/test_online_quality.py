"""Prequential Recall@K / MRR@K on hand-built output messages (expected values by hand)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from stream.kafka.wire import Click, encode_recommendation
from stream.quality import OnlineQuality, PrequentialQuality, online_quality, rank_in, rank_of

KNOWN = {"a", "b", "c", "d", "x", "y", "z"}


def msg(session: str, item: str, recs: list[str], partition: int, offset: int) -> dict[str, Any]:
    """A decoded output message, built through the real encoder."""
    scores = [1.0 - 0.1 * r for r in range(len(recs))]
    raw = encode_recommendation(
        Click(session, item, 1000.0 + offset), recs, scores, "v1", partition, offset
    )
    return json.loads(raw)


# Session S1 lives on partition 0, S2 on partition 1.
S1 = [
    msg("S1", "a", ["b", "c", "d"], 0, 10),  # next click c: rank 2
    msg("S1", "c", ["x", "a", "b"], 0, 12),  # next click b: rank 3
    msg("S1", "b", ["a"], 0, 15),
]  # last click: judged by nothing
S2 = [
    msg("S2", "x", ["y", "z"], 1, 3),  # next click u (unknown): skipped
    msg("S2", "u", ["z", "y"], 1, 4),  # next click z: rank 1
    msg("S2", "z", ["a", "b"], 1, 7),
]


def arrival() -> list[dict[str, Any]]:
    """Out-of-order arrival, with at-least-once duplicates (same source) mixed in."""
    return [S2[2], S1[1], S2[0], S1[2], S1[1], S2[1], S1[0], S2[0]]


def test_by_hand_k2() -> None:
    # k=2: S1 10->c hit at 2 (1/2); S1 12->b at rank 3, cut: miss; S2 3->u skipped;
    # S2 4->z hit at 1 (1/1). 3 predictions, 2 hits, reciprocal sum 1.5.
    quality = online_quality(arrival(), k=2, known_items=KNOWN)
    assert quality == OnlineQuality(
        k=2, n_predictions=3, n_skipped_unknown=1, hits=2, reciprocal_rank_sum=1.5
    )
    assert quality.recall == pytest.approx(2 / 3)
    assert quality.mrr == pytest.approx(0.5)
    assert quality.to_dict() == {
        "recall@2": pytest.approx(2 / 3),
        "mrr@2": pytest.approx(0.5),
        "n_predictions": 3,
        "n_skipped_unknown": 1,
    }


def test_by_hand_k3() -> None:
    quality = online_quality(arrival(), k=3, known_items=KNOWN)
    assert (quality.n_predictions, quality.n_skipped_unknown, quality.hits) == (3, 1, 3)
    assert quality.reciprocal_rank_sum == pytest.approx(1 / 2 + 1 / 3 + 1)
    assert quality.recall == pytest.approx(1.0)
    assert quality.mrr == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)


def test_k1_only_counts_first_place() -> None:
    quality = online_quality(arrival(), k=1, known_items=KNOWN)
    assert (quality.n_predictions, quality.hits, quality.reciprocal_rank_sum) == (3, 1, 1.0)


def test_lists_longer_than_k_are_cut() -> None:
    long = [msg("S", "a", ["p", "q", "r", "s", "b"], 0, 1), msg("S", "b", [], 0, 2)]
    known = {"a", "b"}
    assert online_quality(long, k=4, known_items=known).hits == 0
    at5 = online_quality(long, k=5, known_items=known)
    assert (at5.hits, at5.reciprocal_rank_sum) == (1, pytest.approx(1 / 5))


def test_duplicates_and_arrival_order_do_not_matter() -> None:
    expected = online_quality(S1 + S2, k=3, known_items=KNOWN)
    for seed in range(5):
        shuffled = arrival() + [random.Random(seed).choice(S1 + S2) for _ in range(4)]
        random.Random(seed).shuffle(shuffled)
        assert online_quality(shuffled, k=3, known_items=KNOWN) == expected
    assert online_quality(S1 + S2 + S1 + S2, k=3, known_items=KNOWN) == expected


def test_order_is_by_offset_not_by_arrival() -> None:
    # Arrival order 12, 10 would judge the list of offset 12 by click a (a hit at rank 2);
    # in click order the list of offset 10 is judged by click c instead (a miss).
    messages = [msg("S", "c", ["x", "a"], 0, 12), msg("S", "a", ["x", "y"], 0, 10)]
    quality = online_quality(messages, k=2, known_items={"a", "c", "x", "y"})
    assert (quality.n_predictions, quality.hits) == (1, 0)


def test_offsets_compare_as_numbers() -> None:
    messages = [msg("S", "b", [], 0, 10), msg("S", "a", ["b"], 0, 9)]
    quality = online_quality(messages, k=1, known_items={"a", "b"})
    assert (quality.n_predictions, quality.hits) == (1, 1)


def test_unknown_targets_are_skipped_and_counted() -> None:
    messages = [
        msg("S", "a", ["u1"], 0, 1),
        msg("S", "u1", ["a"], 0, 2),
        msg("S", "u2", ["a"], 0, 3),
        msg("S", "a", [], 0, 4),
    ]
    quality = online_quality(messages, k=5, known_items={"a"})
    assert (quality.n_predictions, quality.n_skipped_unknown, quality.hits) == (1, 2, 1)
    assert quality.recall == 1.0 and quality.mrr == 1.0


def test_nothing_to_judge() -> None:
    for messages in ([], [S1[0]], [S1[0], S1[0]]):
        quality = online_quality(messages, k=20, known_items=KNOWN)
        assert quality == OnlineQuality(20, 0, 0, 0, 0.0)
        assert quality.recall == 0.0 and quality.mrr == 0.0


def test_rank_of() -> None:
    recs = [{"item_id": "a", "score": 1.0}, {"item_id": "b", "score": 0.5}]
    assert rank_of(recs, "a") == 1
    assert rank_of(recs, "b") == 2
    assert rank_of(recs, "c") is None
    assert rank_of([], "a") is None


def test_rank_in() -> None:
    assert rank_in(("a", "b"), "b") == 2
    assert rank_in(["a", "b"], "a") == 1
    assert rank_in(("a", "b"), "c") is None
    assert rank_in((), "a") is None


def test_only_the_most_recently_serving_versions_keep_their_counts() -> None:
    """A worker following a trainer serves a new version every few minutes; it exports
    the counts of the last ``max_versions`` only, and lists of a dropped version are no
    longer judged (they would bring its series back)."""
    quality = PrequentialQuality(ks=(20,), max_versions=2)
    known = {"a", "b", "c"}
    quality.observe("s1", "a", ["b"], "v1", known)  # waits for s1's next click
    quality.observe("s2", "a", ["b"], "v2", known)
    quality.observe("s2", "b", ["c"], "v2", known)  # judges v2's list: a hit
    assert dict(quality.predictions) == {"v2": 1}
    quality.observe("s3", "a", ["b"], "v3", known)  # a third version: v1 is dropped
    quality.observe("s1", "b", ["c"], "v3", known)  # v1's list is not judged
    quality.observe("s3", "b", ["c"], "v3", known)  # v3's is
    assert dict(quality.predictions) == {"v2": 1, "v3": 1}
    assert dict(quality.hits) == {("v2", 20): 1, ("v3", 20): 1}
    quality.observe("s4", "a", ["b"], "v4", known)  # v2 published least recently: dropped
    assert set(quality.predictions) == {"v3"} and set(quality.hits) == {("v3", 20)}
