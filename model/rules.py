"""Catalogue rules a ranking obeys: items that cannot be recommended now, and, on request,
the items a session has just clicked.

- **Unavailable items** (sold out, withdrawn) are left out of every list. The
  :class:`~model.inference.Recommender` holds them as a mask over its catalogue and each
  ranking path applies it where it searches, so a list is filled with the best *available*
  items rather than shortened by a filter after the fact: the exact paths give an
  unavailable item the score ``-inf`` (:class:`~model.ranking.Int8Catalogue` through its
  bias), the item index skips it in its lists and its head
  (:class:`~model.item_index.ItemIndex`). A list is shorter than asked only when fewer
  items than that are available.
- **Seen items** (``exclude_seen``): the items of a session's last :data:`RECENT_ITEMS`
  clicks are removed from its list. The ranking asks for that many more items and drops
  the seen ones, so the list still holds ``k`` items.

Offline evaluation applies the same rules through the same calls, with an availability
snapshot (:func:`read_unavailable`), so "the stream equals the offline evaluation" holds
with rules on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model.data import ItemMap
from model.errors import UserError

#: The clicks a session's serving state remembers (enough to rebuild it under a new model
#: version) and the window ``exclude_seen`` removes from its lists.
RECENT_ITEMS = 20


def read_unavailable(path: str | Path) -> set[str]:
    """The unavailable item ids of an availability snapshot: one id per line (what
    ``streamrec availability list`` prints); blank lines and ``#`` comments ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the availability snapshot {path}: {exc}") from None
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def seen_indexes(item_map: ItemMap, histories: Sequence[Sequence[str]]) -> torch.Tensor:
    """``(len(histories), RECENT_ITEMS)`` item indexes of each session's last clicks, -1
    where there is none or the model does not know the item."""
    seen = np.full((len(histories), RECENT_ITEMS), -1, dtype=np.int64)
    for row, history in enumerate(histories):
        recent = history[-RECENT_ITEMS:]
        seen[row, : len(recent)] = [item_map.index_of(item) for item in recent]
    return torch.from_numpy(seen)


def obey(
    items: torch.Tensor, values: torch.Tensor, seen: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` of each row's ranked ``items`` that are neither unavailable (score
    ``-inf``) nor ``seen``, in order; a row with fewer is padded with item -1, score
    ``-inf``."""
    dropped = torch.isneginf(values)
    if seen is not None:
        dropped |= (items.unsqueeze(2) == seen.to(items.device).unsqueeze(1)).any(dim=2)
    order = torch.sort(dropped.to(torch.int8), dim=1, stable=True).indices[:, :k]
    items, values = items.gather(1, order), values.gather(1, order)
    padding = dropped.gather(1, order)
    items[padding], values[padding] = -1, -torch.inf
    return items, values
