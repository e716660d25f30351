"""The baselines of the ICLR 2016 paper, evaluated by the same loop as GRU4Rec.

- POP: the most clicked items of the training data, for everyone.
- S-POP: the items clicked most in the current session; training popularity breaks ties.
- Item-KNN: items similar to the session's last item, where two items are similar when the
  same sessions contain them (cosine of their session vectors, regularised:
  ``sim(i, j) = co(i, j) / ((n_i + lambda)^alpha * (n_j + lambda)^(1 - alpha))``, with
  ``co`` the number of sessions containing both and ``n`` the sessions containing one).

Each implements :class:`model.evaluate.SessionScorer`; an unknown item leaves the state as
it was, exactly as for GRU4Rec.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from model.data import ClickLog, ItemMap
from model.errors import UserError

METHODS = ("pop", "spop", "itemknn")


def _popularity(log: ClickLog) -> tuple[ItemMap, np.ndarray]:
    item_map = ItemMap(log.item_ids)
    counts = np.bincount(log.items, minlength=len(item_map)).astype(np.float64)
    return item_map, counts


class Pop:
    """Popularity: the same ranking for every session."""

    def __init__(self, train: ClickLog) -> None:
        self.item_map, counts = _popularity(train)
        self._scores = torch.from_numpy(counts).float()

    def start(self, n: int) -> None:
        return None

    def advance(self, states: None, items: np.ndarray) -> None:
        return None

    def score(self, states: None, rows: np.ndarray) -> torch.Tensor:
        return self._scores.expand(len(rows), -1)


class SessionPop:
    """Session popularity: counts in the session, then training popularity (< 1) for ties."""

    def __init__(self, train: ClickLog) -> None:
        self.item_map, counts = _popularity(train)
        self._base = torch.from_numpy(counts / (counts.max() + 1.0)).float()

    def start(self, n: int) -> list[dict[int, int]]:
        return [{} for _ in range(n)]

    def advance(self, states: list[dict[int, int]], items: np.ndarray) -> list[dict[int, int]]:
        for row in np.flatnonzero(items >= 0):
            counts = states[row]
            item = int(items[row])
            counts[item] = counts.get(item, 0) + 1
        return states

    def score(self, states: list[dict[int, int]], rows: np.ndarray) -> torch.Tensor:
        scores = self._base.repeat(len(rows), 1)
        for out_row, row in enumerate(rows):
            counts = states[row]
            if counts:
                scores[out_row, list(counts)] += torch.tensor(
                    list(counts.values()), dtype=torch.float32
                )
        return scores


class ItemKNN:
    """Item-to-item similarity of the last clicked item (the paper's Item-KNN)."""

    def __init__(
        self,
        train: ClickLog,
        neighbours: int = 100,
        regularisation: float = 20.0,
        alpha: float = 0.5,
    ) -> None:
        self.item_map, _ = _popularity(train)
        n_items = len(self.item_map)
        pairs = np.unique(np.stack([train.sessions, train.items]), axis=1)
        support = np.bincount(pairs[1], minlength=n_items).astype(np.float64)
        incidence = torch.sparse_coo_tensor(
            torch.from_numpy(pairs),
            torch.ones(pairs.shape[1], dtype=torch.float64),
            (train.n_sessions, n_items),
            check_invariants=True,
        ).coalesce()
        with warnings.catch_warnings():  # sparse @ sparse works but is labelled beta
            warnings.simplefilter("ignore", UserWarning)
            co = torch.sparse.mm(incidence.t().coalesce(), incidence).coalesce()
        rows, cols = co.indices().numpy()
        values = co.values().numpy()
        off_diagonal = rows != cols
        rows, cols, values = rows[off_diagonal], cols[off_diagonal], values[off_diagonal]
        values = values / (
            (support[rows] + regularisation) ** alpha
            * (support[cols] + regularisation) ** (1 - alpha)
        )
        # Keep each item's strongest neighbours: order by (row, -similarity), cut per row.
        order = np.lexsort((-values, rows))
        rows, cols, values = rows[order], cols[order], values[order]
        row_start = np.searchsorted(rows, np.arange(n_items))
        rank_in_row = np.arange(len(rows)) - row_start[rows]
        top = rank_in_row < neighbours
        self._cols = torch.from_numpy(cols[top])
        self._values = torch.from_numpy(values[top]).float()
        self._row_start = torch.from_numpy(np.searchsorted(rows[top], np.arange(n_items + 1)))
        self._n_items = n_items

    def start(self, n: int) -> np.ndarray:
        return np.full(n, -1, dtype=np.int64)

    def advance(self, states: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.where(items >= 0, items, states)

    def score(self, states: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        last = states[rows]
        scores = torch.zeros(len(rows), self._n_items)
        for out_row, item in enumerate(last):
            if item < 0:
                continue
            lo, hi = int(self._row_start[item]), int(self._row_start[item + 1])
            scores[out_row, self._cols[lo:hi]] = self._values[lo:hi]
        return scores


def make_baseline(method: str, train: ClickLog) -> Pop | SessionPop | ItemKNN:
    """Fit the baseline named ``method`` on ``train``."""
    if method == "pop":
        return Pop(train)
    if method == "spop":
        return SessionPop(train)
    if method == "itemknn":
        return ItemKNN(train)
    raise UserError(f"unknown baseline {method!r}; use one of {', '.join(METHODS)}")
