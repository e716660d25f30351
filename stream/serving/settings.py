"""The worker's configuration: one typed, validated place, from flags or environment.

Every field of :class:`WorkerSettings` is a command-line flag (``--top-n``) and an
environment variable (``STREAMREC_TOP_N``); a flag wins over the environment, which wins
over the default. Validation happens before anything connects, and a bad value is one
clear line naming the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from model.errors import UserError
from stream.kafka.config import bootstrap_servers

ENV_PREFIX = "STREAMREC_"


def _setting(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class WorkerSettings:
    broker: str = _setting("kafka://127.0.0.1:9092", "Kafka bootstrap URL (kafka://HOST:PORT)")
    model: str = _setting("", "model directory, or a model registry to follow (required)")
    partitions: int = _setting(4, "partitions of the input, output and changelog topics")
    top_n: int = _setting(20, "recommendations per click")
    batch_size: int = _setting(256, "most clicks scored in one batch")
    batch_ms: float = _setting(5.0, "longest wait to fill a batch, milliseconds")
    web_port: int = _setting(6066, "HTTP port for /metrics, /healthz, /readyz (0 = none)")
    app_id: str = _setting("streamrec", "Faust app id: consumer group and changelog prefix")
    input_topic: str = _setting("clicks", "topic of click events")
    output_topic: str = _setting("recommendations", "topic of recommendation messages")
    dlq_topic: str = _setting("clicks-dlq", "dead-letter topic for rejected clicks")
    session_timeout_s: float = _setting(1800.0, "expire a session after this much event "
                                                "time without clicks")
    expiry_interval_s: float = _setting(30.0, "how often to look for expired sessions")
    data_dir: str = _setting("", "Faust data directory (default: a per-app directory "
                                 "under ~/.cache/streamrec)")
    group_session_timeout_s: float = _setting(10.0, "Kafka consumer-group session timeout")
    fetch_max_wait_ms: int = _setting(10, "longest broker wait for new clicks per fetch")
    torch_threads: int = _setting(1, "torch threads for scoring (the event loop is one more)")
    log_level: str = _setting("warning", "debug, info, warning or error")
    create_topics: bool = _setting(True, "create missing topics (false: a missing topic is "
                                         "a start-up error)")
    model_poll_s: float = _setting(5.0, "with a registry as --model: how often to check "
                                        "its current version, seconds")
    broker_wait_s: float = _setting(300.0, "at start, how long to keep retrying an "
                                           "unreachable broker before giving up, seconds")

    def __post_init__(self) -> None:
        bootstrap_servers(self.broker)
        if not self.model:
            raise UserError("setting model is required (--model DIR or STREAMREC_MODEL)")
        if not Path(self.model).is_dir():
            raise UserError(f"model directory {self.model} does not exist or is unreadable")
        positive = ("partitions", "top_n", "batch_size", "batch_ms", "session_timeout_s",
                    "expiry_interval_s", "group_session_timeout_s", "torch_threads",
                    "model_poll_s", "broker_wait_s")
        for name in positive:
            value = getattr(self, name)
            if not (0 < value < math.inf):  # also refuses NaN
                raise UserError(f"setting {name} must be a finite number > 0, got {value}")
        if not 0 <= self.web_port <= 65535:
            raise UserError(f"setting web_port must be a port number, got {self.web_port}")
        if self.fetch_max_wait_ms < 0:
            raise UserError("setting fetch_max_wait_ms must be >= 0")
        if not 6 <= self.group_session_timeout_s <= 300:
            raise UserError("setting group_session_timeout_s must be within [6, 300] "
                            "(the broker's group.min/max.session.timeout.ms)")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise UserError(f"setting log_level must be debug, info, warning or error, "
                            f"got {self.log_level!r}")
        for name in ("input_topic", "output_topic", "dlq_topic", "app_id"):
            if not getattr(self, name):
                raise UserError(f"setting {name} must not be empty")

    @property
    def bootstrap(self) -> str:
        return bootstrap_servers(self.broker)

    @property
    def faust_data_dir(self) -> Path:
        base = Path(self.data_dir) if self.data_dir else \
            Path.home() / ".cache" / "streamrec" / "faust"
        return base / self.app_id

    def replace(self, **changes: Any) -> WorkerSettings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per setting; defaults come from the environment, then the class."""
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            env = ENV_PREFIX + f.name.upper()
            parser.add_argument(flag, dest=f.name, type=_TYPES[str(f.type)], default=None,
                                help=f"{f.metadata['help']} (env {env}; default "
                                     f"{f.default!r})")

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  environ: dict[str, str] | None = None) -> WorkerSettings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            given = getattr(args, f.name, None)
            if given is not None:
                values[f.name] = given
                continue
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                try:
                    values[f.name] = _TYPES[str(f.type)](raw)
                except ValueError:
                    raise UserError(f"environment {ENV_PREFIX + f.name.upper()}={raw!r} is "
                                    f"not a valid {f.type}") from None
        return cls(**values)


def boolean(raw: str) -> bool:
    """true/false, yes/no, on/off or 1/0."""
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_TYPES = {"str": str, "int": int, "float": float, "bool": boolean}
