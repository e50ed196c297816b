"""Full passes: internal halves searched against their own references, marginalised
insertion, and resuming between passes."""

from __future__ import annotations

import numpy as np

from fixtures import TINY
from habinit_plugin.engine.abinit import AbinitRun, run_sgd
from habinit_plugin.engine.fourier import half_plane_frequencies, hermitian_weights
from habinit_plugin.engine.gold_standard import GoldStandardJob
from habinit_plugin.engine.minibatch import ImageBatch
from habinit_plugin.engine.particles import load_particles
from habinit_plugin.engine.passes import _insert, full_pass, internal_halves
from habinit_plugin.engine.pose_search import SearchResult
from habinit_plugin.engine.reconstruct import Backprojection
from habinit_plugin.engine.settings import AbinitSettings, JobSettings
from habinit_plugin.engine.sgd import NoiseModel
from habinit_plugin.engine.so3 import random_rotations


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
