"""``streamrec report``: GRU4Rec against the paper's baselines, by position and session
length, as ``report.json``, PNG plots and an ``index.html`` that works offline.

The numbers come from :mod:`model.report`; this module reads the inputs, draws and writes.
Plots use matplotlib's object API (:class:`matplotlib.figure.Figure`, rendered by Agg)
rather than pyplot, so the report builds on a server without a display whatever backend
the environment selects, and never touches global plotting state. Matplotlib is an
optional dependency (``streamrec[report]``), imported only when the command runs.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.artifact import load_model
from model.errors import UserError
from model.evaluate import TIE_MODES
from model.report import BASELINES, LABELS, MODEL_NAME, Report, build_report
from stream.cli.base import print_json
from stream.cli.offline import (
    add_data_options,
    add_ranking_option,
    add_rules_options,
    apply_rules,
    read_log,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_KS = (5, 20)
COLORS = {"gru4rec": "#d62728", "itemknn": "#1f77b4", "spop": "#2ca02c", "pop": "#7f7f7f"}
COMPARED_COLORS = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2")  # --compare models, in order
PLOTS = {  # file name -> caption
    "by_position.png": "Recall@{k} and MRR@{k} by position in the session (the prediction "
    "after the 1st, 2nd, ... click); grey bars: number of predictions",
    "by_session_length.png": "Recall@{k} and MRR@{k} by session length (events in the test "
    "session); grey bars: number of predictions",
    "session_lengths.png": "Session-length distribution of TRAIN and TEST",
    "coverage_popularity.png": "Catalogue coverage of the top-{k} lists against the share of "
    "their slots taken by TRAIN's 1% most popular items",
}
MAX_PLOTTED_LENGTH = 20  # the length histogram pools longer sessions into "20+"


def run(args: argparse.Namespace) -> int:
    """Build the report for the parsed ``args``; the last stdout line is a JSON summary."""
    started = time.perf_counter()
    figure_class = _figure_class()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    recommender = load_model(args.model, device=args.device)
    _progress(f"ranking: {recommender.use_ranking(args.ranking)}")
    _progress(apply_rules(recommender, args))
    labels = [label for label, _ in args.compare]
    if len(set(labels)) < len(labels):
        raise UserError(f"--compare: each label once, got {', '.join(labels)}")
    compared = {label: load_model(path, device=args.device) for label, path in args.compare}
    for other in compared.values():
        other.use_ranking(args.ranking)
        apply_rules(other, args)
    train_log = read_log(args.train, args)
    test_log = read_log(args.test, args)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the report directory ({exc.strerror})") from None
    report = build_report(
        recommender,
        train_log,
        test_log,
        ks=args.k,
        ties=args.ties,
        progress=_progress,
        exclude_seen=args.exclude_seen,
        compared=compared,
    )
    content = report.to_dict()
    content["inputs"] = {
        "model": str(args.model),
        "train": str(args.train),
        "test": str(args.test),
        "compared": dict(args.compare),
    }
    _progress("drawing plots")
    plots = {
        "by_position.png": _plot_buckets(
            figure_class, report, "by_position", "position in the session (clicks seen)"
        ),
        "by_session_length.png": _plot_buckets(
            figure_class, report, "by_session_length", "session length (events)"
        ),
        "session_lengths.png": _plot_session_lengths(figure_class, report),
        "coverage_popularity.png": _plot_lists(figure_class, report),
    }
    try:
        for name, figure in plots.items():
            figure.savefig(out / name, dpi=110)
        (out / "report.json").write_text(json.dumps(content, indent=1), encoding="utf-8")
        (out / "index.html").write_text(_html(content), encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{out}: cannot write the report ({exc.strerror})") from None
    k = report.list_k
    print_json(
        {
            "out": str(out),
            "report": str(out / "report.json"),
            "index": str(out / "index.html"),
            "plots": [str(out / n) for n in plots],
            "overall": {
                name: {
                    f"recall@{k}": m.result.recall(k),
                    f"mrr@{k}": m.result.mrr(k),
                    "n_predictions": m.result.n_predictions,
                }
                for name, m in report.methods.items()
            },
            "seconds": time.perf_counter() - started,
        }
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``report`` on the ``streamrec`` parser."""
    p = subparsers.add_parser(
        "report",
        help="GRU4Rec vs Item-KNN, S-POP and POP by position and session length, with plots",
        description="Evaluate a model and the paper's baselines (fitted on TRAIN) on TEST with "
        "the standard protocol; write report.json, PNG plots and index.html to "
        "OUT. Progress on stderr; last stdout line is JSON.",
    )
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        type=_labelled,
        metavar="LABEL=MODEL_DIR",
        help="another model to show beside --model under LABEL (e.g. tuned=models/tuned), "
        "repeatable",
    )
    p.add_argument("--train", required=True, help="training click log (fits the baselines)")
    p.add_argument("--test", required=True, help="test click log")
    p.add_argument(
        "--out",
        required=True,
        help="report directory (created if needed; report files are replaced)",
    )
    p.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=list(DEFAULT_KS),
        help="cutoffs for Recall@K and MRR@K; plots and top-K lists use the "
        "largest (default: 5 20)",
    )
    p.add_argument(
        "--ties",
        choices=TIE_MODES,
        default="conservative",
        help="how a target tied with other items is ranked (default: "
        "conservative, as in `evaluate`)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_ranking_option(p)
    add_rules_options(p)
    add_data_options(p)
    p.set_defaults(run=run)


def _labelled(value: str) -> tuple[str, str]:
    """``LABEL=MODEL_DIR`` of ``--compare`` as (label, directory)."""
    label, sep, path = value.partition("=")
    if not (sep and label.strip() and path.strip()):
        raise argparse.ArgumentTypeError(f"expected LABEL=MODEL_DIR, got {value!r}")
    return label.strip(), path.strip()


def _color(report: Report, name: str) -> str:
    """The fixed colour of GRU4Rec and the baselines; compared models take the next ones."""
    if name in COLORS:
        return COLORS[name]
    others = [n for n in report.methods if n not in COLORS]
    return COMPARED_COLORS[others.index(name) % len(COMPARED_COLORS)]


def _progress(message: str) -> None:
    print(f"report: {message}", file=sys.stderr, flush=True)


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the report needs matplotlib: pip install 'streamrec[report]'") from None
    return Figure


def _plot_buckets(
    figure_class: type[Figure], report: Report, attribute: str, xlabel: str
) -> Figure:
    """Recall@K and MRR@K per bucket, one line per method, prediction counts behind."""
    k = report.list_k
    figure = figure_class(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, 2)
    buckets = getattr(report.methods[MODEL_NAME], attribute)
    x = np.arange(len(buckets))
    for ax, metric in zip(axes, (f"recall@{k}", f"mrr@{k}")):
        counts = ax.twinx()
        counts.bar(x, [b.n_predictions for b in buckets], color="#dddddd", width=0.6)
        counts.set_ylabel("predictions", color="#888888")
        counts.tick_params(axis="y", colors="#888888")
        ax.set_zorder(counts.get_zorder() + 1)
        ax.patch.set_visible(False)
        for name, method in report.methods.items():
            values = [
                np.nan if b.metrics[metric] is None else b.metrics[metric]
                for b in getattr(method, attribute)
            ]
            ax.plot(
                x,
                values,
                marker="o",
                color=_color(report, name),
                label=LABELS.get(name, name),
                linewidth=1.4 if name in BASELINES else 2.4,
            )
        ax.set_xticks(x, [b.bucket for b in buckets])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric.replace("recall", "Recall").replace("mrr", "MRR"))
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    figure.legend(
        *axes[0].get_legend_handles_labels(),
        loc="outside lower center",
        ncols=len(report.methods),
        frameon=False,
    )
    figure.suptitle(f"Recall@{k} and MRR@{k} by {xlabel.split(' (')[0]}")
    return figure


def _plot_session_lengths(figure_class: type[Figure], report: Report) -> Figure:
    """Share of sessions per length in TRAIN and TEST, side by side."""
    figure = figure_class(figsize=(9, 3.8), layout="constrained")
    ax = figure.subplots()
    labels = [str(n) for n in range(1, MAX_PLOTTED_LENGTH)] + [f"{MAX_PLOTTED_LENGTH}+"]
    x = np.arange(len(labels))
    for offset, (name, summary) in zip(
        (-0.2, 0.2), (("TRAIN", report.train), ("TEST", report.test))
    ):
        counts = np.zeros(MAX_PLOTTED_LENGTH)
        head = summary.length_counts[1:MAX_PLOTTED_LENGTH]
        counts[: len(head)] = head
        counts[-1] = summary.length_counts[MAX_PLOTTED_LENGTH:].sum()
        share = 100 * counts / max(summary.n_sessions, 1)
        ax.bar(x + offset, share, width=0.4, label=f"{name} ({summary.n_sessions:,} sessions)")
    ax.set_xticks(x, labels)
    ax.set_xlabel("session length (events)")
    ax.set_ylabel("% of sessions")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    figure.suptitle("Session-length distribution")
    return figure


def _plot_lists(figure_class: type[Figure], report: Report) -> Figure:
    """Each method as a point: how much of the catalogue it shows, how popular it is."""
    k = report.list_k
    figure = figure_class(figsize=(6, 4.5), layout="constrained")
    ax = figure.subplots()
    for name, method in report.methods.items():
        coverage, popular = 100 * method.lists.coverage, 100 * method.lists.popular_share
        ax.scatter([coverage], [popular], s=70, color=_color(report, name))
        ax.annotate(
            LABELS.get(name, name), (coverage, popular), xytext=(6, 4), textcoords="offset points"
        )
    ax.set_xlim(0, 105)
    ax.set_ylim(0, 105)
    ax.set_xlabel(f"catalogue coverage of the top-{k} lists (%)")
    ax.set_ylabel(f"top-{k} slots holding TRAIN's 1% most popular items (%)")
    ax.grid(alpha=0.3)
    figure.suptitle("Coverage vs popularity")
    return figure


_CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}figure{margin:1em 0 2em}
figcaption{color:#555;font-size:.9em}.note{background:#f7f7f0;padding:.8em 1em;
border-left:4px solid #d62728}"""


def _html(content: dict[str, Any]) -> str:
    """A self-contained page: inline CSS, plots by relative path, no network assets."""
    k = content["list_k"]
    methods = content["methods"]
    esc = html.escape
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>streamrec evaluation report</title><style>{_CSS}</style></head><body>",
        "<h1>Evaluation report</h1>",
        f"<p>Model <code>{esc(content['inputs']['model'])}</code> (version "
        f"<code>{esc(content['model_version'])}</code>), baselines fitted on "
        f"<code>{esc(content['inputs']['train'])}</code>, evaluated on "
        f"<code>{esc(content['inputs']['test'])}</code>: every next click of every test "
        f"session ranked against the whole catalogue (tie rule: "
        f"{esc(content['ties'])}).</p>",
    ]
    compared = content["inputs"]["compared"]
    if compared:
        listed = ", ".join(f"{esc(a)} <code>{esc(b)}</code>" for a, b in compared.items())
        parts.append(f"<p>Compared with the same protocol: {listed}.</p>")
    if "comparison" in content:
        parts.append(f"<p class='note'>{esc(content['comparison']['note'])}</p>")
    header = (
        ["method"]
        + [f"{m}@{kk}" for kk in content["ks"] for m in ("Recall", "MRR")]
        + [
            "predictions",
            "skipped (unknown target)",
            f"coverage@{k}",
            f"popular share@{k}",
            "mean list length",
            "seconds",
        ]
    )
    rows = []
    for method in methods.values():
        overall, lists = method["overall"], method["lists"]
        rows.append(
            [esc(method["label"])]
            + [_number(overall[f"{m}@{kk}"]) for kk in content["ks"] for m in ("recall", "mrr")]
            + [
                f"{overall['n_predictions']:,}",
                f"{overall['n_skipped_unknown']:,}",
                _percent(lists["coverage"]),
                _percent(lists["popular_share"]),
                f"{lists['mean_list_length']:.1f}",
                f"{method['seconds']:.1f}",
            ]
        )
    parts += ["<h2>Overall</h2>", _table(header, rows)]
    for attribute, title, plot in (
        ("by_position", "By position in the session", "by_position.png"),
        ("by_session_length", "By session length", "by_session_length.png"),
    ):
        parts += [f"<h2>{title}</h2>", _figure(plot, PLOTS[plot].format(k=k))]
        first = next(iter(methods.values()))[attribute]
        header = ["method", "metric"] + [b["bucket"] for b in first]
        rows = [["", "predictions"] + [f"{b['n_predictions']:,}" for b in first]]
        for method in methods.values():
            for kk in content["ks"]:
                for metric in (f"recall@{kk}", f"mrr@{kk}"):
                    rows.append(
                        [esc(method["label"]), metric]
                        + [_number(b[metric]) for b in method[attribute]]
                    )
        parts.append(_table(header, rows))
    parts += [
        "<h2>Catalogue coverage and popularity</h2>",
        _figure("coverage_popularity.png", PLOTS["coverage_popularity.png"].format(k=k)),
        "<h2>Data</h2>",
        _figure("session_lengths.png", PLOTS["session_lengths.png"]),
    ]
    data = content["data"]
    rows = [
        [
            name,
            esc(d["source"]),
            f"{d['events']:,}",
            f"{d['sessions']:,}",
            f"{d['items']:,}",
            f"{d['mean_session_length']:.2f}",
            _percent(d["share_sessions_length_1_3"]),
        ]
        for name, d in (("TRAIN", data["train"]), ("TEST", data["test"]))
    ]
    parts += [
        _table(
            ["log", "file", "events", "sessions", "items", "mean length", "sessions of length 1-3"],
            rows,
        ),
        f"<p>Popular items: the {data['popular_items']:,} most clicked items of TRAIN "
        f"(its top 1%).</p></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(src: str, caption: str) -> str:
    return (
        f"<figure><img src='{src}' alt='{html.escape(caption)}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"
