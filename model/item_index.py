"""Approximate top-k over a large catalogue: an inverted-file index, re-ranked exactly.

GRU4Rec scores item ``i`` for a session state's output ``h`` as ``h·e_i + b_i``, a maximum
inner product search over the vectors ``[e_i, b_i]`` with the query ``[h, 1]``. Exact
ranking reads the whole item matrix for every batch (400 MB at a million items in float32,
100 MB through the int8 copy of :mod:`model.ranking`), which no CPU does thousands of times
a second. The index clusters the items into lists (k-means centroids) and scores only the
items of the ``n_probe`` lists whose centroids score best for the query, plus the
**head**: the ``head`` items with the largest bias, scanned for every query. Their bias
lifts them into the top-20 of sessions whatever the direction of ``h``, so no list
probed by direction finds them reliably; scanning them always is what lets a few probes
keep 0.99 of the exact top-20. The best ``k`` of both are then scored again exactly, in
float32, as :meth:`model.network.GRU4RecNetwork.score_all` would, and returned in that
order. So every returned score is the model's own; only an item outside the head and the
probed lists can be missed. Library, parameters and the recall measured on trained
embeddings: docs/ranking.md.

The index is stored with its model version as plain arrays (the centroids, and each
item's list, the head being list number ``n_lists``), never as a library's own
serialisation: :mod:`model.artifact` checksums and verifies them like the weights, and the
searchable structure is rebuilt from them and the item vectors at load (a fraction of a
second at a million items). A version fine-tuned from another keeps the other's centroids,
head and lists for the items they share and assigns its new items to the nearest centroid
(:meth:`ItemIndex.extended`): cheap enough for every version the trainer publishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from model.errors import UserError

#: ``--ranking`` choices. ``auto`` ranks approximately from :data:`APPROXIMATE_FROM` items
#: on when the model has an index: the smallest catalogue where the default parameters
#: were measured to hold 0.99 of the exact top-20 (0.992 at 500,000 items, 0.983 at
#: 250,000), and where the index is 15x faster (docs/ranking.md). Below it exact ranking
#: is kept: faster than 1,200 events/s from 250,000 items down, and exact.
RANKINGS = ("exact", "approximate", "auto")
APPROXIMATE_FROM = 500_000
PROBES = 8
#: Candidates taken from the probed lists and from the head, each: the ``k`` best of them
#: (by faiss's inner products, which round differently) are scored again exactly.
CANDIDATES = 32
MAX_LISTS = 4096
MAX_HEAD = 4096
#: Catalogues below this size get no index: exact ranking is fast enough at any load.
INDEX_FROM = 10_000
_GATHER_ROWS = 65_536


@dataclass(frozen=True)
class IndexParams:
    """How many lists, how many are probed per query, how many candidates each of the
    probed lists and the head put forward for the final ``k``, and how many largest-bias
    items (the head) are scanned for every query."""

    n_lists: int
    n_probe: int
    candidates: int
    head: int = 0

    @classmethod
    def for_catalogue(cls, n_items: int) -> IndexParams:
        """About 2 sqrt(n) lists (at most :data:`MAX_LISTS`: k-means time grows with
        lists x items), :data:`PROBES` of them probed, and a head of n/256 items (at most
        :data:`MAX_HEAD`). On a million-item model trained on intent-structured sessions
        this scans about 1 % of the catalogue per query and keeps 0.994 of the exact
        top-20 (docs/ranking.md)."""
        n_lists = int(min(max(2 * math.sqrt(n_items), 16), MAX_LISTS, max(n_items // 39, 1)))
        return cls(
            n_lists=n_lists,
            n_probe=min(PROBES, n_lists),
            candidates=CANDIDATES,
            head=min(n_items // 256, MAX_HEAD),
        )


def _faiss() -> ModuleType:
    try:
        import faiss
    except ImportError:
        raise UserError(
            "approximate ranking needs faiss-cpu (pip install faiss-cpu); use --ranking exact"
        ) from None
    return faiss


def item_vectors(
    vectors: torch.Tensor, bias: torch.Tensor, members: np.ndarray | slice = slice(None)
) -> np.ndarray:
    """``[e_i, b_i]`` rows of the ``members`` items, float32, contiguous: what the index
    stores and searches."""
    weights = vectors.detach().cpu().numpy()[members]
    rows = np.empty((len(weights), weights.shape[1] + 1), dtype=np.float32)
    rows[:, :-1] = weights
    rows[:, -1] = bias.detach().cpu().numpy().reshape(-1)[members]
    return rows


class ItemIndex:
    """An inverted-file index over a model's item vectors (see the module docstring)."""

    def __init__(
        self,
        centroids: np.ndarray,
        lists: np.ndarray,
        vectors: torch.Tensor,
        bias: torch.Tensor,
        params: IndexParams,
    ) -> None:
        faiss = _faiss()
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.lists = np.ascontiguousarray(lists, dtype=np.int64)
        self.params = params
        self._vectors, self._bias = vectors, bias
        self._versions = (vectors._version, bias._version)
        n_items, dim = len(bias), vectors.shape[1] + 1
        if self.centroids.shape != (params.n_lists, dim) or self.lists.shape != (n_items,):
            raise UserError(
                f"item index does not fit the model: {self.centroids.shape[0]} centroids of "
                f"{self.centroids.shape[1:]} for {params.n_lists} lists of {dim} floats, "
                f"{len(self.lists)} list entries for {n_items} items"
            )
        if n_items and (self.lists.min() < 0 or self.lists.max() > params.n_lists):
            raise UserError("item index names a list that does not exist")
        self.head_items = np.flatnonzero(self.lists == params.n_lists)
        if len(self.head_items) != params.head:
            raise UserError(
                f"item index has {len(self.head_items)} head items, its parameters say "
                f"{params.head}"
            )
        if not np.isfinite(self.centroids).all():
            raise UserError("item index has centroids that are not finite")
        self._quantizer = faiss.IndexFlatIP(dim)  # kept: the index does not own it
        self._quantizer.add(self.centroids)
        self._index = faiss.IndexIVFFlat(
            self._quantizer, dim, params.n_lists, faiss.METRIC_INNER_PRODUCT
        )
        self._index.is_trained = True
        # List by list, each with its exact size: appending item by item (what faiss's
        # own add does) grows each list's buffer geometrically, and at a million items the
        # index took 1.1 GB instead of 0.4. The rows are gathered a group of lists at a
        # time: a whole extra copy of them would cost as much again at load.
        order = np.argsort(self.lists, kind="stable")
        ends = np.cumsum(np.bincount(self.lists, minlength=params.n_lists + 1))
        starts = np.concatenate(([0], ends[:-1]))
        inverted, first = self._index.invlists, 0
        while first < params.n_lists:
            last = int(np.searchsorted(ends, starts[first] + _GATHER_ROWS, side="right"))
            last = min(max(last, first + 1), params.n_lists)  # the head is not a list
            members = order[starts[first] : ends[last - 1]]
            rows = item_vectors(vectors, bias, members)
            for list_no in range(first, last):
                lo, hi = starts[list_no] - starts[first], ends[list_no] - starts[first]
                if hi > lo:
                    inverted.add_entries(
                        list_no,
                        int(hi - lo),
                        faiss.swig_ptr(members[lo:hi]),
                        faiss.swig_ptr(rows[lo:hi].view(np.uint8)),
                    )
            first = last
        self._index.ntotal = n_items - params.head
        self._index.nprobe = params.n_probe
        self._centroids_t = torch.from_numpy(self.centroids).t().contiguous()
        head = torch.from_numpy(self.head_items).to(vectors.device)
        self._head_vectors = vectors.detach().index_select(0, head).t().contiguous()
        self._head_bias = bias.detach().view(-1).index_select(0, head)
        self._head = head
        # Catalogue rules (model.rules): the served bias is -inf for an unavailable item,
        # which the lists skip through a bitmap of the items they may return.
        self._served_bias = bias.detach().view(-1).clone()
        self._head_position = np.full(n_items, -1, dtype=np.int64)
        self._head_position[self.head_items] = np.arange(len(self.head_items))
        self._allowed = np.full(-(-n_items // 8), 255, dtype=np.uint8)
        self._skipping = False  # whether any item is unavailable
        self._search_params = faiss.SearchParametersIVF()
        self._search_params.nprobe = params.n_probe  # its default (1) overrides the index's
        self._search_params.sel = faiss.IDSelectorBitmap(n_items, faiss.swig_ptr(self._allowed))

    @classmethod
    def build(
        cls,
        vectors: torch.Tensor,
        bias: torch.Tensor,
        params: IndexParams | None = None,
        seed: int = 0,
    ) -> ItemIndex:
        """Put the largest-bias items in the head, cluster the others (spherical k-means
        on their vectors) and assign each to its list."""
        faiss = _faiss()
        params = params or IndexParams.for_catalogue(len(bias))
        lists = np.full(len(bias), params.n_lists, dtype=np.int64)
        by_bias = torch.argsort(bias.detach().view(-1).cpu(), descending=True, stable=True)
        clustered = np.sort(by_bias[params.head :].numpy())
        rows = item_vectors(vectors, bias, clustered)
        clustering = faiss.Clustering(rows.shape[1], params.n_lists)
        clustering.seed = seed
        clustering.niter = 10
        clustering.max_points_per_centroid = 64
        clustering.spherical = True
        clustering.train(rows, faiss.IndexFlatIP(rows.shape[1]))
        centroids = faiss.vector_to_array(clustering.centroids).reshape(params.n_lists, -1)
        lists[clustered] = _nearest(faiss, centroids, rows)
        return cls(centroids, lists, vectors, bias, params)

    def extended(self, vectors: torch.Tensor, bias: torch.Tensor) -> ItemIndex:
        """The index of a model fine-tuned from this one, whose first items are this one's
        (their lists are kept) and whose items beyond are new (each to its nearest list)."""
        rows = item_vectors(vectors, bias, slice(len(self.lists), None))
        lists = np.concatenate([self.lists, _nearest(_faiss(), self.centroids, rows)])
        return ItemIndex(self.centroids, lists, vectors, bias, self.params)

    def matches(self, vectors: torch.Tensor, bias: torch.Tensor) -> bool:
        """Whether the index holds these very tensors, unchanged since."""
        return (
            vectors is self._vectors
            and bias is self._bias
            and self._versions == (vectors._version, bias._version)
        )

    def set_available(self, items: torch.Tensor, available: bool) -> None:
        """Let ``items`` (indexes) be found again, or skip them in the lists and the head."""
        served, model_bias = self._served_bias, self._bias.detach().view(-1)
        served[items] = model_bias[items] if available else -math.inf
        self._skipping = bool(torch.isneginf(served).any())
        index = items.cpu().numpy()
        in_head = self._head_position[index]
        in_head = torch.from_numpy(in_head[in_head >= 0]).to(served.device)
        self._head_bias[in_head] = served[self._head[in_head]]
        bits = (1 << (index & 7)).astype(np.uint8)
        if available:
            np.bitwise_or.at(self._allowed, index >> 3, bits)
        else:
            np.bitwise_and.at(self._allowed, index >> 3, ~bits)

    @torch.no_grad()
    def top_k(self, outputs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best available items for each output row and their exact float32
        scores (an unavailable item only where fewer than ``k`` are available: ``-inf``)."""
        rows, width = outputs.shape
        queries = np.empty((rows, width + 1), dtype=np.float32)
        queries[:, :width] = outputs.detach().cpu().numpy()
        queries[:, width] = 1.0
        depth = min(max(k, self.params.candidates), len(self.lists))
        k = min(k, depth)
        # The coarse step as one matrix product and a top-k: faiss's own quantizer spends
        # most of its time selecting, 40 us per query at 4,096 lists.
        probed = torch.topk(torch.from_numpy(queries) @ self._centroids_t, self.params.n_probe)
        found_scores, found = self._search_lists(queries, depth, probed)
        candidates = torch.from_numpy(found).to(outputs.device)
        approximate = torch.from_numpy(found_scores).to(outputs.device)
        if len(self._head):
            head_scores = torch.addmm(self._head_bias, outputs, self._head_vectors)
            best_of_head = torch.topk(head_scores, min(depth, len(self._head)), dim=1)
            candidates = torch.cat([candidates, self._head[best_of_head.indices]], dim=1)
            approximate = torch.cat([approximate, best_of_head.values], dim=1)
        missing = candidates < 0  # fewer items in the probed lists than asked for
        approximate[missing] = -math.inf
        chosen = candidates.gather(1, torch.topk(approximate, k, dim=1).indices)
        # faiss sums in its own order: score the chosen items again as the model does, so
        # every returned score is the model's float32 score.
        vectors, bias = self._vectors.detach(), self._served_bias
        safe = chosen.clamp(min=0)
        scores = torch.bmm(vectors[safe], outputs.unsqueeze(2)).squeeze(2) + bias[safe]
        best = torch.sort(scores, dim=1, descending=True)
        items, values = safe.gather(1, best.indices), best.values
        missing |= torch.isneginf(approximate)  # unavailable head items
        short = (missing.sum(dim=1) > candidates.shape[1] - k).cpu()
        if bool(short.any()):  # too few candidates: rank those rows exactly
            exact = torch.topk(outputs[short] @ vectors.t() + bias, k, dim=1)
            items[short], values[short] = exact.indices, exact.values
        return items, values

    def _search_lists(
        self, queries: np.ndarray, depth: int, probed: torch.return_types.topk
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``depth`` best items of each query's probed lists (item -1 where the lists
        hold fewer), skipping unavailable items. faiss's Python wrapper of
        ``search_preassigned`` takes no search parameters (so no item selector): with
        items to skip, its C++ method is called directly."""
        assign, centroid_scores = probed.indices.numpy(), probed.values.numpy()
        if not self._skipping:
            return self._index.search_preassigned(queries, depth, assign, centroid_scores)
        faiss, rows = _faiss(), len(queries)
        scores = np.empty((rows, depth), dtype=np.float32)
        found = np.empty((rows, depth), dtype=np.int64)
        assign = np.ascontiguousarray(assign, dtype=np.int64)
        centroid_scores = np.ascontiguousarray(centroid_scores, dtype=np.float32)
        self._index.search_preassigned_c(
            rows,
            faiss.swig_ptr(queries),
            depth,
            faiss.swig_ptr(assign),
            faiss.swig_ptr(centroid_scores),
            faiss.swig_ptr(scores),
            faiss.swig_ptr(found),
            False,
            self._search_params,
        )
        return scores, found


def _nearest(faiss: ModuleType, centroids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each row's list: the centroid with the largest inner product. The centroids are
    unit vectors (spherical k-means: clusters of directions), so no centroid draws every
    item by its length alone and the lists stay balanced; a query probes the lists in the
    same inner-product order."""
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, nearest = quantizer.search(rows, 1)
    return nearest[:, 0].astype(np.int64)
