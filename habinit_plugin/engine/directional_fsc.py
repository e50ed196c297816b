"""Directional resolution: Fourier shell correlation over cones of Fourier space (conical FSC).

The FSC of :mod:`.fsc` sums each Fourier shell over all directions. A conical FSC keeps only the
voxels whose frequency k lies within ``half_angle_deg`` of a direction d, or of -d (the Friedel
opposite, which carries the same information for real maps): ``|k . d| >= |k| cos(half_angle)``.
Its 0.143 crossing is the resolution along d (as in the 3DFSC of Tan et al. 2017, Nat. Methods
14:793, and cryoSPARC's conical FSC). A map whose views are not spread over the sphere has a lower
resolution along the directions that no central section covers.

Conventions are those of :mod:`.fsc` and :mod:`.fourier`: maps (N, N, N) indexed ``[z, y, x]``,
shells are the rounded radii 0..N//2 of the centred grid, shell s is s / (N * pixel_size) 1/A.
Directions are given as (x, y, z): the frequency of voxel ``[iz, iy, ix]`` is (kx, ky, kz).
"""

from __future__ import annotations

import numpy as np

from .backend import array_module, fft_kwargs, fft_module, to_numpy
from .fsc import resolution_at, shell_frequencies
from .orientation import fibonacci_hemisphere

DEFAULT_DIRECTIONS = 64  # hemisphere directions; 20 deg cones cover it about 4 times over


def _half_spectrum_terms(map_a, map_b):
    """Cross and power terms on the half spectrum (rfft over x) with their Friedel weights.

    Returns (kx, ky, kz, shells, cross, pa, pb, weight) as flat arrays over the voxels inside the sphere
    of radius N//2 + 1/2 (shell <= N//2). The columns kx = 1 .. N/2 - 1 stand for themselves and
    their Friedel mates (weight 2), kx = 0 and, for even N, kx = -N/2 only for themselves, so sums
    equal those of :func:`.fsc.fsc` over the full centred grid. A cone takes k and -k together; on
    the grid the frequency -N/2 is its own mate, so in the last shell (N//2) a few voxels with a
    component -N/2 are assigned to cones slightly differently than voxel by voxel. The phase
    origin does not matter here (both maps get the same phase ramp), so the plain rfft is used.
    """
    xp = array_module(map_a)
    fft = fft_module(xp)
    box = map_a.shape[0]
    fa = fft.rfftn(map_a.astype(xp.float32), **fft_kwargs(xp))
    fb = fft.rfftn(map_b.astype(xp.float32), **fft_kwargs(xp))
    k = (xp.fft.fftfreq(box) * box).astype(xp.float32)  # 0, 1, .., -N/2, .., -1
    kx = xp.arange(box // 2 + 1, dtype=xp.float32)
    if box % 2 == 0:
        kx[-1] = -(box // 2)  # the unpaired column is -N/2 on the centred grid (fsc.py), same data
    kz3, ky3, kx3 = k[:, None, None], k[None, :, None], kx[None, None, :]
    radius = xp.sqrt(kz3**2 + ky3**2 + kx3**2)
    shells = xp.rint(radius).astype(xp.int32)
    n_shells = box // 2 + 1
    inside = shells < n_shells
    nyquist = -(box // 2) if box % 2 == 0 else 0.5  # an odd box has no unpaired column
    weight = xp.where((kx3 == 0) | (kx3 == nyquist), 1.0, 2.0)
    shape = inside.shape
    cross = (xp.real(fa * xp.conj(fb)).astype(xp.float64) * weight)[inside]
    pa = ((xp.abs(fa) ** 2).astype(xp.float64) * weight)[inside]
    pb = ((xp.abs(fb) ** 2).astype(xp.float64) * weight)[inside]
    full = [xp.broadcast_to(g, shape)[inside] for g in (kx3, ky3, kz3)]
    return full[0], full[1], full[2], shells[inside], cross, pa, pb, xp.broadcast_to(weight, shape)[inside]


def conical_fsc(map_a, map_b, directions, half_angle_deg: float = 20.0, min_voxels: int = 50) -> np.ndarray:
    """FSC of two maps over the double cone around each direction, (D, N//2 + 1) float64 (host).

    map_a, map_b: (N, N, N) NumPy or CuPy arrays indexed [z, y, x]; directions: (D, 3) as (x, y, z)
    (normalised here). A voxel k belongs to the cone of d when ``|k . d| >= |k| cos(half_angle)``
    (k and -k alike); shell 0 is 1. The low shells hold few voxels in a cone (shell s about
    ``4 pi s^2 (1 - cos half_angle)``, Friedel mates included): where a cone holds fewer than
    ``min_voxels`` the FSC of the whole shell stands in, so that one weak coefficient cannot make a
    spurious crossing. ``half_angle_deg = 90`` gives :func:`.fsc.fsc`.
    """
    xp = array_module(map_a)
    box = map_a.shape[0]
    n_shells = box // 2 + 1
    kx, ky, kz, shells, cross, pa, pb, weight = _half_spectrum_terms(map_a, map_b)
    norm = xp.maximum(xp.sqrt(kx**2 + ky**2 + kz**2), 1e-6)
    ux, uy, uz = kx / norm, ky / norm, kz / norm

    def curve_of(keep):
        s = shells if keep is None else shells[keep]
        terms = [v if keep is None else v[keep] for v in (cross, pa, pb, weight)]
        c, a, b, count = (to_numpy(xp.bincount(s, weights=v, minlength=n_shells)[:n_shells]) for v in terms)
        curve = c / np.sqrt(np.maximum(a * b, 1e-30))
        curve[0] = 1.0
        return curve, count

    whole, _ = curve_of(None)
    d = np.asarray(to_numpy(directions), dtype=np.float64).reshape(-1, 3)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    cos_half = float(np.cos(np.deg2rad(half_angle_deg))) - 1e-6
    curves = np.zeros((len(d), n_shells))
    for i, (dx, dy, dz) in enumerate(d):
        keep = xp.abs(ux * float(dx) + uy * float(dy) + uz * float(dz)) >= cos_half
        curve, count = curve_of(keep)
        curves[i] = np.where(count < min_voxels, whole, curve)
    return curves


def directional_resolution(
    map_a,
    map_b,
    pixel_size: float,
    n_directions: int = DEFAULT_DIRECTIONS,
    threshold: float = 0.143,
    half_angle_deg: float = 20.0,
    min_voxels: int = 50,
) -> dict:
    """Resolution (A) of two half maps along quasi-uniform directions, and its spread, JSON-safe.

    The directions are a Fibonacci spiral of ``n_directions`` points over the hemisphere z > 0
    (a direction and its opposite are the same cone); each gets the crossing of ``threshold`` by
    its :func:`conical_fsc` (:func:`.fsc.resolution_at`). Keys: ``directions`` ((x, y, z) each),
    ``resolution_A`` (per direction), ``best_A``, ``worst_A``, ``mean_A`` (over directions),
    ``spread`` (worst / best: 1 for an isotropic map), ``best_direction``, ``worst_direction``,
    ``half_angle_deg``, ``threshold``, ``pixel_size``, ``box``.
    """
    directions = fibonacci_hemisphere(n_directions)
    curves = conical_fsc(map_a, map_b, directions, half_angle_deg, min_voxels)
    res = np.array([resolution_at(c, threshold, pixel_size) for c in curves])
    best, worst = int(np.argmin(res)), int(np.argmax(res))
    return {
        "directions": [[round(float(x), 4) for x in v] for v in directions],
        "resolution_A": [round(float(r), 3) for r in res],
        "best_A": round(float(res[best]), 3),
        "worst_A": round(float(res[worst]), 3),
        "mean_A": round(float(res.mean()), 3),
        "spread": round(float(res[worst] / res[best]), 4),
        "best_direction": [round(float(x), 4) for x in directions[best]],
        "worst_direction": [round(float(x), 4) for x in directions[worst]],
        "half_angle_deg": float(half_angle_deg),
        "threshold": float(threshold),
        "pixel_size": float(pixel_size),
        "box": int(map_a.shape[0]),
        "nyquist_A": round(float(1.0 / shell_frequencies(int(map_a.shape[0]), pixel_size)[-1]), 3),
    }
