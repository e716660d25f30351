"""One way to declare configuration: flags, environment variables, defaults and validation.

A settings class is a frozen dataclass deriving from :class:`Settings` whose fields are
declared with :func:`setting`. Each field is then, from that one declaration:

- a command-line flag (``top_n`` -> ``--top-n``, or the ``flag`` given), whose ``--help``
  names the environment variable and the default;
- an environment variable (``env_prefix`` + ``TOP_N``); a flag wins over the
  environment, which wins over the default;
- validated before anything connects, by the field's ``checks`` and the class's
  :meth:`Settings.validate` for rules that tie fields together. A bad value is one line
  naming the flag, the value and the setting (:class:`model.errors.UserError`, which the
  command line turns into exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import field, fields
from typing import Any, ClassVar, Self

from model.errors import UserError

#: A check returns what is wrong with a value, or None.
Check = Callable[[Any], "str | None"]


def setting(
    default: Any, help: str, *checks: Check, flag: str | None = None, switch_off: str | None = None
) -> Any:
    """A settings field. ``switch_off`` makes a boolean a flag without value that turns
    it off (``--no-new-item-rounds``) instead of ``--name BOOL``."""
    return field(
        default=default,
        metadata={"help": help, "checks": checks, "flag": flag, "switch_off": switch_off},
    )


def positive(value: float) -> str | None:
    return None if 0 < value < math.inf else "must be a finite number > 0"  # refuses NaN


def at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"must be >= {low:g}"


def within(low: float, high: float, why: str = "") -> Check:
    return lambda value: (
        None if low <= value <= high else f"must be within [{low:g}, {high:g}]{why}"
    )


def one_of(*choices: str) -> Check:
    return lambda value: (
        None if value in choices else f"must be {', '.join(choices[:-1])} or {choices[-1]}"
    )


def non_empty(value: str | None) -> str | None:
    return None if value is None or value else "must not be empty"


def port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number"


def boolean(raw: str) -> bool:
    """true/false, yes/no, on/off or 1/0."""
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": boolean,
}


def _parser(annotation: object) -> Callable[[str], Any]:
    """The string parser of a field annotated ``T`` or ``T | None``."""
    return _PARSERS[str(annotation).removesuffix(" | None")]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of every settings class (see the module docstring)."""

    env_prefix: ClassVar[str] = "STREAMREC_"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            for check in f.metadata.get("checks", ()):
                if value is not None and (problem := check(value)) is not None:
                    raise self.invalid(f.name, f"{problem}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Rules that tie several settings together; raise :meth:`invalid`."""

    @classmethod
    def flag(cls, name: str) -> str:
        declared = cls._field(name).metadata.get("flag")
        return declared or "--" + name.replace("_", "-")

    @classmethod
    def env_name(cls, name: str) -> str:
        return cls.env_prefix + name.upper()

    @classmethod
    def invalid(cls, name: str, problem: str) -> UserError:
        """The one-line error for setting ``name``: ``--flag problem (setting name)``."""
        return UserError(f"{cls.flag(name)} {problem} (setting {name}, env {cls.env_name(name)})")

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def add_arguments(
        cls,
        parser: argparse._ActionsContainer,
        only: tuple[str, ...] | None = None,
        defaults: Mapping[str, Any] | None = None,
        env: bool = True,
    ) -> None:
        """One flag per setting (or per setting in ``only``). The flags default to None
        and :meth:`from_args` fills in the environment and the defaults, so that a flag
        equal to the default still wins; ``defaults`` replaces the defaults shown in the
        help, and ``env=False`` leaves out the environment variables, for a tool (a benchmark)
        that sets its own defaults through ``parser.set_defaults`` and passes the flags on."""
        shown = {f.name: f.default for f in fields(cls)} | dict(defaults or {})
        for f in fields(cls):
            if only is not None and f.name not in only:
                continue
            notes = [f"env {cls.env_name(f.name)}"] if env else []
            if shown[f.name] is not None:
                notes.append(f"default {shown[f.name]!r}")
            help_text = (
                f"{f.metadata['help']} ({'; '.join(notes)})" if notes else f.metadata["help"]
            )
            switch_off = f.metadata.get("switch_off")
            if switch_off:
                parser.add_argument(
                    switch_off,
                    dest=f.name,
                    action="store_const",
                    const=False,
                    default=None,
                    help=help_text,
                )
            else:
                parser.add_argument(
                    cls.flag(f.name),
                    dest=f.name,
                    type=_parser(f.type),
                    default=None,
                    help=help_text,
                )

    @classmethod
    def command_line(cls, **values: Any) -> list[str]:
        """The flags that give these values (for a tool that starts the command)."""
        argv: list[str] = []
        for name, value in values.items():
            switch_off = cls._field(name).metadata.get("switch_off")
            if switch_off:
                argv += [] if value else [switch_off]
            elif value is not None:
                argv += [cls.flag(name), str(value)]
        return argv

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> Self:
        """Settings from parsed flags, then ``environ`` (default ``os.environ``), then
        the defaults; ``overrides`` win over all three."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            given = getattr(args, f.name, None)
            if given is not None:
                values[f.name] = given
                continue
            raw = environ.get(cls.env_name(f.name))
            if raw is not None:
                try:
                    values[f.name] = _parser(f.type)(raw)
                except ValueError:
                    raise UserError(
                        f"environment {cls.env_name(f.name)}={raw!r} is not a "
                        f"valid {f.type} (setting {f.name})"
                    ) from None
        return cls(**{**values, **overrides})

    @classmethod
    def _field(cls, name: str) -> dataclasses.Field[Any]:
        return next(f for f in fields(cls) if f.name == name)
