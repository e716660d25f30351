"""Hot swap: a worker serving a registry follows its ``CURRENT`` pointer.

Every worker (not only the group's leader: each one serves its own partitions with its
own copy of the model) polls the registry's pointer on a Faust timer. When it names a
version other than the one being served, the worker loads and verifies it in a thread
(``loop.run_in_executor``), so reading and checksumming weights never stalls the event
loop, gives it the current item availability there, and then swaps it in on the loop
(:meth:`~stream.serving.processor.ClickProcessor.swap_model`, which applies the
availability changes read meanwhile). The agent reads that
attribute once per batch (:class:`stream.serving.processor.ClickProcessor`), so the swap
falls between two batches and no batch mixes versions. Sessions whose stored state was computed
by the old version are rebuilt from their recent items on their next click
(:mod:`stream.serving.scoring`).

Polling the file rather than consuming the announcement topic makes the pointer the
single source of truth: a lost or late announcement, or a worker that was down while one
was sent, cannot leave a worker on an old model. A rollback is just another pointer move,
so it propagates the same way.

A version that fails to load (corrupt, partial, incompatible, not finite, or not the
version its directory claims) is never served: the worker keeps the old model, logs why
and counts it in ``rejected_models``. Versions are immutable, so a rejected one is not
retried; an I/O error (a file system hiccup) is, on the next poll. A worker that started
on an older version because the current one failed verification
(:meth:`stream.registry.ModelRegistry.current`) counts those refusals too, and does not
verify them again.
"""

from __future__ import annotations

import asyncio
import logging
import time

import faust

from model.errors import UserError
from model.inference import Recommender
from stream.registry import POINTER, ModelRegistry
from stream.serving.processor import ClickProcessor

logger = logging.getLogger("streamrec.hot_swap")


class ModelWatcher:
    """Swaps ``processor.recommender`` to the registry's current version."""

    def __init__(
        self, registry: ModelRegistry, processor: ClickProcessor, ranking: str = "auto"
    ) -> None:
        self.registry = registry
        self.processor = processor
        self.ranking = ranking
        self.rejected: set[str] = set(registry.refused)
        processor.counters.rejected_models += len(registry.refused)

    async def check(self) -> None:
        """One poll: load the current version if it is new, then swap or reject it."""
        loop = asyncio.get_running_loop()
        try:
            version = await loop.run_in_executor(None, self.registry.current_version)
        except (UserError, OSError) as exc:
            logger.error(
                "cannot read the registry pointer (still serving %s): %s",
                self.processor.recommender.version,
                exc,
            )
            return
        serving = self.processor.recommender.version
        if version is None or version == serving or version in self.rejected:
            return
        noticed = time.time()
        try:
            recommender, rules_sequence = await loop.run_in_executor(None, self._load, version)
        except UserError as exc:
            self.rejected.add(version)
            self.processor.counters.rejected_models += 1
            logger.error("rejected model %s, still serving %s: %s", version, serving, exc)
            return
        except OSError as exc:
            logger.error(
                "could not read model %s (will retry), still serving %s: %s", version, serving, exc
            )
            return
        loaded = time.time()
        self.processor.swap_model(recommender, rules_sequence)
        self.processor.counters.swaps += 1
        logger.warning(
            "swapped model %s -> %s (%d items): pointer moved %.3f s before it "
            "was noticed, loaded in %.3f s, swapped at %.3f",
            serving,
            version,
            recommender.n_items,
            noticed - self._pointer_moved_at(),
            loaded - noticed,
            time.time(),
        )

    def _load(self, version: str) -> tuple[Recommender, int]:
        """Load and verify ``version`` and prepare its ranking and its catalogue rules
        (in a thread: building an index for a version saved without one takes seconds)."""
        recommender = self.registry.load(version)
        logger.info("model %s ranking: %s", version, recommender.use_ranking(self.ranking))
        return self.processor.prepare_model(recommender)

    def _pointer_moved_at(self) -> float:
        """When ``CURRENT`` was last replaced (its mtime), for the swap's log line."""
        try:
            return (self.registry.root / POINTER).stat().st_mtime
        except OSError:
            return float("nan")


def watch_registry(
    app: faust.App,
    processor: ClickProcessor,
    registry: ModelRegistry,
    interval_s: float,
    ranking: str = "auto",
) -> ModelWatcher:
    """Poll ``registry`` every ``interval_s`` seconds on every worker of ``app``."""
    watcher = ModelWatcher(registry, processor, ranking)
    app.timer(interval_s, on_leader=False, name="streamrec.watch_registry")(watcher.check)
    return watcher
