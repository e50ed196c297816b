"""Direct (Wiener) reconstruction of a map from particles with known poses.

With D = sum_i P_i^T (C_i X_i / s2) (backprojected CTF-weighted data) and
W = sum_i P_i^T (C_i^2 / s2) (backprojected weights), the map's Fourier grid is
``D / (W + 1/tau2)``, where tau2 is the signal power prior per shell; from the
half-map FSC, ``W * tau2 = FSC / (1 - FSC)`` on average over a shell (RELION).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .backend import array_module, to_device, to_numpy
from .ctf import evaluate_ctf
from .fourier import (
    half_plane_frequencies,
    image_rfft,
    phase_shift,
    radial_shells,
    sample_spectra,
    shell_mean,
)
from .fsc import fsc, ssnr_from_fsc
from .gpu_budget import chunk_size_for_budget, particle_bytes
from .oom import StagedSum
from .projector import backproject, grid_to_volume, hermitian_symmetrize, slice_coordinates
from .symmetry import symmetrise_grid

log = logging.getLogger("habinit")


def particle_spectra(images, freqs, origins):
    """Centred half-plane spectra of particle images.

    images: (B, N, N) real; freqs: (M, 2); origins: (B, 2) RELION origins in pixels
    (particle centre at N//2 - origin). Returns (B, M) complex64 spectra of the
    images translated by +origin, i.e. with the particle at the box centre.
    """
    box = images.shape[-1]
    return sample_spectra(image_rfft(images), freqs) * phase_shift(freqs, origins, box)


def reconstruction_frequencies(box: int) -> np.ndarray:
    """Half-plane frequencies used for a full-resolution reconstruction: |k| <= N/2 - 1."""
    return half_plane_frequencies(box // 2 - 1)


@dataclass
class Backprojection:
    """Running Wiener sums on a centred Fourier grid of size oversampling * box.

    data: (G, G, G) complex64 sum of P^T (C X / s2); weight: (G, G, G) float32 sum
    of P^T (C^2 / s2). Only half-plane samples are inserted: :meth:`symmetric`
    completes them with their Friedel mates.
    """

    data: object
    weight: object
    box: int
    oversampling: int
    symmetry: str = "C1"
    complete: bool = False  # data and weight already hold the Friedel mates and the group's copies

    @classmethod
    def zeros(cls, box: int, oversampling: int = 2, xp=np, symmetry: str = "C1") -> Backprojection:
        size = box * oversampling
        zeros = xp.zeros((size,) * 3, dtype=xp.complex64), xp.zeros((size,) * 3, dtype=xp.float32)
        return cls(*zeros, box, oversampling, symmetry)

    def insert(self, spectra, ctf, rotations, freqs, inv_noise=None) -> None:
        """Add particles: spectra (B, M) centred, ctf (B, M), rotations (B, 3, 3), freqs (M, 2).

        inv_noise: optional 1/s2 per frequency, (M,) or (B, M).
        """
        xp = array_module(spectra)
        coords = slice_coordinates(xp.asarray(rotations), xp.asarray(freqs))
        weight = ctf if inv_noise is None else ctf * inv_noise
        size = self.data.shape[0]
        backproject((weight * spectra).astype(xp.complex64), coords, size, self.oversampling, out=self.data)
        backproject((weight * ctf).astype(xp.float32), coords, size, self.oversampling, out=self.weight)

    def symmetric(self):
        """(data, weight) with the Friedel mates of every inserted sample added, summed over the point group
        (as RELION symmetrises its sums once, before the division)."""
        if self.complete:
            return self.data, self.weight
        data, weight = hermitian_symmetrize(self.data), hermitian_symmetrize(self.weight)
        return symmetrise_grid(data, self.symmetry, self.oversampling), symmetrise_grid(
            weight, self.symmetry, self.oversampling
        )

    def completed(self) -> Backprojection:
        """The sums with their Friedel mates and group copies added once, for maps made from them many times."""
        return Backprojection(*self.symmetric(), self.box, self.oversampling, self.symmetry, complete=True)

    def __add__(self, other: Backprojection) -> Backprojection:
        if self.complete != other.complete or self.symmetry != other.symmetry:
            raise ValueError("sums of different kinds cannot be added")
        data, weight = self.data + other.data, self.weight + other.weight
        return Backprojection(data, weight, self.box, self.oversampling, self.symmetry, self.complete)


def grid_shells(size: int, oversampling: int, xp=np):
    """Shell index (Fourier pixels of the box) of every voxel of a grid of ``size``."""
    radius = radial_shells((size,) * 3, xp).astype(xp.float32) / oversampling
    return xp.rint(radius).astype(xp.int32)


def shell_weight_means(weight, oversampling: int, n_shells: int):
    """Mean backprojected weight per shell, (n_shells,) on the grid's device."""
    shells = grid_shells(weight.shape[0], oversampling, array_module(weight))
    return shell_mean(weight, shells, n_shells)


def regularisation(weight, oversampling: int, tau2) -> object:
    """Per-voxel 1/tau2 for a grid of weights, from tau2 per shell (n_shells,).

    Shells beyond the end of ``tau2`` get a prior that zeroes them.
    """
    xp = array_module(weight)
    tau2 = xp.asarray(tau2, dtype=xp.float64)
    shells = grid_shells(weight.shape[0], oversampling, xp)
    inv = xp.concatenate([1.0 / xp.maximum(tau2, 1e-30), xp.asarray([1e30])])
    return inv[xp.minimum(shells, len(tau2))].astype(xp.float32)


def tau2_from_fsc(fsc_curve, weight, oversampling: int):
    """Signal prior per shell from the half-map FSC: SSNR / mean shell weight (RELION)."""
    xp = array_module(weight)
    n = len(fsc_curve)
    mean_w = shell_weight_means(weight, oversampling, n)
    return xp.asarray(ssnr_from_fsc(fsc_curve)) / xp.maximum(mean_w, 1e-30)


def wiener_map(bp: Backprojection, tau2=None, relative_floor: float = 1e-3):
    """Real-space map (box, box, box) float32 from backprojection sums.

    tau2: signal prior per shell (Fourier pixels of the box); None gives a nearly
    unregularised map (1/tau2 = relative_floor * mean shell weight).
    """
    xp = array_module(bp.data)
    data, weight = bp.symmetric()
    if tau2 is None:
        mean_w = shell_weight_means(weight, bp.oversampling, bp.box // 2 + 1)
        tau2 = 1.0 / (relative_floor * xp.maximum(mean_w, 1e-30))
    grid = data / (weight + regularisation(weight, bp.oversampling, tau2))
    return grid_to_volume(grid, bp.box)


def gold_standard_maps(bp_a: Backprojection, bp_b: Backprojection):
    """Half maps regularised by their own FSC, as RELION does.

    Returns (map_a, map_b, fsc_curve) where the curve (host, box//2 + 1 shells) is
    the FSC of the nearly unregularised half maps used to set the prior.
    """
    raw_a, raw_b = wiener_map(bp_a), wiener_map(bp_b)
    curve = fsc(raw_a, raw_b)
    maps = []
    for bp in (bp_a, bp_b):
        _, weight = bp.symmetric()
        maps.append(wiener_map(bp, tau2_from_fsc(curve, weight, bp.oversampling)))
    return maps[0], maps[1], curve


def reconstruct_half_maps(
    particles,
    half_set,
    xp=np,
    batch_size: int = 1000,
    oversampling: int = 2,
    memory_limit_bytes: int | None = None,
    symmetry: str = "C1",
):
    """Wiener half maps of a particle set from its poses, with the point group ``symmetry`` imposed.

    particles: ParticleSet with rotations and shifts; half_set: (P,) values 1 or 2;
    memory_limit_bytes: the GPU memory budget the batch size is fitted to (None: no limit).
    Returns (map_a, map_b, fsc_curve), maps as host float32 (box, box, box).
    """
    if particles.rotations is None:
        raise ValueError(f"{particles.source}: particles have no poses (_rlnAngleRot/Tilt/Psi) to reconstruct from")
    box = particles.box
    freqs = reconstruction_frequencies(box)
    freqs_dev = xp.asarray(freqs)
    halves = {h: Backprojection.zeros(box, oversampling, xp, symmetry) for h in (1, 2)}
    grids = [a for bp in halves.values() for a in (bp.data, bp.weight)]
    if memory_limit_bytes:  # the sums and their scratch copies (StagedSum) stay on the device
        fixed = 2 * sum(a.nbytes for a in grids)
        batch_size = chunk_size_for_budget(
            particle_bytes(box), memory_limit_bytes, fixed, max_size=batch_size, fraction=0.8
        )

    def add(index, arrays):  # arrays: [data 1, weight 1, data 2, weight 2], the sums or their scratch
        images = to_device(particles.read_images(index), xp)
        ctf = evaluate_ctf(particles.ctf.subset(index).to(xp), freqs_dev, particles.pixel_size, box)
        spectra = particle_spectra(images, freqs_dev, xp.asarray(particles.shifts[index]))
        for k, half in enumerate((1, 2)):
            mine = xp.asarray(np.flatnonzero(half_set[index] == half))
            if len(mine):
                bp = Backprojection(arrays[2 * k], arrays[2 * k + 1], box, oversampling)
                bp.insert(spectra[mine], ctf[mine], xp.asarray(particles.rotations[index])[mine], freqs_dev)

    with StagedSum(grids) as sums:
        for start in range(0, len(particles), batch_size):
            index = np.arange(start, min(start + batch_size, len(particles)))
            sums.run(add, index)
            log.info(f"backprojected {index[-1] + 1}/{len(particles)} particles")
    map_a, map_b, curve = gold_standard_maps(halves[1].completed(), halves[2].completed())
    return to_numpy(map_a), to_numpy(map_b), curve
