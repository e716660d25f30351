"""Seeded bugs: does the suite catch the mistakes that would break what the README promises?

``python -m stream.devtools.seeded_bugs [--only NAME ...]`` applies each known bug below
to the working tree, one at a time, runs the tests that guard the behaviour it breaks,
and restores the file, whatever happens. A bug is *caught* when those tests fail. One
JSON line on stdout gives each bug's outcome; progress goes to stderr. The run takes
several minutes (some guards are broker tests) and is not part of CI: run it before
claiming that the tests prove a guarantee.

Each bug replaces one exact snippet of one file; a snippet that no longer occurs exactly
once is reported as ``stale`` (the code moved: update the bug), never silently skipped.
The files it touches must be unmodified (it refuses otherwise, so that restoring them
cannot lose work).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SeededBug:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = (
    SeededBug(
        "idempotence-guard",
        "a redelivered click with the session's last offset is applied again",
        "stream/serving/scoring.py",
        "clicks[i].offset <= state.last_offset",
        "clicks[i].offset < state.last_offset",
        ("tests/test_scoring.py",),
    ),
    SeededBug(
        "hidden-dropout-backward",
        "the hand-written backward pass ignores the hidden dropout mask",
        "model/train_step.py",
        "d_hidden = d_output * cache.dropout_mask if cache.dropout_mask is not None else d_output",
        "d_hidden = d_output",
        ("tests/test_train_step.py",),
    ),
    SeededBug(
        "ranking-order",
        "top-k lists come worst first",
        "model/ranking.py",
        "        result = torch.topk(scores, k, dim=1)\n"
        "        return result.indices, result.values",
        "        result = torch.topk(scores, k, dim=1)\n"
        "        return result.indices.flip(1), result.values.flip(1)",
        ("tests/test_top_k.py", "tests/test_scoring.py"),
    ),
    SeededBug(
        "gate-always-passes",
        "the trainer promotes every candidate, however it scores",
        "stream/learning/gate.py",
        "passed = counts[True] > 0 and candidate_recall >= baseline.recall(k) - margin",
        "passed = True",
        (
            "tests/test_trainer.py::test_the_gate_rejects_a_broken_candidate_and_passes_an_equal_one",
        ),
    ),
    SeededBug(
        "commit-before-changelog",
        "offsets are committed without awaiting the changelog records in flight",
        "stream/serving/faust_patches.py",
        "            await barrier()\n",
        "            pass\n",
        (
            "tests/test_faust_patches.py",
            "tests/test_crash_recovery.py::"
            "test_clicks_whose_changelog_records_failed_are_never_committed",
        ),
    ),
    SeededBug(
        "no-fence",
        "a worker woken from a pause past its group session writes its batch",
        "stream/serving/fencing.py",
        "        if generation is None:\n            return\n",
        "        return\n",
        ("tests/test_fencing.py",),
    ),
    SeededBug(
        "no-producer-fence",
        "records handed to the producer before a long pause go out on waking",
        "stream/serving/faust_patches.py",
        "            await fence.confirm_current()\n",
        "            pass\n",
        ("tests/test_faust_patches.py",),
    ),
    SeededBug(
        "watermark-is-the-maximum",
        "one click stamped in the future moves its partition's event time",
        "stream/event_time.py",
        "state.mark = max(state.mark, state.ranked[-WATERMARK_RANK])",
        "state.mark = max(state.mark, state.ranked[-1])",
        (
            "tests/test_expiry.py",
            "tests/test_trainer.py::"
            "test_completion_uses_the_watermark_of_the_session_s_own_partition",
        ),
    ),
    SeededBug(
        "dead-letters-one-by-one",
        "each dead letter's delivery is awaited before the next message is read",
        "stream/serving/processor.py",
        "                    dead_letters.append(self.dead_letters.send(record, parsed))\n",
        "                    await self.dead_letters.send(record, parsed)\n",
        ("tests/test_dead_letters.py::test_a_flood_of_bad_messages_does_not_slow_the_worker",),
    ),
    SeededBug(
        "holes-not-read",
        "a hole in a partition's offsets is counted, but its clicks are not read again",
        "stream/serving/sequence.py",
        "        records = await asyncio.to_thread(self.reader.read, partition, start, end)\n",
        "        records: list[FetchedRecord] = []\n",
        (
            "tests/test_input_sequence.py::"
            "test_a_hole_after_the_committed_offset_is_read_from_the_broker",
        ),
    ),
    SeededBug(
        "sequence-kept-across-rebalances",
        "after a rebalance the next click is checked against the last batch, not the commit",
        "stream/serving/sequence.py",
        "        self._expected.clear()\n",
        "        pass\n",
        (
            "tests/test_input_sequence.py::"
            "test_the_check_starts_again_from_the_commit_after_every_rebalance",
        ),
    ),
    SeededBug(
        "duplicates-uncounted",
        "redelivered clicks found applied are not counted",
        "stream/serving/processor.py",
        "                self.counters.duplicates += 1\n",
        "                pass\n",
        (
            "tests/test_crash_recovery.py::"
            "test_redelivered_clicks_already_applied_are_counted_as_duplicates_not_answered_again",
        ),
    ),
    SeededBug(
        "ready-while-rebalancing",
        "/readyz stays 200 through a short rebalance",
        "stream/serving/processor.py",
        "        self.health.not_ready_reason = REBALANCING\n",
        "",
        (
            "tests/test_rebalance.py::test_revoking_partitions_makes_the_worker_not_ready_at_once",
            "tests/test_rebalance.py::test_a_worker_is_not_ready_while_its_group_rebalances",
        ),
    ),
    SeededBug(
        "batch-mixes-versions",
        "a model swapped in during a batch answers the rest of that batch",
        "stream/serving/processor.py",
        "                outcome.scores,\n                recommender.version,",
        "                outcome.scores,\n                self.recommender.version,",
        ("tests/test_hot_swap.py::test_a_swap_during_a_batch_takes_effect_from_the_next_batch",),
    ),
    SeededBug(
        "wrong-partition-applied",
        "a click on another partition than its session's is treated as the session's",
        "stream/serving/processor.py",
        "            if sourced.partition == partition:",
        "            if True:",
        (
            "tests/test_dead_letters.py::"
            "test_a_click_on_another_partition_than_its_session_s_is_dead_lettered",
        ),
    ),
    SeededBug(
        "availability-changes-ignored",
        "a running worker does not apply availability changes (it still reads them at start)",
        "stream/serving/processor.py",
        "        changes = availability.changes_since(self._rules_sequence)",
        "        changes: list | None = []",
        (
            "tests/test_availability.py::"
            "test_two_workers_leave_unavailable_items_out_within_a_second",
        ),
    ),
    SeededBug(
        "index-ignores-availability",
        "the item index's lists return unavailable items as candidates",
        "model/item_index.py",
        "        if not self._skipping:",
        "        if True:",
        (
            "tests/test_rules.py::"
            "test_approximate_ranking_skips_unavailable_items_in_lists_and_head",
        ),
    ),
    SeededBug(
        "seen-kept",
        "--exclude-seen asks for no more items than the list's length",
        "model/inference.py",
        "        k = min(wanted + (seen.shape[1] if seen is not None else 0), self.n_items)",
        "        k = wanted",
        ("tests/test_rules.py",),
    ),
    SeededBug(
        "stale-state-kept",
        "a state computed by an older model version is advanced by the new one as it is",
        "stream/serving/scoring.py",
        "        if s is not None and s.model_version == recommender.version\n"
        "    ]\n"
        "    stale = [\n"
        "        (j, s)\n"
        "        for j, s in enumerate(states)\n"
        "        if s is not None and s.model_version != recommender.version\n",
        "        if s is not None\n"
        "    ]\n"
        "    stale = [\n"
        "        (j, s)\n"
        "        for j, s in enumerate(states)\n"
        "        if False\n",
        (
            "tests/test_cluster.py::"
            "test_workers_killed_in_rebalances_between_model_swaps_lose_no_click",
        ),
    ),
)


def run(bug: SeededBug, timeout_s: float) -> dict[str, object]:
    path = REPO / bug.path
    original = path.read_text()
    if original.count(bug.old) != 1:
        return {"bug": bug.name, "outcome": "stale", "detail": f"snippet not once in {bug.path}"}
    started = time.monotonic()
    try:
        path.write_text(original.replace(bug.old, bug.new))
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *bug.tests],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            outcome, detail = "timeout", f"tests still running after {timeout_s:g} s"
        else:
            summary = (result.stdout.strip().splitlines() or [""])[-1]
            outcome = {0: "missed", 1: "caught"}.get(result.returncode, "error")
            detail = summary
    finally:
        path.write_text(original)
    return {
        "bug": bug.name,
        "what": bug.what,
        "outcome": outcome,
        "detail": detail,
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stream.devtools.seeded_bugs",
        description="Apply known bugs one at a time and check that their tests fail.",
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[b.name for b in BUGS])
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per bug (default 600)")
    args = parser.parse_args(argv)
    bugs = [b for b in BUGS if not args.only or b.name in args.only]
    paths = sorted({b.path for b in bugs})
    if subprocess.run(["git", "diff", "--quiet", "--", *paths], cwd=REPO).returncode != 0:
        parser.error(f"commit or stash your changes to {', '.join(paths)} first")
    results = []
    for number, bug in enumerate(bugs, 1):
        print(f"[{number}/{len(bugs)}] {bug.name}: {bug.what}", file=sys.stderr, flush=True)
        results.append(run(bug, args.timeout_s))
        print(f"    {results[-1]['outcome']}: {results[-1]['detail']}", file=sys.stderr, flush=True)
    caught = sum(r["outcome"] == "caught" for r in results)
    print(json.dumps({"caught": caught, "bugs": len(results), "results": results}))
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
