"""Kafka security settings reach every client: the Faust worker and confluent-kafka ones."""

from __future__ import annotations

import ssl

import faust
import pytest

from model.errors import UserError
from stream.app import faust_app
from stream.kafka_config import client_config, faust_credentials
from stream.settings import WorkerSettings


def test_security_settings_reach_the_faust_worker(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path) -> None:
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
