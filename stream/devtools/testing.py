"""The test suite's helpers, one set used by every test (and usable against any cluster):
producing clicks and raw records, reading topics, waiting on HTTP endpoints, kcat, the
tiny model's configuration, and the click-by-click reference that streamed answers are
compared with.

Every test gets its own app id and topic names, so the tests run unchanged against a
shared Kafka cluster (``STREAMREC_TEST_BROKER``).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from model.config import GRU4RecConfig
from model.data import ClickLog, ItemMap
from model.inference import Recommender
from model.network import GRU4RecNetwork
from model.rules import RECENT_ITEMS
from stream.devtools.ports import free_port
from stream.devtools.processes import (
    REPO,
    CommandProcess,
    Received,
    StreamNames,
    TopicReader,
    WorkerProcess,
)
from stream.kafka.config import client_config, producer_config
from stream.kafka.wire import Click, encode_click
from stream.serving.scoring import rebuild_states
from stream.serving.state import SessionState

DATA = REPO.parent / "shared" / "data" / "rsc15-100k"
#: The tiny model of the tests that need a model to run rather than a good one.
TINY = GRU4RecConfig(layers=(16,), n_sample=64, n_epochs=1, sample_store_size=8192)
__all__ = [
    "DATA",
    "PacedClicks",
    "REPO",
    "TINY",
    "StreamNames",
    "WorkerProcess",
    "answered_sources",
    "click_by_click",
    "clicks_in_time_order",
    "free_port",
    "http_get",
    "kcat",
    "produce_clicks",
    "produce_raw",
    "read_all",
    "read_topic",
    "wait_for_http",
]


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a GET; an HTTP error status is an answer, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for_http(
    url: str,
    accept: Callable[[int, str], bool],
    process: CommandProcess | None = None,
    timeout: float = 90.0,
) -> tuple[int, str]:
    """Poll ``url`` until ``accept(status, body)``; a server not listening yet is waited
    for. Fails with ``process``'s log if it exits or nothing acceptable comes in time."""
    deadline = time.monotonic() + timeout
    seen: tuple[int, str] = (0, "not polled")
    while True:
        if process is not None:
            process.check_alive()
        try:
            seen = http_get(url)
        except OSError as error:  # not listening yet
            seen = (0, str(error))
        if accept(*seen):
            return seen
        if time.monotonic() > deadline:
            log = process.log()[-3000:] if process is not None else ""
            raise AssertionError(
                f"{url}: nothing acceptable within {timeout:g} s; last {seen}\n{log}"
            )
        time.sleep(0.2)


def kcat(*args: str, stdin: str | bytes | None = None) -> str:
    """Run kcat (the independent Kafka client) and return its stdout; fails on error."""
    path = shutil.which("kcat")
    assert path, "kcat is not installed: `make system-deps` (or apt-get install kcat)"
    data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
    done = subprocess.run([path, *args], input=data, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    return done.stdout.decode("utf-8")


def click_by_click(
    recommender: Recommender, items: list[str], top_n: int = 20
) -> tuple[np.ndarray, list[list[tuple[str, float]]]]:
    """A session applied one click at a time from an empty state, in-process: its final
    hidden state and the top-N ``(item, score)`` list after each click. The uninterrupted
    run that streamed (batched, crashed, swapped) answers must equal."""
    versions = [recommender.version] * len(items)
    hidden, lists = served_state(
        {recommender.version: recommender}, items, versions, range(len(items)), top_n
    )
    return hidden, [lists[position] for position in range(len(items))]


def produce_clicks(bootstrap: str, topic: str, clicks: list[Click]) -> None:
    """Send clicks keyed by session (murmur2), in order, and wait for delivery."""
    produce_raw(bootstrap, topic, [encode_click(click) for click in clicks])


def produce_raw(
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes | None, bytes | None]],
    partition: int | None = None,
) -> None:
    """Send (key, value) records as given (on ``partition``, or by murmur2 of the key),
    in order, and wait for delivery: for bytes that are not clicks, or a wrong partition."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(bootstrap))
    unassigned = -1  # librdkafka's RD_KAFKA_PARTITION_UA: the partitioner chooses
    target = unassigned if partition is None else partition
    errors: list[object] = []

    def delivered(error: object, _: object) -> None:
        if error is not None:
            errors.append(error)

    for key, value in records:
        producer.produce(topic, key=key, value=value, partition=target, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(30) == 0, "records still in flight after 30 s"
    assert errors == []


class PacedClicks(threading.Thread):
    """Produces ``click(0)``, ``click(1)``, ... at ``per_s`` a second in the background,
    until ``count`` are sent or :meth:`stop`: a stream that faults can land in."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        click: Callable[[int], Click],
        per_s: float,
        count: int | None = None,
    ) -> None:
        from confluent_kafka import Producer

        super().__init__(daemon=True)
        self.topic, self.click, self.per_s, self.count = topic, click, per_s, count
        # Idempotent: a retry after a broker's death must not write a click twice.
        self.producer = Producer(producer_config(bootstrap, **{"enable.idempotence": True}))
        self.sent = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        try:
            while not self._stop_event.is_set() and self.sent != self.count:
                key, value = encode_click(self.click(self.sent))
                self.producer.produce(self.topic, key=key, value=value)
                self.producer.poll(0)
                self.sent += 1
                time.sleep(max(0.0, started + self.sent / self.per_s - time.monotonic()))
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self, timeout: float = 120.0) -> int:
        """Stop (or wait for the last of ``count``), deliver everything; the count sent."""
        if self.count is None:
            self._stop_event.set()
        self.join(timeout)
        assert not self.is_alive(), f"still producing after {timeout:g} s"
        assert self.error is None, self.error
        assert self.producer.flush(30) == 0
        return self.sent


def clicks_in_time_order(log: ClickLog) -> list[Click]:
    order = sorted(range(len(log)), key=lambda k: log.times[k])
    return [
        Click(
            str(log.session_ids[log.sessions[k]]),
            str(log.item_ids[log.items[k]]),
            float(log.times[k]),
        )
        for k in order
    ]


def read_topic(
    bootstrap: str,
    topic: str,
    until: Callable[[list[Any]], bool],
    timeout: float = 60.0,
    decode: bool = True,
) -> list[Any]:
    """Read a topic from the beginning until ``until(messages)`` holds or time runs out:
    the JSON values (``decode``) or the raw messages."""
    reader = TopicReader(bootstrap, topic, decode=decode)
    reader.start()
    try:
        reader.wait_until(lambda messages: until(_values(messages, decode)), timeout)
    finally:
        reader.close()
    return _values(reader.messages, decode)


def _values(messages: list[Any], decode: bool) -> list[Any]:
    return [m.value for m in messages] if decode else list(messages)


def answered_sources(answers: list[Received]) -> set[tuple[int, int]]:
    """The clicks (partition, offset) that these answers (a :class:`TopicReader`'s decoded
    messages) answer: with at-least-once output, a click answered twice counts once."""
    return {(r.value["source"]["partition"], r.value["source"]["offset"]) for r in answers}


def end_offsets(bootstrap: str, topic: str, timeout: float = 15.0) -> dict[int, int]:
    """Each partition's end offset, for the partitions holding messages.

    Retried while a new topic's leaders settle: even after ``ensure_topics`` saw a leader
    for every partition, a fresh client can briefly be told NOT_LEADER_FOR_PARTITION."""
    consumer = Consumer(client_config(bootstrap, **{"group.id": f"ends-{topic}"}))
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
                ends = {
                    p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in partitions
                }
                return {p: end for p, end in ends.items() if end > 0}
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        consumer.close()


def read_all(bootstrap: str, topic: str, timeout: float = 30.0) -> list[Any]:
    """Every message on ``topic`` now, up to each partition's end offset, by partition
    then offset; fails unless all were read (a reader that returned what it had when
    time ran out would let a test check less than it says)."""
    ends = end_offsets(bootstrap, topic)

    def upto_ends(messages: list[Any]) -> list[Any]:
        return [m for m in messages if m.offset() < ends.get(m.partition(), 0)]

    total = sum(ends.values())
    everything = read_topic(
        bootstrap, topic, lambda ms: len(upto_ends(ms)) >= total, timeout, decode=False
    )
    messages = upto_ends(everything)
    assert len(messages) == total, f"read {len(messages)} of {ends} on {topic}"
    return sorted(messages, key=lambda m: (m.partition(), m.offset()))


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset of each partition that has one."""
    admin = AdminClient(client_config(bootstrap))
    request = ConsumerGroupTopicPartitions(group)
    result = admin.list_consumer_group_offsets([request])[group].result(10)
    return {
        tp.partition: tp.offset
        for tp in result.topic_partitions
        if tp.topic == topic and tp.offset >= 0
    }


CLUSTERED_CONFIG = GRU4RecConfig(layers=(16,))


def clustered(n_items: int, seed: int = 0) -> Recommender:
    """A recommender whose item vectors form clusters, as trained embeddings do (random
    vectors have no structure for an index to find)."""
    generator = torch.Generator().manual_seed(seed)
    network = GRU4RecNetwork(CLUSTERED_CONFIG, n_items, generator=generator)
    centres = torch.randn(32, 16, generator=generator) * 2
    members = torch.randint(0, 32, (n_items,), generator=generator)
    with torch.no_grad():
        noise = torch.randn(n_items, 16, generator=generator)
        network.item_output.copy_(centres[members] + 0.3 * noise)
        network.item_bias.copy_(0.1 * torch.randn(n_items, 1, generator=generator))
    ids = ItemMap(str(i) for i in range(n_items))
    return Recommender(network, ids, np.ones(n_items), CLUSTERED_CONFIG)


def states_of(recommender: Recommender, n: int, seed: int = 1) -> torch.Tensor:
    """Session states whose outputs point at the item clusters."""
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(0, recommender.n_items, (n,), generator=generator)
    return recommender.step(recommender.initial_states(n), items)


STATE_TOLERANCE = 1e-5  # the bar for a recovered state
TIE = 1e-6  # scores this close may come in either order
SCORE_ROUNDING = 1e-6  # output scores carry six decimals


def uninterrupted(
    recommender: Recommender, items: list[str], top_n: int
) -> tuple[np.ndarray, list[tuple[str, float]]]:
    """Final hidden state and last top-N of a session, applied one click at a time."""
    hidden, lists = click_by_click(recommender, items, top_n)
    return hidden, lists[-1]


def served_state(
    models: Mapping[str, Recommender],
    items: Sequence[str],
    versions: Sequence[str],
    ranked_at: Collection[int] = (),
    top_n: int = 20,
) -> tuple[np.ndarray, dict[int, list[tuple[str, float]]]]:
    """A session's final hidden state, each click applied one at a time by the model
    version that answered it, as a worker applies them: a state computed by another
    version is first rebuilt from the session's last RECENT_ITEMS items under the new one.
    Also the top-N ``(item, score)`` list after each click at a position of ``ranked_at``."""
    hidden: torch.Tensor | None = None
    started = torch.zeros(1, dtype=torch.bool)
    computed_by: str | None = None
    recent: list[str] = []
    lists: dict[int, list[tuple[str, float]]] = {}
    for position, (item, version) in enumerate(zip(items, versions, strict=True)):
        model = models[version]
        if version != computed_by or hidden is None:
            hidden, started = rebuild_states(model, [recent])
            computed_by = version
        index = torch.tensor([model.item_map.index_of(item)])
        hidden = model.step(hidden, index)
        started = started | (index >= 0)
        recent = [*recent, item][-RECENT_ITEMS:]
        if position in ranked_at:
            top, scores = model.top_k(hidden, started, top_n)
            lists[position] = [
                (model.item_map.ids[i], float(v))
                for i, v in zip(top[0].tolist(), scores[0].tolist())
            ]
    assert hidden is not None, "a session without clicks"
    return hidden[0].cpu().numpy(), lists


def same_up_to_ties(published: list[tuple[str, float]], expected: list[tuple[str, float]]) -> bool:
    """Equal lists, except that items whose expected scores tie may swap places."""
    if len(published) != len(expected):
        return False
    for (item, score), (want_item, want_score) in zip(published, expected):
        if abs(score - want_score) > SCORE_ROUNDING + TIE:
            return False
        if item != want_item and not any(
            abs(s - want_score) <= TIE for i, s in expected if i == item
        ):
            return False
    return True


def final_states(bootstrap: str, topic: str) -> dict[str, SessionState]:
    """The last changelog record of each session (what a restarted worker recovers)."""
    latest = {m.key().decode(): m.value() for m in read_all(bootstrap, topic)}
    return {key: SessionState.decode(value) for key, value in latest.items() if value is not None}
