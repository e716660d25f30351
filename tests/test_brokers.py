"""The local brokers and topic management, against real brokers and an independent client.

kcat (librdkafka's CLI, a different program from our Python clients) checks that what we
produce is really on the broker and vice versa; Java and Maven are replaced by small fake
executables only where the test is about their absence or failure.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from model.errors import UserError
from stream.cli import broker as broker_cli
from stream.devtools import brokers
from stream.devtools.brokers import LocalKafka, Tansu, fetch_kafka_jars, find_java
from stream.devtools.ports import ephemeral_ports, port_candidates
from stream.devtools.testing import free_port, kcat, produce_raw, read_topic
from stream.kafka.topics import check_replication, check_topics, ensure_topics

REPO = Path(__file__).resolve().parent.parent


def _tansu_missing() -> str | None:
    try:
        brokers.tansu_binary()
    except UserError as exc:
        return str(exc)
    return None


_TANSU_MISSING = _tansu_missing()
needs_tansu = pytest.mark.skipif(
    _TANSU_MISSING is not None, reason=f"Tansu broker binary not available: {_TANSU_MISSING}"
)


def _produce(bootstrap: str, topic: str, *pairs: tuple[bytes, bytes]) -> None:
    produce_raw(bootstrap, topic, list(pairs), partition=0)


def _read(
    bootstrap: str, topic: str, count: int, timeout: float = 15
) -> list[tuple[bytes | None, bytes | None]]:
    """The first ``count`` messages of the (one-partition) topic."""
    messages = read_topic(bootstrap, topic, lambda ms: len(ms) >= count, timeout, decode=False)
    return [(m.key(), m.value()) for m in messages[:count]]


def _refuses_connections(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


@pytest.mark.kafka
def test_kafka_round_trip_withkcat(kafka_bootstrap: str, topic_name: str) -> None:
    ensure_topics(kafka_bootstrap, {topic_name: 1})

    _produce(kafka_bootstrap, topic_name, (b"s1", b"from confluent"))
    out = kcat(
        "-b",
        kafka_bootstrap,
        "-C",
        "-t",
        topic_name,
        "-o",
        "beginning",
        "-e",
        "-q",
        "-f",
        "%k=%s\n",
    )
    assert out.splitlines() == ["s1=from confluent"]

    kcat(
        "-b", kafka_bootstrap, "-P", "-t", topic_name, "-p", "0", "-K", ":", stdin="s2:from kcat\n"
    )
    assert _read(kafka_bootstrap, topic_name, 2) == [
        (b"s1", b"from confluent"),
        (b"s2", b"from kcat"),
    ]


@pytest.mark.kafka
def test_ensure_topics_creates_with_configs_and_rejects_other_counts(
    kafka_bootstrap: str, topic_name: str
) -> None:
    compacted = f"{topic_name}-c"
    wanted = {topic_name: 3, compacted: 2}
    ensure_topics(kafka_bootstrap, wanted, configs={compacted: {"cleanup.policy": "compact"}})

    metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    assert {t: len(metadata.topics[t].partitions) for t in wanted} == wanted
    resource = ConfigResource("topic", compacted)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    described = admin.describe_configs([resource])[resource].result(timeout=10)
    assert described["cleanup.policy"].value == "compact"

    ensure_topics(kafka_bootstrap, wanted)  # idempotent
    check_topics(kafka_bootstrap, wanted)

    with pytest.raises(UserError) as err:
        ensure_topics(kafka_bootstrap, {topic_name: 5})
    message = str(err.value)
    assert "\n" not in message
    assert re.search(rf"'{topic_name}' has 3 partitions but 5 are required", message)
    with pytest.raises(UserError, match=rf"'{compacted}' has 2 partitions but 4"):
        check_topics(kafka_bootstrap, {compacted: 4})


@pytest.mark.kafka
def test_ensure_topics_from_racing_callers(kafka_bootstrap: str, topic_name: str) -> None:
    """Two processes starting at once both create the same topics; both must succeed."""
    failures: list[BaseException] = []

    def create() -> None:
        try:
            ensure_topics(kafka_bootstrap, {topic_name: 2})
        except BaseException as exc:  # reported below with the assertion
            failures.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    check_topics(kafka_bootstrap, {topic_name: 2})


@pytest.mark.kafka
def test_check_topics_reports_missing_topic_quickly(kafka_bootstrap: str, topic_name: str) -> None:
    ensure_topics(kafka_bootstrap, {topic_name: 1})
    started = time.monotonic()
    with pytest.raises(UserError, match=rf"missing topic\(s\) on .*: '{topic_name}-nope'$"):
        check_topics(kafka_bootstrap, {topic_name: 1, f"{topic_name}-nope": 1}, timeout=30)
    assert time.monotonic() - started < 5


@pytest.mark.kafka
def test_check_replication_waits_for_a_topic_then_names_it(
    kafka_bootstrap: str, topic_name: str
) -> None:
    """A topic just created can be missing from another broker's metadata for a moment
    (seen: a worker started under load died with a KeyError): it is waited for, and one
    that never shows is named."""
    ensure_topics(kafka_bootstrap, {topic_name: 2})
    check_replication(kafka_bootstrap, topic_name, minimum=1, timeout=5)
    started = time.monotonic()
    missing = f"{topic_name}-nope"
    expected = rf"topic '{missing}' is not on {kafka_bootstrap} after 2 s"
    with pytest.raises(UserError, match=expected):
        check_replication(kafka_bootstrap, missing, minimum=1, timeout=2)
    assert 2 <= time.monotonic() - started < 10


def test_check_topics_unreachable_broker_is_a_user_error_not_a_hang() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(UserError, match=rf"cannot reach a Kafka broker at {bootstrap} within 2 s"):
        check_topics(bootstrap, {"clicks": 4}, timeout=2)
    assert time.monotonic() - started < 10


def test_partition_count_below_one_is_rejected() -> None:
    with pytest.raises(UserError, match="at least 1"):
        ensure_topics("127.0.0.1:1", {"clicks": 0})


@pytest.mark.kafka
def test_log_survives_stop_kill_and_restart(tmp_path: Path, topic_name: str) -> None:
    data = tmp_path / "kafka"
    with LocalKafka(data_dir=data) as first:
        ensure_topics(first.bootstrap, {topic_name: 1})
        _produce(first.bootstrap, topic_name, (b"k", b"before stop"))
    assert (data / "logs" / "meta.properties").is_file()  # kept after a clean stop
    assert _refuses_connections(first.bootstrap)

    second = LocalKafka(data_dir=data)  # a new broker on the same log, e.g. a new CLI run
    second.start()
    try:
        assert _read(second.bootstrap, topic_name, 1) == [(b"k", b"before stop")]
        _produce(second.bootstrap, topic_name, (b"k", b"before kill"))
        bootstrap = second.bootstrap
        second.kill()
        assert not second.running and _refuses_connections(bootstrap)

        second.start()  # recovers from the unclean shutdown, on the same address
        assert second.bootstrap == bootstrap
        assert _read(bootstrap, topic_name, 2) == [(b"k", b"before stop"), (b"k", b"before kill")]
    finally:
        second.stop()


@needs_tansu
def test_temporary_data_dir_is_removed_by_stop() -> None:
    with Tansu() as broker:  # same code path as LocalKafka, without a JVM start
        data_dir = broker.data_dir
        assert broker.log_path.is_file()
    assert not data_dir.exists()


@needs_tansu
def test_tansu_round_trip(topic_name: str) -> None:
    with Tansu() as broker:
        ensure_topics(broker.bootstrap, {topic_name: 2})
        _produce(broker.bootstrap, topic_name, (b"s1", b"hello tansu"))
        assert _read(broker.bootstrap, topic_name, 1) == [(b"s1", b"hello tansu")]
        bootstrap = broker.bootstrap
    assert _refuses_connections(bootstrap)


@needs_tansu
def test_broker_does_not_outlive_a_killed_owner() -> None:
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom stream.devtools.brokers import Tansu\n"
            "broker = Tansu()\nbroker.start()\n"
            "print(broker.bootstrap, broker.data_dir, flush=True)\n"
            "time.sleep(300)\n",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        bootstrap, data_dir = _readline_within(owner, 30).split()
        assert not _refuses_connections(bootstrap)
    finally:
        owner.kill()  # no cleanup code of the owner runs
        owner.wait()
    deadline = time.monotonic() + 15
    while not _refuses_connections(bootstrap) or Path(data_dir).exists():
        assert time.monotonic() < deadline, "the broker or its data outlived its killed owner"
        time.sleep(0.1)


def test_free_ports_lie_outside_the_ephemeral_range_and_differ() -> None:
    """A port in the kernel's ephemeral range can become a client connection's source
    port between the probe and the worker's bind (seen with two test processes: a
    worker's metrics port refused connections)."""
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert not set(ports) & set(ephemeral_ports())
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", ports[-1]))


def test_free_ports_avoid_any_ephemeral_range_and_exist_under_every_one() -> None:
    """Where free ports are looked for, whatever range the kernel hands to clients: below
    it, above it when that is larger, and, when it covers every port, the whole range (a
    choice, not an import error: with ``1024 65535``, common in containers, the module
    failed to import and the demo with it)."""
    assert port_candidates(range(32768, 61000)) == range(10000, 32768)
    assert port_candidates(range(10500, 60000)) == range(60000, 65536)
    assert port_candidates(range(1024, 65536)) == range(10000, 65536)


@needs_tansu
def test_requested_port_in_use_is_refused_before_starting() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        broker = Tansu(port=port)
        with pytest.raises(UserError, match=rf"port {port} on 127.0.0.1 is in use"):
            broker.start()
        assert not broker.running


@needs_tansu
def test_broker_dying_during_startup_raises_with_its_log(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real binary with a flag it rejects: it exits before it ever answers.
    monkeypatch.setattr(
        Tansu,
        "_command",
        lambda self: ([str(brokers.tansu_binary()), "broker", "--no-such-flag"], dict(os.environ)),
    )
    broker = Tansu()
    started = time.monotonic()
    with pytest.raises(UserError, match=r"(?s)exited with status \d+ while starting.*no-such-flag"):
        broker.start()
    assert time.monotonic() - started < 10
    assert not broker.running


def _fake_executable(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(script))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_missing_java_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match=r"`java` not found.*Java 17 or newer"):
        LocalKafka(data_dir=tmp_path / "data").start()


def test_old_java_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_executable(tmp_path, "java", "echo 'openjdk version \"11.0.21\" 2023-10-17' >&2\n")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match=r"is Java 11; Apache Kafka .* needs Java 17 or newer"):
        find_java()


def test_missing_maven_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(UserError, match=r"`mvn` not found.*apt-get install maven"):
        fetch_kafka_jars(tmp_path / "cache")


def test_concurrent_jar_fetches_run_maven_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "mvn-calls"
    # A stand-in for Maven that is slow enough for the callers to overlap.
    _fake_executable(
        bin_dir,
        "mvn",
        f"""\
        for arg; do
          case "$arg" in -DoutputDirectory=*) out="${{arg#-DoutputDirectory=}}";; esac
        done
        echo call >> {calls}
        sleep 1
        echo jar > "$out/kafka_2.13-test.jar"
    """,
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch_kafka_jars(tmp_path / "cache")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(set(results)) == 1 and len(results) == 3
    jars = results[0]
    assert calls.read_text().splitlines() == ["call"]
    assert (jars / "kafka_2.13-test.jar").read_text() == "jar\n"
    assert [p.name for p in jars.parent.iterdir() if p.name.startswith("jars.")] == []  # no staging
    assert fetch_kafka_jars(tmp_path / "cache") == jars
    assert calls.read_text().splitlines() == ["call"]


def test_failed_maven_fetch_reports_output_and_leaves_no_jars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_executable(bin_dir, "mvn", "echo '[ERROR] Could not resolve dependencies'; exit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    with pytest.raises(UserError, match=r"(?s)exit status 1.*Could not resolve dependencies"):
        fetch_kafka_jars(tmp_path / "cache")
    version_dir = tmp_path / "cache" / "kafka" / brokers.kafka_version()
    assert sorted(p.name for p in version_dir.iterdir()) == [".lock"]


def test_cluster_ids_never_look_like_options(monkeypatch: pytest.MonkeyPatch) -> None:
    dash_first = uuid.UUID(bytes=b"\xf8" + bytes(15))  # encodes to "-AAAA..."
    ordinary = uuid.UUID(bytes=bytes(range(16)))
    draws = iter([dash_first, ordinary])
    monkeypatch.setattr(brokers.uuid, "uuid4", lambda: next(draws))
    assert brokers.new_cluster_id() == "AAECAwQFBgcICQoLDA0ODw"


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STREAMREC_CACHE_DIR", str(tmp_path))
    assert brokers.cache_root() == tmp_path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrec")
    broker_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_broker_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream.cli.main", "broker", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    help_text = done.stdout
    assert help_text.startswith("usage: streamrec broker")
    for expected in ("--engine {kafka,tansu}", "--port", "--data-dir", "Java 17", "Ctrl-C"):
        assert expected in help_text
    args = _parser().parse_args(["broker"])
    assert (args.engine, args.port, args.data_dir, args.run) == (
        "kafka",
        9092,
        None,
        broker_cli.run,
    )


def test_tansu_with_data_dir_is_refused(tmp_path: Path) -> None:
    args = _parser().parse_args(["broker", "--engine", "tansu", "--data-dir", str(tmp_path)])
    with pytest.raises(UserError, match="--data-dir needs --engine kafka"):
        args.run(args)


# The CLI exactly as a user runs it, through add_parser and run() in a child process.
_CLI = (
    "import argparse, sys\n"
    "from stream.cli import broker\n"
    "parser = argparse.ArgumentParser(prog='streamrec')\n"
    "broker.add_parser(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.run(args))\n"
)


@needs_tansu
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_broker_command_runs_until_signalled(stop_signal: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLI, "broker", "--engine", "tansu", "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _readline_within(proc, 30)
        ready = re.fullmatch(r"broker ready at (127\.0\.0\.1:\d+) \(engine tansu\)\n", line)
        assert ready, line
        bootstrap = ready.group(1)
        check_topics(bootstrap, {}, timeout=5)  # a real broker answers there
        proc.send_signal(stop_signal)
        assert proc.wait(15) == 0, proc.stderr.read() if proc.stderr else ""
        assert _refuses_connections(bootstrap)  # the child broker went with it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _readline_within(proc: subprocess.Popen[str], timeout: float) -> str:
    stdout = proc.stdout
    assert stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines, f"no line from `streamrec broker` within {timeout} s"
    return lines[0]
