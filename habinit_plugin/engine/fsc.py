"""Fourier shell correlation and resolution estimates.

Shells are integer Fourier radii 0..box//2 (rounded); shell s is the spatial
frequency s / (box * pixel_size) in 1/Angstrom.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module, to_numpy
from .fourier import centered_fftn, radial_shells, shell_sum


def fsc(map_a, map_b, mask=None) -> np.ndarray:
    """FSC of two maps (box, box, box) per shell, (box//2 + 1,) float64 (host).

    mask: optional real-space mask (same shape) applied to both maps first.
    """
    xp = array_module(map_a)
    if mask is not None:
        map_a, map_b = map_a * mask, map_b * mask
    fa, fb = centered_fftn(map_a.astype(xp.float32)), centered_fftn(map_b.astype(xp.float32))
    box = map_a.shape[0]
    n = box // 2 + 1
    shells = radial_shells(map_a.shape, xp)
    cross = shell_sum(xp.real(fa * xp.conj(fb)).astype(xp.float64), shells, n)
    pa = shell_sum((xp.abs(fa) ** 2).astype(xp.float64), shells, n)
    pb = shell_sum((xp.abs(fb) ** 2).astype(xp.float64), shells, n)
    curve = to_numpy(cross / xp.sqrt(xp.maximum(pa * pb, 1e-30)))
    curve[0] = 1.0
    return curve


def shell_frequencies(box: int, pixel_size: float) -> np.ndarray:
    """Spatial frequency of each shell in 1/Angstrom, (box//2 + 1,)."""
    return np.arange(box // 2 + 1) / (box * pixel_size)


def resolution_at(curve: np.ndarray, threshold: float, pixel_size: float) -> float:
    """Resolution (Angstrom) where ``curve`` first drops below ``threshold``.

    The crossing is interpolated linearly between shells; a curve that never drops
    below gives the Nyquist resolution 2 * pixel_size.
    """
    box = 2 * (len(curve) - 1)
    below = np.flatnonzero(np.asarray(curve[1:]) < threshold)
    if len(below) == 0:
        return 2.0 * pixel_size
    s = int(below[0]) + 1
    lo, hi = curve[s - 1], curve[s]
    t = (lo - threshold) / (lo - hi) if lo != hi else 0.0
    shell = max(s - 1 + t, 1e-6)
    return box * pixel_size / shell


def ssnr_from_fsc(curve: np.ndarray) -> np.ndarray:
    """Spectral SNR of one half map from the half-map FSC: FSC / (1 - FSC), clipped."""
    c = np.clip(np.asarray(curve, dtype=np.float64), 1e-3, 0.999)
    return c / (1.0 - c)


def expected_full_map_fsc(half_fsc: np.ndarray) -> np.ndarray:
    """FSC of the average of both halves against the truth: sqrt(2 F / (1 + F))."""
    f = np.clip(np.asarray(half_fsc, dtype=np.float64), 0.0, 1.0)
    return np.sqrt(2 * f / (1 + f))
