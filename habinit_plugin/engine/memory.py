"""GPU memory budget: a ceiling on CuPy's pool, out-of-memory recovery, chunk sizes, pinned copies.

The engine streams particles from memory-mapped stacks in chunks. On a GPU the
chunks must fit a memory budget (``--gpu-mem``) whatever the number of particles:

* :func:`set_gpu_memory_limit` caps CuPy's default memory pool (no-op on NumPy) and
  installs an allocator that frees the pool's cached blocks before it gives up (CuPy's
  pool counts cached blocks against the limit and would otherwise fail early).
* :func:`chunk_size_for_budget` picks a chunk size from the budget, the bytes each
  particle needs and the bytes held anyway (volume grids);
  :func:`particle_bytes` is a conservative per-particle estimate for the engine's
  chunk loops (image, its FFT, spectra, CTF, slice coordinates, interpolation weights).
* :func:`run_split_on_oom` runs ``func(index)`` and, when it runs out of memory,
  frees the pool and retries on the two halves, recursively; it only fails (with
  :class:`GPUMemoryError`, naming the budget) when a single particle does not fit.
  ``func`` must be retry-safe: nothing it changed may survive an exception.
  :class:`StagedSum` makes accumulation into running sums (backprojection) retry-safe:
  each piece adds into zeroed scratch arrays that are added to the sums (in place, no
  allocation) only once the piece succeeded.
* :func:`to_device` copies host arrays through reusable pinned buffers (identity on NumPy).
* :class:`MemoryPeak` measures the pool's peak footprint (GPU) or the traced peak (CPU).

Budgets are in decimal gigabytes (1 GB = 10^9 bytes), so a run under ``--gpu-mem 2``
stays under 2 GB in either reading of "GB". The limit covers CuPy's pool (every
array, FFT plan work area and temporary the engine makes); the CUDA context and the
libraries' own handles (a few hundred MB) come on top.
"""

from __future__ import annotations

import gc
import math
import sys
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .backend import DeviceError, array_module

GB = 1e9

# Messages of CUDA library allocation failures (cuFFT, cuBLAS, cuSOLVER, cuSPARSE, cuRAND,
# runtime, driver). CuPy's own pool raises cupy.cuda.memory.OutOfMemoryError, a MemoryError.
_OOM_MARKERS = (
    "ALLOC_FAILED",
    "ALLOCATION_FAILED",
    "cudaErrorMemoryAllocation",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "out of memory",
)


class GPUMemoryError(DeviceError):
    """Not even one item fits in the memory budget; the message names the budget."""


@dataclass
class SplitStats:
    """Counters since import (or the last :meth:`reset`): out-of-memory errors caught, splits made."""

    ooms: int = 0
    splits: int = 0

    def reset(self) -> None:
        self.ooms = 0
        self.splits = 0


STATS = SplitStats()


def _cupy() -> ModuleType | None:
    return sys.modules.get("cupy")


def _is_cupy(xp) -> bool:
    return xp is not np and getattr(xp, "__name__", "") == "cupy"


# ------------------------------------------------------------------ out-of-memory errors


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
    cupy = _cupy()
    if cupy is None or (xp is not None and not _is_cupy(xp)):
        return
    try:
        cupy.fft.config.get_plan_cache().clear()
    except Exception:  # pragma: no cover - older CuPy without a plan cache
        pass
    cupy.get_default_memory_pool().free_all_blocks()


# ------------------------------------------------------------------------ the budget


class _Allocator:
    """CuPy allocator on the default pool: on OutOfMemoryError, free cached blocks and try once more.

    It also feeds the active :class:`MemoryPeak` watchers with the pool's footprint.
    """

    def __init__(self, cupy):
        self.pool = cupy.get_default_memory_pool()
        self.oom = cupy.cuda.memory.OutOfMemoryError
        self.watchers: list[MemoryPeak] = []

    def __call__(self, size: int):
        pool = self.pool
        try:
            mem = pool.malloc(size)
        except self.oom:
            pool.free_all_blocks()
            mem = pool.malloc(size)
        if self.watchers:
            total = pool.total_bytes()
            for w in self.watchers:
                if total > w.peak_bytes:
                    w.peak_bytes = total
        return mem


_ALLOCATOR: _Allocator | None = None


def _allocator(cupy) -> _Allocator:
    """Install (once) and return the engine's allocator on CuPy's default pool."""
    global _ALLOCATOR
    if _ALLOCATOR is None:
        allocator = _Allocator(cupy)
        cupy.cuda.set_allocator(allocator)
        _ALLOCATOR = allocator
    return _ALLOCATOR


def set_gpu_memory_limit(xp, gigabytes: float | None) -> int | None:
    """Cap CuPy's default memory pool at ``gigabytes`` (10^9 bytes); no-op on NumPy.

    None leaves the pool as it is; 0 removes the limit. Also caps the cuFFT plan
    cache at an eighth of the budget (plans hold their work areas). Returns the
    limit in bytes (None on NumPy or without a limit).
    """
    if not _is_cupy(xp):
        return None
    if gigabytes is None:
        return gpu_memory_limit(xp)
    if not (gigabytes >= 0 and math.isfinite(gigabytes)):
        raise ValueError(f"--gpu-mem must be a positive number of GB, got {gigabytes}")
    size = int(gigabytes * GB)
    _allocator(xp)
    pool = xp.get_default_memory_pool()
    pool.free_all_blocks()
    pool.set_limit(size=size)
    try:
        cache = xp.fft.config.get_plan_cache()
        cache.set_memsize(size // 8 if size else -1)
    except Exception:  # pragma: no cover - older CuPy without a plan cache
        pass
    return size or None


def gpu_memory_limit(xp) -> int | None:
    """The pool's limit in bytes, None on NumPy or when there is none."""
    if not _is_cupy(xp):
        return None
    return int(xp.get_default_memory_pool().get_limit()) or None


def describe_budget(xp) -> str:
    """The memory budget in words, for error messages."""
    if not _is_cupy(xp):
        return "host memory (CPU run)"
    limit = gpu_memory_limit(xp)
    free, total = xp.cuda.runtime.memGetInfo()
    device = f"device: {total / GB:.2f} GB, {free / GB:.2f} GB free"
    if limit:
        return f"--gpu-mem {limit / GB:.2f} GB ({device})"
    return f"the whole GPU, no --gpu-mem limit ({device})"


def particle_bytes(box: int) -> int:
    """Device bytes per particle of a chunk (image, FFT, spectra, CTF, trilinear terms).

    Measured on the CPU (tracemalloc, box 64 and 96): about 24 * box^2 bytes per particle
    for reading, transforming and backprojecting a chunk; the estimate allows for
    cuFFT work areas and the pool's rounding: 64 * box^2.
    """
    return 64 * int(box) ** 2


def chunk_size_for_budget(
    bytes_per_item: int,
    budget_bytes: int | None,
    fixed_bytes: int = 0,
    *,
    max_size: int | None = None,
    fraction: float = 1.0,
) -> int:
    """Items per chunk so that ``fixed_bytes + n * bytes_per_item <= fraction * budget_bytes``.

    budget_bytes None or 0 means no budget: ``max_size`` (which is then required).
    The result is at least 1 and at most ``max_size``. Raises :class:`GPUMemoryError`
    when the fixed bytes alone leave no room for one item.
    """
    if bytes_per_item <= 0:
        raise ValueError(f"bytes per item must be positive, got {bytes_per_item}")
    if not budget_bytes:
        if max_size is None:
            raise ValueError("without a memory budget, max_size must be given")
        return max(1, int(max_size))
    room = fraction * budget_bytes - fixed_bytes
    if room < bytes_per_item:
        raise GPUMemoryError(
            f"the memory budget of {budget_bytes / GB:.3f} GB does not hold one item: "
            f"{fixed_bytes / GB:.3f} GB are needed for the volumes and {bytes_per_item / GB:.4f} GB per item; "
            "raise --gpu-mem"
        )
    n = int(room // bytes_per_item)
    if max_size is not None:
        n = min(n, int(max_size))
    return max(1, n)


# --------------------------------------------------------------- split on out-of-memory


class OOMSplitter:
    """Runs functions on index arrays, halving the pieces on out-of-memory errors.

    It remembers the largest piece size that may be tried (``ceiling``) after an error,
    so the next chunks of a loop start at a size that fits instead of failing again.
    """

    def __init__(self, min_size: int = 1, log: Callable[[str], None] | None = None, what: str = "particles", xp=None):
        self.min_size = max(1, int(min_size))
        self.log = log
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
            if self.log is not None:
                self.log(f"out of memory on {len(part)} {self.what} ({error}); retrying as {half} + {len(part) - half}")
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
    cupy = _cupy()
    return cupy if cupy is not None else np


def run_split_on_oom(
    func: Callable[[np.ndarray], Any],
    index,
    min_size: int = 1,
    *,
    on_result: Callable[[np.ndarray, Any], None] | None = None,
    splitter: OOMSplitter | None = None,
    log: Callable[[str], None] | None = None,
    what: str = "particles",
) -> list[tuple[np.ndarray, Any]]:
    """``func(index)``, retried on the two halves (recursively) when it runs out of memory.

    index: 1-D array of particle indices (host). Returns [(part, func(part)), ...] in
    index order, one entry per piece that ran (a single entry when nothing failed);
    combine them with :func:`concatenate_results` or by ``part``. With ``on_result``,
    each piece is handed to ``on_result(part, result)`` as soon as it succeeded, and not
    kept. Pass a ``splitter`` (:class:`OOMSplitter`) shared by the chunks of a loop so
    that later chunks start at a size that fits. Raises :class:`GPUMemoryError`, naming
    the budget, when a piece of ``min_size`` items still runs out of memory. Other
    errors propagate at once. ``func`` must be retry-safe (see :class:`StagedSum`).
    """
    splitter = splitter or OOMSplitter(min_size, log=log, what=what)
    return splitter.run(func, index, on_result=on_result)


def concatenate_results(pieces: Sequence[tuple[np.ndarray, Any]], axis: int = 0):
    """Join the array results of :func:`run_split_on_oom` (in index order) along ``axis``."""
    results = [r for _, r in pieces]
    if len(results) == 1:
        return results[0]
    xp = array_module(*results)
    return xp.concatenate(results, axis=axis)


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
        log: Callable[[str], None] | None = None,
        what: str = "particles",
    ):
        self.targets = list(targets)
        xp = array_module(*self.targets)
        self.stage = (xp is not np) if stage is None else bool(stage)
        self.splitter = splitter or OOMSplitter(log=log, what=what, xp=xp)
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


# ------------------------------------------------------------------- host -> device


class _PinnedStager:
    """Two reusable page-locked host buffers; a copy waits for the buffer's previous copy."""

    def __init__(self, cupy):
        self.cupy = cupy
        self.buffers: list[np.ndarray | None] = [None, None]
        self.events: list[Any] = [None, None]
        self.turn = 0

    def copy(self, host: np.ndarray):
        cupy = self.cupy
        k = self.turn
        self.turn ^= 1
        if self.events[k] is not None:
            self.events[k].synchronize()  # the previous copy out of this buffer is done
        buf = self.buffers[k]
        if buf is None or buf.nbytes < host.nbytes:
            import cupyx  # noqa: PLC0415

            buf = cupyx.empty_pinned((max(host.nbytes, 1 << 20),), dtype=np.uint8)
            self.buffers[k] = buf
        view = buf[: host.nbytes].view(host.dtype).reshape(host.shape)
        np.copyto(view, host)
        out = cupy.empty(host.shape, dtype=host.dtype)
        stream = cupy.cuda.get_current_stream()
        out.set(view, stream=stream)
        self.events[k] = stream.record()
        return out


_STAGER: _PinnedStager | None = None
_PINNED_MIN_BYTES = 1 << 20


def to_device(host_array, xp):
    """``host_array`` on the device of ``xp``: the identity on NumPy (``np.asarray``).

    On a GPU, arrays of 1 MB or more go through one of two reusable pinned buffers
    (page-locked memory, copied asynchronously on the current stream); smaller ones and
    arrays already on the device go through ``xp.asarray``.
    """
    if not _is_cupy(xp):
        return np.asarray(host_array)
    if isinstance(host_array, xp.ndarray):
        return host_array
    host = np.ascontiguousarray(host_array)
    if host.nbytes < _PINNED_MIN_BYTES or host.dtype == object:
        return xp.asarray(host)
    global _STAGER
    if _STAGER is None:
        _STAGER = _PinnedStager(xp)
    return _STAGER.copy(host)


# ------------------------------------------------------------------------- measuring


class MemoryPeak:
    """Peak memory footprint during a ``with`` block.

    GPU (CuPy): the most bytes CuPy's default pool held from the device (arrays, cached
    blocks and FFT work areas; what ``--gpu-mem`` limits), seen at every allocation.
    CPU (NumPy): the peak of ``tracemalloc`` (NumPy's array memory and Python objects).
    ``peak_bytes`` is the peak above nothing (GPU: absolute pool size) and
    ``start_bytes`` the footprint at entry.
    """

    def __init__(self, xp=np):
        self.xp = xp
        self.peak_bytes = 0
        self.start_bytes = 0
        self._tracing = False

    def __enter__(self) -> MemoryPeak:
        if _is_cupy(self.xp):
            allocator = _allocator(self.xp)
            self.start_bytes = self.peak_bytes = int(allocator.pool.total_bytes())
            allocator.watchers.append(self)
        else:
            self._tracing = not tracemalloc.is_tracing()
            if self._tracing:
                tracemalloc.start()
            tracemalloc.reset_peak()
            self.start_bytes = self.peak_bytes = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc) -> None:
        if _is_cupy(self.xp):
            allocator = _allocator(self.xp)
            if self in allocator.watchers:
                allocator.watchers.remove(self)
            self.peak_bytes = max(self.peak_bytes, int(allocator.pool.total_bytes()))
        else:
            self.peak_bytes = max(self.peak_bytes, tracemalloc.get_traced_memory()[1])
            if self._tracing:
                tracemalloc.stop()


__all__ = [
    "GB",
    "GPUMemoryError",
    "MemoryPeak",
    "OOMSplitter",
    "STATS",
    "StagedSum",
    "chunk_size_for_budget",
    "concatenate_results",
    "describe_budget",
    "gpu_memory_limit",
    "is_out_of_memory",
    "particle_bytes",
    "release_memory",
    "run_split_on_oom",
    "set_gpu_memory_limit",
    "to_device",
]
