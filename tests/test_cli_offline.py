"""The offline CLI as a user runs it: real processes, real files, the JSON last line."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream.cli.main import build_parser

BIN = Path(sys.executable).parent / "streamrec"
COMMAND = [str(BIN)] if BIN.is_file() else [sys.executable, "-m", "stream.cli.main"]
# tiny models: one intra-op thread is faster, and far faster on a busy machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 300


def streamrec(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=TIMEOUT
    )


def last_json(done: subprocess.CompletedProcess[str]) -> dict:
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines, f"no stdout; stderr: {done.stderr}"
    return json.loads(lines[-1])


def assert_one_line_error(done: subprocess.CompletedProcess[str], command: str, *words: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)  # README: bad input exits 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {done.stderr!r}"
    assert lines[0].startswith(f"streamrec {command}"), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} missing from {lines[0]!r}"
    return lines[0]


def subcommands() -> list[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


HELP_DRIVER = """
import contextlib, io, json, sys
from stream.cli.main import main
results = {}
for name in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main([*([name] if name else []), "--help"])
        except SystemExit as exc:
            code = exc.code
    results[name] = [code, out.getvalue()]
print(json.dumps(results))
"""


def test_every_subcommand_has_help() -> None:
    names = subcommands()
    assert {"train", "evaluate", "baseline", "synth"} <= set(names)
    # one interpreter for all of them (each start imports torch): a user's `streamrec
    # NAME --help` is exactly this call of stream.cli.main.main
    done = subprocess.run(
        [sys.executable, "-c", HELP_DRIVER, json.dumps(["", *names])],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ["", *names]:
        code, out = results[name]
        assert code == 0, (name, out)
        assert f"usage: streamrec {name}".rstrip() in out, (name, out)
    for sub in names:  # the top level lists every subcommand
        assert sub in results[""][1]
    # and the installed entry point itself answers --help
    top = streamrec("--help")
    assert top.returncode == 0 and top.stdout == results[""][1]


@pytest.fixture(scope="module")
def workflow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """synth -> train -> evaluate, as in the README."""
    work = tmp_path_factory.mktemp("cli")
    clicks = work / "clicks.tsv"
    model = work / "model"
    synth = streamrec(
        "synth", "--out", str(clicks), "--sessions", "300", "--items", "50", "--seed", "3"
    )
    train = streamrec(
        "train",
        "--data",
        str(clicks),
        "--out",
        str(model),
        "--epochs",
        "1",
        "--param",
        "layers=16",
        "--param",
        "n_sample=64",
        "--param",
        "sample_store_size=8192",
        "--quiet",
        "--device",
        "cpu",
    )
    evaluate = streamrec(
        "evaluate",
        "--model",
        str(model),
        "--data",
        str(clicks),
        "--k",
        "5",
        "20",
        "--device",
        "cpu",
    )
    return {
        "work": work,
        "clicks": clicks,
        "model": model,
        "synth": synth,
        "train": train,
        "evaluate": evaluate,
    }


def test_synth_writes_the_click_log(workflow: dict) -> None:
    result = last_json(workflow["synth"])
    assert result["sessions"] == 300
    lines = workflow["clicks"].read_text().splitlines()
    assert lines[0] == "SessionId\tItemId\tTime"
    assert len(lines) - 1 == result["events"]
    assert len({line.split("\t")[1] for line in lines[1:]}) == result["items"]


def test_train_reports_documented_keys_and_saves_a_model(workflow: dict) -> None:
    synth = last_json(workflow["synth"])
    result = last_json(workflow["train"])
    for key in ("events_per_s", "epochs", "final_loss", "n_items", "n_events", "train_seconds"):
        assert key in result, key
    assert result["epochs"] == 1
    assert result["n_events"] == synth["events"]
    assert result["n_items"] == synth["items"]
    assert math.isfinite(result["final_loss"])
    assert result["events_per_s"] > 0 and result["train_seconds"] > 0
    assert sorted(p.name for p in workflow["model"].iterdir()) == [
        "config.json",
        "items.json",
        "metadata.json",
        "optimizer.safetensors",
        "weights.safetensors",
    ]
    metadata = json.loads((workflow["model"] / "metadata.json").read_text())
    assert metadata["version"] == result["version"]
    assert json.loads((workflow["model"] / "config.json").read_text())["layers"] == [16]


def test_evaluate_reports_documented_keys(workflow: dict) -> None:
    synth = last_json(workflow["synth"])
    result = last_json(workflow["evaluate"])
    for k in (5, 20):
        assert 0.0 <= result[f"mrr@{k}"] <= result[f"recall@{k}"] <= 1.0
    assert result["recall@5"] <= result["recall@20"]
    assert "recall@10" not in result and "recall@1" not in result  # only the --k asked
    # every click but each session's last is predicted; all items are known
    assert result["n_predictions"] == synth["events"] - synth["sessions"]
    assert result["n_skipped_unknown"] == 0
    assert result["model_version"] == last_json(workflow["train"])["version"]


def test_baseline_reports_the_same_keys(workflow: dict) -> None:
    clicks = str(workflow["clicks"])
    result = last_json(
        streamrec("baseline", "--method", "pop", "--train", clicks, "--test", clicks, "--k", "20")
    )
    assert result["method"] == "pop"
    assert {"recall@20", "mrr@20", "n_predictions", "n_skipped_unknown"} <= set(result)
    assert result["n_predictions"] == last_json(workflow["evaluate"])["n_predictions"]


def test_bad_data_path_is_one_line_on_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "missing.tsv"
    done = streamrec("train", "--data", str(missing), "--out", str(tmp_path / "model"), "--quiet")
    assert_one_line_error(done, "train", str(missing))
    assert not (tmp_path / "model").exists()


def test_bad_model_path_is_one_line_on_stderr(tmp_path: Path, workflow: dict) -> None:
    done = streamrec(
        "evaluate", "--model", str(tmp_path / "no-model"), "--data", str(workflow["clicks"])
    )
    assert_one_line_error(done, "evaluate", "no-model")


@pytest.mark.parametrize(
    ("param", "words"),
    [
        ("loss=foo", ["loss", "cross-entropy"]),
        ("layers=abc", ["layers"]),
    ],
)
def test_bad_param_is_one_line_on_stderr(
    tmp_path: Path, workflow: dict, param: str, words: list[str]
) -> None:
    done = streamrec(
        "train",
        "--data",
        str(workflow["clicks"]),
        "--out",
        str(tmp_path / "model"),
        "--param",
        param,
        "--quiet",
    )
    assert_one_line_error(done, "train", *words)
    assert not (tmp_path / "model").exists()


def test_synth_with_intents_and_a_bad_shape(tmp_path: Path) -> None:
    out = tmp_path / "clicks.tsv"
    shape = ("--sessions", "200", "--items", "100", "--zipf", "0.5")
    result = last_json(streamrec("synth", "--out", str(out), *shape, "--intents", "10"))
    assert result["events"] >= 200 and out.exists()
    done = streamrec("synth", "--out", str(tmp_path / "bad.tsv"), *shape, "--intents", "101")
    assert_one_line_error(done, "synth", "--intents", "101")
    assert not (tmp_path / "bad.tsv").exists()


def test_train_filter_drops_rare_items_then_short_sessions_and_says_so(tmp_path: Path) -> None:
    """The README's `train --filter`: items with fewer than 5 clicks go, then sessions left
    with fewer than 2; stderr says how many of each, and the model knows only the rest.
    By hand: "rare" has 4 clicks (one in each of sessions a-d), "x" 5 and "y" 6; session
    d is ("rare", "x"), so it keeps one click and goes too: 10 of 15 events stay."""
    rows = ["SessionId\tItemId\tTime"]
    clicks = {
        "a": ["x", "y", "rare"],
        "b": ["x", "y", "rare"],
        "c": ["x", "y", "rare"],
        "d": ["rare", "x"],
        "e": ["y", "y"],
        "f": ["x", "y"],
    }
    for session, items in clicks.items():
        rows += [f"{session}\t{item}\t{1000 + k}" for k, item in enumerate(items)]
    (tmp_path / "log.tsv").write_text("\n".join(rows) + "\n")
    done = streamrec(
        "train",
        "--data",
        "log.tsv",
        "--out",
        "m",
        "--filter",
        "--epochs",
        "1",
        "--quiet",
        cwd=tmp_path,
    )
    summary = last_json(done)
    assert (
        "log.tsv: filtering kept 10 of 15 events (removed 1 rare items and 1 short sessions)"
        in (done.stderr)
    ), done.stderr
    assert summary["n_items"] == 2
    assert sorted(json.loads((tmp_path / "m" / "items.json").read_text())) == ["x", "y"]
