"""``streamrec worker``: serve recommendations (see :mod:`stream.serving.app`)."""

from __future__ import annotations

import argparse

from stream.cli.base import SubParsers
from stream.serving import app
from stream.serving.settings import WorkerSettings


def add_parser(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="serve recommendations: consume clicks, publish top-N",
        description="Run a streaming worker (a Faust app). Each flag has an environment "
        "variable equivalent; flags win.",
    )
    WorkerSettings.add_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return app.run(WorkerSettings.from_args(args))
