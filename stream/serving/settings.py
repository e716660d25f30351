"""The worker's configuration (``streamrec worker``), declared once with :mod:`stream.settings`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.item_index import APPROXIMATE_FROM, RANKINGS
from model.rules import RECENT_ITEMS
from stream.kafka.config import bootstrap_servers
from stream.settings import Settings, at_least, non_empty, one_of, port, positive, setting, within

ENV_PREFIX = Settings.env_prefix


@dataclass(frozen=True)
class WorkerSettings(Settings):
    broker: str = setting("kafka://127.0.0.1:9092", "Kafka bootstrap URL (kafka://HOST:PORT)")
    model: str = setting("", "model directory, or a model registry to follow (required)")
    partitions: int = setting(4, "partitions of the input, output and changelog topics", positive)
    top_n: int = setting(20, "recommendations per click", positive)
    batch_size: int = setting(256, "most clicks scored in one batch", positive)
    batch_ms: float = setting(5.0, "longest wait to fill a batch, milliseconds", positive)
    web_port: int = setting(6066, "HTTP port for /metrics, /healthz, /readyz (0 = none)", port)
    web_host: str = setting(
        "0.0.0.0",
        "address the HTTP server binds (0.0.0.0: every interface, as a container needs; "
        "127.0.0.1: this machine only)",
        non_empty,
    )
    app_id: str = setting(
        "streamrec", "Faust app id: consumer group and changelog prefix", non_empty
    )
    input_topic: str = setting("clicks", "topic of click events", non_empty)
    output_topic: str = setting("recommendations", "topic of recommendation messages", non_empty)
    dlq_topic: str = setting(
        "clicks-dlq", "dead-letter topic for rejected clicks and availability records", non_empty
    )
    availability_topic: str = setting(
        "item-availability",
        "compacted topic of item availability (key: item id, value: "
        '{"available": false}, tombstone: available); every worker reads all of it '
        "(empty: no availability rules)",
    )
    exclude_seen: bool = setting(
        False,
        f"leave each session's last {RECENT_ITEMS} clicked items out of its recommendations",
    )
    session_timeout_s: float = setting(
        1800.0, "expire a session after this much event time without clicks", positive
    )
    expiry_interval_s: float = setting(30.0, "how often to look for expired sessions", positive)
    data_dir: str = setting(
        "", "Faust data directory (default: a per-app directory under ~/.cache/streamrec)"
    )
    group_session_timeout_s: float = setting(
        10.0,
        "Kafka consumer-group session timeout",
        positive,
        within(6, 300, " (the broker's group.min/max.session.timeout.ms)"),
    )
    fetch_max_wait_ms: int = setting(
        10, "longest broker wait for new clicks per fetch", at_least(0)
    )
    torch_threads: int = setting(
        1, "torch threads for scoring (the event loop is one more)", positive
    )
    log_level: str = setting(
        "warning", "debug, info, warning or error", one_of("debug", "info", "warning", "error")
    )
    min_replication: int = setting(
        1,
        "refuse to start on a session changelog replicated to fewer brokers than this "
        "(3 on a three-broker cluster: a broker's death then loses no session state)",
        positive,
    )
    create_topics: bool = setting(
        True, "create missing topics (false: a missing topic is a start-up error)"
    )
    model_poll_s: float = setting(
        5.0, "with a registry as --model: how often to check its current version, seconds", positive
    )
    ranking: str = setting(
        "auto",
        "exact (score every item), approximate (through the model's item index, re-ranked "
        "exactly) or auto (approximate from a catalogue of "
        f"{APPROXIMATE_FROM:,} items on, when the model has an index)",
        one_of(*RANKINGS),
    )
    broker_wait_s: float = setting(
        300.0,
        "at start, how long to keep retrying an unreachable broker before giving up, seconds",
        positive,
    )

    def validate(self) -> None:
        bootstrap_servers(self.broker)
        if not self.model:
            raise self.invalid("model", "is required (--model DIR or STREAMREC_MODEL)")
        if not Path(self.model).is_dir():
            raise self.invalid(
                "model", f"{self.model}: the directory does not exist or is unreadable"
            )

    @property
    def bootstrap(self) -> str:
        return bootstrap_servers(self.broker)

    @property
    def faust_data_dir(self) -> Path:
        base = (
            Path(self.data_dir) if self.data_dir else Path.home() / ".cache" / "streamrec" / "faust"
        )
        return base / self.app_id
