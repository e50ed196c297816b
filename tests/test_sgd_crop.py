"""The SGD on images cropped in real space to the particle: crop size, exactness, hand-over, job mechanics.

The padded set is the tiny set's particle in a box of 48 (the SGD crops it to 36 px); the tiny set
itself fills its box and is not cropped.
"""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from fixtures import TINY, TINY_PIXEL_SIZE
from habinit_plugin.engine import density
from habinit_plugin.engine.abinit import AbinitRun
from habinit_plugin.engine.align3d import Alignment, transform_map
from habinit_plugin.engine.ctf import CTFParams
from habinit_plugin.engine.fourier import fill_spectra, half_plane_frequencies, image_irfft, pad_volume, phase_shift
from habinit_plugin.engine.geometry import MapGeometry
from habinit_plugin.engine.gold_standard import GoldStandardJob, monitor_entry
from habinit_plugin.engine.jobs import single_abinit_job
from habinit_plugin.engine.minibatch import image_batch, image_spectra
from habinit_plugin.engine.mrc import read_map
from habinit_plugin.engine.particle_set import CroppedParticles
from habinit_plugin.engine.particles import load_particles
from habinit_plugin.engine.projector import grid_to_volume, project, slice_coordinates, volume_to_grid
from habinit_plugin.engine.settings import AbinitSettings, JobSettings
from habinit_plugin.engine.sgd import NoiseModel
from habinit_plugin.engine.simulate import SimulationSettings, simulate_dataset
from habinit_plugin.engine.so3 import quaternion_to_matrix

PADDED_BOX = 48


@pytest.fixture(scope="module")
def padded_set(tmp_path_factory):
    """160 particles of the bundled protein (box 32 at 3.6 A/px) in a box of 48, SNR 1."""
    volume = pad_volume(density.bundled_protein_map(32, TINY_PIXEL_SIZE), PADDED_BOX)
    settings = SimulationSettings(n_particles=160, snr=1.0, seed=5)
    return simulate_dataset(volume, TINY_PIXEL_SIZE, tmp_path_factory.mktemp("padded"), settings)


def _settings() -> JobSettings:
    return JobSettings(abinit=AbinitSettings(**TINY), align_every=6, checkpoint_minutes=0.0)


class _Interrupted(Exception):
    pass


class _StopsAt(GoldStandardJob):
    """The job, stopped right after the checkpoint of SGD iteration ``stop_at``."""

    stop_at = 7

    def _after_sgd_iteration(self, t: int) -> None:
        super()._after_sgd_iteration(t)
        if t == self.stop_at:
            raise _Interrupted


def test_the_job_crops_for_the_sgd_and_resumes_bit_for_bit_in_either_phase(padded_set, tmp_path):
    """Both halves run the SGD on a 36-px crop and the passes on the input box; the monitor compares their
    models; a job stopped in the SGD (cropped), before pass 1 (cropped) or after it (input box) resumes to the
    uninterrupted job's half maps bit for bit."""
    particles = load_particles(padded_set["particles"])
    alone = GoldStandardJob(particles, _settings(), tmp_path / "alone")
    assert {run.geometry.box for run in alone.runs.values()} == {36}
    alone._sgd_phase()
    assert all(run.cropped and run.model_map().shape == (PADDED_BOX,) * 3 for run in alone.runs.values())
    assert [e["iteration"] for e in alone.state["history"]] == [6, 12, 16]
    assert all(e["resolution_0143"] < 20.0 for e in alone.state["history"][1:])
    result = alone.run()
    assert all(not run.cropped and run.geometry.box == PADDED_BOX for run in alone.runs.values())
    assert result.maps["A"].shape == (PADDED_BOX,) * 3 and result.resolution_0143 < 20.0

    stopped = _StopsAt(particles, _settings(), tmp_path / "sgd")
    with pytest.raises(_Interrupted):
        stopped.run()
    resumed = GoldStandardJob(particles, _settings(), tmp_path / "sgd")
    assert resumed.resume() and resumed.runs["A"].iteration == 7 and resumed.runs["A"].cropped
    by_sgd = resumed.run()

    before_passes = GoldStandardJob(particles, _settings(), tmp_path / "passes")
    before_passes._sgd_phase()
    resumed = GoldStandardJob(particles, _settings(), tmp_path / "passes")
    assert resumed.resume() and resumed.state["phase"] == "passes" and resumed.runs["B"].cropped
    resumed._pass_phase(until=1)
    after_pass_1 = GoldStandardJob(particles, _settings(), tmp_path / "passes")
    assert after_pass_1.resume() and after_pass_1.state["pass"] == 1
    assert not after_pass_1.runs["A"].cropped and len(after_pass_1.runs["A"].radii) == len(alone.runs["A"].radii)
    by_passes = after_pass_1.run()
    for other in (by_sgd, by_passes):
        for name in ("A", "B"):
            assert np.array_equal(other.maps[name], result.maps[name])


def test_the_crop_holds_the_window_moved_by_the_max_shift_and_keeps_both():
    """PR LBD's R50 of 21 A: a crop of 90 px at 1.5 A/px and 144 px at 1 A/px, with the input box's window and
    max shift; at 2 A/px the window moved by the shift needs more than the box of 64: no crop."""
    for box, px, crop in ((128, 1.5, 90), (256, 1.0, 144), (64, 2.0, 64)):
        g = MapGeometry(box, px, AbinitSettings(), 21.0 / px)
        c = g.cropped(g.crop_box)
        assert g.crop_box == crop
        assert (c.mask_radius_px, c.max_shift_px) == (g.mask_radius_px, g.max_shift_px)
        if crop < box:
            assert 2 * (g.mask_radius_px + g.window_edge_px + g.max_shift_px) <= crop
            assert c.uncropped() == g


def test_the_cropped_view_reads_the_central_pixels(padded_set):
    """Images of the view are the central 40 px of the set's, the box centre on the crop's centre."""
    particles = load_particles(padded_set["particles"])
    view = CroppedParticles(particles, 40)
    full, cropped = particles.read_images([3, 1]), view.read_images([3, 1])
    assert cropped.shape == (2, 40, 40) and len(view) == len(particles) and view.pixel_size == particles.pixel_size
    assert np.array_equal(cropped[:, 20, 20], full[:, 24, 24]) and np.array_equal(cropped, full[:, 4:44, 4:44])


def test_the_noise_model_moved_to_the_input_box_is_the_input_box_estimate():
    """Coloured noise (power falling 10x to Nyquist): the model estimated on 40-px crops, moved to the box of 64,
    is within 6% of the one estimated on the 64-px images at shells 3-30 (2% sampling error, and the leakage of
    the crop's edges, up to 5% lower at shells 3-9 here; below, the crop's shells 0 and 1 hold few coefficients;
    beyond, the crop has no frequency and its last shell is extended)."""
    rng = np.random.default_rng(3)
    white = rng.standard_normal((800, 64, 64)).astype(np.float32)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(64), np.fft.rfftfreq(64), indexing="ij"))
    images = np.fft.irfft2(np.fft.rfft2(white) / np.sqrt(1 + 18 * k**2), s=(64, 64)).astype(np.float32)
    estimates = {}
    for box in (40, 64):
        freqs = half_plane_frequencies(box // 2 - 1)
        radii = np.hypot(freqs[:, 0], freqs[:, 1])
        lo = 32 - box // 2
        spectra = image_spectra(np.ascontiguousarray(images[:, lo : lo + box, lo : lo + box]), freqs, np)
        estimates[box] = NoiseModel.from_spectra(spectra, radii, box // 2 + 1).sigma2
    moved = NoiseModel(estimates[40]).resampled(40, 64).sigma2
    assert estimates[64][1] > 5 * estimates[64][31]
    assert np.max(np.abs(moved[3:31] / estimates[64][3:31] - 1)) < 0.06


def _blobs(box: int, rng) -> np.ndarray:
    """Five Gaussian blobs (sd 2.5 px) within 7 px of the centre of a box."""
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    volume = np.zeros((box,) * 3, np.float32)
    for c in rng.uniform(-7, 7, (5, 3)):
        volume += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * 2.5**2))
    return volume


def test_pose_energies_on_the_crop_are_those_on_the_input_box():
    """Noise-free images (box 64, 3 A/px) of a model confined to 15 px of the centre, shifted by up to 4 px, and
    the model on a 40-px crop: the chi^2 differences between the true pose and poses turned by 2-20 degrees,
    over the same physical band (12 A and 7 A), agree with those on the input box to 3% (median over images and
    poses; the two grids sample the model's transform 1.6x apart, so trilinear interpolation and the
    band's discrete shells differ; a sum over the whole plane would agree exactly by Parseval)."""
    box, crop, px, n = 64, 40, 3.0, 12
    rng = np.random.default_rng(0)
    model = _blobs(crop, rng)
    grids = {box: volume_to_grid(pad_volume(model, box), 2), crop: volume_to_grid(model, 2)}
    rotations = quaternion_to_matrix(rng.standard_normal((n, 4)))
    origins = rng.uniform(-4, 4, (n, 2))
    freqs = half_plane_frequencies(box // 2 - 1)
    spectra = project(grids[box], slice_coordinates(rotations, freqs), 2) * phase_shift(freqs, -origins, box)
    images = {box: image_irfft(fill_spectra(spectra, freqs, box), box)}
    images[crop] = np.ascontiguousarray(images[box][:, 12:52, 12:52])
    one = np.ones(n)
    constant_ctf = CTFParams(0 * one, 0 * one, 0 * one, 300 * one, 0 * one, one, 0 * one, 0 * one)  # CTF = 1
    turns = [
        Rotation.from_rotvec(rng.standard_normal((n, 3)) * np.deg2rad(d) / 3**0.5).as_matrix() for d in (2, 5, 10, 20)
    ]
    for resolution in (12.0, 7.0):
        differences = {}
        for size in (box, crop):
            band = half_plane_frequencies(size * px / resolution)
            batch = image_batch(images[size], constant_ctf, band, np.hypot(*band.T), np.ones(len(band)), px, np)
            true = _chi2(grids[size], batch, rotations, origins)
            differences[size] = np.array([_chi2(grids[size], batch, rotations @ t, origins) - true for t in turns])
        scaled = differences[crop] * (box / crop) ** 2  # the crop's noise variance per coefficient: (40/64)^2
        assert np.median(np.abs(scaled / differences[box] - 1)) < 0.03
        assert np.all(differences[crop] > 0)


def _chi2(grid, batch, rotations, origins) -> np.ndarray:
    """(B,) sum over the batch's band of |image - projection|^2 / noise (Hermitian weights)."""
    proj = project(grid, slice_coordinates(rotations, batch.freqs), 2)
    centred = batch.spectra * phase_shift(batch.freqs, origins, batch.box)
    return np.sum(np.abs(centred - batch.ctf * proj) ** 2 * batch.noise_weight, axis=1)


def test_the_hand_over_pads_the_model_and_moves_the_noise_model(padded_set):
    """After a few SGD steps on the 36-px crop, use_full_box puts the run on the box of 48: the model map is the
    crop's map zero-padded (the same to float rounding on the model's band), the noise model the crop's moved
    to the input box; a second call does nothing. On the tiny set (particle fills the box) there is no crop."""
    particles = load_particles(padded_set["particles"])
    run = AbinitRun(particles, AbinitSettings(**TINY))
    for _ in range(3):
        run.step()
    assert run.cropped and run.particles.box == 36 and run.model_map().shape == (PADDED_BOX,) * 3
    band_box = run.band_box
    before, noise = run.model_map(band_box), NoiseModel(run.noise.sigma2.copy()).resampled(36, PADDED_BOX)
    crop_map = grid_to_volume(run.grid, run.working_box, gridding_correction=False)
    run.use_full_box()
    assert not run.cropped and run.particles is particles and len(run.noise.sigma2) == PADDED_BOX // 2 + 1
    after = run.model_map(band_box)
    assert np.max(np.abs(after - before)) < 1e-5 * np.max(np.abs(before))
    assert np.array_equal(run.noise.sigma2, noise.sigma2)
    grid = run.grid
    run.use_full_box()
    assert run.grid is grid and crop_map.shape[0] < band_box


def test_habinit_abinit_on_a_cropped_set_writes_maps_at_the_input_box(padded_set, tmp_path):
    """The single-map job: SGD on the crop, maps saved during the SGD and the final map at the box of 48."""
    info = single_abinit_job(str(padded_set["particles"]), tmp_path, AbinitSettings(**TINY), save_every=8)
    saved = sorted(tmp_path.glob("*.mrc"))
    assert len(saved) >= 3 and info["status"] == "finished"
    for path in saved:
        volume, px = read_map(path)
        assert volume.shape == (PADDED_BOX,) * 3 and px == pytest.approx(TINY_PIXEL_SIZE)


def test_two_workers_on_a_cropped_set_give_the_one_process_result_bit_for_bit(padded_set, tmp_path):
    """The two-worker job crops as the one-process job does: the same half maps, particles and alignment bit for
    bit, the same GS-FSC history to 1%."""
    from test_parallel_halves import _args, _run

    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(_args(padded_set["particles"], one)).returncode == 0
    r = _run(_args(padded_set["particles"], two, "--parallel-halves"))
    assert r.returncode == 0, r.stderr
    for name in ("half_map_A.mrc", "half_map_B.mrc"):
        with mrcfile.open(two / name) as a, mrcfile.open(one / name) as b:
            assert np.array_equal(a.data, b.data), name
    assert (two / "particles.star").read_bytes() == (one / "particles.star").read_bytes()
    info, ref = (json.loads((folder / "run.json").read_text()) for folder in (two, one))
    assert info["alignment_B_to_A"] == ref["alignment_B_to_A"] and len(info["history"]) == len(ref["history"]) == 5
    # the SGD monitor's GS-FSC agrees to 1% only (14.137 against 14.157 A at iteration 6): not yet explained
    for mine, theirs in zip(info["history"], ref["history"]):
        assert mine["resolution_0143"] == pytest.approx(theirs["resolution_0143"], rel=0.01)
    with mrcfile.open(two / "half_map_A.mrc") as mrc:
        assert mrc.data.shape == (PADDED_BOX,) * 3


def test_the_monitor_compares_the_models_on_the_crop_they_span():
    """Two noisy maps (noise twice the signal's sd) zero outside the central 36 of 64 px, B a turned copy of A:
    compared on that 36-px box (the extent the SGD's crops give) they have the alignment, hand and GS-FSC of the
    whole box."""
    rng = np.random.default_rng(3)
    inner = density.bundled_protein_map(32, TINY_PIXEL_SIZE)
    turn = Alignment(matrix=Rotation.from_euler("zyz", [30, 50, 10], degrees=True).as_matrix())
    noisy = [v + 2.0 * v.std() * rng.standard_normal(v.shape).astype(np.float32) for v in (inner, inner)]
    map_a, map_b = (pad_volume(pad_volume(v, 36), 64) for v in (noisy[0], transform_map(noisy[1], turn)))
    whole = monitor_entry(map_a, map_b, TINY_PIXEL_SIZE, "C1", 6, 10.0, transform_map)
    cropped = monitor_entry(map_a, map_b, TINY_PIXEL_SIZE, "C1", 6, 10.0, transform_map, extent_fraction=36 / 64)
    assert whole["mirrored"] is cropped["mirrored"] is False
    assert 9.0 < whole["resolution_0143"] < 13.0  # inside the band: a crop that cut the maps would move it
    for key in ("resolution_0143", "resolution_05"):
        assert cropped[key] == pytest.approx(whole[key], rel=0.06), key
