"""Wire formats of stream.kafka.wire: click parsing (every reason code), encoding round trips,
and the recommendation message shape. No Kafka needed."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.kafka.wire import (
    MAX_FUTURE_SKEW_S,
    MAX_ID_BYTES,
    MAX_MESSAGE_BYTES,
    Click,
    Rejected,
    encode_click,
    encode_recommendation,
    parse_click,
)

NOW = 1_700_000_000.0


def message(
    session_id: object = "s1",
    item_id: object = "i1",
    timestamp: object = NOW - 5.0,
    **extra: object,
) -> bytes:
    data = {"session_id": session_id, "item_id": item_id, "timestamp": timestamp, **extra}
    return json.dumps(data).encode("utf-8")


def without(field: str) -> bytes:
    data = {"session_id": "s1", "item_id": "i1", "timestamp": NOW}
    del data[field]
    return json.dumps(data).encode("utf-8")


def reason(key: bytes | None, value: bytes | None) -> str:
    result = parse_click(key, value, NOW)
    assert isinstance(result, Rejected), result
    assert result.detail  # a human-readable detail always comes with the code
    return result.reason


# ---------------------------------------------------------------------------- valid clicks


def test_valid_click() -> None:
    assert parse_click(b"s1", message(), NOW) == Click("s1", "i1", NOW - 5.0)


def test_extra_fields_are_ignored() -> None:
    value = message(price=3.5, tags=["a", "b"], nested={"x": None}, session="other")
    assert parse_click(b"s1", value, NOW) == Click("s1", "i1", NOW - 5.0)


def test_int_timestamp_becomes_float() -> None:
    result = parse_click(b"s1", message(timestamp=1_600_000_000), NOW)
    assert result == Click("s1", "i1", 1_600_000_000.0)
    assert isinstance(result, Click) and type(result.timestamp) is float


def test_zero_timestamp_and_max_skew_are_accepted() -> None:
    assert parse_click(b"s1", message(timestamp=0), NOW) == Click("s1", "i1", 0.0)
    edge = NOW + MAX_FUTURE_SKEW_S
    assert parse_click(b"s1", message(timestamp=edge), NOW) == Click("s1", "i1", edge)


def test_non_ascii_ids_and_ids_at_the_size_limit() -> None:
    session = "séance-😀"
    assert parse_click(
        session.encode("utf-8"), message(session_id=session, item_id="ü"), NOW
    ) == Click(session, "ü", NOW - 5.0)
    long_id = "x" * MAX_ID_BYTES
    assert parse_click(
        long_id.encode(), message(session_id=long_id, item_id=long_id), NOW
    ) == Click(long_id, long_id, NOW - 5.0)


# ------------------------------------------------------------------------------- rejections


def test_none_value_is_empty() -> None:
    assert reason(b"s1", None) == "empty"


def test_oversized_value() -> None:
    value = message(padding="p" * MAX_MESSAGE_BYTES)
    assert len(value) > MAX_MESSAGE_BYTES
    assert reason(b"s1", value) == "oversized"


@pytest.mark.parametrize(
    "value", [b"", b"not json", b"{", b'{"session_id": "s1",}', b"\xff\xfe\xfd", b"\x80abc"]
)
def test_not_json(value: bytes) -> None:
    assert reason(b"s1", value) == "not_json"


@pytest.mark.parametrize("value", [b"[]", b'["s1", "i1", 1]', b'"s1"', b"1", b"null", b"true"])
def test_json_that_is_not_an_object(value: bytes) -> None:
    assert reason(b"s1", value) == "not_object"


@pytest.mark.parametrize("field", ["session_id", "item_id", "timestamp"])
def test_missing_field(field: str) -> None:
    assert reason(b"s1", without(field)) == "missing_field"


@pytest.mark.parametrize("field", ["session_id", "item_id", "timestamp"])
def test_null_field_counts_as_missing(field: str) -> None:
    assert reason(b"s1", message(**{field: None})) == "missing_field"


@pytest.mark.parametrize(
    "value",
    [
        message(session_id=1),
        message(session_id=1.5),
        message(session_id=True),
        message(session_id=["s1"]),
        message(session_id={"id": "s1"}),
        message(item_id=7),
        message(item_id=False),
        message(item_id=["i1"]),
        message(timestamp="1700000000"),
        message(timestamp=True),
        message(timestamp=False),
        message(timestamp=[NOW]),
        message(timestamp={"t": NOW}),
    ],
)
def test_bad_type(value: bytes) -> None:
    assert reason(b"s1", value) == "bad_type"


@pytest.mark.parametrize("field", ["session_id", "item_id"])
def test_empty_string_id_is_rejected(field: str) -> None:
    assert reason(b"s1", message(**{field: ""})) == "bad_type"


@pytest.mark.parametrize("field", ["session_id", "item_id"])
def test_oversized_id(field: str) -> None:
    too_long = "x" * (MAX_ID_BYTES + 1)
    key = too_long.encode() if field == "session_id" else b"s1"
    assert reason(key, message(**{field: too_long})) == "oversized"


def test_id_limit_counts_utf8_bytes_not_characters() -> None:
    wide = "é" * (MAX_ID_BYTES // 2 + 1)  # fewer characters than the limit, more bytes
    assert len(wide) < MAX_ID_BYTES < len(wide.encode("utf-8"))
    assert reason(b"s1", message(item_id=wide)) == "oversized"


@pytest.mark.parametrize(
    "value",
    [
        b'{"session_id": "s1", "item_id": "i1", "timestamp": NaN}',  # Python's json accepts it
        b'{"session_id": "s1", "item_id": "i1", "timestamp": Infinity}',
        b'{"session_id": "s1", "item_id": "i1", "timestamp": -Infinity}',
        b'{"session_id": "s1", "item_id": "i1", "timestamp": 1e400}',  # overflows to inf
        message(timestamp=-1),
        message(timestamp=-0.001),
        message(timestamp=NOW + MAX_FUTURE_SKEW_S + 1.0),
        message(timestamp=NOW * 10),
    ],
)
def test_bad_timestamp(value: bytes) -> None:
    assert reason(b"s1", value) == "bad_timestamp"


def test_null_key() -> None:
    assert reason(None, message()) == "null_key"


@pytest.mark.parametrize("key", [b"s2", b"", b"S1", b"s1 ", "s1".encode("utf-16")])
def test_key_mismatch(key: bytes) -> None:
    assert reason(key, message()) == "key_mismatch"


# Inputs that once made parse_click raise instead of returning a Rejected.


@pytest.mark.parametrize(
    "value",
    [
        b'{"session_id": "\\ud800", "item_id": "i1", "timestamp": 1}',
        b'{"session_id": "s1", "item_id": "\\udfff", "timestamp": 1}',
        # raw CESU-style surrogate bytes: json.loads(bytes) decodes with 'surrogatepass'
        b'{"session_id": "s1", "item_id": "\xed\xa0\x80", "timestamp": 1}',
    ],
)
def test_lone_surrogate_id_is_rejected_not_raised(value: bytes) -> None:
    assert isinstance(parse_click(b"s1", value, NOW), Rejected)


def test_huge_integer_timestamp_is_bad_timestamp() -> None:
    value = b'{"session_id": "s1", "item_id": "i1", "timestamp": 1' + b"0" * 400 + b"}"
    assert reason(b"s1", value) == "bad_timestamp"


def test_integer_over_the_digit_limit_is_rejected() -> None:
    value = b'{"session_id": "s1", "item_id": "i1", "timestamp": 1' + b"0" * 5000 + b"}"
    assert len(value) < MAX_MESSAGE_BYTES
    assert reason(b"s1", value) in ("not_json", "bad_timestamp")


def test_deeply_nested_json_is_rejected() -> None:
    value = b"[" * 30_000 + b"]" * 30_000
    assert len(value) < MAX_MESSAGE_BYTES
    assert reason(b"s1", value) in ("not_json", "not_object")


# ----------------------------------------------------------------------- property tests

json_leaf = st.one_of(
    st.text(max_size=20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.booleans(),
    st.none(),
)
json_values = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_values = st.one_of(
    json_values, st.text(max_size=30), st.floats(min_value=0, max_value=NOW * 2), st.just("s1")
)
click_like = st.fixed_dictionaries(
    {},
    optional={
        "session_id": field_values,
        "item_id": field_values,
        "timestamp": field_values,
    },
).flatmap(
    lambda d: st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(
        lambda extra: {**extra, **d}
    )
)
keys = st.one_of(st.none(), st.binary(max_size=40), st.just(b"s1"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=keys, value=st.one_of(st.none(), st.binary(max_size=200)))
def test_parse_never_raises_on_arbitrary_bytes(key: bytes | None, value: bytes | None) -> None:
    assert isinstance(parse_click(key, value, NOW), (Click, Rejected))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=keys, data=st.one_of(click_like, json_values))
def test_parse_never_raises_on_arbitrary_json(key: bytes | None, data: object) -> None:
    value = json.dumps(data).encode("utf-8")  # allow_nan: emits NaN/Infinity literals
    result = parse_click(key, value, NOW)
    assert isinstance(result, (Click, Rejected))
    if isinstance(result, Click):
        assert isinstance(data, dict)
        assert result.session_id == data["session_id"] and result.item_id == data["item_id"]
        assert key == result.session_id.encode("utf-8")
        assert math.isfinite(result.timestamp) and 0 <= result.timestamp <= NOW + MAX_FUTURE_SKEW_S


ids = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode("utf-8")) <= MAX_ID_BYTES)
valid_times = st.one_of(
    st.floats(min_value=0.0, max_value=NOW + MAX_FUTURE_SKEW_S),
    st.integers(min_value=0, max_value=int(NOW)),
)


@settings(max_examples=300, deadline=None)
@given(click=st.builds(Click, session_id=ids, item_id=ids, timestamp=valid_times))
def test_encode_parse_round_trip(click: Click) -> None:
    key, value = encode_click(click)
    assert key == click.session_id.encode("utf-8")
    result = parse_click(key, value, NOW)
    assert result == click
    assert isinstance(result, Click) and isinstance(result.timestamp, float)


@settings(max_examples=50, deadline=None)
@given(
    session_id=st.text(min_size=1, max_size=MAX_ID_BYTES // 4),
    item_id=st.text(min_size=1, max_size=MAX_ID_BYTES // 4),
)
def test_round_trip_of_ids_at_any_length_up_to_the_limit(session_id: str, item_id: str) -> None:
    click = Click(session_id, item_id, NOW)
    assert parse_click(*encode_click(click), NOW) == click


# ------------------------------------------------------------------ recommendation messages


def test_encode_recommendation_shape() -> None:
    click = Click("sé", "i1", NOW)
    raw = encode_recommendation(
        click, ["a", "b", "c"], [0.5, 0.123456789, -1.0], model_version="v7", partition=3, offset=42
    )
    decoded = json.loads(raw)
    assert set(decoded) == {
        "session_id",
        "item_id",
        "timestamp",
        "recommendations",
        "model_version",
        "source",
    }
    assert decoded["session_id"] == "sé" and decoded["item_id"] == "i1"
    assert decoded["timestamp"] == NOW
    assert decoded["model_version"] == "v7"
    assert decoded["source"] == {"partition": 3, "offset": 42}
    assert decoded["recommendations"] == [
        {"item_id": "a", "score": 0.5},
        {"item_id": "b", "score": 0.123457},
        {"item_id": "c", "score": -1.0},
    ]
    for entry in decoded["recommendations"]:
        assert set(entry) == {"item_id", "score"}
        assert isinstance(entry["score"], float)


def test_encode_recommendation_accepts_numpy_scores_and_empty_lists() -> None:
    import numpy as np

    click = Click("s", "i", 1.0)
    decoded = json.loads(
        encode_recommendation(click, ("x", "y"), np.array([2, 1], np.float32), "v", 0, 0)
    )
    assert decoded["recommendations"] == [
        {"item_id": "x", "score": 2.0},
        {"item_id": "y", "score": 1.0},
    ]
    assert json.loads(encode_recommendation(click, [], [], "v", 0, 0))["recommendations"] == []


@pytest.mark.parametrize("item_id", ['q"uote', "back\\slash", "tab\tnew\nline", "é☃😀", "\x00\x1f"])
def test_encode_recommendation_is_the_json_of_the_message(item_id: str) -> None:
    click = Click(f"s-{item_id}", item_id, 1700000000.123456)
    scores = [1e-9, -3.25, 123456.7890123, 0.1 + 0.2, 2.0000005, -4.4e-7]
    raw = encode_recommendation(
        click, [f"{item_id}{i}" for i in range(len(scores))], scores, f"v-{item_id}", 7, 2**40
    )
    assert json.loads(raw) == {
        "session_id": click.session_id,
        "item_id": item_id,
        "timestamp": click.timestamp,
        "recommendations": [
            {"item_id": f"{item_id}{i}", "score": round(s, 6)} for i, s in enumerate(scores)
        ],
        "model_version": f"v-{item_id}",
        "source": {"partition": 7, "offset": 2**40},
    }
    assert raw.isascii()  # non-ASCII ids escaped, as json.dumps does by default
