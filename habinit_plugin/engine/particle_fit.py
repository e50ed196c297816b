"""How well each particle image fits the map at its best pose: scale, score, residual power.

With X the centred image spectrum, C its CTF, P the projection at the best pose and
s2 the noise variance per frequency, over a band of the search band:

    cross = Re<X C / s2, P>,   ctf_term = <C^2 / s2, |P|^2>   (Hermitian-weighted sums)

* scale: the least-squares amplitude of the projection in the image, cross / ctf_term
  over the upper half of the search band (cryoSPARC's per-particle scale; RELION's
  normalisation correction): the signal of a particle in thicker ice, or of a lump that
  is not the particle, is weaker.
* score: the log-likelihood ratio of the image holding the projection at its best scale
  against holding no particle at all, cross^2 / (2 ctf_term) (0 for a negative
  cross term), from the particle's R50 as a resolution to the search band's limit
  (:func:`score_band_start`). Junk (empty picks, lumps of the wrong shape) scores low.
* residual power per shell of X - scale C P over every frequency up to Nyquist, the
  data the noise model is re-estimated from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import array_module, to_numpy
from .fourier import phase_shift
from .geometry import MapGeometry
from .minibatch import ImageBatch
from .projector import project, slice_coordinates

MIN_SCALE, MAX_SCALE = 0.0, 5.0  # a scale outside is a failed fit, not a particle
FIT_BAND_START = 0.5  # the scale's band starts at this x the search band


@dataclass
class ParticleFit:
    """Per particle (B,): scale, score, cross and CTF terms (on the scale's band); residual_power (B, n_shells) summed
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


def score_band_start(geometry: MapGeometry, radius: float) -> float:
    """Where the score's band starts (Fourier pixels): the particle's R50 (:attr:`.MapGeometry.r50_px`) as a
    resolution, or ``FIT_BAND_START`` x the search band ``radius`` where that is lower.

    Below it anything of the particle's size and mass looks like it; above it an empty pick has no signal
    where the particle has most. At the job's poses and against its half maps on the 15% junk set of
    bench/real_data.py (PR LBD, R50 about 20 A, search band 6 A, SNR 0.05, coloured noise), the area under the
    ROC curve of the score for junk, by the band's start: 40 A 0.78 (lumps 0.57: they pass as particles),
    25 A 0.97, 20 A 0.96, 16 A 0.94, 12 A (the upper half of the search band, the scale's) 0.89 (empty picks
    0.82).
    """
    return min(geometry.radius(geometry.r50_px * geometry.pixel_size_A), FIT_BAND_START * radius)


def fit_best_pose(
    grid, oversampling: int, batch: ImageBatch, rotations, origins, radius: float, score_from: float | None = None
) -> ParticleFit:
    """The fit of every image of ``batch`` at its pose (rotations (B, 3, 3), origins (B, 2) pixels).

    grid: the reference's Fourier grid; batch: frequencies up to Nyquist, unscaled CTF;
    radius: the search band (Fourier pixels); the scale is measured on its upper half, from
    ``FIT_BAND_START`` x radius to radius, the score from ``score_from`` (Fourier pixels; None: where the scale's
    band starts) to radius. Returns host arrays.
    """
    xp = array_module(batch.spectra)
    proj = project(grid, slice_coordinates(xp.asarray(rotations, dtype=xp.float32), batch.freqs), oversampling)
    centred = batch.spectra * phase_shift(batch.freqs, xp.asarray(origins), batch.box)
    model = batch.ctf * proj
    scale_from = FIT_BAND_START * radius
    cross, ctf_term = _fit_terms(batch, centred, model, scale_from, radius)
    scale = np.clip(cross / np.maximum(ctf_term, 1e-30), MIN_SCALE, MAX_SCALE)
    same_band = score_from is None or score_from == scale_from
    score_cross, score_ctf = (cross, ctf_term) if same_band else _fit_terms(batch, centred, model, score_from, radius)
    score = 0.5 * np.maximum(score_cross, 0.0) ** 2 / np.maximum(score_ctf, 1e-30)
    residual = centred - xp.asarray(scale, dtype=xp.float32)[:, None] * model
    hermitian = xp.asarray(np.where(batch.radii == 0, 1.0, 2.0), dtype=xp.float32)
    power = (residual.real**2 + residual.imag**2) * hermitian
    n_shells = batch.box // 2 + 1
    return ParticleFit(scale, score, cross, ctf_term, to_numpy(per_shell(power, batch.radii, n_shells)))


def _fit_terms(batch: ImageBatch, centred, model, r_min: float, r_max: float) -> tuple[np.ndarray, np.ndarray]:
    """(cross, ctf_term) (B,) host float64 over the frequencies r_min <= |k| <= r_max."""
    xp = array_module(centred)
    start, stop = batch.band(r_max, r_min)
    w = batch.noise_weight[start:stop]
    x, m = centred[:, start:stop], model[:, start:stop]
    cross = xp.sum((x * xp.conj(m)).real * w, axis=1)
    ctf_term = xp.sum((m.real**2 + m.imag**2) * w, axis=1)
    return to_numpy(cross).astype(np.float64), to_numpy(ctf_term).astype(np.float64)


def normalised_scales(scales: np.ndarray) -> np.ndarray:
    """Scales divided by their median (the map's own scale is arbitrary: the typical particle has 1)."""
    positive = scales[scales > 0]
    median = float(np.median(positive)) if len(positive) else 1.0
    return scales / median
