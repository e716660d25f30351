"""Hyperparameter search for GRU4Rec (``streamrec tune``): Optuna's TPE over a declared space.

The defaults are the authors' best setting for the full RSC15 log; another log (or a
sample of this one) reaches its best accuracy elsewhere, often far from them. The search
trains each trial on TRAIN and evaluates it on VALID after every epoch (``train``'s
``on_epoch`` hook): the final Recall@20 is the trial's value, and the per-epoch values let
a median pruner stop a trial that is already behind the others at the same epoch, so the
budget goes to the promising region.

The space is data: one :class:`Parameter` per hyperparameter (its kind and range), read
from JSON (:meth:`SearchSpace.from_dict`) and validated against :class:`GRU4RecConfig`
before any data is read. :data:`DEFAULT_SPACE` is the built-in one.

The study lives in SQLite (``study.db`` in the output directory), so a search that was
stopped resumes where it was; what makes its trials comparable (TRAIN, VALID, space,
epochs, seed) is stored with it, and a resume with anything else is refused.

Optuna is an optional dependency (``streamrec[tune]``), imported when a search starts, so
that the rest of the package imports without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from model.config import GRU4RecConfig, read_json_file
from model.data import ClickLog
from model.errors import UserError
from model.evaluate import RecommenderScorer, evaluate
from model.inference import Recommender
from model.train import TrainingDiverged, train

if TYPE_CHECKING:
    import optuna

K = 20  # the trials are compared on Recall@K (the papers' headline metric), MRR@K kept
STUDY_NAME = "streamrec"
#: Completed trials before the pruner compares anything: too few make a noisy median.
STARTUP_TRIALS = 5
#: The first epoch a trial can be pruned at: after one epoch, slow starters (small
#: learning rates, large batches) still look worse than they end.
PRUNE_FROM_EPOCH = 2
KINDS = ("int", "float", "categorical")
FILES = {
    "study": "study.db",
    "best": "best_params.json",
    "space": "space.json",
    "result": "tune.json",
}
INSTALL_HINT = "the search needs Optuna: pip install 'streamrec[tune]'"

#: The built-in space: the parameters that matter for GRU4Rec (Hidasi & Czapp 2023) over
#: ranges that hold the published settings. ``layers`` is one layer of ``low``..``high``
#: units; ``when`` draws a parameter only where earlier ones have the given values.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "loss": {"kind": "categorical", "choices": ["cross-entropy", "bpr-max"]},
    "logq": {"kind": "categorical", "choices": [0.0, 1.0], "when": {"loss": "cross-entropy"}},
    "bpreg": {"kind": "float", "low": 0.0, "high": 2.0, "when": {"loss": "bpr-max"}},
    "batch_size": {"kind": "int", "low": 16, "high": 256, "log": True},
    "learning_rate": {"kind": "float", "low": 0.01, "high": 0.5, "log": True},
    "momentum": {"kind": "float", "low": 0.0, "high": 0.9},
    "dropout_p_embed": {"kind": "float", "low": 0.0, "high": 0.5},
    "dropout_p_hidden": {"kind": "float", "low": 0.0, "high": 0.7},
    "n_sample": {"kind": "categorical", "choices": [0, 512, 1024, 2048, 4096]},
    "sample_alpha": {"kind": "float", "low": 0.0, "high": 1.0},
    "layers": {"kind": "int", "low": 64, "high": 256},
    "constrained_embedding": {"kind": "categorical", "choices": [True, False]},
    "embedding": {
        "kind": "categorical",
        "choices": [0, 64, 128],
        "when": {"constrained_embedding": False},
    },
}

Scalar = str | int | float | bool
_FIELD_TYPES = {f.name: str(f.type) for f in fields(GRU4RecConfig)}


def require_optuna() -> ModuleType:
    """The ``optuna`` module, its INFO log silenced (the search prints its own lines)."""
    try:
        import optuna
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass(frozen=True)
class Parameter:
    """One dimension of the search: the :class:`GRU4RecConfig` field ``name``, drawn as an
    ``int`` or ``float`` in ``[low, high]`` (``log``: on a log scale) or one of ``choices``,
    and only where every ``(earlier parameter, value)`` of ``when`` holds."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Scalar, ...] = ()
    when: tuple[tuple[str, Scalar], ...] = ()

    def applies(self, values: Mapping[str, Any]) -> bool:
        """Whether to draw it, given the values of the trial so far."""
        return all(values.get(key) == value for key, value in self.when)

    def suggest(self, trial: optuna.Trial) -> optuna.distributions.CategoricalChoiceType:
        """Draw the value for ``trial`` (Optuna records it under ``name``)."""
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.name, self.choices)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form :meth:`SearchSpace.from_dict` reads."""
        spec: dict[str, Any] = {"kind": self.kind}
        if self.kind == "categorical":
            spec["choices"] = list(self.choices)
        else:
            spec.update(low=self.low, high=self.high, log=self.log)
        if self.when:
            spec["when"] = dict(self.when)
        return spec


@dataclass(frozen=True)
class SearchSpace:
    """The parameters a search draws, in order; every other field keeps its default."""

    parameters: tuple[Parameter, ...]

    @classmethod
    def default(cls) -> SearchSpace:
        """:data:`DEFAULT_SPACE`, checked like any space file."""
        return cls.from_dict(DEFAULT_SPACE)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SearchSpace:
        """Read a space from a JSON file (errors name the file and the parameter)."""
        return read_json_file(path, "a search space", cls.from_dict)

    @classmethod
    def from_dict(cls, data: Any) -> SearchSpace:
        """Parse and check ``{name: {"kind": ..., ...}}`` (see :data:`DEFAULT_SPACE`).

        Every bound and choice is checked by :class:`GRU4RecConfig` itself (with the
        parameter's ``when`` values set), so a space whose trials would be refused fails
        here, before any data is read, naming the parameter.
        """
        if not isinstance(data, dict) or not data:
            raise UserError(
                'search space: must be a non-empty JSON object {"name": {"kind": ...}, ...}'
            )
        parameters: list[Parameter] = []
        for name, spec in data.items():
            parameters.append(_parameter(name, spec, [p.name for p in parameters]))
        return cls(tuple(parameters))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The JSON form :meth:`from_dict` reads (and the study stores, to compare)."""
        return {p.name: p.to_dict() for p in self.parameters}

    def suggest(self, trial: optuna.Trial, base: GRU4RecConfig) -> GRU4RecConfig:
        """``base`` with the parameters ``trial`` draws (those whose ``when`` holds)."""
        values: dict[str, Any] = {}
        for parameter in self.parameters:
            if parameter.applies({**base.to_dict(), **values}):
                values[parameter.name] = parameter.suggest(trial)
        return _config(base, values)


def _config(base: GRU4RecConfig, values: Mapping[str, Any]) -> GRU4RecConfig:
    """``base`` with ``values`` (as drawn: ``layers`` an int is one layer of that size)."""
    data = base.to_dict()
    for name, value in values.items():
        one_layer = name == "layers" and isinstance(value, int) and not isinstance(value, bool)
        data[name] = [value] if one_layer else value
    return GRU4RecConfig.from_dict(data)


def _parameter(name: str, spec: Any, earlier: list[str]) -> Parameter:
    """One entry of a space file, checked (see :meth:`SearchSpace.from_dict`)."""

    def fail(problem: str) -> NoReturn:
        raise UserError(f"search space: {name}: {problem}")

    if name not in _FIELD_TYPES:
        fail(f"not a hyperparameter; known: {', '.join(sorted(_FIELD_TYPES))}")
    if name == "n_epochs":
        fail("set by --epochs, not searched")
    if not isinstance(spec, dict):
        fail('must be an object, e.g. {"kind": "float", "low": 0.01, "high": 0.5}')
    kind = spec.get("kind")
    if kind not in KINDS:
        fail(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    keys = {"kind", "when"} | ({"choices"} if kind == "categorical" else {"low", "high", "log"})
    unknown = sorted(set(spec) - keys)
    if unknown:
        fail(f"unknown key(s) {', '.join(unknown)} for kind {kind} (known: {', '.join(keys)})")
    when = spec.get("when", {})
    if not isinstance(when, dict) or any(key not in earlier for key in when):
        fail("'when' must map parameters declared before this one to a value each")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            fail("categorical needs a non-empty list of choices")
        if not all(isinstance(c, str | int | float) for c in choices):
            fail(f"choices must be strings, numbers or booleans, got {choices!r}")
        values = choices
    else:
        low: Any = spec.get("low")
        high: Any = spec.get("high")
        log = spec.get("log", False)
        number = int if kind == "int" else int | float
        if not all(isinstance(v, number) and not isinstance(v, bool) for v in (low, high)):
            fail(f"{kind} needs numbers low and high, got low={low!r}, high={high!r}")
        if low > high:
            fail(f"low={low} is above high={high}")
        if not isinstance(log, bool) or (log and low <= 0):
            fail("log must be true or false, and a log scale needs low > 0")
        if kind == "float" and _FIELD_TYPES[name] != "float":
            fail("takes integers: use kind int or categorical")
        if _FIELD_TYPES[name] in ("bool", "str"):
            fail(f"takes a {_FIELD_TYPES[name]}: use kind categorical")
        values = [low, high]
    for value in values:
        try:
            _config(GRU4RecConfig(), {**when, name: value})
        except UserError as exc:
            fail(str(exc))
    if kind == "categorical":
        return Parameter(name, kind, choices=tuple(values), when=tuple(when.items()))
    return Parameter(name, kind, low=low, high=high, log=log, when=tuple(when.items()))


@dataclass(frozen=True)
class Budget:
    """When the search stops: when the study holds ``trials`` finished trials, or when the
    next trial would not end within ``seconds`` of this run's start, whichever is first."""

    trials: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.trials is None and self.seconds is None:
            raise UserError("give a budget: --trials N and/or --budget-s SECONDS")
        if self.trials is not None and self.trials < 1:
            raise UserError(f"--trials must be >= 1, got {self.trials}")
        if self.seconds is not None and not self.seconds > 0:
            raise UserError(f"--budget-s must be > 0, got {self.seconds:g}")


def can_start(remaining_s: float, trial_s: float | None) -> bool:
    """Whether a trial fits in the ``remaining_s`` seconds of the budget, a complete trial
    having taken ``trial_s`` on average (None: none completed yet, so try: the deadline
    still cuts it at an epoch's end, see :func:`run_trial`)."""
    return remaining_s > 0 and (trial_s is None or trial_s <= remaining_s)


def run_trial(
    trial: optuna.Trial,
    config: GRU4RecConfig,
    train_log: ClickLog,
    valid_log: ClickLog,
    *,
    seed: int = 0,
    device: str | None = None,
    deadline: float = math.inf,
) -> tuple[float, float]:
    """Train ``config`` on ``train_log``; return VALID's final Recall@K and MRR@K.

    After each epoch, VALID's Recall@K is reported to the study (MRR@K kept as the user
    attribute ``mrr@K``); before the last epoch the trial is pruned (``optuna.TrialPruned``)
    when the study's pruner says so, or when ``time.monotonic()`` is past ``deadline``
    (user attribute ``stopped``), so a search never runs far over its time budget.
    """
    optuna = require_optuna()
    trial.set_user_attr("config", config.to_dict())
    scores: list[tuple[float, float]] = []

    def after_epoch(epoch: int, model: Recommender) -> None:
        result = evaluate(RecommenderScorer(model, depth=K), valid_log, ks=(K,))
        scores.append((result.recall(K), result.mrr(K)))
        trial.report(result.recall(K), epoch)
        trial.set_user_attr(f"mrr@{K}", result.mrr(K))
        if epoch == config.n_epochs:
            return  # trained: its value is known, pruning would save nothing
        if time.monotonic() >= deadline:
            trial.set_user_attr("stopped", "time budget")
            raise optuna.TrialPruned(f"time budget spent at epoch {epoch}")
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    train(train_log, config, seed=seed, device=device, progress=False, on_epoch=after_epoch)
    return scores[-1]


def fingerprint(path: str | os.PathLike[str]) -> str:
    """A file's SHA-256: what a resumed study checks its TRAIN and VALID against."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def search(
    train_log: ClickLog,
    valid_log: ClickLog,
    *,
    inputs: Mapping[str, str | os.PathLike[str]],
    out: Path,
    budget: Budget,
    space: SearchSpace | None = None,
    epochs: int = GRU4RecConfig.n_epochs,
    seed: int = 0,
    device: str | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run (or resume) the study in ``out`` until ``budget`` is spent; return the summary.

    ``inputs`` are the paths ``train_log`` and ``valid_log`` were read from (keys ``train``
    and ``valid``): a resume checks their contents (:func:`fingerprint`). Writes
    :data:`FILES` into ``out``: the study, the best trial's full configuration (kept
    current after every trial, for ``streamrec train --params``), the space and the
    summary. ``progress`` gets one line per trial.
    """
    optuna = require_optuna()
    states = optuna.trial.TrialState
    space = space or SearchSpace.default()
    base = GRU4RecConfig(n_epochs=epochs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the study directory ({exc.strerror})") from None
    identity = {
        **{name: fingerprint(path) for name, path in inputs.items()},
        "space": space.to_dict(),
        "epochs": epochs,
        "seed": seed,
    }
    paths = {name: str(Path(path).resolve()) for name, path in inputs.items()}
    study = _open_study(optuna, out / FILES["study"], identity, paths, seed, progress)
    (out / FILES["space"]).write_text(json.dumps(space.to_dict(), indent=1) + "\n")
    started = time.monotonic()
    deadline = started + budget.seconds if budget.seconds else math.inf
    best_number: int | None = None
    while True:
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        trial_s = _mean_duration(finished)
        if budget.trials is not None and len(finished) >= budget.trials:
            break
        if not can_start(deadline - time.monotonic(), trial_s):
            break
        trial = study.ask()
        try:
            value, _ = run_trial(
                trial,
                space.suggest(trial, base),
                train_log,
                valid_log,
                seed=seed,
                device=device,
                deadline=deadline,
            )
        except optuna.TrialPruned:
            frozen = study.tell(trial, state=states.PRUNED)
        except TrainingDiverged as exc:
            trial.set_user_attr("error", str(exc))
            frozen = study.tell(trial, state=states.FAIL)
        except BaseException:  # interrupted, or a bug: leave no trial running in the study
            study.tell(trial, state=states.FAIL)
            raise
        else:
            frozen = study.tell(trial, value)
        best = _best(study)
        if best is not None and best.number != best_number:
            best_number = best.number
            _best_config(best).write_file(out / FILES["best"])
        elapsed = time.monotonic() - started
        left = _time_left(budget, deadline, len(finished) + 1, _mean_duration([frozen, *finished]))
        progress(_trial_line(frozen, best, elapsed, left))
    return _summary(study, out, time.monotonic() - started)


def _open_study(
    optuna: ModuleType,
    path: Path,
    identity: Mapping[str, Any],
    paths: Mapping[str, str],
    seed: int,
    progress: Callable[[str], None],
) -> optuna.Study:
    """Create the study, or resume it when ``identity`` matches the stored one (``paths``:
    where the inputs were, to say which one differs)."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=storage, direction="maximize", load_if_exists=True
    )
    if not study.user_attrs:
        for key, value in {**identity, "paths": paths}.items():
            study.set_user_attr(key, value)
        progress(f"new study {path}")
    for key, value in identity.items():
        if study.user_attrs.get(key) != value:
            was = study.user_attrs["paths"].get(key, study.user_attrs.get(key))
            raise UserError(
                f"{path}: the study was started with another {key}"
                f"{'' if key == 'space' else f' ({was})'}; resume it with the same "
                "inputs, or choose a new --out"
            )
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # its search was killed
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    if finished:
        best = _best(study)
        progress(
            f"resuming {path}: {len(finished)} finished trial(s), best "
            + (f"{best.value:.4f} (trial {best.number})" if best else "none yet")
        )
    return optuna.load_study(
        study_name=STUDY_NAME,
        storage=storage,
        # a seed per resume: the same seed would draw the first run's random trials again
        sampler=optuna.samplers.TPESampler(seed=seed + len(finished)),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=STARTUP_TRIALS, n_warmup_steps=PRUNE_FROM_EPOCH
        ),
    )


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial (None before the first one completes)."""
    try:
        return study.best_trial
    except ValueError:
        return None


def _best_config(trial: optuna.trial.FrozenTrial) -> GRU4RecConfig:
    return GRU4RecConfig.from_dict(trial.user_attrs["config"])


def _mean_duration(trials: list[optuna.trial.FrozenTrial]) -> float | None:
    """Mean seconds of the complete trials among ``trials`` (None: none yet)."""
    seconds = [
        t.duration.total_seconds()
        for t in trials
        if t.duration is not None and t.state.name == "COMPLETE"
    ]
    return statistics.fmean(seconds) if seconds else None


def _time_left(
    budget: Budget, deadline: float, finished: int, trial_s: float | None
) -> float | None:
    """The budget's seconds left, or the estimate for the trials left, whichever is less."""
    left = [deadline - time.monotonic()] if budget.seconds else []
    if budget.trials is not None and trial_s is not None:
        left.append(max(budget.trials - finished, 0) * trial_s)
    return max(min(left), 0.0) if left else None


def _trial_line(
    trial: optuna.trial.FrozenTrial,
    best: optuna.trial.FrozenTrial | None,
    elapsed_s: float,
    left_s: float | None,
) -> str:
    state = trial.state.name
    if state == "COMPLETE":
        outcome = f"recall@{K} {trial.value:.4f}, mrr@{K} {trial.user_attrs[f'mrr@{K}']:.4f}"
    elif state == "PRUNED":
        why = " (time budget)" if "stopped" in trial.user_attrs else ""
        outcome = f"pruned at epoch {trial.last_step}{why}"
    else:
        outcome = f"failed: {trial.user_attrs.get('error', 'see the study')}"
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    ahead = f"best {best.value:.4f} (trial {best.number})" if best else "no complete trial yet"
    left = "" if left_s is None else f", {_clock(left_s)} left"
    return (
        f"trial {trial.number}: {outcome} in {seconds:.0f} s | {ahead} | "
        f"{_clock(elapsed_s)} elapsed{left}"
    )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _summary(study: optuna.Study, out: Path, seconds: float) -> dict[str, Any]:
    """The search's result (also written to ``tune.json``); an error if nothing completed."""
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    counts = {
        "finished": sum(s in ("COMPLETE", "PRUNED", "FAIL") for s in states),
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
    }
    best = _best(study)
    if best is None:
        raise UserError(
            f"no trial completed ({counts['pruned']} pruned, {counts['failed']} failed): "
            f"give the search more time; the study in {out} resumes"
        )
    _best_config(best).write_file(out / FILES["best"])
    result = {
        "best_params": best.params,
        "best_trial": best.number,
        f"recall@{K}": best.value,
        f"mrr@{K}": best.user_attrs[f"mrr@{K}"],
        "trials": counts,
        "seconds": seconds,
        "study": str(out / FILES["study"]),
        "best_params_file": str(out / FILES["best"]),
    }
    (out / FILES["result"]).write_text(json.dumps(result, indent=1) + "\n")
    return result
