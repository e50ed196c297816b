"""Central-slice projector: exact adjoint, agreement with real-space line integrals."""

import numpy as np
import pytest
from scipy import ndimage

from habinit_plugin.engine import fourier, projector, so3


def test_backprojection_is_the_exact_adjoint_of_projection():
    rng = np.random.default_rng(0)
    size, oversampling = 40, 2
    grid = (rng.normal(size=(size,) * 3) + 1j * rng.normal(size=(size,) * 3)).astype(np.complex64)
    rotations = so3.random_rotations(7, rng)
    coords = projector.slice_coordinates(rotations, fourier.half_plane_frequencies(9))
    y = (rng.normal(size=coords.shape[:-1]) + 1j * rng.normal(size=coords.shape[:-1])).astype(np.complex64)
    lhs = np.vdot(y, projector.project(grid, coords, oversampling))
    rhs = np.vdot(projector.backproject(y, coords, size, oversampling), grid)
    assert abs(lhs - rhs) / abs(lhs) < 1e-5


def test_real_grid_adjoint_too():
    rng = np.random.default_rng(1)
    grid = rng.normal(size=(24, 24, 24)).astype(np.float32)
    coords = projector.slice_coordinates(so3.random_rotations(3, rng), fourier.half_plane_frequencies(5))
    y = rng.normal(size=coords.shape[:-1]).astype(np.float32)
    lhs = np.dot(y.ravel(), projector.project(grid, coords, 2).ravel())
    rhs = np.dot(projector.backproject(y, coords, 24, 2).ravel(), grid.ravel())
    assert lhs == pytest.approx(rhs, rel=1e-5)


def line_integral_projection(volume, rotation):
    """Image(r) = sum_z V(A^T r): rotate the map in real space (cubic spline) and sum along z."""
    n = volume.shape[0]
    z, y, x = np.mgrid[0:n, 0:n, 0:n] - n // 2
    r = np.stack([x, y, z], -1).reshape(-1, 3).astype(np.float64)
    src = r @ rotation  # rows are A^T r
    coords = np.stack([src[:, 2], src[:, 1], src[:, 0]]) + n // 2
    rotated = ndimage.map_coordinates(volume.astype(np.float64), coords, order=3, mode="constant")
    return rotated.reshape(n, n, n).sum(axis=0)


def band_limit(image, r_max):
    spectrum = fourier.image_rfft(image)
    n = image.shape[0]
    ky = np.fft.fftfreq(n, 1 / n)[:, None]
    kx = np.arange(n // 2 + 1)[None, :]
    return fourier.image_irfft(spectrum * (np.hypot(kx, ky) <= r_max), n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fourier_slice_matches_real_space_line_integral(protein_map_64, seed):
    volume = protein_map_64
    n = volume.shape[0]
    rotation = so3.random_rotations(1, np.random.default_rng(seed))[0]
    grid = projector.volume_to_grid(volume, oversampling=2)
    freqs = fourier.half_plane_frequencies(n // 2 - 1)
    slice_values = projector.project(grid, projector.slice_coordinates(rotation[None], freqs), 2)[0]
    from_slice = fourier.image_irfft(fourier.fill_spectra(slice_values, freqs, n), n)
    from_lines = band_limit(line_integral_projection(volume, rotation), n // 2 - 1)
    corr = np.corrcoef(from_slice.ravel(), from_lines.ravel())[0, 1]
    assert corr > 0.99
    # same scale too, not only the same shape
    assert np.linalg.norm(from_slice - from_lines) / np.linalg.norm(from_lines) < 0.06


def test_wrong_rotation_convention_would_be_caught(protein_map_64):
    """The transposed matrix gives a different projection: the test above can fail."""
    volume = protein_map_64
    n = volume.shape[0]
    rotation = so3.euler_to_matrix(30.0, 70.0, 10.0)
    grid = projector.volume_to_grid(volume, 2)
    freqs = fourier.half_plane_frequencies(n // 2 - 1)
    wrong = projector.project(grid, projector.slice_coordinates(rotation.T[None], freqs), 2)[0]
    from_slice = fourier.image_irfft(fourier.fill_spectra(wrong, freqs, n), n)
    from_lines = band_limit(line_integral_projection(volume, rotation), n // 2 - 1)
    assert np.corrcoef(from_slice.ravel(), from_lines.ravel())[0, 1] < 0.9


def test_grid_round_trip_returns_the_map(protein_map_64):
    grid = projector.volume_to_grid(protein_map_64, 2)
    back = projector.grid_to_volume(grid, 64, gridding_correction=False) * projector.gridding_profile(64, 128, np)
    assert np.allclose(back, protein_map_64, atol=1e-4 * protein_map_64.max())


def test_hermitian_symmetrize_completes_friedel_mates():
    rng = np.random.default_rng(3)
    volume = rng.normal(size=(16, 16, 16)).astype(np.float32)
    full = fourier.centered_fftn(volume)
    half = full.copy()
    kz, ky, kx = np.meshgrid(*[np.arange(16) - 8] * 3, indexing="ij")
    upper = (kx > 0) | ((kx == 0) & (ky > 0)) | ((kx == 0) & (ky == 0) & (kz > 0))
    half[~upper] = 0
    half[8, 8, 8] = full[8, 8, 8] / 2  # the origin is its own mate
    sym = projector.hermitian_symmetrize(half)
    inner = (slice(1, None),) * 3
    assert np.allclose(sym[inner], full[inner], atol=1e-3)
