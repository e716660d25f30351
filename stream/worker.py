"""``streamrec worker``: load the model, check the topics, run the Faust worker.

Everything that can be wrong with the configuration (settings, model directory, broker,
topics and their partition counts) is checked here, before Faust starts consuming, and
reported as one line.
"""

from __future__ import annotations

import argparse
import logging

import faust
import torch

from model.artifact import load_model
from stream import faust_fixes, metrics
from stream.app import CHANGELOG_CONFIG, changelog_topic, create_app, expiry_topic
from stream.hot_swap import watch_registry
from stream.registry import ModelRegistry
from stream.settings import WorkerSettings
from stream.topics import check_topics, ensure_topics

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


def run(args: argparse.Namespace) -> int:
    settings = WorkerSettings.from_args(args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = ModelRegistry(settings.model) if ModelRegistry.is_registry(settings.model) \
        else None
    recommender = registry.current() if registry else load_model(settings.model, device="cpu")
    torch.set_num_threads(settings.torch_threads)
    prepare_topics(settings)
    faust_fixes.apply(settings.fetch_max_wait_ms)
    app, processor = create_app(settings, recommender)
    metrics.install(app, processor, settings.web_port)
    if registry is not None:
        watch_registry(app, processor, registry, settings.model_poll_s)
    logging.getLogger("streamrec.worker").warning(
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
