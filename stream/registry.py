"""A model registry: immutable versions, one atomically moved pointer, announcements.

Layout::

    REGISTRY/
      CURRENT                 the served version id, one line (replaced atomically)
      HISTORY                 the served history: versions CURRENT pointed at, one a
                              line, oldest first (replaced atomically, after CURRENT)
      versions/<version>/     model directories written by model.artifact.save_model
      .lock                   serialises publishers and rollbacks (flock)

Why it is built this way:

- **Versions are immutable.** A version directory is written once, through the atomic
  staging-dir-and-rename of :func:`model.artifact.save_model`, and verified by loading it
  back before anything points at it. Workers may be loading it at any moment, so it is
  never edited; it is only deleted by retention, and never while it is current.
- **The pointer is the only mutable thing.** Publishing and rolling back both come down
  to replacing ``CURRENT`` (write a temp file, fsync, ``os.replace``, fsync the
  directory). A reader sees the old id or the new one, never half a write, and a publish
  killed at any point leaves ``CURRENT`` naming a complete, verified version.
- **Order is the publish sequence.** Version ids start with a six-digit sequence number
  (``000007-v20250101T120000-a1b2c3``): "the last K" for retention must not depend on
  clocks, and two publishes can share a second.
- **Rollback follows the served history, not the publish order.** Publish v1, v2, roll
  back to v1, publish v3: rolling back from v3 must bring back v1, which was served
  before it, not v2, which was rolled away from. ``HISTORY`` is that history as a stack:
  a publish pushes, a rollback pops. It is written after ``CURRENT`` and read against it
  (:meth:`ModelRegistry.served_history`): cut after the current version if it holds it,
  the current version appended if not. So a writer killed between the two files, or a
  pointer moved by hand, still gives the history that ``CURRENT`` implies, and a
  registry written before ``HISTORY`` existed reads as its publish order. Retention keeps
  the last K versions served as well as the last K published, so rollback targets stay.
- **A broken current version does not stop a restart.** Loading "the current version"
  (:meth:`ModelRegistry.current`, what a starting worker does) falls back through the
  served history to the newest version that passes verification, logging each refused
  one; the pointer is left alone, for a person to roll back or publish a fix.
- **Writers hold a lock.** Publish, rollback and retention take an exclusive ``flock`` on
  ``.lock``, so a CLI rollback and a trainer's publish cannot interleave, and leftovers
  of a killed writer (staging directories, pointer temp files) found under the lock are
  known to be dead and are swept.

Workers find the current model by reading ``CURRENT`` (see
:mod:`stream.serving.hot_swap`); an optional announcer
(:class:`stream.kafka.announcer.KafkaAnnouncer`) also tells the ``model-updates`` topic,
for anything else that wants to react to a new version without polling.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from model.artifact import fsync_path, load_model, new_version_id, save_model
from model.errors import UserError
from model.inference import Recommender

POINTER = "CURRENT"
HISTORY = "HISTORY"
VERSIONS = "versions"
LOCK = ".lock"
DEFAULT_KEEP = 5
DEFAULT_UPDATES_TOPIC = "model-updates"
_VERSION = re.compile(r"(\d{6,})-[A-Za-z0-9][A-Za-z0-9._-]*")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

logger = logging.getLogger("streamrec.registry")


class Announcer(Protocol):
    """Told about every pointer move, after it happened."""

    def announce(self, action: str, version: str, path: Path) -> None: ...


@dataclass(frozen=True)
class VersionInfo:
    """One retained version as listed (metadata read without verifying the weights)."""

    version: str
    path: Path
    sequence: int
    created: str | None
    current: bool
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "path": str(self.path),
            "created": self.created,
            "current": self.current,
            "metrics": self.metrics,
        }


class ModelRegistry:
    """A registry directory (see the module docstring); ``keep`` versions are retained."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep: int = DEFAULT_KEEP,
        announcer: Announcer | None = None,
    ) -> None:
        if keep < 1:
            raise UserError(f"a registry must keep at least 1 version, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.announcer = announcer
        #: versions :meth:`current` refused, with why: versions are immutable, so they are
        #: not verified again (the hot-swap watcher counts them and never retries them)
        self.refused: dict[str, str] = {}

    @staticmethod
    def is_registry(path: str | os.PathLike[str]) -> bool:
        """True for a registry directory (it has a ``CURRENT`` pointer)."""
        return (Path(path) / POINTER).is_file()

    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS

    def path_of(self, version: str) -> Path:
        if not _SAFE_NAME.fullmatch(version):
            raise UserError(f"{self.root}: {version!r} is not a valid version id")
        return self.versions_dir / version

    def current_version(self) -> str | None:
        """The version ``CURRENT`` names, or None before the first publish."""
        try:
            text = (self.root / POINTER).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise UserError(f"{self.root / POINTER}: not a version id (not text)") from None
        if not _SAFE_NAME.fullmatch(text):
            raise UserError(f"{self.root / POINTER}: {text[:80]!r} is not a version id")
        return text

    def served_history(self) -> list[str]:
        """The versions ``CURRENT`` pointed at, oldest first, ending with the current one
        (empty before the first publish); rolled-away-from and deleted versions are not
        in it. ``HISTORY`` is read against ``CURRENT`` (see the module docstring)."""
        current = self.current_version()
        if current is None:
            return []
        versions = self._versions()
        stored = self._stored_history()
        if stored is None:  # written before HISTORY existed: the publish order
            match = _VERSION.fullmatch(current)
            stored = [name for sequence, name, _ in versions if match and sequence < int(match[1])]
        elif current in stored:
            stored = stored[: stored.index(current)]
        retained = {name for _, name, _ in versions}
        return [version for version in stored if version in retained] + [current]

    def current(self, device: str | None = "cpu", *, optimizer_state: bool = False) -> Recommender:
        """Load and verify the current version (with its optimizer state, if asked and
        saved: the trainer resumes from it, workers never need it).

        If it fails verification, the newest version of the served history that passes
        is loaded instead, so that a corrupt version cannot stop every restarting worker
        while a good one is retained; each refused version is logged with its reason and
        kept in :attr:`refused`. ``CURRENT`` is not moved: it is for a person to roll back.
        """
        version = self.current_version()
        if version is None:
            raise UserError(
                f"{self.root}: empty registry (no {POINTER}); add a model with "
                f"`streamrec model publish --registry {self.root} --model DIR`"
            )

        def candidates() -> Iterator[str]:
            yield version
            yield from reversed(self.served_history()[:-1])  # read only if needed

        tried = []
        for candidate in candidates():
            tried.append(candidate)
            if candidate in self.refused:
                continue
            try:
                recommender = self.load(candidate, device, optimizer_state=optimizer_state)
            except UserError as exc:
                self.refused[candidate] = str(exc)
                logger.error("skipped model %s because it fails verification: %s", candidate, exc)
                continue
            if candidate != version:
                logger.warning(
                    "loaded model %s, the newest verified version served before %s, which "
                    "%s names (roll back or publish a fix to move it)",
                    candidate,
                    version,
                    POINTER,
                )
            return recommender
        reasons = "; ".join(f"{name}: {self.refused[name]}" for name in tried)
        raise UserError(
            f"{self.root}: no version of the served history passes verification ({reasons})"
        )

    def load(
        self, version: str, device: str | None = "cpu", *, optimizer_state: bool = False
    ) -> Recommender:
        """Load and verify ``version``; its artifact must carry that same version id (a
        directory copied or renamed into ``versions/`` by hand is refused)."""
        recommender = load_model(
            self.path_of(version), device=device, optimizer_state=optimizer_state
        )
        if recommender.version != version:
            raise UserError(
                f"{self.path_of(version)}: artifact says version "
                f"{recommender.version!r}, not {version!r}"
            )
        return recommender

    def list_versions(self) -> list[VersionInfo]:
        """The retained versions, oldest first (staging and deleted ones excluded)."""
        current = self.current_version()
        listed = []
        for sequence, name, path in self._versions():
            metadata = _peek_metadata(path)
            listed.append(
                VersionInfo(
                    version=name,
                    path=path,
                    sequence=sequence,
                    created=metadata.get("created"),
                    current=name == current,
                    metrics=metadata.get("metrics", {}),
                )
            )
        return listed

    def publish(
        self,
        recommender: Recommender,
        *,
        training: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        if_current: str | None = None,
    ) -> str:
        """Save ``recommender`` as a new version, verify it, make it current; return its id.

        ``if_current``: publish only if the current version is still this one (a trainer
        passes its base version, so that a rollback made while it trained is not undone
        by a candidate trained from the version rolled back from).
        """
        with self._locked(create=True):
            if if_current is not None and self.current_version() != if_current:
                raise UserError(
                    f"{self.root}: current version changed from {if_current} to "
                    f"{self.current_version()} meanwhile; not publishing"
                )
            versions = self._versions()
            sequence = versions[-1][0] + 1 if versions else 1
            version = f"{sequence:06d}-{new_version_id()}"
            path = save_model(
                recommender,
                self.path_of(version),
                training=training,
                metrics=metrics,
                version=version,
            )
            try:
                self.load(version, optimizer_state=True)
            except UserError:
                self._delete(path)
                raise
            history = [*self.served_history(), version]
            self._point_to(version)
            self._write_history(history)
            self._prune()
        self._announce("publish", version)
        return version

    def publish_directory(self, model_dir: str | os.PathLike[str]) -> str:
        """Import an offline-trained model directory (verified) as a new version, with
        its optimizer state if it has one."""
        recommender = load_model(model_dir, device="cpu", optimizer_state=True)
        if recommender.index is None:  # every published version can rank approximately
            recommender.build_index()
        training = {
            **recommender.metadata.get("training", {}),
            "imported_from": str(model_dir),
            "imported_version": recommender.version,
        }
        return self.publish(
            recommender, training=training, metrics=recommender.metadata.get("metrics", {})
        )

    def rollback(self) -> str:
        """Point ``CURRENT`` at the retained version served before the current one (the
        served history, not the publish order) and drop the current one from the
        history; return the target. The target is verified first: rolling back onto a
        broken version would only swap one bad model for another."""
        with self._locked():
            history = self.served_history()
            if not history:
                raise UserError(f"{self.root}: empty registry; nothing to roll back")
            if len(history) < 2:
                raise UserError(
                    f"{self.root}: no retained version was served before {history[-1]}; "
                    f"nothing to roll back to"
                )
            target = history[-2]
            self.load(target)
            self._point_to(target)
            self._write_history(history[:-1])
        self._announce("rollback", target)
        return target

    def prune(self) -> list[str]:
        """Apply retention now (it also runs after every publish); return deleted ids."""
        with self._locked():
            return self._prune()

    def _versions(self) -> list[tuple[int, str, Path]]:
        """(sequence, id, path) of the registry's versions, in publish order."""
        if not self.versions_dir.is_dir():
            return []
        found = []
        for path in self.versions_dir.iterdir():
            match = _VERSION.fullmatch(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path.name, path))
        return sorted(found)

    def _prune(self) -> list[str]:
        """Delete what is neither among the last ``keep`` published nor among the last
        ``keep`` served (the current version and the rollback targets)."""
        history = self.served_history()
        served = set(history[-self.keep :])
        doomed = [
            (name, path) for _, name, path in self._versions()[: -self.keep] if name not in served
        ]
        for _, path in doomed:
            self._delete(path)
        if doomed:  # HISTORY holds retained versions only, so it stays small
            self._write_history(self.served_history())
        return [name for name, _ in doomed]

    def _stored_history(self) -> list[str] | None:
        """``HISTORY`` as written, or None when there is none."""
        path = self.root / HISTORY
        try:
            lines = path.read_text(encoding="utf-8").split()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a list of version ids (not text)") from None
        for line in lines:
            if not _SAFE_NAME.fullmatch(line):
                raise UserError(f"{path}: {line[:80]!r} is not a version id")
        return lines

    def _point_to(self, version: str) -> None:
        self._replace(POINTER, version + "\n")

    def _write_history(self, history: list[str]) -> None:
        self._replace(HISTORY, "".join(version + "\n" for version in history))

    def _replace(self, name: str, text: str) -> None:
        """Replace the file ``name`` atomically and durably: a temp file, fsync,
        ``os.replace``, fsync of the directory."""
        temporary = self.root / f"{name}.tmp-{secrets.token_hex(4)}"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.root / name)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        fsync_path(self.root)

    def _delete(self, path: Path) -> None:
        """Rename out of sight first (atomic), then remove: a worker that is loading the
        version at this moment fails cleanly instead of reading a half-deleted one."""
        doomed = path.parent / f".{path.name}.deleting-{secrets.token_hex(4)}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    @contextmanager
    def _locked(self, create: bool = False) -> Iterator[None]:
        """Hold the writers' lock; only publish creates a registry that does not exist."""
        if create:
            self.versions_dir.mkdir(parents=True, exist_ok=True)
        elif not self.versions_dir.is_dir():
            raise UserError(f"{self.root}: not a model registry (no {VERSIONS}/ directory)")
        with open(self.root / LOCK, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._sweep()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _sweep(self) -> None:
        """Remove what killed writers left: with the lock held, no live writer owns any
        staging directory or pointer or history temp file."""
        for path in self.versions_dir.iterdir():
            if path.name.startswith(".") and (".tmp-" in path.name or ".deleting-" in path.name):
                shutil.rmtree(path, ignore_errors=True)
        for name in (POINTER, HISTORY):
            for path in self.root.glob(f"{name}.tmp-*"):
                path.unlink(missing_ok=True)

    def _announce(self, action: str, version: str) -> None:
        if self.announcer is not None:
            self.announcer.announce(action, version, self.path_of(version).resolve())


def _peek_metadata(path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads((path / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return metadata if isinstance(metadata, dict) else {}
