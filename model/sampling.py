"""Popularity-based negative sampling from a pre-drawn store (CIKM 2018).

Drawing 2048 items by popularity at every mini-batch is slow, so a large store of draws is
made up front and handed out in consecutive slices; the store is redrawn when used up.
The probabilities are popularity^alpha (alpha=0: uniform, alpha=1: popularity), and the
same probabilities feed the logQ correction of the cross-entropy loss.
"""

from __future__ import annotations

import numpy as np
import torch


class PopularitySampler:
    """Hands out ``n`` negatives at a time, drawn with P(item) ~ support(item)^alpha."""

    def __init__(self, support: np.ndarray, alpha: float, store_size: int,
                 generator: torch.Generator, device: torch.device | str = "cpu") -> None:
        weights = np.asarray(support, dtype=np.float64) ** alpha
        weights[np.asarray(support) <= 0] = 0.0  # 0**0 == 1: unseen items are never drawn
        if weights.sum() <= 0:
            raise ValueError("cannot sample: every item has zero support")
        self.probabilities = weights / weights.sum()
        cdf = np.cumsum(self.probabilities)
        cdf[-1] = 1.0
        self._cdf = torch.from_numpy(cdf).to(device)
        self._generator = generator
        self._store_size = store_size
        self._device = device
        self._store = torch.empty(0, dtype=torch.int64)
        self._position = 0

    def _draw(self, n: int) -> torch.Tensor:
        uniform = torch.rand(n, generator=self._generator, dtype=torch.float64,
                             device=self._cdf.device)
        return torch.searchsorted(self._cdf, uniform, right=True)

    def sample(self, n: int) -> torch.Tensor:
        """The next ``n`` negatives (item indexes)."""
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=self._device)
        if self._store_size < n:
            return self._draw(n)
        if self._position + n > len(self._store):
            draws = (self._store_size // n) * n
            self._store = self._draw(draws)
            self._position = 0
        out = self._store[self._position:self._position + n]
        self._position += n
        return out
