"""Typed, validated GRU4Rec hyperparameters.

One frozen dataclass holds every knob of the model and its training. A wrong value fails
here, before any data is read, with a message that names the parameter and what is allowed.
The defaults are the best published setting for RSC15-like click data (Hidasi & Czapp,
RecSys 2023: cross-entropy with logQ, tied embeddings, 100 units).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from model.errors import UserError

T = TypeVar("T")

LOSSES = ("cross-entropy", "bpr-max", "top1-max", "bpr", "top1")


@dataclass(frozen=True)
class GRU4RecConfig:
    """Hyperparameters of GRU4Rec (names follow the authors' code)."""

    loss: str = "cross-entropy"
    layers: tuple[int, ...] = (100,)
    batch_size: int = 32
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.4
    learning_rate: float = 0.2
    momentum: float = 0.2
    nesterov: bool = False
    n_sample: int = 2048
    sample_alpha: float = 0.5
    sample_store_size: int = 10_000_000
    bpreg: float = 1.0
    logq: float = 1.0
    embedding: int = 0
    constrained_embedding: bool = True
    init_scale: float = 1.0
    n_epochs: int = 10

    def __post_init__(self) -> None:
        _check(self.loss in LOSSES, "loss", self.loss, "one of " + ", ".join(LOSSES))
        _check(
            len(self.layers) >= 1 and all(n >= 1 for n in self.layers),
            "layers",
            self.layers,
            "one or more positive layer sizes, e.g. 100 or 100,100",
        )
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        for name in ("dropout_p_embed", "dropout_p_hidden"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, name, value, "a drop probability in [0, 1)")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "a number > 0")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "a number in [0, 1)")
        _check(self.n_sample >= 0, "n_sample", self.n_sample, "an integer >= 0")
        _check(
            0.0 <= self.sample_alpha <= 1.0, "sample_alpha", self.sample_alpha, "a number in [0, 1]"
        )
        _check(
            self.sample_store_size >= 0,
            "sample_store_size",
            self.sample_store_size,
            "an integer >= 0 (0 draws samples on demand)",
        )
        _check(self.bpreg >= 0, "bpreg", self.bpreg, "a number >= 0")
        _check(0.0 <= self.logq <= 1.0, "logq", self.logq, "a number in [0, 1]")
        _check(
            self.embedding >= 0, "embedding", self.embedding, "an integer >= 0 (0 = one-hot input)"
        )
        _check(self.init_scale > 0, "init_scale", self.init_scale, "a number > 0")
        _check(self.n_epochs >= 1, "n_epochs", self.n_epochs, "an integer >= 1")
        _check(
            not (self.constrained_embedding and self.embedding),
            "embedding",
            self.embedding,
            "0 when constrained_embedding is on (the tied embedding has "
            "the size of the last layer)",
        )

    def replace(self, **changes: Any) -> GRU4RecConfig:
        """A copy with some values changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GRU4RecConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error, not ignored.

        ``data`` comes from a file (an artifact's config.json), so every value's JSON type
        is checked before the range checks compare it: a tampered or hand-edited file is
        refused with a :class:`UserError` naming the parameter, never a ``TypeError``.
        """
        if not isinstance(data, dict):
            raise UserError(f"hyperparameters must be a JSON object, got {type(data).__name__}")
        types = {f.name: str(f.type) for f in fields(cls)}
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise UserError(
                f"unknown hyperparameter(s) {', '.join(unknown)}; known: {', '.join(sorted(types))}"
            )
        return cls(**{key: _typed(key, types[key], value) for key, value in data.items()})

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GRU4RecConfig:
        """Read a parameter file: :meth:`write_file`'s output (``streamrec tune``'s
        ``best_params.json``) or a saved model's ``config.json``, validated by
        :meth:`from_dict`; every problem is a :class:`UserError` naming the file."""
        return read_json_file(path, "a parameter file", cls.from_dict)

    def write_file(self, path: str | os.PathLike[str]) -> None:
        """Write every field as JSON, for :meth:`from_file` to give this config back."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def from_strings(cls, pairs: list[str], base: GRU4RecConfig | None = None) -> GRU4RecConfig:
        """Parse ``KEY=VALUE`` pairs from the command line onto ``base`` (or the defaults)."""
        base = base or cls()
        types = {f.name: f.type for f in fields(cls)}
        changes: dict[str, Any] = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            key = key.strip()
            if not sep or not key:
                raise UserError(f"--param expects KEY=VALUE, got {pair!r}")
            if key not in types:
                raise UserError(
                    f"unknown hyperparameter {key!r}; known: {', '.join(sorted(types))}"
                )
            changes[key] = _parse_value(key, str(types[key]), raw.strip())
        return base.replace(**changes)


def read_json_file(path: str | os.PathLike[str], what: str, parse: Callable[[Any], T]) -> T:
    """``parse`` applied to the JSON in ``path``; every problem, reading or parsing, is a
    :class:`UserError` that names the file (``what`` says what it should have held)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read {what} ({exc})") from None
    try:
        return parse(data)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def _parse_value(key: str, type_name: str, raw: str) -> Any:
    try:
        if "tuple" in type_name:
            return tuple(int(part) for part in raw.replace(";", ",").split(",") if part)
        if type_name == "bool":
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return lowered in ("true", "1", "yes")
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        return raw
    except ValueError:
        raise UserError(f"hyperparameter {key}={raw!r} is not a valid {type_name}") from None


def _typed(key: str, type_name: str, value: Any) -> Any:
    """``value`` as read from JSON, if it has the JSON type of the field (``bool`` is not
    taken for a number, an integer is taken for a float, NaN and infinities are refused)."""

    def integer(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool)

    if "tuple" in type_name:
        if isinstance(value, list | tuple) and all(integer(n) for n in value):
            return tuple(value)
        expected = "a list of integers, e.g. [100]"
    elif type_name == "bool":
        if isinstance(value, bool):
            return value
        expected = "a bool (true or false)"
    elif type_name == "int":
        if integer(value):
            return value
        expected = "an int"
    elif type_name == "float":
        if integer(value) or isinstance(value, float):
            try:
                number = float(value)
            except OverflowError:  # an integer like 10**400
                number = math.inf
            if math.isfinite(number):  # NaN would slip through every range check
                return number
            expected = "a finite float"
        else:
            expected = "a float"
    else:
        if isinstance(value, str):
            return value
        expected = "a str"
    raise UserError(f"invalid hyperparameter {key}={value!r}: must be {expected}")


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UserError(f"invalid hyperparameter {name}={value!r}: must be {allowed}")
