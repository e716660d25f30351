"""The trainer's configuration (``streamrec trainer``), declared with :mod:`stream.settings`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stream.kafka.config import bootstrap_servers
from stream.registry import DEFAULT_KEEP, DEFAULT_UPDATES_TOPIC
from stream.settings import Settings, at_least, non_empty, port, positive, setting, within

#: A round's training budget when ``--round-budget-s`` is not given: this share of the
#: interval, so that a round (plus gate and publish) ends well before the next is due.
DEFAULT_BUDGET_SHARE = 0.4
#: A round for new items starts at least this long after the previous round began, and
#: at least this share of the interval after it: new items must not keep the trainer
#: training back to back.
NEW_ITEM_MIN_GAP_S = 0.5
NEW_ITEM_GAP_SHARE = 0.1


def _required(value: str) -> str | None:
    return None if value else "is required"


def _budget(value: float) -> str | None:
    return None if 0 <= value < math.inf else "must be a finite number >= 0"


def _margin(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


@dataclass(frozen=True)
class TrainerSettings(Settings):
    env_prefix = "STREAMREC_TRAINER_"

    broker: str = setting("", "Kafka bootstrap URL (kafka://HOST:PORT; required)", _required)
    registry: str = setting("", "model registry directory (required)", _required)
    interval_s: float = setting(
        300.0, "seconds between training rounds", positive, flag="--interval"
    )
    min_sessions: int = setting(
        500, "complete sessions (2+ clicks) needed for a round", at_least(1)
    )
    input_topic: str = setting("clicks", "click topic", non_empty)
    group: str = setting("streamrec-trainer", "consumer group of the trainer", non_empty)
    session_timeout_s: float = setting(
        1800.0, "event-time inactivity after which a session is complete", positive
    )
    max_session_age_s: float = setting(
        86400.0, "drop a complete session still unused after this much event time", positive
    )
    max_buffer_sessions: int = setting(
        200_000, "most sessions buffered (least recently active are evicted)", at_least(1)
    )
    replay_sample: int = setting(
        5000,
        "sessions seen earlier replayed in every round (a "
        "uniform sample of all the trainer has seen)",
        at_least(0),
    )
    replay_log: str | None = setting(
        None,
        "an offline click log whose sessions are "
        "replayed too, typically the first model's "
        "training data (read at start; at most 100,000 "
        "sessions kept)",
        non_empty,
    )
    replay_log_sample: int = setting(
        3000, "sessions of --replay-log drawn afresh for every round", at_least(0)
    )
    gate_margin: float = setting(
        0.01, "largest Recall@20 drop a promoted candidate may show", _margin
    )
    holdout_sessions: int = setting(
        100, "most recent complete sessions held out for the gate", at_least(1)
    )
    epochs: int = setting(3, "fine-tuning epochs per round", at_least(1))
    learning_rate: float = setting(
        0.1,
        "fine-tuning learning rate when the model carries "
        "its optimizer state (Adagrad resumes from it)",
        positive,
    )
    fresh_learning_rate: float = setting(
        0.02,
        "fine-tuning learning rate for a model "
        "without optimizer state (format 2 "
        "artifacts): a fresh accumulator's first "
        "steps have the size of the learning rate, "
        "and the offline 0.2 wrecks a trained model",
        positive,
    )
    keep: int = setting(DEFAULT_KEEP, "registry versions to retain", at_least(1))
    updates_topic: str = setting(DEFAULT_UPDATES_TOPIC, "topic announcing new versions", non_empty)
    seed: int = setting(0, "random seed (replay sample, training)")
    device: str | None = setting(None, "cpu or cuda (default: cuda if available)")
    web_port: int = setting(6067, "HTTP port for /metrics, /healthz, /readyz (0 = none)", port)
    web_host: str = setting(
        "0.0.0.0",
        "address the HTTP server binds (0.0.0.0: every interface, as a container needs; "
        "127.0.0.1: this machine only)",
        non_empty,
    )
    round_budget_s: float | None = setting(
        None,
        "training seconds a round may take: the most recent complete sessions "
        "first, then replayed ones, as many as fit at the training speed measured by "
        f"earlier rounds (default {DEFAULT_BUDGET_SHARE * 100:.0f}%% of --interval; "
        "0 = no limit)",
        _budget,
    )
    nice: int = setting(
        10,
        "niceness added to the trainer's (0..19), so that workers on "
        "the same machine get the CPU first",
        within(0, 19),
    )
    new_item_rounds: bool = setting(
        True,
        "run rounds on the --interval clock only; by default a round also starts as "
        "soon as one would train on a complete session holding an item the current "
        f"model does not know (at least max({NEW_ITEM_MIN_GAP_S:g} s, "
        f"{NEW_ITEM_GAP_SHARE:g} x --interval) after the previous round began)",
        switch_off="--no-new-item-rounds",
    )
    admit_min_clicks: int = setting(
        2,
        "clicks a round's training sessions must make on an item the current model does "
        "not know before it joins the catalogue (until then its clicks are left out of "
        "training)",
        at_least(1),
    )
    admit_min_sessions: int = setting(
        2,
        "distinct sessions those clicks must come from (a bot repeating an id in one "
        "session does not add it)",
        at_least(1),
    )
    max_new_items_per_round: int = setting(
        10_000, "most new items a round adds to the catalogue, the most clicked first", at_least(1)
    )
    max_items: int = setting(
        0,
        "most items in the catalogue: once reached, new items are held back (0 = no limit)",
        at_least(0),
    )

    def validate(self) -> None:
        bootstrap_servers(self.broker)
        if self.admit_min_sessions > self.admit_min_clicks:
            raise self.invalid(
                "admit_min_sessions",
                f"({self.admit_min_sessions}) must be at most "
                f"--admit-min-clicks ({self.admit_min_clicks}): each session adds a click",
            )
        if self.holdout_sessions >= self.min_sessions:
            raise self.invalid(
                "holdout_sessions",
                f"({self.holdout_sessions}) must be below "
                f"--min-sessions ({self.min_sessions}): "
                "some sessions must be left to train on",
            )
        if self.max_buffer_sessions < self.min_sessions:
            raise self.invalid(
                "max_buffer_sessions",
                f"({self.max_buffer_sessions}) must be at least "
                f"--min-sessions ({self.min_sessions})",
            )
        if self.max_session_age_s < self.session_timeout_s:
            raise self.invalid(
                "max_session_age_s",
                "must be at least --session-timeout-s (a "
                "session cannot be stale before it is complete)",
            )

    @property
    def bootstrap(self) -> str:
        return bootstrap_servers(self.broker)

    @property
    def budget_s(self) -> float | None:
        """Training seconds a round may take (None: no limit)."""
        if self.round_budget_s is None:
            return DEFAULT_BUDGET_SHARE * self.interval_s
        return self.round_budget_s or None

    @property
    def new_item_gap_s(self) -> float:
        """Least time between the start of a round and a round started for new items."""
        return max(NEW_ITEM_MIN_GAP_S, NEW_ITEM_GAP_SHARE * self.interval_s)
