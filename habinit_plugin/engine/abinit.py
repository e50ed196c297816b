"""SGD ab initio of one map from its particles, then full refinement passes.

:class:`AbinitRun` holds everything one map needs (model grid, running weights,
noise model, poses, random state) and advances one minibatch per :meth:`step`.
Nothing in it refers to any other map: the gold-standard job runs two of them and
only passes 1-D quantities (FSC, resolution) and rigid transforms between them.

Minibatch iteration: global pose search (Hopf grid, coarse to fine) against the
current model at the current resolution; projections at the best poses (top few,
posterior-weighted); backprojected residuals and CTF^2 weights; preconditioned SGD
step; non-negativity and a soft spherical window in real space; noise spectrum
from the residuals.

Final passes: every particle is searched against the SGD model (global search), then
against the previous pass's map (local passes around the best pose at increasing
resolution), and reconstructed directly (Wiener, 2x padding). Two fixed internal
halves of the particles are reconstructed apart; their FSC sets the Wiener prior and
the band of the next pass. In the local passes each particle is inserted at the most probable
poses around its best one, weighted by their posterior probabilities
(marginalisation, as in RELION): at low SNR the best pose alone is noisy enough to
cost resolution.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from .backend import array_module, to_numpy
from .ctf import evaluate_ctf
from .fourier import (
    half_plane_frequencies,
    hermitian_weights,
    image_rfft,
    phase_shift,
    resample_volume,
    sample_spectra,
)
from .fsc import fsc, resolution_at
from .memory import OOMSplitter, StagedSum, chunk_size_for_budget, gpu_memory_limit, particle_bytes, to_device
from .pose_search import (
    ImageBatch,
    LocalSettings,
    NeighbourhoodSettings,
    SearchSettings,
    global_search,
    local_search,
    neighbourhood_search,
)
from .projector import backproject, grid_to_volume, project, slice_coordinates, volume_to_grid
from .reconstruct import Backprojection, regularisation, shell_weight_means, tau2_from_fsc, wiener_map
from .sgd import (
    NoiseModel,
    Schedule,
    apply_constraints,
    centre_of_mass_shift,
    resize_grid,
    sgd_update,
    symmetric_sums,
    translate_grid,
    update_weight_ema,
)
from .so3 import geodesic_distance, grid_spacing


@dataclass
class AbinitSettings:
    """Parameters of one ab initio map; resolutions and lengths in Angstrom.

    The names follow cryoSPARC's ab initio job. ``max_resolution`` None means Nyquist;
    ``sgd_resolution`` is where the SGD phase stops and full passes take over.
    """

    n_initial_iterations: int = 120
    n_final_iterations: int = 60
    initial_resolution: float = 35.0
    max_resolution: float | None = None
    sgd_resolution: float = 10.0
    initial_batch: int = 90
    final_batch: int = 300
    initial_learning_rate: float = 0.4
    learning_rate_iterations: int = 100
    final_learning_rate: float = 0.1
    initial_temperature: float = 4.0
    seed: int = 0
    mask_radius: float | None = None
    max_shift: float | None = None
    min_resolution: float | None = None
    oversampling: int = 2
    beam: int = 8
    marginal_poses: int = 4
    marginal_poses_final: int = 24
    centre_every: int = 10
    n_final_passes: int = 2
    marginalise: bool = True
    preconditioner: bool = True
    scale_invariant_search: bool = True


@dataclass
class IterationLog:
    iteration: int
    resolution: float
    batch: int
    learning_rate: float
    pose_change: float
    energy: float
    seconds: float


class AbinitRun:
    """SGD ab initio state of one map over a fixed set of particles."""

    def __init__(self, particles, settings: AbinitSettings, xp=np, log=None):
        self.particles = particles
        self.settings = settings
        self.xp = xp
        self.log = log or (lambda message: None)
        self.box = particles.box
        self.pixel_size = particles.pixel_size
        self.n = len(particles)
        self.rng = np.random.default_rng(settings.seed)
        self.schedule = Schedule(
            n_initial=settings.n_initial_iterations,
            n_final=settings.n_final_iterations,
            initial_resolution=settings.initial_resolution,
            final_resolution=max(self.sgd_resolution, self.nyquist_resolution),
            initial_batch=settings.initial_batch,
            final_batch=settings.final_batch,
            initial_learning_rate=settings.initial_learning_rate,
            learning_rate_iterations=settings.learning_rate_iterations,
            final_learning_rate=settings.final_learning_rate,
            initial_temperature=settings.initial_temperature,
        )
        self.r_limit = self.box // 2 - 1
        self.freqs = half_plane_frequencies(self.r_limit)
        self.radii = np.hypot(self.freqs[:, 0], self.freqs[:, 1])
        self.rotations = np.tile(np.eye(3), (self.n, 1, 1))
        self.origins = np.zeros((self.n, 2))
        self.seen = np.zeros(self.n, dtype=bool)
        self.iteration = 0
        self.history: list[IterationLog] = []
        self._order = np.empty(0, dtype=np.int64)
        sample = self.rng.choice(self.n, size=min(self.n, 500), replace=False)
        spectra, _ = self._spectra(np.sort(sample), self.r_limit)
        self.noise = NoiseModel.from_spectra(spectra, self.radii[: spectra.shape[1]], self.box // 2 + 1)
        self.grid = None
        self.weight_ema = None

    # ------------------------------------------------------------------ geometry

    @property
    def nyquist_resolution(self) -> float:
        return 2.0 * self.pixel_size * (self.box / 2) / (self.box // 2 - 1)

    @property
    def sgd_resolution(self) -> float:
        target = self.settings.sgd_resolution
        if self.settings.max_resolution is not None:
            target = max(target, self.settings.max_resolution)
        return target

    def radius(self, resolution: float) -> float:
        """Fourier radius (pixels of the box) of a resolution in Angstrom, at most Nyquist - 1."""
        return min(self.box * self.pixel_size / resolution, float(self.r_limit))

    def _working_size(self, radius: float) -> int:
        n_work = min(self.box, 8 * math.ceil((2 * radius + 6) / 8))
        return self.settings.oversampling * n_work

    @property
    def mask_radius_px(self) -> float:
        if self.settings.mask_radius is not None:
            return self.settings.mask_radius / self.pixel_size
        return 0.45 * self.box

    @property
    def max_shift_px(self) -> float:
        if self.settings.max_shift is not None:
            return self.settings.max_shift / self.pixel_size
        return max(2.0, 0.1 * self.box)

    # --------------------------------------------------------------- data access

    def _spectra(self, index, radius: float):
        """Raw half-plane spectra (B, M) of particles ``index`` within ``radius``, and M."""
        xp = self.xp
        m = int(np.searchsorted(self.radii, radius, "right"))
        images = to_device(self.particles.read_images(index), xp)
        spectra = sample_spectra(image_rfft(images), xp.asarray(self.freqs[:m]))
        return spectra, m

    def image_batch(self, index, radius: float) -> ImageBatch:
        xp = self.xp
        spectra, m = self._spectra(index, radius)
        freqs = xp.asarray(self.freqs[:m])
        ctf = evaluate_ctf(self.particles.ctf.subset(index).to(xp), freqs, self.pixel_size, self.box)
        weight = hermitian_weights(freqs) / xp.asarray(self.noise.per_frequency(self.radii[:m]))
        return ImageBatch(spectra, ctf, weight, freqs, self.radii[:m], self.box)

    def _next_batch(self, size: int) -> np.ndarray:
        if len(self._order) < size:
            self._order = np.concatenate([self._order, self.rng.permutation(self.n)])
        batch, self._order = self._order[:size], self._order[size:]
        return np.sort(batch)

    # ------------------------------------------------------------------- search

    def search_settings(self, radius: float) -> SearchSettings:
        """Hopf levels, band and shift grid for a search at ``radius`` Fourier pixels."""
        target = math.degrees(1.0 / max(radius, 1.0))
        final_level = int(np.clip(math.ceil(math.log2(60.0 / target)), 2, 6))
        coarse_radius = min(radius, max(6.0, 0.6 * radius))
        step = float(np.clip(self.box / (4.0 * coarse_radius), 1.0, self.max_shift_px / 2))
        return SearchSettings(
            coarse_level=2,
            final_level=final_level,
            beam=self.settings.beam,
            max_shift=self.max_shift_px,
            coarse_shift_step=step,
            coarse_radius=coarse_radius,
            final_radius=radius,
            min_radius=self._min_radius(),
            scale_invariant=self.settings.scale_invariant_search,
        )

    def _min_radius(self) -> float:
        if self.settings.min_resolution is None:
            return 0.0
        return self.box * self.pixel_size / self.settings.min_resolution

    # ------------------------------------------------------------------ the model

    def initial_model(self, radius: float) -> None:
        """Wiener reconstruction of a few hundred particles at random poses, low-passed.

        Random poses make it a smooth, roughly spherical blob with the data's scale;
        the seed makes every map start from its own random volume.
        """
        xp = self.xp
        index = self._next_batch(min(self.n, 300))
        self._order = np.concatenate([self._order, index])
        batch = self.image_batch(index, radius)
        size = self._working_size(radius)
        rotations = self.rng.standard_normal((len(index), 4))
        from .so3 import quaternion_to_matrix  # noqa: PLC0415

        rotations = quaternion_to_matrix(rotations)
        data = xp.zeros((size,) * 3, dtype=xp.complex64)
        weight = xp.zeros((size,) * 3, dtype=xp.float32)
        coords = slice_coordinates(xp.asarray(rotations), batch.freqs)
        inv = batch.noise_weight / xp.asarray(hermitian_weights(batch.freqs))
        backproject(batch.ctf * batch.spectra * inv, coords, size, self.settings.oversampling, out=data)
        backproject(batch.ctf**2 * inv, coords, size, self.settings.oversampling, out=weight)
        data, weight = symmetric_sums(data, weight)
        scale = self.n / len(index)
        self.weight_ema = weight * scale
        floor = 0.1 * xp.mean(weight[weight > 0]) * scale
        grid = data * scale / (self.weight_ema + floor)
        self.grid = apply_constraints(
            grid.astype(xp.complex64),
            self.settings.oversampling,
            self.mask_radius_px * size / (2 * self.box) * 2 / self.settings.oversampling,
            radius,
        )

    def _ensure_size(self, radius: float) -> None:
        size = self._working_size(radius)
        if self.grid is None:
            self.initial_model(radius)
        elif self.grid.shape[0] != size:
            self.grid = resize_grid(self.grid, size)
            self.weight_ema = resize_grid(self.weight_ema, size)

    def _window_radius(self) -> float:
        """Mask radius in voxels of the current working box (grid size / oversampling)."""
        n_work = self.grid.shape[0] // self.settings.oversampling
        return self.mask_radius_px * n_work / self.box

    # --------------------------------------------------------------- one SGD step

    def step(self) -> IterationLog:
        """One minibatch: search, gradient, preconditioned update, constraints."""
        t0 = time.time()
        xp, s, t = self.xp, self.settings, self.iteration
        radius = self.radius(self.schedule.resolution(t))
        self._ensure_size(radius)
        index = self._next_batch(min(self.schedule.batch_size(t), self.n))
        batch = self.image_batch(index, radius)
        result = global_search(self.grid, s.oversampling, batch, self.search_settings(radius))
        k = max(1, min(s.marginal_poses, result.rotations.shape[1]))
        weights = result.weights(self.schedule.temperature(t))[:, :k]
        weights = weights / weights.sum(axis=1, keepdims=True)
        gradient, weight, residual = self._gradient(batch, result.rotations[:, :k], result.origins[:, :k], weights)
        scale = self.n / len(index)
        if s.preconditioner:
            self.weight_ema = update_weight_ema(self.weight_ema, weight * scale, decay=0.9)
            precond = self.weight_ema
        else:
            precond = xp.full_like(self.weight_ema, float(xp.mean(self.weight_ema[self.weight_ema > 0])))
        inv_tau2 = self._inv_tau2(precond)
        lr = self.schedule.learning_rate(t)
        grid = sgd_update(self.grid, gradient * scale, precond, inv_tau2, lr)
        self.grid = apply_constraints(grid.astype(xp.complex64), s.oversampling, self._window_radius(), radius)
        if s.centre_every and t < self.schedule.n_initial and (t + 1) % s.centre_every == 0:
            self.grid = translate_grid(self.grid, -centre_of_mass_shift(self.grid))
        self.noise.update(residual, batch.radii)
        change = self._record_poses(index, result.rotations[:, 0], result.origins[:, 0])
        self.iteration += 1
        entry = IterationLog(
            t,
            self.schedule.resolution(t),
            len(index),
            lr,
            change,
            float(np.mean(result.energies[:, 1:2])) if result.energies.shape[1] > 1 else 0.0,
            time.time() - t0,
        )
        self.history.append(entry)
        return entry

    def _gradient(self, batch: ImageBatch, rotations, origins, weights):
        """Backprojected weighted residuals and CTF^2 weights of the kept poses.

        rotations (B, K, 3, 3), origins (B, K, 2), weights (B, K). Returns the Hermitian
        gradient and weight grids and the residual spectra (B, M) of the best poses.
        """
        xp = self.xp
        size, p = self.grid.shape[0], self.settings.oversampling
        inv_noise = batch.noise_weight / hermitian_weights(batch.freqs)
        data = xp.zeros((size,) * 3, dtype=xp.complex64)
        weight = xp.zeros((size,) * 3, dtype=xp.float32)
        best_residual = None
        for k in range(rotations.shape[1]):
            coords = slice_coordinates(xp.asarray(rotations[:, k]), batch.freqs)
            proj = project(self.grid, coords, p)
            centred = batch.spectra * phase_shift(batch.freqs, xp.asarray(origins[:, k]), batch.box)
            residual = centred - batch.ctf * proj
            w = xp.asarray(weights[:, k], dtype=xp.float32)[:, None]
            backproject((w * batch.ctf * inv_noise * residual).astype(xp.complex64), coords, size, p, out=data)
            backproject((w * batch.ctf**2 * inv_noise).astype(xp.float32), coords, size, p, out=weight)
            if k == 0:
                best_residual = residual
        data, weight = symmetric_sums(data, weight)
        return data, weight, best_residual

    def _inv_tau2(self, weight):
        """Weak prior for the SGD phase: 1/tau2 = 5% of the mean weight of each shell."""
        p = self.settings.oversampling
        n_shells = self.grid.shape[0] // (2 * p) + 1
        mean_w = shell_weight_means(weight, p, n_shells)
        tau2 = 1.0 / (0.05 * self.xp.maximum(mean_w, 1e-30))
        return regularisation(weight, p, tau2)

    def _record_poses(self, index, rotations, origins) -> float:
        """Store the best poses; return the median change (degrees) for particles seen before."""
        before = self.seen[index]
        change = geodesic_distance(self.rotations[index][before], rotations[before]) if before.any() else []
        self.rotations[index] = rotations
        self.origins[index] = origins
        self.seen[index] = True
        return float(np.median(change)) if len(change) else float("nan")

    # -------------------------------------------------------------------- outputs

    def model_map(self) -> np.ndarray:
        """The current model as a real-space map at the full box (host float32)."""
        p = self.settings.oversampling
        n_work = self.grid.shape[0] // p
        plain = grid_to_volume(self.grid, n_work, gridding_correction=False)
        from .projector import _gridding_profile  # noqa: PLC0415

        # the grid holds Fourier sums over the full box: an inverse FFT over the working box
        # scales densities by (box / n_work)^3
        volume = plain * _gridding_profile(n_work, self.grid.shape[0], self.xp) * (n_work / self.box) ** 3
        return to_numpy(resample_volume(volume, self.box))

    def run_sgd(self, report_every: int = 10, on_iteration=None) -> None:
        total, start, t0 = self.schedule.n_iterations, self.iteration, time.time()
        while self.iteration < total:
            entry = self.step()
            if on_iteration is not None:
                on_iteration(self, entry)
            if entry.iteration % report_every == 0 or self.iteration == total:
                left = (time.time() - t0) / (self.iteration - start) * (total - self.iteration)
                self.log(f"{_format_log(entry, total)}, {left / 60:.1f} min left in the SGD phase")

    def settings_dict(self) -> dict:
        return asdict(self.settings)

    # ---------------------------------------------------------------- checkpoints

    def get_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Everything needed to resume: host arrays (saved as .npz) and JSON-safe values."""
        arrays = {
            "rotations": self.rotations,
            "origins": self.origins,
            "seen": self.seen,
            "order": self._order,
            "noise_sigma2": self.noise.sigma2,
        }
        if self.grid is not None:
            arrays["grid"] = to_numpy(self.grid)
            arrays["weight_ema"] = to_numpy(self.weight_ema)
        meta = {
            "iteration": self.iteration,
            "rng": self.rng.bit_generator.state,
            "history": [asdict(h) for h in self.history],
        }
        return arrays, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Restore a state written by :meth:`get_state`."""
        xp = self.xp
        self.rotations = np.array(arrays["rotations"])
        self.origins = np.array(arrays["origins"])
        self.seen = np.array(arrays["seen"])
        self._order = np.array(arrays["order"])
        self.noise.sigma2 = np.array(arrays["noise_sigma2"])
        if "grid" in arrays:
            self.grid = xp.asarray(arrays["grid"])
            self.weight_ema = xp.asarray(arrays["weight_ema"])
        self.iteration = int(meta["iteration"])
        self.rng.bit_generator.state = meta["rng"]
        self.history = [IterationLog(**h) for h in meta["history"]]


def pose_change_text(degrees: float) -> str:
    """Median pose change (degrees) for the log: "n/a" while no particle of the minibatch was seen before."""
    return "n/a" if math.isnan(degrees) else f"{degrees:.1f}"


def _format_log(entry: IterationLog, total: int) -> str:
    change = f"{pose_change_text(entry.pose_change):>5}"
    return (
        f"iter {entry.iteration + 1:4d}/{total} res {entry.resolution:5.1f} A batch {entry.batch:4d} "
        f"lr {entry.learning_rate:.2f} pose change {change} deg  {entry.seconds:.2f} s"
    )


# ------------------------------------------------------------------ final passes


@dataclass
class PassResult:
    """Poses of every particle and the maps of one full pass.

    volume: the map of all particles (the reference of the next pass); fsc: the FSC
    between the internal halves; resolution: where it crosses 0.143.
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
    run: AbinitRun,
    references,
    radius: float,
    local: bool,
    chunk: int = 500,
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
    band (Fourier pixels). Global search when
    ``local`` is False, else a local search around the run's current poses. In a local
    pass with ``settings.marginalise`` every particle is inserted at the most probable poses of a
    neighbourhood of its best pose, weighted by their posterior probabilities. The
    reconstruction uses all frequencies up to Nyquist.
    """
    xp, s = run.xp, run.settings
    if not isinstance(references, (list, tuple)):
        references = (references, references)
    distinct = references[:1] if references[0] is references[1] else references
    grids = [volume_to_grid(xp.asarray(v), s.oversampling) for v in distinct]  # internal half h: grids[h % len]
    halves = internal_halves(run)
    marginalise = local and s.marginalise
    sums = [Backprojection.zeros(run.box, s.oversampling, xp) for _ in range(2)]
    arrays = [a for bp in sums for a in (bp.data, bp.weight)]
    limit = gpu_memory_limit(xp)
    if limit:  # the sums, their scratch copies and the references stay on the device
        fixed = 2 * sum(a.nbytes for a in arrays) + sum(g.nbytes for g in grids)
        chunk = chunk_size_for_budget(particle_bytes(run.box), limit, fixed, max_size=chunk, fraction=0.8)
    rotations = np.empty((run.n, 3, 3))
    origins = np.empty((run.n, 2))

    def add(index, targets):  # targets: [data 0, weight 0, data 1, weight 1], the sums or their scratch
        batch = run.image_batch(index, run.r_limit)
        for h in (0, 1):
            rows = np.flatnonzero(halves[index] == h)
            if len(rows) == 0:
                continue
            mine = _rows(batch, rows)
            reference = grids[h % len(grids)]
            result = _search_chunk(run, reference, _truncate(mine, radius), index[rows], radius, local, marginalise)
            rotations[index[rows]] = result.rotations[:, 0]
            origins[index[rows]] = result.origins[:, 0]
            target = Backprojection(targets[2 * h], targets[2 * h + 1], run.box, s.oversampling)
            _insert(target, mine, result, marginalise)

    with StagedSum(arrays, splitter=OOMSplitter(log=run.log, xp=xp)) as staged:
        for start in range(0, run.n, chunk):
            staged.run(add, np.arange(start, min(start + chunk, run.n)))
    run.rotations, run.origins = rotations, origins
    run.seen[:] = True
    grids.clear()  # free the device memory of the references before the maps' FFTs
    return _pass_maps(run, sums, rotations, origins)


def _insert(target: Backprojection, batch: ImageBatch, result, marginalise: bool) -> None:
    """Backproject a batch at its best pose, or at its kept poses with posterior weights."""
    xp = array_module(batch.spectra)
    weights = result.weights(1.0) if marginalise else np.ones((len(result.rotations), 1))
    for k in range(weights.shape[1]):
        rows = np.flatnonzero(weights[:, k] > 1e-3)
        if len(rows) == 0:
            continue
        r = xp.asarray(rows)
        centred = batch.spectra[r] * phase_shift(batch.freqs, xp.asarray(result.origins[rows, k]), batch.box)
        w = xp.asarray(weights[rows, k], dtype=xp.float32)[:, None]
        target.insert(centred, batch.ctf[r], result.rotations[rows, k], batch.freqs, inv_noise=w)


def _pass_maps(run: AbinitRun, sums, rotations, origins) -> PassResult:
    """The internal halves' FSC, and the map of all particles regularised by 2F / (1 + F)."""
    p = run.settings.oversampling
    curve = fsc(wiener_map(sums[0]), wiener_map(sums[1]))
    total = Backprojection(sums[0].data + sums[1].data, sums[0].weight + sums[1].weight, run.box, p)
    _, weight = total.symmetric()
    volume = to_numpy(wiener_map(total, tau2_from_fsc(2 * curve / (1 + np.abs(curve)), weight, p)))
    resolution = resolution_at(curve, 0.143, run.pixel_size)
    return PassResult(rotations, origins, volume, resolution, curve)


def _search_chunk(
    run: AbinitRun, reference, batch: ImageBatch, index, radius: float, local: bool, marginalise: bool = False
):
    """Poses of particles ``index``: local search around their current poses, or global;
    with ``marginalise``, then the most probable poses of a neighbourhood of the best."""
    s = run.settings
    if not local:
        result = global_search(reference, s.oversampling, batch, run.search_settings(radius))
    else:
        settings = LocalSettings(
            angle_step=2.0 * grid_spacing(run.search_settings(radius).final_level),
            shift_step=1.0,
            n_levels=4,
            radius=radius,
            min_radius=run._min_radius(),
            max_shift=run.max_shift_px,
        )
        result = local_search(reference, s.oversampling, batch, run.rotations[index], run.origins[index], settings)
    if not marginalise:
        return result
    best_r, best_o = result.rotations[:, 0], result.origins[:, 0]
    return neighbourhood_search(reference, s.oversampling, batch, best_r, best_o, _posterior(run, radius))


def _posterior(run: AbinitRun, radius: float) -> NeighbourhoodSettings:
    """Neighbourhood for marginalisation: the finest search grid's step, 2.2 steps in every
    direction (33 rotations, about +-4 degrees at 5 A), times half-pixel shifts, 24 poses kept.

    At SNR 0.05 a narrower one (half the step, 12 poses) kept only a third of the gain.
    """
    step = grid_spacing(run.search_settings(radius).final_level)
    return NeighbourhoodSettings(
        angle_step=step,
        angle_radius=2.2 * step,
        shift_step=0.5,
        shift_radius=0.8,
        keep=run.settings.marginal_poses_final,
        radius=radius,
        min_radius=run._min_radius(),
        max_shift=run.max_shift_px,
    )


def _rows(batch: ImageBatch, rows) -> ImageBatch:
    """The images ``rows`` (host indices) of a batch."""
    r = array_module(batch.spectra).asarray(rows)
    return ImageBatch(batch.spectra[r], batch.ctf[r], batch.noise_weight, batch.freqs, batch.radii, batch.box)


def _truncate(batch: ImageBatch, radius: float) -> ImageBatch:
    m = int(np.searchsorted(batch.radii, radius, "right"))
    return ImageBatch(
        batch.spectra[:, :m], batch.ctf[:, :m], batch.noise_weight[:m], batch.freqs[:m], batch.radii[:m], batch.box
    )


def next_radius(run: AbinitRun, radius: float, resolution: float) -> float:
    """Search band (Fourier pixels) of the next local pass: the resolution of the internal
    halves' FSC (0.143), never below the current band nor above the maximum resolution.

    Searching 15% beyond it made the marginalised map worse at SNR 0.05 (4.68 -> 5.01 A
    over one more pass), as the posterior sharpens on frequencies the reference lacks.
    """
    s = run.settings
    max_radius = run.radius(s.max_resolution) if s.max_resolution else float(run.r_limit)
    return min(max_radius, max(radius, run.box * run.pixel_size / resolution))


def refine_passes(run: AbinitRun, log=None) -> PassResult:
    """Final passes: one global search at the SGD resolution, then local passes at the
    resolution of the internal halves' FSC, up to the maximum resolution."""
    log = log or run.log
    s = run.settings
    radius = run.radius(run.sgd_resolution)
    references = run.model_map()
    result = None
    for n in range(max(1, s.n_final_passes)):
        t0 = time.time()
        result = full_pass(run, references, radius, local=n > 0)
        references = result.volume
        log(
            f"pass {n + 1}/{s.n_final_passes} ({'local' if n else 'global'} search at "
            f"{run.box * run.pixel_size / radius:.1f} A): internal-halves FSC 0.143 at {result.resolution:.2f} A, "
            f"{time.time() - t0:.1f} s"
        )
        radius = next_radius(run, radius, result.resolution)
    return result
