"""`streamrec`: one entry point, one subcommand per job.

Each subcommand is a short file of this package that registers itself through an
``add_parser(subparsers)`` function over the code it drives; this module only wires them
together and turns a :class:`model.errors.UserError` into one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from model.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from stream.cli import (bench, broker, demo, model, offline, replay, report, trainer,
                            worker)

    parser = argparse.ArgumentParser(
        prog="streamrec",
        description="Real-time session-based recommendations (GRU4Rec) on Kafka.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    offline.add_parsers(subparsers)
    report.add_parser(subparsers)
    broker.add_parser(subparsers)
    worker.add_parser(subparsers)
    trainer.add_parser(subparsers)
    model.add_parser(subparsers)
    replay.add_parser(subparsers)
    demo.add_parser(subparsers)
    bench.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _limit_torch_threads()
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"streamrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"streamrec {args.command}: interrupted", file=sys.stderr)
        return 130


def _limit_torch_threads() -> None:
    """One torch thread unless ``STREAMREC_TORCH_THREADS`` says otherwise.

    GRU4Rec's steps are many small kernels. On a 2-core machine busy with anything else
    (a broker, other jobs), OpenMP threads spin-waiting for a descheduled sibling made
    training up to 20x slower than one thread; on an idle one, two threads were between
    0.9x and 1.5x as fast as one across our runs. One thread is the safe default.
    """
    import torch

    raw = os.environ.get("STREAMREC_TORCH_THREADS", "1")
    try:
        threads = int(raw)
    except ValueError:
        threads = 0
    if threads < 1:
        print(f"streamrec: error: STREAMREC_TORCH_THREADS={raw!r} must be a positive integer",
              file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
