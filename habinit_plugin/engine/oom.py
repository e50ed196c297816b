"""Out-of-memory recovery: split a chunk of particles and retry instead of stopping the job.

* :func:`is_out_of_memory` recognises the host's, CuPy's and the CUDA libraries' errors.
* :class:`OOMSplitter` runs ``func(index)`` and, when it runs out of memory, frees the
  pool and retries on the two halves, recursively; it only fails (with
  :class:`~.gpu_budget.GPUMemoryError`, naming the budget) when a single particle does
  not fit. ``func`` must be retry-safe: nothing it changed may survive an exception.
* :class:`StagedSum` makes accumulation into running sums (backprojection) retry-safe:
  each piece adds into zeroed scratch arrays that are added to the sums (in place, no
  allocation) only once the piece succeeded.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module, is_cupy
from .gpu_budget import GPUMemoryError, describe_budget

log = logging.getLogger("habinit")

# Messages of CUDA library allocation failures (cuFFT, cuBLAS, cuSOLVER, cuSPARSE, cuRAND,
# runtime, driver). CuPy's own pool raises cupy.cuda.memory.OutOfMemoryError, a MemoryError.
_OOM_MARKERS = (
    "ALLOC_FAILED",
    "ALLOCATION_FAILED",
    "cudaErrorMemoryAllocation",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "out of memory",
)


@dataclass
class SplitStats:
    """Counters since import (or the last :meth:`reset`): out-of-memory errors caught, splits made."""

    ooms: int = 0
    splits: int = 0

    def reset(self) -> None:
        self.ooms = 0
        self.splits = 0


STATS = SplitStats()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an out-of-memory error of the host, of CuPy's pool or of a CUDA library.

    MemoryError (NumPy's, and CuPy's ``OutOfMemoryError`` which derives from it), and
    errors raised by CuPy's bindings (cuFFT ``CUFFT_ALLOC_FAILED``, cuBLAS
    ``CUBLAS_STATUS_ALLOC_FAILED``, the runtime's ``cudaErrorMemoryAllocation``, ...),
    also when they are the cause or context of another exception.
    """
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, MemoryError):
            return True
        module = type(exc).__module__ or ""
        if module.split(".")[0] in ("cupy", "cupy_backends", "cupyx"):
            text = str(exc)
            if any(marker.lower() in text.lower() for marker in _OOM_MARKERS):
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def release_memory(xp=None) -> None:
    """Drop unreachable arrays and give the pool's cached blocks and FFT plans back to the device."""
    gc.collect()
    cupy = sys.modules.get("cupy")
    if cupy is None or (xp is not None and not is_cupy(xp)):
        return
    try:
        cupy.fft.config.get_plan_cache().clear()
    except Exception:  # pragma: no cover - older CuPy without a plan cache
        pass
    cupy.get_default_memory_pool().free_all_blocks()


class OOMSplitter:
    """Runs functions on index arrays, halving the pieces on out-of-memory errors.

    It remembers the largest piece size that may be tried (``ceiling``) after an error,
    so the next chunks of a loop start at a size that fits instead of failing again.
    """

    def __init__(self, min_size: int = 1, what: str = "particles", xp=None):
        self.min_size = max(1, int(min_size))
        self.what = what
        self.xp = xp
        self.ceiling: int | None = None
        self.ooms = 0
        self.splits = 0

    def run(
        self,
        func: Callable[[np.ndarray], Any],
        index,
        on_result: Callable[[np.ndarray, Any], None] | None = None,
    ) -> list[tuple[np.ndarray, Any]]:
        """``func(part)`` for pieces ``part`` that cover ``index`` in order.

        Returns [(part, result), ...]. With ``on_result``, each (part, result) is handed
        to it as soon as the piece succeeded (outside the out-of-memory guard) and the
        list holds (part, None). ``func`` must leave no trace when it raises.
        """
        index = np.asarray(index)
        if index.ndim != 1:
            raise ValueError(f"index must be 1-D, got shape {index.shape}")
        pending = self._presplit(index)
        done: list[tuple[np.ndarray, Any]] = []
        while pending:
            part = pending.pop(0)
            error = self._attempt(func, part)
            if error is None:
                result, self._result = self._result, None
                if on_result is not None:
                    on_result(part, result)
                    result = None
                done.append((part, result))
                continue
            # out of memory: error is its message; the failed frames are gone by now
            release_memory(self.xp)
            if len(part) <= self.min_size:
                raise GPUMemoryError(
                    f"out of memory on {len(part)} {self.what} (index {int(part[0])}) even after splitting the "
                    f"chunk: the memory budget is {describe_budget(self.xp or _guess_xp())}; raise --gpu-mem or "
                    f"free the GPU (last error: {error})"
                )
            half = (len(part) + 1) // 2
            self.ceiling = half if self.ceiling is None else min(self.ceiling, half)
            self.splits += 1
            STATS.splits += 1
            log.info(f"out of memory on {len(part)} {self.what} ({error}); retrying as {half} + {len(part) - half}")
            pending[:0] = [part[:half], part[half:]]
        return done

    _result: Any = None

    def _attempt(self, func, part) -> str | None:
        """Run func(part); None on success (result in self._result), else the error message."""
        try:
            self._result = func(part)
            return None
        except Exception as exc:  # MemoryError is an Exception
            if not is_out_of_memory(exc):
                raise
            self.ooms += 1
            STATS.ooms += 1
            message = f"{type(exc).__name__}: {exc}"
        # leaving the except block drops the traceback and the arrays its frames held
        return message

    def _presplit(self, index: np.ndarray) -> list[np.ndarray]:
        if self.ceiling is None or len(index) <= self.ceiling:
            return [index]
        n = math.ceil(len(index) / self.ceiling)
        return [p for p in np.array_split(index, n) if len(p)]


def _guess_xp():
    cupy = sys.modules.get("cupy")
    return cupy if cupy is not None else np


class StagedSum:
    """Retry-safe accumulation into running sums (e.g. backprojection grids).

    ``run(add, index)`` calls ``add(part, arrays)`` for pieces of ``index`` that fit in
    memory. On a GPU, ``arrays`` are scratch arrays zeroed before each piece and added
    to the targets (in place: no allocation, so it cannot run out of memory) once the
    piece succeeded; a piece that runs out of memory half-way leaves the targets as
    they were and is retried as two halves. On the CPU (or with ``stage=False``) the
    pieces add straight into the targets, in one piece, exactly as a plain call would
    (no scratch, same arithmetic), and a MemoryError propagates.

    targets: arrays of the same device. The scratch arrays are made on first use and
    kept until :meth:`close` (or the end of a ``with`` block).
    """

    def __init__(
        self,
        targets: Sequence[Any],
        *,
        stage: bool | None = None,
        splitter: OOMSplitter | None = None,
        what: str = "particles",
    ):
        self.targets = list(targets)
        xp = array_module(*self.targets)
        self.stage = (xp is not np) if stage is None else bool(stage)
        self.splitter = splitter or OOMSplitter(what=what, xp=xp)
        self._scratch: list[Any] | None = None

    def run(self, add: Callable[[np.ndarray, list], None], index, targets: Sequence[Any] | None = None) -> None:
        """Add the pieces of ``index`` into ``targets`` (default: the constructor's, same shapes)."""
        targets = self.targets if targets is None else list(targets)
        if not self.stage:
            add(np.asarray(index), targets)
            return
        scratch = self._scratch_for(targets)

        def piece(part):
            for s in scratch:
                s.fill(0)
            add(part, scratch)

        def commit(part, _):
            for t, s in zip(targets, scratch):
                t += s

        self.splitter.run(piece, index, on_result=commit)

    def _scratch_for(self, targets) -> list:
        if self._scratch is None:
            xp = array_module(*targets)
            self._scratch = [xp.zeros_like(t) for t in targets]
        for t, s in zip(targets, self._scratch):
            if t.shape != s.shape or t.dtype != s.dtype:
                raise ValueError(f"target {t.shape} {t.dtype} does not match the scratch {s.shape} {s.dtype}")
        return self._scratch

    def close(self) -> None:
        self._scratch = None

    def __enter__(self) -> StagedSum:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
