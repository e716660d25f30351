"""A pytest plugin that fails a run in which any test was skipped, when asked to.

Tests skip themselves when something they need is missing: the rsc15 sample under
``../shared``, kcat, Prometheus, a C compiler, the int8 product, Tansu. On a developer's
machine that is a convenience; in CI it would turn a missing dependency into a green run
that proved nothing, so ``.ci/run`` sets ``STREAMREC_FAIL_ON_SKIP=1`` and a skipped test
fails the run, with the skip reasons listed (``-ra`` prints them).
"""

from __future__ import annotations

import os

import pytest

ENV = "STREAMREC_FAIL_ON_SKIP"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get(ENV, "") in ("", "0"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(
                f"{ENV} is set and {skipped} test(s) were skipped: install what they "
                "need (see the skip reasons above)",
                red=True,
            )
