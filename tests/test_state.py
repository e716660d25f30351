"""SessionState's binary encoding: round trips, truncation, header peeking, bad formats."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.serving.state import FORMAT, RECENT_ITEMS, SessionState, UndecodableState


def make_state(
    hidden: np.ndarray | None = None,
    recent_items: tuple[str, ...] = ("a", "b"),
    last_offset: int = 17,
    last_time: float = 1_700_000_123.25,
    started: bool = True,
    model_version: str = "20240101T000000-abcd",
    partition: int = 3,
) -> SessionState:
    if hidden is None:
        hidden = np.linspace(-1, 1, 8, dtype=np.float32)
    return SessionState(
        hidden=hidden,
        recent_items=recent_items,
        last_offset=last_offset,
        last_time=last_time,
        started=started,
        model_version=model_version,
        partition=partition,
    )


def assert_same(decoded: SessionState, expected: SessionState) -> None:
    """Field-by-field (dataclass == on an ndarray field is ambiguous)."""
    assert decoded.hidden.dtype == np.float32
    assert decoded.hidden.shape == (np.asarray(expected.hidden).size,)
    np.testing.assert_array_equal(
        decoded.hidden, np.asarray(expected.hidden, dtype=np.float32).ravel()
    )
    assert decoded.recent_items == tuple(expected.recent_items[-RECENT_ITEMS:])
    assert decoded.last_offset == expected.last_offset
    assert decoded.last_time == expected.last_time
    assert decoded.started is bool(expected.started)
    assert decoded.model_version == expected.model_version
    assert decoded.partition == expected.partition


def round_trip(state: SessionState) -> SessionState:
    data = state.encode()
    assert isinstance(data, bytes)
    return SessionState.decode(data)


def test_round_trip() -> None:
    state = make_state()
    assert_same(round_trip(state), state)


def test_round_trip_non_ascii_items_and_version() -> None:
    state = make_state(recent_items=("été", "商品-42", "😀", "a\x00b"), model_version="v-ü")
    assert_same(round_trip(state), state)


def test_round_trip_empty_recent_items_and_not_started() -> None:
    state = make_state(recent_items=(), started=False, last_offset=-1, last_time=0.0, partition=0)
    decoded = round_trip(state)
    assert_same(decoded, state)
    assert decoded.recent_items == ()


def test_recent_items_truncated_to_the_last_ones() -> None:
    items = tuple(f"item-{k}" for k in range(RECENT_ITEMS + 7))
    decoded = round_trip(make_state(recent_items=items))
    assert decoded.recent_items == items[-RECENT_ITEMS:]
    assert len(decoded.recent_items) == RECENT_ITEMS
    exactly = items[:RECENT_ITEMS]
    assert round_trip(make_state(recent_items=exactly)).recent_items == exactly


@pytest.mark.parametrize("size", [0, 1, 8, 100, 300, 1000])
def test_hidden_of_various_sizes(size: int) -> None:
    hidden = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    state = make_state(hidden=hidden)
    assert_same(round_trip(state), state)


def test_float64_hidden_is_stored_as_float32() -> None:
    hidden = np.array([0.1, -2.5, 1e-3], dtype=np.float64)
    decoded = round_trip(make_state(hidden=hidden))
    np.testing.assert_array_equal(decoded.hidden, hidden.astype(np.float32))


def test_non_contiguous_hidden() -> None:
    base = np.arange(20, dtype=np.float32)
    state = make_state(hidden=base[::2])
    assert_same(round_trip(state), state)


def test_encoding_is_compact() -> None:
    # the docstring's claim: about 450 bytes for 100 units (plus the items here)
    state = make_state(hidden=np.zeros(100, np.float32), recent_items=())
    assert len(state.encode()) < 450


@pytest.mark.parametrize("partition,last_time", [(0, 0.0), (7, 1_700_000_000.5), (65535, 123.456)])
def test_peek_partition_and_time(partition: int, last_time: float) -> None:
    state = make_state(
        partition=partition,
        last_time=last_time,
        recent_items=tuple("xyz"),
        hidden=np.ones(50, np.float32),
    )
    data = state.encode()
    assert SessionState.peek_partition_and_time(data) == (partition, last_time)
    decoded = SessionState.decode(data)
    assert (decoded.partition, decoded.last_time) == (partition, last_time)


@pytest.mark.parametrize("fmt", [0, FORMAT + 1, 255])
def test_unknown_format_byte_raises_value_error(fmt: int) -> None:
    assert fmt != FORMAT
    data = bytearray(make_state().encode())
    assert data[0] == FORMAT
    data[0] = fmt
    with pytest.raises(ValueError, match="format"):
        SessionState.decode(bytes(data))


states = st.builds(
    SessionState,
    hidden=st.lists(st.floats(width=32, allow_nan=False), max_size=64).map(
        lambda v: np.array(v, dtype=np.float32)
    ),
    recent_items=st.lists(st.text(max_size=30), max_size=RECENT_ITEMS + 10).map(tuple),
    last_offset=st.integers(min_value=-1, max_value=2**63 - 1),
    last_time=st.floats(allow_nan=False),
    started=st.booleans(),
    model_version=st.text(max_size=40).filter(lambda v: len(v.encode("utf-8")) <= 255),
    partition=st.integers(min_value=0, max_value=65535),
)


@settings(max_examples=100, deadline=None)
@given(state=states)
def test_round_trip_property(state: SessionState) -> None:
    data = state.encode()
    assert_same(SessionState.decode(data), state)
    assert SessionState.peek_partition_and_time(data) == (state.partition, state.last_time)
    # decoding is a fixed point: re-encoding the decoded state gives the same bytes
    assert SessionState.decode(data).encode() == data


@settings(max_examples=50, deadline=None)
@given(hidden=st.lists(st.floats(width=32), min_size=1, max_size=16))
def test_nan_and_inf_hidden_values_survive_bit_exactly(hidden: list[float]) -> None:
    array = np.array(hidden, dtype=np.float32)
    decoded = round_trip(make_state(hidden=array))
    assert decoded.hidden.tobytes() == array.tobytes()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x00",  # shorter than the header
        b"garbage written by anyone",
        bytes([FORMAT + 1]) + bytes(60),  # another format
    ],
)
def test_bytes_that_are_no_state_raise_undecodable_state(data: bytes) -> None:
    """Whatever the changelog holds, decoding fails with one error the worker handles
    (the session restarts empty), never with struct's, numpy's or a codec's; so does
    peeking at a header that is not one (the expiry scan skips such entries)."""
    with pytest.raises(UndecodableState):
        SessionState.decode(data)
    with pytest.raises(UndecodableState):
        SessionState.peek_partition_and_time(data)


def test_a_header_with_the_wrong_body_does_not_decode() -> None:
    """Peeking reads the header only (cheap enough to scan a table); decoding checks
    that the body is exactly what the header announces."""
    data = bytes([FORMAT]) + bytes(40)  # an empty state's header, then 17 stray bytes
    assert SessionState.peek_partition_and_time(data) == (0, 0.0)
    with pytest.raises(UndecodableState, match="17 bytes left"):
        SessionState.decode(data)


@pytest.mark.parametrize("cut", [1, 5])
def test_a_truncated_or_extended_state_does_not_decode(cut: int) -> None:
    data = make_state(recent_items=("é", "item"), hidden=np.ones(8, np.float32)).encode()
    for broken in (data[:-cut], data + bytes(cut), data[: 21 + cut]):
        with pytest.raises(UndecodableState):
            SessionState.decode(broken)


def test_a_state_with_an_invalid_utf8_item_does_not_decode() -> None:
    data = make_state(recent_items=("ab",)).encode()
    with pytest.raises(UndecodableState):
        SessionState.decode(data.replace(b"ab", b"\xff\xfe"))
