"""Synthetic particles from a map, with known poses, CTF and noise.

Images are central slices of the map (trilinear on an oversampled Fourier grid with
gridding correction), multiplied by a RELION CTF, translated, and given Gaussian
noise. SNR is the mean per-pixel variance of the noise-free particle images (over the
whole box; scales and envelope included, junk rows left out) divided by the noise
variance in real space, calibrated on the first batch; the noise has unit variance in
the written stack (before the intensity transform below).

The grid is 4x oversampled (finer than the engine's 2, so that the simulator is not
the reconstructor's twin) while that keeps it within 512^3 (boxes up to 128); larger
boxes get the oversampling that makes it 512^3 (2 at box 256, 4/3 at 384, 1 from 512
on), built in place in single precision (1 GiB). Memory is the grid plus one batch:
above box 128, batches hold at most 500 images of 128^2 pixels' worth (125 images at
box 256); the stack is written batch by batch through the file, never held in memory
(box 256, 10,000 particles: 1.8 GB peak resident memory on the CPU).

Effects of real particle stacks, each off by default (with the defaults, boxes up to 128
give the files the simulator wrote before the effects existed, bit for bit but for the
MRC headers' creation time), each drawn from its own seeded stream (turning one on
leaves the draws of the others as they were):

``envelope_bfactor_A2`` (B, A^2)
    The signal (never the noise) is multiplied by ``exp(-B s^2 / 4)``, s in 1/A
    (RELION's B-factor convention, amplitudes): a decay that the CTF parameters in
    the STAR file do not describe (rlnCtfBfactor stays ``bfactor``).
``noise_colour`` (c)
    Noise power spectrum ``P(s) = sigma^2 (1 + c exp(-(s L)^2)) / m``, L = 25 A
    (:data:`NOISE_COLOUR_LENGTH_A`), m the mean of ``1 + c exp(-(s L)^2)`` over the
    full FFT plane of the box, so that the real-space variance stays sigma^2 and the
    SNR means the same. The lowest frequencies have 1 + c times the power of the
    highest (5x at c = 4), as ice gives. White Gaussian noise filtered in Fourier space.
``preferred_fraction``, ``preferred_cone_deg``
    That fraction of the particles (rounded to a count, rows drawn at random) views the
    map along a direction drawn uniformly (in solid angle) within the cone of that
    half-angle around one random direction, with a uniform in-plane angle; the other
    particles keep their uniform rotations. The viewing direction of a pose matrix A
    (RELION's, :mod:`.so3`) is ``A^T e_z``, the row ``A[2, :]`` in the map's (x, y, z)
    frame: the map is projected along it.
``junk_fraction``
    That fraction of the images (rounded; rows at random) holds no particle: half of
    them (rounded down) a lump, the others only noise (empty picks). A lump is the
    projection of three random anisotropic 3D Gaussians of about the particle's radius
    of gyration, with the particle's integrated density (its low-resolution power,
    another shape), through the same CTF, envelope, shift, scale and noise.
``scale_sd``
    Each image's signal is multiplied by a scale ~ Normal(1, scale_sd) clipped to >= 0.2.
``intensity_scale``, ``intensity_offset``, ``invert_contrast``
    The written pixels are ``value * intensity_scale + intensity_offset`` (an
    unnormalised stack from another program); with ``invert_contrast`` the signal has
    the opposite sign (dark particles: a stack that was not contrast-inverted), the
    noise being the same.

The ground truth of all this is in ``truth.npz`` (see :func:`simulate_dataset`);
habinit itself never reads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import array_module, cpu_workers, is_cupy, to_numpy
from .ctf import CTFParams, evaluate_ctf
from .fourier import image_irfft, phase_shift
from .mrc import new_stack, write_map
from .outputs import atomic_write
from .projector import gridding_profile, project, slice_coordinates, volume_to_grid
from .so3 import euler_to_matrix, matrix_to_euler, random_rotations
from .star import StarBlock, write_star

log = logging.getLogger("habinit")

MAX_GRID = 512  # the simulator's Fourier grid is at most MAX_GRID^3 (unless the box is larger)
MAX_BATCH_PIXELS = 500 * 128 * 128  # images per batch above box 128: at most this many pixels
NOISE_COLOUR_LENGTH_A = 25.0  # the coloured noise's excess is exp(-(s * 25 A)^2)
LUMP_GAUSSIANS = 3
MIN_SCALE = 0.2

# one random stream per effect: np.random.default_rng([seed, stream])
_PREFERRED_STREAM, _JUNK_STREAM, _SCALE_STREAM = 1, 2, 3

JUNK_PARTICLE, JUNK_EMPTY, JUNK_LUMP = 0, 1, 2


@dataclass
class SimulationSettings:
    """What to simulate. Lengths in Angstrom unless stated; every effect below ``oversampling`` is off by
    default (see the module doc)."""

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
    envelope_bfactor_A2: float = 0.0  # signal only, not in the STAR: exp(-B s^2 / 4)
    noise_colour: float = 0.0  # noise power 1 + c exp(-(s * 25 A)^2), normalised
    preferred_fraction: float = 0.0  # of the particles, viewed from within the cone
    preferred_cone_deg: float = 15.0  # half-angle of that cone, degrees
    junk_fraction: float = 0.0  # of the images: half empty, half a lump
    scale_sd: float = 0.0  # per-image signal scale ~ N(1, sd), >= 0.2
    intensity_scale: float = 1.0  # written = value * intensity_scale + intensity_offset
    intensity_offset: float = 0.0
    invert_contrast: bool = False  # the signal with the opposite sign (dark particles)

    def check(self) -> None:
        """Raise ValueError (naming the command-line option) for a value out of range."""
        if not self.snr > 0:
            raise ValueError(f"--snr must be positive (inf for noise-free images), got {self.snr}")
        if not self.n_particles >= 1:
            raise ValueError(f"--n-particles must be at least 1, got {self.n_particles}")
        ranges = (
            ("--envelope-bfactor", self.envelope_bfactor_A2, 0.0, np.inf, "at least 0 (A^2)"),
            ("--coloured-noise", self.noise_colour, 0.0, np.inf, "at least 0"),
            ("--preferred-fraction", self.preferred_fraction, 0.0, 1.0, "in [0, 1]"),
            ("--preferred-cone", self.preferred_cone_deg, 1e-6, 180.0, "in (0, 180] degrees"),
            ("--scale-sd", self.scale_sd, 0.0, np.inf, "at least 0"),
            ("--intensity-offset", self.intensity_offset, -np.inf, np.inf, "finite"),
        )
        for option, value, low, high, what in ranges:
            if not (np.isfinite(value) and low <= value <= high):
                raise ValueError(f"{option} must be {what}, got {value}")
        if not (np.isfinite(self.junk_fraction) and 0.0 <= self.junk_fraction < 1.0):
            raise ValueError(f"--junk-fraction must be in [0, 1), got {self.junk_fraction}")
        if not (np.isfinite(self.intensity_scale) and self.intensity_scale > 0):
            raise ValueError(
                f"--intensity-scale must be positive (--invert-contrast flips the sign), got {self.intensity_scale}"
            )


@dataclass
class SimulatedPoses:
    """Ground truth: rotations (P, 3, 3), origins (P, 2) pixels, CTF parameters."""

    rotations: np.ndarray
    origins: np.ndarray
    ctf: CTFParams


@dataclass
class Lumps:
    """The junk lumps: rows (L,) of the stack; per lump K 3D Gaussians in pixels about the box centre,
    weights (L, K) (their integrals), centres (L, K, 3) (x, y, z), covariances (L, K, 3, 3)."""

    rows: np.ndarray
    weights: np.ndarray
    centres: np.ndarray
    covariances: np.ndarray


@dataclass
class SimulatedEffects:
    """Per-image truth of the effects: preferred_direction (3,) (NaN without preference),
    in_preferred_cone (P,) bool (drawn from the cone; uniform views that fall in it are False),
    junk_kind (P,) int8 (0 particle, 1 empty, 2 lump), scale (P,), lumps."""

    preferred_direction: np.ndarray
    in_preferred_cone: np.ndarray
    junk_kind: np.ndarray
    scale: np.ndarray
    lumps: Lumps


def random_poses(settings: SimulationSettings, pixel_size: float, box: int) -> SimulatedPoses:
    """Uniform rotations, Gaussian shifts (clipped at 3 sigma), random defocus and astigmatism.

    Preferred orientation is not here: :func:`draw_effects` replaces rotations of the preferred rows.
    """
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


def _effect_rng(settings: SimulationSettings, stream: int) -> np.random.Generator:
    return np.random.default_rng([settings.seed, stream])


def preferred_direction(settings: SimulationSettings) -> np.ndarray:
    """The centre of the preferred cone, (3,) unit vector in the map's (x, y, z) frame (NaN when no preference)."""
    if settings.preferred_fraction <= 0:
        return np.full(3, np.nan)
    v = _effect_rng(settings, _PREFERRED_STREAM).normal(size=3)
    return v / np.linalg.norm(v)


def viewing_directions(rotations) -> np.ndarray:
    """Direction along which pose matrices A (..., 3, 3) project the map: ``A^T e_z = A[2, :]``, (..., 3)."""
    return np.asarray(rotations)[..., 2, :]


def _frame(direction: np.ndarray) -> np.ndarray:
    """A rotation (3, 3) whose third column is ``direction``."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(direction[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(helper, direction)
    u /= np.linalg.norm(u)
    return np.stack([u, np.cross(direction, u), direction], axis=1)


def _preferred_views(settings: SimulationSettings, n: int):
    """(direction, rows, rotations (len(rows), 3, 3)) of the preferred particles."""
    direction = preferred_direction(settings)
    count = int(round(settings.preferred_fraction * n))
    if count == 0:
        return direction, np.zeros(0, dtype=np.int64), np.zeros((0, 3, 3))
    rng = _effect_rng(settings, _PREFERRED_STREAM)
    rng.normal(size=3)  # the direction's draw
    rows = np.sort(rng.choice(n, count, replace=False))
    cos_theta = rng.uniform(np.cos(np.deg2rad(settings.preferred_cone_deg)), 1.0, count)  # uniform on the cap
    phi = rng.uniform(0.0, 2 * np.pi, count)
    psi = rng.uniform(0.0, 360.0, count)
    sin_theta = np.sqrt(np.clip(1.0 - cos_theta**2, 0.0, None))
    local = np.stack([sin_theta * np.cos(phi), sin_theta * np.sin(phi), cos_theta], axis=1)
    views = local @ _frame(direction).T
    # RELION's A = Rz(psi) Ry(tilt) Rz(rot) has third row (sin tilt cos rot, sin tilt sin rot, cos tilt)
    rot = np.rad2deg(np.arctan2(views[:, 1], views[:, 0]))
    tilt = np.rad2deg(np.arccos(np.clip(views[:, 2], -1.0, 1.0)))
    return direction, rows, euler_to_matrix(rot, tilt, psi)


def particle_extent(volume: np.ndarray) -> tuple[float, float]:
    """(integrated density, radius of gyration in pixels about the box centre) of a map's positive part."""
    positive = np.clip(np.asarray(volume, dtype=np.float64), 0.0, None)
    total = float(positive.sum())
    box = volume.shape[0]
    if total <= 0:
        return 0.0, box / 8.0
    axis = (np.arange(box) - box // 2) ** 2.0
    r2 = (
        positive.sum(axis=(1, 2)) @ axis + positive.sum(axis=(0, 2)) @ axis + positive.sum(axis=(0, 1)) @ axis
    ) / total
    integral = float(np.asarray(volume, dtype=np.float64).sum())
    return (integral if integral > 0 else total), float(np.sqrt(r2))


def _draw_lumps(rng: np.random.Generator, rows: np.ndarray, integral: float, radius: float) -> Lumps:
    count, k = len(rows), LUMP_GAUSSIANS
    weights = rng.uniform(0.5, 1.0, (count, k))
    weights *= integral / weights.sum(axis=1, keepdims=True)
    centres = rng.normal(0.0, 0.35 * radius, (count, k, 3))
    sigmas = np.maximum(rng.uniform(0.25, 0.55, (count, k, 3)) * radius, 1.0)
    axes = random_rotations(count * k, rng).reshape(count, k, 3, 3)
    covariances = axes @ (sigmas[..., :, None] ** 2 * np.swapaxes(axes, -1, -2))
    return Lumps(rows, weights, centres, covariances)


def draw_effects(settings: SimulationSettings, poses: SimulatedPoses, volume: np.ndarray) -> SimulatedEffects:
    """Draw the per-image effects; the rotations of the preferred rows of ``poses`` are replaced in place."""
    n = settings.n_particles
    direction, rows, rotations = _preferred_views(settings, n)
    poses.rotations[rows] = rotations
    in_cone = np.zeros(n, dtype=bool)
    in_cone[rows] = True
    kind = np.zeros(n, dtype=np.int8)
    lump_rows = np.zeros(0, dtype=np.int64)
    rng = _effect_rng(settings, _JUNK_STREAM)
    count = int(round(settings.junk_fraction * n))
    if count:
        junk = rng.choice(n, count, replace=False)
        lump_rows = np.sort(junk[: count // 2])
        kind[junk] = JUNK_EMPTY
        kind[lump_rows] = JUNK_LUMP
    lumps = _draw_lumps(rng, lump_rows, *particle_extent(volume))
    scale = np.ones(n)
    if settings.scale_sd > 0:
        scale = np.maximum(_effect_rng(settings, _SCALE_STREAM).normal(1.0, settings.scale_sd, n), MIN_SCALE)
    return SimulatedEffects(direction, in_cone, kind, scale, lumps)


def rfft_frequencies(box: int) -> np.ndarray:
    """(kx, ky) of every coefficient of an rfft image layout, (box * (box//2 + 1), 2)."""
    ky = np.fft.fftfreq(box, 1.0 / box).astype(np.int32)
    kx = np.arange(box // 2 + 1, dtype=np.int32)
    grid_y, grid_x = np.meshgrid(ky, kx, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def _envelope(freqs, pixel_size: float, box: int, bfactor: float):
    """exp(-B s^2 / 4) at the frequencies (M, 2), (M,) float32."""
    xp = array_module(freqs)
    s2 = xp.sum(xp.asarray(freqs, dtype=xp.float64) ** 2, axis=1) / (box * pixel_size) ** 2
    return xp.exp(-bfactor * s2 / 4.0).astype(xp.float32)


def clean_images(
    grid,
    poses: SimulatedPoses,
    index,
    pixel_size: float,
    box: int,
    oversampling: float = 2,
    envelope_bfactor: float = 0.0,
):
    """Noise-free CTF-modulated, shifted projections of particles ``index``, (B, N, N) float32.

    ``envelope_bfactor`` (A^2) multiplies the spectra by exp(-B s^2 / 4) besides the CTF.
    """
    xp = array_module(grid)
    freqs = xp.asarray(rfft_frequencies(box))
    rotations = xp.asarray(poses.rotations[index])
    spectra = project(grid, slice_coordinates(rotations, freqs), oversampling)
    ctf = evaluate_ctf(poses.ctf.subset(index).to(xp), freqs, pixel_size, box)
    if envelope_bfactor:
        ctf = ctf * _envelope(freqs, pixel_size, box, envelope_bfactor)
    # the particle centre is at box//2 - origin: move the content by -origin
    spectra = spectra * ctf * phase_shift(freqs, -xp.asarray(poses.origins[index]), box)
    return image_irfft(spectra.reshape(len(index), box, box // 2 + 1), box)


def lump_images(
    lumps: Lumps, which, poses: SimulatedPoses, rows, pixel_size: float, box: int, envelope_bfactor=0.0, xp=np
):
    """Noise-free images of the lumps ``which`` (indices into ``lumps``) at stack rows ``rows``: each seen
    with that row's pose, CTF and shift (and the envelope), (B, N, N) float32.

    A 3D Gaussian (weight w, centre c, covariance S, pixels) seen with pose A is the 2D Gaussian of centre
    (A c)_xy and covariance (A S A^T)_xy, whose transform is w exp(-2 pi^2 k^T S k / N^2 - 2 pi i k.c / N).
    """
    freqs = xp.asarray(rfft_frequencies(box))
    a = poses.rotations[rows][:, None, :2, :]  # (B, 1, 2, 3)
    centres = (a @ lumps.centres[which][..., None])[..., 0]  # (B, K, 2)
    covariances = a @ lumps.covariances[which] @ np.swapaxes(a, -1, -2)  # (B, K, 2, 2)
    k = xp.asarray(freqs, dtype=xp.float64)
    quad = xp.einsum("mi,bkij,mj->bkm", k, xp.asarray(covariances), k)
    phase = xp.einsum("mi,bki->bkm", k, xp.asarray(centres))
    terms = xp.asarray(lumps.weights[which])[..., None] * xp.exp(
        -2.0 * np.pi**2 * quad / box**2 - 2j * np.pi * phase / box
    )
    spectra = terms.sum(axis=1)
    ctf = evaluate_ctf(poses.ctf.subset(rows).to(xp), freqs, pixel_size, box)
    if envelope_bfactor:
        ctf = ctf * _envelope(freqs, pixel_size, box, envelope_bfactor)
    spectra = (spectra * ctf * phase_shift(freqs, -xp.asarray(poses.origins[rows]), box)).astype(xp.complex64)
    return image_irfft(spectra.reshape(len(rows), box, box // 2 + 1), box)


def grid_oversampling(box: int, oversampling: float = 4) -> tuple[float, int]:
    """(oversampling, grid size) of the simulator's Fourier grid for a box: ``oversampling`` while the grid
    stays within MAX_GRID^3, else MAX_GRID / box (the grid MAX_GRID, or the box when that is larger)."""
    if oversampling * box <= MAX_GRID:
        return oversampling, int(round(oversampling * box))
    size = max(MAX_GRID, box + box % 2)
    return size / box, size


def simulation_grid(volume, oversampling: float = 4):
    """The projection grid of a map and its oversampling, ``(grid (G, G, G) complex64, oversampling)``.

    Within MAX_GRID^3 it is :func:`.projector.volume_to_grid`'s; beyond, the capped grid is built in place
    (single-precision FFT, the centring shifts as a (-1)^(x+y+z) modulation): about G^3 * 8 bytes in all.
    """
    xp = array_module(volume)
    box = volume.shape[0]
    factor, size = grid_oversampling(box, oversampling)
    if factor == oversampling:
        return volume_to_grid(volume, oversampling), oversampling
    corrected = volume / gridding_profile(box, size, xp)
    offsets = xp.arange(box) - box // 2
    sign = (1 - 2 * (offsets % 2)).astype(xp.float32)
    corrected = corrected * sign[:, None, None] * sign[None, :, None] * sign[None, None, :]
    grid = xp.zeros((size,) * 3, dtype=xp.complex64)
    where = offsets % size  # ifftshift: the box centre goes to index 0
    grid[where[:, None, None], where[None, :, None], where[None, None, :]] = corrected
    if is_cupy(xp):
        import cupyx.scipy.fft  # noqa: PLC0415

        grid = cupyx.scipy.fft.fftn(grid, overwrite_x=True)
    else:
        import scipy.fft  # noqa: PLC0415

        grid = scipy.fft.fftn(grid, overwrite_x=True, workers=cpu_workers())
    return grid, factor


def noise_filter(box: int, pixel_size: float, colour: float) -> np.ndarray:
    """Amplitude filter (N, N//2 + 1) (rfft layout) of the coloured noise: sqrt(1 + c exp(-(s L)^2)),
    normalised so that the mean of its square over the full N x N FFT plane is 1 (variance kept)."""
    f = np.fft.fftfreq(box) / pixel_size  # 1/A
    s = np.hypot(f[:, None], f[None, :])
    power = 1.0 + colour * np.exp(-((s * NOISE_COLOUR_LENGTH_A) ** 2))
    # the rfft columns kx = 0..N/2 are the full plane's first N/2 + 1 columns (fftfreq's -1/2 has the same |s|)
    return np.sqrt(power[:, : box // 2 + 1] / power.mean())


def _shell_index(box: int) -> np.ndarray:
    """Integer Fourier radius (rounded) of every coefficient of the rfft layout, (N, N//2 + 1)."""
    freqs = rfft_frequencies(box)
    return np.rint(np.hypot(freqs[:, 0], freqs[:, 1])).astype(np.int64).reshape(box, box // 2 + 1)


def noise_power_per_shell(box: int, pixel_size: float, colour: float, noise_sd: float) -> np.ndarray:
    """Expected |F(k)|^2 of noise of real-space standard deviation ``noise_sd``, F = :func:`.fourier.image_rfft`
    of the noise image (unnormalised: white noise has box^2 noise_sd^2 at every k), mean over the rfft
    coefficients of each shell 0..box//2 (integer Fourier radius, rounded), (box//2 + 1,)."""
    power = box**2 * noise_sd**2 * noise_filter(box, pixel_size, colour) ** 2
    shells = _shell_index(box)
    inside = shells <= box // 2
    sums = np.bincount(shells[inside], weights=power[inside], minlength=box // 2 + 1)
    counts = np.bincount(shells[inside], minlength=box // 2 + 1)
    return sums / np.maximum(counts, 1)


def _coloured(noise: np.ndarray, amplitude: np.ndarray) -> np.ndarray:
    box = noise.shape[-1]
    return np.fft.irfft2(np.fft.rfft2(noise) * amplitude, s=(box, box))


def simulate_dataset(
    volume: np.ndarray, pixel_size: float, out_dir: str | Path, settings: SimulationSettings, xp=np
) -> dict[str, Path]:
    """Write a simulated particle set to ``out_dir``.

    Files: ``particles.mrcs`` (stack), ``particles.star`` (CTF, no poses),
    ``gt_poses.star`` (the same with the true poses of every row: junk rows too, with the
    arbitrary poses their lumps were seen with; ``truth.npz`` tells which rows are junk),
    ``gt_map.mrc`` (the map, times ``image_scale``: the units of the stack before the
    intensity transform, positive contrast) and ``truth.npz`` (NumPy arrays, no pickles):

    ======================== ===========================================================
    rotations (P, 3, 3)      pose matrices (RELION's A; gt_poses.star's angles)
    origins_px (P, 2)        RELION origins (x, y), pixels (the particle centre is at box//2 - origin)
    defocus_u_A, defocus_v_A, defocus_angle_deg (P,)   the CTF, as in the STAR files
    scale (P,)               each image's signal scale (1 without ``scale_sd``)
    is_junk (P,) bool        rows without a particle
    junk_kind (P,) int8      0 particle, 1 empty (noise only), 2 lump
    lump_rows, lump_weights, lump_centres_px, lump_covariances_px2   the lumps' 3D Gaussians
    in_preferred_cone (P,)   rows drawn from the preferred cone (uniform views inside it are False)
    preferred_direction (3,) the cone's axis, map (x, y, z) frame, NaN without preference;
                             a pose A views along A[2, :]
    preferred_fraction, preferred_cone_deg
    noise_power_per_shell    (box//2 + 1,) expected |image_rfft(noise)|^2 per integer shell of the
                             noise as written (intensity_scale included)
    noise_colour, envelope_bfactor_A2, scale_sd, junk_fraction
    intensity_scale, intensity_offset, invert_contrast
    image_scale              what signal + noise were multiplied by (1 / noise sd) before the
                             intensity transform
    pixel_size_A, box, snr, seed, oversampling (of the projection grid)
    ======================== ===========================================================

    Returns the paths (keys stack, particles, gt_poses, gt_map, truth).
    """
    settings.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    box = volume.shape[0]
    poses = random_poses(settings, pixel_size, box)
    effects = draw_effects(settings, poses, np.asarray(to_numpy(volume)))
    grid, oversampling = simulation_grid(xp.asarray(volume, dtype=xp.float32), settings.oversampling)
    if oversampling != settings.oversampling:
        log.info(f"projection grid {grid.shape[0]}^3: oversampling {oversampling:g} (capped at {MAX_GRID}^3)")
    rng = np.random.default_rng(settings.seed + 1)
    n = settings.n_particles
    batch = settings.batch_size if box <= 128 else min(settings.batch_size, max(1, MAX_BATCH_PIXELS // box**2))
    stack_path = out / "particles.mrcs"
    amplitude = noise_filter(box, pixel_size, settings.noise_colour) if settings.noise_colour else None
    lump_of = np.full(n, -1, dtype=np.int64)
    lump_of[effects.lumps.rows] = np.arange(len(effects.lumps.rows))
    rescale = settings.scale_sd > 0
    transform = settings.intensity_scale != 1.0 or settings.intensity_offset != 0.0
    noise_sigma = scale = None
    with atomic_write(stack_path) as tmp:
        stack = new_stack(tmp, n, box, pixel_size)
        data_offset, dtype = 1024 + int(stack.header.nsymbt), stack.data.dtype
        stack.close()
        with open(tmp, "r+b") as f:  # written batch by batch: the stack never sits in memory
            for start in range(0, n, batch):
                index = np.arange(start, min(start + batch, n))
                images = to_numpy(
                    clean_images(grid, poses, index, pixel_size, box, oversampling, settings.envelope_bfactor_A2)
                )
                if rescale:
                    images = (images * effects.scale[index, None, None]).astype(np.float32)
                kind = effects.junk_kind[index]
                if noise_sigma is None:  # calibrate on the first batch's particles, then keep fixed
                    calibration = images[kind == JUNK_PARTICLE] if np.any(kind) else images
                    if len(calibration) == 0:
                        calibration = images
                    noise_sigma = float(np.sqrt(np.mean(np.var(calibration, axis=(1, 2))) / settings.snr))
                    scale = 1.0 / noise_sigma if noise_sigma > 0 else 1.0
                if np.any(kind):
                    images[kind == JUNK_EMPTY] = 0.0
                    lumps = np.flatnonzero(kind == JUNK_LUMP)
                    if len(lumps):
                        rows = index[lumps]
                        made = lump_images(
                            effects.lumps,
                            lump_of[rows],
                            poses,
                            rows,
                            pixel_size,
                            box,
                            settings.envelope_bfactor_A2,
                            xp,
                        )
                        images[lumps] = to_numpy(made) * effects.scale[rows, None, None]
                if settings.invert_contrast:
                    images = -images
                noise = rng.normal(0.0, noise_sigma, size=images.shape) if noise_sigma > 0 else 0.0
                if amplitude is not None and noise_sigma > 0:
                    noise = _coloured(noise, amplitude)
                pixels = (images + noise) * scale
                if transform:
                    pixels = pixels * settings.intensity_scale + settings.intensity_offset
                f.seek(data_offset + start * box * box * dtype.itemsize)
                f.write(np.ascontiguousarray(pixels, dtype=dtype).data)
                log.info(f"simulated {index[-1] + 1}/{n} particles")
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
    noise_sd = noise_sigma * scale * settings.intensity_scale
    truth = {
        "rotations": poses.rotations,
        "origins_px": poses.origins,
        "defocus_u_A": poses.ctf.defocus_u,
        "defocus_v_A": poses.ctf.defocus_v,
        "defocus_angle_deg": poses.ctf.defocus_angle,
        "scale": effects.scale,
        "is_junk": effects.junk_kind != JUNK_PARTICLE,
        "junk_kind": effects.junk_kind,
        "lump_rows": effects.lumps.rows,
        "lump_weights": effects.lumps.weights,
        "lump_centres_px": effects.lumps.centres,
        "lump_covariances_px2": effects.lumps.covariances,
        "in_preferred_cone": effects.in_preferred_cone,
        "preferred_direction": effects.preferred_direction,
        "preferred_fraction": settings.preferred_fraction,
        "preferred_cone_deg": settings.preferred_cone_deg,
        "noise_power_per_shell": noise_power_per_shell(box, pixel_size, settings.noise_colour, noise_sd),
        "noise_colour": settings.noise_colour,
        "envelope_bfactor_A2": settings.envelope_bfactor_A2,
        "scale_sd": settings.scale_sd,
        "junk_fraction": settings.junk_fraction,
        "intensity_scale": settings.intensity_scale,
        "intensity_offset": settings.intensity_offset,
        "invert_contrast": settings.invert_contrast,
        "image_scale": scale,
        "pixel_size_A": pixel_size,
        "box": box,
        "snr": settings.snr,
        "seed": settings.seed,
        "oversampling": oversampling,
    }
    with atomic_write(out / "truth.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **{key: np.asarray(value) for key, value in truth.items()})
    return {
        "stack": stack_path,
        "particles": out / "particles.star",
        "gt_poses": out / "gt_poses.star",
        "gt_map": out / "gt_map.mrc",
        "truth": out / "truth.npz",
    }


def describe_effects(settings: SimulationSettings) -> list[str]:
    """One line per effect that is on, for the log."""
    lines = []
    if settings.envelope_bfactor_A2:
        lines.append(
            f"envelope: signal times exp(-B s^2 / 4), B = {settings.envelope_bfactor_A2:g} A^2 (not in the STAR)"
        )
    if settings.noise_colour:
        lines.append(
            f"coloured noise: power 1 + {settings.noise_colour:g} exp(-(s * {NOISE_COLOUR_LENGTH_A:g} A)^2), "
            "normalised to the same variance"
        )
    if settings.preferred_fraction:
        d = preferred_direction(settings)
        lines.append(
            f"preferred orientation: {settings.preferred_fraction:.0%} of the particles viewed within "
            f"{settings.preferred_cone_deg:g} deg of ({d[0]:.3f}, {d[1]:.3f}, {d[2]:.3f})"
        )
    if settings.junk_fraction:
        lines.append(f"junk: {settings.junk_fraction:.0%} of the images, half empty, half lumps")
    if settings.scale_sd:
        lines.append(f"per-image signal scale ~ N(1, {settings.scale_sd:g}), at least {MIN_SCALE:g}")
    if settings.intensity_scale != 1.0 or settings.intensity_offset != 0.0:
        lines.append(f"intensities: written = value * {settings.intensity_scale:g} + {settings.intensity_offset:g}")
    if settings.invert_contrast:
        lines.append("inverted contrast: dark particles (a stack that was not contrast-inverted)")
    return lines


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
