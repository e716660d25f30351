"""`streamrec`: one entry point, one subcommand per job.

Each subcommand lives next to the code it drives and registers itself through an
``add_parser(subparsers)`` function; this module only wires them together and turns a
:class:`model.errors.UserError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from model.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from stream import (bench, brokers, demo, offline_commands, registry, replay,
                        report_command, trainer, worker)

    parser = argparse.ArgumentParser(
        prog="streamrec",
        description="Real-time session-based recommendations (GRU4Rec) on Kafka.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    offline_commands.add_parsers(subparsers)
    report_command.add_parser(subparsers)
    brokers.add_parser(subparsers)
    worker.add_parser(subparsers)
    trainer.add_parser(subparsers)
    registry.add_parser(subparsers)
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
    """Apply ``STREAMREC_TORCH_THREADS`` (torch's intra-op threads) when it is set.

    Unset, torch uses every core, which on an idle 2-core machine trains 1.5x faster than
    one thread. On a machine busy with other work (a broker, other jobs), set it to 1:
    idle OpenMP threads spin-wait for descheduled siblings and made GRU4Rec's many small
    kernels many times slower there. The worker has its own ``--torch-threads`` (default 1),
    since it always shares the machine with the Kafka client threads.
    """
    import torch

    raw = os.environ.get("STREAMREC_TORCH_THREADS")
    if raw is None:
        return
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
