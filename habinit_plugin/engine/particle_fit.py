"""How well each particle image fits the map at its best pose: scale, score, residual power.

With X the centred image spectrum, C its CTF, P the projection at the best pose and
s2 the noise variance per frequency, over the upper half of the search band:

    cross = Re<X C / s2, P>,   ctf_term = <C^2 / s2, |P|^2>   (Hermitian-weighted sums)

* scale: the least-squares amplitude of the projection in the image, cross / ctf_term
  (cryoSPARC's per-particle scale; RELION's normalisation correction): the signal of a
  particle in thicker ice, or of a lump that is not the particle, is weaker.
* score: the log-likelihood ratio of the image holding the projection at its best scale
  against holding no particle at all, cross^2 / (2 ctf_term) (0 for a negative
  cross term). Junk (empty picks, lumps of the wrong shape) scores low.
* residual power per shell of X - scale C P over every frequency up to Nyquist, the
  data the noise model is re-estimated from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import array_module, to_numpy
from .fourier import phase_shift
from .minibatch import ImageBatch
from .projector import project, slice_coordinates

MIN_SCALE, MAX_SCALE = 0.0, 5.0  # a scale outside is a failed fit, not a particle
# Scale and score leave out the lowest frequencies of the band, where anything of the particle's size and mass
# looks like it: on the whole band, lumps of the wrong shape (bench/real_data.py) scored above the particles
# (area under the ROC curve 0.10); junk has no signal in the upper half of the band.
FIT_BAND_START = 0.5


@dataclass
class ParticleFit:
    """Per particle (B,): scale, score, cross and CTF terms; residual_power (B, n_shells) summed
    over each integer shell's half-plane frequencies (Hermitian-weighted, as full-plane sums)."""

    scale: np.ndarray
    score: np.ndarray
    cross: np.ndarray
    ctf_term: np.ndarray
    residual_power: np.ndarray


def shell_bounds(radii: np.ndarray, n_shells: int) -> np.ndarray:
    """(n_shells + 1,) start of each integer shell in frequencies sorted by radius ``radii``."""
    return np.searchsorted(np.rint(radii), np.arange(n_shells + 1), side="left")


def shell_counts(radii: np.ndarray, n_shells: int) -> np.ndarray:
    """(n_shells,) number of full-plane frequencies per integer shell of sorted half-plane ``radii``."""
    weights = np.where(radii == 0, 1.0, 2.0)
    edges = shell_bounds(radii, n_shells)
    cumulative = np.concatenate([[0.0], np.cumsum(weights)])
    return cumulative[edges[1:]] - cumulative[edges[:-1]]


def per_shell(values, radii: np.ndarray, n_shells: int):
    """Sums (B, n_shells) of ``values`` (B, M) over the integer shells of sorted ``radii`` (host)."""
    xp = array_module(values)
    edges = xp.asarray(shell_bounds(radii, n_shells))
    cumulative = xp.concatenate([xp.zeros((values.shape[0], 1), dtype=values.dtype), xp.cumsum(values, axis=1)], 1)
    return cumulative[:, edges[1:]] - cumulative[:, edges[:-1]]


def fit_best_pose(grid, oversampling: int, batch: ImageBatch, rotations, origins, radius: float) -> ParticleFit:
    """The fit of every image of ``batch`` at its pose (rotations (B, 3, 3), origins (B, 2) pixels).

    grid: the reference's Fourier grid; batch: frequencies up to Nyquist, unscaled CTF;
    radius: the search band (Fourier pixels); scale and score are measured on its upper half,
    from ``FIT_BAND_START`` x radius to radius. Returns host arrays.
    """
    xp = array_module(batch.spectra)
    proj = project(grid, slice_coordinates(xp.asarray(rotations, dtype=xp.float32), batch.freqs), oversampling)
    centred = batch.spectra * phase_shift(batch.freqs, xp.asarray(origins), batch.box)
    model = batch.ctf * proj
    start, stop = batch.band(radius, FIT_BAND_START * radius)
    w = batch.noise_weight[start:stop]
    x, m = centred[:, start:stop], model[:, start:stop]
    cross = xp.sum((x * xp.conj(m)).real * w, axis=1)
    ctf_term = xp.sum((m.real**2 + m.imag**2) * w, axis=1)
    cross, ctf_term = to_numpy(cross).astype(np.float64), to_numpy(ctf_term).astype(np.float64)
    scale = np.clip(cross / np.maximum(ctf_term, 1e-30), MIN_SCALE, MAX_SCALE)
    score = 0.5 * np.maximum(cross, 0.0) ** 2 / np.maximum(ctf_term, 1e-30)
    residual = centred - xp.asarray(scale, dtype=xp.float32)[:, None] * model
    hermitian = xp.asarray(np.where(batch.radii == 0, 1.0, 2.0), dtype=xp.float32)
    power = (residual.real**2 + residual.imag**2) * hermitian
    n_shells = batch.box // 2 + 1
    return ParticleFit(scale, score, cross, ctf_term, to_numpy(per_shell(power, batch.radii, n_shells)))


def normalised_scales(scales: np.ndarray) -> np.ndarray:
    """Scales divided by their median (the map's own scale is arbitrary: the typical particle has 1)."""
    positive = scales[scales > 0]
    median = float(np.median(positive)) if len(positive) else 1.0
    return scales / median
