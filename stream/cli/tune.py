"""``streamrec split`` and ``streamrec tune``: from a user's own click log to the
hyperparameters that suit it, without looking at the test period.

``split`` cuts the log by time as the GRU4Rec authors do (:func:`model.data.split_for_tuning`)
and ``tune`` searches on its ``train_tr`` / ``train_valid`` part (:mod:`model.tune`); the
best parameters then train on ``train_full`` (``streamrec train --params``) for the test.
Progress on stderr; the last stdout line is JSON, as for every command.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.config import GRU4RecConfig
from model.data import SPLIT_NAMES, ClickLog, split_for_tuning
from model.errors import UserError
from model.synth import write_clicks
from model.tune import FILES, Budget, SearchSpace, require_optuna, search
from stream.cli.base import SubParsers, print_json
from stream.cli.offline import add_data_options, read_log


def run_split(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    logs, filtering = split_for_tuning(
        read_log(args.data, args), test_days=args.test_days, valid_days=args.valid_days
    )
    print(f"{args.data}: {filtering}", file=sys.stderr)
    out = Path(args.out)
    summary: dict[str, Any] = {}
    try:
        for name, part in logs.items():
            path = out / f"{name}.tsv"
            write_clicks(part, path)
            summary[name] = {"path": str(path), **_describe(part)}
    except OSError as exc:
        raise UserError(f"{out}: cannot write the split ({exc.strerror})") from None
    print_json({**summary, "seconds": time.perf_counter() - started})
    return 0


def _describe(log: ClickLog) -> dict[str, Any]:
    """Size and time range of one part of the split (times as UTC ISO 8601)."""

    def iso(seconds: float) -> str:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()

    return {
        "events": len(log),
        "sessions": log.n_sessions,
        "items": int(len(np.unique(log.items))),
        "start": iso(float(log.times.min())),
        "end": iso(float(log.times.max())),
    }


def run_tune(args: argparse.Namespace) -> int:
    budget = Budget(trials=args.trials, seconds=args.budget_s)
    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    space = SearchSpace.from_file(args.space) if args.space else SearchSpace.default()
    require_optuna()  # before the logs are read: a missing extra is said at once
    train_log = read_log(args.train, args)
    valid_log = read_log(args.valid, args)
    result = search(
        train_log,
        valid_log,
        inputs={"train": args.train, "valid": args.valid},
        out=Path(args.out),
        budget=budget,
        space=space,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        progress=lambda line: print(f"tune: {line}", file=sys.stderr, flush=True),
    )
    print_json(result)
    return 0


def add_parsers(subparsers: SubParsers) -> None:
    """Register ``split`` and ``tune`` on the ``streamrec`` parser."""
    p = subparsers.add_parser(
        "split",
        help="split a click log by time into train/test and train/validation files",
        description="The GRU4Rec authors' preprocessing: the standard filter (items with 5+ "
        "clicks, then sessions with 2+), then sessions ending in the last --test-days go "
        "to test.tsv and the rest to train_full.tsv; test keeps only items of train_full, "
        "then sessions with 2+ clicks. The same split inside train_full with --valid-days "
        f"gives train_tr.tsv and train_valid.tsv. Writes {', '.join(SPLIT_NAMES)} (.tsv) "
        "to OUT; the last stdout line is JSON (events, sessions, items, time range of each).",
    )
    p.add_argument("--data", required=True, help="the whole click log (TSV/CSV)")
    p.add_argument("--out", required=True, help="directory for the four files")
    p.add_argument(
        "--test-days", type=float, required=True, help="days at the end of the log for test"
    )
    p.add_argument(
        "--valid-days",
        type=float,
        required=True,
        help="days at the end of train_full for validation while tuning",
    )
    add_data_options(p)
    p.set_defaults(run=run_split)

    p = subparsers.add_parser(
        "tune",
        help="search the hyperparameters that suit a click log (Optuna)",
        description="Optuna's TPE search over GRU4Rec's hyperparameters: each trial trains "
        "on TRAIN and is scored by Recall@20 on VALID after every epoch; trials behind the "
        "median of the others at the same epoch are pruned. The study is kept in "
        f"OUT/{FILES['study']} and resumes when run again with the same OUT; "
        f"OUT/{FILES['best']} is for `streamrec train --params`. One progress line per "
        "trial on stderr; the last stdout line is JSON. Needs the `tune` extra.",
    )
    p.add_argument("--train", required=True, help="training log (train_tr.tsv of `split`)")
    p.add_argument("--valid", required=True, help="validation log (train_valid.tsv of `split`)")
    p.add_argument(
        "--trials",
        type=int,
        help="stop when the study holds N finished trials (a resumed study's count too)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        help="this run's wall-clock budget: no trial starts that would not end in time",
    )
    p.add_argument(
        "--space",
        metavar="FILE",
        help=f"search space as JSON (default: the built-in one, written to OUT/"
        f"{FILES['space']} as a starting point)",
    )
    p.add_argument(
        "--out", default="tune", help="study directory, created or resumed (default: tune)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=GRU4RecConfig.n_epochs,
        help=f"epochs per trial (default {GRU4RecConfig.n_epochs})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and the training")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_data_options(p)
    p.set_defaults(run=run_tune)
