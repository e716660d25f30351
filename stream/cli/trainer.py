"""``streamrec trainer``: learn while serving (see :mod:`stream.learning`)."""

from __future__ import annotations

import argparse

from stream.cli.base import SubParsers
from stream.learning import consumer
from stream.learning.settings import TrainerSettings


def add_parser(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "trainer",
        help="learn while serving: fine-tune on the click stream, gate, publish",
        description="Consume the click topic in its own group, fine-tune the registry's "
        "current model on recent sessions plus a replay sample, and publish "
        "candidates that pass the holdout gate. One JSON line per decision. "
        "Each flag has an environment variable equivalent; flags win.",
    )
    TrainerSettings.add_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return consumer.run(TrainerSettings.from_args(args))
