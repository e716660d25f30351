"""`streamrec`: one entry point, one subcommand per job.

Each subcommand is a short file of this package that registers itself through an
``add_parser(subparsers)`` function over the code it drives; this module only wires them
together and turns a :class:`model.errors.UserError` into one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from model.errors import UserError

#: The command files, in ``--help`` order.
COMMANDS = (
    "offline",
    "tune",
    "report",
    "broker",
    "worker",
    "trainer",
    "model",
    "availability",
    "replay",
    "demo",
    "bench",
)
#: Tooling an install may leave out (the runtime image does): the commands built on it
#: are then absent instead of breaking every command.
OPTIONAL_MODULES = ("stream.bench", "stream.devtools", "stream.cli.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamrec",
        description="Real-time session-based recommendations (GRU4Rec) on Kafka.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            command = importlib.import_module(f"stream.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name in OPTIONAL_MODULES:
                continue
            raise
        register = getattr(command, "add_parsers", None) or command.add_parser
        register(subparsers)
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
        print(
            f"streamrec: error: STREAMREC_TORCH_THREADS={raw!r} must be a positive integer",
            file=sys.stderr,
        )
        sys.exit(2)
    torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
