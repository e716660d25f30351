"""The C kernels (model.native) fall back to torch, with one warning, whatever stops their
build or load: training and serving never fail for want of them."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from model import native
from model.optim import AdagradMomentum
from model.ranking import LARGE_CATALOGUE, Int8Catalogue, int8_supported

#: Stands for a compiler: finds the ``-o`` output among its arguments and writes ``BODY``.
FAKE_COMPILER = """#!/bin/sh
while [ "$1" != "-o" ]; do shift; done
BODY
"""


def _compiler(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-cc"
    script.write_text(FAKE_COMPILER.replace("BODY", body))
    script.chmod(0o755)
    return str(script)


def corrupt_library(tmp_path: Path) -> str:
    """Exits 0 but leaves a file that is no shared object (a full disk, a broken linker)."""
    return _compiler(tmp_path, "printf 'not an ELF file' > \"$2\"")


def library_without_kernels(tmp_path: Path) -> str:
    """Builds a shared object that loads but lacks the kernels' symbols."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler on this machine")
    return _compiler(tmp_path, f"echo 'int unrelated;' | {cc} -shared -fPIC -x c -o \"$2\" -")


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Kernels built anew for the test (and again for the next one)."""
    monkeypatch.delenv("STREAMREC_NATIVE", raising=False)
    native._library.cache_clear()
    yield
    native._library.cache_clear()


def _rows_after_steps(use_native: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    table = torch.nn.Parameter(torch.randn(50, 8, generator=generator))
    optimizer = AdagradMomentum(lr=0.2, momentum=0.2, native=use_native)
    for _ in range(5):
        rows = torch.randperm(50, generator=generator)[:10]
        optimizer.step_rows(table, rows, torch.randn(10, 8, generator=generator))
    return table.detach()


def _assert_torch_does_the_work(caplog: pytest.LogCaptureFixture, why: str) -> None:
    """One warning saying why, and results equal to the torch path's, for both kernels."""
    expected = _rows_after_steps(use_native=False)
    for _ in range(2):  # the failure is not retried, nor warned about again
        assert torch.equal(_rows_after_steps(use_native=True), expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and why in warnings[0] and "torch ops" in warnings[0]
    if int8_supported(torch.device("cpu")):
        generator = torch.Generator().manual_seed(1)
        vectors = torch.randn(LARGE_CATALOGUE, 16, generator=generator)
        bias = torch.randn(LARGE_CATALOGUE, 1, generator=generator)
        outputs = torch.tanh(torch.randn(9, 16, generator=generator))
        indices, values = Int8Catalogue(vectors, bias).top_k(outputs, 20)
        expected_values = torch.topk(torch.addmm(bias.view(1, -1), outputs, vectors.t()), 20)
        torch.testing.assert_close(values, expected_values.values, rtol=0, atol=1e-5)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@pytest.mark.parametrize(
    ("make_compiler", "why"),
    [(corrupt_library, "loading"), (library_without_kernels, "loading")],
    ids=["corrupt", "no-symbols"],
)
def test_a_library_that_does_not_load_leaves_the_work_to_torch(
    make_compiler: Callable[[Path], str],
    why: str,
    tmp_path: Path,
    fresh_build: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("CC", make_compiler(tmp_path))
    _assert_torch_does_the_work(caplog, why)


def test_no_usable_temporary_directory_leaves_the_work_to_torch(
    tmp_path: Path,
    fresh_build: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    _assert_torch_does_the_work(caplog, "gone")
