"""The gold-standard job with each half set in its own worker process: a GPU, or a share of the cores, each.

``habinit run --parallel-halves`` (or ``--gpus 0,1``) is a coordinator that starts two workers,
``habinit half --out JOB --half A|B --phase 1|2``, and does between them what needs both halves:

1. phase 1, both workers at once: SGD (with a snapshot of the model every ``align_every`` iterations,
   from which the coordinator logs the GS-FSC, reporting only), the symmetry axes of each half's own map
   with ``--symmetry-after-sgd``, and full pass 1 (global search); each writes its pass-1 map;
2. the alignment of B onto A, from the two pass-1 maps, written to ``halves/alignment.json``;
3. phase 2, both workers at once: half B moves its map and every pose by that alignment; the remaining
   full passes; each writes its final map, poses and per-particle values (``halves/X/result.npz``);
4. the outputs, written as the one-process job writes them (:func:`.jobs.write_run_outputs`).

A worker is :class:`.gold_standard.GoldStandardJob` restricted to one half: the same code, seeds and
order of operations, so with the same seed and the same BLAS thread count the two-worker job gives the
half maps and poses of the one-process job bit for bit (OpenBLAS results can change with its thread count;
the FFTs, scipy's pocketfft, do not). Half A's worker reads nothing the other half wrote; half B's worker
reads only ``alignment.json``. Maps and snapshots go to the coordinator only.

Files in the job folder: ``half_A.log`` and ``half_B.log`` (each worker's log); ``halves/job.json`` (the
particles, parameters and device the workers run with); ``halves/A/`` and ``halves/B/`` (each worker's
checkpoint, ``status.json`` with its iteration, resolution and time left, and the files above);
``checkpoint/state.json``, the coordinator's (its stage, the GS-FSC history, the alignment). Each worker
checkpoints as the one-process job does (every ``--checkpoint-minutes``, at each phase; Ctrl-C on the
coordinator stops both at their next safe point); rerunning the command resumes every part where it stopped.
A worker that dies ends the job with one line naming it and its log, followed by the log's last lines;
the other worker is stopped at its checkpoint.

Scipion runs the same stages as steps: ``habinit run ... --parallel-halves --stage prepare``, the two
phase-1 workers, ``--stage align``, the two phase-2 workers, then ``habinit run ... --parallel-halves``
--stage outputs, which writes the outputs of the finished halves.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import stop
from .align3d import Alignment, align_maps, transform_map
from .backend import cpu_workers, to_numpy
from .checkpoint import Checkpoint, CheckpointError
from .folder_lock import folder_lock
from .fourier import resample_volume
from .gold_standard import (
    HALVES,
    GoldStandardJob,
    HalfResult,
    JobResult,
    choose_particles,
    halves_correlation,
    job_key,
    job_result,
    log_alignment,
    log_monitor,
    monitor_entry,
    pass_entry,
    sgd_extent_fraction,
    symmetry_warning,
)
from .outputs import CHECKPOINT, OutputError, atomic_write, read_json, write_json
from .particles import ParticleSet
from .settings import AbinitSettings, DeviceSettings, JobSettings, WorkerSettings
from .symmetry import is_trivial

log = logging.getLogger("habinit")

HALVES_FOLDER = "halves"
JOB_JSON = "job.json"
ALIGNMENT_JSON = "alignment.json"
STATUS_JSON = "status.json"
RESULT_NPZ = "result.npz"
SGD_MAP_NPZ = "sgd_map.npz"  # a half's C1 map at the end of the SGD (--symmetry-after-sgd)
SYMMETRY_JSON = "symmetry.json"  # the axes a half found in its own map, and their agreement
STAGES = ("prepare", "align", "outputs")  # --stage: one stage of the coordinator, for Scipion's steps
POLL_SECONDS = 0.5
PROGRESS_SECONDS = 30.0  # the coordinator's progress line at least this often
LOG_TAIL_LINES = 15


class WorkerError(RuntimeError):
    """A half's worker ended without finishing its phase; the message names it and its log."""


def halves_folder(out: str | Path) -> Path:
    return Path(out) / HALVES_FOLDER


def half_folder(out: str | Path, half: str) -> Path:
    """The folder of one half's worker: its checkpoint, status and the files it hands to the coordinator."""
    return halves_folder(out) / half


def worker_log(out: str | Path, half: str) -> Path:
    return Path(out) / f"half_{half}.log"


def snapshot_name(iteration: int) -> str:
    """A half's SGD model after ``iteration`` iterations, for the coordinator's GS-FSC monitor."""
    return f"sgd_{iteration:05d}.npz"


def pass_map_name(n_passes: int) -> str:
    """A half's map after ``n_passes`` full passes (half B's aligned onto A from pass 2 on)."""
    return f"pass_{n_passes:02d}.npz"


def _save_npz(path: Path, **arrays) -> None:
    with atomic_write(path) as tmp:
        np.savez(tmp, **arrays)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: cannot be read ({exc})") from exc


# ----------------------------------------------------------------------------- the worker


class HalfWorker(GoldStandardJob):
    """One half of the gold-standard job (``half`` "A" or "B"), its state in ``out/halves/<half>``.

    What the one-process job does with both halves at once is left to the coordinator: the monitor
    writes a snapshot of the model, pass 1 writes the map for the alignment, and half B applies the
    alignment (``alignment.json``) at the start of phase 2.
    """

    def __init__(self, particles: ParticleSet, settings: JobSettings, out, half: str, xp=np, memory_limit_bytes=None):
        super().__init__(particles, settings, out, xp=xp, memory_limit_bytes=memory_limit_bytes, halves=(half,))
        self.half = half
        self.folder = half_folder(out, half)
        self.checkpoint = Checkpoint(self.folder / CHECKPOINT, self.checkpoint.job_key)
        self._started = (time.time(), 0)

    @property
    def half_run(self):
        """The :class:`.abinit.AbinitRun` of this half."""
        return self.runs[self.half]

    def run_phase(self, phase: int) -> None:
        """Phase 1 (SGD, symmetry axes, full pass 1) or 2 (alignment for B, the other passes, the result)."""
        self._started = (time.time(), self.half_run.iteration)
        if phase == 1:
            if self.state["phase"] == "sgd":
                self._sgd_phase()
            if self.state["pass"] < 1:
                self._pass_phase(until=1)
            self._write_status(stage="phase 1 done")
            return
        if self.state["pass"] < 1:
            raise ValueError(f"half {self.half} has not finished phase 1 ({self.folder}): run --phase 1 first")
        if self.half == "B" and not self.state.get("aligned"):
            self._apply_alignment()
        if self.state["phase"] != "done":
            self._pass_phase()
        volume = self.volumes[self.half]
        result = HalfResult.of_run(self.half_run, volume)
        _save_npz(self.folder / RESULT_NPZ, **asdict(result))
        self._write_status(stage="phase 2 done", timings=self.state["timings"])

    def _apply_alignment(self) -> None:
        path = halves_folder(self.out) / ALIGNMENT_JSON
        if not path.is_file():
            raise ValueError(f"{path} is missing: the alignment of B onto A (habinit run --stage align) comes first")
        alignment = Alignment.from_dict(read_json(path))
        self._move_half_b(alignment)
        self.state["aligned"] = True
        log_alignment(alignment)
        self.save()

    # the parts of the one-process job that need both halves

    def _after_sgd_iteration(self, t: int) -> None:
        super()._after_sgd_iteration(t)
        run = self.half_run
        t0, it0 = self._started
        rate = (time.time() - t0) / max(t - it0, 1)
        total = run.schedule.n_iterations
        self._write_status(
            stage="sgd",
            iteration=t,
            n_iterations=total,
            resolution_A=run.schedule.resolution(t - 1),
            minutes_left=rate * (total - t) / 60,
        )

    def _monitor(self, iteration: int) -> None:
        run = self.half_run
        px = self.particles.pixel_size * self.particles.box / run.band_box
        _save_npz(
            self.folder / snapshot_name(iteration),
            map=run.model_map(run.band_box),
            pixel_size_A=px,
            symmetry=run.settings.symmetry,
            working_resolution_A=run.schedule.resolution(iteration - 1),
            extent_fraction=sgd_extent_fraction(run),
        )

    def _symmetry_after_sgd(self) -> None:
        if not self.settings.symmetry_after_sgd or is_trivial(self.settings.abinit.symmetry):
            return
        t0 = time.time()
        volume = self.half_run.model_map()
        _save_npz(self.folder / SGD_MAP_NPZ, map=volume)
        found = self._impose_found_symmetry({self.half: volume})
        self.state["symmetry_found"] = found
        write_json(self.folder / SYMMETRY_JSON, found[self.half])
        self._add_time("symmetry search", time.time() - t0)

    def _align_halves(self) -> None:
        """Left to the coordinator: half B applies its result at the start of phase 2."""

    def _record_pass(self, n: int) -> None:
        run = self.half_run
        _save_npz(
            self.folder / pass_map_name(n + 1),
            map=self.volumes[self.half],
            symmetry=run.settings.symmetry,
            n_sgd_iterations=run.schedule.n_iterations,
        )
        n_passes = run.settings.n_final_passes
        self._write_status(stage="passes", passes_done=n + 1, n_passes=n_passes)

    def _write_status(self, **status) -> None:
        write_json(self.folder / STATUS_JSON, dict(status, half=self.half, pid=os.getpid(), time=time.time()))


def _job_settings(data: dict) -> JobSettings:
    """JobSettings from its asdict() form."""
    return JobSettings(**dict(data, abinit=AbinitSettings(**data["abinit"])))


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when the coordinator dies (it then stops at a checkpoint)."""
    parent = os.environ.get("HABINIT_COORDINATOR_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        raise WorkerError(f"the coordinator (process {parent}) is gone: nothing to work for")


def half_worker_job(out: str | Path, half: str, phase: int) -> None:
    """``habinit half``: phase 1 or 2 of half ``half`` of the job prepared in ``out`` (``halves/job.json``)."""
    from .jobs import open_job  # jobs imports this module's callers; imported here to keep the layers apart

    _die_with_parent()
    spec_path = halves_folder(out) / JOB_JSON
    if not spec_path.is_file():
        raise ValueError(f"{spec_path} is missing: run habinit run --parallel-halves (--stage prepare) first")
    spec = read_json(spec_path)
    settings = _job_settings(spec["settings"])
    device = DeviceSettings(**spec["device"])
    xp, limit, particles, abinit, _ = open_job(
        spec["particles"], spec["image_root"], device, settings.abinit, settings.keep_duplicates
    )
    settings = replace(settings, abinit=abinit)
    if job_key(particles, settings) != spec["job_key"]:
        raise ValueError(
            f"{spec['particles']} or the parameters changed since {spec_path} was written: rerun habinit run"
        )
    folder = half_folder(out, half)
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder, f"half {half}"):
        worker = HalfWorker(particles, settings, out, half, xp=xp, memory_limit_bytes=limit)
        worker.resume()
        log.info(f"half {half}, phase {phase}: {len(worker.half_run.particles)} particles; device {worker.device}")
        worker.run_phase(phase)
    log.info(f"half {half}: phase {phase} done")


# ------------------------------------------------------------------------ the coordinator


@dataclass(frozen=True)
class WorkerLaunch:
    """How the coordinator starts its workers: the job's input, the workers' device, and the stage to run
    (None: all of them; "prepare" or "align": that one only, for Scipion's steps)."""

    particles_path: str
    image_root: str | None
    device: DeviceSettings
    workers: WorkerSettings
    stage: str | None = None

    def job(self, particles: ParticleSet, settings: JobSettings, out, xp=np, memory_limit_bytes=None):
        """The coordinator, built as :func:`.jobs.gold_standard_job` builds its job."""
        return ParallelHalvesJob(particles, settings, out, self, xp=xp, memory_limit_bytes=memory_limit_bytes)

    def worker_environment(self, half: str) -> dict[str, str]:
        """The environment of a half's worker: its share of the CPU threads and, with --gpus, its GPUs."""
        threads = str(max(1, cpu_workers() // 2))
        env = dict(os.environ, HABINIT_THREADS=threads, HABINIT_COORDINATOR_PID=str(os.getpid()))
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, threads)  # a value the user set is kept
        gpus = self.workers.gpu_lists()
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[half]
        return env

    def describe(self) -> str:
        """The workers' devices, for the log and run.json."""
        gpus = self.workers.gpu_lists()
        if gpus:
            return f"2 workers: half A on GPU {gpus['A']}, half B on GPU {gpus['B']}"
        if self.device.device != "cpu":
            return f"2 workers, device {self.device.device}"
        return f"2 workers on the cpu ({max(1, cpu_workers() // 2)} thread(s) each)"


class ParallelHalvesJob:
    """The coordinator: the interface of :class:`.gold_standard.GoldStandardJob` for
    :func:`.jobs.gold_standard_job`, with the halves run by two worker processes."""

    def __init__(self, particles, settings: JobSettings, out, launch: WorkerLaunch, xp=np, memory_limit_bytes=None):
        self.particles = particles
        self.settings = settings
        self.out = Path(out)
        self.launch = launch
        self.xp = xp
        self.memory_limit_bytes = memory_limit_bytes
        self.used, self.unused, self.half_set, self.split_how = choose_particles(particles, settings)
        self.one_process_key = job_key(particles, settings)
        self.checkpoint = Checkpoint(self.out / CHECKPOINT, f"{self.one_process_key}/two workers")
        self.state = {"phase": "phase 1", "history": [], "timings": {}, "alignment": Alignment().to_dict()}
        self._seen: dict[str, tuple] = {}
        self._last_progress = 0.0

    @property
    def device(self) -> str:
        return self.launch.describe()

    @property
    def warnings(self) -> list[str]:
        return list(self.state.get("warnings", []))

    def resume(self) -> bool:
        """Load the coordinator's checkpoint; without one, the workers' folders are stale and removed."""
        if not self.checkpoint.exists():
            shutil.rmtree(halves_folder(self.out), ignore_errors=True)
            return False
        if not self.checkpoint.matches() and read_json(self.checkpoint.state_path).get("job_key") == (
            self.one_process_key
        ):
            raise CheckpointError(
                f"{self.checkpoint.folder} holds this job's checkpoint from one process: rerun without "
                "--parallel-halves / --gpus to resume it, or add --overwrite to start over with two workers"
            )
        self.state, _ = self.checkpoint.load()
        log.info(f"resumed from {self.checkpoint.folder} ({self.state['phase']})")
        return True

    def save(self) -> None:
        self.state.update(self.checkpoint.save(self.state, {}))

    def run(self) -> JobResult | None:
        """Every stage from the saved one on, or ``launch.stage`` only: "prepare" and "align" return None (no
        result yet); "outputs" starts no worker and returns the result of the halves' finished phase 2."""
        self._write_job_spec()
        stage = self.launch.stage
        self.save()
        if stage == "prepare":
            return None
        if self.state["phase"] == "phase 1":
            if stage is None:
                self._run_workers(1)
            self._align()
        if stage == "align":
            return None
        if self.state["phase"] == "phase 2":
            if stage is None:
                self._run_workers(2)
            self._record_passes()
        return self._result()

    def _write_job_spec(self) -> None:
        folder = halves_folder(self.out)
        folder.mkdir(parents=True, exist_ok=True)
        spec = {
            "particles": str(Path(self.launch.particles_path).resolve()),
            "image_root": self.launch.image_root,
            "settings": asdict(self.settings),
            "device": asdict(self.launch.device),
            "job_key": self.one_process_key,
        }
        write_json(folder / JOB_JSON, spec)

    # ------------------------------------------------------------------ the workers

    def _run_workers(self, phase: int) -> None:
        """Run both halves' workers for ``phase`` and wait for them, reporting their progress; a worker that
        fails stops the other (at its checkpoint) and raises :class:`WorkerError`."""
        t0 = time.time()
        logs = ", ".join(str(worker_log(self.out, half)) for half in HALVES)
        log.info(f"phase {phase}: halves A and B in two workers ({self.device}); their logs: {logs}")
        workers = {half: self._start_worker(half, phase) for half in HALVES}
        try:
            while any(p.poll() is None for p in workers.values()):
                failed = [h for h, p in workers.items() if p.poll() not in (None, 0)]
                if failed or stop.requested():
                    self._stop_workers(workers)
                    stop.check(f"phase {phase} of the halves' workers (each stopped at its checkpoint)")
                    raise WorkerError(self._failure(failed[0], phase, workers[failed[0]].returncode))
                self._report_progress()
                if phase == 1:
                    self._consume_snapshots()
                time.sleep(POLL_SECONDS)
            failed = [h for h, p in workers.items() if p.returncode != 0]
            if failed:
                raise WorkerError(self._failure(failed[0], phase, workers[failed[0]].returncode))
        finally:
            self._stop_workers(workers)
        if phase == 1:
            self._consume_snapshots()
        self._add_time(f"phase {phase} (wall, halves in parallel)", time.time() - t0)

    def _start_worker(self, half: str, phase: int) -> subprocess.Popen:
        command = [sys.executable, "-m", "habinit_plugin.engine", "half", "--out", str(self.out)]
        command += ["--half", half, "--phase", str(phase)]
        with open(worker_log(self.out, half), "a") as log_file:
            # its own session: a Ctrl-C in the terminal reaches the coordinator only, which stops the workers once
            return subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.launch.worker_environment(half),
                start_new_session=True,
            )

    @staticmethod
    def _stop_workers(workers: dict[str, subprocess.Popen]) -> None:
        """SIGTERM to every running worker (it saves a checkpoint at its next safe point), then wait for it."""
        for half, process in workers.items():
            if process.poll() is None:
                log.info(f"stopping half {half}'s worker (process {process.pid}) at its next checkpoint")
                process.send_signal(signal.SIGTERM)
        for process in workers.values():
            process.wait()

    def _failure(self, half: str, phase: int, returncode: int) -> str:
        """One line naming the worker and its log, then the log's last lines."""
        how = (
            f"was killed by {signal.Signals(-returncode).name}"
            if returncode < 0
            else f"exited with status {returncode}"
        )
        path = worker_log(self.out, half)
        try:
            tail = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            tail = ["(no log)"]
        other = "B" if half == "A" else "A"
        return (
            f"half {half}'s worker {how} in phase {phase} (log: {path}); half {other}'s worker was stopped at its "
            "checkpoint; rerun the same command to resume both\n" + "\n".join(f"  {path.name}: {line}" for line in tail)
        )

    def _status(self, half: str) -> dict:
        try:
            return read_json(half_folder(self.out, half) / STATUS_JSON)
        except OutputError:
            return {}

    def _report_progress(self) -> None:
        """A line when a half has moved on by 10 SGD iterations or a pass, and at least every PROGRESS_SECONDS."""
        statuses = {half: self._status(half) for half in HALVES}
        keys = {h: (s.get("stage"), s.get("iteration", 0) // 10, s.get("passes_done")) for h, s in statuses.items()}
        if keys == self._seen and time.time() - self._last_progress < PROGRESS_SECONDS:
            return
        self._seen, self._last_progress = keys, time.time()
        parts = []
        for half, s in statuses.items():
            if s.get("stage") == "sgd":
                parts.append(
                    f"half {half} SGD iteration {s['iteration']}/{s['n_iterations']} at {s['resolution_A']:.1f} A, "
                    f"about {s['minutes_left']:.1f} min left"
                )
            elif s.get("stage") == "passes":
                parts.append(f"half {half} full pass {s['passes_done']}/{s['n_passes']} done")
            elif s.get("stage"):
                parts.append(f"half {half}: {s['stage']}")
            else:
                parts.append(f"half {half} starting")
        log.info("; ".join(parts))

    # --------------------------------------------------------- what needs both halves

    def _transform(self, volume: np.ndarray, alignment: Alignment) -> np.ndarray:
        return to_numpy(transform_map(self.xp.asarray(volume), alignment, memory_limit_bytes=self.memory_limit_bytes))

    def _add_time(self, phase: str, seconds: float) -> None:
        self.state["timings"][phase] = self.state["timings"].get(phase, 0.0) + seconds

    def _consume_snapshots(self) -> None:
        """The GS-FSC of every iteration both workers have a snapshot of (reporting only); the snapshots
        are removed once their entry is in the checkpoint."""
        folders = {half: half_folder(self.out, half) for half in HALVES}
        done = {e["iteration"] for e in self.state["history"] if e["phase"] == "sgd"}
        names = sorted(
            {p.name for p in folders["A"].glob("sgd_*.npz")} & {p.name for p in folders["B"].glob("sgd_*.npz")}
        )
        for name in names:
            iteration = int(name[4:9])
            if iteration not in done:
                t0 = time.time()
                self._monitor_snapshots(iteration, *(_load_npz(folders[h] / name) for h in HALVES))
                self._add_time("alignment", time.time() - t0)
                self.save()
            for folder in folders.values():
                (folder / name).unlink(missing_ok=True)

    def _monitor_snapshots(self, iteration: int, a: dict, b: dict) -> None:
        map_a, map_b = a["map"], b["map"]
        box = max(map_a.shape[0], map_b.shape[0])
        map_a, map_b = (m if m.shape[0] == box else to_numpy(resample_volume(m, box)) for m in (map_a, map_b))
        px = self.particles.pixel_size * self.particles.box / box
        t0 = time.time()
        extent = max(float(m.get("extent_fraction", 1.0)) for m in (a, b))  # snapshots before it: the whole box
        entry = monitor_entry(
            map_a,
            map_b,
            px,
            str(a["symmetry"]),
            iteration,
            float(a["working_resolution_A"]),
            self._transform,
            self.xp,
            extent,
        )
        self.state["history"].append(entry)
        self.state["history"].sort(key=lambda e: e["iteration"])
        log_monitor(entry, time.time() - t0)

    def _align(self) -> None:
        """B onto A from their pass-1 maps (and, with --symmetry-after-sgd, the check of the axes each found)."""
        t0 = time.time()
        self._consume_snapshots()
        self._check_found_symmetry()
        a, b = (_load_npz(self._half_file(h, pass_map_name(1))) for h in HALVES)
        px = self.particles.pixel_size
        alignment = align_maps(a["map"], b["map"], px, xp=self.xp, symmetry=str(a["symmetry"]))
        write_json(halves_folder(self.out) / ALIGNMENT_JSON, alignment.to_dict())
        log_alignment(alignment)
        self.state["alignment"] = alignment.to_dict()
        aligned_b = self._transform(b["map"], alignment)
        self.state["history"].append(pass_entry(a["map"], aligned_b, px, int(a["n_sgd_iterations"]), 0))
        self._add_time("alignment", time.time() - t0)
        self.state["phase"] = "phase 2"
        self.save()

    def _half_file(self, half: str, name: str) -> Path:
        path = half_folder(self.out, half) / name
        if not path.is_file():
            raise ValueError(f"{path} is missing: half {half}'s worker has not finished that phase")
        return path

    def _check_found_symmetry(self) -> None:
        symmetry = self.settings.abinit.symmetry
        if not self.settings.symmetry_after_sgd or is_trivial(symmetry) or "symmetry_found" in self.state:
            return
        maps = {h: _load_npz(self._half_file(h, SGD_MAP_NPZ))["map"] for h in HALVES}
        found = {h: read_json(self._half_file(h, SYMMETRY_JSON)) for h in HALVES}
        between = halves_correlation(maps["A"], maps["B"], self.particles.pixel_size, self._transform)
        message = symmetry_warning(symmetry, [fit["agreement"] for fit in found.values()], between)
        if message:
            log.warning(f"warning: {message}")
            self.state.setdefault("warnings", []).append(message)
        self.state["symmetry_found"] = dict(found, halves_correlation=between)

    def _record_passes(self) -> None:
        """The GS-FSC after every pass from the second on (B's maps are aligned onto A from then on)."""
        n_passes = self.settings.abinit.n_final_passes
        for n in range(1, n_passes):
            a, b = (_load_npz(self._half_file(h, pass_map_name(n + 1))) for h in HALVES)
            entry = pass_entry(a["map"], b["map"], self.particles.pixel_size, int(a["n_sgd_iterations"]), n)
            self.state["history"].append(entry)
        self.state["phase"] = "done"
        self.save()

    def _result(self) -> JobResult:
        halves = {h: HalfResult(**_load_npz(self._half_file(h, RESULT_NPZ))) for h in HALVES}
        timings = dict(self.state["timings"])
        for half in HALVES:
            for phase, seconds in self._status(half).get("timings", {}).items():
                timings[phase] = timings.get(phase, 0.0) + seconds  # summed over the halves, as one process sums
        return job_result(self, halves, dict(self.state, timings=timings))
