"""The one inference path shared by offline evaluation and the stream.

:class:`Recommender` is a trained network plus what is needed to serve it: the item map,
item popularity (the fallback for a session that has not clicked a known item yet) and the
version id. Its two operations are batched: advance many sessions' states by one click
each, and rank the whole catalogue for many states. Offline evaluation and the Faust worker
both call exactly these, so "the stream equals the offline evaluation" holds by
construction.

Unknown items (index -1) leave a session's state unchanged: the model has nothing to say
about them, and resetting would throw away what the session told us so far.

Both rankings obey the catalogue rules of :mod:`model.rules`: items marked unavailable
(:meth:`Recommender.set_available`, :meth:`Recommender.restrict`) are never ranked, and
the items a session has seen are left out when its ``seen`` row is given.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from model.config import GRU4RecConfig
from model.data import ItemMap
from model.errors import UserError
from model.item_index import APPROXIMATE_FROM, INDEX_FROM, RANKINGS, ItemIndex
from model.network import GRU4RecNetwork
from model.ranking import LARGE_CATALOGUE, Int8Catalogue, int8_supported, top_k_rows
from model.rules import obey


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
        #: The items no list may hold now (:mod:`model.rules`).
        self.unavailable = torch.zeros(network.n_items, dtype=torch.bool, device=self.device)

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
        self._apply_rules(self.index)
        return time.perf_counter() - started

    def set_available(self, items: torch.Tensor, available: bool) -> None:
        """Let ``items`` (indexes) be recommended again, or keep them out of every list
        from the next ranking on. Costs a few microseconds per item, whatever the
        catalogue's size, so availability changes are applied as they come."""
        items = items.to(self.device)
        if not len(items):
            return
        self.unavailable[items] = not available
        for ranking in (self._int8, self.index):
            if ranking is not None:
                ranking.set_available(items, available)
        self._popular.clear()

    def restrict(self, unavailable: Iterable[str]) -> int:
        """Make exactly the items of ``unavailable`` (ids; those the model does not know
        are ignored) unavailable, every other item available. Returns how many it knew."""
        known = [i for i in map(self.item_map.index_of, unavailable) if i >= 0]
        self.set_available(self.unavailable.nonzero().view(-1), True)
        self.set_available(torch.tensor(known, dtype=torch.int64), False)
        return len(known)

    def _apply_rules(self, ranking: Int8Catalogue | ItemIndex | None) -> None:
        """Give a ranking structure made just now the current availability."""
        if ranking is not None and bool(self.unavailable.any()):
            ranking.set_available(self.unavailable.nonzero().view(-1), False)

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
            self._apply_rules(self.index)
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
    def scores(
        self, states: torch.Tensor, started: torch.Tensor, seen: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores of every item for each state; popularity for sessions not ``started``
        (no known item clicked yet). Unavailable items, and each row's ``seen`` items
        (indexes, -1 for none), score ``-inf``."""
        states = states.to(self.device)
        started = started.to(self.device)
        scores = self.network.score_all(self.network.last_output(states))
        if not bool(started.all()):
            scores[~started] = self._popularity_scores
        if bool(self.unavailable.any()):
            scores[:, self.unavailable] = -torch.inf
        if seen is not None:
            row, column = (seen >= 0).nonzero(as_tuple=True)
            scores[row.to(self.device), seen[row, column].to(self.device)] = -torch.inf
        return scores

    @torch.no_grad()
    def top_k(
        self,
        states: torch.Tensor,
        started: torch.Tensor,
        k: int,
        seen: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best item indexes and their scores for each state, best first: the
        same as ranking :meth:`scores` (with the same ``seen``), up to float32 rounding
        between near-equal scores. A row with fewer than ``k`` items left by the rules
        ends in item -1, score ``-inf``.

        States are ranked ``RANKED_TOGETHER`` at a time: their catalogue-wide scores then
        stay in cache between the product and the search (at 40k items in float32, 64 rows
        at a time cost 150 us per row and 256 at a time 200 us; through the int8 copy 93
        and 169). A large catalogue on a CPU is searched through its int8 copy
        (:class:`model.ranking.Int8Catalogue`, exact)."""
        wanted = min(k, self.n_items)
        # Seen items are dropped after ranking: as many more are asked for.
        k = min(wanted + (seen.shape[1] if seen is not None else 0), self.n_items)
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
        if seen is None and not bool(self.unavailable.any()):
            return indices, values
        return obey(indices, values, seen, wanted)

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
            self._apply_rules(self._int8)
        return self._int8

    def _most_popular(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer to a session with no known item yet (the same for all of them)."""
        if k not in self._popular:
            popularity = self._popularity_scores.masked_fill(self.unavailable, -torch.inf)
            self._popular[k] = top_k_rows(popularity[None, :], k)
        indices, values = self._popular[k]
        return indices[0], values[0]


RANKED_TOGETHER = 64
