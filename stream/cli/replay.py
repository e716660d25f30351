"""``streamrec replay``: send a click log to Kafka in event-time order."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TextIO

from model.data import DEFAULT_COLUMNS
from model.errors import UserError
from stream.cli.base import SubParsers, print_json, signals_as_interrupt
from stream.kafka.config import bootstrap_servers
from stream.kafka.log_sender import (
    DEFAULT_TOPIC,
    ReplayInterrupted,
    ReplayLog,
    ReplayStats,
    check_topic,
    parse_speed,
    read_replay_log,
    replay,
)


def report_bad_rows(log: ReplayLog, out: TextIO) -> None:
    """Tell the user which rows are skipped (the first few by line) before sending starts."""
    if not log.bad_rows:
        return
    shown = len(log.bad_row_examples)
    more = f"; the first {shown}:" if shown < log.bad_rows else ":"
    print(f"{log.source}: skipping {log.bad_rows} bad row(s){more}", file=out)
    for bad in log.bad_row_examples:
        print(f"  {bad}", file=out)
    out.flush()


def _speed_arg(text: str) -> float | None:
    try:
        return parse_speed(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"bad limit {text!r}: must be a whole number >= 0")
    return value


def add_parser(subparsers: SubParsers) -> None:
    """Register ``streamrec replay``."""
    parser = subparsers.add_parser(
        "replay",
        help="send a click log to Kafka in event-time order",
        description=(
            "Send a click log to a Kafka topic in event-time order across sessions, keyed by\n"
            "session id and partitioned with murmur2 like the Faust workers expect. Rows\n"
            "that cannot be used are skipped and reported by line. Progress goes to stderr;\n"
            "the last stdout line is JSON: events_sent, seconds, events_per_s, bad_rows,\n"
            "topic, partitions, delivery_errors. Exit status 2 on bad input or any\n"
            "delivery error, 130 after Ctrl-C (what was sent is flushed and reported)."
        ),
        epilog=(
            "security: set STREAMREC_KAFKA_SECURITY_PROTOCOL, STREAMREC_KAFKA_SASL_MECHANISM,\n"
            "STREAMREC_KAFKA_SASL_USERNAME, STREAMREC_KAFKA_SASL_PASSWORD,\n"
            "STREAMREC_KAFKA_SSL_CAFILE, STREAMREC_KAFKA_SSL_CERTFILE,\n"
            "STREAMREC_KAFKA_SSL_KEYFILE in the environment (never on the command line)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, metavar="LOG", help="the click log (CSV/TSV)")
    parser.add_argument(
        "--broker",
        required=True,
        metavar="URL",
        help="kafka://HOST:PORT or HOST:PORT, several separated by commas",
    )
    parser.add_argument(
        "--topic", default=DEFAULT_TOPIC, help="target topic; must exist (default: %(default)s)"
    )
    parser.add_argument(
        "--speed",
        type=_speed_arg,
        default=None,
        metavar="max|FACTOR",
        help="'max' (default) or FACTOR x real time: event-time gaps are divided by FACTOR",
    )
    parser.add_argument(
        "--limit",
        type=_limit_arg,
        default=None,
        metavar="N",
        help="send only the first N events (in replay order)",
    )
    parser.add_argument(
        "--columns",
        nargs=3,
        metavar=("SESSION", "ITEM", "TIME"),
        default=list(DEFAULT_COLUMNS),
        help="column names (default: SessionId ItemId Time)",
    )
    parser.add_argument(
        "--sep", default=None, help="field separator (default: ',' for .csv, tab otherwise)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``streamrec replay``: check, read, report bad rows, send, print JSON."""
    servers = bootstrap_servers(args.broker)
    # SIGINT too: a command started in the background by a script inherits it ignored
    with signals_as_interrupt(signal.SIGINT, signal.SIGTERM):  # both: flush, report
        partitions = check_topic(servers, args.topic)  # fail fast, before a long read
        try:
            log = read_replay_log(args.data, tuple(args.columns), args.sep)
            report_bad_rows(log, sys.stderr)
            stats = replay(
                log, servers, args.topic, args.speed, args.limit, progress=not args.quiet
            )
        except ReplayInterrupted as exc:
            stats = exc.stats
            print(
                f"interrupted: {stats.events_sent} event(s) sent and acknowledged",
                file=sys.stderr,
                flush=True,
            )
            print_json(stats.as_json())
            return 130
        except KeyboardInterrupt:  # before sending started: nothing sent
            print("interrupted before sending", file=sys.stderr, flush=True)
            print_json(
                ReplayStats(
                    topic=args.topic, partitions=partitions, events_sent=0, seconds=0.0, bad_rows=0
                ).as_json()
            )
            return 130
    print(
        f"sent {stats.events_sent} event(s) to {args.topic!r} in {stats.seconds:.2f} s "
        f"({stats.events_per_s:,.0f} events/s)",
        file=sys.stderr,
        flush=True,
    )
    print_json(stats.as_json())
    if stats.failed:
        raise UserError(
            f"{stats.delivery_errors} event(s) were not delivered to "
            f"{args.topic!r}: {stats.first_error}"
        )
    return 0
