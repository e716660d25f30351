"""CI's rule that a skipped test fails the run (``STREAMREC_FAIL_ON_SKIP``), through a
real pytest run of a file with one passing and one skipped test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream.devtools.skip_gate import ENV

SUITE = """
import pytest

def test_passes():
    pass

def test_needs_a_tool():
    pytest.skip("tool not installed")
"""


def run_pytest(directory: Path, gate: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if gate is not None:
        env[ENV] = gate
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "stream.devtools.skip_gate"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(("gate", "status"), [(None, 0), ("0", 0), ("1", 1)])
def test_a_skipped_test_fails_the_run_only_when_the_gate_is_set(
    tmp_path: Path, gate: str | None, status: int
) -> None:
    (tmp_path / "test_suite.py").write_text(SUITE)
    result = run_pytest(tmp_path, gate)
    assert "1 passed, 1 skipped" in result.stdout
    assert "SKIPPED" in result.stdout and "tool not installed" in result.stdout
    assert result.returncode == status, result.stdout
    assert (f"{ENV} is set and 1 test(s) were skipped" in result.stdout) == (status == 1)


def test_a_run_without_skips_passes_with_the_gate_set(tmp_path: Path) -> None:
    (tmp_path / "test_suite.py").write_text("def test_passes():\n    pass\n")
    assert run_pytest(tmp_path, "1").returncode == 0
