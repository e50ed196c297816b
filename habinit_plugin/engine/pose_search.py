"""Pose search: coarse-to-fine over rotations x 2D shifts, scored with matrix products.

For an image X with CTF C and noise variance s2, a pose (rotation A, origin o) with
projection P = slice of the volume under A has the energy (minus log likelihood x 2,
up to a constant per image)

    E = -2 Re<X~ C / s2, P> + <C^2 / s2, |P|^2>,   X~ = X shifted to centre the origin o

summed over the half-plane frequencies of the current band with Hermitian weights.
With projections stacked as real rows [Re P, Im P], the cross term for many shifts
and rotations is one matrix product; the CTF^2 term is a second one.

Global search: every rotation of a Hopf grid level x a coarse shift grid, projections
computed once per minibatch; then the best ``beam`` poses of each image are refined
level by level (8 child rotations x 3x3 shifts at half the step, a wider band).
Local search: around given poses, a 3x3x3 cube of small rotations x 3x3 shifts
scored exhaustively, steps halved a few times. Neighbourhood search: a wider
neighbourhood of the best pose, whose kept poses and posterior weights are used to
marginalise over the pose in the reconstruction. Origins follow RELION: the particle centre is at
box//2 - origin, so an image is centred by translating it by +origin.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .backend import array_module, to_numpy
from .fourier import phase_shift
from .minibatch import ImageBatch
from .projector import project, slice_coordinates
from .so3 import grid_children, grid_rotations, rotvec_to_matrix
from .symmetry import asymmetric_unit


@dataclass
class SearchSettings:
    """Global search: Hopf levels, beam, shifts in pixels, bands in Fourier pixels."""

    coarse_level: int = 2
    final_level: int = 4
    beam: int = 8
    max_shift_px: float = 6.0
    coarse_shift_step_px: float = 2.0
    coarse_radius: float = 8.0
    final_radius: float = 12.0
    min_radius: float = 0.0
    chunk: int = 64
    device_bytes: float = 128e6
    scale_invariant: bool = False
    symmetry: str = "C1"  # the coarse level covers the asymmetric unit of this point group


@dataclass
class SearchResult:
    """Best poses per image, best first: rotations (B, K, 3, 3), origins (B, K, 2) pixels,
    energies (B, K) relative to the best (>= 0)."""

    rotations: np.ndarray
    origins: np.ndarray
    energies: np.ndarray

    def weights(self, temperature: float = 1.0) -> np.ndarray:
        """Posterior weights of the kept poses, exp(-E / (2 T)) normalised, (B, K)."""
        w = np.exp(-self.energies / (2.0 * max(temperature, 1e-6)))
        return w / w.sum(axis=1, keepdims=True)


@lru_cache(maxsize=8)
def _grid(level: int) -> np.ndarray:
    return grid_rotations(level)


def shift_grid(max_shift_px: float, step_px: float) -> np.ndarray:
    """Origins (S, 2) on a square grid of ``step_px`` pixels within a disc of ``max_shift_px``."""
    n = int(np.floor(max_shift_px / step_px + 1e-9))
    offsets = np.arange(-n, n + 1) * step_px
    sx, sy = np.meshgrid(offsets, offsets, indexing="xy")
    grid = np.stack([sx.ravel(), sy.ravel()], axis=1)
    return grid[np.hypot(grid[:, 0], grid[:, 1]) <= max_shift_px + 1e-9]


def _stack_real(z):
    """Complex (..., M) -> real (..., 2M) as [Re, Im]."""
    xp = array_module(z)
    return xp.concatenate([z.real, z.imag], axis=-1)


def _project_band(grid, oversampling, rotations, freqs):
    xp = array_module(grid)
    coords = slice_coordinates(xp.asarray(rotations, dtype=xp.float32), freqs)
    return project(grid, coords, oversampling)


def _combine(cross, ctf_term, scale_invariant: bool):
    """Energy from the cross term and the CTF^2 term (broadcast against each other).

    Plain: E = -2 cross + ctf_term. Scale-invariant: the energy at the best scale of
    the projection for each image, E = -max(cross, 0)^2 / ctf_term, which does not
    favour views whose projections happen to carry little power.
    """
    xp = array_module(cross)
    if scale_invariant:
        return -(xp.maximum(cross, 0.0) ** 2) / xp.maximum(ctf_term, 1e-30)
    return -2.0 * cross + ctf_term


def _shared_energies(batch: ImageBatch, band, proj, ramps, rows, scale_invariant: bool = False):
    """E (b, S, R) for images ``rows`` against shared projections (R, m) and shift ramps (S, m)."""
    xp = array_module(proj)
    lo, hi = band
    x = batch.spectra[rows, lo:hi]
    c = batch.ctf[rows, lo:hi]
    w = batch.noise_weight[lo:hi]
    shifted = (x * c * w)[:, None, :] * ramps[None, :, :]
    b, s = shifted.shape[:2]
    cross = _stack_real(shifted).reshape(b * s, -1) @ _stack_real(proj).T
    ctf_term = (c * c * w) @ (proj.real**2 + proj.imag**2).T
    return _combine(cross.reshape(b, s, -1), ctf_term[:, None, :], scale_invariant).astype(xp.float32)


def _local_energies(batch: ImageBatch, band, proj, centre_ramps, delta_ramps, rows, scale_invariant: bool = False):
    """Per-image candidates: proj (b, K, R, m), centre_ramps (b, K, m), delta_ramps (D, m).

    Returns E (b, K, D, R): rotation r of parent k with the parent's origin plus delta d.
    """
    lo, hi = band
    x = batch.spectra[rows, lo:hi]
    c = batch.ctf[rows, lo:hi]
    w = batch.noise_weight[lo:hi]
    base = (x * c * w)[:, None, :] * centre_ramps  # (b, K, m)
    shifted = base[:, :, None, :] * delta_ramps[None, None, :, :]  # (b, K, D, m)
    cross = _stack_real(shifted) @ _stack_real(proj).swapaxes(-1, -2)  # (b, K, D, R)
    power = proj.real**2 + proj.imag**2  # (b, K, R, m)
    ctf_term = (power @ (c * c * w)[:, None, :, None])[..., 0]  # (b, K, R)
    return _combine(cross, ctf_term[:, :, None, :], scale_invariant)


def _top_k(energies, k: int):
    """Indices (B, k) of the k smallest entries per row of (B, N), sorted, and their values."""
    xp = array_module(energies)
    k = min(k, energies.shape[1])
    part = xp.argpartition(energies, k - 1, axis=1)[:, :k]
    vals = xp.take_along_axis(energies, part, axis=1)
    order = xp.argsort(vals, axis=1)
    return xp.take_along_axis(part, order, axis=1), xp.take_along_axis(vals, order, axis=1)


def _band_radius(settings: SearchSettings, level: int) -> float:
    """Band of a grid level: the coarse band, doubled with every level (its angular step halves), at most the
    final band."""
    return min(settings.final_radius, settings.coarse_radius * 2.0 ** (level - settings.coarse_level))


def global_search(grid, oversampling: int, batch: ImageBatch, settings: SearchSettings) -> SearchResult:
    """Coarse-to-fine search over all rotations (of the asymmetric unit) and shifts within ``max_shift_px``."""
    xp = array_module(grid)
    n_images = batch.spectra.shape[0]
    beam = settings.beam
    # coarse level: all rotations, all coarse shifts, projections shared by the minibatch
    band = batch.band(_band_radius(settings, settings.coarse_level), settings.min_radius)
    freqs = batch.freqs[band[0] : band[1]]
    unit = asymmetric_unit(settings.coarse_level, settings.symmetry)
    rotations = _grid(settings.coarse_level)[unit]
    proj = _project_band(grid, oversampling, rotations, freqs)
    shifts = shift_grid(settings.max_shift_px, settings.coarse_shift_step_px)
    ramps = phase_shift(freqs, xp.asarray(shifts), batch.box)
    index = np.empty((n_images, beam), dtype=np.int64)
    origins = np.empty((n_images, beam, 2))
    chunk = max(1, int(2e7 // (len(shifts) * len(rotations))))
    for start in range(0, n_images, chunk):
        rows = slice(start, min(start + chunk, n_images))
        energies = _shared_energies(batch, band, proj, ramps, rows, settings.scale_invariant)  # (b, S, R)
        best_shift = xp.argmin(energies, axis=1)  # (b, R)
        per_rotation = xp.min(energies, axis=1)
        top, _ = _top_k(per_rotation, beam)
        index[rows] = unit[to_numpy(top)]
        origins[rows] = shifts[to_numpy(xp.take_along_axis(best_shift, top, axis=1))]
    step = settings.coarse_shift_step_px
    energies = None
    for level in range(settings.coarse_level + 1, settings.final_level + 1):
        step /= 2.0
        children = grid_children(level - 1, index)  # (B, K, 8)
        candidates = grid_rotations(level, children.reshape(-1)).reshape(n_images, -1, 8, 3, 3)
        band = batch.band(_band_radius(settings, level), settings.min_radius)
        deltas = shift_grid(step * 1.5, step)  # 3 x 3 neighbourhood at the new step
        invariant = settings.scale_invariant
        scored = _refine_candidates(grid, oversampling, batch, band, candidates, origins, deltas, settings, invariant)
        best, new_origins, energies = scored
        k_parent, r_child = np.divmod(best, 8 * len(deltas))
        index = np.take_along_axis(children.reshape(n_images, -1), k_parent * 8 + r_child % 8, axis=1)
        origins = new_origins
    final_rotations = grid_rotations(settings.final_level, index.reshape(-1)).reshape(n_images, -1, 3, 3)
    if energies is None:
        energies = np.zeros(index.shape)
    return SearchResult(final_rotations, origins, energies - energies[:, :1])


def _refine_candidates(
    grid, oversampling, batch, band, candidates, origins, deltas, settings, scale_invariant=False, keep=None
):
    """Score candidates (B, K, R, 3, 3) with origins (B, K, 2) + deltas (D, 2); keep the best
    ``keep`` (default K). From ``settings``: the largest shift and the images per chunk.

    Returns flat indices into (K, D, R) per image (B, keep), the new origins (B, keep, 2)
    and energies (B, keep) (host arrays).
    """
    xp = array_module(grid)
    n_images, n_parents, n_rot = candidates.shape[:3]
    beam = keep or n_parents
    lo, hi = band
    freqs = batch.freqs[lo:hi]
    delta_ramps = phase_shift(freqs, xp.asarray(deltas), batch.box)
    best = np.empty((n_images, beam), dtype=np.int64)
    new_origins = np.empty((n_images, beam, 2))
    energies = np.empty((n_images, beam))
    chunk = _device_chunk(xp, settings.chunk, settings.device_bytes, (n_parents, n_rot), band)
    for start in range(0, n_images, chunk):
        rows = slice(start, min(start + chunk, n_images))
        b = rows.stop - rows.start
        proj = _project_band(grid, oversampling, candidates[rows].reshape(-1, 3, 3), freqs)
        proj = proj.reshape(b, n_parents, n_rot, -1)
        centre_ramps = phase_shift(freqs, xp.asarray(origins[rows]), batch.box)
        e = _local_energies(batch, band, proj, centre_ramps, delta_ramps, rows, scale_invariant)  # (b, K, D, R)
        moved = origins[rows][:, :, None, :] + deltas[None, None, :, :]  # (b, K, D, 2)
        # beyond max_shift_px only moves back inwards are allowed (an origin may start outside,
        # e.g. after the half maps were aligned)
        distance = np.hypot(moved[..., 0], moved[..., 1])
        start = np.hypot(origins[rows][..., 0], origins[rows][..., 1])[:, :, None]
        outside = (distance > settings.max_shift_px + 1e-6) & (distance > start + 1e-6)
        e = e + xp.asarray(np.where(outside, np.inf, 0.0)[..., None], dtype=e.dtype)
        top, vals = _top_k(e.reshape(b, -1), beam)
        top = to_numpy(top)
        best[rows] = top
        k_parent, rest = np.divmod(top, len(deltas) * n_rot)
        d_idx = rest // n_rot
        new_origins[rows] = np.take_along_axis(origins[rows], k_parent[..., None], axis=1) + deltas[d_idx]
        energies[rows] = to_numpy(vals)
    return best, new_origins, energies


def _device_chunk(xp, chunk: int, device_bytes: float, candidates_per_image: tuple[int, int], band) -> int:
    """Images per chunk: ``chunk`` on the CPU; on a GPU enough (at least ``chunk``) for the
    candidates' projections (K x R per image over the band) to take about ``device_bytes``."""
    if xp is np:
        return chunk
    values_per_image = candidates_per_image[0] * candidates_per_image[1] * (band[1] - band[0])
    return max(chunk, int(device_bytes // (8 * values_per_image)))


@dataclass
class NeighbourhoodSettings:
    """Poses scored around each pose: rotations whose rotation vectors lie on a cubic grid
    (step and radius in degrees), times origins on a square grid (step and radius in
    pixels); the best ``keep`` poses are kept. Band in Fourier pixels."""

    angle_step_deg: float = 2.0
    angle_radius_deg: float = 3.6
    shift_step_px: float = 0.5
    shift_radius_px: float = 0.75
    keep: int = 1
    radius: float = 12.0
    min_radius: float = 0.0
    max_shift_px: float = 8.0
    chunk: int = 32
    device_bytes: float = 128e6


@lru_cache(maxsize=16)
def _neighbourhood(step_deg: float, radius_deg: float) -> np.ndarray:
    """Rotations (R, 3, 3) whose rotation vectors lie on a cubic grid of ``step_deg``
    within ``radius_deg`` of the identity (identity first)."""
    n = int(np.floor(radius_deg / step_deg + 1e-9))
    axis = np.arange(-n, n + 1) * step_deg
    vecs = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    vecs = vecs[np.linalg.norm(vecs, axis=1) <= radius_deg + 1e-9]
    vecs = vecs[np.argsort(np.linalg.norm(vecs, axis=1), kind="stable")]
    return rotvec_to_matrix(np.deg2rad(vecs))


def neighbourhood_search(
    grid, oversampling: int, batch: ImageBatch, rotations, origins, settings: NeighbourhoodSettings
) -> SearchResult:
    """Every pose of a neighbourhood of each given pose, scored exhaustively.

    rotations (B, 3, 3), origins (B, 2) pixels. Every rotation of the neighbourhood is
    combined with every origin of the shift grid and scored with the plain (not
    scale-invariant) energy, so that :meth:`SearchResult.weights` at temperature 1 is
    the posterior over the kept poses. Returns the best ``settings.keep`` poses per
    image, best first.
    """
    perturb = _neighbourhood(round(settings.angle_step_deg, 6), round(settings.angle_radius_deg, 6))
    candidates = np.einsum("pij,bjl->bpil", perturb, np.asarray(rotations, dtype=np.float64))[:, None]
    deltas = shift_grid(settings.shift_radius_px, settings.shift_step_px)
    band = batch.band(settings.radius, settings.min_radius)
    starts = np.asarray(origins, dtype=np.float64)[:, None]
    scored = _refine_candidates(
        grid, oversampling, batch, band, candidates, starts, deltas, settings, keep=settings.keep
    )
    best, new_origins, energies = scored
    r_idx = best % len(perturb)
    kept = np.take_along_axis(candidates[:, 0], r_idx[:, :, None, None], axis=1)
    return SearchResult(kept, new_origins, energies - energies[:, :1])


@dataclass
class LocalSettings:
    """Local search: first angular step (degrees) and shift step (pixels), number of
    levels (steps halve from one level to the next, shifts down to ``min_shift_step``),
    band (Fourier pixels)."""

    angle_step_deg: float = 4.0
    shift_step_px: float = 1.0
    n_levels: int = 4
    min_shift_step_px: float = 0.25
    radius: float = 12.0
    min_radius: float = 0.0
    max_shift_px: float = 8.0
    chunk: int = 32
    device_bytes: float = 128e6


def local_search(
    grid, oversampling: int, batch: ImageBatch, rotations, origins, settings: LocalSettings
) -> SearchResult:
    """Refine poses (B, 3, 3) and origins (B, 2) level by level around the best pose.

    Each level scores all 27 rotations of a 3 x 3 x 3 cube of rotation vectors (turns of
    0 or +-step about x, y and z, combined) times a 3 x 3 shift grid, exhaustively: a
    greedy walk one axis at a time stalls on noisy energies at low SNR.
    """
    angle, shift = settings.angle_step_deg, settings.shift_step_px
    result = None
    for _ in range(settings.n_levels):
        hood = NeighbourhoodSettings(
            angle_step_deg=angle,
            angle_radius_deg=1.8 * angle,  # the whole cube: corners at sqrt(3) steps
            shift_step_px=shift,
            shift_radius_px=1.5 * shift,
            radius=settings.radius,
            min_radius=settings.min_radius,
            max_shift_px=settings.max_shift_px,
            chunk=settings.chunk,
            device_bytes=settings.device_bytes,
        )
        result = neighbourhood_search(grid, oversampling, batch, rotations, origins, hood)
        rotations, origins = result.rotations[:, 0], result.origins[:, 0]
        angle, shift = angle / 2.0, max(shift / 2.0, settings.min_shift_step_px)
    return result
