"""The evaluation report: top-K lists consistent with the metrics, per-position answers known
by construction, overall numbers identical to `streamrec evaluate` / `baseline`, a headless
build, and the rsc15-100k report with a briefly trained model."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.artifact import save_model
from model.baselines import make_baseline
from model.config import GRU4RecConfig
from model.data import ClickLog, ItemMap, read_clicks
from model.errors import UserError
from model.evaluate import evaluate, target_ranks
from model.report import (
    POSITIONS,
    SESSION_LENGTHS,
    Buckets,
    evaluate_method,
    popular_item_ids,
    top_k_lists,
)
from model.synth import SynthSpec, generate, write_clicks
from model.train import train
from stream.cli import report as report_command
from stream.cli.main import main as streamrec_main
from stream.devtools.testing import TINY

REPO = Path(__file__).resolve().parents[1]
RSC15 = REPO.parent / "shared" / "data" / "rsc15-100k"
PLOTS = (
    "by_position.png",
    "by_session_length.png",
    "session_lengths.png",
    "coverage_popularity.png",
)


def report_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="streamrec")
    report_command.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["report", *argv])


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def run_report(*argv: str) -> dict:
    """``streamrec report ARGV`` in this process; returns its JSON summary line."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert report_command.run(report_args(*argv)) == 0
    return last_json(out.getvalue())


def streamrec_json(*argv: str) -> dict:
    """Another ``streamrec`` subcommand in this process; returns its JSON line."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert streamrec_main(list(argv)) == 0
    return last_json(out.getvalue())


def assert_consistent(report: dict) -> None:
    """Buckets partition the predictions; their weighted means are the overall metrics."""
    ks = report["ks"]
    for method in report["methods"].values():
        overall = method["overall"]
        for attribute in ("by_position", "by_session_length"):
            buckets = method[attribute]
            n = sum(b["n_predictions"] for b in buckets)
            assert n == overall["n_predictions"]
            for k in ks:
                for metric in (f"recall@{k}", f"mrr@{k}"):
                    weighted = sum(
                        b[metric] * b["n_predictions"] for b in buckets if b["n_predictions"]
                    )
                    assert weighted / n == pytest.approx(overall[metric], abs=1e-12)
        assert 0.0 < method["lists"]["coverage"] <= 1.0
        assert 0.0 <= method["lists"]["popular_share"] <= 1.0
        assert 0.0 < method["lists"]["mean_list_length"] <= max(ks)


# --- building blocks ------------------------------------------------------------------------


def test_bucket_labels_and_assignment() -> None:
    assert POSITIONS.labels == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10+"]
    assert SESSION_LENGTHS.labels == ["2", "3", "4", "5", "6-9", "10+"]
    lengths = np.array([2, 3, 5, 6, 9, 10, 250])
    assert SESSION_LENGTHS.index(lengths).tolist() == [0, 1, 3, 4, 4, 5, 5]
    assert Buckets((1, 3)).labels == ["1-2", "3+"]


@pytest.mark.parametrize("ties", ["conservative", "optimistic", "median"])
def test_top_k_lists_hold_exactly_the_targets_that_would_hit(ties: str) -> None:
    """Item t is in a row's top-k list iff a target t would count as a hit at k."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (40, 9), generator=generator).float()  # many ties
    for k in (1, 2, 3, 5, 9, 20):
        listed = top_k_lists(scores, k, ties)
        for item in range(scores.shape[1]):
            targets = torch.full((scores.shape[0],), item)
            assert torch.equal(listed[:, item], target_ranks(scores, targets, ties) <= k)


def test_popular_items_are_the_top_percent_of_train() -> None:
    # 150 items: the top 1% rounds up to 2; of three tied items, the first two seen win
    items = [str(i) for i in range(150)] + ["9"] * 5 + ["7"] * 5 + ["3"] * 5 + ["1"] * 4
    log = ClickLog.from_arrays([str(n) for n in range(len(items))], items, range(len(items)))
    assert popular_item_ids(log) == ["3", "7"]


# --- per-position answers known by construction ---------------------------------------------

N_ITEMS = 40


class ShiftScorer:
    """After item i, item i+1 ranks first, i+2 second, ... (mod N_ITEMS); no ties."""

    def __init__(self) -> None:
        self.item_map = ItemMap(str(i) for i in range(N_ITEMS))
        columns = torch.arange(N_ITEMS)
        self.table = torch.stack([-((columns - i - 1) % N_ITEMS).float() for i in range(N_ITEMS)])

    def start(self, n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.int64)

    def advance(self, states: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.where(items >= 0, items, states)

    def score(self, states: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        return self.table[torch.from_numpy(states[rows])]


def ranked_session(first: int, length: int) -> list[int]:
    """A session whose p-th prediction (after p clicks) has its target at rank p."""
    items = [first]
    for position in range(1, length):
        items.append((items[-1] + position) % N_ITEMS)
    return items


def test_hand_built_breakdown_matches_construction() -> None:
    sessions = {
        "long": [str(i) for i in ranked_session(0, 12)],  # ranks 1..11 at positions 1..11
        "three": [str(i) for i in ranked_session(5, 3)],  # ranks 1, 2
        "two": [str(i) for i in ranked_session(20, 2)],  # rank 1
        # "X" is unknown: that target is skipped, and the state stays at 30, so the next
        # target (32) is at rank 2 at position 2
        "unknown": ["30", "X", "32"],
    }
    session_ids = [s for s, items in sessions.items() for _ in items]
    item_ids = [i for items in sessions.values() for i in items]
    log = ClickLog.from_arrays(session_ids, item_ids, range(len(item_ids)))
    method = evaluate_method(
        "shift",
        ShiftScorer(),
        log,
        ks=(5, 20),
        ties="conservative",
        popular_ids=["1", "2", "nowhere"],
    )

    assert method.result.n_predictions == 11 + 2 + 1 + 1
    assert method.result.n_skipped_unknown == 1
    expected_ranks = {
        "1": [1, 1, 1],
        "2": [2, 2, 2],
        "3": [3],
        "4": [4],
        "5": [5],
        "6": [6],
        "7": [7],
        "8": [8],
        "9": [9],
        "10+": [10, 11],
    }
    for bucket in method.by_position:
        ranks = np.array(expected_ranks[bucket.bucket], dtype=float)
        assert bucket.n_predictions == len(ranks)
        assert bucket.metrics["recall@5"] == pytest.approx(np.mean(ranks <= 5))
        assert bucket.metrics["mrr@5"] == pytest.approx(np.mean(np.where(ranks <= 5, 1 / ranks, 0)))
        assert bucket.metrics["recall@20"] == 1.0
        assert bucket.metrics["mrr@20"] == pytest.approx(np.mean(1 / ranks))
    by_length = {b.bucket: b for b in method.by_session_length}
    assert {label: b.n_predictions for label, b in by_length.items()} == {
        "2": 1,
        "3": 3,
        "4": 0,
        "5": 0,
        "6-9": 0,
        "10+": 11,
    }
    assert by_length["3"].metrics["mrr@20"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert by_length["10+"].metrics["recall@5"] == pytest.approx(5 / 11)
    assert by_length["4"].metrics["recall@20"] is None  # empty, not zero

    # each top-20 list is the 20 items after the last known click
    last_clicks = [
        int(i) for i in sessions["long"][:-1] + sessions["three"][:-1] + sessions["two"][:-1]
    ] + [30]
    lists = [{(last + step) % N_ITEMS for step in range(1, 21)} for last in last_clicks]
    assert method.lists.n_items == N_ITEMS
    assert method.lists.n_recommended == len(set().union(*lists))
    assert method.lists.n_slots == 20 * len(lists)
    assert method.lists.n_popular_slots == sum(len(items & {1, 2}) for items in lists)


@pytest.mark.parametrize(
    ("ties", "list_length"), [("conservative", 1), ("optimistic", 3), ("median", 1)]
)
def test_lists_follow_the_tie_rule(ties: str, list_length: int) -> None:
    """POP with B and C tied at rank 2-3: a top-2 list holds them only when ties are won."""
    train_log = ClickLog.from_arrays(list("aabbccddd"), list("AAABBCCDX"), range(9))
    test_log = ClickLog.from_arrays(list("xxyy"), list("ABDC"), range(4))
    method = evaluate_method(
        "pop",
        make_baseline("pop", train_log),
        test_log,
        ks=(2,),
        ties=ties,
        popular_ids=popular_item_ids(train_log),
    )
    assert method.lists.n_slots == list_length * 2
    assert method.lists.n_recommended == list_length
    assert method.lists.n_popular_slots == 2  # A, the most clicked, heads every list
    # the targets, B and C, hit only when the list holds them
    assert method.result.recall(2) == (1.0 if ties == "optimistic" else 0.0)


# --- the command on a tiny model ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model trained on synthetic clicks, with its train and test files."""
    root = tmp_path_factory.mktemp("report")
    train_log = generate(SynthSpec(sessions=300, items=50, seed=1))
    write_clicks(train_log, root / "train.tsv")
    write_clicks(generate(SynthSpec(sessions=120, items=60, seed=2)), root / "test.tsv")
    recommender, _ = train(train_log, TINY, seed=0, progress=False, device="cpu")
    save_model(recommender, root / "model")
    return {
        "model": root / "model",
        "train": root / "train.tsv",
        "test": root / "test.tsv",
        "root": root,
    }


def test_report_matches_evaluate_and_baseline_exactly(tiny_inputs: dict[str, Path]) -> None:
    out = tiny_inputs["root"] / "out"
    common = ["--train", str(tiny_inputs["train"]), "--test", str(tiny_inputs["test"])]
    summary = run_report(
        "--model",
        str(tiny_inputs["model"]),
        *common,
        "--out",
        str(out),
        "--k",
        "5",
        "20",
        "--device",
        "cpu",
    )
    report = json.loads((out / "report.json").read_text())
    methods = report["methods"]
    assert list(methods) == ["gru4rec", "itemknn", "spop", "pop"]

    printed = {
        "gru4rec": streamrec_json(
            "evaluate",
            "--model",
            str(tiny_inputs["model"]),
            "--data",
            str(tiny_inputs["test"]),
            "--k",
            "5",
            "20",
            "--device",
            "cpu",
        )
    }
    for method in ("itemknn", "spop", "pop"):
        printed[method] = streamrec_json("baseline", "--method", method, *common, "--k", "5", "20")
    for method, result in printed.items():
        metrics = {
            key: value
            for key, value in result.items()
            if key not in ("seconds", "model_version", "method")
        }
        assert methods[method]["overall"] == metrics, method
        assert summary["overall"][method]["recall@20"] == metrics["recall@20"]
    assert methods["gru4rec"]["overall"]["n_skipped_unknown"] > 0  # test has unseen items
    assert_consistent(report)

    assert sorted(p.name for p in out.iterdir()) == sorted([*PLOTS, "index.html", "report.json"])
    for name in PLOTS:
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    page = (out / "index.html").read_text()
    assert all(f"src='{name}'" in page for name in PLOTS)
    assert "http://" not in page and "https://" not in page  # nothing fetched online
    assert report["comparison"]["note"] in page


def test_report_shows_a_compared_model_beside_the_default(tiny_inputs: dict[str, Path]) -> None:
    """`--compare tuned=DIR` (a tuned model beside the default one): its own row, lines and
    point, evaluated exactly as `--model` is (here the same model, so the same numbers)."""
    out = tiny_inputs["root"] / "compared"
    common = ["--train", str(tiny_inputs["train"]), "--test", str(tiny_inputs["test"])]
    model = str(tiny_inputs["model"])
    summary = run_report(
        "--model", model, "--compare", f"tuned={model}", *common, "--out", str(out)
    )
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["gru4rec", "tuned", "itemknn", "spop", "pop"]
    assert report["methods"]["tuned"]["overall"] == report["methods"]["gru4rec"]["overall"]
    assert report["methods"]["tuned"]["label"] == "tuned"
    assert summary["overall"]["tuned"] == summary["overall"]["gru4rec"]
    assert report["inputs"]["compared"] == {"tuned": model}
    assert_consistent(report)
    assert f"tuned <code>{model}</code>" in (out / "index.html").read_text()
    for argv, words in (
        (["--compare", f"pop={model}"], "label(s) pop name the report's own methods"),
        (["--compare", f"a={model}", "--compare", f"a={model}"], "each label once, got a, a"),
    ):
        with pytest.raises(UserError) as caught:
            report_command.run(report_args("--model", model, *argv, *common, "--out", str(out)))
        assert words in str(caught.value) and "\n" not in str(caught.value)


def test_report_builds_headless_with_the_default_backend(
    tiny_inputs: dict[str, Path], tmp_path: Path
) -> None:
    """A fresh process, no display, no MPLBACKEND: what a CI runner or a server has."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")
    }
    env.update(MPLCONFIGDIR=str(tmp_path / "mpl"), OMP_NUM_THREADS="1")
    driver = (
        "import argparse, sys; from stream.cli import report as report_command; "
        "parser = argparse.ArgumentParser(prog='streamrec'); "
        "report_command.add_parser(parser.add_subparsers()); "
        "args = parser.parse_args(['report', *sys.argv[1:]]); sys.exit(args.run(args))"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            driver,
            "--model",
            str(tiny_inputs["model"]),
            "--train",
            str(tiny_inputs["train"]),
            "--test",
            str(tiny_inputs["test"]),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = last_json(done.stdout)
    assert summary["plots"] == [str(tmp_path / "out" / name) for name in PLOTS]
    assert "report: drawing plots" in done.stderr
    assert all((tmp_path / "out" / name).stat().st_size > 10_000 for name in PLOTS)


def test_bad_paths_are_one_line_user_errors(tiny_inputs: dict[str, Path], tmp_path: Path) -> None:
    good = {
        "--model": str(tiny_inputs["model"]),
        "--train": str(tiny_inputs["train"]),
        "--test": str(tiny_inputs["test"]),
        "--out": str(tmp_path / "out"),
    }
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for option, value, words in (
        ("--model", str(tmp_path / "nope"), "not a model directory"),
        ("--test", str(tmp_path / "nope.tsv"), "no such file"),
        ("--out", str(a_file), "not a directory"),
        ("--out", str(a_file / "sub"), "cannot create"),
    ):
        argv = [part for key, val in {**good, option: value}.items() for part in (key, val)]
        with pytest.raises(UserError) as caught:
            report_command.run(report_args(*argv))
        assert words in str(caught.value) and "\n" not in str(caught.value)


# --- the rsc15-100k report ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (RSC15 / "test.tsv").is_file(), reason="rsc15-100k data not present")
def test_rsc15_report_with_a_briefly_trained_model(tmp_path: Path) -> None:
    train_log = read_clicks(RSC15 / "train_full.tsv")
    recommender, _ = train(
        train_log, GRU4RecConfig(n_epochs=1), seed=0, progress=False, device="cpu"
    )
    save_model(recommender, tmp_path / "model")
    started = time.perf_counter()
    summary = run_report(
        "--model",
        str(tmp_path / "model"),
        "--train",
        str(RSC15 / "train_full.tsv"),
        "--test",
        str(RSC15 / "test.tsv"),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    )
    assert time.perf_counter() - started < 90  # about 5 s on a busy 2-core machine
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert_consistent(report)
    methods = report["methods"]
    # the data README: every test item is known, 13,568 events in 3,416 sessions
    assert {m["overall"]["n_predictions"] for m in methods.values()} == {13_568 - 3_416}
    assert report["data"]["test"]["sessions"] == 3_416
    assert methods["gru4rec"]["by_position"][0]["n_predictions"] == 3_416
    # the same loop, so the same numbers as evaluating the baseline directly
    knn = evaluate(make_baseline("itemknn", train_log), read_clicks(RSC15 / "test.tsv"), ks=(5, 20))
    assert methods["itemknn"]["overall"] == knn.to_dict()
    # even one epoch of GRU4Rec is far ahead of popularity, and POP shows 20 items in all
    assert summary["overall"]["gru4rec"]["recall@20"] > 2 * summary["overall"]["pop"]["recall@20"]
    assert methods["pop"]["lists"]["n_recommended"] == 20
    assert "Item-KNN" in report["comparison"]["note"]
