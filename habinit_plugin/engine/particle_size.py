"""How large the particle is, from the images: the radial profile of their variance.

Noise is stationary, so its variance is the same at every pixel of a centred particle
image; the particle adds variance where it projects. The excess over the background's
variance, averaged over rings around the box centre and summed over area, gives the
radius that holds half of the particle's signal variance (``R50``). On simulated sets
R50 is 0.55-0.7 of the particle's largest 3D radius (PR LBD 34 A: R50 20-23 A at box
64, 128 and 256; adenylate kinase 38 A: 18 A; a C2 dimer 44 A: 25 A), and it does not
grow with the box, while the tail of the profile does (CTF delocalisation).

The SGD's real-space window is ``MASK_PER_R50`` times R50 (at most the default 0.45 box):
a window much larger than the particle let the SGD of a 29 kDa particle in a box of
256 A grow a rod along one axis, onto which all views collapsed (RELION asks for the
particle diameter for the same reason). At 2.5 R50 (58 A for the PR LBD at box 256, 1 A/px)
both halves still grew that rod (the SGD map 18 A vs the truth, median pose error 30 deg);
at 2.2 R50 (51 A) and 2.0 R50 (45 A) they converged (9.8 A vs the truth, 2.3 deg). 2.2 R50
still holds the adenylate kinase, whose R50 is the smallest fraction of its radius.
"""

from __future__ import annotations

import numpy as np

SAMPLE = 2000  # images read
CHUNK = 250  # images read at a time (memory bounded by the chunk at any box)
MASK_PER_R50 = 2.2  # window radius / R50: 1.2-1.5x the largest radius of the particles above
MIN_SIGNIFICANCE = 10.0  # standard errors of the summed excess variance below which no size is given


def ring_index(box: int) -> np.ndarray:
    """(N, N) int: the rounded distance of each pixel from the box centre (N//2, N//2)."""
    y, x = np.mgrid[:box, :box] - box // 2
    return np.rint(np.hypot(x, y)).astype(np.int64)


def variance_profile(chunks, box: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-pixel variance over the images, averaged over rings.

    chunks: iterable of (B, N, N) float images. Returns (profile (R,), pixels per ring (R,),
    number of images), R = rings out to the box corner.
    """
    total = np.zeros((box, box))
    squares = np.zeros((box, box))
    n = 0
    for images in chunks:
        images = np.asarray(images, dtype=np.float64)
        total += images.sum(axis=0)
        squares += (images**2).sum(axis=0)
        n += len(images)
    variance = squares / max(n, 1) - (total / max(n, 1)) ** 2
    rings = ring_index(box).ravel()
    counts = np.bincount(rings)
    return np.bincount(rings, variance.ravel()) / counts, counts, n


def r50_px(profile: np.ndarray, counts: np.ndarray, n_images: int, box: int) -> float | None:
    """Radius (pixels) holding half of the excess variance inside box/2, or None when the excess is not
    significant (fewer than ``MIN_SIGNIFICANCE`` standard errors of Gaussian noise).

    The background is the median of the rings between box/2 and the corner.
    """
    background = float(np.median(profile[box // 2 :]))
    inner = slice(0, box // 2)
    excess = (profile[inner] - background) * counts[inner]
    summed = np.cumsum(excess)
    error = background * np.sqrt(2.0 * counts[inner].sum() / max(n_images, 1))
    if n_images < 2 or summed[-1] < MIN_SIGNIFICANCE * error:
        return None
    half = 0.5 * summed[-1]
    i = int(np.searchsorted(summed, half))  # first ring reaching half; rings are 1 px apart
    below = summed[i - 1] if i > 0 else 0.0
    return float(i - 0.5 + (half - below) / max(summed[i] - below, 1e-12))


def particle_r50_px(particles, rows: np.ndarray) -> float | None:
    """R50 (pixels) of the particles' images ``rows`` (normalised by the particle set), read in chunks."""
    chunks = (particles.read_images(part) for part in np.array_split(rows, max(1, -(-len(rows) // CHUNK))))
    profile, counts, n = variance_profile(chunks, particles.box)
    return r50_px(profile, counts, n, particles.box)


def sample_rows(n: int, seed: int) -> np.ndarray:
    """Sorted rows of up to ``SAMPLE`` particles out of n, from their own random stream of ``seed``."""
    return np.sort(np.random.default_rng([seed, 50]).choice(n, size=min(n, SAMPLE), replace=False))
