"""The gold-standard job: two half maps from scratch, aligned, with their FSC.

Each half set gets its own :class:`~.abinit.AbinitRun` with its own random start; the two
are advanced in turn on one device. What passes between them is only the rigid
transform that puts half B onto half A (rotation, shift, hand) and, for reporting,
the FSC between them: half A never reads anything of half B, so changing half B's
images cannot change half map A (tests/test_gold_standard.py proves it bit for bit).

Phases: SGD ab initio of both halves (with an alignment and the gold-standard
FSC every ``align_every`` iterations, to report the resolution per iteration);
one global full pass per half; alignment of B onto A, applied to B's map and to
every pose of B; local full passes per half; outputs. A checkpoint is written
every ``checkpoint_minutes`` and at each phase boundary; rerunning resumes.

The same job in two processes, one half each, is :mod:`.parallel_halves`: its workers are this
class restricted to one half (``halves``), and its coordinator uses the module functions here
(:func:`monitor_entry`, :func:`pass_entry`, :func:`symmetry_warning`, :func:`job_result`) on the
files the workers write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import stop
from .abinit import AbinitRun, run_sgd
from .align3d import Alignment, align_maps, apply_to_poses, transform_map
from .backend import device_name, to_numpy
from .checkpoint import Checkpoint
from .fourier import crop_volume
from .fsc import fsc, resolution_at
from .halves import assign_half_sets
from .outputs import CHECKPOINT
from .particles import ParticleError, ParticleSet
from .passes import run_passes
from .settings import MIN_PARTICLES_PER_HALF, AbinitSettings, JobSettings
from .symmetry import canonical_poses, is_trivial
from .symmetry_search import find_symmetry_axes, map_correlation

log = logging.getLogger("habinit")

HALVES = ("A", "B")


@dataclass
class JobResult:
    """What the job produced (host arrays; resolutions in Angstrom)."""

    maps: dict[str, np.ndarray]
    fsc: np.ndarray
    resolution_0143: float
    resolution_05: float
    used: np.ndarray
    unused: np.ndarray
    half_set: np.ndarray
    rotations: np.ndarray
    origins: np.ndarray
    alignment: Alignment
    history: list[dict]
    timings: dict[str, float]
    scale: np.ndarray  # (n_used,) signal scale of each particle (median 1 per half)
    score: np.ndarray  # (n_used,) log-likelihood ratio against an empty image (particle_fit)
    max_probability: np.ndarray  # (n_used,) largest posterior weight of the last pass


@dataclass
class HalfResult:
    """What one half ends with (host arrays over the half's particles, in their order within the half)."""

    volume: np.ndarray  # (box, box, box) the map of the last pass
    rotations: np.ndarray  # (n, 3, 3) RELION matrices
    origins: np.ndarray  # (n, 2) pixels
    scale: np.ndarray  # (n,)
    score: np.ndarray  # (n,)
    max_probability: np.ndarray  # (n,)

    @classmethod
    def of_run(cls, run: AbinitRun, volume: np.ndarray) -> HalfResult:
        return cls(volume, run.rotations, run.origins, run.scale, run.score, run.max_probability)


def job_key(particles: ParticleSet, settings: JobSettings) -> str:
    """A fingerprint of the input particles (ids, images, CTF) and the parameters that shape the result
    (all of them but the checkpoint interval)."""
    h = hashlib.sha256()
    parameters = asdict(replace(settings, checkpoint_minutes=0.0))
    h.update(json.dumps(parameters, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(particles.ids).tobytes())
    h.update("|".join(particles.stacks).encode())
    h.update(np.ascontiguousarray(particles.slice_of).tobytes())
    h.update(np.ascontiguousarray(particles.ctf.defocus_u).tobytes())
    return h.hexdigest()[:24]


def choose_particles(particles: ParticleSet, settings: JobSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(used rows, unused rows, half set of the used rows, how the split was made)."""
    n = len(particles)
    # like cryoSPARC's "number of particles to use": the first N in input order
    used = np.arange(min(n, settings.n_particles) if settings.n_particles > 0 else n)
    unused = np.setdiff1d(np.arange(n), used)
    half, how = assign_half_sets(
        particles.subset(used), settings.abinit.seed, settings.keep_split, settings.keep_duplicates
    )
    for h in (1, 2):
        count = int(np.sum(half == h))
        if count < MIN_PARTICLES_PER_HALF:
            raise ParticleError(
                f"{particles.source}: half set {h} has {count} particle(s) ({how}); the job needs at least "
                f"{MIN_PARTICLES_PER_HALF} per half set (and a few hundred for a useful map)"
            )
    return used, unused, half, how


class GoldStandardJob:
    """Runs (or resumes) the job on ``particles`` with its state in ``out/checkpoint``.

    memory_limit_bytes: the GPU memory budget chunk sizes are chosen from (None: no limit).
    halves: the half sets this process runs ("A", "B" or both); with one, what needs the other
    half is left to a subclass (:class:`.parallel_halves.HalfWorker`).
    """

    def __init__(
        self,
        particles: ParticleSet,
        settings: JobSettings,
        out: str | Path,
        xp=np,
        memory_limit_bytes=None,
        halves: tuple[str, ...] = HALVES,
    ):
        self.particles = particles
        self.settings = settings
        self.out = Path(out)
        self.xp = xp
        self.memory_limit_bytes = memory_limit_bytes
        self.used, self.unused, self.half_set, self.split_how = choose_particles(particles, settings)
        self.checkpoint = Checkpoint(self.out / CHECKPOINT, job_key(particles, settings))
        self.runs = {
            name: AbinitRun(
                particles.subset(self.used[self.half_set == h]),
                _half_settings(settings, h),
                xp=xp,
                memory_limit_bytes=memory_limit_bytes,
            )
            for h, name in ((1, "A"), (2, "B"))
            if name in halves
        }
        self.state = {"phase": "sgd", "pass": 0, "history": [], "timings": {}, "alignment": Alignment().to_dict()}
        self.volumes: dict[str, np.ndarray] = {}  # the map of each half
        self._last_save = time.time()

    @property
    def device(self) -> str:
        """Where the job runs, for the log and run.json."""
        return device_name(self.xp)

    @property
    def warnings(self) -> list[str]:
        """Warnings found during the run (kept in the checkpoint), for the log and run.json."""
        return list(self.state.get("warnings", []))

    # -------------------------------------------------------------- checkpoints

    def resume(self) -> bool:
        """Load the checkpoint if there is one; True when it was loaded."""
        if not self.checkpoint.exists():
            return False
        state, arrays = self.checkpoint.load()
        for name, run in self.runs.items():
            run.set_state(arrays[name], state["runs"][name])
        saved = arrays.get("volumes", {})
        self.volumes = {name: saved[name] for name in HALVES if name in saved}
        self.state = state
        log.info(f"resumed from {self.checkpoint.folder} (phase {state['phase']}, iteration {self._iteration()})")
        return True

    def save(self) -> None:
        arrays, metas = {}, {}
        for name, run in self.runs.items():
            arrays[name], metas[name] = run.get_state()
        if self.volumes:
            arrays["volumes"] = dict(self.volumes)
        self.state.update(self.checkpoint.save(dict(self.state, runs=metas), arrays))  # in place: run_passes holds it
        self._last_save = time.time()

    def _maybe_save(self) -> None:
        if time.time() - self._last_save >= 60.0 * self.settings.checkpoint_minutes:
            self.save()

    def _iteration(self) -> int:
        return min(run.iteration for run in self.runs.values())

    def _add_time(self, phase: str, seconds: float) -> None:
        self.state["timings"][phase] = self.state["timings"].get(phase, 0.0) + seconds

    # -------------------------------------------------------------------- phases

    def run(self) -> JobResult:
        if self.state["phase"] == "sgd":
            self._sgd_phase()
        if self.state["phase"] == "passes":
            self._pass_phase()
        return self._result()

    def _sgd_phase(self) -> None:
        run_sgd(self.runs, self._after_sgd_iteration, self.state["timings"])
        self._symmetry_after_sgd()
        self.state["phase"] = "passes"
        self.save()

    def _after_sgd_iteration(self, t: int) -> None:
        """After SGD iteration ``t`` (1-based) of every run: the monitor every ``align_every``, the checkpoint."""
        if t % self.settings.align_every == 0 or t == next(iter(self.runs.values())).schedule.n_iterations:
            self._monitor(t)
        if stop.requested():
            self.save()  # run_sgd stops right after this
        else:
            self._maybe_save()

    def _symmetry_after_sgd(self) -> None:
        """RELION's practice: each half finds the axes in its own C1 map and has the symmetry from now on."""
        symmetry = self.settings.abinit.symmetry
        if not self.settings.symmetry_after_sgd or is_trivial(symmetry):
            return
        t0 = time.time()
        maps = {name: run.model_map() for name, run in self.runs.items()}
        between = halves_correlation(maps["A"], maps["B"], self.particles.pixel_size, self._transform)
        found = self._impose_found_symmetry(maps)
        message = symmetry_warning(symmetry, [fit["agreement"] for fit in found.values()], between)
        if message:
            log.warning(f"warning: {message}")
            self.state.setdefault("warnings", []).append(message)
        self.state["symmetry_found"] = dict(found, halves_correlation=between)
        self._add_time("symmetry search", time.time() - t0)

    def _impose_found_symmetry(self, maps: dict[str, np.ndarray]) -> dict[str, dict]:
        """Each half's axes found in its own C1 map (``maps``: full-box host maps by half), imposed on its run;
        returns each half's fit (:class:`.symmetry_search.SymmetryFit` as a dict) with its ``agreement``, the mean
        correlation of the map with its copies."""
        symmetry, px, found = self.settings.abinit.symmetry, self.particles.pixel_size, {}
        for name, run in self.runs.items():
            fit = find_symmetry_axes(maps[name], px, symmetry)
            run.impose_symmetry(symmetry, fit)
            correlations = ", ".join(f"{c:.2f}" for c in fit.operator_correlations[1:])
            log.info(f"half {name}: {symmetry} axes found in the C1 map, correlation with each copy {correlations}")
            found[name] = dict(fit.to_dict(), agreement=float(np.mean(fit.operator_correlations[1:])))
        return found

    def _monitor(self, iteration: int) -> None:
        """Align the current B model onto A and record the gold-standard FSC (reporting only)."""
        t0 = time.time()
        # the models are band-limited: compared on the box that holds their band over the input box's extent
        # (each half's SGD crop comes from its own images: both padded to the input box), exactly, at a fraction
        # of the cost
        box = max(run.band_box for run in self.runs.values())
        map_a, map_b = self.runs["A"].model_map(box), self.runs["B"].model_map(box)
        px = self.particles.pixel_size * self.particles.box / box
        symmetry = self.runs["A"].settings.symmetry  # C1 in an SGD phase before the symmetry is found
        working_resolution = self.runs["A"].schedule.resolution(iteration - 1)
        extent = max(sgd_extent_fraction(run) for run in self.runs.values())
        entry = monitor_entry(
            map_a, map_b, px, symmetry, iteration, working_resolution, self._transform, self.xp, extent
        )
        self.state["history"].append(entry)
        self._add_time("alignment", time.time() - t0)
        log_monitor(entry, time.time() - t0)

    def _pass_phase(self, until: int | None = None) -> None:
        """Full passes from the saved one on; ``until`` stops after that many (for tests)."""

        def after_pass(n: int) -> None:
            if n == 0:
                self._align_halves()
            self._record_pass(n)
            self.save()

        run_passes(self.runs, self.volumes, self.state, after_pass, until)
        if self.state["pass"] >= self.settings.abinit.n_final_passes:
            self.state["phase"] = "done"
            self.save()

    def _align_halves(self) -> None:
        """Put half B onto half A: its map and every one of its poses."""
        t0 = time.time()
        px = self.particles.pixel_size
        symmetry = self.runs["A"].settings.symmetry
        alignment = align_maps(self.volumes["A"], self.volumes["B"], px, xp=self.xp, symmetry=symmetry)
        self._move_half_b(alignment)
        self._add_time("alignment", time.time() - t0)
        log_alignment(alignment)

    def _move_half_b(self, alignment: Alignment) -> None:
        """Apply ``alignment`` (B onto A) to half B's map and to every one of its poses."""
        run_b = self.runs["B"]
        self.volumes["B"] = self._transform(self.volumes["B"], alignment)
        run_b.rotations, run_b.origins = apply_to_poses(alignment, run_b.rotations, run_b.origins)
        self.state["alignment"] = alignment.to_dict()

    def _transform(self, volume: np.ndarray, alignment: Alignment) -> np.ndarray:
        """A host map moved by ``alignment`` on the job's device; returned on the host."""
        return to_numpy(transform_map(self.xp.asarray(volume), alignment, memory_limit_bytes=self.memory_limit_bytes))

    def _record_pass(self, n: int) -> None:
        px, n_sgd = self.particles.pixel_size, self.runs["A"].schedule.n_iterations
        self.state["history"].append(pass_entry(self.volumes["A"], self.volumes["B"], px, n_sgd, n))

    # -------------------------------------------------------------------- result

    def _result(self) -> JobResult:
        halves = {name: HalfResult.of_run(run, self.volumes[name]) for name, run in self.runs.items()}
        return job_result(self, halves, self.state)


def job_result(job, halves: dict[str, HalfResult], state: dict) -> JobResult:
    """The job's result from each half's (``halves`` by name) and the job's ``state`` (alignment, history,
    timings); ``job`` gives the particles, the settings and the split (``used``, ``unused``, ``half_set``)."""
    px = job.particles.pixel_size
    curve = fsc(halves["A"].volume, halves["B"].volume)
    n_used = len(job.used)
    rotations = np.empty((n_used, 3, 3))
    origins = np.empty((n_used, 2))
    scale, score, max_probability = np.empty(n_used), np.empty(n_used), np.empty(n_used)
    for h, name in ((1, "A"), (2, "B")):
        rows = np.flatnonzero(job.half_set == h)
        half = halves[name]
        rotations[rows], origins[rows] = half.rotations, half.origins
        scale[rows], score[rows], max_probability[rows] = half.scale, half.score, half.max_probability
    return JobResult(
        maps={name: half.volume for name, half in halves.items()},
        fsc=curve,
        resolution_0143=resolution_at(curve, 0.143, px),
        resolution_05=resolution_at(curve, 0.5, px),
        used=job.used,
        unused=job.unused,
        half_set=job.half_set,
        rotations=canonical_poses(rotations, job.settings.abinit.symmetry),  # in the asymmetric unit
        origins=origins,
        alignment=Alignment.from_dict(state["alignment"]),
        history=state["history"],
        timings=dict(state["timings"]),
        scale=scale,
        score=score,
        max_probability=max_probability,
    )


# ------------------------------------------------- what passes between the halves


def monitor_entry(
    map_a: np.ndarray,
    map_b: np.ndarray,
    pixel_size_A: float,
    symmetry: str,
    iteration: int,
    working_resolution_A: float,
    transform,
    xp=np,
    extent_fraction: float = 1.0,
) -> dict:
    """The history entry of the SGD monitor: B's model aligned onto A's (both host maps of one box at
    ``pixel_size_A``) and their gold-standard FSC. ``transform(volume, alignment)`` moves a host map.

    extent_fraction: the fraction of the box (per axis) outside which both models are zero (the SGD's
    real-space crops, :func:`sgd_extent_fraction`): the maps are compared on that central box, which holds
    all of both models at a fifth of the cost for a crop of 0.56 (144 of 256 px).
    """
    box = min(map_a.shape[0], 2 * math.ceil(map_a.shape[0] * extent_fraction / 2))
    map_a, map_b = crop_volume(map_a, box), crop_volume(map_b, box)
    alignment = align_maps(map_a, map_b, pixel_size_A, xp=xp, symmetry=symmetry)
    curve = fsc(map_a, transform(map_b, alignment))
    return {
        "iteration": iteration,
        "phase": "sgd",
        "resolution_0143": resolution_at(curve, 0.143, pixel_size_A),
        "resolution_05": resolution_at(curve, 0.5, pixel_size_A),
        "working_resolution": working_resolution_A,
        "mirrored": alignment.mirrored,
    }


def sgd_extent_fraction(run: AbinitRun) -> float:
    """The fraction of the input box (per axis) the run's SGD model spans: its real-space crop over the input
    box (1 on the input box); :meth:`.AbinitRun.model_map` is zero outside it."""
    return run.geometry.box / run.input_particles.box


def log_monitor(entry: dict, seconds: float) -> None:
    log.info(
        f"  half maps at iteration {entry['iteration']}: GS-FSC 0.143 at {entry['resolution_0143']:.1f} A "
        f"(B {'mirrored' if entry['mirrored'] else 'same hand'}, alignment {seconds:.1f} s)"
    )


def log_alignment(alignment: Alignment) -> None:
    log.info(
        f"aligned half B onto half A: {'mirrored' if alignment.mirrored else 'same hand'}, "
        f"shift {np.round(alignment.shift, 2).tolist()} px, score {alignment.score:.3f}"
    )


def pass_entry(volume_a: np.ndarray, volume_b: np.ndarray, pixel_size_A: float, n_sgd: int, n: int) -> dict:
    """The history entry after full pass ``n`` (0-based; ``n_sgd`` SGD iterations before it): the gold-standard
    FSC of the half maps (host, B aligned onto A), logged."""
    curve = fsc(volume_a, volume_b)
    entry = {
        "iteration": n_sgd + n + 1,
        "phase": f"pass {n + 1}",
        "resolution_0143": resolution_at(curve, 0.143, pixel_size_A),
        "resolution_05": resolution_at(curve, 0.5, pixel_size_A),
    }
    log.info(f"after pass {n + 1}: gold-standard FSC 0.143 at {entry['resolution_0143']:.2f} A")
    return entry


def halves_correlation(map_a: np.ndarray, map_b: np.ndarray, pixel_size_A: float, transform) -> float:
    """How well two independent C1 maps agree (correlation at 12 A after aligning B onto A): the copies of a map
    under a true symmetry agree about as well."""
    return map_correlation(map_a, transform(map_b, align_maps(map_a, map_b, pixel_size_A)), pixel_size_A, 12.0)


def symmetry_warning(symmetry: str, agreement: list[float], between: float) -> str | None:
    """The warning when neither half's C1 map agrees with its copies under ``symmetry`` (``agreement``: the mean
    correlation of each) as well as the two half maps agree (``between``); None otherwise (one half's SGD may
    simply have converged less)."""
    if max(agreement) >= 0.9 * between:
        return None
    return (
        f"the C1 maps of both halves agree with their copies under the {symmetry} operators at most "
        f"{max(agreement):.2f} (mean correlation at 12 A), less than the two half maps agree ({between:.2f}): "
        f"the particle may not have {symmetry} symmetry"
    )


def _half_settings(settings: JobSettings, half: int) -> AbinitSettings:
    """Each half starts from its own random volume and minibatch order (in C1 when the symmetry comes after
    the SGD)."""
    seed = int(np.random.SeedSequence([settings.abinit.seed, half]).generate_state(1)[0])
    symmetry = "C1" if settings.symmetry_after_sgd else settings.abinit.symmetry
    return replace(settings.abinit, seed=seed, symmetry=symmetry)
