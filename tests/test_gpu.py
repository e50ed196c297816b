"""GPU (CuPy) against CPU (NumPy): parity of the engine's kernels, memory budget, out-of-memory recovery.

Skipped where CuPy is not installed or no CUDA GPU is visible. Run on a GPU machine with
``python -m pytest -q tests/test_gpu.py`` (``bench/gpu.py`` runs the same checks at scale).

Tolerances (float32 arithmetic on both sides; the differences come from FFT algorithms,
fused multiply-adds and the order of atomic additions, not from different maths):

* Fourier grid of a map (``volume_to_grid``) and central slices (``project``):
  relative L2 error below 1e-5, largest error below 1e-4 of the largest value.
* Backprojection (``backproject``, summed with atomics on the GPU): relative L2 below 1e-5.
* Wiener half maps (``reconstruct_half_maps``): relative L2 below 1e-4 (the division by
  the weights and the FSC-derived prior amplify the backprojection's rounding a little);
  the half-map FSC curves agree to 1e-3.
* Best poses of noise-free images (``global_search``): at least 48 of 50 identical
  (the others may only differ where two grid poses tie to float32 rounding), and every
  GPU pose as close to the truth as the CPU's guarantee (within the final grid spacing).
* Memory: with the pool limited to 0.2 GB, a reconstruction from a stack more than 3x
  that size finishes, the pool never holds more than the limit, and the maps equal
  the unlimited ones; a forced out-of-memory error is recovered by splitting.
"""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
try:
    _N_GPUS = cupy.cuda.runtime.getDeviceCount()
except Exception:  # CUDA driver missing or broken
    _N_GPUS = 0
if _N_GPUS == 0:
    pytest.skip("no CUDA GPU visible", allow_module_level=True)

pytestmark = pytest.mark.gpu

from habinit_plugin.engine import density, gpu_budget, oom, so3  # noqa: E402
from habinit_plugin.engine.backend import to_device  # noqa: E402
from habinit_plugin.engine.ctf import evaluate_ctf  # noqa: E402
from habinit_plugin.engine.fourier import (  # noqa: E402
    half_plane_frequencies,
    hermitian_weights,
    image_rfft,
    sample_spectra,
)
from habinit_plugin.engine.fsc import fsc  # noqa: E402
from habinit_plugin.engine.gpu_budget import MemoryPeak, set_gpu_memory_limit  # noqa: E402
from habinit_plugin.engine.minibatch import ImageBatch  # noqa: E402
from habinit_plugin.engine.mrc import read_map  # noqa: E402
from habinit_plugin.engine.oom import OOMSplitter, StagedSum, release_memory  # noqa: E402
from habinit_plugin.engine.particles import load_particles  # noqa: E402
from habinit_plugin.engine.pose_search import SearchSettings, global_search  # noqa: E402
from habinit_plugin.engine.projector import backproject, project, slice_coordinates, volume_to_grid  # noqa: E402
from habinit_plugin.engine.reconstruct import Backprojection, reconstruct_half_maps  # noqa: E402
from habinit_plugin.engine.simulate import (  # noqa: E402
    SimulationSettings,
    clean_images,
    random_poses,
    simulate_dataset,
)

GB = gpu_budget.GB


def run_split_on_oom(func, index, *, splitter=None):
    """``func`` over the pieces of ``index`` through an :class:`OOMSplitter` (a new one unless given)."""
    return (splitter or OOMSplitter(xp=cupy)).run(func, index)


def _volume(box: int, pixel_size: float, seed: int = 0) -> np.ndarray:
    """The bundled protein; where gemmi is missing, a blob of random Gaussians of similar size."""
    try:
        return density.bundled_protein_map(box, pixel_size)
    except ImportError:
        rng = np.random.default_rng(seed)
        axis = np.arange(box) - box // 2
        z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
        volume = np.zeros((box,) * 3, dtype=np.float32)
        for centre in rng.normal(0.0, box / 10, size=(60, 3)):
            r2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
            volume += np.exp(-r2 / (2 * (box / 32) ** 2)).astype(np.float32)
        return volume


def _host(x):
    return x.get() if isinstance(x, cupy.ndarray) else x


def _relative_l2(a, b) -> float:
    a = np.asarray(_host(a), dtype=np.complex128)
    b = np.asarray(_host(b), dtype=np.complex128)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _max_error(a, b) -> float:
    a, b = _host(a), _host(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(autouse=True)
def _no_limit_after():
    yield
    set_gpu_memory_limit(cupy, 0)
    release_memory(cupy)


@pytest.fixture(scope="module")
def volume64():
    return _volume(64, 1.8)


# ------------------------------------------------------------------------------ parity


def test_projections_match(volume64):
    grid_cpu = volume_to_grid(volume64, 2)
    grid_gpu = volume_to_grid(cupy.asarray(volume64), 2)
    assert isinstance(grid_gpu, cupy.ndarray) and grid_gpu.dtype == cupy.complex64
    assert _relative_l2(grid_gpu, grid_cpu) < 1e-5
    assert _max_error(grid_gpu, grid_cpu) < 1e-4

    rotations = so3.random_rotations(300, np.random.default_rng(1))
    freqs = half_plane_frequencies(31)
    coords_cpu = slice_coordinates(rotations, freqs)
    coords_gpu = slice_coordinates(cupy.asarray(rotations), cupy.asarray(freqs))
    np.testing.assert_allclose(coords_gpu.get(), coords_cpu, rtol=1e-6, atol=1e-5)

    proj_cpu = project(grid_cpu, coords_cpu, 2)
    # the interpolation alone, on the same grid
    same_grid = project(cupy.asarray(grid_cpu), cupy.asarray(coords_cpu), 2)
    assert _relative_l2(same_grid, proj_cpu) < 1e-6
    # the whole chain: map -> grid -> slices on each device
    proj_gpu = project(grid_gpu, coords_gpu, 2)
    assert _relative_l2(proj_gpu, proj_cpu) < 1e-5
    assert _max_error(proj_gpu, proj_cpu) < 1e-4


def test_backprojections_match():
    rng = np.random.default_rng(2)
    size = 96  # grid of a box-48 map, 2x oversampled
    rotations = so3.random_rotations(400, rng)
    freqs = half_plane_frequencies(23)
    coords = slice_coordinates(rotations, freqs)
    values = (rng.standard_normal(coords.shape[:-1]) + 1j * rng.standard_normal(coords.shape[:-1])).astype(np.complex64)
    weights = rng.random(coords.shape[:-1]).astype(np.float32)
    for v in (values, weights):
        cpu = backproject(v, coords, size, 2)
        gpu = backproject(cupy.asarray(v), cupy.asarray(coords), size, 2)
        assert gpu.dtype == cpu.dtype
        assert _relative_l2(gpu, cpu) < 1e-5


def test_cuda_kernels_are_used_and_match_the_array_expressions():
    """The projection kernels compile, pass their self-check and agree with the expressions."""
    from habinit_plugin.engine import kernels  # noqa: PLC0415
    from habinit_plugin.engine.trilinear import backproject_expressions, project_expressions  # noqa: PLC0415

    rng = np.random.default_rng(3)
    size = 64
    grid = cupy.asarray((rng.standard_normal((size,) * 3) + 1j * rng.standard_normal((size,) * 3)).astype(np.complex64))
    coords = cupy.asarray(rng.uniform(-15, 15, (5000, 3)).astype(np.float32))
    fast = project(grid, coords, 2)
    assert kernels._state["enabled"], "the kernels switched themselves off (see the warning)"
    assert _relative_l2(fast, project_expressions(grid, coords, 2)) < 1e-6
    values = fast * 1.5
    a = backproject(values, coords, size, 2)
    b = backproject_expressions(values, coords, size, 2)
    assert _relative_l2(a, b) < 1e-5


def test_simulated_images_match():
    volume = _volume(48, 2.4)
    poses = random_poses(SimulationSettings(n_particles=64, seed=4), 2.4, 48)
    index = np.arange(64)
    cpu = clean_images(volume_to_grid(volume, 4), poses, index, 2.4, 48, 4)
    gpu = clean_images(volume_to_grid(cupy.asarray(volume), 4), poses, index, 2.4, 48, 4)
    assert _relative_l2(gpu, cpu) < 1e-5


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    volume = _volume(48, 2.4)
    out = tmp_path_factory.mktemp("gpu_small")
    return simulate_dataset(volume, 2.4, out, SimulationSettings(n_particles=1500, snr=1.0, seed=5))


def test_wiener_reconstructions_match(small_set):
    particles = load_particles(small_set["gt_poses"])
    half = np.arange(len(particles)) % 2 + 1
    a_cpu, b_cpu, curve_cpu = reconstruct_half_maps(particles, half, xp=np, batch_size=400)
    a_gpu, b_gpu, curve_gpu = reconstruct_half_maps(particles, half, xp=cupy, batch_size=400)
    assert isinstance(a_gpu, np.ndarray) and a_gpu.dtype == np.float32
    assert _relative_l2(a_gpu, a_cpu) < 1e-4
    assert _relative_l2(b_gpu, b_cpu) < 1e-4
    np.testing.assert_allclose(curve_gpu, curve_cpu, atol=1e-3)
    # and the result is a real reconstruction, not two equal failures
    truth, _ = read_map(small_set["gt_map"])
    assert fsc(0.5 * (a_gpu + b_gpu), truth)[1:12].min() > 0.9


def test_best_poses_match_on_noise_free_images():
    box, pixel_size, n, radius, level = 48, 2.4, 50, 22, 5
    volume = _volume(box, pixel_size)
    poses = random_poses(SimulationSettings(n_particles=n, seed=11, shift_sigma=4.0), pixel_size, box)
    index = np.arange(n)
    images = clean_images(volume_to_grid(volume, 4), poses, index, pixel_size, box, oversampling=4)
    freqs = half_plane_frequencies(radius)
    radii = np.hypot(freqs[:, 0], freqs[:, 1])
    spectra = sample_spectra(image_rfft(images), freqs)
    ctf = evaluate_ctf(poses.ctf.subset(index), freqs, pixel_size, box)
    weight = hermitian_weights(freqs)
    settings = SearchSettings(
        coarse_level=2,
        final_level=level,
        beam=8,
        max_shift_px=6.0,
        coarse_shift_step_px=1.5,
        coarse_radius=10.0,
        final_radius=float(radius),
    )
    grid = volume_to_grid(volume, 2)
    cpu = global_search(grid, 2, ImageBatch(spectra, ctf, weight, freqs, radii, box), settings)
    batch_gpu = ImageBatch(
        cupy.asarray(spectra), cupy.asarray(ctf), cupy.asarray(weight), cupy.asarray(freqs), radii, box
    )
    gpu = global_search(cupy.asarray(grid), 2, batch_gpu, settings)
    assert isinstance(gpu.rotations, np.ndarray)
    difference = so3.geodesic_distance(gpu.rotations[:, 0], cpu.rotations[:, 0])
    same = difference < 1e-3
    assert same.sum() >= n - 2, f"{n - same.sum()} of {n} best poses differ: {np.sort(difference)[-3:]}"
    shift_difference = np.hypot(*(gpu.origins[same, 0] - cpu.origins[same, 0]).T)
    assert np.mean(shift_difference < 1e-6) >= 0.95
    error = so3.geodesic_distance(gpu.rotations[:, 0], poses.rotations)
    assert error.max() < so3.grid_spacing(level)


# ------------------------------------------------------------------------------ memory


def test_limit_frees_cached_blocks_before_failing():
    """CuPy's pool counts its cached blocks against the limit; the engine's allocator frees them first."""
    assert set_gpu_memory_limit(cupy, 0.1) == int(0.1 * GB)
    assert gpu_budget.gpu_memory_limit(cupy) == int(0.1 * GB)
    a = cupy.empty(50_000_000, dtype=cupy.uint8)
    del a  # 50 MB cached in the pool
    b = cupy.empty(60_000_000, dtype=cupy.uint8)  # 110 MB with the cache: fits only once it is freed
    del b
    with pytest.raises(MemoryError):
        cupy.empty(150_000_000, dtype=cupy.uint8)


def test_forced_out_of_memory_is_recovered_by_splitting(caplog):
    """A real CuPy out-of-memory error (pool limit 0.1 GB, 1 MB per item) is split away."""
    index = np.arange(400)
    expected = (index.astype(np.float32) * 2.0).sum()

    def func(part):
        block = cupy.ones((len(part), 250_000), dtype=cupy.float32)  # 1 MB per item
        return float((block[:, 0] * cupy.asarray(part, dtype=cupy.float32) * 2.0).sum())

    set_gpu_memory_limit(cupy, 0.1)
    oom.STATS.reset()
    with MemoryPeak(cupy) as peak, caplog.at_level("INFO", logger="habinit"):
        pieces = run_split_on_oom(func, index)
    messages = [r.getMessage() for r in caplog.records]
    assert oom.STATS.ooms >= 2 and len(pieces) >= 4
    assert "Out of memory allocating" in messages[0]
    assert sum(r for _, r in pieces) == pytest.approx(expected, rel=1e-6)
    assert peak.peak_bytes <= 0.1 * GB


def test_one_item_over_the_limit_names_the_budget():
    set_gpu_memory_limit(cupy, 0.05)
    with pytest.raises(gpu_budget.GPUMemoryError, match=r"--gpu-mem 0\.05 GB"):
        run_split_on_oom(lambda part: cupy.empty((len(part), 100_000_000), dtype=cupy.uint8), np.arange(4))


def test_staged_backprojection_under_a_limit_matches_the_unlimited_one(small_set):
    """Engine kernels (CTF, FFT, backprojection) run out of memory for real and are split."""
    particles = load_particles(small_set["gt_poses"])
    from habinit_plugin.engine.reconstruct import particle_spectra, reconstruction_frequencies  # noqa: PLC0415

    box = particles.box
    freqs = cupy.asarray(reconstruction_frequencies(box))

    def add(part, arrays):
        images = to_device(particles.read_images(part), cupy)
        ctf = evaluate_ctf(particles.ctf.subset(part).to(cupy), freqs, particles.pixel_size, box)
        spectra = particle_spectra(images, freqs, cupy.asarray(particles.shifts[part]))
        Backprojection(arrays[0], arrays[1], box, 2).insert(
            spectra, ctf, cupy.asarray(particles.rotations[part]), freqs
        )

    everything = np.arange(len(particles))
    reference = Backprojection.zeros(box, 2, cupy)
    add(everything, [reference.data, reference.weight])

    limited = Backprojection.zeros(box, 2, cupy)
    set_gpu_memory_limit(cupy, 0.06)  # 32 MB of grids (sums, scratch, reference) + the pieces
    oom.STATS.reset()
    with MemoryPeak(cupy) as peak, StagedSum([limited.data, limited.weight]) as sums:
        sums.run(add, everything)  # 1500 particles in one piece need about 0.1 to 0.2 GB
    assert oom.STATS.ooms >= 1
    assert peak.peak_bytes <= 0.06 * GB
    assert _relative_l2(limited.data, reference.data) < 1e-5
    assert _relative_l2(limited.weight, reference.weight) < 1e-5


def test_reconstruction_stays_under_the_limit_for_a_set_several_times_larger(tmp_path):
    """reconstruct_half_maps under a 0.2 GB pool limit: a 0.66 GB stack, 8000-particle batches asked for."""
    limit_gb = 0.2
    box, n = 64, 40_000
    volume = _volume(box, 1.8)
    paths = simulate_dataset(volume, 1.8, tmp_path, SimulationSettings(n_particles=n, snr=1.0, seed=6), xp=cupy)
    release_memory(cupy)
    particles = load_particles(paths["gt_poses"])
    stack_bytes = n * box * box * 4
    half = np.arange(n) % 2 + 1
    a_ref, b_ref, _ = reconstruct_half_maps(particles, half, xp=cupy, batch_size=1000)
    release_memory(cupy)

    limit = set_gpu_memory_limit(cupy, limit_gb)
    with MemoryPeak(cupy) as peak:
        a, b, _ = reconstruct_half_maps(particles, half, xp=cupy, batch_size=8000, memory_limit_bytes=limit)
    assert stack_bytes > 3 * limit_gb * GB
    assert peak.peak_bytes <= limit_gb * GB, f"pool peak {peak.peak_bytes / GB:.3f} GB over {limit_gb} GB"
    assert _relative_l2(a, a_ref) < 1e-4
    assert _relative_l2(b, b_ref) < 1e-4


def test_to_device_round_trips_through_the_pinned_buffers():
    rng = np.random.default_rng(7)
    arrays = [rng.standard_normal((64, 128, 128)).astype(np.float32) for _ in range(3)]  # 4 MB each
    on_device = [to_device(a, cupy) for a in arrays]  # buffers reused: 1st and 3rd share one
    for host, dev in zip(arrays, on_device):
        assert isinstance(dev, cupy.ndarray) and dev.dtype == host.dtype and dev.shape == host.shape
        np.testing.assert_array_equal(dev.get(), host)
    small = np.arange(10, dtype=np.int64)
    np.testing.assert_array_equal(to_device(small, cupy).get(), small)
    assert to_device(on_device[0], cupy) is on_device[0]


def test_memory_peak_sees_device_allocations():
    release_memory(cupy)
    with MemoryPeak(cupy) as peak:
        block = cupy.zeros(100_000_000, dtype=cupy.uint8)
        del block
    assert peak.peak_bytes - peak.start_bytes >= 100_000_000


def test_pieces_combine_on_the_device():
    def func(part):
        if len(part) > 16:
            raise MemoryError("fake")
        return cupy.asarray(part) * 3

    pieces = run_split_on_oom(func, np.arange(100), splitter=OOMSplitter())
    combined = cupy.concatenate([r for _, r in pieces])
    assert isinstance(combined, cupy.ndarray)
    np.testing.assert_array_equal(combined.get(), np.arange(100) * 3)
