"""Learning while serving: ``streamrec trainer``.

A separate process (never a worker: training for seconds or minutes would stall a
worker's event loop and its partitions) that follows the click topic in its own consumer
group and keeps the registry's model current:

1. **Buffer.** Valid clicks (:func:`stream.kafka.wire.parse_click`; rejects are only counted,
   the workers dead-letter them) are grouped by session in a :class:`~stream.learning.buffer.SessionBuffer`. A
   session is complete once the event-time watermark of its partition (the latest click
   time seen there) is ``session_timeout_s`` past its last click: the rule the workers
   use to expire state. Per partition, because a session's clicks share one partition and
   partitions are read at different paces: a watermark from a partition read ahead would
   cut the sessions of one lagging behind.
   The buffer is bounded in sessions (the least recently active is evicted), in clicks
   per session (the latest are kept) and in age (a complete session still waiting after
   ``max_session_age_s`` is stale and dropped).
2. **Train.** Every ``interval_s`` on a fixed clock (a round is due ``interval_s`` after
   the previous one was due, whatever it took; one that overran its slot is followed at
   once), when at least ``min_sessions`` sessions of two or more clicks are complete, the most recent ``holdout_sessions`` of them are held out and the
   rest, plus older sessions against forgetting what the model knew, fine-tune the
   current model warm-started (:func:`model.train.train` with ``base``: known items keep
   their indexes and rows, new items are appended). The older sessions are a uniform
   random sample of the sessions the trainer has seen (:class:`~stream.learning.replay.ReplaySample`) and, with
   ``replay_log``, a fresh random draw of ``replay_log_sample`` sessions of an offline
   click log, typically the one the first model was trained on (:class:`~stream.learning.replay.SessionPool`):
   a trainer that has just started (or restarted) has seen little, and fine-tuning on
   recent sessions alone forgets part of what the older ones taught.
   When the model carries its optimizer state (artifact format 3), the fine-tune resumes
   Adagrad from it at ``learning_rate``; a model without one starts a fresh accumulator,
   whose first steps are as large as the learning rate on every weight, at the smaller
   ``fresh_learning_rate``.
   A round trains within a budget (``round_budget_s``, by default 40 % of the interval)
   so that it ends well before the next is due: as many sessions as the training speed
   measured by the previous rounds allows, the most recent fresh ones first (a quarter
   of the budget kept for replayed ones), so new items are learnt by the next round
   even when the stream brings more than a round can train on.
   The trainer lowers its CPU priority (``nice``): on a machine it shares with workers,
   serving clicks comes first.
   A round that finds no new click since the previous round does not wait for
   ``min_sessions``: the stream has gone quiet, and the complete sessions (if more than
   the holdout) are trained on now rather than after the next burst of traffic.
   With ``new_item_rounds`` (the default) a round also starts before the clock when a
   round now would train on a complete session holding an item the current model does not
   know (enough sessions complete, and that session not among the held-out ones), at
   least ``max(0.5 s, interval_s / 10)`` after the previous round began; the clock then
   restarts from it. A catalogue change should not wait for the clock.
3. **Gate.** Candidate and current model are scored on the holdout with
   :func:`model.evaluate.evaluate` (Recall@20). The current model cannot rank items it
   has never seen, so both are compared on the predictions whose target the *current*
   model knows; the candidate's recall on targets only it knows is reported separately.
   The candidate is promoted when it is not worse than the current model by more than
   ``gate_margin``, and published to the registry only if the registry still points at
   the model it was trained from (a rollback made meanwhile wins).
4. **Log.** Every decision (wait, promoted, rejected, not_published, failed) is one JSON
   line on stdout, with what started the round (``trigger``: ``clock`` or ``new_items``).

Offsets are committed automatically as clicks are read, so a restarted trainer starts
with an empty buffer: it loses at most one buffer of sessions, which costs a little
training data, never correctness.
"""

