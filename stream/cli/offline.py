"""The offline subcommands: ``train``, ``evaluate``, ``baseline`` and ``synth``.

Their contract, relied on by scripts and by the other commands: progress goes to stderr,
and the last line on stdout is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from model.artifact import load_model, save_model
from model.baselines import METHODS, make_baseline
from model.config import GRU4RecConfig
from model.data import ClickLog, read_clicks, standard_filter
from model.errors import UserError
from model.evaluate import DEFAULT_KS, TIE_MODES, RecommenderScorer, evaluate
from model.inference import Recommender
from model.item_index import APPROXIMATE_FROM, RANKINGS
from model.rules import RECENT_ITEMS, read_unavailable
from model.synth import add_shape_options, generate, spec_from_args, write_clicks
from model.train import train
from stream.cli.base import print_json


def add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--columns",
        nargs=3,
        metavar=("SESSION", "ITEM", "TIME"),
        default=["SessionId", "ItemId", "Time"],
        help="column names (default: SessionId ItemId Time)",
    )
    parser.add_argument(
        "--sep", default=None, help="field separator (default: ',' for .csv, tab otherwise)"
    )


def read_log(path: str, args: argparse.Namespace, filtered: bool = False) -> ClickLog:
    """Read a click log with the command's ``--columns``/``--sep`` (see add_data_options)."""
    log = read_clicks(path, columns=tuple(args.columns), sep=args.sep)
    if filtered:
        log, report = standard_filter(log)
        print(f"{path}: {report}", file=sys.stderr)
    return log


def add_ranking_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ranking",
        choices=RANKINGS,
        default="auto",
        help="exact: score every item; approximate: through the model's item index "
        "(re-ranked exactly; built now if the model has none); auto (default): "
        f"approximate from {APPROXIMATE_FROM:,} items on when the model has an index",
    )


def add_rules_options(parser: argparse.ArgumentParser) -> None:
    """The worker's catalogue rules, for offline runs (:mod:`model.rules`)."""
    parser.add_argument(
        "--availability",
        metavar="FILE",
        help="availability snapshot: one unavailable item id per line (what "
        "'streamrec availability list' prints); those items are never recommended",
    )
    parser.add_argument(
        "--exclude-seen",
        action="store_true",
        help=f"leave each session's last {RECENT_ITEMS} clicked items out of its "
        "recommendations (as the worker's --exclude-seen)",
    )


def apply_rules(recommender: Recommender, args: argparse.Namespace) -> str:
    """Give ``recommender`` the ``--availability`` snapshot; a line saying the rules."""
    unavailable = read_unavailable(args.availability) if args.availability else set()
    known = recommender.restrict(unavailable)
    return (
        f"rules: {len(unavailable):,} items unavailable ({known:,} known to the model), "
        f"seen items {'excluded' if args.exclude_seen else 'allowed'}"
    )


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=list(DEFAULT_KS),
        help="cutoffs for Recall@K and MRR@K (default: 1 5 10 20)",
    )
    parser.add_argument(
        "--ties",
        choices=TIE_MODES,
        default="conservative",
        help="how a target tied with other items is ranked (default: "
        "conservative, the target loses ties)",
    )


def run_train(args: argparse.Namespace) -> int:
    base = GRU4RecConfig.from_file(args.params) if args.params else None
    config = GRU4RecConfig.from_strings(args.param, base)
    if args.epochs is not None:
        config = config.replace(n_epochs=args.epochs)
    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out}: already exists; choose a new model directory")
    log = read_log(args.data, args, filtered=args.filter)
    recommender, stats = train(
        log, config, seed=args.seed, device=args.device, progress=not args.quiet
    )
    index_seconds = recommender.build_index()
    training = {
        "events_per_s": stats.events_per_s,
        "epochs": stats.epochs,
        "final_loss": stats.final_loss,
        "epoch_losses": list(stats.epoch_losses),
        "n_items": recommender.n_items,
        "n_events": stats.n_events,
        "n_sessions": log.n_sessions,
        "train_seconds": stats.train_seconds,
        "index_seconds": index_seconds,
        "seed": args.seed,
        "data": str(args.data),
        "device": str(recommender.device),
    }
    save_model(recommender, out, training=training)
    print_json({**training, "model": str(out), "version": recommender.version})
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    recommender = load_model(args.model, device=args.device)
    print(f"ranking: {recommender.use_ranking(args.ranking)}", file=sys.stderr)
    print(apply_rules(recommender, args), file=sys.stderr)
    log = read_log(args.data, args)
    started = time.perf_counter()
    scorer = RecommenderScorer(recommender, depth=max(args.k), exclude_seen=args.exclude_seen)
    result = evaluate(scorer, log, ks=args.k, ties=args.ties)
    print_json(
        {
            **result.to_dict(),
            "model_version": recommender.version,
            "seconds": time.perf_counter() - started,
        }
    )
    return 0


def run_baseline(args: argparse.Namespace) -> int:
    train_log = read_log(args.train, args)
    test_log = read_log(args.test, args)
    started = time.perf_counter()
    scorer = make_baseline(args.method, train_log)
    result = evaluate(scorer, test_log, ks=args.k, ties=args.ties)
    print_json(
        {**result.to_dict(), "method": args.method, "seconds": time.perf_counter() - started}
    )
    return 0


def run_synth(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    started = time.perf_counter()
    log = generate(spec)
    write_clicks(log, args.out)
    print_json(
        {
            "out": str(args.out),
            "events": len(log),
            "sessions": log.n_sessions,
            "items": int(len(np.unique(log.items))),
            "seconds": time.perf_counter() - started,
        }
    )
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the offline subcommands on the ``streamrec`` parser."""
    p = subparsers.add_parser(
        "train",
        help="train GRU4Rec on a click log and save a model directory",
        description="Train GRU4Rec (defaults: the best published setting for RSC15-like "
        "data). Progress on stderr; last stdout line is JSON.",
    )
    p.add_argument("--data", required=True, help="training click log (TSV/CSV)")
    p.add_argument("--out", required=True, help="model directory to create (must not exist)")
    p.add_argument(
        "--params",
        metavar="FILE",
        help="hyperparameters from a JSON file instead of the defaults: the best_params.json "
        "of `streamrec tune`, or a model's config.json",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyperparameter override on top of the defaults or --params, repeatable "
        "(e.g. loss=bpr-max, layers=100)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="number of epochs (default: the --params file's, else 10)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--filter",
        action="store_true",
        help="apply the standard GRU4Rec filtering (items >= 5 clicks, sessions "
        ">= 2 clicks) and report what it removed",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_data_options(p)
    p.set_defaults(run=run_train)

    p = subparsers.add_parser(
        "evaluate",
        help="Recall@K / MRR@K of a model on a test log",
        description="Next-item evaluation over the full catalogue (the papers' protocol).",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="test click log")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    _add_eval_options(p)
    add_ranking_option(p)
    add_rules_options(p)
    add_data_options(p)
    p.set_defaults(run=run_evaluate)

    p = subparsers.add_parser(
        "baseline",
        help="evaluate POP, S-POP or Item-KNN with the same protocol",
        description="Fit a baseline on TRAIN and evaluate it on TEST like `evaluate`.",
    )
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--train", required=True, help="training click log")
    p.add_argument("--test", required=True, help="test click log")
    _add_eval_options(p)
    add_data_options(p)
    p.set_defaults(run=run_baseline)

    p = subparsers.add_parser(
        "synth",
        help="generate a synthetic click log",
        description="Synthetic clicks: Zipf item popularity, heavy-tailed short sessions, "
        "optional latent intents and learnable item-to-item transitions "
        "(see model/synth.py).",
    )
    p.add_argument("--out", required=True, help="TSV file to write")
    p.add_argument("--sessions", type=int, required=True, help="sessions to generate")
    p.add_argument("--items", type=int, required=True, help="catalogue size")
    add_shape_options(p)
    p.set_defaults(run=run_synth)
