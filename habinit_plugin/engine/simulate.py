"""Synthetic particles from a map, with known poses, CTF and noise.

Images are central slices of the map (trilinear on a 4x oversampled grid with
gridding correction), multiplied by a RELION CTF, translated, and given white
Gaussian noise. SNR is the mean per-pixel variance of the noise-free images
(over the whole box) divided by the noise variance; the noise has unit variance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import array_module, to_numpy
from .ctf import CTFParams, evaluate_ctf
from .fourier import image_irfft, phase_shift
from .mrc import new_stack, write_map
from .outputs import atomic_write
from .projector import project, slice_coordinates, volume_to_grid
from .so3 import matrix_to_euler, random_rotations
from .star import StarBlock, write_star

log = logging.getLogger("habinit")


@dataclass
class SimulationSettings:
    """What to simulate. Lengths in Angstrom unless stated."""

    n_particles: int = 5000
    snr: float = 0.1
    defocus_min: float = 10000.0
    defocus_max: float = 25000.0
    astigmatism_max: float = 500.0
    shift_sigma: float = 3.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor: float = 0.0
    seed: int = 0
    batch_size: int = 500
    oversampling: int = 4  # finer than the engine's 2, so the simulator is not the reconstructor's twin


@dataclass
class SimulatedPoses:
    """Ground truth: rotations (P, 3, 3), origins (P, 2) pixels, CTF parameters."""

    rotations: np.ndarray
    origins: np.ndarray
    ctf: CTFParams


def random_poses(settings: SimulationSettings, pixel_size: float, box: int) -> SimulatedPoses:
    """Uniform rotations, Gaussian shifts (clipped at 3 sigma), random defocus and astigmatism."""
    rng = np.random.default_rng(settings.seed)
    n = settings.n_particles
    rotations = random_rotations(n, rng)
    sigma = settings.shift_sigma / pixel_size
    origins = np.clip(rng.normal(0.0, sigma, size=(n, 2)), -3 * sigma, 3 * sigma)
    origins = np.clip(origins, -box / 8, box / 8)
    defocus = rng.uniform(settings.defocus_min, settings.defocus_max, n)
    astig = rng.uniform(0.0, settings.astigmatism_max, n)
    full = np.ones(n)
    ctf = CTFParams(
        defocus_u=defocus + astig / 2,
        defocus_v=defocus - astig / 2,
        defocus_angle=rng.uniform(0.0, 180.0, n),
        voltage=settings.voltage * full,
        cs=settings.cs * full,
        amplitude_contrast=settings.amplitude_contrast * full,
        phase_shift=0.0 * full,
        bfactor=settings.bfactor * full,
    )
    return SimulatedPoses(rotations, origins, ctf)


def rfft_frequencies(box: int) -> np.ndarray:
    """(kx, ky) of every coefficient of an rfft image layout, (box * (box//2 + 1), 2)."""
    ky = np.fft.fftfreq(box, 1.0 / box).astype(np.int32)
    kx = np.arange(box // 2 + 1, dtype=np.int32)
    grid_y, grid_x = np.meshgrid(ky, kx, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def clean_images(grid, poses: SimulatedPoses, index, pixel_size: float, box: int, oversampling: int = 2):
    """Noise-free CTF-modulated, shifted projections of particles ``index``, (B, N, N) float32."""
    xp = array_module(grid)
    freqs = xp.asarray(rfft_frequencies(box))
    rotations = xp.asarray(poses.rotations[index])
    spectra = project(grid, slice_coordinates(rotations, freqs), oversampling)
    ctf = evaluate_ctf(poses.ctf.subset(index).to(xp), freqs, pixel_size, box)
    # the particle centre is at box//2 - origin: move the content by -origin
    spectra = spectra * ctf * phase_shift(freqs, -xp.asarray(poses.origins[index]), box)
    return image_irfft(spectra.reshape(len(index), box, box // 2 + 1), box)


def simulate_dataset(
    volume: np.ndarray, pixel_size: float, out_dir: str | Path, settings: SimulationSettings, xp=np
) -> dict[str, Path]:
    """Write a simulated particle set to ``out_dir``.

    Files: ``particles.mrcs`` (stack), ``particles.star`` (CTF, no poses),
    ``gt_poses.star`` (the same with the true poses), ``gt_map.mrc`` (the map).
    Returns their paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    box = volume.shape[0]
    poses = random_poses(settings, pixel_size, box)
    grid = volume_to_grid(xp.asarray(volume, dtype=xp.float32), settings.oversampling)
    rng = np.random.default_rng(settings.seed + 1)
    n = settings.n_particles
    stack_path = out / "particles.mrcs"
    if not settings.snr > 0:
        raise ValueError(f"--snr must be positive (inf for noise-free images), got {settings.snr}")
    noise_sigma = scale = None
    with atomic_write(stack_path) as tmp:
        stack = new_stack(tmp, n, box, pixel_size)
        try:
            for start in range(0, n, settings.batch_size):
                index = np.arange(start, min(start + settings.batch_size, n))
                images = to_numpy(clean_images(grid, poses, index, pixel_size, box, settings.oversampling))
                if noise_sigma is None:  # calibrate on the first batch, then keep fixed
                    noise_sigma = float(np.sqrt(np.mean(np.var(images, axis=(1, 2))) / settings.snr))
                    scale = 1.0 / noise_sigma if noise_sigma > 0 else 1.0
                noise = rng.normal(0.0, noise_sigma, size=images.shape) if noise_sigma > 0 else 0.0
                stack.data[index] = ((images + noise) * scale).astype(np.float32)
                log.info(f"simulated {index[-1] + 1}/{n} particles")
            stack.flush()
        finally:
            stack.close()
    write_map(out / "gt_map.mrc", volume * scale, pixel_size)
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    optics = _optics_block(settings, pixel_size, box)
    write_star(out / "particles.star", [optics, _particles_block(names, poses.ctf)])
    with_poses = _particles_block(names, poses.ctf)
    angles = matrix_to_euler(poses.rotations)
    for j, column in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        with_poses.set_column(column, angles[:, j])
    with_poses.set_column("rlnOriginXAngst", poses.origins[:, 0] * pixel_size)
    with_poses.set_column("rlnOriginYAngst", poses.origins[:, 1] * pixel_size)
    write_star(out / "gt_poses.star", [optics, with_poses])
    return {
        "stack": stack_path,
        "particles": out / "particles.star",
        "gt_poses": out / "gt_poses.star",
        "gt_map": out / "gt_map.mrc",
    }


def _optics_block(settings: SimulationSettings, pixel_size: float, box: int) -> StarBlock:
    columns = [
        "rlnOpticsGroup",
        "rlnOpticsGroupName",
        "rlnAmplitudeContrast",
        "rlnSphericalAberration",
        "rlnVoltage",
        "rlnImagePixelSize",
        "rlnImageSize",
        "rlnImageDimensionality",
    ]
    row = [
        "1",
        "opticsGroup1",
        f"{settings.amplitude_contrast:.6f}",
        f"{settings.cs:.6f}",
        f"{settings.voltage:.6f}",
        f"{pixel_size:.6f}",
        str(box),
        "2",
    ]
    return StarBlock("optics", columns, [row])


def _particles_block(names: list[str], ctf: CTFParams) -> StarBlock:
    block = StarBlock("particles", [], [[] for _ in names])
    block.set_column("rlnImageName", names)
    block.set_column("rlnImageId", np.arange(1, len(names) + 1))
    block.set_column("rlnOpticsGroup", np.ones(len(names), dtype=np.int64))
    block.set_column("rlnDefocusU", ctf.defocus_u)
    block.set_column("rlnDefocusV", ctf.defocus_v)
    block.set_column("rlnDefocusAngle", ctf.defocus_angle)
    block.set_column("rlnPhaseShift", ctf.phase_shift)
    block.set_column("rlnCtfBfactor", ctf.bfactor)
    return block
