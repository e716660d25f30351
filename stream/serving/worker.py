"""``streamrec worker``: load the model, check the topics, run the Faust worker.

Everything that can be wrong with the configuration (settings, model directory, broker,
topics and their partition counts) is checked here, before Faust starts consuming, and
reported as one line. A broker that does not answer is not a configuration error but
possibly one that is still starting (or restarting): it is retried with backoff for
``broker_wait_s`` while ``/readyz`` says what the worker waits for.
"""

from __future__ import annotations

import argparse
import logging
import time

import faust
import torch

from model.artifact import load_model
from stream.serving import faust_patches as faust_fixes, metrics
from stream.serving.app import CHANGELOG_CONFIG, changelog_topic, create_app, expiry_topic
from stream.kafka.probe import BrokerProbe
from stream.serving.hot_swap import watch_registry
from stream.serving.metrics import ProcessorMetrics
from stream.registry import ModelRegistry
from stream.serving.settings import WorkerSettings
from stream.kafka.topics import BrokerUnreachable, check_topics, ensure_topics

logger = logging.getLogger("streamrec.worker")

def prepare_topics(settings: WorkerSettings, timeout: float = 30.0) -> None:
    """Create (or, with ``create_topics`` off, require) co-partitioned topics."""
    topics = {name: settings.partitions for name in (
        settings.input_topic, settings.output_topic, settings.dlq_topic,
        expiry_topic(settings), changelog_topic(settings))}
    if settings.create_topics:
        ensure_topics(settings.bootstrap, topics,
                      configs={changelog_topic(settings): CHANGELOG_CONFIG}, timeout=timeout)
    else:
        check_topics(settings.bootstrap, topics, timeout=timeout)


def prepare_topics_patiently(settings: WorkerSettings, status: ProcessorMetrics) -> None:
    """:func:`prepare_topics`, retrying an unreachable broker with exponential backoff (1 s
    doubling up to 30 s, each attempt waiting up to 5 s for an answer) for
    ``broker_wait_s``; every other problem fails at once."""
    deadline = time.monotonic() + settings.broker_wait_s
    delay = 1.0
    status.not_ready_reason = f"connecting to the Kafka broker at {settings.bootstrap}"
    while True:
        status.heartbeat = time.monotonic()  # alive, and saying so on /healthz
        try:
            remaining = deadline - time.monotonic()
            prepare_topics(settings, timeout=max(1.0, min(5.0, remaining)))
            return
        except BrokerUnreachable as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerUnreachable(f"{exc} (retried for {settings.broker_wait_s:g} s; "
                                        "--broker-wait-s sets how long)") from None
            status.not_ready_reason = f"waiting for the Kafka broker: {exc}"
            logger.warning("%s; retrying in %.0f s", exc, min(delay, remaining))
            time.sleep(min(delay, remaining))
            delay = min(2 * delay, 30.0)


def run(args: argparse.Namespace) -> int:
    settings = WorkerSettings.from_args(args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = ModelRegistry(settings.model) if ModelRegistry.is_registry(settings.model) \
        else None
    recommender = registry.current() if registry else load_model(settings.model, device="cpu")
    torch.set_num_threads(settings.torch_threads)
    faust_fixes.apply(settings.fetch_max_wait_ms)
    app, processor = create_app(settings, recommender)  # contacts no broker yet
    metrics.install(app, processor, settings.web_port)
    prepare_topics_patiently(settings, processor.metrics)
    processor.metrics.not_ready_reason = "starting"
    processor.metrics.broker = BrokerProbe(settings.bootstrap, settings.input_topic).start()
    if registry is not None:
        watch_registry(app, processor, registry, settings.model_poll_s)
    logger.warning(
        "worker %s starting: model %s (%d items), broker %s, %d partitions",
        settings.app_id, recommender.version, recommender.n_items, settings.bootstrap,
        settings.partitions)
    faust.Worker(app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker", help="serve recommendations: consume clicks, publish top-N",
        description="Run a streaming worker (a Faust app). Each flag has an environment "
                    "variable equivalent; flags win.")
    WorkerSettings.add_arguments(parser)
    parser.set_defaults(run=run)
