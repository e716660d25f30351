"""The one inference path shared by offline evaluation and the stream.

:class:`Recommender` is a trained network plus what is needed to serve it: the item map,
item popularity (the fallback for a session that has not clicked a known item yet) and the
version id. Its two operations are batched: advance many sessions' states by one click
each, and rank the whole catalogue for many states. Offline evaluation and the Faust worker
both call exactly these, so "the stream equals the offline evaluation" holds by
construction.

Unknown items (index -1) leave a session's state unchanged: the model has nothing to say
about them, and resetting would throw away what the session told us so far.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from model.config import GRU4RecConfig
from model.data import ItemMap
from model.errors import UserError
from model.item_index import APPROXIMATE_FROM, INDEX_FROM, RANKINGS, ItemIndex
from model.network import GRU4RecNetwork
from model.ranking import LARGE_CATALOGUE, Int8Catalogue, int8_supported, top_k_rows


def select_device(name: str | None = None) -> torch.device:
    """``cuda`` when available and not overridden; a clear error for an unusable choice."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA GPU is available; use --device cpu")
    return device


class Recommender:
    """A servable GRU4Rec model: batched state updates and full-catalogue ranking."""

    def __init__(
        self,
        network: GRU4RecNetwork,
        item_map: ItemMap,
        popularity: np.ndarray,
        config: GRU4RecConfig,
        version: str = "unsaved",
        metadata: dict[str, Any] | None = None,
        optimizer_state: dict[str, torch.Tensor] | None = None,
        index: ItemIndex | None = None,
    ) -> None:
        if len(item_map) != network.n_items or len(popularity) != network.n_items:
            raise ValueError("item map, popularity and network disagree on the catalogue size")
        self.network = network.eval()
        self.item_map = item_map
        self.popularity = np.asarray(popularity, dtype=np.float64)
        self.config = config
        self.version = version
        self.metadata = metadata or {}
        #: Adagrad's state per parameter name (:meth:`model.optim.AdagradMomentum.export_state`)
        #: where training left it, for a warm start to resume; serving never needs it.
        self.optimizer_state = optimizer_state
        self.device = network.item_output.device
        peak = max(float(self.popularity.max(initial=0.0)), 1.0)
        self._popularity_scores = torch.as_tensor(
            self.popularity / peak, dtype=torch.float32, device=self.device
        )
        self._popular: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        #: The approximate index over the item vectors (None: exact ranking only), and
        #: whether :meth:`top_k` uses it (:meth:`use_ranking`).
        self.index = index
        self.approximate = False
        self._int8: Int8Catalogue | None = None

    def build_index(self, base: Recommender | None = None) -> float:
        """Give the model its approximate-ranking index, as every saved version gets one
        from :data:`model.item_index.INDEX_FROM` items on: ``base``'s extended by the new
        items when this model was fine-tuned from ``base`` (items in ``base``'s order, new
        ones after), else clustered afresh. Returns the seconds it took."""
        started = time.perf_counter()
        vectors, bias = self.network.item_output, self.network.item_bias
        if self.n_items < INDEX_FROM:
            self.index = None
        elif (
            base is not None
            and base.index is not None
            and base.n_items <= self.n_items
            and self.item_map.ids[: base.n_items] == base.item_map.ids
        ):
            self.index = base.index.extended(vectors, bias)
        else:
            self.index = ItemIndex.build(vectors, bias)
        return time.perf_counter() - started

    def use_ranking(self, ranking: str) -> str:
        """Rank ``exact``ly, ``approximate``ly (through :attr:`index`, built now if the
        model has none: seconds at a million items, so never on a serving loop), or
        ``auto``: approximately from :data:`model.item_index.APPROXIMATE_FROM` items on
        when the model has an index. Returns what :meth:`top_k` now does, for the log."""
        if ranking not in RANKINGS:
            raise UserError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
        built = ""
        if ranking == "approximate" and self.index is None:
            started = time.perf_counter()
            self.index = ItemIndex.build(self.network.item_output, self.network.item_bias)
            built = f", index built now in {time.perf_counter() - started:.1f} s (none saved)"
        self.approximate = ranking == "approximate" or (
            ranking == "auto" and self.index is not None and self.n_items >= APPROXIMATE_FROM
        )
        if not self.approximate:
            self._int8_catalogue()  # made now, off the serving path (a hot swap loads here)
            return "exact"
        self._int8 = None  # the exact path's copy of the item matrix: not needed now
        return f"approximate ({self.index.params}{built})"  # type: ignore[union-attr]

    @property
    def n_items(self) -> int:
        return self.network.n_items

    @property
    def state_size(self) -> int:
        return self.network.state_size

    def initial_states(self, n: int) -> torch.Tensor:
        return self.network.initial_state(n, self.device)

    @torch.no_grad()
    def step(self, states: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Advance each row of ``states`` by its clicked item; rows with item -1 keep theirs."""
        states = states.to(self.device)
        items = items.to(self.device)
        known = items >= 0
        if bool(known.all()):
            return self.network.step(states, items)
        advanced = states.clone()
        if bool(known.any()):
            advanced[known] = self.network.step(states[known], items[known])
        return advanced

    @torch.no_grad()
    def scores(self, states: torch.Tensor, started: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each state; popularity for sessions not ``started``
        (no known item clicked yet)."""
        states = states.to(self.device)
        started = started.to(self.device)
        scores = self.network.score_all(self.network.last_output(states))
        if not bool(started.all()):
            scores[~started] = self._popularity_scores
        return scores

    @torch.no_grad()
    def top_k(
        self, states: torch.Tensor, started: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best item indexes and their scores for each state, best first: the
        same as ranking :meth:`scores`, up to float32 rounding between near-equal scores.

        States are ranked ``RANKED_TOGETHER`` at a time: their catalogue-wide scores then
        stay in cache between the product and the search (at 40k items in float32, 64 rows
        at a time cost 150 us per row and 256 at a time 200 us; through the int8 copy 93
        and 169). A large catalogue on a CPU is searched through its int8 copy
        (:class:`model.ranking.Int8Catalogue`, exact)."""
        k = min(k, self.n_items)
        states, started = states.to(self.device), started.to(self.device)
        index = self._current_index()
        catalogue = None if index is not None else self._int8_catalogue()
        if index is not None:
            parts = [
                index.top_k(self.network.last_output(some), k)
                for some in states.split(RANKED_TOGETHER)
            ]
        elif catalogue is None:
            parts = [
                top_k_rows(self.scores(some, some_started), k)
                for some, some_started in zip(
                    states.split(RANKED_TOGETHER), started.split(RANKED_TOGETHER)
                )
            ]
        else:
            parts = [
                catalogue.top_k(self.network.last_output(some), k)
                for some in states.split(RANKED_TOGETHER)
            ]
        indices = torch.cat([p[0] for p in parts])
        values = torch.cat([p[1] for p in parts])
        if (index is not None or catalogue is not None) and not bool(started.all()):
            popular_indices, popular_values = self._most_popular(k)
            indices[~started] = popular_indices
            values[~started] = popular_values
        return indices, values

    def _current_index(self) -> ItemIndex | None:
        """The index when ranking approximately; refused once the weights it was made
        from have changed (it would rank with vectors the model no longer has)."""
        if not self.approximate or self.index is None:
            return None
        if not self.index.matches(self.network.item_output, self.network.item_bias):
            raise UserError("the item index no longer matches the model's item vectors")
        return self.index

    def _int8_catalogue(self) -> Int8Catalogue | None:
        """The int8 copy of the item matrix, remade if the weights changed; None where a
        float32 product is as fast (small catalogues) or int8 is not available."""
        if self.n_items < LARGE_CATALOGUE or not int8_supported(self.device):
            return None
        vectors, bias = self.network.item_output, self.network.item_bias
        if self._int8 is None or not self._int8.matches(vectors, bias):
            self._int8 = Int8Catalogue(vectors, bias)
        return self._int8

    def _most_popular(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer to a session with no known item yet (the same for all of them)."""
        if k not in self._popular:
            self._popular[k] = top_k_rows(self._popularity_scores[None, :], k)
        indices, values = self._popular[k]
        return indices[0], values[0]


RANKED_TOGETHER = 64
