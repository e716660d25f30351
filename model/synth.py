"""Synthetic click logs with a known, learnable structure (scale tests, demo, drift).

The generating process, step by step:

1. **Items** have Zipf-like popularity: item of popularity rank r gets weight
   ``1 / r^zipf`` (ranks are shuffled over the ids, so id order means nothing).
2. **Latent intents** (``intents``, default 1: none): items are dealt to intents by
   popularity rank (rank r to intent r mod ``intents``), so every intent holds popular and
   rare items. A session stays in its intent: a next item drawn by popularity (step 3)
   comes from the current item's intent, except with probability ``switch`` (default 0.1),
   when it comes from the whole catalogue and the session takes that item's intent. This is
   what real catalogues look like to a recommender (a visit shops for one kind of thing),
   and it gives trained item vectors the cluster structure that an approximate index relies
   on; random vectors have none, so an index's recall measured on them means nothing.
3. **Sequential structure**: every item has ``successors`` (default 4) preferred next items,
   drawn by popularity from its own intent, with decreasing preference. From item ``i`` a
   session moves to one of ``i``'s successors with probability ``follow`` (default 0.7),
   otherwise to an item drawn by popularity (step 2). A model that tracks the session
   (GRU4Rec, Item-KNN) can learn these transitions; popularity cannot.
4. **Session lengths** are short and heavy-tailed: ``2 + zeta(length_exponent) - 1``,
   capped at ``max_length`` (median 2-3 clicks, a long tail like RSC15's).
5. **Times**: sessions start as a Poisson process at ``sessions_per_s``; clicks within a
   session are spaced by exponential gaps of mean ``mean_gap_s``.

Everything comes from one seeded generator, so a seed reproduces the log exactly. The
generator is vectorised position by position, so 30 million events take seconds.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model.data import ClickLog
from model.errors import UserError


@dataclass(frozen=True)
class SynthSpec:
    sessions: int
    items: int
    seed: int = 0
    zipf: float = 1.0
    intents: int = 1
    switch: float = 0.1
    successors: int = 4
    follow: float = 0.7
    length_exponent: float = 2.2
    max_length: int = 100
    sessions_per_s: float = 5.0
    mean_gap_s: float = 30.0
    start_time: float = 1_700_000_000.0
    item_offset: int = 0

    def __post_init__(self) -> None:
        if self.sessions < 1:
            raise UserError(f"--sessions must be >= 1, got {self.sessions}")
        if self.items < 2:
            raise UserError(f"--items must be >= 2, got {self.items}")
        if not 1 <= self.intents <= self.items:
            raise UserError(f"--intents must be in [1, --items], got {self.intents}")
        if self.zipf < 0:
            raise UserError(f"--zipf must be >= 0, got {self.zipf}")
        for name in ("follow", "switch"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def add_shape_options(parser: argparse.ArgumentParser) -> None:
    """The generator's shape as command-line options, for every command that generates."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--zipf",
        type=float,
        default=SynthSpec.zipf,
        help=f"item popularity exponent: rank r has weight 1/r^zipf (default {SynthSpec.zipf})",
    )
    parser.add_argument(
        "--intents",
        type=int,
        default=SynthSpec.intents,
        help="latent intents that sessions stay within (default 1: none); e.g. "
        "items/1000 gives trained item vectors the cluster structure of a real catalogue",
    )


def spec_from_args(args: argparse.Namespace) -> SynthSpec:
    """The spec that ``--sessions``, ``--items`` and :func:`add_shape_options` describe."""
    return SynthSpec(
        sessions=args.sessions,
        items=args.items,
        seed=args.seed,
        zipf=args.zipf,
        intents=args.intents,
    )


def generate(spec: SynthSpec) -> ClickLog:
    """A synthetic click log following the process in the module docstring."""
    rng = np.random.default_rng(spec.seed)
    ranks = rng.permutation(spec.items) + 1
    draw = _PopularityDraw(rng, 1.0 / ranks.astype(np.float64) ** spec.zipf, ranks % spec.intents)

    own_intents = np.repeat(draw.intent_of, spec.successors)
    successors = draw.within(own_intents).reshape(spec.items, spec.successors)
    preference = np.cumsum(0.5 ** np.arange(spec.successors))
    preference /= preference[-1]

    lengths = np.minimum(1 + rng.zipf(spec.length_exponent, spec.sessions), spec.max_length)
    order = np.argsort(-lengths, kind="stable")  # longest first: active rows are a prefix
    sorted_lengths = lengths[order]
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    items = np.empty(int(offsets[-1]), dtype=np.int64)
    current = draw.anywhere(spec.sessions)
    for position in range(int(sorted_lengths[0])):
        n_active = int(np.searchsorted(-sorted_lengths, -position, side="left"))
        rows = order[:n_active]
        if position > 0:
            follow = rng.random(n_active) < spec.follow
            choice = np.searchsorted(preference, rng.random(n_active), side="right")
            here = current[rows]
            nxt = draw.within(draw.intent_of[here])
            if spec.intents > 1:
                switch = rng.random(n_active) < spec.switch
                nxt[switch] = draw.anywhere(int(switch.sum()))
            nxt[follow] = successors[here[follow], choice[follow]]
            current[rows] = nxt
        items[offsets[rows] + position] = current[rows]

    starts = spec.start_time + np.cumsum(rng.exponential(1.0 / spec.sessions_per_s, spec.sessions))
    gaps = rng.exponential(spec.mean_gap_s, len(items))
    gaps[offsets[:-1]] = 0.0
    session_of_event = np.repeat(np.arange(spec.sessions), lengths)
    times = starts[session_of_event] + _cumsum_within(gaps, offsets)
    return ClickLog(
        sessions=session_of_event,
        items=items,
        times=np.round(times, 3),
        session_ids=np.arange(1, spec.sessions + 1).astype(str),
        item_ids=(np.arange(spec.items) + spec.item_offset + 1).astype(str),
        source=f"synth(seed={spec.seed})",
    )


class _PopularityDraw:
    """Item draws weighted by popularity, from the whole catalogue or within given intents.

    Items are laid out intent by intent under one cumulative distribution, so a draw within
    intent k is a uniform draw over k's stretch of it: one vectorised ``searchsorted`` for
    any mix of intents.
    """

    def __init__(
        self, rng: np.random.Generator, popularity: np.ndarray, intent_of: np.ndarray
    ) -> None:
        self.rng = rng
        self.intent_of = intent_of
        self._order = np.argsort(intent_of, kind="stable")
        self._cdf = np.cumsum(popularity[self._order] / popularity.sum())
        self._cdf[-1] = 1.0
        ends = np.cumsum(np.bincount(intent_of))
        self._last = ends - 1
        self._high = self._cdf[self._last]
        self._low = np.concatenate(([0.0], self._high[:-1]))

    def anywhere(self, n: int) -> np.ndarray:
        return self._order[np.searchsorted(self._cdf, self.rng.random(n), side="right")]

    def within(self, intents: np.ndarray) -> np.ndarray:
        low = self._low[intents]
        points = low + self.rng.random(len(intents)) * (self._high[intents] - low)
        found = np.searchsorted(self._cdf, points, side="right")
        return self._order[np.minimum(found, self._last[intents])]


def _cumsum_within(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each offset."""
    total = np.cumsum(values)
    base = np.repeat(total[offsets[:-1]] - values[offsets[:-1]], np.diff(offsets))
    return total - base


def write_clicks(log: ClickLog, path: str | os.PathLike[str], chunk: int = 2_000_000) -> None:
    """Write a log as TSV (``SessionId ItemId Time``), in chunks to bound memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("SessionId\tItemId\tTime\n")
        for first in range(0, len(log), chunk):
            part = slice(first, first + chunk)
            frame = pd.DataFrame(
                {
                    "s": log.session_ids[log.sessions[part]],
                    "i": log.item_ids[log.items[part]],
                    "t": log.times[part],
                }
            )
            frame.to_csv(handle, sep="\t", header=False, index=False, float_format="%.3f")
