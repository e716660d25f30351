"""`streamrec replay` and the shared Kafka client settings, against a real broker.

What is checked end to end: every row arrives exactly once with the wire format of
stream/events.py, a session's clicks share one partition and it is the partition kcat (an
independent librdkafka client) picks with murmur2 for the same key, and clicks leave in
event-time order. The CLI is driven through its own ``add_parser`` on a fresh parser (and a
``python -c`` wrapper where a real Ctrl-C is needed), so these tests do not depend on
stream/cli.py registering the subcommand.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.data import read_clicks
from model.errors import UserError
from stream.cli import replay as replay_cli
from stream.devtools.testing import end_offsets, free_port, kcat, read_all
from stream.kafka import log_sender as replay_mod
from stream.kafka.config import (
    SECURITY_ENV,
    bootstrap_servers,
    client_config,
    producer_config,
)
from stream.kafka.log_sender import (
    ReplayInterrupted,
    check_topic,
    parse_speed,
    read_replay_log,
    replay,
)
from stream.kafka.topics import ensure_topics
from stream.kafka.wire import Click, encode_click

REPO = Path(__file__).resolve().parent.parent

# Three sessions interleaved in time over 2.1 s. murmur2 puts them on partitions 0, 2 and 1
# of 4 (aiokafka's and Java's hash), so co-partitioning is tested across partitions; one id
# is non-ASCII to check that keys are raw UTF-8. Ties: 669.5 occurs in all three sessions
# (sessions then go in order of first appearance), and séance-1 has two clicks at 670.0
# (file order).
LOG_TSV = """SessionId\tItemId\tTime
sess-a\ti1\t1396860669.0
sess-a\ti2\t1396860669.5
sess-a\ti3\t1396860670.25
sess-b\ti2\t1396860669.25
sess-b\ti4\t1396860669.5
sess-b\ti1\t1396860671.0
séance-1\ti5\t1396860668.9
séance-1\ti3\t1396860669.5
séance-1\ti6\t1396860670.0
séance-1\ti7\t1396860670.0
"""
# The replay order of LOG_TSV: by time, then session by first appearance, then file order.
EXPECTED_ORDER = [
    Click("séance-1", "i5", 1396860668.9),
    Click("sess-a", "i1", 1396860669.0),
    Click("sess-b", "i2", 1396860669.25),
    Click("sess-a", "i2", 1396860669.5),
    Click("sess-b", "i4", 1396860669.5),
    Click("séance-1", "i3", 1396860669.5),
    Click("séance-1", "i6", 1396860670.0),
    Click("séance-1", "i7", 1396860670.0),
    Click("sess-a", "i3", 1396860670.25),
    Click("sess-b", "i1", 1396860671.0),
]

# Lines 4 and 7 are bad (empty item id; a time that is not a number).
BAD_ROWS_TSV = """SessionId\tItemId\tTime
s1\ti1\t100.0
s1\ti2\t101.0
s2\t\t102.0
s2\ti3\t103.0
s3\ti4\t104.0
s3\ti5\tsoon
s3\ti6\t106.0
"""

# Run the CLI in a child process exactly as stream/cli/main.py's main() would.
CLI_WRAPPER = """
import argparse, sys
from model.errors import UserError
from stream.cli import replay
parser = argparse.ArgumentParser(prog="streamrec")
replay.add_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(int(args.run(args) or 0))
except UserError as exc:
    print(f"streamrec {args.command}: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def _write(tmp_path: Path, text: str, name: str = "clicks.tsv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _run_cli(*argv: str) -> int:
    """``streamrec replay ARGV`` in-process, with cli.main's UserError handling."""
    parser = argparse.ArgumentParser(prog="streamrec")
    replay_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["replay", *argv])
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"streamrec replay: error: {exc}", file=sys.stderr)
        return 2


def _last_json(stdout: str) -> dict[str, object]:
    return json.loads(stdout.strip().splitlines()[-1])


def _consume_all(bootstrap: str, topic: str) -> list[tuple[int, int, bytes, bytes]]:
    """Every message on ``topic`` as (partition, offset, key, value), per partition in order."""
    return [(m.partition(), m.offset(), m.key(), m.value()) for m in read_all(bootstrap, topic)]


def _kcat_partitions(bootstrap: str, topic: str, keys: list[str]) -> dict[str, int]:
    """The partition kcat's own producer picks for each key with murmur2_random."""
    lines = "".join(f"{key}|x\n" for key in keys).encode("utf-8")
    kcat(
        "-b",
        bootstrap,
        "-P",
        "-t",
        topic,
        "-K",
        "|",
        "-X",
        "partitioner=murmur2_random",
        stdin=lines,
    )
    out = kcat(
        "-b",
        bootstrap,
        "-C",
        "-t",
        topic,
        "-o",
        "beginning",
        "-e",
        "-q",
        "-c",
        str(len(keys)),
        "-f",
        "%k\t%p\n",
    )
    return {key: int(p) for key, p in (line.split("\t") for line in out.splitlines())}


# --- kafka_config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("localhost:9092", "localhost:9092"),
        ("kafka://localhost:9092", "localhost:9092"),
        ("KAFKA://broker-1.example.com:9093/", "broker-1.example.com:9093"),
        ("127.0.0.1:19092", "127.0.0.1:19092"),
        ("[::1]:9092", "[::1]:9092"),
        ("kafka://a:1,kafka://b:2", "a:1,b:2"),
        (" a:1 , b:2 ", "a:1,b:2"),
        ("kafka://a:1;b:2", "a:1,b:2"),  # Faust's separator
    ],
)
def test_bootstrap_servers_accepts(url: str, expected: str) -> None:
    assert bootstrap_servers(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        " ",
        "localhost",
        "kafka://localhost",
        "http://localhost:9092",
        "confluent://localhost:9092",
        "localhost:0",
        "localhost:65536",
        "localhost:port",
        ":9092",
        "kafka://",
        "a:1,,b:2",
        "a:1,",
        "local host:9092",
        "h:9092/topic",
    ],
)
def test_bootstrap_servers_rejects(url: str) -> None:
    with pytest.raises(UserError, match="^bad broker URL"):
        bootstrap_servers(url)


def test_producer_config_passes_security_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = {
        "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STREAMREC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "STREAMREC_KAFKA_SASL_USERNAME": "replayer",
        "STREAMREC_KAFKA_SASL_PASSWORD": "s3cret",
        "STREAMREC_KAFKA_SSL_CAFILE": "/etc/ca.pem",
        "STREAMREC_KAFKA_SSL_CERTFILE": "/etc/client.pem",
        "STREAMREC_KAFKA_SSL_KEYFILE": "/etc/client.key",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    config = producer_config("kafka://k1:9093,k2:9093", **{"linger.ms": 7})
    assert config == {
        "bootstrap.servers": "k1:9093,k2:9093",
        "partitioner": "murmur2_random",
        "acks": "all",
        "linger.ms": 7,
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "replayer",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ca.pem",
        "ssl.certificate.location": "/etc/client.pem",
        "ssl.key.location": "/etc/client.key",
    }
    assert set(SECURITY_ENV) == set(values)
    assert client_config("k1:9093")["sasl.username"] == "replayer"
    assert "partitioner" not in client_config("k1:9093")


def test_producer_config_has_no_security_settings_when_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in SECURITY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STREAMREC_KAFKA_SASL_MECHANISM", "")  # empty counts as unset
    assert producer_config("h:9092") == {
        "bootstrap.servers": "h:9092",
        "partitioner": "murmur2_random",
        "acks": "all",
    }


# --- reading and ordering (no broker) ---------------------------------------------------------


def test_replay_order_is_event_time_order_and_stable(tmp_path: Path) -> None:
    path = _write(tmp_path, LOG_TSV)
    log = read_replay_log(path)
    assert list(log.clicks()) == EXPECTED_ORDER
    assert list(log.clicks(3)) == EXPECTED_ORDER[:3]
    assert log.bad_rows == 0
    # The same order from the trainer's reader, and from in-memory clicks in any order.
    assert list(replay_mod.as_replay_log(read_clicks(path)).clicks()) == EXPECTED_ORDER
    by_session = sorted(
        EXPECTED_ORDER, key=lambda c: ["sess-a", "sess-b", "séance-1"].index(c.session_id)
    )
    assert list(replay_mod.as_replay_log(by_session).clicks()) == EXPECTED_ORDER


def test_bad_rows_are_counted_and_located(tmp_path: Path) -> None:
    log = read_replay_log(_write(tmp_path, BAD_ROWS_TSV + "\ns4\tNA\t-1\ns5\ti9\tinf\ns6\ti9\n"))
    assert log.bad_rows == 6
    assert [str(bad) for bad in log.bad_row_examples] == [
        "line 4: ItemId is empty",
        "line 7: Time 'soon' is not a finite number",
        "line 9: blank line or no fields",
        "line 10: Time '-1' is negative (times are Unix seconds)",
        "line 11: Time 'inf' is not a finite number",
        "line 12: Time is empty",
    ]
    assert [c.item_id for c in log.clicks()] == ["i1", "i2", "i3", "i4", "i6"]


def test_missing_file_and_column_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        read_replay_log(tmp_path / "nope.tsv")
    with pytest.raises(UserError, match="missing column.*Time"):
        read_replay_log(_write(tmp_path, "SessionId\tItemId\tWhen\ns\ti\t1\n"))


@pytest.mark.parametrize(
    ("text", "factor"), [("max", None), ("MAX", None), ("2", 2.0), ("0.5", 0.5), (100, 100.0)]
)
def test_parse_speed(text: str | int, factor: float | None) -> None:
    assert parse_speed(text) == factor


@pytest.mark.parametrize("text", ["0", "-1", "fast", "nan", "inf", ""])
def test_parse_speed_rejects(text: str) -> None:
    with pytest.raises(UserError, match="bad speed"):
        parse_speed(text)


# --- against Kafka ------------------------------------------------------------------------------


@pytest.mark.kafka
def test_replay_round_trip_co_partitioned_with_kcat(
    kafka_bootstrap: str, topic_name: str, tmp_path: Path
) -> None:
    kcat_topic = f"{topic_name}-kcat"
    ensure_topics(kafka_bootstrap, {topic_name: 4, kcat_topic: 4})
    stats = replay(_write(tmp_path, LOG_TSV), f"kafka://{kafka_bootstrap}", topic_name)
    assert (stats.events_sent, stats.bad_rows, stats.delivery_errors) == (10, 0, 0)
    assert (stats.topic, stats.partitions) == (topic_name, 4)

    messages = _consume_all(kafka_bootstrap, topic_name)
    # Exactly once each, with the wire format of stream/events.py.
    assert sorted((k, v) for _, _, k, v in messages) == sorted(map(encode_click, EXPECTED_ORDER))
    for _, _, key, value in messages:
        data = json.loads(value)
        assert key == data["session_id"].encode("utf-8")
        assert set(data) == {"session_id", "item_id", "timestamp"}
    # One partition per session, the one kcat's murmur2_random picks for the same key.
    partition_of: dict[str, set[int]] = {}
    for partition, _, key, _ in messages:
        partition_of.setdefault(key.decode("utf-8"), set()).add(partition)
    assert all(len(p) == 1 for p in partition_of.values()), partition_of
    by_kcat = _kcat_partitions(kafka_bootstrap, kcat_topic, sorted(partition_of))
    assert {s: p.pop() for s, p in partition_of.items()} == by_kcat
    assert len(set(by_kcat.values())) == 3  # the test really spans several partitions
    # Within a partition, offsets follow event time (and the stable tie order).
    for partition in set(by_kcat.values()):
        on_partition = [Click(**json.loads(v)) for p, _, _, v in messages if p == partition]
        assert on_partition == [c for c in EXPECTED_ORDER if by_kcat[c.session_id] == partition]


@pytest.mark.kafka
def test_send_order_is_global_event_time_order(
    kafka_bootstrap: str, topic_name: str, tmp_path: Path
) -> None:
    """On a single partition the log shows the send order itself: it must be time order."""
    ensure_topics(kafka_bootstrap, {topic_name: 1})
    log = read_clicks(_write(tmp_path, LOG_TSV))  # a ClickLog works as a source too
    assert replay(log, kafka_bootstrap, topic_name).events_sent == 10
    sent = [Click(**json.loads(v)) for _, _, _, v in _consume_all(kafka_bootstrap, topic_name)]
    assert sent == EXPECTED_ORDER


@pytest.mark.kafka
def test_cli_skips_and_reports_bad_rows(
    kafka_bootstrap: str, topic_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ensure_topics(kafka_bootstrap, {topic_name: 4})
    path = _write(tmp_path, BAD_ROWS_TSV)
    assert _run_cli("--data", str(path), "--broker", kafka_bootstrap, "--topic", topic_name) == 0
    out, err = capsys.readouterr()
    result = _last_json(out)
    assert result["bad_rows"] == 2 and result["events_sent"] == 5
    assert result["topic"] == topic_name and result["delivery_errors"] == 0
    assert set(result) >= {"events_sent", "seconds", "events_per_s", "bad_rows", "topic"}
    assert "line 4: ItemId is empty" in err and "line 7: Time 'soon'" in err
    items = sorted(
        json.loads(v)["item_id"] for _, _, _, v in _consume_all(kafka_bootstrap, topic_name)
    )
    assert items == ["i1", "i2", "i3", "i4", "i6"]


@pytest.mark.kafka
def test_speed_factor_paces_the_replay(
    kafka_bootstrap: str, topic_name: str, tmp_path: Path
) -> None:
    ensure_topics(kafka_bootstrap, {topic_name: 4})
    # 2.1 s of event time at 100x: the last event is due 21 ms after the first.
    stats = replay(_write(tmp_path, LOG_TSV), kafka_bootstrap, topic_name, speed=100)
    assert stats.events_sent == 10
    assert stats.seconds >= 0.015


@pytest.mark.kafka
def test_limit_sends_exactly_n(
    kafka_bootstrap: str, topic_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ensure_topics(kafka_bootstrap, {topic_name: 4})
    assert (
        _run_cli(
            "--data",
            str(_write(tmp_path, LOG_TSV)),
            "--broker",
            kafka_bootstrap,
            "--topic",
            topic_name,
            "--limit",
            "4",
            "--speed",
            "1000",
            "--quiet",
        )
        == 0
    )
    assert _last_json(capsys.readouterr().out)["events_sent"] == 4
    got = sorted(v for _, _, _, v in _consume_all(kafka_bootstrap, topic_name))
    assert got == sorted(encode_click(c)[1] for c in EXPECTED_ORDER[:4])


@pytest.mark.kafka
def test_missing_topic_is_a_quick_user_error(
    kafka_bootstrap: str, topic_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    assert (
        _run_cli(
            "--data",
            str(_write(tmp_path, LOG_TSV)),
            "--broker",
            kafka_bootstrap,
            "--topic",
            topic_name,
        )
        == 2
    )
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert f"topic {topic_name!r} does not exist" in err
    assert len(err.strip().splitlines()) == 1


def test_unreachable_broker_is_a_user_error(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(UserError, match="cannot reach a Kafka broker at 127.0.0.1:"):
        check_topic(f"127.0.0.1:{free_port()}", "clicks", timeout=1.0)
    assert time.monotonic() - started < 5


@pytest.mark.kafka
def test_delivery_errors_make_the_cli_fail(
    kafka_bootstrap: str, topic_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The broker rejects every batch: no click fits in 10 bytes.
    ensure_topics(
        kafka_bootstrap, {topic_name: 1}, configs={topic_name: {"max.message.bytes": "10"}}
    )
    assert (
        _run_cli(
            "--data",
            str(_write(tmp_path, LOG_TSV)),
            "--broker",
            kafka_bootstrap,
            "--topic",
            topic_name,
            "--quiet",
        )
        == 2
    )
    out, err = capsys.readouterr()
    result = _last_json(out)
    assert result["events_sent"] == 0 and result["delivery_errors"] >= 1
    assert "were not delivered" in err.strip().splitlines()[-1]


@pytest.mark.kafka
def test_ctrl_c_flushes_and_reports_what_was_sent(
    kafka_bootstrap: str, topic_name: str, tmp_path: Path
) -> None:
    ensure_topics(kafka_bootstrap, {topic_name: 4})
    # Five clicks at once, then one 100 s later: at real time the replay sits waiting.
    rows = "".join(f"s{i}\ti{i}\t1000.0\n" for i in range(5)) + "s9\ti9\t1100.0\n"
    path = _write(tmp_path, "SessionId\tItemId\tTime\n" + rows)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLI_WRAPPER,
            "replay",
            "--data",
            str(path),
            "--broker",
            kafka_bootstrap,
            "--topic",
            topic_name,
            "--speed",
            "1",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while sum(end_offsets(kafka_bootstrap, topic_name).values()) < 5:
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the first clicks never arrived"
            time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, err
    assert _last_json(out)["events_sent"] == 5
    assert "interrupted" in err
    assert sum(end_offsets(kafka_bootstrap, topic_name).values()) == 5


def test_replay_interrupted_is_a_keyboard_interrupt() -> None:
    stats = replay_mod.ReplayStats(topic="t", partitions=1, events_sent=3, seconds=1.0, bad_rows=0)
    assert isinstance(ReplayInterrupted(stats), KeyboardInterrupt)
    assert ReplayInterrupted(stats).stats.as_json()["events_sent"] == 3
