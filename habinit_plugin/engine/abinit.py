"""SGD ab initio of one map: the model, the minibatch order, one step, the state.

:class:`AbinitRun` holds everything one map needs (model grid, running weights,
noise model, poses, random state) and advances one minibatch per :meth:`step`.
Nothing in it refers to any other map: the gold-standard job runs two of them and
only passes 1-D quantities (FSC, resolution) and rigid transforms between them.
:func:`run_sgd` is the SGD phase of one or more maps, with the time-left log.

Minibatch iteration: global pose search (Hopf grid, coarse to fine) against the
current model at the current resolution; projections at the best poses (top few,
posterior-weighted); backprojected residuals and CTF^2 weights; preconditioned SGD
step; non-negativity and a soft spherical window in real space; noise spectrum
from the residuals. The full passes that follow are in :mod:`.passes`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import stop
from .backend import to_numpy
from .fourier import half_plane_frequencies, hermitian_weights, pad_volume, resample_volume
from .geometry import MapGeometry
from .gpu_budget import candidate_bytes
from .minibatch import ImageBatch, image_batch, image_spectra
from .particle_fit import fit_best_pose, normalised_scales, score_band_start
from .particle_set import CroppedParticles
from .particle_size import particle_r50_px
from .particle_size import sample_rows as particle_size_sample
from .pose_search import global_search
from .projector import backproject, grid_to_volume, gridding_profile, slice_coordinates, volume_to_grid
from .reconstruct import regularisation
from .search_policy import global_settings
from .settings import AbinitSettings, option_name
from .sgd import (
    NoiseModel,
    Schedule,
    apply_constraints,
    centre_of_mass_shift,
    minibatch_gradient,
    resize_grid,
    sgd_update,
    symmetric_sums,
    translate_grid,
    update_weight_ema,
    weak_prior_tau2,
)
from .so3 import quaternion_to_matrix
from .symmetry import (
    allowed_centring,
    canonical_poses,
    distance_modulo,
    group_order,
    rotate_grid,
    symmetrise_grid,
)
from .symmetry_search import find_symmetry_axes

log = logging.getLogger("habinit")

NOISE_SAMPLE = 500  # images of the first noise estimate


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
    """SGD ab initio state of one map over a fixed set of particles.

    memory_limit_bytes: the GPU memory budget (None: no limit, or the CPU) that chunk
    sizes are chosen from.
    """

    def __init__(self, particles, settings: AbinitSettings, xp=np, memory_limit_bytes: int | None = None):
        self.input_particles = particles  # the particles at the input box (the SGD may crop them: particles)
        self.symmetry = settings.symmetry  # the point group the map ends with
        # Imposed from a random start, a symmetric SGD locks into a wrong symmetric shape (an O shell: 3/3
        # seeds, 65 A from the truth); from a C1 start of a quarter of the initial iterations it converges.
        self.symmetry_from_iteration = max(1, round(settings.c1_fraction * settings.n_initial_iterations))
        if settings.c1_fraction > 0:
            settings = replace(settings, symmetry="C1")
        self.settings = settings
        self.xp = xp
        self.memory_limit_bytes = memory_limit_bytes
        self.n = len(particles)
        g = MapGeometry(particles.box, particles.pixel_size, settings, self._measured_r50_px())
        if g.particle_r50_px is not None:
            log.info(
                f"particle size: half the signal variance within {g.particle_r50_px * g.pixel_size_A:.0f} A of the "
                f"centre; SGD window radius {g.mask_radius_px * g.pixel_size_A:.0f} A "
                f"({option_name('mask_radius_A')} sets it)"
            )
        self.rng = np.random.default_rng(settings.seed)
        self.schedule = Schedule(settings, max(g.sgd_resolution_A, g.nyquist_resolution_A))
        self._use_geometry(g.cropped(g.crop_box))
        if self.cropped:
            px = g.pixel_size_A
            log.info(
                f"SGD on images cropped in real space to {g.crop_box} px ({g.crop_box * px:.0f} A: the window of "
                f"{g.mask_radius_px * px:.0f} A moved by up to {g.max_shift_px * px:.0f} A); full passes at the "
                f"input box of {particles.box} px"
            )
        self.rotations = np.tile(np.eye(3), (self.n, 1, 1))
        self.origins = np.zeros((self.n, 2))
        self.seen = np.zeros(self.n, dtype=bool)
        # measured by the full passes (particle_fit): signal scale (median 1), score, largest posterior weight
        self.scale = np.ones(self.n)
        self.score = np.full(self.n, np.nan)
        self.max_probability = np.full(self.n, np.nan)
        self.iteration = 0
        self.history: list[IterationLog] = []
        self._order = np.empty(0, dtype=np.int64)
        self.noise: NoiseModel | None = None  # first estimated at the first step (a resumed run has its own)
        self.grid = None
        self.weight_ema = None

    def _use_geometry(self, geometry: MapGeometry) -> None:
        """Images, frequencies and geometry of the box ``geometry.box``: the input's or a real-space crop of it."""
        full = self.input_particles
        self.particles = full if geometry.box == full.box else CroppedParticles(full, geometry.box)
        self.geometry = geometry
        self.freqs = half_plane_frequencies(geometry.r_limit)
        self.radii = np.hypot(self.freqs[:, 0], self.freqs[:, 1])

    @property
    def cropped(self) -> bool:
        """True while the run works on images cropped in real space (the SGD phase of a particle smaller than the
        box), False on the input box."""
        return self.geometry.box != self.input_particles.box

    def use_full_box(self) -> None:
        """The hand-over from the SGD to the full passes: the run moves to the input box (images, frequencies,
        geometry, noise model) with the model zero-padded around the centre; :meth:`model_map` is unchanged
        (up to the model's band: frequencies beyond :attr:`band_box` of the padded map are dropped). Nothing
        happens on the input box."""
        if not self.cropped:
            return
        crop, full = self.geometry.box, self.input_particles.box
        volume = None if self.grid is None else self.model_map(self.band_box)
        self._use_geometry(self.geometry.uncropped())
        if self.noise is not None:
            self.noise = self.noise.resampled(crop, full)
        if volume is not None:
            n_work = volume.shape[0]
            # model_map's convention inverted: the grid holds Fourier sums over the input box
            grid = volume_to_grid(self.xp.asarray(volume), self.settings.oversampling) * (full / n_work) ** 3
            self.grid, self.weight_ema = grid.astype(self.xp.complex64), None  # no SGD step on the input box

    @property
    def device_bytes(self) -> float:
        """Device memory for one chunk of candidate projections in the pose search."""
        return candidate_bytes(self.memory_limit_bytes)

    # --------------------------------------------------------------- data access

    def _measured_r50_px(self) -> float | None:
        """The particles' R50 (pixels) from a sample of their images, where the window radius is not set (only
        the default window uses it; the default shift follows the window)."""
        s = self.settings
        if s.mask_radius_A is not None:
            return None
        r50 = particle_r50_px(self.input_particles, particle_size_sample(self.n, s.seed))
        if r50 is None:
            log.info("particle size: no excess variance over the background found; window 0.45 box")
        return r50

    def _ensure_noise(self) -> None:
        """The first noise model: the mean power per shell of a random sample of images."""
        if self.noise is not None:
            return
        sample = np.sort(self.rng.choice(self.n, size=min(self.n, NOISE_SAMPLE), replace=False))
        m = int(np.searchsorted(self.radii, self.geometry.r_limit, "right"))
        spectra = image_spectra(self.particles.read_images(sample), self.freqs[:m], self.xp)
        self.noise = NoiseModel.from_spectra(spectra, self.radii[:m], self.geometry.box // 2 + 1)

    def image_batch(self, index, radius: float) -> ImageBatch:
        """Particles ``index`` within ``radius`` (Fourier pixels), weighted by the current noise model."""
        self._ensure_noise()
        m = int(np.searchsorted(self.radii, radius, "right"))
        images = self.particles.read_images(index)
        ctf = self.particles.ctf.subset(index)
        noise = self.noise.per_frequency(self.radii[:m])
        return image_batch(images, ctf, self.freqs[:m], self.radii[:m], noise, self.geometry.pixel_size_A, self.xp)

    def _next_batch(self, size: int) -> np.ndarray:
        if len(self._order) < size:
            self._order = np.concatenate([self._order, self.rng.permutation(self.n)])
        batch, self._order = self._order[:size], self._order[size:]
        return np.sort(batch)

    # ------------------------------------------------------------------ the model

    def initial_model(self, radius: float) -> None:
        """Wiener reconstruction of a few hundred particles at random poses, low-passed.

        Random poses make it a smooth, roughly spherical blob with the data's scale;
        the seed makes every map start from its own random volume.
        """
        xp, p = self.xp, self.settings.oversampling
        index = self._next_batch(min(self.n, 300))
        self._order = np.concatenate([self._order, index])
        batch = self.image_batch(index, radius)
        size = self.geometry.working_size(radius)
        rotations = quaternion_to_matrix(self.rng.standard_normal((len(index), 4)))
        data = xp.zeros((size,) * 3, dtype=xp.complex64)
        weight = xp.zeros((size,) * 3, dtype=xp.float32)
        coords = slice_coordinates(xp.asarray(rotations), batch.freqs)
        inv = batch.noise_weight / xp.asarray(hermitian_weights(batch.freqs))
        backproject(batch.ctf * batch.spectra * inv, coords, size, p, out=data)
        backproject(batch.ctf**2 * inv, coords, size, p, out=weight)
        data, weight = symmetric_sums(data, weight, self.settings.symmetry, p)
        scale = self.n / len(index)
        self.weight_ema = weight * scale
        floor = 0.1 * xp.mean(weight[weight > 0]) * scale
        grid = data * scale / (self.weight_ema + floor)
        mask_radius_px = self.geometry.mask_radius_px * size / (2 * self.geometry.box) * 2 / p
        self.grid = apply_constraints(grid.astype(xp.complex64), p, mask_radius_px, radius)

    def _ensure_size(self, radius: float) -> None:
        size = self.geometry.working_size(radius)
        if self.grid is None:
            self.initial_model(radius)
        elif self.grid.shape[0] != size:
            self.grid = resize_grid(self.grid, size)
            self.weight_ema = resize_grid(self.weight_ema, size)

    def _window_radius_px(self) -> float:
        """Mask radius in voxels of the current working box (grid size / oversampling)."""
        n_work = self.grid.shape[0] // self.settings.oversampling
        return self.geometry.mask_radius_px * n_work / self.geometry.box

    # --------------------------------------------------------------- one SGD step

    def step(self) -> IterationLog:
        """One minibatch: search, gradient, preconditioned update, constraints."""
        t0 = time.time()
        if self.settings.symmetry != self.symmetry and self.iteration >= self.symmetry_from_iteration:
            self._find_and_impose_symmetry()
        xp, s, t = self.xp, self.settings, self.iteration
        self._ensure_noise()
        radius = self.geometry.radius(self.schedule.resolution(t))
        self._ensure_size(radius)
        index = self._next_batch(min(self.schedule.batch_size(t), self.n))
        batch = self.image_batch(index, radius)
        search = global_settings(self.geometry, radius, self.device_bytes)
        result = global_search(self.grid, s.oversampling, batch, search)
        k = max(1, min(s.marginal_poses, result.rotations.shape[1]))
        weights = result.weights(self.schedule.temperature(t))[:, :k]
        weights = weights / weights.sum(axis=1, keepdims=True)
        kept, scales = self._best_fitting(batch, result, radius)
        gradient, weight, residual = minibatch_gradient(
            self.grid,
            s.oversampling,
            batch if scales is None else batch.scaled(scales),
            result.rotations[:, :k],
            result.origins[:, :k],
            weights * kept[:, None],
            s.symmetry,
        )
        scale = self.n / max(int(kept.sum()), 1)
        if s.preconditioner:
            self.weight_ema = update_weight_ema(self.weight_ema, weight * scale, decay=0.9)
            precond = self.weight_ema
        else:
            precond = xp.full_like(self.weight_ema, float(xp.mean(self.weight_ema[self.weight_ema > 0])))
        inv_tau2 = regularisation(precond, s.oversampling, weak_prior_tau2(precond, s.oversampling))
        lr = self.schedule.learning_rate(t)
        grid = sgd_update(self.grid, gradient * scale, precond, inv_tau2, lr)
        self.grid = apply_constraints(grid.astype(xp.complex64), s.oversampling, self._window_radius_px(), radius)
        if s.centre_every and t < self.schedule.n_initial and (t + 1) % s.centre_every == 0:
            self.grid = translate_grid(self.grid, -allowed_centring(centre_of_mass_shift(self.grid), s.symmetry))
        self.noise.update(residual, batch.radii)
        change = self._record_poses(index, result.rotations[:, 0], result.origins[:, 0])
        self.iteration += 1
        energy = float(np.mean(result.energies[:, 1:2])) if result.energies.shape[1] > 1 else 0.0
        entry = IterationLog(t, self.schedule.resolution(t), len(index), lr, change, energy, time.time() - t0)
        self.history.append(entry)
        return entry

    def _best_fitting(self, batch: ImageBatch, result, radius: float) -> tuple[np.ndarray, np.ndarray | None]:
        """(kept, scales) of the minibatch's images at their best poses (:func:`.particle_fit.fit_best_pose`):
        kept (B,) is 1 for the images that enter the update, 0 for the ``minibatch_trim`` fraction whose best
        pose explains least of them (junk), by the passes' score (from the particle's R50,
        :func:`.particle_fit.score_band_start`); scales (B,) their signal scales (median 1) with ``sgd_scale``,
        else None."""
        trim = self.settings.minibatch_trim
        if trim <= 0 and not self.settings.sgd_scale:
            return np.ones(len(result.rotations)), None
        rotations, origins = result.rotations[:, 0], result.origins[:, 0]
        score_from = score_band_start(self.geometry, radius)
        fit = fit_best_pose(self.grid, self.settings.oversampling, batch, rotations, origins, radius, score_from)
        kept = (fit.score > np.quantile(fit.score, trim)).astype(np.float64) if trim > 0 else np.ones(len(fit.score))
        return kept, normalised_scales(fit.scale) if self.settings.sgd_scale else None

    def _record_poses(self, index, rotations, origins) -> float:
        """Store the best poses; return the median change (degrees) for particles seen before."""
        before = self.seen[index]
        symmetry = self.settings.symmetry
        change = distance_modulo(self.rotations[index][before], rotations[before], symmetry) if before.any() else []
        rotations = canonical_poses(rotations, symmetry)
        self.rotations[index] = rotations
        self.origins[index] = origins
        self.seen[index] = True
        return float(np.median(change)) if len(change) else float("nan")

    # ------------------------------------------------------------------ symmetry

    def _find_and_impose_symmetry(self) -> None:
        fit = find_symmetry_axes(self.model_map(), self.geometry.pixel_size_A, self.symmetry)
        self.impose_symmetry(self.symmetry, fit)
        correlations = ", ".join(f"{c:.2f}" for c in fit.operator_correlations[1:])
        log.info(
            f"iteration {self.iteration}: {self.symmetry} axes found in the C1 map (correlation with each copy "
            f"{correlations}); {self.symmetry} imposed from now on"
        )

    def use_symmetry(self, name: str) -> None:
        """Impose the point group ``name`` from now on (search, sums, centring, poses)."""
        self.symmetry = name
        self.settings = replace(self.settings, symmetry=name)
        self.geometry = replace(self.geometry, settings=self.settings)

    def impose_symmetry(self, name: str, fit) -> None:
        """Move the model onto the axes found in it (a :class:`.symmetry_search.SymmetryFit`: centred, turned by
        its frame), symmetrise it and impose ``name`` from now on."""
        p = self.settings.oversampling
        n_work = self.grid.shape[0] // p
        grid = translate_grid(self.grid, -np.asarray(fit.centre_px) * n_work / self.geometry.box)
        grid = rotate_grid(grid, fit.frame, p)
        self.grid = (symmetrise_grid(grid, name, p) / group_order(name)).astype(self.xp.complex64)
        self.use_symmetry(name)

    # -------------------------------------------------------------------- outputs

    @property
    def working_box(self) -> int:
        """Box (pixels) of the model's current working grid: its band at the pixel size of that box, over the
        extent of the run's box (the crop while the run is :attr:`cropped`)."""
        return self.grid.shape[0] // self.settings.oversampling

    @property
    def band_box(self) -> int:
        """The smallest even box over the input box's extent that holds the model's band: :attr:`working_box`
        on the input box, else scaled by input box / crop (at most the input box)."""
        crop, full = self.geometry.box, self.input_particles.box
        if crop == full:
            return self.working_box
        return min(full, 2 * math.ceil(self.working_box * full / (2 * crop)))

    def model_map(self, box: int | None = None) -> np.ndarray:
        """The current model as a real-space map (host float32) over the input box, or Fourier-cropped to
        ``box`` (at least :attr:`band_box`: nothing of the model is lost); while the run is :attr:`cropped`,
        the crop's map zero-padded around the centre."""
        crop, full, n_work = self.geometry.box, self.input_particles.box, self.working_box
        plain = grid_to_volume(self.grid, n_work, gridding_correction=False)
        # the grid holds Fourier sums over the run's box: an inverse FFT over the working box
        # scales densities by (box / n_work)^3
        volume = plain * gridding_profile(n_work, self.grid.shape[0], self.xp) * (n_work / crop) ** 3
        if crop != full:
            volume = pad_volume(resample_volume(volume, crop), full)
        return to_numpy(resample_volume(volume, box or full))

    # ---------------------------------------------------------------- checkpoints

    def get_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Everything needed to resume: host arrays (saved as .npz) and JSON-safe values."""
        arrays = {
            "rotations": self.rotations,
            "origins": self.origins,
            "seen": self.seen,
            "order": self._order,
            "scale": self.scale,
            "score": self.score,
            "max_probability": self.max_probability,
        }
        if self.noise is not None:
            arrays["noise_sigma2"] = self.noise.sigma2
        if self.grid is not None:
            arrays["grid"] = to_numpy(self.grid)
        if self.weight_ema is not None:
            arrays["weight_ema"] = to_numpy(self.weight_ema)
        meta = {
            "box": self.geometry.box,  # the crop in the SGD phase, the input box after the hand-over
            "iteration": self.iteration,
            "symmetry": self.settings.symmetry,
            "rng": self.rng.bit_generator.state,
            "history": [asdict(h) for h in self.history],
        }
        return arrays, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Restore a state written by :meth:`get_state` (on the box it was saved on: the crop or the input's)."""
        xp = self.xp
        box = int(meta.get("box", self.input_particles.box))  # states before the crop: the input box
        if box == self.input_particles.box:
            self._use_geometry(self.geometry.uncropped())
        elif box != self.geometry.box:
            raise ValueError(f"the saved SGD state is on a box of {box} px, this run crops to {self.geometry.box} px")
        self.rotations = np.array(arrays["rotations"])
        self.origins = np.array(arrays["origins"])
        self.seen = np.array(arrays["seen"])
        self._order = np.array(arrays["order"])
        self.scale = np.array(arrays.get("scale", self.scale))
        self.score = np.array(arrays.get("score", self.score))
        self.max_probability = np.array(arrays.get("max_probability", self.max_probability))
        self.noise = NoiseModel(np.array(arrays["noise_sigma2"])) if "noise_sigma2" in arrays else None
        if "grid" in arrays:
            self.grid = xp.asarray(arrays["grid"])
        if "weight_ema" in arrays:
            self.weight_ema = xp.asarray(arrays["weight_ema"])
        self.iteration = int(meta["iteration"])
        if meta.get("symmetry", self.settings.symmetry) != self.settings.symmetry:
            self.use_symmetry(meta["symmetry"])  # imposed after a C1 start: the saved model is on the axes
        self.rng.bit_generator.state = meta["rng"]
        self.history = [IterationLog(**h) for h in meta["history"]]


# --------------------------------------------------------------------- SGD phase


def pose_change_text(degrees: float) -> str:
    """Median pose change (degrees) for the log: "n/a" while no particle of the minibatch was seen before."""
    return "n/a" if math.isnan(degrees) else f"{degrees:.1f}"


def run_sgd(
    runs: dict[str, AbinitRun],
    on_iteration: Callable[[int], None] | None = None,
    timings: dict[str, float] | None = None,
    report_every: int = 10,
) -> None:
    """The SGD phase of every map in ``runs`` (a name each), one step of each in turn.

    After each iteration t (1-based) ``on_iteration(t)`` runs (monitoring, checkpoints);
    the time spent in the steps is added to ``timings["sgd"]``. Logs the progress and
    the time left every ``report_every`` iterations. Resumes from the runs' iteration.
    """
    first = next(iter(runs.values()))
    total = first.schedule.n_iterations
    t_start, it_start = time.time(), min(run.iteration for run in runs.values())
    while (t := min(run.iteration for run in runs.values())) < total:
        t0 = time.time()
        entries = {name: run.step() for name, run in runs.items()}
        if timings is not None:
            timings["sgd"] = timings.get("sgd", 0.0) + time.time() - t0
        t += 1
        if on_iteration is not None:
            on_iteration(t)
        stop.check(f"SGD iteration {t}/{total}")
        if t % report_every == 0 or t == total:
            rate = (time.time() - t_start) / max(t - it_start, 1)
            entry = entries[next(iter(entries))]
            changes = " ".join(f"{name} {pose_change_text(e.pose_change)}" for name, e in entries.items())
            log.info(
                f"SGD iteration {t}/{total}: resolution {entry.resolution:.1f} A, minibatch {entry.batch}, "
                f"pose change {changes} deg, {rate:.2f} s/iteration, about {rate * (total - t) / 60:.1f} min "
                "left in the SGD phase"
            )
