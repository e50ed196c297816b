"""Memory budget helpers on the CPU: split on out-of-memory, chunk sizes, staged sums.

Out-of-memory errors are faked (a MemoryError above a size threshold, or an exception
shaped like CuPy's cuFFT error), so these run anywhere; tests/test_gpu.py repeats the
essential ones with real CuPy allocations under a pool limit.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from habinit_plugin.engine import gpu_budget, oom
from habinit_plugin.engine.backend import DeviceError, to_device
from habinit_plugin.engine.ctf import evaluate_ctf
from habinit_plugin.engine.gpu_budget import (
    GPUMemoryError,
    MemoryPeak,
    chunk_size_for_budget,
    particle_bytes,
    set_gpu_memory_limit,
)
from habinit_plugin.engine.oom import OOMSplitter, StagedSum, is_out_of_memory
from habinit_plugin.engine.reconstruct import Backprojection, particle_spectra, reconstruction_frequencies
from habinit_plugin.engine.simulate import SimulationSettings, random_poses


def run_split_on_oom(func, index, min_size: int = 1, *, on_result=None, splitter=None, what: str = "particles"):
    """``func`` over the pieces of ``index`` through an :class:`OOMSplitter` (a new one unless given)."""
    return (splitter or OOMSplitter(min_size, what=what)).run(func, index, on_result=on_result)


def concatenate_results(pieces):
    return np.concatenate([result for _, result in pieces])


def _fake_gpu_function(threshold: int, calls: list):
    """Squares of the indices; raises MemoryError on more than ``threshold`` items (after allocating)."""

    def func(part):
        calls.append(len(part))
        scratch = np.ones(len(part) * 1000)  # memory that must not leak across retries
        if len(part) > threshold:
            raise MemoryError(f"fake: {len(part)} items need {scratch.nbytes} bytes")
        return part.astype(np.float64) ** 2

    return func


def test_split_on_oom_returns_the_unsplit_result(caplog):
    index = np.arange(3, 103)
    expected = index.astype(np.float64) ** 2
    calls: list[int] = []
    oom.STATS.reset()
    with caplog.at_level("INFO", logger="habinit"):
        pieces = run_split_on_oom(_fake_gpu_function(13, calls), index)
    messages = [r.getMessage() for r in caplog.records]
    np.testing.assert_array_equal(concatenate_results(pieces), expected)
    # pieces cover the index in order, none larger than the threshold
    np.testing.assert_array_equal(np.concatenate([p for p, _ in pieces]), index)
    assert max(len(p) for p, _ in pieces) <= 13
    # 100 -> 50 -> 25 -> 13 + 12: 8 pieces, 7 failures (1 + 2 + 4)
    assert len(pieces) == 8
    assert oom.STATS.ooms == 7 and oom.STATS.splits == 7
    assert messages[0].startswith("out of memory on 100 particles (MemoryError: fake")
    assert "retrying as 50 + 50" in messages[0]


def test_nothing_fails_means_one_call():
    calls: list[int] = []
    pieces = run_split_on_oom(_fake_gpu_function(1000, calls), np.arange(100))
    assert calls == [100]
    assert len(pieces) == 1 and len(pieces[0][0]) == 100


def test_shared_splitter_starts_later_chunks_at_a_size_that_fits():
    calls: list[int] = []
    splitter = OOMSplitter()
    func = _fake_gpu_function(30, calls)
    run_split_on_oom(func, np.arange(100), splitter=splitter)
    failures_first = sum(1 for n in calls if n > 30)
    assert failures_first == 3  # 100, 50, 50
    calls.clear()
    pieces = run_split_on_oom(func, np.arange(100, 200), splitter=splitter)
    assert all(n <= 30 for n in calls), calls  # pre-split at the ceiling (25): no failure
    np.testing.assert_array_equal(concatenate_results(pieces), np.arange(100, 200.0) ** 2)


def test_on_result_receives_pieces_in_order_and_nothing_is_kept():
    seen = []
    pieces = run_split_on_oom(
        _fake_gpu_function(7, []), np.arange(40), on_result=lambda part, result: seen.append((part, result))
    )
    assert all(result is None for _, result in pieces)
    np.testing.assert_array_equal(np.concatenate([p for p, _ in seen]), np.arange(40))
    np.testing.assert_array_equal(np.concatenate([r for _, r in seen]), np.arange(40.0) ** 2)


def test_a_single_item_that_never_fits_is_a_clear_error(monkeypatch):
    # without an xp the message describes the budget of the imported backend: hide CuPy, which
    # tests/test_gpu.py imports into this process on a GPU machine
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    calls: list[int] = []

    def never(part):
        calls.append(len(part))
        raise MemoryError("fake: nothing fits")

    with pytest.raises(GPUMemoryError) as info:
        run_split_on_oom(never, np.arange(5, 13), what="particles")
    message = str(info.value)
    assert "out of memory on 1 particles (index 5)" in message
    assert "memory budget is host memory (CPU run)" in message
    assert "--gpu-mem" in message and "nothing fits" in message
    assert isinstance(info.value, DeviceError)  # the CLI reports it as a user error, no traceback
    assert not isinstance(info.value, MemoryError)  # an outer splitter does not split again
    assert calls[:4] == [8, 4, 2, 1]


def test_min_size_stops_splitting_earlier():
    with pytest.raises(GPUMemoryError, match="out of memory on 4 particles"):
        run_split_on_oom(_fake_gpu_function(2, []), np.arange(16), min_size=4)


def test_other_errors_are_not_retried():
    calls = []

    def broken(part):
        calls.append(len(part))
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        run_split_on_oom(broken, np.arange(10))
    assert calls == [10]


def _cupy_like_error(module: str, name: str):
    return type(name, (RuntimeError,), {"__module__": module})


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(MemoryError())
    cufft = _cupy_like_error("cupy.cuda.cufft", "CuFFTError")
    assert is_out_of_memory(cufft("CUFFT_ALLOC_FAILED"))
    assert not is_out_of_memory(cufft("CUFFT_INVALID_PLAN"))
    cublas = _cupy_like_error("cupy_backends.cuda.libs.cublas", "CUBLASError")
    assert is_out_of_memory(cublas("CUBLAS_STATUS_ALLOC_FAILED"))
    runtime = _cupy_like_error("cupy_backends.cuda.api.runtime", "CUDARuntimeError")
    assert is_out_of_memory(runtime("cudaErrorMemoryAllocation: out of memory"))
    assert not is_out_of_memory(runtime("cudaErrorIllegalAddress: an illegal memory access was encountered"))
    # the same words from elsewhere are not taken for a device error
    assert not is_out_of_memory(RuntimeError("out of memory"))
    # a wrapped out-of-memory error is still one
    try:
        try:
            raise cufft("CUFFT_ALLOC_FAILED")
        except RuntimeError as inner:
            raise ValueError("plan failed") from inner
    except ValueError as outer:
        assert is_out_of_memory(outer)


def test_cufft_allocation_failure_is_split_like_a_memory_error():
    cufft = _cupy_like_error("cupy.cuda.cufft", "CuFFTError")

    def func(part):
        if len(part) > 10:
            raise cufft("CUFFT_ALLOC_FAILED")
        return part * 2

    pieces = run_split_on_oom(func, np.arange(64))
    np.testing.assert_array_equal(concatenate_results(pieces), np.arange(64) * 2)


# ------------------------------------------------------------------------- chunk sizes


def test_chunk_size_for_budget():
    gb = gpu_budget.GB
    # 2 GB, 0.8 GB of grids, 1 MB per particle: 1200 particles
    assert chunk_size_for_budget(1_000_000, int(2 * gb), int(0.8 * gb)) == 1200
    assert chunk_size_for_budget(1_000_000, int(2 * gb), int(0.8 * gb), max_size=500) == 500
    assert chunk_size_for_budget(1_000_000, int(2 * gb), int(0.8 * gb), fraction=0.5) == 200
    assert chunk_size_for_budget(1_000_000, None, 0, max_size=1000) == 1000
    assert chunk_size_for_budget(3, 10, 7) == 1
    with pytest.raises(ValueError, match="max_size"):
        chunk_size_for_budget(100, None)
    with pytest.raises(GPUMemoryError, match="does not hold one item"):
        chunk_size_for_budget(1_000_000, int(1 * gb), int(0.9995 * gb))
    with pytest.raises(ValueError):
        chunk_size_for_budget(0, 100)


def _chunk(box: int, n: int, seed: int = 0):
    """Spectra, CTF, rotations and frequencies of n random particles (as reconstruct_half_maps makes them)."""
    freqs = reconstruction_frequencies(box)
    poses = random_poses(SimulationSettings(n_particles=n, seed=seed), 2.0, box)
    images = np.random.default_rng(seed).standard_normal((n, box, box)).astype(np.float32)
    ctf = evaluate_ctf(poses.ctf, freqs, 2.0, box)
    spectra = particle_spectra(images, freqs, poses.origins)
    return images, spectra, ctf, poses, freqs


def test_particle_bytes_bounds_the_measured_chunk_memory():
    """The per-particle estimate is above what a chunk of reconstruct_half_maps takes on the CPU."""
    box, n = 48, 64
    images, _, _, poses, freqs = _chunk(box, n)
    bp = Backprojection.zeros(box, 2)
    with MemoryPeak(np) as peak:
        ctf = evaluate_ctf(poses.ctf, freqs, 2.0, box)
        spectra = particle_spectra(images.copy(), freqs, poses.origins)
        bp.insert(spectra, ctf, poses.rotations, freqs)
    per_particle = (peak.peak_bytes - peak.start_bytes) / n
    assert per_particle > 4 * box * box  # at least the image itself was seen
    assert per_particle < particle_bytes(box)


# ------------------------------------------------------------------------ staged sums


def test_staged_sum_is_retry_safe_when_a_piece_fails_half_way():
    values = np.random.default_rng(1).standard_normal(300).astype(np.float32)
    slots = np.random.default_rng(2).integers(0, 50, 300)
    expected = np.zeros(50, dtype=np.float32)
    np.add.at(expected, slots, values)

    def add(part, arrays):
        np.add.at(arrays[0], slots[part], values[part])  # changes the array, then fails
        if len(part) > 40:
            raise MemoryError("fake: out of memory after a partial update")

    total = np.zeros(50, dtype=np.float32)
    oom.STATS.reset()
    StagedSum([total], stage=True).run(add, np.arange(300))
    assert oom.STATS.ooms >= 3
    np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-5)


def test_staged_sum_on_the_cpu_adds_directly_in_one_piece():
    """Unstaged (the CPU default): the same arithmetic as a plain call, and no retry."""
    calls = []
    total = np.zeros(4)

    def add(part, arrays):
        calls.append(len(part))
        assert arrays[0] is total
        arrays[0][:] += len(part)

    StagedSum([total]).run(add, np.arange(10))
    assert calls == [10] and np.all(total == 10)

    def fails(part, arrays):
        raise MemoryError("host is full")

    with pytest.raises(MemoryError):
        StagedSum([total]).run(fails, np.arange(10))


def test_staged_backprojection_with_forced_out_of_memory_matches_the_direct_one():
    """The wiring pattern of reconstruct_half_maps: insert chunks through StagedSum with
    out-of-memory failures forced on pieces above 9 particles, after a partial insert."""
    box, n = 24, 60
    _, spectra, ctf, poses, freqs = _chunk(box, n, seed=3)
    direct = Backprojection.zeros(box, 2)
    direct.insert(spectra, ctf, poses.rotations, freqs)

    staged = Backprojection.zeros(box, 2)

    def add(part, arrays):
        scratch = Backprojection(arrays[0], arrays[1], box, 2)
        scratch.insert(spectra[part], ctf[part], poses.rotations[part], freqs)
        if len(part) > 9:
            raise MemoryError("fake: out of memory in the weights")

    splitter = OOMSplitter()
    with StagedSum([staged.data, staged.weight], stage=True, splitter=splitter) as sums:
        for start in range(0, n, 30):
            sums.run(add, np.arange(start, min(start + 30, n)))
    assert splitter.ceiling is not None and splitter.ceiling <= 9
    scale = np.abs(direct.data).max()
    np.testing.assert_allclose(staged.data, direct.data, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(staged.weight, direct.weight, rtol=0, atol=1e-5 * np.abs(direct.weight).max())


def test_staged_sum_checks_target_shapes():
    sums = StagedSum([np.zeros(3)], stage=True)
    sums.run(lambda part, arrays: None, np.arange(2))
    with pytest.raises(ValueError, match="does not match the scratch"):
        sums.run(lambda part, arrays: None, np.arange(2), targets=[np.zeros(4)])


# ------------------------------------------------------------------ NumPy is a no-op


def test_budget_and_transfers_are_no_ops_on_numpy():
    assert set_gpu_memory_limit(np, 2.0) is None
    assert gpu_budget.gpu_memory_limit(np) is None
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert to_device(host, np) is host
    np.testing.assert_array_equal(to_device([1, 2], np), np.array([1, 2]))


def test_memory_peak_on_the_cpu_sees_an_allocation():
    with MemoryPeak(np) as peak:
        block = np.ones(2_000_000)  # 16 MB
        del block
    assert peak.peak_bytes - peak.start_bytes >= 16_000_000
