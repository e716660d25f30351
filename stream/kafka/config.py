"""Kafka client settings shared by every streamrec component that talks to a broker.

Two things must be identical everywhere, so they live here and nowhere else:

* **Broker addresses.** Users pass what Faust accepts (``kafka://host:port``), what
  librdkafka accepts (``host:port,host:port``) or a mix; :func:`bootstrap_servers` turns any
  of them into librdkafka's ``bootstrap.servers`` string and rejects typos up front, because
  librdkafka itself would retry a misspelt host forever instead of failing.
* **Producer partitioning.** Faust keeps a session's state on the partition its click came
  from and never re-hashes keys, so every producer of clicks must hash the raw session id
  bytes with murmur2 like Java and aiokafka do. librdkafka's default (``consistent_random``,
  crc32) puts the same key elsewhere, silently splitting a session over two workers.
  :func:`producer_config` always sets ``partitioner: murmur2_random``.

Security settings come from the environment (``STREAMREC_KAFKA_*``, see
:data:`SECURITY_ENV`) so that secrets never appear on a command line, in ``ps`` output or in
shell history; no configuration is ever logged.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from typing import Any

from model.errors import UserError

#: Environment variable -> librdkafka property, applied when the variable is set and non-empty.
SECURITY_ENV: Mapping[str, str] = {
    "STREAMREC_KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "STREAMREC_KAFKA_SASL_MECHANISM": "sasl.mechanism",
    "STREAMREC_KAFKA_SASL_USERNAME": "sasl.username",
    "STREAMREC_KAFKA_SASL_PASSWORD": "sasl.password",
    "STREAMREC_KAFKA_SSL_CAFILE": "ssl.ca.location",
    "STREAMREC_KAFKA_SSL_CERTFILE": "ssl.certificate.location",
    "STREAMREC_KAFKA_SSL_KEYFILE": "ssl.key.location",
}

#: The partitioner every click producer must use (see the module docstring).
PARTITIONER = "murmur2_random"

_SCHEME = "kafka://"
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+\]")


def bootstrap_servers(url: str) -> str:
    """librdkafka's ``bootstrap.servers`` for a broker URL or list, validated.

    Accepts ``kafka://host:port``, ``host:port``, ``[::1]:port`` and lists of them separated
    by commas or semicolons (Faust's separator), with or without the scheme on each entry.
    Returns ``host:port,host:port``. Raises UserError ("bad broker URL ...") for anything
    else (another scheme, a missing or out-of-range port, an empty entry), because
    librdkafka would not fail on those but retry them forever.
    """
    entries = [part.strip() for part in re.split(r"[,;]", url.strip())]
    if not url.strip() or not all(entries):
        raise UserError(
            f"bad broker URL {url!r}: expected HOST:PORT or kafka://HOST:PORT, "
            "several separated by commas"
        )
    return ",".join(_host_port(entry, url) for entry in entries)


def _host_port(entry: str, url: str) -> str:
    text = entry
    if "://" in text:
        if not text.lower().startswith(_SCHEME):
            scheme = text.split("://", 1)[0]
            raise UserError(
                f"bad broker URL {url!r}: scheme {scheme + '://'!r} is not "
                "supported (use kafka://HOST:PORT or HOST:PORT)"
            )
        text = text[len(_SCHEME) :]
    text = text.removesuffix("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise UserError(f"bad broker URL {url!r}: {entry!r} is not HOST:PORT")
    if not (_HOSTNAME.fullmatch(host) or _IPV6.fullmatch(host)):
        raise UserError(f"bad broker URL {url!r}: {host!r} is not a host name or IP address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"bad broker URL {url!r}: port {port!r} is not a number from 1 to 65535")
    return f"{host}:{int(port)}"


def security_config(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The librdkafka security properties set through ``STREAMREC_KAFKA_*`` variables.

    Only variables that are set and non-empty appear, so a plaintext local broker gets a
    config without any security keys (librdkafka rejects e.g. an empty ``sasl.mechanism``).
    """
    env = os.environ if environ is None else environ
    return {prop: env[var] for var, prop in SECURITY_ENV.items() if env.get(var)}


def client_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Settings for any confluent-kafka client (admin, consumer): servers plus security.

    ``overrides`` are librdkafka properties (dotted names, so pass them as
    ``**{"linger.ms": 5}``) or confluent-kafka's Python ones (``logger=``, ``error_cb=``);
    they win over the environment.
    """
    config: dict[str, Any] = {"bootstrap.servers": bootstrap_servers(bootstrap)}
    config.update(security_config())
    config.update(overrides)
    return config


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """A confluent-kafka Producer config that partitions keys like Java, aiokafka and Faust.

    Always contains ``partitioner: murmur2_random`` (unless explicitly overridden, which
    breaks co-partitioning with the Faust workers), ``acks: all`` (a record is acknowledged
    once every in-sync replica has it: on a replicated cluster a broker's death loses no
    acknowledged record), the bootstrap servers and the security pass-through of
    :func:`security_config`. ``overrides`` work as in :func:`client_config`.
    """
    return client_config(bootstrap, **{"partitioner": PARTITIONER, "acks": "all", **overrides})


def worker_client_id(pid: int | None = None) -> str:
    """The Kafka client id of the worker process ``pid`` (default: this one) on this host,
    so that a group's member list says which worker holds which partition."""
    return f"streamrec-{socket.gethostname()}-{os.getpid() if pid is None else pid}"
