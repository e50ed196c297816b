"""Jobs as the command line runs them: input checks, resume, outputs.

``gold_standard_job`` is ``habinit run`` (and what the Scipion protocol calls);
``single_abinit_job`` is ``habinit abinit`` (one map from all particles).
"""

from __future__ import annotations

import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import __version__
from .abinit import AbinitRun, AbinitSettings, refine_passes
from .backend import device_name, get_xp
from .checkpoint import CheckpointError, read_json, write_json
from .mrc import write_map
from .outputs import clear_completion, write_outputs
from .particles import load_particles, write_particles_star
from .refine import GoldStandardJob, JobSettings

QUICK_SCHEDULE = {
    "n_initial_iterations": 40,
    "n_final_iterations": 20,
    "initial_batch": 60,
    "final_batch": 150,
    "n_final_passes": 2,
}


def clamp_max_resolution(settings: AbinitSettings, pixel_size: float, box: int, log) -> list[str]:
    """Clamp a maximum resolution finer than Nyquist; returns the warnings given."""
    nyquist = 2.0 * pixel_size
    if settings.max_resolution is not None and settings.max_resolution < nyquist:
        message = (
            f"maximum resolution {settings.max_resolution:g} A is finer than Nyquist ({nyquist:g} A at "
            f"{pixel_size:g} A/px): using Nyquist"
        )
        log(f"warning: {message}")
        settings.max_resolution = None
        return [message]
    return []


def _versions() -> dict:
    import scipy

    return {
        "habinit": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def _open_inputs(particles_path: str, device: str, image_root, settings: AbinitSettings, log):
    """The array module, the particles (validated) and the warnings about the settings."""
    xp = get_xp(device)
    particles = load_particles(particles_path, image_root=image_root)
    return xp, particles, clamp_max_resolution(settings, particles.pixel_size, particles.box, log)


def prepare_output(out: Path, overwrite: bool) -> None:
    """Create the output folder; with ``overwrite`` remove our files (checkpoint and outputs) first."""
    if overwrite and out.exists():
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
        clear_completion(out)
    out.mkdir(parents=True, exist_ok=True)


def gold_standard_job(
    particles_path: str,
    out: str | Path,
    settings: JobSettings,
    device: str = "cpu",
    overwrite: bool = False,
    image_root: str | None = None,
    log=print,
) -> dict:
    """Run or resume ``habinit run``; returns run.json's content."""
    t0 = time.time()
    xp, particles, warnings = _open_inputs(particles_path, device, image_root, settings.abinit, log)
    out = Path(out)
    job = GoldStandardJob(particles, settings, out, xp=xp, log=log)
    prepare_output(out, overwrite)
    resumed = job.resume()
    if not resumed and (out / "run.json").exists():
        clear_completion(out)
    if job.state.get("phase") == "done" and (out / "run.json").exists():
        log(f"{out} already holds the finished result of this job")
        return read_json(out / "run.json")
    log(
        f"{len(particles)} particles ({len(job.used)} used, {len(job.unused)} unused), box {particles.box}, "
        f"{particles.pixel_size:g} A/px, {job.split_how}; device {device_name(xp)}"
    )
    result = job.run()
    result.warnings.extend(warnings)
    info = {
        "command": "run",
        "particles": str(Path(particles_path).resolve()),
        "parameters": settings.to_dict(),
        "seed": settings.seed,
        "device": device_name(xp),
        "versions": _versions(),
        "split": job.split_how,
        "resumed": resumed,
        "wall_seconds_this_session": time.time() - t0,
    }
    info = write_outputs(out, particles, result, info)
    log(
        f"gold-standard FSC 0.143 at {result.resolution_0143:.2f} A, 0.5 at {result.resolution_05:.2f} A; "
        f"{len(result.used)} particles used, {len(result.unused)} unused"
    )
    log(f"outputs in {out}: half_map_A.mrc, half_map_B.mrc, particles.star, fsc.json, plots, run.json")
    return info


def single_abinit_job(
    particles_path: str,
    out: str | Path,
    settings: AbinitSettings,
    device: str = "cpu",
    save_every: int = 50,
    image_root: str | None = None,
    log=print,
) -> dict:
    """``habinit abinit``: one map from every given particle (no half sets)."""
    t0 = time.time()
    xp, particles, warnings = _open_inputs(particles_path, device, image_root, settings, log)
    if len(particles) < 2:
        raise ValueError(f"{particles_path}: ab initio needs at least 2 particles, found {len(particles)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = AbinitRun(particles, settings, xp=xp, log=log)
    log(f"{len(particles)} particles, box {particles.box}, {particles.pixel_size:g} A/px; device {device_name(xp)}")

    def save_map(r: AbinitRun, entry) -> None:
        if save_every and (entry.iteration + 1) % save_every == 0:
            write_map(out / f"map_iteration_{entry.iteration + 1:04d}.mrc", r.model_map(), particles.pixel_size)

    run.run_sgd(report_every=1, on_iteration=save_map)
    t_sgd = time.time() - t0
    result = refine_passes(run, log=log)
    write_map(out / "map.mrc", result.volume, particles.pixel_size)
    write_particles_star(out / "particles.star", particles, None, run.rotations, run.origins)
    info = {
        "command": "abinit",
        "status": "finished",
        "particles": str(Path(particles_path).resolve()),
        "parameters": asdict(settings),
        "device": device_name(xp),
        "versions": _versions(),
        "resolution_0143_within_set": result.resolution,
        "iterations": [asdict(h) for h in run.history],
        "timings": {"sgd": t_sgd, "passes": time.time() - t0 - t_sgd},
        "warnings": warnings,
    }
    write_json(out / "run.json", info)
    log(f"map: {out / 'map.mrc'}; particles with poses: {out / 'particles.star'}")
    return info


__all__ = ["gold_standard_job", "single_abinit_job", "CheckpointError", "QUICK_SCHEDULE"]
