"""Click logs: reading and validating them, and the item map that gives items dense indexes.

A click log is a table of (session id, item id, time) rows. Ids are opaque strings (a shop's
SKUs, a site's URLs); the model works on dense integer indexes, and :class:`ItemMap` is the
only translation between the two. It only ever appends, so an index stays valid for the
life of a deployment: hidden states, artifacts and retrained models all agree on it.

Reading favours errors over guesses: a missing column, an unparsable time or a short row
stops the load with the file and line, and nothing is dropped unless the caller asks for the
standard GRU4Rec filtering, whose counts are then reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from pyarrow import csv as pa_csv

from model.errors import UserError

DEFAULT_COLUMNS = ("SessionId", "ItemId", "Time")


class ItemMap:
    """Item id (str) <-> dense index (int), append-only."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self.add(ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    @property
    def ids(self) -> list[str]:
        """Item ids in index order (a copy would be safer but costs 40k strings per call)."""
        return self._ids

    def add(self, ids: Iterable[str]) -> int:
        """Append the ids not yet known, in order of first appearance; return how many."""
        before = len(self._ids)
        for item_id in ids:
            item_id = str(item_id)
            if item_id not in self._index:
                self._index[item_id] = len(self._ids)
                self._ids.append(item_id)
        return len(self._ids) - before

    def index_of(self, item_id: str) -> int:
        """The item's index, or -1 when the item is unknown."""
        return self._index.get(item_id, -1)

    def lookup(self, ids: Iterable[str]) -> np.ndarray:
        """Indexes of many ids at once (int64, -1 for unknown ids)."""
        get = self._index.get
        return np.fromiter((get(str(i), -1) for i in ids), dtype=np.int64)

    def copy(self) -> ItemMap:
        return ItemMap(self._ids)


@dataclass
class ClickLog:
    """Clicks sorted by session, then time, as dense codes plus the id tables.

    ``sessions[k]`` indexes ``session_ids`` and ``items[k]`` indexes ``item_ids``; the
    codes are local to this log (use :meth:`item_indexes` to map into an :class:`ItemMap`).
    Keeping codes instead of 30 million Python strings is what lets the full RSC15 log fit
    in a few GiB.
    """

    sessions: np.ndarray
    items: np.ndarray
    times: np.ndarray
    session_ids: np.ndarray
    item_ids: np.ndarray
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.items)

    @property
    def n_sessions(self) -> int:
        return len(self.session_ids)

    def session_offsets(self) -> np.ndarray:
        """Start offset of each session's run of events, plus the end (length n+1)."""
        counts = np.bincount(self.sessions, minlength=self.n_sessions)
        return np.concatenate(([0], np.cumsum(counts))).astype(np.int64)

    def item_indexes(self, item_map: ItemMap) -> np.ndarray:
        """Each event's item index in ``item_map`` (-1 for items it does not know)."""
        return item_map.lookup(self.item_ids)[self.items]

    @classmethod
    def from_arrays(
        cls,
        session_ids: Iterable[str],
        item_ids: Iterable[str],
        times: Iterable[float],
        source: str = "<memory>",
    ) -> ClickLog:
        """Build a log from parallel sequences (tests, generators, buffered streams)."""
        frame = pd.DataFrame(
            {
                "s": pd.Series(list(session_ids), dtype=str),
                "i": pd.Series(list(item_ids), dtype=str),
                "t": np.asarray(list(times), dtype=np.float64),
            }
        )
        return _from_frame(frame["s"], frame["i"], frame["t"].to_numpy(), source)


def sessions_log(sessions: dict[str, list[str]], source: str = "<memory>") -> ClickLog:
    """A log from ``{session id: [item ids]}``, one click per second in the given order
    (hand-built examples and tests)."""
    pairs = [(session, item) for session, items in sessions.items() for item in items]
    return ClickLog.from_arrays(
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        [float(k + 1) for k in range(len(pairs))],
        source,
    )


@dataclass(frozen=True)
class FilterReport:
    """What the standard filtering removed (it is never silent)."""

    events_before: int
    events_after: int
    sessions_removed: int
    items_removed: int

    def __str__(self) -> str:
        return (
            f"filtering kept {self.events_after:,} of {self.events_before:,} events "
            f"(removed {self.items_removed:,} rare items and "
            f"{self.sessions_removed:,} short sessions)"
        )


def read_clicks(
    path: str | os.PathLike[str],
    columns: tuple[str, str, str] = DEFAULT_COLUMNS,
    sep: str | None = None,
) -> ClickLog:
    """Read a click log, validating every row; the result is sorted by session and time.

    ``columns`` names the session, item and time columns; ``sep`` defaults to ``,`` for
    ``.csv`` files and a tab otherwise. Times are Unix seconds (any float).
    """
    path, sep = check_header(path, columns, sep)
    session_col, item_col, time_col = columns
    fast = _read_with_arrow(path, columns, sep)
    if fast is not None:
        return fast
    frame = read_columns(path, columns, sep)
    if frame.empty:
        raise UserError(f"{path}: no events after the header")
    for col in (session_col, item_col):
        _reject_missing(path, frame[col].isna().to_numpy(), col, "is empty")
    time_text = frame[time_col]
    _reject_missing(path, time_text.isna().to_numpy(), time_col, "is empty")
    times = pd.to_numeric(time_text, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(times)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{path}: line {row + 2}: {time_col} value {time_text.iloc[row]!r} "
            f"is not a finite number ({int(bad.sum())} such row(s))"
        )
    return _from_frame(frame[session_col], frame[item_col], times, str(path))


def read_columns(
    path: str | os.PathLike[str], columns: Sequence[str], sep: str, verbatim: bool = False
) -> pd.DataFrame:
    """The session, item and time columns as pandas reads them: ids as categories, times
    as text. ``verbatim`` keeps every field as written ("" when empty or absent, so "NA" is
    an id and a short row is a row), for a reader that reports bad rows itself."""
    session_col, item_col, time_col = columns
    try:
        return pd.read_csv(
            path,
            sep=sep,
            usecols=list(columns),
            skip_blank_lines=False,
            dtype={session_col: "category", item_col: "category", time_col: str},
            na_filter=not verbatim,
            engine="c",
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: {exc}") from None


def check_header(
    path: str | os.PathLike[str], columns: Sequence[str], sep: str | None
) -> tuple[Path, str]:
    """The file exists and its header names ``columns``; returns (path, separator).

    ``sep`` defaults to ``,`` for ``.csv`` files and a tab otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if len(columns) != 3:
        raise UserError(f"expected 3 column names (session, item, time), got {len(columns)}")
    if sep is None:
        sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        header = pd.read_csv(path, sep=sep, nrows=0)
    except pd.errors.EmptyDataError:
        raise UserError(
            f"{path}: empty file (expected a header with columns {', '.join(columns)})"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the header: {exc}") from None
    missing = [c for c in columns if c not in header.columns]
    if missing:
        raise UserError(
            f"{path}: line 1: missing column(s) {', '.join(missing)} "
            f"(found: {', '.join(map(str, header.columns))}; separator {sep!r})"
        )
    return path, sep


def _read_with_arrow(path: Path, columns: tuple[str, str, str], sep: str) -> ClickLog | None:
    """The fast path: Arrow's multi-threaded reader with dictionary-encoded ids.

    The full RSC15 log (30 million rows) loads in seconds and a fraction of the memory of a
    pandas read. Any irregularity (a bad or empty value, a blank or ragged line, a
    non-finite time) returns None, and the pandas path, slower but exact about where the
    problem is, reads the file again to report it.
    """
    session_col, item_col, time_col = columns
    ids = pa.dictionary(pa.int32(), pa.string())
    try:
        table = pa_csv.read_csv(
            path,
            parse_options=pa_csv.ParseOptions(delimiter=sep, ignore_empty_lines=False),
            convert_options=pa_csv.ConvertOptions(
                column_types={session_col: ids, item_col: ids, time_col: pa.float64()},
                include_columns=list(columns),
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError):
        return None
    if table.num_rows == 0 or any(table.column(c).null_count for c in columns):
        return None
    times = table.column(time_col).to_numpy()
    if not np.isfinite(times).all():
        return None
    encoded = []
    for col in (session_col, item_col):
        array = table.column(col).unify_dictionaries().combine_chunks()
        values = array.dictionary.to_numpy(zero_copy_only=False)
        if (values == "").any():
            return None
        encoded.append((array.indices.to_numpy().astype(np.int64), values.astype(str)))
    (sessions, session_ids), (items, item_ids) = encoded
    order = np.lexsort((times, sessions))
    return ClickLog(
        sessions=sessions[order],
        items=items[order],
        times=times[order],
        session_ids=session_ids,
        item_ids=item_ids,
        source=str(path),
    )


def _reject_missing(path: Path, mask: np.ndarray, column: str, problem: str) -> None:
    if mask.any():
        row = int(np.flatnonzero(mask)[0])
        raise UserError(
            f"{path}: line {row + 2}: {column} {problem} "
            f"({int(mask.sum())} such row(s); blank lines count as rows)"
        )


def _from_frame(
    session_col: pd.Series, item_col: pd.Series, times: np.ndarray, source: str
) -> ClickLog:
    session_codes, session_ids = pd.factorize(session_col, sort=False)
    item_codes, item_ids = pd.factorize(item_col, sort=False)
    order = np.lexsort((times, session_codes))
    return ClickLog(
        sessions=session_codes[order].astype(np.int64),
        items=item_codes[order].astype(np.int64),
        times=times[order],
        session_ids=np.asarray(session_ids, dtype=object).astype(str),
        item_ids=np.asarray(item_ids, dtype=object).astype(str),
        source=source,
    )


def standard_filter(
    log: ClickLog, min_item_support: int = 5, min_session_length: int = 2
) -> tuple[ClickLog, FilterReport]:
    """The GRU4Rec preprocessing: drop rare items, then sessions left too short."""
    item_support = np.bincount(log.items, minlength=len(log.item_ids))
    keep = item_support[log.items] >= min_item_support
    session_length = np.bincount(log.sessions[keep], minlength=log.n_sessions)
    keep &= session_length[log.sessions] >= min_session_length
    filtered = _subset(log, keep)
    report = FilterReport(
        events_before=len(log),
        events_after=len(filtered),
        sessions_removed=log.n_sessions - filtered.n_sessions,
        items_removed=len(log.item_ids) - len(filtered.item_ids),
    )
    return filtered, report


def _subset(log: ClickLog, keep: np.ndarray) -> ClickLog:
    """Events where ``keep`` holds, with unused session and item ids dropped."""
    session_codes, session_ids = pd.factorize(log.sessions[keep], sort=True)
    item_codes, item_ids = pd.factorize(log.items[keep], sort=True)
    return ClickLog(
        sessions=session_codes.astype(np.int64),
        items=item_codes.astype(np.int64),
        times=log.times[keep],
        session_ids=log.session_ids[session_ids],
        item_ids=log.item_ids[item_ids],
        source=log.source,
    )


def time_split(log: ClickLog, train_fraction: float) -> tuple[ClickLog, ClickLog]:
    """Split whole sessions by start time: the earliest ``train_fraction`` of sessions
    train, the rest test (no session is cut, the test period follows the training one)."""
    if not 0.0 < train_fraction < 1.0:
        raise UserError(f"train fraction must be in (0, 1), got {train_fraction}")
    offsets = log.session_offsets()
    session_start = log.times[offsets[:-1]]
    cutoff = np.quantile(session_start, train_fraction)
    in_train = (session_start <= cutoff)[log.sessions]
    return _subset(log, in_train), _subset(log, ~in_train)


DAY_S = 86_400.0
#: The logs of the authors' evaluation protocol, in the order :func:`split_for_tuning`
#: returns them: the final test and the training before it, and the same split again
#: inside that training for choosing hyperparameters without seeing the test period.
SPLIT_NAMES = ("train_full", "test", "train_tr", "train_valid")


def split_last_days(
    log: ClickLog, days: float, name: str = "second log"
) -> tuple[ClickLog, ClickLog]:
    """The GRU4Rec authors' time split: (earlier sessions, sessions of the last ``days``).

    A session goes to the second log when its last click falls within ``days`` days of the
    log's last click, so no session is cut and nothing after the first log's period leaks
    into it. The second log then keeps only the items the first one has (a model cannot rank
    an item it never saw) and, of what is left, the sessions with two or more clicks.
    ``name`` names the second log in errors.
    """
    _check_days(days, name)
    offsets = log.session_offsets()
    session_end = log.times[offsets[1:] - 1]  # events are in time order within a session
    late = (session_end >= log.times.max() - days * DAY_S)[log.sessions]
    if late.all():
        raise UserError(
            f"{log.source}: {name}: every session ends in the last {days:g} day(s), "
            "so none is left before them (fewer days?)"
        )
    in_earlier = np.zeros(len(log.item_ids), dtype=bool)
    in_earlier[log.items[~late]] = True
    keep = late & in_earlier[log.items]
    keep &= (np.bincount(log.sessions[keep], minlength=log.n_sessions) >= 2)[log.sessions]
    if not keep.any():
        raise UserError(
            f"{log.source}: {name}: no session of 2+ clicks on earlier items ends in the "
            f"last {days:g} day(s) (more days?)"
        )
    return _subset(log, ~late), _subset(log, keep)


def split_for_tuning(
    log: ClickLog, test_days: float, valid_days: float
) -> tuple[dict[str, ClickLog], FilterReport]:
    """The authors' preprocessing of a raw log: :func:`standard_filter`, then the four logs
    of :data:`SPLIT_NAMES`: ``test`` is the last ``test_days`` of the filtered log and
    ``train_valid`` the last ``valid_days`` of the rest (:func:`split_last_days` both)."""
    _check_days(test_days, "test")
    _check_days(valid_days, "train_valid")
    filtered, report = standard_filter(log)
    train_full, test = split_last_days(filtered, test_days, "test")
    train_tr, train_valid = split_last_days(train_full, valid_days, "train_valid")
    return dict(zip(SPLIT_NAMES, (train_full, test, train_tr, train_valid))), report


def _check_days(days: float, name: str) -> None:
    if not days > 0:
        raise UserError(f"{name}: the days to split off must be > 0, got {days:g}")
