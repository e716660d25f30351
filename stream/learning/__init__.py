"""Learning while serving: ``streamrec trainer``.

A separate process (never a worker: training for seconds or minutes would stall a
worker's event loop and its partitions) that follows the click topic in its own consumer
group and keeps the registry's model current:

1. **Buffer** (:mod:`~stream.learning.buffer`). Valid clicks are grouped by session; a
   session is complete once its partition's event time is ``session_timeout_s`` past its
   last click, the rule workers expire state by (:mod:`stream.event_time`). The buffer is
   bounded in sessions, in clicks per session and in age.
2. **Train** (:mod:`~stream.learning.loop`). Every ``interval_s`` on a fixed clock, when
   at least ``min_sessions`` sessions of two or more clicks are complete, the most recent
   ``holdout_sessions`` are held out and the rest, plus older sessions against forgetting
   (:mod:`~stream.learning.replay`), fine-tune the current model warm-started
   (:func:`model.train.train` with ``base``: known items keep their rows, new items are
   appended). A model that carries its optimizer state resumes Adagrad from it at
   ``learning_rate``; one without starts a fresh accumulator, whose first steps are as
   large as the learning rate on every weight, at the smaller ``fresh_learning_rate``.
   A round trains within a budget (``round_budget_s``, by default 40 % of the interval)
   so that it ends before the next is due, the most recent sessions first, so new items
   are learnt by the next round even when the stream brings more than a round can train
   on. A round that finds no new click since the previous one does not wait for
   ``min_sessions``: the stream has gone quiet. With ``new_item_rounds`` a round also
   starts before the clock as soon as it would train on a complete session holding an
   item the current model does not know: a catalogue change should not wait.
3. **Gate** (:mod:`~stream.learning.gate`). Candidate and current model are compared on
   the holdout (Recall@20) on the targets the current model knows; the candidate is
   published only if it is not worse by more than ``gate_margin`` and the registry still
   points at the model it was trained from (a rollback made meanwhile wins).
4. **Log.** Every decision (wait, promoted, rejected, not_published, failed) is one JSON
   line on stdout, with what started the round (``trigger``: ``clock`` or ``new_items``).

The trainer lowers its CPU priority (``nice``): on a machine it shares with workers,
serving clicks comes first. Its Kafka side, and why a restart loses nothing but a
buffer, is :mod:`~stream.learning.consumer`.
"""
