"""Preconditioned SGD pieces: the update, schedule, noise model, centring, constraints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from habinit_plugin.engine import density
from habinit_plugin.engine.ctf import evaluate_ctf
from habinit_plugin.engine.fourier import (
    centered_fftn,
    centered_ifftn,
    half_plane_frequencies,
    hermitian_weights,
    soft_sphere,
)
from habinit_plugin.engine.fsc import fsc
from habinit_plugin.engine.minibatch import ImageBatch
from habinit_plugin.engine.projector import grid_to_volume, project, slice_coordinates, volume_to_grid
from habinit_plugin.engine.reconstruct import Backprojection, particle_spectra, regularisation, wiener_map
from habinit_plugin.engine.settings import AbinitSettings
from habinit_plugin.engine.sgd import (
    NoiseModel,
    Schedule,
    apply_constraints,
    band_mask,
    centre_of_mass_shift,
    minibatch_gradient,
    sgd_update,
    translate_grid,
    update_weight_ema,
    weak_prior_tau2,
)
from habinit_plugin.engine.simulate import SimulationSettings, clean_images, random_poses

BOX = 32
PIXEL_SIZE = 3.6
OVERSAMPLING = 2
N_IMAGES = 300


@dataclass
class Minibatch:
    """Noise-free particles with known poses: centred spectra (B, M), ctf (B, M), coords (B, M, 3)."""

    volume: np.ndarray
    freqs: np.ndarray
    spectra: np.ndarray
    ctf: np.ndarray
    rotations: np.ndarray
    coords: np.ndarray

    @property
    def size(self) -> int:
        return OVERSAMPLING * BOX

    def gradient(self, grid):
        """The SGD phase's gradient (``sgd.minibatch_gradient``) at the true poses, weight 1, unit
        noise: Hermitian backprojected CTF-weighted residuals and CTF^2 weights, (G, G, G) each."""
        n = len(self.rotations)
        batch = ImageBatch(self.spectra, self.ctf, hermitian_weights(self.freqs), self.freqs, self.radii, BOX)
        one_pose = self.rotations[:, None], np.zeros((n, 1, 2)), np.ones((n, 1))
        data, weight, _ = minibatch_gradient(grid, OVERSAMPLING, batch, *one_pose)
        return data, weight

    @property
    def radii(self) -> np.ndarray:
        return np.hypot(self.freqs[:, 0], self.freqs[:, 1])

    def misfit(self, grid) -> float:
        """Sum over images and half-plane frequencies of |X - C P V|^2."""
        residual = self.spectra - self.ctf * project(grid, self.coords, OVERSAMPLING)
        return float(np.sum(np.abs(residual) ** 2))


@pytest.fixture(scope="module")
def minibatch() -> Minibatch:
    volume = density.bundled_protein_map(BOX, PIXEL_SIZE)
    poses = random_poses(SimulationSettings(n_particles=N_IMAGES, seed=3), PIXEL_SIZE, BOX)
    index = np.arange(N_IMAGES)
    images = clean_images(volume_to_grid(volume, 4), poses, index, PIXEL_SIZE, BOX, oversampling=4)
    freqs = half_plane_frequencies(BOX // 2 - 1)
    ctf = evaluate_ctf(poses.ctf.subset(index), freqs, PIXEL_SIZE, BOX)
    spectra = particle_spectra(images, freqs, poses.origins)
    coords = slice_coordinates(poses.rotations, freqs)
    return Minibatch(volume, freqs, spectra, ctf, poses.rotations, coords)


def _weak_prior(weight):
    """Per-voxel 1/tau2 = 5% of the mean weight of each shell (the SGD phase's prior)."""
    tau2 = weak_prior_tau2(weight, OVERSAMPLING)
    assert len(tau2) == BOX // 2 + 1
    return tau2, regularisation(weight, OVERSAMPLING, tau2)


# ------------------------------------------------------------------------ update


def test_first_step_is_the_wiener_reconstruction(minibatch):
    """eta = 1 from V = 0 gives D / (W + 1/tau2), the Wiener map of the minibatch."""
    zero = np.zeros((minibatch.size,) * 3, dtype=np.complex64)
    gradient, weight = minibatch.gradient(zero)
    tau2, inv_tau2 = _weak_prior(weight)
    stepped = sgd_update(zero, gradient, weight, inv_tau2, 1.0)

    bp = Backprojection.zeros(BOX, OVERSAMPLING)
    bp.insert(minibatch.spectra, minibatch.ctf, minibatch.rotations, minibatch.freqs)
    data, bp_weight = bp.symmetric()
    assert np.allclose(weight, bp_weight, rtol=1e-6, atol=1e-6 * float(bp_weight.max()))
    assert np.allclose(gradient, data, rtol=1e-6, atol=1e-6 * float(np.abs(data).max()))
    closed_form = data / (bp_weight + regularisation(bp_weight, OVERSAMPLING, tau2))
    assert np.allclose(stepped, closed_form, rtol=1e-5, atol=1e-6 * float(np.abs(closed_form).max()))

    ours = grid_to_volume(stepped, BOX)
    wiener = wiener_map(bp, tau2)
    assert np.abs(ours - wiener).max() < 1e-5 * np.abs(wiener).max()
    # and it is the map: FSC with the truth (measured 0.996 to shell 14)
    curve = fsc(ours, minibatch.volume)
    assert curve[1:15].min() > 0.98
    # a smaller step is the same direction, scaled
    half = sgd_update(zero, gradient, weight, inv_tau2, 0.5)
    assert np.allclose(half, 0.5 * stepped, rtol=1e-5, atol=1e-7 * float(np.abs(stepped).max()))


def _iterate(minibatch: Minibatch, eta: float, n: int = 8) -> list[float]:
    """Data misfit after each of n steps on the same minibatch, from V = 0."""
    grid = np.zeros((minibatch.size,) * 3, dtype=np.complex64)
    _, weight = minibatch.gradient(grid)
    _, inv_tau2 = _weak_prior(weight)
    misfits = []
    for _ in range(n):
        gradient, _ = minibatch.gradient(grid)
        grid = sgd_update(grid, gradient, weight, inv_tau2, eta)
        misfits.append(minibatch.misfit(grid))
    return misfits


def test_repeated_steps_are_stable_below_eta_2(minibatch):
    """Measured misfits: eta 1 falls from 2.1e5 to 7.3e4; eta 1.9 oscillates down; eta 2.5 grows 1e3x."""
    start = minibatch.misfit(np.zeros((minibatch.size,) * 3, dtype=np.complex64))
    eta1 = _iterate(minibatch, 1.0)
    assert eta1[0] < 0.1 * start
    assert eta1[-1] < 0.5 * eta1[0]
    eta19 = _iterate(minibatch, 1.9)
    assert eta19[-1] < 0.5 * eta19[0]
    eta25 = _iterate(minibatch, 2.5)
    assert eta25[-1] > 100 * eta25[0]  # the preconditioner's bound is real: past eta = 2 it diverges


def test_weight_ema_takes_new_voxels_and_mixes_old_ones():
    old = np.array([0.0, 2.0, 4.0], dtype=np.float32)
    new = np.array([3.0, 6.0, 0.0], dtype=np.float32)
    mixed = update_weight_ema(old, new, decay=0.9)
    assert np.allclose(mixed, [3.0, 0.9 * 2.0 + 0.1 * 6.0, 0.9 * 4.0])


# ---------------------------------------------------------------------- schedule


def test_schedule_resolution_ramp():
    s = Schedule(AbinitSettings(n_initial_iterations=200, n_final_iterations=300, initial_resolution_A=35.0), 12.0)
    assert s.n_iterations == 500
    assert s.resolution(0) == pytest.approx(35.0)
    assert s.resolution(199) == pytest.approx(12.0)
    assert s.resolution(499) == pytest.approx(12.0)
    res = np.array([s.resolution(t) for t in range(500)])
    assert np.all(np.diff(res) <= 1e-12)
    # linear in frequency: the midpoint of the ramp is the mean of 1/35 and 1/12
    t_mid = 199 / 2
    mid = 1.0 / (0.5 / 35.0 + 0.5 / 12.0)
    assert 1.0 / s.resolution(int(t_mid)) == pytest.approx(1.0 / mid, rel=0.01)


def test_schedule_batch_growth():
    settings = AbinitSettings(n_initial_iterations=200, n_final_iterations=300, initial_batch=90, final_batch=300)
    s = Schedule(settings, 12.0)
    assert s.batch_size(0) == 90
    assert s.batch_size(199) == 90
    assert s.batch_size(200) == 90
    assert s.batch_size(200 + 75) == pytest.approx(195, abs=1)  # halfway up the ramp
    assert s.batch_size(200 + 150) == 300
    assert s.batch_size(499) == 300
    sizes = [s.batch_size(t) for t in range(500)]
    assert all(b <= a for a, b in zip(sizes[1:], sizes[:-1]))


def test_schedule_learning_rate_and_temperature():
    settings = AbinitSettings(
        n_initial_iterations=200,
        n_final_iterations=300,
        learning_rate=0.4,
        learning_rate_iterations=100,
        final_learning_rate=0.1,
        initial_temperature=4.0,
    )
    s = Schedule(settings, 12.0)
    assert s.learning_rate(0) == pytest.approx(0.4)
    assert s.learning_rate(99) == pytest.approx(0.4)
    assert s.learning_rate(300) == pytest.approx(0.4 * 0.25**0.5)  # geometric: halfway in log
    assert s.learning_rate(500) == pytest.approx(0.1)
    rates = np.array([s.learning_rate(t) for t in range(501)])
    assert np.all(np.diff(rates) <= 1e-12) and rates.max() < 2.0
    assert s.temperature(0) == pytest.approx(4.0)
    assert s.temperature(199) == pytest.approx(1.0)
    assert s.temperature(400) == pytest.approx(1.0)


# ------------------------------------------------------------------- noise model


def _complex_noise(rng, n: int, variance: np.ndarray) -> np.ndarray:
    """(n, M) circular complex Gaussian with E|z|^2 = variance (M,)."""
    z = rng.normal(size=(n, len(variance))) + 1j * rng.normal(size=(n, len(variance)))
    return (z * np.sqrt(variance / 2.0)).astype(np.complex64)


def test_noise_model_estimates_and_tracks_residual_power():
    rng = np.random.default_rng(0)
    freqs = half_plane_frequencies(15)
    radii = np.hypot(freqs[:, 0], freqs[:, 1])
    n_shells = 17
    shells = np.rint(radii).astype(int)
    true = 1.0 + np.arange(n_shells, dtype=np.float64)  # variance per shell
    model = NoiseModel.from_spectra(_complex_noise(rng, 400, true[shells]), radii, n_shells)
    assert np.allclose(model.sigma2[1:16], true[1:16], rtol=0.1)
    assert model.sigma2[16] == model.sigma2[15]  # empty shell: filled from its neighbour
    assert np.allclose(model.per_frequency(radii), model.sigma2[shells], rtol=1e-6)

    # one update moves a tenth of the way toward the residual power (decay 0.9)
    residual_power = 0.25 * true
    residuals = _complex_noise(rng, 200, residual_power[shells])
    measured = NoiseModel.from_spectra(residuals, radii, n_shells).sigma2
    before = model.sigma2.copy()
    model.update(residuals, radii, decay=0.9)
    assert np.allclose(model.sigma2[:16], 0.9 * before[:16] + 0.1 * measured[:16], rtol=1e-6)
    assert model.sigma2[16] == before[16]  # no residuals in that shell: unchanged

    # repeated updates converge to the residual power
    for _ in range(60):
        model.update(_complex_noise(rng, 200, residual_power[shells]), radii, decay=0.9)
    assert np.allclose(model.sigma2[1:16], residual_power[1:16], rtol=0.1)

    # residuals that reach only shell 8 leave the higher shells alone
    low = radii <= 8
    before = model.sigma2.copy()
    model.update(_complex_noise(rng, 50, 10.0 * true[shells[low]]), radii[low], decay=0.5)
    assert np.all(model.sigma2[1:9] > 2.0 * before[1:9])
    assert np.array_equal(model.sigma2[9:], before[9:])


# ----------------------------------------------------------- centring, constraints


def _blob_grid(size: int, centre_xyz, sigma: float = 2.5):
    """Centred Fourier grid of a Gaussian blob at ``centre_xyz`` voxels from the grid centre."""
    axis = np.arange(size, dtype=np.float64) - size // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    cx, cy, cz = centre_xyz
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return centered_fftn(blob.astype(np.float32)).astype(np.complex64)


def test_centre_of_mass_is_in_xyz_order():
    offset = np.array([4.0, -3.0, 2.0])  # distinct on every axis: catches a z/x swap
    assert np.allclose(centre_of_mass_shift(_blob_grid(32, offset)), offset, atol=1e-3)
    assert np.allclose(centre_of_mass_shift(np.zeros((8, 8, 8), dtype=np.complex64)), 0.0)


def test_translate_grid_and_centre_of_mass_are_inverse():
    size = 32
    grid = _blob_grid(size, (0.0, 0.0, 0.0))
    shift = np.array([3.0, -2.0, 1.5])
    moved = translate_grid(grid, shift)
    assert np.allclose(centre_of_mass_shift(moved), shift, atol=0.02)
    # moving the content by minus its centre of mass brings it back to the centre
    recentred = translate_grid(moved, -centre_of_mass_shift(moved))
    assert np.allclose(centre_of_mass_shift(recentred), 0.0, atol=0.02)
    # translate by s then -s is the identity on the grid
    assert np.allclose(translate_grid(moved, -shift), grid, atol=1e-4 * float(np.abs(grid).max()))
    # integer shifts are exact rolls of the real-space map ([z, y, x] axes)
    rolled = np.roll(centered_ifftn(grid).real, shift=(1, -2, 3), axis=(0, 1, 2))
    assert np.allclose(centered_ifftn(translate_grid(grid, (3, -2, 1))).real, rolled, atol=1e-5)


def test_translate_grid_moves_the_protein(minibatch):
    grid = volume_to_grid(minibatch.volume, OVERSAMPLING)
    before = centre_of_mass_shift(grid)
    after = centre_of_mass_shift(translate_grid(grid, (3.0, -2.0, 1.5)))
    assert np.allclose(after - before, [3.0, -2.0, 1.5], atol=0.2)


def _radius(size: int) -> np.ndarray:
    axis = np.arange(size) - size // 2
    return np.sqrt(sum(g.astype(np.float64) ** 2 for g in np.meshgrid(axis, axis, axis, indexing="ij")))


def test_constraints_make_the_map_non_negative_inside_the_mask(minibatch):
    size = OVERSAMPLING * BOX
    rng = np.random.default_rng(1)
    padded = np.pad(minibatch.volume, BOX // 2)
    noisy = padded + rng.normal(0.0, 0.25 * float(minibatch.volume.max()), padded.shape)
    grid = centered_fftn(noisy.astype(np.float32)).astype(np.complex64)
    before = centered_ifftn(grid).real
    assert before.min() < -0.4 * before.max()  # plenty of negative density to remove

    mask_radius = 12.0
    full_band = 10.0 * size
    out = centered_ifftn(apply_constraints(grid, OVERSAMPLING, mask_radius, full_band)).real
    assert out.min() >= -1e-5 * out.max()
    assert np.abs(out[_radius(size) > mask_radius + 2.5]).max() <= 1e-5 * out.max()  # edge is 2 voxels wide
    inside = _radius(size) < mask_radius
    expected = np.maximum(before, 0.0)[inside]
    assert np.allclose(out[inside], expected, atol=1e-4 * out.max())
    # a map that is already positive and inside the mask is left alone
    clean = np.pad(minibatch.volume, BOX // 2) * soft_sphere(size, 10.0, width=2.0)
    clean_grid = centered_fftn(clean.astype(np.float32)).astype(np.complex64)
    kept = centered_ifftn(apply_constraints(clean_grid, OVERSAMPLING, 13.0, full_band)).real
    assert np.abs(kept - clean).max() < 1e-4 * clean.max()


def test_constraints_band_limit(minibatch):
    """With a band limit, the result is the band-limited non-negative masked map."""
    size = OVERSAMPLING * BOX
    rng = np.random.default_rng(2)
    noisy = rng.normal(0.0, 1.0, (size,) * 3).astype(np.float32)
    grid = centered_fftn(noisy).astype(np.complex64)
    band = 6.0
    out = apply_constraints(grid, OVERSAMPLING, 12.0, band)
    keep = band_mask(size, OVERSAMPLING, band)
    assert np.all(out[~keep] == 0)
    masked = np.maximum(noisy * soft_sphere(size, 12.0, width=2.0), 0.0)
    assert np.allclose(out[keep], centered_fftn(masked)[keep], atol=1e-3 * float(np.abs(out).max()))
