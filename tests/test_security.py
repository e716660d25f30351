"""Kafka security settings reach every client: the Faust worker and confluent-kafka ones,
checked in configuration and against a broker that requires SASL."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import faust
import pytest

from model.artifact import load_model
from model.errors import UserError
from stream.devtools.brokers import LocalKafka
from stream.devtools.processes import REPO, StreamNames, TopicReader, WorkerProcess
from stream.devtools.testing import free_port
from stream.kafka.config import client_config
from stream.kafka.topics import check_topics, ensure_topics
from stream.registry import ModelRegistry
from stream.serving.app import faust_app
from stream.serving.credentials import faust_credentials
from stream.serving.settings import WorkerSettings


def test_security_settings_reach_the_faust_worker(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The STREAMREC_KAFKA_* variables configure the worker's Faust app as they configure
    the confluent-kafka clients (replay, trainer, topic administration)."""
    assert faust_credentials({}) is None
    monkeypatch.setenv("STREAMREC_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMREC_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("STREAMREC_KAFKA_SASL_USERNAME", "worker")
    monkeypatch.setenv("STREAMREC_KAFKA_SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("STREAMREC_KAFKA_SSL_CAFILE", "/etc/ssl/certs/ca-certificates.crt")
    (tmp_path / "model").mkdir()
    settings = WorkerSettings(model=str(tmp_path / "model"), data_dir=str(tmp_path / "data"))
    credentials = faust_app(settings).conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password) == ("worker", "s3cret")
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert isinstance(credentials.ssl_context, ssl.SSLContext)
    assert client_config("k1:9093")["sasl.mechanism"] == "SCRAM-SHA-512"

    monkeypatch.setenv("STREAMREC_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("STREAMREC_KAFKA_SSL_CAFILE", str(tmp_path / "missing.pem"))
    with pytest.raises(UserError, match="TLS"):
        faust_credentials()


PASSWORD = "s3cret-Pa55word"
SASL_ENV = {
    "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "STREAMREC_KAFKA_SASL_MECHANISM": "PLAIN",
    "STREAMREC_KAFKA_SASL_USERNAME": "streamrec",
    "STREAMREC_KAFKA_SASL_PASSWORD": PASSWORD,
}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stream.cli.main", *args]


@pytest.mark.kafka
def test_sasl_credentials_reach_replay_worker_and_trainer_but_no_log(
    small_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a broker that lets in only SASL/PLAIN users, the replay tool, a worker and
    the trainer all work with nothing but the STREAMREC_KAFKA_* variables; the password
    appears in none of their outputs or metrics; a wrong one stops a worker at once."""
    recommender = load_model(small_model)
    ids = recommender.item_map.ids
    log = tmp_path / "clicks.tsv"
    log.write_text(
        "SessionId\tItemId\tTime\n"
        + "".join(
            f"s{k}\t{ids[(3 * k + j) % len(ids)]}\t{1000 + 10 * j + k}\n"
            for k in range(10)
            for j in range(3)
        )
    )
    with LocalKafka(
        data_dir=tmp_path / "kafka", sasl_users={"admin": "admin-pw", "streamrec": PASSWORD}
    ) as broker:
        with pytest.raises(UserError, match="cannot reach"):  # no credentials, no entry
            check_topics(broker.bootstrap, {"anything": 1}, timeout=3)
        for name, value in SASL_ENV.items():
            monkeypatch.setenv(name, value)
        names = StreamNames("sasl")
        ensure_topics(broker.bootstrap, {names.clicks: 2})  # the trainer needs it to exist
        registry = ModelRegistry(tmp_path / "registry")
        registry.publish(recommender)
        web_port = free_port()
        worker = WorkerProcess(
            broker.bootstrap,
            registry.root,
            names,
            tmp_path,
            "--web-port",
            str(web_port),
            partitions=2,
        ).start()
        trainer_log = tmp_path / "trainer.log"
        with open(trainer_log, "wb") as out:
            trainer = subprocess.Popen(
                cli(
                    "trainer",
                    "--broker",
                    broker.bootstrap,
                    "--registry",
                    str(registry.root),
                    "--input-topic",
                    names.clicks,
                    "--group",
                    f"trainer-{names.app_id}",
                    "--interval",
                    "1",
                    "--min-sessions",
                    "1000",
                    "--web-port",
                    "0",
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        try:
            worker.wait_until_consuming(broker.bootstrap, names.app_id, timeout=90)
            replay = subprocess.run(
                cli(
                    "replay",
                    "--data",
                    str(log),
                    "--broker",
                    broker.bootstrap,
                    "--topic",
                    names.clicks,
                    "--quiet",
                ),
                capture_output=True,
                text=True,
                timeout=120,
                cwd=REPO,
            )
            assert replay.returncode == 0, replay.stderr
            assert json.loads(replay.stdout.splitlines()[-1])["events_sent"] == 30
            reader = TopicReader(broker.bootstrap, names.recommendations)
            reader.start()
            try:
                assert reader.wait_for(30, timeout=60), worker.log()[-3000:]
            finally:
                reader.close()
            metrics_text = (
                urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=5)
                .read()
                .decode()
            )
            deadline = time.monotonic() + 60
            while '"buffered": 10' not in trainer_log.read_text():
                assert time.monotonic() < deadline and trainer.poll() is None, (
                    trainer_log.read_text()[-3000:]
                )
                time.sleep(0.5)
        finally:
            trainer.terminate()
            trainer.wait(30)
            worker.stop()
        for text in (
            worker.log(),
            trainer_log.read_text(),
            replay.stdout,
            replay.stderr,
            metrics_text,
        ):
            assert PASSWORD not in text

        monkeypatch.setenv("STREAMREC_KAFKA_SASL_PASSWORD", "not-the-password")
        started = time.monotonic()
        refused = subprocess.run(
            cli(
                "worker",
                "--broker",
                broker.bootstrap,
                "--model",
                str(small_model),
                "--web-port",
                "0",
                "--broker-wait-s",
                "120",
                *names.worker_args(),
            ),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    assert refused.returncode == 2, refused.stderr  # a configuration error (README: status 2)
    assert time.monotonic() - started < 60  # a configuration error: no waiting it out
    last = refused.stderr.strip().splitlines()[-1]
    assert "refused the credentials" in last and "SASL_PASSWORD" in last, refused.stderr
    assert "not-the-password" not in refused.stderr
