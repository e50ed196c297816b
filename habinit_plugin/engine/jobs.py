"""Jobs as the command line runs them: inputs, device, resume, and the files they leave.

``gold_standard_job`` is ``habinit run`` (and what the Scipion protocol calls);
``single_abinit_job`` is ``habinit abinit`` (one map from all particles);
``reconstruct_job`` is ``habinit reconstruct`` (half maps from known poses).
File names, the JSON and FSC formats are :mod:`.outputs`'.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from . import __version__, plots
from .abinit import AbinitRun, run_sgd
from .backend import device_name, get_xp
from .cryosparc import write_particles_cs
from .folder_lock import folder_lock
from .fsc import fsc, resolution_at
from .gold_standard import GoldStandardJob, JobResult
from .gpu_budget import set_gpu_memory_limit
from .halves import assign_half_sets, duplicated_images, refuse_duplicated_images
from .mrc import write_map
from .normalisation import ImageNormalisation, measure_stack, sample_rows
from .orientation import orientation_report
from .outputs import (
    CHECKPOINT,
    FSC_JSON,
    FSC_STAR,
    HALF_MAP_A,
    HALF_MAP_B,
    HALF_MAPS,
    MAP,
    MASK,
    PARTICLES_CS,
    PARTICLES_STAR,
    RUN_JSON,
    UNUSED_PARTICLES_STAR,
    ResultError,
    clear_completion,
    existing_outputs,
    fsc_report,
    fsc_star_columns,
    fsc_star_rows,
    map_at_iteration,
    read_json,
    write_json,
)
from .particles import ParticleError, ParticleSet, load_particles, write_particles_star
from .passes import run_passes
from .reconstruct import reconstruct_half_maps
from .settings import AbinitSettings, DeviceSettings, JobSettings, particle_warnings
from .solvent_mask import mask_and_masked_fsc
from .star import StarBlock, write_star
from .symmetry import canonical_poses

log = logging.getLogger("habinit")

CPU = DeviceSettings()


def open_device(device: DeviceSettings):
    """(array module, GPU memory limit in bytes or None) for a run, with the pool capped."""
    xp = get_xp(device.device)
    return xp, set_gpu_memory_limit(xp, device.gpu_mem_GB)


# Images are scanned for NaN/inf before any work on the CPU, and on a GPU when they take at most this much
# (float32). Measured (bench/input_checks.py): 0.8-1 GB/s, 0.03% of a CPU job at box 64 or 256, but 6-8% of
# an H100 job (est.): a GPU job scans up to 200 MB (a quarter of a second) up front, and checks larger stacks
# as it reads them, naming the input row all the same.
GPU_SCAN_LIMIT_BYTES = 2e8


def open_job(
    particles_path: str,
    image_root: str | None,
    device: DeviceSettings,
    settings: AbinitSettings,
    keep_duplicates: bool = True,
):
    """(array module, GPU memory limit, particles, settings with the maximum resolution clamped, warnings).

    Everything about the input that can be checked before the work is checked here; images on several
    rows are refused unless ``keep_duplicates``."""
    xp, limit = open_device(device)
    particles = load_particles(particles_path, image_root=image_root)
    if not keep_duplicates:
        refuse_duplicated_images(particles)
    if xp is np or particles.image_bytes <= GPU_SCAN_LIMIT_BYTES:
        particles.check_images()
    particles = normalised(particles, settings.invert_contrast, particles_path)
    settings, warnings = clamp_max_resolution(settings, particles.pixel_size)
    return xp, limit, particles, settings, warnings + duplicate_warnings(particles)


def normalised(particles: ParticleSet, invert_contrast: bool, path: str) -> ParticleSet:
    """The particles with their images normalised (background mean 0, the stack's noise sd 1, the sign flipped
    with ``invert_contrast``); a ParticleError when the contrast contradicts ``invert_contrast``."""
    noise_sd, contrast = measure_stack(particles.read_images(sample_rows(len(particles))))
    if contrast.dark_particles and not invert_contrast:
        raise ParticleError(
            f"{path}: the particles are darker than the background (mean contrast {contrast.z:.1f} standard errors "
            f"over {contrast.n_images} images): the stack was not contrast-inverted; rerun with --invert-contrast "
            "('Invert contrast?' in Scipion) or invert it at extraction"
        )
    if contrast.white_particles and invert_contrast:
        raise ParticleError(
            f"{path}: --invert-contrast was given but the particles are already brighter than the background "
            f"(mean contrast {contrast.z:.1f} standard errors over {contrast.n_images} images): leave it out"
        )
    log.info(
        f"images: background noise sd {noise_sd:.4g} (the job divides by it), particle contrast "
        f"{contrast.z:+.1f} standard errors ({'inverted by --invert-contrast' if invert_contrast else 'as stored'})"
    )
    return replace(particles, normalisation=ImageNormalisation(noise_sd, -1.0 if invert_contrast else 1.0))


def duplicate_warnings(particles: ParticleSet) -> list[str]:
    """The warning (logged) for images kept on several rows, or none."""
    n_images, _ = duplicated_images(particles)
    if not n_images:
        return []
    message = (
        f"{n_images} image(s) stand on more than one row: each copy counts as a particle (the copies of an "
        "image are kept in one half set)"
    )
    log.warning(f"warning: {message}")
    return [message]


def clamp_max_resolution(settings: AbinitSettings, pixel_size: float) -> tuple[AbinitSettings, list[str]]:
    """The settings with a maximum resolution finer than Nyquist removed, and the warnings given."""
    nyquist = 2.0 * pixel_size
    if settings.max_resolution_A is not None and settings.max_resolution_A < nyquist:
        message = (
            f"maximum resolution {settings.max_resolution_A:g} A is finer than Nyquist ({nyquist:g} A at "
            f"{pixel_size:g} A/px): using Nyquist"
        )
        log.warning(f"warning: {message}")
        return replace(settings, max_resolution_A=None), [message]
    return settings, []


def _versions() -> dict:
    import scipy

    return {
        "habinit": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def check_output_folder(out: Path, box: int, n_maps: int) -> None:
    """Create ``out`` and check, before the work, that it is writable and has room for the checkpoint and
    the outputs of ``n_maps`` maps (an OSError or a ValueError naming the folder)."""
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".habinit_write_test"
    with open(probe, "wb") as f:
        f.write(b"0" * 4096)
    probe.unlink()
    needed = n_maps * (12 * (2 * box) ** 3 + 16 * box**3)  # each map's grid and weights, maps, margins
    free = shutil.disk_usage(out).free
    if free < needed:
        raise ValueError(
            f"{out}: only {free / 1e6:.0f} MB free, the checkpoint and outputs need about {needed / 1e6:.0f} MB"
        )


def prepare_output(out: Path, overwrite: bool) -> None:
    """With ``overwrite``, remove our files (checkpoint and completion) from the output folder."""
    if overwrite and out.exists():
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
        clear_completion(out)


def check_result(maps: dict[str, np.ndarray], curve: np.ndarray | None = None) -> None:
    """A ResultError, before anything is written, when a map holds NaN or infinite voxels or the FSC is NaN."""
    for name, volume in maps.items():
        bad = int(np.count_nonzero(~np.isfinite(volume)))
        if bad:
            raise ResultError(f"{name} has {bad} NaN or infinite voxel(s): no result written")
    if curve is not None and not np.all(np.isfinite(curve)):
        raise ResultError("the FSC is NaN (a map is empty or constant): no result written")


def write_fsc_files(out: Path, curve: np.ndarray, pixel_size: float, **context) -> dict:
    """fsc.json (with ``context``, e.g. the particle count) and fsc.star of an FSC curve; returns the
    report (resolutions in A)."""
    resolutions = resolution_at(curve, 0.143, pixel_size), resolution_at(curve, 0.5, pixel_size)
    report = dict(fsc_report(curve, pixel_size, *resolutions), **context)
    write_json(out / FSC_JSON, report)
    write_star(out / FSC_STAR, [StarBlock("fsc", fsc_star_columns(report), fsc_star_rows(report))])
    return report


# --------------------------------------------------------------------- habinit run


def gold_standard_job(
    particles_path: str,
    out: str | Path,
    settings: JobSettings,
    device: DeviceSettings = CPU,
    overwrite: bool = False,
    image_root: str | None = None,
    restart_changed: bool = False,
    make_job=GoldStandardJob,
) -> dict:
    """Run or resume ``habinit run``; returns run.json's content.

    ``restart_changed`` starts over when ``out`` holds the checkpoint of another job (other
    particles or parameters) instead of refusing it. ``make_job(particles, settings, out, xp=,
    memory_limit_bytes=)`` builds the job: one process, or the two workers of :mod:`.parallel_halves`
    (whose single stages return no result: then the job's state is returned, and nothing is written).
    """
    t0 = time.time()
    xp, limit, particles, abinit, warnings = open_job(
        particles_path, image_root, device, settings.abinit, settings.keep_duplicates
    )
    settings = replace(settings, abinit=abinit)
    out = Path(out)
    job = make_job(particles, settings, out, xp=xp, memory_limit_bytes=limit)
    ctf = particles.ctf.subset(job.used)
    negative = int(np.sum((ctf.defocus_u < 0) | (ctf.defocus_v < 0)))
    for message in particle_warnings(int(np.sum(job.half_set == 1)), int(np.sum(job.half_set == 2)), negative):
        log.warning(f"warning: {message}")
        warnings.append(message)
    check_output_folder(out, particles.box, n_maps=2)
    with folder_lock(out, "run"):  # before anything in the folder is read or changed
        if restart_changed and job.checkpoint.exists() and not job.checkpoint.matches():
            log.info(f"{out} holds the checkpoint of other particles or parameters: starting over")
            overwrite = True
        prepare_output(out, overwrite)
        resumed = job.resume()
        if not resumed and (out / RUN_JSON).exists():
            clear_completion(out)
        if job.state.get("phase") == "done" and (out / RUN_JSON).exists():
            log.info(f"{out} already holds the finished result of this job")
            return read_json(out / RUN_JSON)
        log.info(
            f"{len(particles)} particles ({len(job.used)} used, {len(job.unused)} unused), box {particles.box}, "
            f"{particles.pixel_size:g} A/px, {job.split_how}; device {job.device}"
        )
        result = job.run()
        if result is None:
            return dict(job.state)
        warnings += job.warnings
        info = {
            "command": "run",
            "particles": str(Path(particles_path).resolve()),
            "parameters": asdict(settings),
            "seed": settings.abinit.seed,
            "device": job.device,
            "versions": _versions(),
            "split": job.split_how,
            "symmetry": settings.abinit.symmetry,  # of the half maps: run RELION downstream with this --sym
            "resumed": resumed,
            "wall_seconds_this_session": time.time() - t0,
            "warnings": warnings,
        }
        info = write_run_outputs(out, particles, result, info)
    log.info(
        f"gold-standard FSC 0.143 at {result.resolution_0143:.2f} A, 0.5 at {result.resolution_05:.2f} A; "
        f"{len(result.used)} particles used, {len(result.unused)} unused"
    )
    log.info(f"outputs in {out}: {', '.join(info['outputs'])}, {RUN_JSON}")
    return info


def write_run_outputs(out: Path, particles: ParticleSet, result: JobResult, run_info: dict) -> dict:
    """Write every output file of ``habinit run``, run.json last; returns run.json's content."""
    clear_completion(out)
    check_result({f"half map {name}": volume for name, volume in result.maps.items()}, result.fsc)
    px = particles.pixel_size
    for name, path in HALF_MAPS.items():
        write_map(out / path, result.maps[name], px)
    write_map(out / MAP, 0.5 * (result.maps["A"] + result.maps["B"]), px)
    scores = {"rlnLogLikeliContribution": result.score, "rlnMaxValueProbDistribution": result.max_probability}
    write_particles_star(
        out / PARTICLES_STAR, particles, result.used, result.rotations, result.origins, result.half_set, scores
    )
    write_particles_cs(
        out / PARTICLES_CS, particles, result.used, result.rotations, result.origins, result.half_set, result.scale
    )
    unused_path = out / UNUSED_PARTICLES_STAR
    if len(result.unused):
        write_particles_star(unused_path, particles, result.unused)
    else:
        unused_path.unlink(missing_ok=True)
    masked = mask_and_masked_fsc(out, result.maps["A"], result.maps["B"], result.fsc, px, MASK)
    report = write_fsc_files(out, result.fsc, px, masked=masked)
    orientation = orientation_diagnostics(result.rotations, run_info.get("symmetry", "C1"), run_info["warnings"])
    history = {"history": result.history, "resolution_0143": result.resolution_0143}
    plots.write_pngs(out, report, history, result.rotations, result.maps["A"], result.maps["B"])
    info = dict(
        run_info,
        status="finished",
        resolution_0143=result.resolution_0143,
        resolution_05=result.resolution_05,
        n_input=len(particles),
        n_used=len(result.used),
        n_unused=len(result.unused),
        alignment_B_to_A=result.alignment.to_dict(),
        orientation=orientation,
        particle_scale=_percentiles(result.scale),
        history=result.history,
        timings=result.timings,
        outputs=existing_outputs(out),
    )
    write_json(out / RUN_JSON, info)
    return info


def orientation_diagnostics(rotations: np.ndarray, symmetry: str, warnings: list[str]) -> dict:
    """How well the views cover the sphere (:func:`.orientation.orientation_report`), logged; its warning is
    logged and added to ``warnings``."""
    report = orientation_report(rotations, symmetry)
    log.info(
        f"views: sampling compensation factor SCF* {report['scf_star']:.2f} (1 uniform, below "
        f"{report['scf_threshold']:.2f} poor); {100 * report['preferred_fraction']:.0f}% of the views within "
        f"{report['preferred_cone_deg']:.0f} deg of the most populated direction"
    )
    if report["warning"]:
        log.warning(f"warning: {report['warning']}")
        warnings.append(report["warning"])
    return report


def _percentiles(values: np.ndarray) -> dict:
    """5th, 50th and 95th percentiles of per-particle values, for run.json."""
    return {f"p{q}": float(np.percentile(values, q)) for q in (5, 50, 95)}


# ------------------------------------------------------------------ habinit abinit


def single_abinit_job(
    particles_path: str,
    out: str | Path,
    settings: AbinitSettings,
    image_root: str | None = None,
    device: DeviceSettings = CPU,
    save_every: int = 50,
) -> dict:
    """``habinit abinit``: one map from every given particle (no half sets), written every ``save_every``
    SGD iterations."""
    t0 = time.time()
    xp, limit, particles, settings, warnings = open_job(particles_path, image_root, device, settings)
    if len(particles) < 2:
        raise ValueError(f"{particles_path}: ab initio needs at least 2 particles, found {len(particles)}")
    out = Path(out)
    check_output_folder(out, particles.box, n_maps=1)
    with folder_lock(out, "abinit"):
        return _single_abinit(particles_path, out, particles, settings, xp, limit, save_every, warnings, t0)


def _single_abinit(particles_path, out: Path, particles, settings, xp, limit, save_every, warnings, t0) -> dict:
    clear_completion(out)
    run = AbinitRun(particles, settings, xp=xp, memory_limit_bytes=limit)
    log.info(f"{len(particles)} particles, box {particles.box}, {particles.pixel_size:g} A/px; {device_name(xp)}")

    def save_map(t: int) -> None:
        if save_every and t % save_every == 0:
            write_map(out / map_at_iteration(t), run.model_map(), particles.pixel_size)

    state = {"pass": 0, "timings": {}}
    run_sgd({"map": run}, save_map, state["timings"])
    volumes: dict[str, np.ndarray] = {}
    run_passes({"map": run}, volumes, state)
    check_result({"the map": volumes["map"]})
    write_map(out / MAP, volumes["map"], particles.pixel_size)
    poses = canonical_poses(run.rotations, settings.symmetry)
    write_particles_star(out / PARTICLES_STAR, particles, None, poses, run.origins)
    info = {
        "command": "abinit",
        "symmetry": settings.symmetry,
        "status": "finished",
        "particles": str(Path(particles_path).resolve()),
        "parameters": asdict(settings),
        "device": device_name(xp),
        "versions": _versions(),
        "resolution_0143_within_set": state["pass_resolution"]["map"],
        "iterations": [asdict(h) for h in run.history],
        "timings": dict(state["timings"], total=time.time() - t0),
        "warnings": warnings,
    }
    write_json(out / RUN_JSON, info)
    log.info(f"map: {out / MAP}; particles with poses: {out / PARTICLES_STAR}")
    return info


# ------------------------------------------------------------- habinit reconstruct


def reconstruct_job(
    particles_path: str,
    out: str | Path,
    seed: int = 0,
    keep_split: bool = True,
    batch_size: int = 1000,
    device: DeviceSettings = CPU,
    image_root: str | None = None,
    keep_duplicates: bool = False,
    symmetry: str = "C1",
) -> dict:
    """``habinit reconstruct``: Wiener half maps from known poses, their FSC (fsc.json, as ``run``'s)."""
    xp, limit = open_device(device)
    particles = load_particles(particles_path, image_root=image_root)
    half, how = assign_half_sets(particles, seed, keep_split, keep_duplicates)
    duplicate_warnings(particles)
    log.info(
        f"{len(particles)} particles, box {particles.box}, {particles.pixel_size:g} A/px, {how}; "
        f"device {device_name(xp)}"
    )
    t0 = time.time()
    map_a, map_b, _ = reconstruct_half_maps(
        particles, half, xp=xp, batch_size=batch_size, memory_limit_bytes=limit, symmetry=symmetry
    )
    seconds = time.time() - t0
    curve = fsc(map_a, map_b)
    check_result({"half map A": map_a, "half map B": map_b}, curve)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_map(out / HALF_MAP_A, map_a, particles.pixel_size)
    write_map(out / HALF_MAP_B, map_b, particles.pixel_size)
    report = write_fsc_files(out, curve, particles.pixel_size, particles=len(particles), split=how)
    log.info(
        f"reconstructed in {seconds:.1f} s ({len(particles) / seconds:.0f} particles/s): "
        f"GS-FSC 0.143 at {report['resolution_0143']:.2f} A, 0.5 at {report['resolution_05']:.2f} A"
    )
    log.info(f"  half maps: {out / HALF_MAP_A}, {out / HALF_MAP_B}; FSC: {out / FSC_JSON}")
    return dict(report, seconds=seconds)
