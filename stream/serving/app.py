"""The worker's composition root: the one place that wires the serving parts together.

``run`` loads the model, builds the Faust app (topics, the ``sessions`` table, the
``clicks`` agent and the expiry timer) around a :class:`~stream.serving.processor.
ClickProcessor`, serves the metrics and health endpoints, prepares the topics, follows a
model registry if ``--model`` names one, and hands over to Faust.

The agent (concurrency 1, as Faust requires for table writes) takes micro-batches of
events (``batch_size``/``batch_ms``) from the click topic and the co-partitioned expiry
topic. An unexpected exception (a bug, not bad input) stops the process without committing
the batch, so it is redelivered to the restarted worker instead of being acked and lost;
so does a lapsed group membership (exit status 75, :mod:`stream.serving.fencing`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import NoReturn

import faust
import torch

from model.artifact import load_model
from model.inference import Recommender
from stream.kafka.config import worker_client_id
from stream.kafka.probe import BrokerProbe
from stream.observability import serve
from stream.registry import ModelRegistry
from stream.serving import faust_patches, fencing
from stream.serving.availability import AVAILABILITY_INTERVAL_S, AvailabilityFollower
from stream.serving.credentials import faust_credentials
from stream.serving.fencing import MEMBERSHIP_LOST_EXIT, MembershipLost, heartbeat_interval
from stream.serving.hot_swap import watch_registry
from stream.serving.metrics import REFRESH_S, refresh, register, worker_app
from stream.serving.processor import ClickProcessor
from stream.serving.settings import WorkerSettings
from stream.serving.topics import CHANGELOG_CONFIG, expiry_topic, prepare_topics_patiently

logger = logging.getLogger("streamrec.worker")

# The broker's max.message.bytes is the limit that applies (see stream.serving.dead_letters).
PRODUCER_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# The agent waits for its answers' delivery before writing states, so the linger is paid
# by every batch: at 40k items 1 ms instead of 5 gave p50 17-18 instead of 27-30 ms and
# 2,967-3,038 instead of 2,882-2,988 events/s.
PRODUCER_LINGER_MS = 1


def faust_app(settings: WorkerSettings) -> faust.App:
    """A Faust app configured for low-latency serving (also used by the no-op benchmark)."""
    data_dir = settings.faust_data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    session_timeout = settings.group_session_timeout_s
    return faust.App(
        settings.app_id,
        # Faust takes a list of URLs separated by ";" (one URL with commas would be read
        # as one host)
        broker=";".join(f"kafka://{server}" for server in settings.bootstrap.split(",")),
        broker_credentials=faust_credentials(),
        broker_client_id=worker_client_id(),  # which worker holds which partition
        store="memory://",
        datadir=str(data_dir),
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        topic_disable_leader=True,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session_timeout,
        broker_heartbeat_interval=heartbeat_interval(session_timeout),
        broker_rebalance_timeout=max(2 * session_timeout, 20.0),
        broker_request_timeout=max(3 * session_timeout, 30.0),
        broker_commit_interval=1.0,
        producer_linger_ms=PRODUCER_LINGER_MS,
        producer_acks=-1,  # all in-sync replicas: a broker's death loses no answer or state
        producer_max_request_size=PRODUCER_MAX_REQUEST_BYTES,  # the broker's limit applies
        # The worker serves /metrics, /healthz and /readyz itself (stream.serving.metrics):
        # Faust's web server (which can expose table contents) stays off.
        web_enabled=False,
    )


def raw_topic(app: faust.App, settings: WorkerSettings, *names: str) -> faust.TopicT:
    """A topic of raw bytes. Faust's default JSON codec would drop undecodable clicks
    before the agent could route them to the dead-letter topic."""
    return app.topic(
        *names,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )


def leave_lapsed_group(exc: MembershipLost, without: str) -> NoReturn:
    """Exit with status 75 at once, writing and committing nothing more: the partitions
    are someone else's now, and a restart rejoins the group (whether a batch or an offset
    commit found the lapse first)."""
    logger.error("%s; exiting without %s", exc, without)
    logging.shutdown()
    os._exit(MEMBERSHIP_LOST_EXIT)


def create_app(
    settings: WorkerSettings, recommender: Recommender
) -> tuple[faust.App, ClickProcessor]:
    """The Faust app (topics, table, agent, timers) and its processor; contacts no broker."""
    app = faust_app(settings)
    clicks = raw_topic(app, settings, settings.input_topic, expiry_topic(settings))
    output = raw_topic(app, settings, settings.output_topic)
    dead_letters = raw_topic(app, settings, settings.dlq_topic)
    expiry = raw_topic(app, settings, expiry_topic(settings))
    table = app.Table(
        "sessions",
        key_type=bytes,
        value_type=bytes,
        default=None,
        partitions=settings.partitions,
        extra_topic_configs=CHANGELOG_CONFIG,
    )
    processor = ClickProcessor(settings, recommender, table, output, dead_letters)

    async def before_commit() -> None:
        try:
            await processor.await_state_writes()
        except MembershipLost as exc:  # a pause found at a commit before any batch
            leave_lapsed_group(exc, "committing")

    faust_patches.hold_commits_until(app, before_commit)
    fencing.guard(table.changelog_topic.get_topic_name(), processor.fence)
    app.on_partitions_revoked.connect(processor.on_rebalance)
    app.on_partitions_assigned.connect(processor.on_rebalance)
    register(processor, app)

    @app.agent(clicks, concurrency=1)
    async def answer_clicks(stream: faust.StreamT) -> None:
        async for events in stream.take_events(  # type: ignore[attr-defined]  # not in StreamT
            settings.batch_size, within=settings.batch_ms / 1000.0
        ):
            try:
                await processor.process(events)
            except MembershipLost as exc:  # nothing of the batch written or committed
                leave_lapsed_group(exc, "writing the batch")
            except Exception:  # a bug: do not let take_events() ack the batch
                logger.critical(
                    "unexpected error; exiting so the batch is redelivered", exc_info=True
                )
                logging.shutdown()
                os._exit(70)

    @app.timer(settings.expiry_interval_s)
    async def send_expiry_markers() -> None:
        for partition, before in processor.expiry.markers().items():
            await expiry.send(
                key=b"expiry",
                value=json.dumps({"before": before}).encode(),
                partition=partition,
                force=True,
            )

    @app.timer(AVAILABILITY_INTERVAL_S, on_leader=False, name="streamrec.availability")
    async def apply_availability() -> None:
        # Between batches too: a worker with no clicks to answer still has its model
        # current when the next one comes (and the delay metric says when it was).
        await asyncio.gather(*processor.apply_availability())

    @app.timer(REFRESH_S, on_leader=False, name="streamrec.metrics")
    async def refresh_health() -> None:
        refresh(
            app,
            processor.health,
            settings.input_topic,
            processor.metrics.positions,
            processor.table,
        )

    return app, processor


def run(settings: WorkerSettings) -> int:
    """Serve until stopped (``streamrec worker``)."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    registry = ModelRegistry(settings.model) if ModelRegistry.is_registry(settings.model) else None
    recommender = registry.current() if registry else load_model(settings.model, device="cpu")
    ranking = recommender.use_ranking(settings.ranking)  # builds a missing index now, not later
    torch.set_num_threads(settings.torch_threads)
    faust_patches.apply(settings.fetch_max_wait_ms)
    app, processor = create_app(settings, recommender)
    if settings.web_port:
        serve(worker_app(processor), settings.web_port, settings.web_host)
        logger.info("metrics on http://%s:%d/metrics", settings.web_host, settings.web_port)
    prepare_topics_patiently(settings, processor.health)
    if settings.availability_topic:
        follow_availability(settings, processor)
    processor.health.not_ready_reason = "starting"
    processor.health.broker = BrokerProbe(settings.bootstrap, settings.input_topic).start()
    if registry is not None:
        watch_registry(app, processor, registry, settings.model_poll_s, settings.ranking)
    logger.warning(
        "worker %s starting: model %s (%d items, ranking %s), broker %s, %d partitions",
        settings.app_id,
        recommender.version,
        recommender.n_items,
        ranking,
        settings.bootstrap,
        settings.partitions,
    )
    return run_app(app, settings)


def follow_availability(settings: WorkerSettings, processor: ClickProcessor) -> None:
    """Read the availability topic to its end, give it to the served model, and keep
    following it (:mod:`stream.serving.availability`): before the worker joins the
    click group, so no click is answered with an older catalogue."""
    topic = settings.availability_topic
    processor.health.not_ready_reason = f"reading the availability topic {topic!r}"
    availability = AvailabilityFollower(settings.bootstrap, topic)
    availability.start(timeout=settings.broker_wait_s).wait_until_read(settings.broker_wait_s)
    processor.availability = availability
    processor.swap_model(*processor.prepare_model(processor.recommender))
    logger.warning(
        "availability: %d items unavailable (%d known to the model)",
        availability.unavailable_count,
        int(processor.recommender.unavailable.sum()),
    )


def run_app(app: faust.App, settings: WorkerSettings) -> int:
    """Run ``app`` as a Faust worker in this process until it is stopped."""
    faust.Worker(app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
    return 0
