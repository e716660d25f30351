"""``streamrec availability set|list``: write and read the item-availability topic."""

from __future__ import annotations

import argparse
from pathlib import Path

from confluent_kafka import KafkaException, Producer

from model.errors import UserError
from model.rules import read_unavailable
from stream.cli.base import SubParsers, print_json
from stream.kafka.config import bootstrap_servers, producer_config
from stream.serving.availability import (
    AvailabilityFollower,
    availability_value,
    ensure_availability_topic,
)

DEFAULT_TOPIC = "item-availability"


def run_set(args: argparse.Namespace) -> int:
    """Mark items unavailable (a record ``{"available": false}``) or available again (a
    tombstone, which compaction then removes), and wait for the broker to acknowledge."""
    items = list(args.items) + (sorted(read_unavailable(args.file)) if args.file else [])
    if not items:
        raise UserError("no items given: name them, or --file FILE")
    bootstrap = bootstrap_servers(args.broker)
    ensure_availability_topic(bootstrap, args.topic)
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 5}))
    acknowledged: list[float] = []
    failures: list[str] = []

    def delivered(error: object, message: object) -> None:
        if error is not None:
            failures.append(str(error))
        else:
            acknowledged.append(message.timestamp()[1] / 1000.0)  # type: ignore[attr-defined]

    value = availability_value(args.available)
    for item in items:
        producer.produce(args.topic, key=item.encode("utf-8"), value=value, on_delivery=delivered)
        producer.poll(0)
    remaining = producer.flush(30)
    if failures or remaining:
        raise UserError(
            f"{len(failures) + remaining} of {len(items)} records not acknowledged"
            + (f": {failures[0]}" if failures else " within 30 s")
        )
    print_json(
        {
            "topic": args.topic,
            "items": len(items),
            "available": args.available,
            "acknowledged_at": max(acknowledged),
        }
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Read the topic to its end and report the unavailable items (the snapshot that
    ``evaluate --availability`` and ``report --availability`` read)."""
    try:
        follower = AvailabilityFollower(bootstrap_servers(args.broker), args.topic)
        follower.start(timeout=args.timeout).wait_until_read(args.timeout)
    except KafkaException as exc:
        raise UserError(f"cannot read {args.topic!r}: {exc}") from None
    _, unavailable = follower.snapshot()
    bad = follower.take_bad_records()
    follower.stop()
    result: dict[str, object] = {
        "topic": args.topic,
        "unavailable": len(unavailable),
        "bad_records": len(bad),
    }
    if args.out:
        Path(args.out).write_text("".join(f"{item}\n" for item in sorted(unavailable)))
        result["out"] = args.out
    else:
        result["items"] = sorted(unavailable)
    print_json(result)
    return 0


def add_parser(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "availability",
        help="mark items unavailable or available again; list the unavailable ones",
        description="The item-availability topic every worker follows: an unavailable "
        "item is left out of every recommendation within a second.",
    )
    commands = parser.add_subparsers(dest="availability_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--broker", default="kafka://127.0.0.1:9092", help="Kafka bootstrap URL")
        p.add_argument(
            "--topic", default=DEFAULT_TOPIC, help=f"availability topic (default {DEFAULT_TOPIC})"
        )

    p = commands.add_parser(
        "set",
        help="mark items unavailable or available",
        description="Write availability records and wait for the broker's acknowledgement; "
        "the last stdout line is JSON with the latest acknowledgement time.",
    )
    p.add_argument("items", nargs="*", metavar="ITEM", help="item ids")
    p.add_argument("--file", help="also the item ids of this file, one per line")
    state = p.add_mutually_exclusive_group(required=True)
    state.add_argument("--unavailable", action="store_true", help="never recommend them")
    state.add_argument("--available", action="store_true", help="recommend them again")
    common(p)
    p.set_defaults(run=run_set)

    p = commands.add_parser(
        "list",
        help="the unavailable items",
        description="Read the topic to its end; the last stdout line is JSON with the "
        "unavailable items (or, with --out, how many were written to FILE).",
    )
    p.add_argument(
        "--out", help="write the unavailable item ids to this file, one per line (a snapshot)"
    )
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to read to the end (default 30)"
    )
    common(p)
    p.set_defaults(run=run_list)
