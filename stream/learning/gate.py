"""The validation gate: is a fine-tuned candidate good enough to replace the served model?"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from model.data import ClickLog
from model.evaluate import PredictionBatch, RecommenderScorer, evaluate
from model.inference import Recommender

GATE_K = 20


@dataclass(frozen=True)
class GateResult:
    """The validation gate's numbers (Recall@``k`` on the holdout) and its verdict."""

    k: int
    margin: float
    current_recall: float
    candidate_recall: float
    n_predictions: int  # targets the current model knows: the compared ones
    candidate_new_item_recall: float | None
    n_new_item_predictions: int  # targets only the candidate knows
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reason(self) -> str:
        if self.n_predictions == 0:
            return "no holdout prediction has a target the current model knows"
        relation = ">=" if self.passed else "<"
        return (
            f"candidate Recall@{self.k} {self.candidate_recall:.4f} {relation} current "
            f"{self.current_recall:.4f} - margin {self.margin:g}"
        )


def gate(
    current: Recommender, candidate: Recommender, holdout: ClickLog, margin: float, k: int = GATE_K
) -> GateResult:
    """Compare ``candidate`` with ``current`` on the holdout, fairly for new items.

    Both are compared on the predictions whose target ``current`` knows (it cannot rank
    the others, and counting them as its misses would promote any candidate that merely
    learnt new ids). The candidate ranks against its whole, larger catalogue, as it would
    when served. With no comparable prediction there is no evidence, and the gate fails.
    """
    baseline = evaluate(RecommenderScorer(current), holdout, ks=(k,))
    known_to_current = current.item_map.lookup(candidate.item_map.ids) >= 0
    hits = {True: 0, False: 0}
    counts = {True: 0, False: 0}

    def split(batch: PredictionBatch) -> None:
        known = known_to_current[batch.targets]
        hit = (batch.ranks <= k).numpy()
        for flag in (True, False):
            mask = known == flag
            counts[flag] += int(mask.sum())
            hits[flag] += int(hit[mask].sum())

    evaluate(RecommenderScorer(candidate), holdout, ks=(k,), on_batch=split)
    candidate_recall = hits[True] / counts[True] if counts[True] else 0.0
    passed = counts[True] > 0 and candidate_recall >= baseline.recall(k) - margin
    return GateResult(
        k=k,
        margin=margin,
        current_recall=baseline.recall(k),
        candidate_recall=candidate_recall,
        n_predictions=counts[True],
        candidate_new_item_recall=hits[False] / counts[False] if counts[False] else None,
        n_new_item_predictions=counts[False],
        passed=passed,
    )
