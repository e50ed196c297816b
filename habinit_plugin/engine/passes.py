"""Full passes after the SGD phase, for one map or two half maps.

Every particle is searched over all poses against the SGD model (global search at the
SGD's resolution), then over all poses again against the first pass's map at the band it
reached (no finer than 6 A), then (passes 3 on) around its best pose
against the previous pass's map (local search at increasing resolution), and
reconstructed directly (Wiener, 2x padding). Two fixed internal halves of each map's
particles are reconstructed apart; their FSC sets the Wiener prior and the band of the
next pass. From the second pass on each particle is inserted at the most probable poses
around its best one, weighted by their posterior probabilities (marginalisation, as in
RELION): at low SNR the best pose alone is noisy enough to cost resolution.

The second global search is RELION's and cryoSPARC's practice (exhaustive searches until
the map is good): at 10 A, searched against the true map, 12% of the PR LBD's images at SNR
0.05 (box 64, 1.5 A/px) took a pose more than 45 deg wrong (6% since the coarse level scores
a wider band, :func:`.search_policy.global_settings`), and a local search never moves them;
at 6 A 3%. With it the half maps came from 4.76 / 6.01 A to 4.59 / 4.58 A vs the truth (known
poses 4.11 / 4.19 A), and more local passes did not do that (6.61 / 6.39 A after four). More
global passes did not help either: with noise as ice gives, the passes settle on a map that
agrees with itself (3 global passes 6.91 / 6.80 A, 6 passes 7.32 / 7.28 A, against 7.04 /
6.91 A with 2, after a 10 A SGD); a longer SGD (7 A) did (6.17 / 6.03 A).

:func:`run_passes` is the loop both jobs use; a map reads nothing of another map.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import stop
from .abinit import AbinitRun
from .backend import array_module, to_numpy
from .fourier import phase_shift
from .fsc import fsc, resolution_at
from .geometry import MapGeometry
from .gpu_budget import chunk_size_for_budget, particle_bytes
from .minibatch import ImageBatch
from .oom import OOMSplitter, StagedSum
from .particle_fit import ParticleFit, fit_best_pose, normalised_scales, score_band_start, shell_counts
from .pose_search import global_search, local_search, neighbourhood_search
from .projector import volume_to_grid
from .reconstruct import Backprojection, tau2_from_fsc, wiener_map
from .search_policy import global_settings, local_settings, posterior_settings
from .sgd import NoiseModel
from .symmetry import is_trivial

log = logging.getLogger("habinit")

GLOBAL_PASSES = 2  # passes searching every pose; the next search around each particle's best
GLOBAL_FINEST_A = 6.0  # a global pass after the first searches no finer (unless the SGD's band is finer)
PASS_CHUNK = 500  # particles searched and inserted at a time (fewer where the GPU budget needs it)


@dataclass
class PassResult:
    """Poses of every particle and the maps of one full pass.

    volume: the map of all particles (the reference of the next pass); fsc: the FSC
    between the internal halves; resolution: where it crosses 0.143 (A).
    """

    rotations: np.ndarray
    origins: np.ndarray
    volume: np.ndarray
    resolution: float
    fsc: np.ndarray


def internal_halves(run: AbinitRun) -> np.ndarray:
    """Fixed split (n,) of the run's particles into internal halves 0 and 1 (from the seed)."""
    return np.random.default_rng([run.settings.seed, 2]).permutation(run.n) % 2


def full_pass(
    run: AbinitRun, references, radius: float, local: bool, marginalise: bool = True, chunk: int = PASS_CHUNK
) -> PassResult:
    """Search every particle against the reference and reconstruct the internal halves.

    references: one full-box map (host) for every particle, or two, one per internal half
    (:func:`internal_halves`). The jobs pass one: the SGD model, then the map of all
    particles of the previous pass. The FSC between the internal halves sets the Wiener
    prior of the map and the band of the next pass. Searching each internal half against
    its own half map kept that FSC honest but, at SNR 0.05 with 2,500 particles, left the
    map 3-7 % worse than searching against the map of all of them (5.60 / 5.94 A against
    5.43 / 5.55 A vs truth; the internal FSC 0.143 stayed 8-10 % finer than the map's FSC
    0.5 vs truth either way), as every reference holds half the particles. radius: search
    band (Fourier pixels). Global search when ``local`` is False, else a local search
    around the run's current poses. With ``marginalise`` and ``settings.marginalise`` every
    particle is inserted at the most probable poses of a neighbourhood of its best pose,
    weighted by their posterior probabilities. The reconstruction uses all frequencies up
    to Nyquist. Sets the run's poses to the best ones found.
    """
    xp, s, box = run.xp, run.settings, run.geometry.box
    if not isinstance(references, (list, tuple)):
        references = (references, references)
    distinct = references[:1] if references[0] is references[1] else references
    grids = [volume_to_grid(xp.asarray(v), s.oversampling) for v in distinct]  # internal half h: grids[h % len]
    halves = internal_halves(run)
    marginalise = s.marginalise and marginalise
    sums = [Backprojection.zeros(box, s.oversampling, xp, s.symmetry) for _ in range(2)]
    arrays = [a for bp in sums for a in (bp.data, bp.weight)]
    if run.memory_limit_bytes:  # the sums, their scratch copies and the references stay on the device
        fixed = 2 * sum(a.nbytes for a in arrays) + sum(g.nbytes for g in grids)
        chunk = chunk_size_for_budget(particle_bytes(box), run.memory_limit_bytes, fixed, max_size=chunk, fraction=0.8)
    rotations = np.empty((run.n, 3, 3))
    origins = np.empty((run.n, 2))
    fits = PassFits.empty(run.n, box // 2 + 1)

    def add(index, targets):  # targets: [data 0, weight 0, data 1, weight 1], the sums or their scratch
        batch = run.image_batch(index, run.geometry.r_limit)
        for h in (0, 1):
            rows = np.flatnonzero(halves[index] == h)
            if len(rows) == 0:
                continue
            mine = batch.rows(rows)
            scaled = mine.scaled(run.scale[index[rows]])  # the previous pass's scales (1 after the SGD)
            reference = grids[h % len(grids)]
            result = _search(run, reference, scaled.within(radius), index[rows], radius, local, marginalise)
            rotations[index[rows]] = result.rotations[:, 0]
            origins[index[rows]] = result.origins[:, 0]
            poses = rotations[index[rows]], origins[index[rows]]
            fit = fit_best_pose(reference, s.oversampling, mine, *poses, radius, score_band_start(run.geometry, radius))
            fits.record(index[rows], fit, result.weights(1.0)[:, 0] if marginalise else np.ones(len(rows)))
            target = Backprojection(targets[2 * h], targets[2 * h + 1], box, s.oversampling)
            _insert(target, scaled, result, marginalise)

    with StagedSum(arrays, splitter=OOMSplitter(xp=xp)) as staged:
        for start in range(0, run.n, chunk):
            stop.check("a full pass (abandoned: the checkpoint before it stands)")
            staged.run(add, np.arange(start, min(start + chunk, run.n)))
    run.rotations, run.origins = rotations, origins
    run.seen[:] = True
    fits.apply_to(run)
    grids.clear()  # free the device memory of the references before the maps' FFTs
    return _pass_maps(run, sums, rotations, origins)


@dataclass
class PassFits:
    """What a pass measures of every particle at its best pose (host arrays, (n,) or (n, n_shells))."""

    scale: np.ndarray
    score: np.ndarray
    max_probability: np.ndarray
    residual_power: np.ndarray

    @classmethod
    def empty(cls, n: int, n_shells: int) -> PassFits:
        return cls(np.ones(n), np.zeros(n), np.ones(n), np.zeros((n, n_shells)))

    def record(self, index, fit: ParticleFit, max_probability) -> None:
        """Particles ``index``' fits (assigned, not added: a piece retried after running out of memory
        records the same values again)."""
        self.scale[index], self.score[index], self.residual_power[index] = fit.scale, fit.score, fit.residual_power
        self.max_probability[index] = max_probability

    def apply_to(self, run: AbinitRun) -> None:
        """The run's scales (median 1), scores and noise model from now on: the noise power of the
        residuals at every shell up to Nyquist, whitening the next pass's search and reconstruction."""
        run.scale = normalised_scales(self.scale)
        run.score, run.max_probability = self.score, self.max_probability
        counts = shell_counts(run.radii, self.residual_power.shape[1])
        run.noise = NoiseModel.from_residual_power(self.residual_power.sum(axis=0), counts * len(self.scale))


def _insert(target: Backprojection, batch: ImageBatch, result, marginalise: bool) -> None:
    """Backproject a batch at its best pose, or at its kept poses with posterior weights, whitened by the
    noise model (1 / noise variance per frequency)."""
    xp = array_module(batch.spectra)
    weights = result.weights(1.0) if marginalise else np.ones((len(result.rotations), 1))
    for k in range(weights.shape[1]):
        rows = np.flatnonzero(weights[:, k] > 1e-3)
        if len(rows) == 0:
            continue
        r = xp.asarray(rows)
        centred = batch.spectra[r] * phase_shift(batch.freqs, xp.asarray(result.origins[rows, k]), batch.box)
        w = xp.asarray(weights[rows, k], dtype=xp.float32)[:, None] * batch.inverse_noise
        target.insert(centred, batch.ctf[r], result.rotations[rows, k], batch.freqs, inv_noise=w)


def _pass_maps(run: AbinitRun, sums, rotations, origins) -> PassResult:
    """The internal halves' FSC, and the map of all particles regularised by 2F / (1 + F)."""
    p = run.settings.oversampling
    if not is_trivial(run.settings.symmetry):  # the group's copies once, not for every map made from the sums
        sums = [bp.completed() for bp in sums]
    curve = fsc(wiener_map(sums[0]), wiener_map(sums[1]))
    total = sums[0] + sums[1]
    _, weight = total.symmetric()
    volume = to_numpy(wiener_map(total, tau2_from_fsc(2 * curve / (1 + np.abs(curve)), weight, p)))
    resolution = resolution_at(curve, 0.143, run.geometry.pixel_size_A)
    return PassResult(rotations, origins, volume, resolution, curve)


def _search(run: AbinitRun, reference, batch: ImageBatch, index, radius: float, local: bool, marginalise: bool):
    """Poses of particles ``index``: local search around their current poses, or global;
    with ``marginalise``, then the most probable poses of a neighbourhood of the best."""
    p, g, device_bytes = run.settings.oversampling, run.geometry, run.device_bytes
    if not local:
        result = global_search(reference, p, batch, global_settings(g, radius, device_bytes))
    else:
        settings = local_settings(g, radius, device_bytes)
        result = local_search(reference, p, batch, run.rotations[index], run.origins[index], settings)
    if not marginalise:
        return result
    best_r, best_o = result.rotations[:, 0], result.origins[:, 0]
    return neighbourhood_search(reference, p, batch, best_r, best_o, posterior_settings(g, radius, device_bytes))


def next_radius(geometry: MapGeometry, radius: float, resolution: float) -> float:
    """Search band (Fourier pixels) of the next pass: the resolution of the internal
    halves' FSC (0.143), never below the current band nor above the maximum resolution.

    Searching 15% beyond it made the marginalised map worse at SNR 0.05 (4.68 -> 5.01 A
    over one more pass), as the posterior sharpens on frequencies the reference lacks.
    """
    return min(geometry.max_radius, max(radius, geometry.radius(resolution)))


def pass_radius(geometry: MapGeometry, n: int, band: float | None, resolution: float | None) -> float:
    """Search band (Fourier pixels) of pass ``n`` (from 0), after a pass that searched ``band`` and reached
    ``resolution`` (A): the SGD's resolution for the first; then :func:`next_radius`, for a global pass no finer
    than ``GLOBAL_FINEST_A`` or, where that is finer, the SGD's resolution.

    A global search's cost grows with its band, and its gain is the particles it moves far: against the true
    map at SNR 0.05, 3% of the PR LBD's images are more than 45 deg wrong at 6 A and 1.3% at 4 A. At box 256
    (10,000 images, 1 A/px) the first pass reached 4.0 A: a global search at 4 A would have taken about an hour
    on 2 cores.
    """
    if n == 0:
        return geometry.radius(geometry.sgd_resolution_A)
    radius = next_radius(geometry, band, resolution)
    if n < GLOBAL_PASSES:
        radius = min(radius, geometry.radius(min(GLOBAL_FINEST_A, geometry.sgd_resolution_A)))
    return radius


def run_passes(
    runs: dict[str, AbinitRun],
    volumes: dict[str, np.ndarray],
    state: dict,
    after_pass: Callable[[int], None] | None = None,
    until: int | None = None,
) -> None:
    """The full passes of every map in ``runs``, from pass ``state["pass"]`` on.

    Pass 0 is a global search against each map's SGD model at the SGD resolution; the
    next search against the map of the previous pass (``volumes[name]``, set here) in the
    band of :func:`pass_radius`, over all poses up to pass ``GLOBAL_PASSES`` - 1, then
    locally, and marginalise. ``state`` (JSON-safe, checkpointed by the
    caller) keeps the pass count, each map's band and internal-halves resolution, and
    the time per pass. ``after_pass(n)`` runs once every map has done pass n and the
    count has moved on. ``until`` stops after that many passes (for tests).
    """
    n_passes = next(iter(runs.values())).settings.n_final_passes
    bands, resolutions = state.setdefault("pass_radius", {}), state.setdefault("pass_resolution", {})
    timings = state.setdefault("timings", {})
    while state["pass"] < min(n_passes, until or n_passes):
        n = state["pass"]
        for name, run in runs.items():
            t0 = time.time()
            run.use_full_box()  # the SGD's model and noise model, from its real-space crop to the input box
            radius = pass_radius(run.geometry, n, bands.get(name), resolutions.get(name))
            reference = volumes[name] if n > 0 else run.model_map()
            local = n >= GLOBAL_PASSES
            result = full_pass(run, reference, radius, local=local, marginalise=n > 0)
            volumes[name], bands[name], resolutions[name] = result.volume, radius, result.resolution
            seconds = time.time() - t0
            timings[f"pass {n + 1}"] = timings.get(f"pass {n + 1}", 0.0) + seconds
            log.info(
                f"pass {n + 1}/{n_passes} ({name}, {'local' if local else 'global'} search at "
                f"{run.geometry.resolution_A(radius):.1f} A): internal-halves FSC 0.143 at "
                f"{result.resolution:.2f} A, {seconds:.1f} s"
            )
        state["pass"] = n + 1
        if after_pass is not None:
            after_pass(n)
