"""Reading click logs, the append-only ItemMap and the standard GRU4Rec filtering."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from model.data import ClickLog, ItemMap, read_clicks, sessions_log, standard_filter
from model.errors import UserError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def events(log: ClickLog) -> list[tuple[str, str, float]]:
    """The log as (session id, item id, time) rows in its order."""
    return [
        (str(log.session_ids[s]), str(log.item_ids[i]), float(t))
        for s, i, t in zip(log.sessions, log.items, log.times)
    ]


def assert_grouped_and_time_ordered(rows: list[tuple[str, str, float]]) -> None:
    seen: list[str] = []
    for k, (session, _, time) in enumerate(rows):
        if k and rows[k - 1][0] == session:
            assert rows[k - 1][2] <= time, f"time goes backwards in session {session}"
        else:
            assert session not in seen, f"session {session} is split"
            seen.append(session)


def assert_error(
    exc: pytest.ExceptionInfo[UserError], path: Path, line: int | None, *words: str
) -> None:
    message = str(exc.value)
    assert str(path) in message, message
    if line is not None:
        assert re.search(rf"\bline {line}\b", message), f"no 'line {line}' in {message!r}"
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"


# --- reading -------------------------------------------------------------------------------


def test_tsv_is_sorted_by_session_then_time(tmp_path: Path) -> None:
    path = write(
        tmp_path / "clicks.tsv",
        "SessionId\tItemId\tTime\n"
        "s2\tb\t50\n"
        "s1\ta\t30\n"
        "s2\ta\t10\n"
        "s1\tc\t20\n"
        "s3\tc\t5\n"
        "s2\td\t40.5\n",
    )
    log = read_clicks(path)
    rows = events(log)
    assert sorted(rows) == sorted(
        [
            ("s2", "b", 50.0),
            ("s1", "a", 30.0),
            ("s2", "a", 10.0),
            ("s1", "c", 20.0),
            ("s3", "c", 5.0),
            ("s2", "d", 40.5),
        ]
    )
    assert_grouped_and_time_ordered(rows)
    by_session = {s: [i for s2, i, _ in rows if s2 == s] for s in ("s1", "s2", "s3")}
    assert by_session == {"s1": ["c", "a"], "s2": ["a", "d", "b"], "s3": ["c"]}
    assert len(log) == 6 and log.n_sessions == 3
    assert sorted(log.item_ids) == ["a", "b", "c", "d"]
    assert log.source == str(path)


def test_ids_are_kept_as_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "clicks.tsv", "SessionId\tItemId\tTime\n007\t0042\t1\n007\t42\t2\n")
    log = read_clicks(path)
    assert list(log.session_ids) == ["007"]
    assert events(log) == [("007", "0042", 1.0), ("007", "42", 2.0)]


def test_csv_with_custom_columns_and_extra_columns(tmp_path: Path) -> None:
    path = write(
        tmp_path / "clicks.csv", "ts,user,item,sess\n3.5,u1,x,B\n1,u1,y,A\n2,u2,x,B\n4,u2,z,A\n"
    )
    log = read_clicks(path, columns=("sess", "item", "ts"))
    rows = events(log)
    assert_grouped_and_time_ordered(rows)
    assert sorted(rows) == [("A", "y", 1.0), ("A", "z", 4.0), ("B", "x", 2.0), ("B", "x", 3.5)]


def test_explicit_separator(tmp_path: Path) -> None:
    path = write(tmp_path / "clicks.txt", "SessionId;ItemId;Time\n1;a;1\n1;b;2\n")
    assert events(read_clicks(path, sep=";")) == [("1", "a", 1.0), ("1", "b", 2.0)]


def test_missing_column_names_file_and_line_1(tmp_path: Path) -> None:
    path = write(tmp_path / "clicks.tsv", "SessionId\tItem\tTime\n1\ta\t1\n")
    with pytest.raises(UserError) as info:
        read_clicks(path)
    assert_error(info, path, 1, "ItemId")


def test_csv_read_with_wrong_separator_reports_missing_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "clicks.csv", "SessionId\tItemId\tTime\n1\ta\t1\n")
    with pytest.raises(UserError) as info:
        read_clicks(path)  # .csv means ',' unless told otherwise
    assert_error(info, path, 1, "SessionId")


def test_non_numeric_time_names_the_right_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "clicks.tsv",
        "SessionId\tItemId\tTime\n1\ta\t1\n1\tb\t2\n2\tc\t3\n2\td\tyesterday\n3\te\t5\n",
    )
    with pytest.raises(UserError) as info:
        read_clicks(path)
    assert_error(info, path, 5, "Time", "yesterday")


def test_infinite_time_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "clicks.tsv", "SessionId\tItemId\tTime\n1\ta\t1\n1\tb\tinf\n")
    with pytest.raises(UserError) as info:
        read_clicks(path)
    assert_error(info, path, 3, "Time")


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path / "clicks.tsv", "")
    with pytest.raises(UserError) as info:
        read_clicks(path)
    assert_error(info, path, None, "empty")


def test_header_only(tmp_path: Path) -> None:
    path = write(tmp_path / "clicks.tsv", "SessionId\tItemId\tTime\n")
    with pytest.raises(UserError) as info:
        read_clicks(path)
    assert_error(info, path, None, "no events")


@pytest.mark.parametrize(
    ("body", "line", "column"),
    [
        ("1\ta\t1\n1\t\t2\n", 3, "ItemId"),
        ("1\ta\t1\n2\tb\t2\n\tc\t3\n", 4, "SessionId"),
        ("1\ta\t1\n1\tb\n", 3, "Time"),  # a short row
        ("1\ta\t1\n\n1\tb\t2\n", 3, "SessionId"),  # a blank line counts as a row
    ],
)
def test_missing_value_names_file_line_and_column(
    tmp_path: Path, body: str, line: int, column: str
) -> None:
    path = write(tmp_path / "clicks.tsv", "SessionId\tItemId\tTime\n" + body)
    with pytest.raises(UserError) as info:
        read_clicks(path)
    assert_error(info, path, line, column)


def test_nonexistent_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "clicks.tsv"
    with pytest.raises(UserError) as info:
        read_clicks(path)
    assert_error(info, path, None)


def test_directory_is_not_a_click_log(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        read_clicks(tmp_path)


# --- ItemMap -------------------------------------------------------------------------------


def test_item_map_growth_keeps_old_indexes_and_appends_in_first_appearance_order() -> None:
    item_map = ItemMap(["b", "a"])
    assert item_map.ids == ["b", "a"]
    assert item_map.add(["c", "a", "e", "c", "b", "d"]) == 3
    assert item_map.ids == ["b", "a", "c", "e", "d"]
    assert [item_map.index_of(i) for i in ("b", "a", "c", "e", "d")] == [0, 1, 2, 3, 4]
    assert item_map.add(["a", "b"]) == 0
    assert len(item_map) == 5
    assert "e" in item_map and "z" not in item_map


def test_item_map_ids_are_strings() -> None:
    item_map = ItemMap([1, 2])  # type: ignore[list-item]
    assert item_map.ids == ["1", "2"]
    assert list(item_map.lookup([2, "1"])) == [1, 0]


def test_lookup_gives_minus_one_for_unknown() -> None:
    item_map = ItemMap(["x", "y", "z"])
    assert item_map.index_of("nope") == -1
    result = item_map.lookup(["z", "nope", "x", "y", ""])
    assert result.dtype == np.int64
    assert list(result) == [2, -1, 0, 1, -1]
    assert list(item_map.lookup([])) == []


def test_item_map_copy_is_independent() -> None:
    original = ItemMap(["a", "b"])
    copy = original.copy()
    copy.add(["c"])
    assert original.ids == ["a", "b"] and len(original) == 2 and "c" not in original
    assert copy.ids == ["a", "b", "c"]


def test_item_indexes_maps_events_through_an_item_map() -> None:
    log = ClickLog.from_arrays(["s", "s", "t"], ["b", "q", "a"], [1, 2, 3])
    item_map = ItemMap(["a", "b"])
    rows = events(log)
    expected = [item_map.index_of(item) for _, item, _ in rows]
    assert list(log.item_indexes(item_map)) == expected
    assert sorted(expected) == [-1, 0, 1]


# --- filtering -----------------------------------------------------------------------------


def hand_built_log() -> ClickLog:
    # supports: A 5, B 6, C 2, D 4
    sessions = {
        "s1": ["A", "B", "A"],  # kept whole
        "s2": ["A", "C"],  # C is rare -> one click left -> removed
        "s3": ["D", "D", "D", "D"],  # D is rare (4 < 5) -> removed
        "s4": ["B", "B", "A", "B"],  # kept whole
        "s5": ["A", "B", "C"],  # C removed, A B kept
        "s6": ["B"],  # too short
    }
    return sessions_log(sessions)


def test_standard_filter_removes_rare_items_and_short_sessions() -> None:
    log = hand_built_log()
    filtered, report = standard_filter(log)
    assert report.events_before == 17
    assert report.events_after == 9 == len(filtered)
    assert report.sessions_removed == 3
    assert report.items_removed == 2
    rows = events(filtered)
    assert_grouped_and_time_ordered(rows)
    by_session: dict[str, list[str]] = {}
    for session, item, _ in rows:
        by_session.setdefault(session, []).append(item)
    assert by_session == {"s1": ["A", "B", "A"], "s4": ["B", "B", "A", "B"], "s5": ["A", "B"]}
    assert sorted(filtered.item_ids) == ["A", "B"]
    assert sorted(filtered.session_ids) == ["s1", "s4", "s5"]
    text = str(report)
    assert "9" in text and "17" in text


def test_standard_filter_thresholds_are_parameters() -> None:
    filtered, report = standard_filter(hand_built_log(), min_item_support=1, min_session_length=3)
    # nothing is rare; s2 (2 clicks) and s6 (1 click) are too short
    assert (report.events_before, report.events_after) == (17, 14)
    assert report.sessions_removed == 2
    assert report.items_removed == 0
    assert sorted(filtered.session_ids) == ["s1", "s3", "s4", "s5"]


def test_filtered_log_offsets_match_its_sessions() -> None:
    filtered, _ = standard_filter(hand_built_log())
    offsets = filtered.session_offsets()
    lengths = {
        str(filtered.session_ids[filtered.sessions[a]]): b - a
        for a, b in zip(offsets[:-1], offsets[1:])
    }
    assert lengths == {"s1": 3, "s4": 4, "s5": 2}


# --- ClickLog ------------------------------------------------------------------------------


def test_session_offsets() -> None:
    log = ClickLog.from_arrays(
        ["a", "b", "a", "c", "c", "a"], ["1", "2", "3", "4", "5", "6"], [1, 2, 3, 4, 5, 6]
    )
    offsets = log.session_offsets()
    assert offsets.dtype == np.int64
    assert list(offsets) == [0, 3, 4, 6]
    for k, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        assert (log.sessions[start:end] == k).all()
    assert [list(log.item_ids[log.items[a:b]]) for a, b in zip(offsets[:-1], offsets[1:])] == [
        ["1", "3", "6"],
        ["2"],
        ["4", "5"],
    ]


def test_from_arrays_sorts_by_session_then_time() -> None:
    log = ClickLog.from_arrays(["x", "y", "x", "y"], ["i1", "i2", "i3", "i4"], [5.0, 1.0, 2.0, 0.5])
    rows = events(log)
    assert_grouped_and_time_ordered(rows)
    assert sorted(rows) == [("x", "i1", 5.0), ("x", "i3", 2.0), ("y", "i2", 1.0), ("y", "i4", 0.5)]
    assert log.n_sessions == 2 and len(log) == 4


def test_fast_arrow_reader_and_validating_reader_agree(tmp_path, monkeypatch) -> None:
    """The Arrow fast path must give exactly what the pandas path gives."""
    from model import data
    from model.synth import SynthSpec, generate, write_clicks

    path = tmp_path / "clicks.tsv"
    write_clicks(generate(SynthSpec(sessions=3000, items=300, seed=5)), path)
    assert data._read_with_arrow(path, data.DEFAULT_COLUMNS, "\t") is not None
    fast = data.read_clicks(path)
    monkeypatch.setattr(data, "_read_with_arrow", lambda *args: None)
    slow = data.read_clicks(path)
    for field in ("sessions", "items", "times", "session_ids", "item_ids"):
        assert np.array_equal(getattr(fast, field), getattr(slow, field)), field
