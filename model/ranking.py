"""Finding each state's top-k items among the whole catalogue, fast and exactly.

Ranking is most of a served click's arithmetic: at 40,000 items and 100 units, a state's
scores are a product with a 16 MB float32 matrix that has to be read from memory for every
batch, and then a search of 40,000 numbers.

- :func:`top_k_rows` is ``torch.topk`` with a two-stage search that reads a large row
  once (block maxima) instead of sorting it.
- :class:`Int8Catalogue` scores a first pass with the item matrix in int8 (4 MB, and
  integer products, ~4x faster than float32 here), bounds the error of that pass for each
  state, and re-scores in float32 only the few dozen items whose first-pass score comes
  within that bound of the top k. The result is the float32 answer, not an approximation:
  an item left out provably scores below k others.
"""

from __future__ import annotations

import functools

import torch

from model import native

#: Catalogues from this size on are ranked by :func:`top_k_rows`' two-stage search and,
#: on a CPU, by :class:`Int8Catalogue`; below it a plain float32 product and
#: ``torch.topk`` are as fast (measured at 3,000 items: 6 vs 8 us per row).
LARGE_CATALOGUE = 8192
_BLOCK = 64


def top_k_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexes and values of each row's ``k`` largest scores, best first.

    ``torch.topk`` scans a 40,000-item row at ~2 ns per item. For large catalogues the
    row is cut into blocks of 64: the ``k`` blocks with the largest maxima hold the row's
    top ``k`` (an item outside them is beaten by those ``k`` maxima), so the exact top ``k``
    is found among ``64 k`` candidates. One pass computes the maxima; it is ~3x faster
    per row at 40,000 items and ~4x at 100,000. Among exactly tied scores it may pick
    other items than ``torch.topk`` would (which makes no promise either).
    """
    rows, n = scores.shape
    whole = n // _BLOCK * _BLOCK
    if n < LARGE_CATALOGUE or whole // _BLOCK < k:
        result = torch.topk(scores, k, dim=1)
        return result.indices, result.values
    maxima = scores[:, :whole].view(rows, whole // _BLOCK, _BLOCK).amax(dim=2)
    blocks = torch.topk(maxima, k, dim=1, sorted=False).indices
    columns = _block_columns(blocks, scores.device).view(rows, -1)
    if whole < n:  # the last, partial block is always a candidate
        tail = torch.arange(whole, n, device=scores.device).expand(rows, -1)
        columns = torch.cat([columns, tail], dim=1)
    best = torch.topk(scores.gather(1, columns), k, dim=1)
    return columns.gather(1, best.indices), best.values


def _block_columns(blocks: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The column indexes of blocks (one more dimension, of ``_BLOCK``)."""
    return blocks.unsqueeze(-1) * _BLOCK + torch.arange(_BLOCK, device=device)


def int8_supported(device: torch.device) -> bool:
    """Whether this torch has an int8 matrix product for ``device`` (CPU only: on a GPU
    the float32 product is not the bottleneck)."""
    return device.type == "cpu" and _cpu_int8_product()


@functools.cache
def _cpu_int8_product() -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        torch._int_mm(torch.ones(1, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8))
    except RuntimeError:
        return False
    return True


class Int8Catalogue:
    """An int8 copy of the item vectors that ranks exactly.

    The vectors are stored as ``q * s`` with int8 ``q`` and one scale ``s`` for the whole
    matrix, so that the integer product of a state (quantized as ``p * r`` per row) with
    ``q`` orders items like the real scores (``r s > 0``) without a float pass over it. A
    first-pass score ``r s (p . q) + bias`` differs from ``x . v + bias`` by at most
    ``E = |x| max|v - q s| + |x - p r| max|q s|`` (Cauchy-Schwarz; the norms over the
    catalogue are taken once). Let ``T`` be the k-th best first-pass score: k items score
    at least ``T - E``, so an item whose first pass is below ``T - 2E`` scores less than k
    others and cannot be in the top k. The items left (a few dozen at 40,000 items) are
    scored in float32 and the best k returned.

    The search works on blocks of 64 items: a block's best first pass is at most its
    best integer product plus its largest bias, so one pass over the integer products
    (their block maxima) finds the few blocks worth looking into.
    Made for one matrix: :meth:`matches` tells whether the weights changed since.

    An unavailable item (:meth:`set_available`, :mod:`model.rules`) has the bias ``-inf``
    in both passes, so it is never a candidate while ``k`` available items score higher.
    """

    def __init__(self, vectors: torch.Tensor, bias: torch.Tensor) -> None:
        self.vectors = vectors.detach()
        self.model_bias = bias.detach().view(-1)
        self.bias = self.model_bias.clone()  # the served bias: -inf where unavailable
        self._sources = (vectors, bias)
        self._versions = (vectors._version, bias._version)
        self.scale = max(float(self.vectors.abs().max()), 1e-30) / 127.0
        quantized = torch.round(self.vectors / self.scale)
        restored = quantized * self.scale
        self.max_vector_error = float((self.vectors - restored).norm(dim=1).max())
        self.max_restored_norm = float(restored.norm(dim=1).max())
        # Padded to whole blocks with zero vectors whose bias is -inf (never chosen), and
        # (width, items) and contiguous: the layout the int8 product reads fastest.
        n = len(self.bias)
        padded = torch.zeros(_blocks(n) * _BLOCK, quantized.shape[1], dtype=torch.int8)
        padded[:n] = quantized.to(torch.int8)
        self.quantized_t = padded.t().contiguous()
        self.padded_bias = torch.full((len(padded),), -torch.inf)
        self.padded_bias[:n] = self.bias
        self.max_abs_bias = float(self.bias.abs().max())
        self.block_max_bias = self.padded_bias.view(-1, _BLOCK).amax(dim=1)

    def set_available(self, items: torch.Tensor, available: bool) -> None:
        """Let ``items`` (indexes) be ranked again, or leave them out of every list.

        An unavailable item's int8 vector is zeroed too: its product would still raise
        its block's ceiling, the search would then take the block for one of the best and
        lower its threshold (at 40,000 items with a random tenth unavailable: 145 items
        scored exactly per row instead of 47, 105 instead of 70 us per row)."""
        self.bias[items] = self.model_bias[items] if available else -torch.inf
        self.padded_bias[items] = self.bias[items]
        if available:
            restored = torch.round(self.vectors[items] / self.scale).to(torch.int8)
            self.quantized_t[:, items] = restored.t()
        else:
            self.quantized_t[:, items] = 0
        blocks = torch.unique(items // _BLOCK)
        self.block_max_bias[blocks] = self.padded_bias.view(-1, _BLOCK)[blocks].amax(dim=1)

    def matches(self, vectors: torch.Tensor, bias: torch.Tensor) -> bool:
        """Whether this copy was made from these tensors and they are unchanged."""
        return (
            self._sources[0] is vectors
            and self._sources[1] is bias
            and self._versions == (vectors._version, bias._version)
        )

    def top_k(self, outputs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indexes and float32 scores of the ``k`` best items for each row of ``outputs``."""
        rows = outputs.shape[0]
        x = outputs.float()
        row_scale = (x.abs().amax(dim=1) / 127.0).clamp_min(1e-30)
        quantized = torch.round(x / row_scale[:, None])
        x_error = (x - quantized * row_scale[:, None]).norm(dim=1)
        x_norm = x.norm(dim=1)
        bound = x_norm * self.max_vector_error + x_error * self.max_restored_norm
        # float32 rounding of the first pass, products * unit + bias: well below 2^-20 of
        # any |x . v| (Cauchy-Schwarz) plus 2^-22 of the largest |bias|
        bound += (
            x_norm + x_error
        ) * self.max_restored_norm * 2.0**-20 + self.max_abs_bias * 2.0**-22
        products = torch._int_mm(quantized.to(torch.int8), self.quantized_t).view(rows, -1, _BLOCK)
        unit = row_scale * self.scale  # the first pass is products * unit + bias
        if k <= products.shape[1]:
            found = native.rank_blocks(
                products,
                unit,
                bound,
                self.padded_bias,
                self.block_max_bias,
                x,
                self.vectors,
                self.bias,
                k,
            )
            if found is not None:
                return found
        return self.search(products, unit, bound, x, k)

    def search(
        self,
        products: torch.Tensor,
        unit: torch.Tensor,
        bound: torch.Tensor,
        outputs: torch.Tensor,
        k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """After the int8 product, in torch: the reference of ``rank_blocks.c``
        (:mod:`model.native`), and what runs without it."""
        rows = len(products)
        unit = unit[:, None]
        ceiling = products.amax(dim=2) * unit + self.block_max_bias  # >= a block's first passes
        # T: the k-th best first pass among the k blocks of highest ceiling is at most the
        # k-th best overall, so the threshold below only keeps more items than needed.
        best_blocks = torch.topk(ceiling, min(k, ceiling.shape[1]), dim=1).indices
        first = self._first_pass(products, unit, torch.arange(rows)[:, None], best_blocks)
        threshold = torch.topk(first.view(rows, -1), k, dim=1).values[:, -1] - 2 * bound
        block_row, block = (ceiling >= threshold[:, None]).nonzero(as_tuple=True)
        first = self._first_pass(products, unit, block_row, block)
        row, offset = (first >= threshold[block_row, None]).nonzero(as_tuple=True)
        row, column = block_row[row], block[row] * _BLOCK + offset
        exact = (outputs.index_select(0, row) * self.vectors.index_select(0, column)).sum(
            1
        ) + self.bias.index_select(0, column)
        return _best_per_row(row, column, exact, rows, k)

    def _first_pass(
        self, products: torch.Tensor, unit: torch.Tensor, row: torch.Tensor, block: torch.Tensor
    ) -> torch.Tensor:
        """First-pass scores of the given blocks of the given rows (one more dimension)."""
        return products[row, block] * unit[row] + self.padded_bias.view(-1, _BLOCK)[block]


def _blocks(n: int) -> int:
    return -(-n // _BLOCK)


def _best_per_row(
    row: torch.Tensor, column: torch.Tensor, score: torch.Tensor, rows: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best (column, score) of each row from a list sorted by row (every row
    has at least ``k`` entries)."""
    counts = torch.bincount(row, minlength=rows)
    position = torch.arange(len(row)) - (torch.cumsum(counts, 0) - counts)[row]
    width = int(counts.max())
    scores = torch.full((rows, width), -torch.inf)
    scores[row, position] = score
    columns = torch.zeros((rows, width), dtype=torch.int64)
    columns[row, position] = column
    best = torch.topk(scores, k, dim=1)
    return columns.gather(1, best.indices), best.values
