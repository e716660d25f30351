"""What ``streamrec trainer`` exports on ``/metrics``, and its liveness and readiness."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream.observability import STALL_S, help_text, wsgi_app

RETRAIN_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class TrainerMetrics:
    """What ``streamrec trainer`` exports: its buffer, and each round's decision and gate.

    Every round's decision record passes through :meth:`record`; the consume loop calls
    :meth:`beat` as it polls. During a training round the loop does not poll, so liveness
    reports "training" rather than a stall.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.buffered = Gauge(
            "streamrec_trainer_buffered_sessions",
            help_text("streamrec_trainer_buffered_sessions"),
            registry=self.registry,
        )
        self.rounds = Counter(
            "streamrec_trainer_rounds",
            help_text("streamrec_trainer_rounds"),
            ["decision"],
            registry=self.registry,
        )
        self.retrain_seconds = Histogram(
            "streamrec_trainer_retrain_seconds",
            help_text("streamrec_trainer_retrain_seconds"),
            buckets=RETRAIN_BUCKETS,
            registry=self.registry,
        )
        self.loss = Gauge(
            "streamrec_trainer_training_loss",
            help_text("streamrec_trainer_training_loss"),
            registry=self.registry,
        )
        self.gate_recall = Gauge(
            "streamrec_trainer_gate_recall",
            help_text("streamrec_trainer_gate_recall"),
            ["model"],
            registry=self.registry,
        )
        self.heartbeat = time.monotonic()
        self.training = False
        self.not_ready_reason: str | None = "not consuming yet"

    def beat(self, buffered: int) -> None:
        self.heartbeat = time.monotonic()
        self.buffered.set(buffered)

    def record(self, decision: dict[str, Any]) -> None:
        """Count a round's decision record (as logged by the trainer)."""
        self.rounds.labels(decision["decision"]).inc()
        self.buffered.set(decision.get("buffered", 0))
        if "train_seconds" in decision:
            self.retrain_seconds.observe(decision["train_seconds"])
            self.loss.set(decision["final_loss"])
        gate = decision.get("gate")
        if gate:
            self.gate_recall.labels("candidate").set(gate["candidate_recall"])
            self.gate_recall.labels("current").set(gate["current_recall"])

    def liveness(self) -> tuple[bool, str]:
        if self.training:
            return True, "training"
        stalled = time.monotonic() - self.heartbeat
        return (
            stalled < STALL_S,
            "ok" if stalled < STALL_S else f"consume loop stalled for {stalled:.0f} s",
        )

    def readiness(self) -> tuple[bool, str]:
        return (self.not_ready_reason is None, self.not_ready_reason or "ok")

    def app(self) -> Callable[..., Iterable[bytes]]:
        return wsgi_app(self.registry, self.liveness, self.readiness)
