"""Optional C kernels, compiled at first use: the optimizer's row update and the ranking
search. Both have a torch path that stays the reference and the fallback.

- ``adagrad_rows.c``: Adagrad with momentum, in place, on chosen rows. A training step on
  rsc15-100k touches ~1,200 item rows. In torch ops their update is a gather, a dozen
  elementwise passes over a strided state and two scatter-adds: 0.53 ms for 1,200 rows of
  100 (measured alone), of a 2.5 ms step. One C loop over the rows updates them where they
  lie in 0.08-0.10 ms, and the dense weights' flat vector as one "row". The whole step
  takes 1.4 ms instead of 2.5 ms, and ``streamrec bench train`` 32.8 s instead of 49.6 s
  (same machine, back to back).
- ``rank_blocks.c``: the search of :class:`model.ranking.Int8Catalogue` after its int8
  product, one pass per row instead of a dozen tensor operations.

The kernels are compiled by the machine's C compiler (``$CC``, else ``cc``) the first time a
process needs them, ~0.2 s, into a temporary directory that is removed once loaded: a
build tuned for one CPU (``-march=native``) is never loaded on another, and nothing is
cached. ``-ffp-contract=off`` keeps the arithmetic that of the torch paths: when the
kernels cannot be built or loaded (a warning says why, once) or with
``STREAMREC_NATIVE=0`` torch does the work, with the same results up to float rounding
(``tests/test_optim.py`` and ``tests/test_top_k.py`` compare the two;
``tests/test_native.py`` the failures that fall back).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("adagrad_rows.c", "rank_blocks.c"))
# -fno-math-errno lets sqrtf vectorise (75 instead of 320 us for 1,200 rows of 100);
# -ffp-contract=off keeps a * b + c two roundings, as in torch.
FLAGS = ("-O3", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC")
_POINTER, _INT64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "adagrad_momentum_rows": (
        None,
        (
            _POINTER,
            _INT64,
            _POINTER,
            _INT64,
            _POINTER,
            _INT64,
            _POINTER,
            _INT64,
            ctypes.c_float,
            ctypes.c_float,
            ctypes.c_float,
            ctypes.c_int,
        ),
    ),
    "rank_blocks": (
        ctypes.c_int,
        (
            _POINTER,
            _INT64,
            _INT64,
            _POINTER,
            _POINTER,
            _POINTER,
            _POINTER,
            _POINTER,
            _INT64,
            _POINTER,
            _POINTER,
            _INT64,
            _INT64,
            _POINTER,
            _POINTER,
        ),
    ),
}


def enabled() -> bool:
    """Whether the kernel may be used (``STREAMREC_NATIVE=0`` turns it off)."""
    return os.environ.get("STREAMREC_NATIVE", "1") != "0"


class _Unavailable(Exception):
    """Why the kernels cannot be built or loaded here (torch then does their work)."""


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernels, or None when this machine cannot build or load them. They only make
    things faster, so no failure of theirs may stop training or serving: a missing or
    failing compiler, a temporary directory that cannot be written or whose files cannot
    be mapped executable (noexec), or a library that does not load all end in one warning
    saying why, and torch ops do the work."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning(
            "no C compiler (cc) found: training updates item rows, and ranking "
            "searches large catalogues, with torch ops, which takes longer; "
            "install gcc to speed them up"
        )
        return None
    try:
        return _build(compiler)
    except _Unavailable as exc:
        log.warning("%s; training and ranking use torch ops, which takes longer", exc)
        return None


def _build(compiler: str) -> ctypes.CDLL:
    """Compile the kernels with ``compiler`` into a temporary directory and load them;
    raises :class:`_Unavailable` saying which step failed."""
    sources = " and ".join(s.name for s in SOURCES)
    try:
        build = Path(tempfile.mkdtemp(prefix="streamrec-kernel-"))
    except OSError as exc:
        raise _Unavailable(f"no temporary directory to compile {sources} in: {exc}") from None
    try:
        path = build / "streamrec_kernels.so"
        # -march=native where the compiler knows it, plain otherwise.
        for extra in (("-march=native",), ()):
            try:
                result = subprocess.run(
                    [compiler, *FLAGS, *extra, "-o", str(path), *map(str, SOURCES), "-lm"],
                    capture_output=True,
                    text=True,
                    errors="replace",
                )
                error = result.stderr.strip()[-500:] if result.returncode else None
            except OSError as exc:  # CC names no runnable program
                error = str(exc)
            if error is None:
                break
        else:
            raise _Unavailable(f"compiling {sources} failed: {error}")
        try:
            library = ctypes.CDLL(str(path))
            for name, (result_type, arguments) in _SIGNATURES.items():
                function = getattr(library, name)
                function.restype = result_type
                function.argtypes = arguments
        except (OSError, AttributeError) as exc:  # not a library, noexec, symbols missing
            raise _Unavailable(
                f"loading the kernels compiled from {sources} failed: {exc}"
            ) from None
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return library


def _fits(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def adagrad_momentum_rows_(
    param: torch.Tensor,
    state: torch.Tensor,
    rows: torch.Tensor | None,
    grad: torch.Tensor,
    lr: float,
    momentum: float,
    eps: float,
    nesterov: bool,
) -> bool:
    """Apply the update to rows ``rows`` (distinct; None: all) of the 2-D ``param`` with
    their gradient rows ``grad`` and packed ``[accumulator | velocity]`` ``state`` rows.

    Returns False, changing nothing, when the kernel is off or unavailable or the tensors
    are not float32 on the CPU: the caller then does the update itself.
    """
    if not (enabled() and _fits(param, state, grad)):
        return False
    library = _library()
    if library is None:
        return False
    n_rows, width = grad.shape
    if (
        param.stride(1) != 1
        or not state.is_contiguous()
        or state.shape[1] != 2 * width
        or param.shape[1] != width
        or len(state) != len(param)
    ):
        raise ValueError(
            "the kernel needs rows of unit stride as wide as the gradient's "
            "and a contiguous packed state of as many rows"
        )
    # C does not check bounds: what torch would refuse with an IndexError is refused here.
    if rows is None:
        if n_rows > len(param):
            raise IndexError(f"{n_rows} gradient rows for {len(param)} parameter rows")
    else:
        rows = rows.to(torch.int64).contiguous()
        lowest, highest = torch.aminmax(rows) if len(rows) else (0, 0)
        if len(rows) != n_rows or lowest < 0 or highest >= len(param):
            raise IndexError(f"rows must be {n_rows} indexes below {len(param)}")
    grad = grad.contiguous()
    library.adagrad_momentum_rows(
        param.data_ptr(),
        param.stride(0),
        state.data_ptr(),
        state.stride(0),
        None if rows is None else rows.data_ptr(),
        n_rows,
        grad.data_ptr(),
        width,
        lr,
        momentum,
        eps,
        int(nesterov),
    )
    return True


def rank_blocks(
    products: torch.Tensor,
    unit: torch.Tensor,
    bound: torch.Tensor,
    padded_bias: torch.Tensor,
    block_max_bias: torch.Tensor,
    outputs: torch.Tensor,
    vectors: torch.Tensor,
    bias: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``rank_blocks.c`` on contiguous CPU tensors: the ``k`` best (indexes, scores) of
    each row, or None when the kernel is off or unavailable (the caller searches in torch).

    ``products``: int32 (rows, blocks, 64); ``unit``, ``bound``: per row; ``padded_bias``:
    (blocks * 64), -inf past the last item; ``block_max_bias``: per block; ``outputs``:
    (rows, width); ``vectors``: (items, width); ``bias``: (items)."""
    if not enabled():
        return None
    library = _library()
    if library is None:
        return None
    rows, blocks, block = products.shape
    items, width = vectors.shape
    # C does not check shapes: what would read past a tensor is refused here.
    if (
        block != 64
        or k > blocks
        or k > items
        or blocks * block != len(padded_bias)
        or items > blocks * block
        or outputs.shape != (rows, width)
        or not all(
            len(t) == n
            for t, n in ((unit, rows), (bound, rows), (block_max_bias, blocks), (bias, items))
        )
    ):
        raise ValueError("rank_blocks: tensors of inconsistent shapes")
    if products.dtype != torch.int32 or not _fits(
        unit, bound, padded_bias, block_max_bias, outputs, vectors, bias
    ):
        raise ValueError("rank_blocks: needs int32 products and float32 CPU tensors")
    tensors = [
        t.contiguous()
        for t in (products, unit, bound, padded_bias, block_max_bias, outputs, vectors, bias)
    ]
    indices = torch.empty(rows, k, dtype=torch.int64)
    scores = torch.empty(rows, k)
    pointers = [t.data_ptr() for t in tensors]
    if library.rank_blocks(
        pointers[0],
        rows,
        blocks,
        *pointers[1:6],
        width,
        pointers[6],
        pointers[7],
        items,
        k,
        indices.data_ptr(),
        scores.data_ptr(),
    ):
        raise MemoryError("rank_blocks: out of memory")
    return indices, scores
