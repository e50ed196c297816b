"""Per-particle fit at the best pose (scale, score, residual noise power), and the image normalisation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from fixtures import TINY
from habinit_plugin.engine import density
from habinit_plugin.engine.abinit import AbinitRun
from habinit_plugin.engine.fourier import half_plane_frequencies, image_irfft, image_rfft
from habinit_plugin.engine.jobs import gold_standard_job
from habinit_plugin.engine.minibatch import image_batch
from habinit_plugin.engine.mrc import new_stack, read_map
from habinit_plugin.engine.normalisation import ImageNormalisation, measure_stack
from habinit_plugin.engine.particle_fit import FIT_BAND_START, fit_best_pose, per_shell, score_band_start, shell_counts
from habinit_plugin.engine.particles import ParticleError, load_particles
from habinit_plugin.engine.passes import PassFits
from habinit_plugin.engine.pose_search import global_search
from habinit_plugin.engine.projector import volume_to_grid
from habinit_plugin.engine.search_policy import global_settings
from habinit_plugin.engine.settings import AbinitSettings, JobSettings
from habinit_plugin.engine.simulate import SimulationSettings, clean_images, random_poses, simulate_dataset

BOX, PIXEL_SIZE = 32, 3.6


def test_shell_sums_match_bincount():
    rng = np.random.default_rng(0)
    freqs = half_plane_frequencies(BOX // 2 - 1)
    radii = np.hypot(freqs[:, 0], freqs[:, 1])
    values = rng.random((3, len(freqs)))
    shells = np.rint(radii).astype(int)
    for b in range(3):
        assert np.allclose(per_shell(values, radii, BOX // 2 + 1)[b], np.bincount(shells, values[b], BOX // 2 + 1))
    assert np.allclose(shell_counts(radii, BOX // 2 + 1), np.bincount(shells, np.where(radii == 0, 1, 2), BOX // 2 + 1))


def _coloured_noise(rng, n: int, spectrum_per_shell: np.ndarray) -> np.ndarray:
    """Real images (n, BOX, BOX) of Gaussian noise whose rfft coefficients have variance spectrum[shell]."""
    white = rng.standard_normal((n, BOX, BOX)).astype(np.float32) / BOX  # E|rfft|^2 = 1
    ky = np.fft.fftfreq(BOX, 1.0 / BOX)[:, None]
    kx = np.arange(BOX // 2 + 1)[None, :]
    shells = np.minimum(np.rint(np.hypot(kx, ky)).astype(int), len(spectrum_per_shell) - 1)
    return image_irfft(image_rfft(white) * np.sqrt(spectrum_per_shell[shells]).astype(np.float32), BOX)


@pytest.fixture(scope="module")
def fitted():
    """600 images s_i C P_i + coloured noise, fitted at their true poses against the true map."""
    rng = np.random.default_rng(1)
    volume = density.bundled_protein_map(BOX, PIXEL_SIZE)
    poses = random_poses(SimulationSettings(n_particles=600, seed=3), PIXEL_SIZE, BOX)
    index = np.arange(600)
    signal = clean_images(volume_to_grid(volume, 4), poses, index, PIXEL_SIZE, BOX, 4)
    scales = np.clip(rng.normal(1.0, 0.15, 600), 0.3, None)
    signal_power = float(np.mean(np.var(signal, axis=(1, 2))))
    shells = np.arange(BOX // 2 + 1)
    spectrum = BOX**2 * signal_power * (1.0 + 4.0 * np.exp(-((shells / 6.0) ** 2)))  # SNR about 0.5, coloured
    images = signal * scales[:, None, None].astype(np.float32) + _coloured_noise(rng, 600, spectrum)
    freqs = half_plane_frequencies(BOX // 2 - 1)
    radii = np.hypot(freqs[:, 0], freqs[:, 1])
    noise = spectrum[np.rint(radii).astype(int)].astype(np.float32)
    grid = volume_to_grid(volume, 2)
    batch = image_batch(images, poses.ctf, freqs, radii, noise, PIXEL_SIZE, np)
    fit = fit_best_pose(grid, 2, batch, poses.rotations, poses.origins, BOX // 2 - 1)
    empty = image_batch(_coloured_noise(rng, 600, spectrum), poses.ctf, freqs, radii, noise, PIXEL_SIZE, np)
    empty_fit = fit_best_pose(grid, 2, empty, poses.rotations, poses.origins, BOX // 2 - 1)
    return fit, scales, spectrum, radii, empty_fit


def test_scale_estimate_follows_the_simulated_scales(fitted):
    """Unbiased, with the error its noise predicts (sd 1 / sqrt(ctf_term), about 0.08 here)."""
    fit, scales, _, _, _ = fitted
    error = fit.scale - scales
    assert np.corrcoef(fit.scale, scales)[0, 1] > 0.8  # measured on the upper half of the band: noisier
    assert abs(np.mean(error)) < 0.01
    assert 0.85 < np.std(error * np.sqrt(fit.ctf_term)) < 1.15


def test_noise_model_from_residuals_matches_the_simulated_spectrum(fitted):
    """The residual power per shell, as the passes turn it into the noise model, is the noise spectrum at every
    shell up to Nyquist - 1 (not only where the search band was)."""
    fit, scales, spectrum, radii, _ = fitted
    fits = PassFits(fit.scale, fit.score, np.ones(len(scales)), fit.residual_power)

    class Run:
        pass

    run = Run()
    run.radii = radii
    fits.apply_to(run)
    ratio = run.noise.sigma2[1 : BOX // 2] / spectrum[1 : BOX // 2]
    assert np.all(np.abs(ratio - 1.0) < 0.06), ratio
    assert np.median(run.scale) == pytest.approx(1.0)


def test_score_separates_empty_images_from_particles(fitted):
    """At a given pose an empty image's score is chi-square(1) / 2 when its cross term is positive, else 0
    (mean 0.25); a particle's is far above."""
    fit, _, _, _, empty = fitted
    assert np.mean(empty.score) == pytest.approx(0.25, abs=0.07)
    assert np.min(fit.score) > np.percentile(empty.score, 99)
    assert np.all(empty.scale < 0.5)


def _stack_copy(particles_star: str, tmp_path, transform) -> str:
    """The set with every image replaced by transform(image), written beside a copy of the STAR file."""
    particles = load_particles(particles_star)
    images = particles.read_images(np.arange(len(particles)))
    stack = new_stack(tmp_path / "particles.mrcs", len(particles), particles.box, particles.pixel_size)
    stack.data[:] = transform(images)
    stack.close()
    star = tmp_path / "particles.star"
    star.write_text(open(particles_star).read())
    return str(star)


def test_image_normalisation_removes_scale_and_offset(tiny_set):
    particles = load_particles(tiny_set["particles"])
    images = particles.read_images(np.arange(100))
    noise_sd, contrast = measure_stack(images)
    scaled_sd, scaled_contrast = measure_stack(images * 1000.0 + 50.0)
    assert scaled_sd == pytest.approx(1000.0 * noise_sd, rel=1e-5)
    assert scaled_contrast.z == pytest.approx(contrast.z, rel=1e-4) and contrast.white_particles
    a = ImageNormalisation(noise_sd).apply(images)
    b = ImageNormalisation(scaled_sd).apply(images * 1000.0 + 50.0)
    assert np.allclose(a, b, atol=1e-4 * np.abs(a).max())
    assert measure_stack(-images)[1].dark_particles


def _settings(**values) -> JobSettings:
    return JobSettings(abinit=AbinitSettings(**TINY, **values))


def test_scaled_and_offset_stack_gives_the_same_map(tiny_set, tmp_path):
    gold_standard_job(tiny_set["particles"], tmp_path / "plain", _settings())
    scaled = _stack_copy(tiny_set["particles"], tmp_path, lambda x: x * 1000.0 + 50.0)
    gold_standard_job(scaled, tmp_path / "scaled", _settings())
    a, _ = read_map(tmp_path / "plain" / "map.mrc")
    b, _ = read_map(tmp_path / "scaled" / "map.mrc")
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_dark_particles_are_refused_before_work_and_accepted_with_invert_contrast(tiny_set, tmp_path):
    dark = _stack_copy(tiny_set["particles"], tmp_path, lambda x: -x)
    with pytest.raises(ParticleError, match="darker than the background.*--invert-contrast"):
        gold_standard_job(dark, tmp_path / "refused", _settings())
    assert not (tmp_path / "refused").exists()
    gold_standard_job(dark, tmp_path / "inverted", _settings(invert_contrast=True))
    gold_standard_job(tiny_set["particles"], tmp_path / "plain", _settings())
    a, _ = read_map(tmp_path / "plain" / "map.mrc")
    b, _ = read_map(tmp_path / "inverted" / "map.mrc")
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    with pytest.raises(ParticleError, match="already brighter"):
        gold_standard_job(tiny_set["particles"], tmp_path / "wrongly", _settings(invert_contrast=True))


def test_sgd_leaves_out_the_images_that_fit_worst_and_scales_the_rest(tiny_set):
    """Empty images in a minibatch are the ones the trim leaves out, and their scale is near 0."""
    from habinit_plugin.engine.abinit import AbinitRun, run_sgd
    from habinit_plugin.engine.pose_search import global_search
    from habinit_plugin.engine.search_policy import global_settings

    run = AbinitRun(load_particles(tiny_set["particles"]), AbinitSettings(**TINY))
    run_sgd({"map": run})
    radius = run.geometry.radius(run.schedule.resolution(run.iteration - 1))
    batch = run.image_batch(np.arange(40), radius)
    rng = np.random.default_rng(0)
    sigma = np.sqrt(0.5 / batch.inverse_noise)
    empty = np.arange(0, 40, 2)
    shape = (len(empty), len(sigma))
    batch.spectra[empty] = sigma * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
    result = global_search(run.grid, 2, batch, global_settings(run.geometry, radius, run.device_bytes))
    kept, scales = run._best_fitting(batch, result, radius)
    assert kept.sum() == 32 and set(np.flatnonzero(kept == 0)) <= set(empty)
    assert np.median(scales[empty]) < 0.5 * np.median(np.delete(scales, empty))  # their best pose fits noise


def test_the_score_from_the_particles_r50_separates_junk_better_than_the_scales_band(tmp_path):
    """Junk (half empty picks, half lumps of the particle's size) searched over all poses against the true map
    at 5 A, SNR 0.1 with noise as ice gives: the score from the particle's R50 to the search band separates
    it from the particles better than the score on the band's upper half (the scale's band), and well."""
    volume = density.bundled_protein_map(48, 2.4)
    effects = {"junk_fraction": 0.4, "noise_colour": 4.0}
    simulate_dataset(volume, 2.4, tmp_path, SimulationSettings(n_particles=300, snr=0.1, seed=11, **effects))
    particles = load_particles(tmp_path / "particles.star")
    junk = np.load(tmp_path / "truth.npz")["is_junk"].astype(bool)
    run = AbinitRun(particles, AbinitSettings(seed=11))
    run.use_full_box()
    radius = run.geometry.radius(5.0)
    grid = volume_to_grid(volume, 2)
    batch = run.image_batch(np.arange(len(particles)), run.geometry.r_limit)
    found = global_search(grid, 2, batch.within(radius), global_settings(run.geometry, radius, run.device_bytes))
    poses = found.rotations[:, 0], found.origins[:, 0]
    start = score_band_start(run.geometry, radius)
    assert start < 0.8 * FIT_BAND_START * radius  # the R50 is coarser than half the search band here
    upper_half = fit_best_pose(grid, 2, batch, *poses, radius)
    from_r50 = fit_best_pose(grid, 2, batch, *poses, radius, start)
    assert np.array_equal(from_r50.scale, upper_half.scale)
    auc = {  # the probability that a particle scores above a junk image
        name: mannwhitneyu(fit.score[~junk], fit.score[junk]).statistic / (junk.sum() * (~junk).sum())
        for name, fit in (("half", upper_half), ("r50", from_r50))
    }
    assert auc["r50"] > 0.93 and auc["r50"] > auc["half"] + 0.03, auc
