"""``streamrec bench ...``: the benchmarks, each printing its measurement as JSON.

Each benchmark module of :mod:`stream.bench` declares its subcommands and sets a
``measure`` function returning the figures; this file only prints them.
"""

from __future__ import annotations

import argparse

from stream.bench import faults, learning, offline, serving, soak
from stream.cli.base import SubParsers, print_json


def add_parser(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks (print JSON)",
        description="Benchmarks; the last stdout line is JSON.",
    )
    parser.set_defaults(run=_print_measurement)
    benches = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for module in (offline, serving, learning, soak, faults):
        module.add_parsers(benches)


def _print_measurement(args: argparse.Namespace) -> int:
    print_json(args.measure(args))
    return 0
