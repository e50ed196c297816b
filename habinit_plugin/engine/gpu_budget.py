"""GPU memory budget: a ceiling on CuPy's pool, chunk sizes that fit it, peak measurement.

* :func:`set_gpu_memory_limit` caps CuPy's default memory pool (``--gpu-mem``; no-op on
  NumPy) and installs an allocator that frees the pool's cached blocks before it gives up
  (CuPy's pool counts cached blocks against the limit and would otherwise fail early).
  :func:`gpu_memory_limit` reads the limit once, for the job to pass down.
* :func:`chunk_size_for_budget` picks a chunk size from the budget, the bytes each
  particle needs (:func:`particle_bytes`) and the bytes held anyway (volume grids).
* :class:`MemoryPeak` measures the pool's peak footprint (GPU) or the traced peak (CPU).

Budgets are in decimal gigabytes (1 GB = 10^9 bytes), so a run under ``--gpu-mem 2``
stays under 2 GB in either reading of "GB". The limit covers CuPy's pool (every
array, FFT plan work area and temporary the engine makes); the CUDA context and the
libraries' own handles (a few hundred MB) come on top.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np

from .backend import DeviceError, is_cupy

GB = 1e9


class GPUMemoryError(DeviceError):
    """Not even one item fits in the memory budget; the message names the budget."""


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
    if not is_cupy(xp):
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
    if not is_cupy(xp):
        return None
    return int(xp.get_default_memory_pool().get_limit()) or None


def describe_budget(xp) -> str:
    """The memory budget in words, for error messages."""
    if not is_cupy(xp):
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
        if is_cupy(self.xp):
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
        if is_cupy(self.xp):
            allocator = _allocator(self.xp)
            if self in allocator.watchers:
                allocator.watchers.remove(self)
            self.peak_bytes = max(self.peak_bytes, int(allocator.pool.total_bytes()))
        else:
            self.peak_bytes = max(self.peak_bytes, tracemalloc.get_traced_memory()[1])
            if self._tracing:
                tracemalloc.stop()


def candidate_bytes(limit_bytes: int | None) -> float:
    """Device bytes for one chunk's candidate projections in the pose search: 128 MB, or a
    sixteenth of the memory limit when that is less."""
    return min(128e6, limit_bytes / 16) if limit_bytes else 128e6
