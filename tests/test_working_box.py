"""Working boxes: what the SGD and the searches compute on the band of their resolution is exactly what the
full-box computation gives there (images, CTF and model cropped in Fourier space)."""

from __future__ import annotations

import numpy as np

from habinit_plugin.engine.ctf import CTFParams, evaluate_ctf
from habinit_plugin.engine.fourier import half_plane_frequencies, image_irfft, image_rfft, sample_spectra
from habinit_plugin.engine.geometry import MapGeometry
from habinit_plugin.engine.projector import project, slice_coordinates, volume_to_grid
from habinit_plugin.engine.settings import AbinitSettings
from habinit_plugin.engine.sgd import resize_grid
from habinit_plugin.engine.so3 import random_rotations

BOX, PIXEL_SIZE, RADIUS = 64, 1.8, 12.0


def _smooth_volume(rng) -> np.ndarray:
    volume = np.zeros((BOX,) * 3, dtype=np.float32)
    for centre in rng.uniform(BOX * 0.35, BOX * 0.65, (12, 3)):
        z, y, x = np.ogrid[:BOX, :BOX, :BOX]
        volume += np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / 18.0)
    return volume


def test_model_cropped_to_the_working_box_projects_the_band_exactly():
    """The SGD model lives on a grid of the working size of its band: its slices in the band are those of
    the full-box grid (to float32 rounding of the interpolation weights)."""
    rng = np.random.default_rng(0)
    full = volume_to_grid(_smooth_volume(rng), 2)
    size = MapGeometry(BOX, PIXEL_SIZE, AbinitSettings()).working_size(RADIUS)
    assert size < full.shape[0]
    freqs = half_plane_frequencies(RADIUS)
    coords = slice_coordinates(random_rotations(20, rng), freqs)
    reference = project(full, coords, 2)
    assert np.allclose(project(resize_grid(full, size), coords, 2), reference, atol=1e-5 * np.abs(reference).max())


def test_band_of_a_full_box_image_is_the_fourier_cropped_image():
    """Sampling a full-box image's spectrum in the band is a Fourier crop: the image cropped to a smaller box
    (twice the pixel size) has the same coefficients there, up to the transform's size factor."""
    rng = np.random.default_rng(1)
    images = rng.standard_normal((3, BOX, BOX)).astype(np.float32)
    small = BOX // 2
    spectra = image_rfft(images)
    cropped_spectra = np.zeros((3, small, small // 2 + 1), dtype=np.complex64)
    freqs = half_plane_frequencies(RADIUS)
    cropped_spectra[:, freqs[:, 1] % small, freqs[:, 0]] = sample_spectra(spectra, freqs)
    on_axis = (freqs[:, 0] == 0) & (freqs[:, 1] > 0)  # their Friedel mates complete the kx = 0 column
    cropped_spectra[:, (-freqs[on_axis, 1]) % small, 0] = np.conj(sample_spectra(spectra, freqs[on_axis]))
    cropped = image_irfft(cropped_spectra, small) * (small / BOX) ** 2  # an image of half the box
    band_full = sample_spectra(spectra, freqs) * (small / BOX) ** 2
    assert np.allclose(sample_spectra(image_rfft(cropped), freqs), band_full, atol=1e-4 * np.abs(band_full).max())


def test_ctf_on_the_cropped_grid_equals_the_full_grid():
    """The CTF depends on k / (box * pixel size) only: the same values on the band of a cropped box."""
    n = 4
    ctf = CTFParams(
        defocus_u=np.full(n, 15000.0), defocus_v=np.full(n, 14000.0), defocus_angle=np.linspace(0, 90, n),
        voltage=np.full(n, 300.0), cs=np.full(n, 2.7), amplitude_contrast=np.full(n, 0.1),
        phase_shift=np.zeros(n), bfactor=np.zeros(n),
    )  # fmt: skip
    freqs = half_plane_frequencies(RADIUS)
    full = evaluate_ctf(ctf, freqs, PIXEL_SIZE, BOX)
    assert np.array_equal(full, evaluate_ctf(ctf, freqs, 2 * PIXEL_SIZE, BOX // 2))
