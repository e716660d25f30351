"""``streamrec bench train|scale``: training speed and accuracy; loading and memory at scale.

Benchmarks are commands, not tests: a slow shared machine must never fail a test, and the
figures they print are what the README and the issue notes quote.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from model.config import GRU4RecConfig
from model.data import read_clicks
from model.evaluate import RecommenderScorer, evaluate
from model.synth import add_shape_options, generate, spec_from_args, write_clicks
from model.train import train


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_train_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Training throughput with the default (published) setting, and its accuracy."""
    log = read_clicks(args.data)
    config = GRU4RecConfig(n_epochs=args.epochs)
    recommender, stats = train(
        log, config, seed=args.seed, device=args.device, progress=not args.quiet
    )
    result = {
        "epochs": stats.epochs,
        "n_events": stats.n_events,
        "train_seconds": stats.train_seconds,
        "events_per_s": stats.events_per_s,
        "final_loss": stats.final_loss,
        "device": str(recommender.device),
        "torch_threads": torch.get_num_threads(),
    }
    if args.test:
        metrics = evaluate(RecommenderScorer(recommender), read_clicks(args.test), ks=(5, 20))
        result.update(metrics.to_dict())
    return result


def run_scale_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Generate a large log, time its loading, and train on it within a memory bound."""
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        path = Path(tmp) / "synthetic.tsv"
        started = time.perf_counter()
        log = generate(spec_from_args(args))
        write_clicks(log, path)
        generate_seconds = time.perf_counter() - started
        n_events = len(log)
        del log
        print(f"wrote {n_events:,} events in {generate_seconds:.0f} s", file=sys.stderr)
        rss_before_load = _peak_rss_gib()
        started = time.perf_counter()
        log = read_clicks(path)
        load_seconds = time.perf_counter() - started
        rss_after_load = _peak_rss_gib()
        config = GRU4RecConfig(n_epochs=1)
        recommender, stats = train(
            log, config, seed=args.seed, progress=not args.quiet, max_batches=args.batches
        )
        return {
            "events": n_events,
            "items": recommender.n_items,
            "sessions": log.n_sessions,
            "load_seconds": load_seconds,
            "file_bytes": path.stat().st_size,
            "peak_rss_gib_before_load": rss_before_load,
            "peak_rss_gib_after_load": rss_after_load,
            "peak_rss_gib": _peak_rss_gib(),
            "trained_batches": args.batches,
            "train_seconds": stats.train_seconds,
            "train_events_per_s": args.batches * config.batch_size / max(stats.train_seconds, 1e-9),
        }


def add_parsers(benches: argparse._SubParsersAction) -> None:
    p = benches.add_parser(
        "train",
        help="training speed (and accuracy with --test)",
        description="Train with the default setting and report events/s.",
    )
    p.add_argument("--data", required=True, help="training click log")
    p.add_argument("--test", help="test click log: also report Recall/MRR@5,20")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(measure=run_train_bench)

    p = benches.add_parser(
        "scale",
        help="load time and memory on a large synthetic log",
        description="Generate SESSIONS synthetic sessions over ITEMS items "
        "(default ≈ 30M events, 40k items, the size of RSC15), "
        "time loading it, then train on it and report peak RSS.",
    )
    p.add_argument("--sessions", type=int, default=8_200_000)
    p.add_argument("--items", type=int, default=40_000)
    p.add_argument(
        "--batches",
        type=int,
        default=20_000,
        help="mini-batches to train (memory is reached long before an epoch ends)",
    )
    add_shape_options(p)
    p.add_argument("--tmp-dir", default=None, help="where to write the temporary log")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(measure=run_scale_bench)
