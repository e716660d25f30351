"""An optional C kernel for the optimizer: Adagrad with momentum, in place, on chosen rows.

A training step on rsc15-100k touches ~1,200 item rows. In torch ops their update is a
gather, a dozen elementwise passes over a strided state and two scatter-adds: 0.53 ms
for 1,200 rows of 100 (measured alone), of a 2.5 ms step. One C loop over the rows
(``adagrad_rows.c``) updates them where they lie in 0.08-0.10 ms, and the dense weights'
flat vector as one "row". The whole step takes 1.4 ms instead of 2.5 ms, and
``streamrec bench train`` 32.8 s instead of 49.6 s (same machine, back to back).

The kernel is compiled by the machine's C compiler (``$CC``, else ``cc``) the first time a
process needs it, ~0.1 s, into a temporary directory that is removed once it is loaded:
a build tuned for one CPU (``-march=native``) is never loaded on another, and nothing is
cached. ``-ffp-contract=off`` keeps the arithmetic that of the torch path, which stays the
reference and the fallback: without a compiler (a warning says so once) or with
``STREAMREC_NATIVE=0`` the optimizer uses torch, with the same results up to float
rounding (``tests/test_optim.py`` compares the two).
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

SOURCE = Path(__file__).with_name("adagrad_rows.c")
# -fno-math-errno lets sqrtf vectorise (75 instead of 320 us for 1,200 rows of 100);
# -ffp-contract=off keeps a * b + c two roundings, as in torch.
FLAGS = ("-O3", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC")
_ARGUMENTS = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
              ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
              ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_int)


def enabled() -> bool:
    """Whether the kernel may be used (``STREAMREC_NATIVE=0`` turns it off)."""
    return os.environ.get("STREAMREC_NATIVE", "1") != "0"


@functools.cache
def _kernel() -> ctypes._CFuncPtr | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler (cc) found: training updates item rows with torch "
                    "ops, and training takes ~1.5x as long; install gcc to speed it up")
        return None
    build = Path(tempfile.mkdtemp(prefix="streamrec-kernel-"))
    try:
        library = build / "adagrad_rows.so"
        # -march=native where the compiler knows it, plain otherwise.
        for extra in (("-march=native",), ()):
            try:
                result = subprocess.run([compiler, *FLAGS, *extra, "-o", str(library),
                                         str(SOURCE), "-lm"], capture_output=True, text=True)
                error = result.stderr.strip()[-500:] if result.returncode else None
            except OSError as exc:  # CC names no runnable program
                error = str(exc)
            if error is None:
                break
        else:
            log.warning("compiling %s failed, training uses torch ops for the optimizer "
                        "(~1.5x as long): %s", SOURCE.name, error)
            return None
        function = ctypes.CDLL(str(library)).adagrad_momentum_rows
    finally:
        shutil.rmtree(build, ignore_errors=True)
    function.restype = None
    function.argtypes = _ARGUMENTS
    return function


def _fits(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def adagrad_momentum_rows_(param: torch.Tensor, state: torch.Tensor, rows: torch.Tensor | None,
                           grad: torch.Tensor, lr: float, momentum: float, eps: float,
                           nesterov: bool) -> bool:
    """Apply the update to rows ``rows`` (distinct; None: all) of the 2-D ``param`` with
    their gradient rows ``grad`` and packed ``[accumulator | velocity]`` ``state`` rows.

    Returns False, changing nothing, when the kernel is off or unavailable or the tensors
    are not float32 on the CPU: the caller then does the update itself.
    """
    if not (enabled() and _fits(param, state, grad)):
        return False
    kernel = _kernel()
    if kernel is None:
        return False
    n_rows, width = grad.shape
    if param.stride(1) != 1 or not state.is_contiguous() or state.shape[1] != 2 * width \
            or param.shape[1] != width or len(state) != len(param):
        raise ValueError("the kernel needs rows of unit stride as wide as the gradient's "
                         "and a contiguous packed state of as many rows")
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
    kernel(param.data_ptr(), param.stride(0), state.data_ptr(), state.stride(0),
           None if rows is None else rows.data_ptr(), n_rows, grad.data_ptr(), width,
           lr, momentum, eps, int(nesterov))
    return True
