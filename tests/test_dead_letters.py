"""Bad input against a real worker (issue #6): every malformed click goes to the
dead-letter topic with its reason and original bytes, is counted by reason on /metrics,
and neither stops the worker nor keeps the good clicks around it from being answered.

Hypothesis generates the malformed messages (raw bytes and explicit keys, produced with
confluent-kafka like any foreign producer) mixed with good clicks. One ``streamrec
worker`` serves every example, so the examples use their own session ids and are told
apart by where their messages landed (partition, offset). The expected reason of each bad
message is written beside the malformation that makes it, not asked of the worker's parser.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from model.artifact import load_model
from stream.devtools.processes import TopicReader
from stream.devtools.testing import (
    StreamNames,
    WorkerProcess,
    click_by_click,
    free_port,
    produce_raw,
    wait_for_http,
)
from stream.kafka.config import client_config, producer_config
from stream.kafka.topics import ensure_topics
from stream.kafka.wire import (
    MAX_FUTURE_SKEW_S,
    MAX_ID_BYTES,
    MAX_MESSAGE_BYTES,
    Click,
    Rejected,
    encode_click,
    parse_click,
)
from stream.serving.app import PRODUCER_LINGER_MS
from stream.serving.dead_letters import TRUNCATED_DEAD_LETTER_BYTES

pytestmark = pytest.mark.kafka

#: Every reason code stream.kafka.wire documents; the worker must use no other.
REASONS = frozenset(
    {
        "empty",
        "oversized",
        "not_json",
        "not_object",
        "missing_field",
        "bad_type",
        "bad_timestamp",
        "null_key",
        "key_mismatch",
    }
)
PARTITIONS = 4
#: A good click's event time: in the past, so that it stays valid however long the run.
PAST = 1_700_000_000.0
#: Far-future times start a day beyond the allowed skew, so no clock drift during the run
#: can make the worker's verdict differ from the one computed when producing.
FAR_FUTURE = time.time() + MAX_FUTURE_SKEW_S + 86_400.0
#: Room left under the topic's max.message.bytes for the record batch around a message:
#: ample, so that the dead letter (plus its headers) still fits...
BATCH_OVERHEAD = 1024
#: ...and barely enough (a batch of one record adds about 75 bytes), so that the message
#: fits but its dead letter, with over 100 bytes of headers, does not.
RECORD_OVERHEAD = 100


# --------------------------------------------------------------------------- the worker


def max_message_bytes(bootstrap: str, topic: str) -> int:
    admin = AdminClient(client_config(bootstrap))
    resource = ConfigResource("topic", topic)
    config = admin.describe_configs([resource])[resource].result(15)
    return int(config["max.message.bytes"].value)


def topic_log(bootstrap: str, topic: str) -> TopicReader:
    """Everything on ``topic`` so far, raw, read in the background from the beginning."""
    reader = TopicReader(bootstrap, topic, decode=False)
    reader.start()
    return reader


@dataclass
class Harness:
    bootstrap: str
    names: StreamNames
    worker: WorkerProcess
    port: int
    size_limit: int  # the input topic's max.message.bytes
    item_ids: list[str]
    outputs: TopicReader
    dead_letters: TopicReader
    expected_rejections: Counter[str]  # over every example so far

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read().decode()

    def metrics(self) -> str:
        return self.get("/metrics")

    def wait_ready(self, timeout: float) -> None:
        """Until /readyz answers 200: partitions assigned, table recovered."""
        url = f"http://127.0.0.1:{self.port}/readyz"
        wait_for_http(url, lambda status, _: status == 200, self.worker, timeout)

    def rejected_counts(self) -> dict[str, float]:
        pattern = re.compile(
            r'^streamrec_events_rejected_total\{reason="([^"]*)"\} (\S+)$', re.MULTILINE
        )
        return {reason: float(value) for reason, value in pattern.findall(self.metrics())}

    def log(self) -> str:
        return self.worker.log()[-4000:]


@pytest.fixture(scope="module")
def harness(kafka_bootstrap: str, small_model, tmp_path_factory) -> Iterator[Harness]:
    names = StreamNames("dlq")
    ensure_topics(
        kafka_bootstrap, {t: PARTITIONS for t in (names.clicks, names.recommendations, names.dlq)}
    )
    port = free_port()
    worker = WorkerProcess(
        kafka_bootstrap,
        small_model,
        names,
        tmp_path_factory.mktemp("dead-letters"),
        "--web-port",
        str(port),
        partitions=PARTITIONS,
    )
    outputs = topic_log(kafka_bootstrap, names.recommendations)
    dead_letters = topic_log(kafka_bootstrap, names.dlq)
    worker.start()
    try:
        harness = Harness(
            kafka_bootstrap,
            names,
            worker,
            port,
            max_message_bytes(kafka_bootstrap, names.clicks),
            list(load_model(small_model).item_map.ids),
            outputs,
            dead_letters,
            Counter(),
        )
        harness.wait_ready(timeout=90)
        yield harness
    finally:
        outputs.close()
        dead_letters.close()
        worker.stop()


# ----------------------------------------------------------------- generated messages


@dataclass
class Sent:
    """A message as produced, where it landed, and what the worker must do with it."""

    key: bytes | None
    value: bytes | None
    click: Click | None = None  # a good click: answered on the output topic
    reason: str | None = None  # a bad one: dead-lettered with this reason
    too_large: bool = False  # ...its dead letter too large for the topic: truncated
    partition: int = -1
    offset: int = -1

    @property
    def source(self) -> tuple[int, int]:
        return self.partition, self.offset

    def __repr__(self) -> str:  # short: some values are a megabyte
        def cut(raw: bytes | None) -> str:
            return (
                repr(raw) if raw is None or len(raw) <= 80 else f"{raw[:80]!r}...({len(raw)} bytes)"
            )

        return (
            f"Sent(key={cut(self.key)}, value={cut(self.value)}, reason={self.reason}, "
            f"source={self.source})"
        )


def _is_json(value: bytes) -> bool:
    try:
        json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return True


def _dumps(data: Any) -> bytes:
    return json.dumps(data).encode("utf-8")  # allow_nan: NaN, Infinity literals


json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=12),
    st.floats(allow_nan=False, allow_infinity=False),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
past_times = st.one_of(
    st.floats(min_value=0.0, max_value=PAST), st.integers(min_value=0, max_value=int(PAST))
)


@st.composite
def good_fields(draw: st.DrawFn, session_id: str, item_ids: list[str]) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "item_id": draw(st.sampled_from(item_ids)),
        "timestamp": draw(past_times),
    }


@st.composite
def not_json(draw: st.DrawFn, sid: str, item_ids: list[str]) -> tuple[bytes | None, bytes]:
    valid = _dumps(draw(good_fields(sid, item_ids)))
    value = draw(
        st.one_of(
            st.just(b""),
            st.binary(min_size=1, max_size=120),
            st.integers(1, len(valid) - 1).map(lambda n: valid[:n]),  # truncated
            st.binary(min_size=1, max_size=8).map(lambda junk: valid + junk),  # trailing junk
            st.just(valid.replace(b'"item_id": "', b'"item_id": "\xff\xfe')),  # bad UTF-8
            st.just(valid.replace(b'"', b"'")),  # single quotes
        ).filter(lambda v: not _is_json(v))
    )
    return sid.encode(), value


@st.composite
def not_object(draw: st.DrawFn, sid: str, item_ids: list[str]) -> tuple[bytes | None, bytes]:
    data = draw(
        st.one_of(json_leaves, st.lists(json_values, max_size=4), st.just([sid, item_ids[0], PAST]))
    )
    return sid.encode(), _dumps(data)


@st.composite
def missing_field(draw: st.DrawFn, sid: str, item_ids: list[str]) -> tuple[bytes | None, bytes]:
    data = draw(good_fields(sid, item_ids))
    for name in draw(st.sets(st.sampled_from(sorted(data)), min_size=1)):
        if draw(st.booleans()):
            del data[name]
        else:
            data[name] = None
    return sid.encode(), _dumps(data)


@st.composite
def bad_type(draw: st.DrawFn, sid: str, item_ids: list[str]) -> tuple[bytes | None, bytes]:
    data = draw(good_fields(sid, item_ids))
    name = draw(st.sampled_from(sorted(data)))
    if name == "timestamp":
        data[name] = draw(
            st.one_of(
                st.text(max_size=12),
                st.booleans(),
                st.lists(past_times, min_size=1, max_size=2),
                st.dictionaries(st.text(max_size=4), past_times, max_size=2),
            )
        )
    else:
        data[name] = draw(
            st.one_of(
                st.just(""),
                st.booleans(),
                st.integers(),
                st.floats(allow_nan=False, allow_infinity=False),
                st.lists(st.text(max_size=5), max_size=2),
                st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
            )
        )
    return sid.encode(), _dumps(data)


@st.composite
def bad_timestamp(draw: st.DrawFn, sid: str, item_ids: list[str]) -> tuple[bytes | None, bytes]:
    data = draw(good_fields(sid, item_ids))
    data["timestamp"] = math.nan  # a placeholder replaced by the literal below
    literal = draw(
        st.one_of(
            st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "-0.5"]),
            st.floats(max_value=-1e-9, allow_infinity=False, allow_nan=False).map(repr),
            st.integers(max_value=-1).map(str),
            st.floats(min_value=FAR_FUTURE, max_value=1e300).map(repr),
            st.integers(min_value=int(FAR_FUTURE) + 1, max_value=10**30).map(str),
        )
    )
    return sid.encode(), _dumps(data).replace(b"NaN", literal.encode())


@st.composite
def null_key(draw: st.DrawFn, sid: str, item_ids: list[str]) -> tuple[bytes | None, bytes]:
    return None, _dumps(draw(good_fields(sid, item_ids)))


@st.composite
def key_mismatch(draw: st.DrawFn, sid: str, item_ids: list[str]) -> tuple[bytes | None, bytes]:
    key = draw(
        st.one_of(
            st.just(b""),
            st.binary(min_size=1, max_size=40),
            st.sampled_from(
                [
                    sid.upper().encode(),
                    (sid + " ").encode(),
                    sid.encode("utf-16"),
                    sid[:-1].encode(),
                ]
            ),
        ).filter(lambda k: k != sid.encode())
    )
    return key, _dumps(draw(good_fields(sid, item_ids)))


@st.composite
def oversized_id(draw: st.DrawFn, sid: str, item_ids: list[str]) -> tuple[bytes | None, bytes]:
    data = draw(good_fields(sid, item_ids))
    char = draw(st.sampled_from(["x", "é", "😀"]))
    count = draw(st.integers(MAX_ID_BYTES // len(char.encode()) + 1, 3 * MAX_ID_BYTES))
    name = draw(st.sampled_from(["session_id", "item_id"]))
    data[name] = (sid + char * count) if name == "session_id" else char * count
    return data["session_id"].encode(), _dumps(data)


def _padded(data: dict[str, Any], size: int) -> bytes:
    """``data`` as JSON with a padding field, exactly ``size`` bytes long."""
    bare = len(_dumps({**data, "padding": ""}))
    value = _dumps({**data, "padding": "p" * (size - bare)})
    assert len(value) == size
    return value


def oversized_message(size_limit: int) -> Callable[..., Any]:
    """A well-formed click padded past stream.kafka.wire' limit, up to just under the topic's
    (the broker's) max.message.bytes."""

    @st.composite
    def strategy(draw: st.DrawFn, sid: str, item_ids: list[str]) -> tuple[bytes | None, bytes]:
        size = draw(st.integers(MAX_MESSAGE_BYTES + 1, size_limit - BATCH_OVERHEAD - len(sid)))
        return sid.encode(), _padded(draw(good_fields(sid, item_ids)), size)

    return strategy


def empty(sid: str, item_ids: list[str]) -> st.SearchStrategy[tuple[bytes | None, None]]:
    return st.just((sid.encode(), None))


def malformations(size_limit: int) -> list[tuple[str, Callable[..., Any]]]:
    """Each malformation with the reason the worker must give it: written here, not asked
    of the worker's own parser, so a parser that misjudges a message fails the test."""
    return [
        ("empty", empty),
        ("not_json", not_json),
        ("not_object", not_object),
        ("missing_field", missing_field),
        ("bad_type", bad_type),
        ("bad_timestamp", bad_timestamp),
        ("null_key", null_key),
        ("key_mismatch", key_mismatch),
        ("oversized", oversized_id),
        ("oversized", oversized_message(size_limit)),
    ]


@st.composite
def mixed_batch(
    draw: st.DrawFn, tag: str, item_ids: list[str], size_limit: int
) -> tuple[list[Sent], list[Sent]]:
    """Good clicks and at least one message of every malformation, shuffled; then the
    good clicks to produce after all of them."""
    kinds = malformations(size_limit)
    chosen = kinds + draw(st.lists(st.sampled_from(kinds), min_size=5, max_size=60))
    bad = []
    for n, (reason, kind) in enumerate(chosen):
        key, value = draw(kind(f"{tag}-bad{n}", item_ids))
        bad.append(Sent(key, value, reason=reason))
    # In every batch, messages near the broker's limit (the dead letter adds headers):
    # one whose copy still fits, and two (a long value, a long key) whose copies cannot.
    sid = f"{tag}-huge"
    bad.append(
        Sent(
            sid.encode(),
            _padded(draw(good_fields(sid, item_ids)), size_limit - BATCH_OVERHEAD - len(sid)),
            reason="oversized",
        )
    )
    sid = f"{tag}-full"
    bad.append(
        Sent(
            sid.encode(),
            _padded(draw(good_fields(sid, item_ids)), size_limit - RECORD_OVERHEAD - len(sid)),
            reason="oversized",
            too_large=True,
        )
    )
    value = _dumps(draw(good_fields(f"{tag}-longkey", item_ids)))
    key = b"k" * (size_limit - RECORD_OVERHEAD - len(value))
    bad.append(Sent(key, value, reason="key_mismatch", too_large=True))

    def good_clicks(prefix: str, sessions: int) -> list[Sent]:
        sent = []
        for s in range(sessions):
            items = draw(st.lists(st.sampled_from(item_ids), min_size=1, max_size=3))
            for j, item in enumerate(items):
                click = Click(f"{tag}-{prefix}{s}", item, PAST + j)
                sent.append(Sent(*encode_click(click), click=click))
        return sent

    good = good_clicks("good", draw(st.integers(3, 15)))
    # Shuffle the bad messages in among the good ones; each session's clicks keep their
    # order (a session's offsets order its clicks).
    bad = draw(st.permutations(bad))
    positions = sorted(
        draw(st.lists(st.integers(0, len(good)), min_size=len(bad), max_size=len(bad)))
    )
    mixed: list[Sent] = []
    for n, message in enumerate(bad):
        mixed.extend(good[positions[n - 1] if n else 0 : positions[n]])
        mixed.append(message)
    mixed.extend(good[positions[-1] :])
    return mixed, good_clicks("after", 5)


# ------------------------------------------------------------------------------ the test


def produce(bootstrap: str, topic: str, messages: list[Sent], size_limit: int) -> None:
    """Produce raw key/value bytes as given (murmur2 on the key, like every click producer)
    and record where each landed."""
    producer = Producer(
        producer_config(bootstrap, **{"message.max.bytes": size_limit, "linger.ms": 5})
    )
    errors = []
    for sent in messages:

        def delivered(err: Any, message: Any, sent: Sent = sent) -> None:
            if err is not None:
                errors.append(err)
            else:
                sent.partition, sent.offset = message.partition(), message.offset()

        producer.produce(topic, key=sent.key, value=sent.value, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not errors, errors


def header(message: Any, name: str) -> bytes | None:
    values = [v for k, v in (message.headers() or []) if k == name]
    assert len(values) <= 1, (name, message.headers())
    return values[0] if values else None


@settings(
    max_examples=5,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # shrinking would replay against one worker
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(data=st.data())
def test_bad_messages_are_dead_lettered_and_never_stop_the_worker(
    harness: Harness, data: st.DataObject
) -> None:
    h = harness
    tag = f"x{uuid.uuid4().hex[:8]}"  # this example's sessions
    mixed, after = data.draw(mixed_batch(tag, h.item_ids, h.size_limit), label="batch")
    now = time.time()
    for sent in mixed:
        if sent.click is None:
            verdict = parse_click(sent.key, sent.value, now)
            assert isinstance(verdict, Rejected), (sent.key, sent.value[:200], verdict)
            assert verdict.reason == sent.reason, (sent, verdict)
        else:
            assert parse_click(sent.key, sent.value, now) == sent.click
    bad = [s for s in mixed if s.click is None]
    assert {s.reason for s in bad} == REASONS  # every documented reason, and no other

    produce(h.bootstrap, h.names.clicks, mixed, h.size_limit)
    produce(h.bootstrap, h.names.clicks, after, h.size_limit)  # after every bad message
    good = [s for s in mixed if s.click is not None] + after
    sources = {s.source for s in mixed + after}
    assert len(sources) == len(mixed) + len(after)

    def by_source(
        messages: list[Any], decode: Callable[[Any], tuple[int, int]]
    ) -> dict[tuple[int, int], list[Any]]:
        found: dict[tuple[int, int], list[Any]] = {}
        for message in messages:
            source = decode(message)
            if source in sources:
                found.setdefault(source, []).append(message)
        return found

    def output_source(message: Any) -> tuple[int, int]:
        source = json.loads(message.value())["source"]
        return source["partition"], source["offset"]

    prefix = f"{h.names.clicks}/"

    def dlq_source(message: Any) -> tuple[int, int]:
        raw = (header(message, "streamrec-source") or b"").decode()
        assert raw.startswith(prefix), raw
        partition, offset = raw[len(prefix) :].split("/")
        return int(partition), int(offset)

    want_outputs = {s.source for s in good}
    want_dead = {s.source for s in bad}
    answered = h.outputs.wait_until(
        lambda ms: want_outputs <= set(by_source(ms, output_source)), timeout=45
    )
    dead = h.dead_letters.wait_until(
        lambda ms: want_dead <= set(by_source(ms, dlq_source)), timeout=45
    )
    assert h.worker.process.poll() is None, "the worker died:\n" + h.log()
    outputs = by_source(h.outputs.messages, output_source)
    dead_letters = by_source(h.dead_letters.messages, dlq_source)
    assert answered, (
        f"{len(want_outputs - set(outputs))} of {len(want_outputs)} good "
        f"clicks unanswered\n" + h.log()
    )
    assert dead, (
        f"{len(want_dead - set(dead_letters))} of {len(want_dead)} bad messages "
        f"not dead-lettered, reasons "
        f"{Counter(s.reason for s in bad if s.source not in dead_letters)}\n" + h.log()
    )

    # Good clicks: answered (at least once), as themselves, never dead-lettered.
    for sent in good:
        for message in outputs[sent.source]:
            value = json.loads(message.value())
            assert message.key() == sent.key
            assert (value["session_id"], value["item_id"], value["timestamp"]) == (
                sent.click.session_id,
                sent.click.item_id,
                sent.click.timestamp,
            )
            assert len(value["recommendations"]) == 20
        assert sent.source not in dead_letters
    # Bad messages: dead-lettered with the reason written beside their malformation and
    # the original bytes (a missing value is stored as b""), never answered.
    for sent in bad:
        copies = dead_letters[sent.source]
        value = b"" if sent.value is None else sent.value
        for message in copies:
            assert header(message, "streamrec-reason") == sent.reason.encode(), sent
            assert header(message, "streamrec-detail"), sent
            truncated = header(message, "streamrec-truncated")
            if sent.too_large:
                # The copy could not fit with its headers: the start of the bytes is kept.
                key_size = len(sent.key or b"")
                assert truncated == f"key={key_size} value={len(value)}".encode(), sent
                assert message.key() == sent.key[:TRUNCATED_DEAD_LETTER_BYTES]
                assert message.value() == value[:TRUNCATED_DEAD_LETTER_BYTES]
            else:
                assert truncated is None, sent
                assert message.key() == sent.key
                assert message.value() == value
        assert sent.source not in outputs

    # /metrics counts rejections by reason exactly as the dead-letter topic holds them
    # (this example's and the earlier ones'; a redelivered message would count twice in
    # both), and every example's bad messages are in there.
    h.expected_rejections.update(s.reason for s in bad)
    on_topic = Counter(header(m, "streamrec-reason").decode() for m in h.dead_letters.messages)
    assert on_topic >= h.expected_rejections
    counted = h.rejected_counts()
    assert counted == {r: float(n) for r, n in on_topic.items()}, (counted, on_topic)
    assert set(counted) <= REASONS
    assert h.worker.process.poll() is None, h.log()


def test_a_flood_of_bad_messages_does_not_slow_the_worker(harness: Harness) -> None:
    """A broken producer's flood is dead-lettered a batch at a time, not one awaited
    delivery after another: each of those costs at least the producer's linger, so the
    flood's dead letters would span at least ``len(flood)`` lingers (every good click
    behind them waiting as long); at a batch at a time they span a fraction of that."""
    h = harness
    tag = f"flood{uuid.uuid4().hex[:8]}"
    flood = [
        Sent(f"{tag}-{n}".encode(), b"not json", reason="not_json")
        if n % 2
        else Sent(f"{tag}-{n}".encode(), None, reason="empty")
        for n in range(3000)
    ]
    after = Click(f"{tag}-after", h.item_ids[0], PAST)
    answer = [Sent(*encode_click(after), click=after)]
    produce(h.bootstrap, h.names.clicks, flood, h.size_limit)
    produce(h.bootstrap, h.names.clicks, answer, h.size_limit)
    sources = {f"{h.names.clicks}/{s.partition}/{s.offset}".encode(): s for s in flood}

    def ours(messages: list[Any]) -> list[Any]:
        return [m for m in messages if header(m, "streamrec-source") in sources]

    assert h.dead_letters.wait_until(
        lambda ms: len({header(m, "streamrec-source") for m in ours(ms)}) == len(flood), timeout=45
    ), h.log()
    assert h.outputs.wait_until(
        lambda ms: any(
            json.loads(m.value())["source"]
            == {"partition": answer[0].partition, "offset": answer[0].offset}
            for m in ms
        ),
        timeout=45,
    ), h.log()
    copies = ours(h.dead_letters.messages)
    assert {header(m, "streamrec-source") for m in copies} == set(sources)
    for message in copies:
        sent = sources[header(message, "streamrec-source")]
        assert header(message, "streamrec-reason") == sent.reason.encode()
    # Producer (send) times of the dead letters, in ms. Awaited one by one, each waits at
    # least a linger for the one before it, so every next one is stamped a later
    # millisecond. Sent a batch at a time, the stamp moves only between batches and where
    # a millisecond ends while a batch is sent: counting steps, not the time they span,
    # makes the bound hold however slow the machine is.
    assert PRODUCER_LINGER_MS >= 1
    stamps = sorted(message.timestamp()[1] for message in copies)
    steps = sum(later > earlier for earlier, later in zip(stamps, stamps[1:]))
    assert steps < 0.5 * (len(flood) - 1), f"{steps} steps over {stamps[-1] - stamps[0]} ms"
    assert h.worker.process.poll() is None, h.log()


def test_a_click_on_another_partition_than_its_session_s_is_dead_lettered(
    kafka_bootstrap: str, small_model: Path, tmp_path: Path
) -> None:
    """A producer that does not partition by murmur2 puts a live session's click on
    another partition. The idempotence guard compared its offset with the session's last
    one, from another partition, and dropped it silently (no answer, no dead letter);
    now it is dead-lettered as ``wrong_partition`` and counted, and the session goes on
    from its own partition's clicks."""
    names = StreamNames("wrongpart")
    ensure_topics(
        kafka_bootstrap, {t: PARTITIONS for t in (names.clicks, names.recommendations, names.dlq)}
    )
    recommender = load_model(small_model)
    ids = list(recommender.item_map.ids)
    home = [
        Sent(*encode_click(c), click=c) for c in (Click("s", ids[j], PAST + j) for j in range(5))
    ]
    port = free_port()
    worker = WorkerProcess(
        kafka_bootstrap,
        small_model,
        names,
        tmp_path,
        "--web-port",
        str(port),
        partitions=PARTITIONS,
    )
    h = Harness(
        kafka_bootstrap,
        names,
        worker,
        port,
        0,
        ids,
        topic_log(kafka_bootstrap, names.recommendations),
        topic_log(kafka_bootstrap, names.dlq),
        Counter(),
    )
    worker.start()
    try:
        h.wait_ready(timeout=90)
        produce(kafka_bootstrap, names.clicks, home, 1_000_000)
        assert h.outputs.wait_until(lambda ms: len(ms) >= len(home), timeout=45), h.log()
        partition = home[0].partition
        stray = (partition + 1) % PARTITIONS  # no click there yet: offset 0
        stray_click = Click("s", ids[7], PAST + 10)
        key, value = encode_click(stray_click)
        produce_raw(kafka_bootstrap, names.clicks, [(key, value)], partition=stray)
        after = [Sent(*encode_click(c), click=c) for c in [Click("s", ids[8], PAST + 20)]]
        produce(kafka_bootstrap, names.clicks, after, 1_000_000)
        assert h.dead_letters.wait_until(lambda ms: len(ms) >= 1, timeout=45), h.log()
        assert h.outputs.wait_until(lambda ms: len(ms) >= len(home) + 1, timeout=45), h.log()
        (dead,) = h.dead_letters.messages
        assert header(dead, "streamrec-reason") == b"wrong_partition"
        assert header(dead, "streamrec-source") == f"{names.clicks}/{stray}/0".encode()
        assert (dead.key(), dead.value()) == (key, value)
        assert h.rejected_counts() == {"wrong_partition": 1.0}
        answers = [json.loads(m.value()) for m in h.outputs.messages]
        assert {a["source"]["partition"] for a in answers} == {partition}
        # The session went on from its own partition: its answer after the stray click is
        # the one an uninterrupted run gives.
        assert [a["item_id"] for a in answers] == [ids[j] for j in range(5)] + [ids[8]]
        _, lists = click_by_click(recommender, [ids[j] for j in range(5)] + [ids[8]])
        assert [r["item_id"] for r in answers[-1]["recommendations"]] == [i for i, _ in lists[-1]]
        assert worker.process is not None and worker.process.poll() is None, h.log()
    finally:
        h.outputs.close()
        h.dead_letters.close()
        worker.stop()
