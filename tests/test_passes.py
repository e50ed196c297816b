"""Full passes: internal halves searched against their own references, marginalised
insertion, and resuming between passes."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures import TINY
from habinit_plugin.engine.abinit import AbinitRun, run_sgd
from habinit_plugin.engine.fourier import half_plane_frequencies, hermitian_weights
from habinit_plugin.engine.geometry import MapGeometry
from habinit_plugin.engine.gold_standard import GoldStandardJob
from habinit_plugin.engine.minibatch import ImageBatch
from habinit_plugin.engine.mrc import read_map
from habinit_plugin.engine.particles import load_particles
from habinit_plugin.engine.passes import GLOBAL_PASSES, _insert, full_pass, internal_halves, pass_radius
from habinit_plugin.engine.pose_search import SearchResult
from habinit_plugin.engine.reconstruct import Backprojection
from habinit_plugin.engine.settings import AbinitSettings, JobSettings
from habinit_plugin.engine.sgd import NoiseModel
from habinit_plugin.engine.so3 import geodesic_distance, random_rotations, rotvec_to_matrix


def test_internal_halves_see_only_their_own_reference(tiny_set):
    """Changing the reference of internal half 1 changes the poses of half 1 only."""
    run = AbinitRun(load_particles(tiny_set["particles"]), AbinitSettings(**TINY))
    run_sgd({"map": run})
    reference = run.model_map()
    start = run.rotations.copy(), run.origins.copy(), run.scale.copy(), NoiseModel(run.noise.sigma2.copy())
    first = full_pass(run, (reference, reference), run.geometry.radius(12.0), local=True)
    run.rotations, run.origins, run.scale, run.noise = start  # a pass sets the next pass's scales and noise
    other = np.roll(reference, 2, axis=0)  # a shifted copy: the poses of its half must move
    second = full_pass(run, (reference, other), run.geometry.radius(12.0), local=True)
    halves = internal_halves(run)
    assert 0.4 < halves.mean() < 0.6
    assert np.array_equal(first.rotations[halves == 0], second.rotations[halves == 0])
    assert np.array_equal(first.origins[halves == 0], second.origins[halves == 0])
    assert not np.allclose(first.origins[halves == 1], second.origins[halves == 1])
    assert first.fsc[3] > 0.5


def test_marginalised_insert_with_one_pose_equals_the_best_pose():
    """Posterior weights (1, 0, ...) insert exactly what the best pose alone inserts."""
    rng = np.random.default_rng(0)
    freqs = half_plane_frequencies(7)
    n, k = 5, 3
    spectra = (rng.standard_normal((n, len(freqs))) + 1j * rng.standard_normal((n, len(freqs)))).astype(np.complex64)
    ctf = rng.uniform(0.2, 1.0, (n, len(freqs))).astype(np.float32)
    batch = ImageBatch(spectra, ctf, hermitian_weights(freqs), freqs, np.hypot(*freqs.T), 16)
    rotations = random_rotations(n * k, rng).reshape(n, k, 3, 3)
    origins = rng.uniform(-1, 1, (n, k, 2))
    energies = np.tile([0.0, 1e4, 2e4], (n, 1))  # weights exp(-E/2): (1, 0, 0)
    marginal, hard = Backprojection.zeros(16), Backprojection.zeros(16)
    _insert(marginal, batch, SearchResult(rotations, origins, energies), marginalise=True)
    _insert(hard, batch, SearchResult(rotations[:, :1], origins[:, :1], energies[:, :1]), marginalise=False)
    assert np.array_equal(marginal.data, hard.data) and np.array_equal(marginal.weight, hard.weight)
    spread = Backprojection.zeros(16)
    _insert(spread, batch, SearchResult(rotations, origins, np.zeros((n, k))), marginalise=True)
    assert np.isclose(spread.weight.sum(), hard.weight.sum(), rtol=1e-4)  # weights sum to 1 per particle
    assert not np.allclose(spread.data, hard.data)


def test_resume_between_passes_gives_the_same_maps(tiny_set, tmp_path):
    """A job stopped after its first full pass and resumed from the checkpoint ends with
    the same half maps, bit for bit, as a job that ran through (the maps of pass 1,
    the references of pass 2, travel in the checkpoint)."""
    particles = load_particles(tiny_set["particles"])
    settings = JobSettings(abinit=AbinitSettings(**TINY), align_every=6, checkpoint_minutes=0.0)
    whole = GoldStandardJob(particles, settings, tmp_path / "whole").run()
    cut = GoldStandardJob(particles, settings, tmp_path / "cut")
    cut._sgd_phase()
    cut._pass_phase(until=1)
    assert cut.state["phase"] == "passes" and cut.state["pass"] == 1
    resumed = GoldStandardJob(particles, settings, tmp_path / "cut")
    assert resumed.resume() and set(resumed.volumes) == {"A", "B"}
    result = resumed.run()
    for name in ("A", "B"):
        assert np.array_equal(result.maps[name], whole.maps[name])


def test_a_global_pass_moves_the_poses_a_local_pass_cannot_reach(tiny_set):
    """Against the true map, from the true poses with a third of them turned by 90 degrees: a local
    pass leaves those far off, a global pass (the second pass of the jobs) brings them back."""
    particles = load_particles(tiny_set["particles"])
    truth_poses = load_particles(tiny_set["gt_poses"])
    truth, _ = read_map(tiny_set["gt_map"])
    wrong = np.arange(len(particles)) % 3 == 0
    turn = rotvec_to_matrix(np.array([[0.0, np.pi / 2, 0.0]]))[0]
    errors = {}
    for local in (True, False):
        run = AbinitRun(particles, AbinitSettings(**TINY))
        run.rotations = truth_poses.rotations.copy()
        run.rotations[wrong] = truth_poses.rotations[wrong] @ turn
        run.origins = truth_poses.shifts.copy()
        result = full_pass(run, truth, run.geometry.radius(12.0), local=local, marginalise=True)
        errors[local] = geodesic_distance(result.rotations, truth_poses.rotations)
    assert np.mean(errors[True][wrong] > 30.0) > 0.8, np.median(errors[True][wrong])
    assert np.mean(errors[False][wrong] < 15.0) > 0.8, np.median(errors[False][wrong])
    assert np.median(errors[False][~wrong]) < 10.0


def test_the_second_pass_is_global_no_finer_than_6_A():
    """Pass 1 searches at the SGD's resolution (7 A by default); pass 2 (global) at the resolution pass 1 reached but
    no finer than 6 A, unless the SGD's band is finer; pass 3 (local) at the resolution pass 2 reached."""
    geometry = MapGeometry(256, 1.0, AbinitSettings())
    assert geometry.resolution_A(pass_radius(geometry, 0, None, None)) == pytest.approx(7.0)
    first = geometry.radius(7.0)
    assert geometry.resolution_A(pass_radius(geometry, 1, first, 6.5)) == pytest.approx(6.5)
    assert geometry.resolution_A(pass_radius(geometry, 1, first, 4.0)) == pytest.approx(6.0)
    assert geometry.resolution_A(pass_radius(geometry, 1, first, 9.0)) == pytest.approx(7.0)  # never coarser
    assert geometry.resolution_A(pass_radius(geometry, 2, geometry.radius(6.0), 4.0)) == pytest.approx(4.0)
    fine_sgd = MapGeometry(256, 1.0, AbinitSettings(sgd_resolution_A=5.0))
    assert fine_sgd.resolution_A(pass_radius(fine_sgd, 1, fine_sgd.radius(5.0), 4.0)) == pytest.approx(5.0)
    assert GLOBAL_PASSES == 2
