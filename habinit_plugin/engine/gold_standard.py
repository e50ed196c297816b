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
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import stop
from .abinit import AbinitRun, run_sgd
from .align3d import Alignment, align_maps, apply_to_poses, transform_map
from .backend import to_numpy
from .checkpoint import Checkpoint
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
    """

    def __init__(self, particles: ParticleSet, settings: JobSettings, out: str | Path, xp=np, memory_limit_bytes=None):
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
        }
        self.state = {"phase": "sgd", "pass": 0, "history": [], "timings": {}, "alignment": Alignment().to_dict()}
        self.volumes: dict[str, np.ndarray] = {}  # the map of each half
        self._last_save = time.time()

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
        total = self.runs["A"].schedule.n_iterations

        def after_iteration(t: int) -> None:
            if t % self.settings.align_every == 0 or t == total:
                self._monitor(t)
            if stop.requested():
                self.save()  # run_sgd stops right after this
            else:
                self._maybe_save()

        run_sgd(self.runs, after_iteration, self.state["timings"])
        self._symmetry_after_sgd()
        self.state["phase"] = "passes"
        self.save()

    def _symmetry_after_sgd(self) -> None:
        """RELION's practice: each half finds the axes in its own C1 map and has the symmetry from now on."""
        symmetry = self.settings.abinit.symmetry
        if not self.settings.symmetry_after_sgd or is_trivial(symmetry):
            return
        t0 = time.time()
        px = self.particles.pixel_size
        maps = {name: run.model_map() for name, run in self.runs.items()}
        # how well two independent maps agree: the copies of a map under a true symmetry agree about as well
        between = map_correlation(maps["A"], self._transform(maps["B"], align_maps(maps["A"], maps["B"], px)), px, 12.0)
        found, agreement = {}, []
        for name, run in self.runs.items():
            fit = find_symmetry_axes(maps[name], px, symmetry)
            run.impose_symmetry(symmetry, fit)
            found[name] = fit.to_dict()
            correlations = ", ".join(f"{c:.2f}" for c in fit.operator_correlations[1:])
            log.info(f"half {name}: {symmetry} axes found in the C1 map, correlation with each copy {correlations}")
            agreement.append(float(np.mean(fit.operator_correlations[1:])))
        # one half's SGD may simply have converged less: the particle is suspect when neither half's copies agree
        if max(agreement) < 0.9 * between:
            message = (
                f"the C1 maps of both halves agree with their copies under the {symmetry} operators at most "
                f"{max(agreement):.2f} (mean correlation at 12 A), less than the two half maps agree ({between:.2f}): "
                f"the particle may not have {symmetry} symmetry"
            )
            log.warning(f"warning: {message}")
            self.state.setdefault("warnings", []).append(message)
        self.state["symmetry_found"] = dict(found, halves_correlation=between)
        self._add_time("symmetry search", time.time() - t0)

    def _monitor(self, iteration: int) -> None:
        """Align the current B model onto A and record the gold-standard FSC (reporting only)."""
        t0 = time.time()
        # the models are band-limited: compared on their working box, exactly, at a fraction of the cost
        box = max(run.working_box for run in self.runs.values())
        map_a, map_b = self.runs["A"].model_map(box), self.runs["B"].model_map(box)
        px = self.particles.pixel_size * self.particles.box / box
        symmetry = self.runs["A"].settings.symmetry  # C1 in an SGD phase before the symmetry is found
        alignment = align_maps(map_a, map_b, px, xp=self.xp, symmetry=symmetry)
        curve = fsc(map_a, self._transform(map_b, alignment))
        entry = {
            "iteration": iteration,
            "phase": "sgd",
            "resolution_0143": resolution_at(curve, 0.143, px),
            "resolution_05": resolution_at(curve, 0.5, px),
            "working_resolution": self.runs["A"].schedule.resolution(iteration - 1),
            "mirrored": alignment.mirrored,
        }
        self.state["history"].append(entry)
        self._add_time("alignment", time.time() - t0)
        log.info(
            f"  half maps at iteration {iteration}: GS-FSC 0.143 at {entry['resolution_0143']:.1f} A "
            f"(B {'mirrored' if alignment.mirrored else 'same hand'}, alignment {time.time() - t0:.1f} s)"
        )

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
        run_b = self.runs["B"]
        self.volumes["B"] = self._transform(self.volumes["B"], alignment)
        run_b.rotations, run_b.origins = apply_to_poses(alignment, run_b.rotations, run_b.origins)
        self.state["alignment"] = alignment.to_dict()
        self._add_time("alignment", time.time() - t0)
        log.info(
            f"aligned half B onto half A: {'mirrored' if alignment.mirrored else 'same hand'}, "
            f"shift {np.round(alignment.shift, 2).tolist()} px, score {alignment.score:.3f}"
        )

    def _transform(self, volume: np.ndarray, alignment: Alignment) -> np.ndarray:
        """A host map moved by ``alignment`` on the job's device; returned on the host."""
        return to_numpy(transform_map(self.xp.asarray(volume), alignment, memory_limit_bytes=self.memory_limit_bytes))

    def _record_pass(self, n: int) -> None:
        curve = fsc(self.volumes["A"], self.volumes["B"])
        px = self.particles.pixel_size
        entry = {
            "iteration": self.runs["A"].schedule.n_iterations + n + 1,
            "phase": f"pass {n + 1}",
            "resolution_0143": resolution_at(curve, 0.143, px),
            "resolution_05": resolution_at(curve, 0.5, px),
        }
        self.state["history"].append(entry)
        log.info(f"after pass {n + 1}: gold-standard FSC 0.143 at {entry['resolution_0143']:.2f} A")

    # -------------------------------------------------------------------- result

    def _result(self) -> JobResult:
        px = self.particles.pixel_size
        curve = fsc(self.volumes["A"], self.volumes["B"])
        n_used = len(self.used)
        rotations = np.empty((n_used, 3, 3))
        origins = np.empty((n_used, 2))
        scale, score, max_probability = np.empty(n_used), np.empty(n_used), np.empty(n_used)
        for h, name in ((1, "A"), (2, "B")):
            rows = np.flatnonzero(self.half_set == h)
            run = self.runs[name]
            rotations[rows], origins[rows] = run.rotations, run.origins
            scale[rows], score[rows], max_probability[rows] = run.scale, run.score, run.max_probability
        return JobResult(
            maps=dict(self.volumes),
            fsc=curve,
            resolution_0143=resolution_at(curve, 0.143, px),
            resolution_05=resolution_at(curve, 0.5, px),
            used=self.used,
            unused=self.unused,
            half_set=self.half_set,
            rotations=canonical_poses(rotations, self.settings.abinit.symmetry),  # in the asymmetric unit
            origins=origins,
            alignment=Alignment.from_dict(self.state["alignment"]),
            history=self.state["history"],
            timings=dict(self.state["timings"]),
            scale=scale,
            score=score,
            max_probability=max_probability,
        )


def _half_settings(settings: JobSettings, half: int) -> AbinitSettings:
    """Each half starts from its own random volume and minibatch order (in C1 when the symmetry comes after
    the SGD)."""
    seed = int(np.random.SeedSequence([settings.abinit.seed, half]).generate_state(1)[0])
    symmetry = "C1" if settings.symmetry_after_sgd else settings.abinit.symmetry
    return replace(settings.abinit, seed=seed, symmetry=symmetry)
