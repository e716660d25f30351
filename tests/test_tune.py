"""`streamrec split` and `streamrec tune`: a tiny search end to end, its resume, the
parameter file into `train --params`, pruning and the time budget, and the errors a user
can make (bad spaces, budgets, parameter files, a resume on other data)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from model.config import GRU4RecConfig
from model.data import ClickLog, read_clicks, split_last_days
from model.evaluate import RecommenderScorer, evaluate
from model.inference import Recommender
from model.synth import SynthSpec, generate, write_clicks
from model.train import train
from model.tune import (
    DEFAULT_SPACE,
    PRUNE_FROM_EPOCH,
    STARTUP_TRIALS,
    STUDY_NAME,
    SearchSpace,
    can_start,
    run_trial,
)
from stream.cli.main import main
from stream.devtools.testing import DATA, TINY

#: Tiny trials: two knobs searched, the rest TINY's sizes, one epoch unless a test says so.
TINY_SPACE = {
    "learning_rate": {"kind": "float", "low": 0.05, "high": 0.2, "log": True},
    "layers": {"kind": "int", "low": 8, "high": 16},
    "n_sample": {"kind": "categorical", "choices": [TINY.n_sample]},
    "sample_store_size": {"kind": "categorical", "choices": [TINY.sample_store_size]},
}


def streamrec(*argv: str | Path) -> tuple[int, str, str]:
    """``streamrec ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def assert_error(done: tuple[int, str, str], command: str, *words: str) -> None:
    code, _, err = done
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"streamrec {command}: error:"), err
    for word in words:
        assert word in lines[0], f"{word!r} missing from {lines[0]!r}"


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tune")
    paths = {
        "train": root / "train.tsv",
        "valid": root / "valid.tsv",
        "space": root / "space.json",
        "root": root,
    }
    write_clicks(generate(SynthSpec(sessions=300, items=50, seed=3)), paths["train"])
    write_clicks(generate(SynthSpec(sessions=100, items=50, seed=4)), paths["valid"])
    paths["space"].write_text(json.dumps(TINY_SPACE))
    return paths


def tune(
    files: dict[str, Path],
    out: Path,
    *more: str,
    train: Path | None = None,
    space: Path | None = None,
) -> tuple[int, str, str]:
    """``streamrec tune`` on the module's logs and space, or on ``train``/``space``."""
    return streamrec(
        "tune",
        "--train",
        train or files["train"],
        "--valid",
        files["valid"],
        "--space",
        space or files["space"],
        "--out",
        out,
        "--device",
        "cpu",
        *more,
    )


@pytest.fixture(scope="module")
def searched(files: dict[str, Path]) -> dict:
    """Two trials of one epoch, then the same command resumed with --trials 3."""
    out = files["root"] / "study"
    first = tune(files, out, "--trials", "2", "--epochs", "1")
    second = tune(files, out, "--trials", "3", "--epochs", "1")
    return {"out": out, "first": first, "second": second}


def test_tiny_search_writes_its_study_and_one_json_line(searched: dict) -> None:
    code, stdout, stderr = searched["first"]
    assert code == 0, stderr
    result = last_json(stdout)
    out = searched["out"]
    assert sorted(p.name for p in out.iterdir()) == [
        "best_params.json",
        "space.json",
        "study.db",
        "tune.json",
    ]
    assert result["trials"] == {"finished": 2, "complete": 2, "pruned": 0, "failed": 0}
    trial_lines = [line for line in stderr.splitlines() if line.startswith("tune: trial ")]
    assert len(trial_lines) == 2, stderr
    assert all("best" in line and "elapsed" in line for line in trial_lines)
    best = max(load(out).trials[:2], key=lambda t: t.value)  # the resume added a third
    assert result["best_trial"] == best.number and result["recall@20"] == best.value
    assert result["mrr@20"] == best.user_attrs["mrr@20"]
    assert 0 < result["mrr@20"] <= result["recall@20"] <= 1
    assert result["best_params"] == best.params and set(best.params) == set(TINY_SPACE)
    assert result["study"] == str(out / "study.db")
    assert (
        json.loads((out / "space.json").read_text()) == SearchSpace.from_dict(TINY_SPACE).to_dict()
    )


def test_a_second_run_resumes_and_counts_the_stored_trials(searched: dict) -> None:
    code, stdout, stderr = searched["second"]
    assert code == 0, stderr
    assert last_json(stdout)["trials"]["finished"] == 3  # not 2 + 3
    assert "resuming" in stderr and "2 finished trial(s)" in stderr
    assert [line.split(":")[1] for line in stderr.splitlines() if "tune: trial" in line] == [
        " trial 2"
    ]
    trials = load(searched["out"]).trials
    assert [t.number for t in trials] == [0, 1, 2]
    # the resumed sampler does not repeat the first run's draws
    assert trials[2].params["learning_rate"] not in {t.params["learning_rate"] for t in trials[:2]}
    assert json.loads((searched["out"] / "tune.json").read_text()) == last_json(stdout)


def test_best_params_round_trip_into_train(searched: dict, files: dict[str, Path]) -> None:
    out = searched["out"]
    best = max(load(out).trials, key=lambda t: t.value)
    params = out / "best_params.json"
    tuned = GRU4RecConfig.from_file(params)
    assert tuned == GRU4RecConfig.from_dict(best.user_attrs["config"])
    assert tuned.layers == (best.params["layers"],)
    assert tuned.learning_rate == best.params["learning_rate"]
    model = files["root"] / "tuned-model"
    code, stdout, stderr = streamrec(
        "train",
        "--data",
        files["train"],
        "--params",
        params,
        "--param",
        "batch_size=7",
        "--epochs",
        "2",
        "--out",
        model,
        "--quiet",
        "--device",
        "cpu",
    )
    assert code == 0, stderr
    assert last_json(stdout)["epochs"] == 2
    trained = GRU4RecConfig.from_file(model / "config.json")
    assert trained == tuned.replace(batch_size=7, n_epochs=2)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"units": 100}', ["units", "unknown hyperparameter"]),
        ('{"learning_rate": -0.1}', ["learning_rate"]),
        ('{"layers": "big"}', ["layers"]),
        ("{not json", ["params.json", "cannot read"]),
    ],
)
def test_a_bad_params_file_is_a_clear_error(tmp_path: Path, content: str, words: list[str]) -> None:
    (tmp_path / "params.json").write_text(content)
    done = streamrec(
        "train", "--data", "x.tsv", "--params", tmp_path / "params.json", "--out", tmp_path / "m"
    )
    assert_error(done, "train", *words)


@pytest.mark.parametrize(
    ("space", "words"),
    [
        ([], ["non-empty JSON object"]),
        ({"units": {"kind": "int", "low": 1, "high": 2}}, ["units", "not a hyperparameter"]),
        ({"momentum": {"kind": "normal", "low": 0, "high": 1}}, ["momentum", "kind"]),
        ({"learning_rate": {"kind": "float", "low": 0.5, "high": 0.1}}, ["learning_rate", "above"]),
        ({"learning_rate": {"kind": "float", "low": 0.0, "high": 0.5}}, ["learning_rate", "> 0"]),
        ({"learning_rate": {"kind": "float", "low": 0.1, "high": 1, "step": 2}}, ["step"]),
        ({"batch_size": {"kind": "float", "low": 16, "high": 64}}, ["batch_size", "integers"]),
        ({"loss": {"kind": "categorical", "choices": []}}, ["loss", "non-empty"]),
        ({"loss": {"kind": "categorical", "choices": ["bpr-max", "hinge"]}}, ["loss", "hinge"]),
        ({"embedding": {"kind": "categorical", "choices": [64]}}, ["embedding"]),
        ({"n_epochs": {"kind": "int", "low": 1, "high": 5}}, ["n_epochs", "--epochs"]),
        (
            {"bpreg": {"kind": "float", "low": 0, "high": 1, "when": {"loss": "bpr-max"}}},
            ["bpreg", "when"],
        ),
    ],
)
def test_a_bad_space_is_a_clear_error(
    files: dict[str, Path], tmp_path: Path, space: object, words: list[str]
) -> None:
    (tmp_path / "space.json").write_text(json.dumps(space))
    done = tune(files, tmp_path / "out", "--trials", "1", space=tmp_path / "space.json")
    assert_error(done, "tune", "space.json", *words)
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize(
    ("budget", "words"),
    [
        ([], ["--trials", "--budget-s"]),
        (["--trials", "0"], ["--trials", ">= 1"]),
        (["--trials", "-2"], ["--trials", "-2"]),
        (["--budget-s", "0"], ["--budget-s", "> 0"]),
        (["--budget-s", "-30"], ["--budget-s", "-30"]),
        (["--trials", "2", "--epochs", "0"], ["--epochs"]),
    ],
)
def test_a_bad_budget_is_a_clear_error(
    files: dict[str, Path], tmp_path: Path, budget: list[str], words: list[str]
) -> None:
    done = tune(files, tmp_path / "out", *budget)
    assert_error(done, "tune", *words)
    assert not (tmp_path / "out").exists()


def test_resuming_on_other_data_or_space_is_refused(
    searched: dict, files: dict[str, Path], tmp_path: Path
) -> None:
    out = searched["out"]
    other = tmp_path / "other.tsv"
    write_clicks(generate(SynthSpec(sessions=300, items=50, seed=5)), other)
    done = tune(files, out, "--trials", "9", train=other)
    assert_error(done, "tune", "another train", str(files["train"]))
    space = tmp_path / "space.json"
    space.write_text(
        json.dumps({**TINY_SPACE, "momentum": {"kind": "float", "low": 0, "high": 0.9}})
    )
    done = tune(files, out, "--trials", "9", space=space)
    assert_error(done, "tune", "another space")
    assert len(load(out).trials) == 3  # nothing ran, and the study's space file stays
    assert (
        json.loads((out / "space.json").read_text()) == SearchSpace.from_dict(TINY_SPACE).to_dict()
    )


def test_a_trial_behind_the_median_is_pruned(files: dict[str, Path], tmp_path: Path) -> None:
    """After one real trial, five stored ones that reached Recall@20 1.0 at every epoch: the
    next trial (far below) is pruned at the first epoch pruning is allowed, not before."""
    out = tmp_path / "study"
    assert tune(files, out, "--trials", "1", "--epochs", "3")[0] == 0
    study = load(out)
    for _ in range(STARTUP_TRIALS):
        study.add_trial(
            optuna.trial.create_trial(
                value=1.0,
                intermediate_values={1: 1.0, 2: 1.0, 3: 1.0},
                user_attrs={"config": TINY.to_dict(), "mrr@20": 1.0},
            )
        )
    code, stdout, stderr = tune(files, out, "--trials", str(STARTUP_TRIALS + 2), "--epochs", "3")
    assert code == 0, stderr
    last = load(out).trials[-1]
    assert last.state == optuna.trial.TrialState.PRUNED
    assert last.last_step == PRUNE_FROM_EPOCH and PRUNE_FROM_EPOCH < 3
    assert f"trial {last.number}: pruned at epoch {PRUNE_FROM_EPOCH} in" in stderr
    assert last_json(stdout)["trials"]["pruned"] == 1


def test_the_deadline_cuts_a_trial_at_an_epoch_end_but_never_the_last(
    files: dict[str, Path],
) -> None:
    train_log, valid_log = read_clicks(files["train"]), read_clicks(files["valid"])
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        run_trial(trial, TINY.replace(n_epochs=3), train_log, valid_log, deadline=time.monotonic())
    assert trial.user_attrs["stopped"] == "time budget"
    assert list(study.trials[0].intermediate_values) == [1]  # cut after epoch 1
    trial = study.ask()
    recall, mrr = run_trial(trial, TINY, train_log, valid_log, deadline=time.monotonic())
    assert 0 < mrr <= recall <= 1 and "stopped" not in trial.user_attrs


def test_the_epoch_hook_sees_every_epoch_and_changes_no_weight(files: dict[str, Path]) -> None:
    """What a trial relies on: ``train(on_epoch=...)`` hands over the model after each
    epoch, and evaluating it there leaves the training exactly as without the hook."""
    train_log, valid_log = read_clicks(files["train"]), read_clicks(files["valid"])
    config = TINY.replace(n_epochs=2)
    seen: list[tuple[int, float]] = []

    def on_epoch(epoch: int, model: Recommender) -> None:
        seen.append((epoch, evaluate(RecommenderScorer(model), valid_log, ks=(20,)).recall(20)))

    hooked, _ = train(train_log, config, progress=False, device="cpu", on_epoch=on_epoch)
    plain, _ = train(train_log, config, progress=False, device="cpu")
    assert [epoch for epoch, _ in seen] == [1, 2] and seen[0][1] != seen[1][1]
    for name, tensor in plain.network.state_dict().items():
        assert torch.equal(tensor, hooked.network.state_dict()[name]), name
    assert seen[1][1] == evaluate(RecommenderScorer(plain), valid_log, ks=(20,)).recall(20)


def test_a_trial_starts_only_if_it_fits_the_time_left() -> None:
    assert can_start(10.0, None)  # nothing completed yet: try, the deadline cuts it
    assert can_start(10.0, 8.0) and can_start(10.0, 10.0)
    assert not can_start(10.0, 12.0)
    assert not can_start(0.0, None) and not can_start(-1.0, 1.0)


def test_default_space_draws_each_loss_with_its_own_parameters() -> None:
    space = SearchSpace.default()
    assert SearchSpace.from_dict(space.to_dict()) == space
    assert list(DEFAULT_SPACE) == [p.name for p in space.parameters]
    common = {
        "batch_size": 64,
        "learning_rate": 0.05,
        "momentum": 0.1,
        "dropout_p_embed": 0.0,
        "dropout_p_hidden": 0.3,
        "n_sample": 1024,
        "sample_alpha": 0.3,
        "layers": 128,
    }
    # FixedTrial refuses a parameter it was not given: logq is not drawn for bpr-max,
    # bpreg and embedding not for cross-entropy with tied embeddings
    bpr = space.suggest(
        optuna.trial.FixedTrial(
            {
                **common,
                "loss": "bpr-max",
                "bpreg": 0.5,
                "constrained_embedding": False,
                "embedding": 64,
            }
        ),
        GRU4RecConfig(),
    )
    assert (bpr.loss, bpr.bpreg, bpr.layers, bpr.embedding) == ("bpr-max", 0.5, (128,), 64)
    assert bpr.logq == GRU4RecConfig().logq and not bpr.constrained_embedding
    ce = space.suggest(
        optuna.trial.FixedTrial(
            {**common, "loss": "cross-entropy", "logq": 0.0, "constrained_embedding": True}
        ),
        GRU4RecConfig(n_epochs=3),
    )
    assert (ce.loss, ce.logq, ce.embedding, ce.n_epochs) == ("cross-entropy", 0.0, 0, 3)
    assert ce.batch_size == 64 and ce.bpreg == GRU4RecConfig().bpreg


def test_without_optuna_tune_says_how_to_install_it(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now fails
    done = tune(files, tmp_path / "out", "--trials", "1")
    assert_error(done, "tune", "pip install 'streamrec[tune]'")


# --- split ------------------------------------------------------------------------------------


def test_split_last_days_by_hand() -> None:
    """old1 and old2 end before the last day; new1 keeps x, y (z is unknown before), new2
    is left with one click (x) and goes."""
    day = 86_400.0
    rows = [
        ("old1", "x", 0.0),
        ("old1", "y", 10.0),
        ("old2", "x", 100.0),
        ("old2", "y", day),
        ("new1", "x", 2 * day),
        ("new1", "z", 2 * day + 1),
        ("new1", "y", 2 * day + 2),
        ("new2", "z", 2 * day + 5),
        ("new2", "x", 2 * day + 6),
    ]
    log = ClickLog.from_arrays(*zip(*rows))
    earlier, later = split_last_days(log, 1.0)
    assert sessions_of(earlier) == {"old1": ["x", "y"], "old2": ["x", "y"]}
    assert sessions_of(later) == {"new1": ["x", "y"]}


def sessions_of(log: ClickLog) -> dict[str, list[str]]:
    return {
        str(log.session_ids[s]): [str(log.item_ids[i]) for i in log.items[log.sessions == s]]
        for s in range(log.n_sessions)
    }


@pytest.mark.skipif(not (DATA / "test.tsv").is_file(), reason="rsc15-100k data not present")
def test_split_of_rsc15_train_full_and_test_gives_them_back(tmp_path: Path) -> None:
    """Re-split rsc15-100k's train_full + test by its last day: test's sessions end after
    every train_full session, know only train_full's items, and are (filtering aside) the
    published test's; the same holds for train_tr / train_valid inside train_full."""

    def read(path: Path) -> pd.DataFrame:
        return pd.read_csv(path, sep="\t", dtype={"SessionId": str, "ItemId": str})

    published = {name: read(DATA / f"{name}.tsv") for name in ("train_full", "test")}
    whole = tmp_path / "all.tsv"
    pd.concat(published.values()).to_csv(whole, sep="\t", index=False)
    out = tmp_path / "split"
    code, stdout, stderr = streamrec(
        "split", "--data", whole, "--out", out, "--test-days", "1", "--valid-days", "1"
    )
    assert code == 0, stderr
    assert "filtering kept" in stderr
    summary = last_json(stdout)
    parts = {name: read(out / f"{name}.tsv") for name in summary if name != "seconds"}
    assert sorted(parts) == ["test", "train_full", "train_tr", "train_valid"]
    for name, frame in parts.items():
        assert summary[name]["events"] == len(frame) > 0
        assert summary[name]["sessions"] == frame.SessionId.nunique()
        assert summary[name]["items"] == frame.ItemId.nunique()
    for before, after in (("train_full", "test"), ("train_tr", "train_valid")):
        ends = {name: parts[name].groupby("SessionId").Time.max() for name in (before, after)}
        assert ends[after].min() > ends[before].max()
        assert set(parts[after].ItemId) <= set(parts[before].ItemId)
        assert parts[after].groupby("SessionId").size().min() >= 2
    assert len(parts["train_tr"]) + len(parts["train_valid"]) <= len(parts["train_full"])
    for name in ("train_full", "test"):
        ours, theirs = set(parts[name].SessionId), set(published[name].SessionId)
        assert ours <= theirs and len(ours) > 0.95 * len(theirs), name


def test_split_errors_are_clear(files: dict[str, Path], tmp_path: Path) -> None:
    common = ("--out", tmp_path / "out", "--valid-days", "1")
    assert_error(
        streamrec("split", "--data", files["train"], "--test-days", "0", *common),
        "split",
        "test",
        "> 0",
    )
    # the synthetic log spans a minute: its last day is all of it
    assert_error(
        streamrec("split", "--data", files["train"], "--test-days", "1", *common),
        "split",
        "every session ends in the last 1 day(s)",
    )
    no_time = tmp_path / "no-time.tsv"
    no_time.write_text("SessionId\tItemId\na\tx\n")
    assert_error(
        streamrec("split", "--data", no_time, "--test-days", "1", *common), "split", "Time"
    )
    assert not (tmp_path / "out").exists()


def test_split_writes_the_files_it_reports(files: dict[str, Path], tmp_path: Path) -> None:
    """Days shorter than the synthetic log's minute: a split a user of minutes would make."""
    minute = 60 / 86_400
    code, stdout, stderr = streamrec(
        "split",
        "--data",
        files["train"],
        "--out",
        tmp_path,
        "--test-days",
        str(minute / 4),
        "--valid-days",
        str(minute / 4),
    )
    assert code == 0, stderr
    summary = last_json(stdout)
    for name in ("train_full", "test", "train_tr", "train_valid"):
        written = pd.read_csv(tmp_path / f"{name}.tsv", sep="\t")
        assert list(written.columns) == ["SessionId", "ItemId", "Time"]
        assert len(written) == summary[name]["events"]
        assert np.isclose(written.Time.min(), pd.Timestamp(summary[name]["start"]).timestamp())
