"""Helpers for the streaming integration tests: producing clicks, reading topics, and the
click-by-click reference that streamed answers are compared with.

Every test gets its own app id and topic names, so the tests run unchanged against a
shared Kafka cluster (``STREAMREC_TEST_BROKER``).
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from model.data import ClickLog
from model.inference import Recommender
from stream.devtools.processes import REPO, StreamNames, WorkerProcess
from stream.kafka.config import client_config, producer_config
from stream.kafka.wire import Click, encode_click

DATA = REPO.parent / "shared" / "data" / "rsc15-100k"
__all__ = [
    "DATA",
    "REPO",
    "StreamNames",
    "WorkerProcess",
    "click_by_click",
    "clicks_in_time_order",
    "free_port",
    "http_get",
    "produce_clicks",
    "read_topic",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a GET; an HTTP error status is an answer, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def click_by_click(
    recommender: Recommender, items: list[str], top_n: int = 20
) -> tuple[np.ndarray, list[list[tuple[str, float]]]]:
    """A session applied one click at a time from an empty state, in-process: its final
    hidden state and the top-N ``(item, score)`` list after each click. The uninterrupted
    run that streamed (batched, crashed, swapped) answers must equal."""
    state = recommender.initial_states(1)
    started = torch.zeros(1, dtype=torch.bool)
    lists = []
    for item in items:
        index = torch.tensor([recommender.item_map.index_of(item)])
        state = recommender.step(state, index)
        started |= index >= 0
        top, scores = recommender.top_k(state, started, top_n)
        lists.append(
            [
                (recommender.item_map.ids[i], float(s))
                for i, s in zip(top[0].tolist(), scores[0].tolist())
            ]
        )
    return state[0].cpu().numpy(), lists


def produce_clicks(bootstrap: str, topic: str, clicks: list[Click]) -> None:
    """Send clicks keyed by session (murmur2), in order, and wait for delivery."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(bootstrap))
    for click in clicks:
        key, value = encode_click(click)
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    assert producer.flush(30) == 0


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
    """Read a topic from the beginning until ``until(messages)`` holds or time runs out."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    metadata = consumer.list_topics(topic, timeout=10)
    partitions = metadata.topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    messages: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(messages):
            for message in consumer.consume(500, timeout=0.5):
                if message.error():
                    continue
                messages.append(json.loads(message.value()) if decode else message)
    finally:
        consumer.close()
    return messages


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Each partition's end offset, for the partitions holding messages."""
    consumer = Consumer(client_config(bootstrap, **{"group.id": f"ends-{topic}"}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
    finally:
        consumer.close()
    return {p: end for p, end in ends.items() if end > 0}


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
