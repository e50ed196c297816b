"""Rotations: RELION Euler angles, Hopf-fibration grids on SO(3), distances.

A pose rotation ``A`` (3x3) is RELION's: the 2D frequency (kx, ky) of a particle
image is the 3D frequency ``A^T (kx, ky, 0)`` of the map, i.e. a map point at
``r`` appears in the image at ``(A r)_xy``. Euler angles are RELION's ZYZ
(rot, tilt, psi), in degrees, with ``A = Rz(psi) Ry(tilt) Rz(rot)``.

Grids follow Yershova et al. (2010): level L takes the HEALPix sphere with
Nside = 2**L (12 * 4**L directions) times 6 * 2**L in-plane angles, 72 * 8**L
rotations in all, about 60 / 2**L degrees apart. A grid point (pixel, psi) of
level L has 8 children at level L + 1: the 4 nested HEALPix sub-pixels times
2 sub-intervals of psi.
"""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------- Euler


def euler_to_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION Euler angles (degrees, arrays of shape S) -> matrices (S..., 3, 3)."""
    a, b, g = (np.deg2rad(np.asarray(x, dtype=np.float64)) for x in (rot, tilt, psi))
    ca, cb, cg = np.cos(a), np.cos(b), np.cos(g)
    sa, sb, sg = np.sin(a), np.sin(b), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
        [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
        [sc, ss, cb],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_euler(matrices) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> RELION (rot, tilt, psi) in degrees, (..., 3).

    tilt is in [0, 180]; at tilt 0 or 180 the whole in-plane angle goes to psi,
    as RELION does.
    """
    m = np.asarray(matrices, dtype=np.float64)
    abs_sb = np.hypot(m[..., 0, 2], m[..., 1, 2])
    regular = abs_sb > 16 * np.finfo(np.float32).eps
    rot = np.where(regular, np.arctan2(m[..., 2, 1], m[..., 2, 0]), 0.0)
    tilt = np.arctan2(abs_sb, m[..., 2, 2])
    psi_regular = np.arctan2(m[..., 1, 2], -m[..., 0, 2])
    psi_pole = np.where(
        m[..., 2, 2] > 0, np.arctan2(-m[..., 1, 0], m[..., 0, 0]), np.arctan2(m[..., 1, 0], -m[..., 0, 0])
    )
    tilt = np.where(regular, tilt, np.where(m[..., 2, 2] > 0, 0.0, np.pi))
    psi = np.where(regular, psi_regular, psi_pole)
    return np.rad2deg(np.stack([rot, tilt, psi], axis=-1))


# ----------------------------------------------------------- axis-angle, quaternions


def rotvec_to_matrix(rotvec) -> np.ndarray:
    """Rotation vectors (..., 3) (axis * angle in radians) -> matrices (..., 3, 3).

    Active right-handed rotation (Rodrigues): ``R v`` turns v about the axis.
    """
    v = np.asarray(rotvec, dtype=np.float64)
    theta = np.linalg.norm(v, axis=-1, keepdims=True)
    axis = v / np.where(theta > 0, theta, 1.0)
    x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
    zero = np.zeros_like(x)
    k = np.stack([np.stack([zero, -z, y], -1), np.stack([z, zero, -x], -1), np.stack([-y, x, zero], -1)], -2)
    s = np.sin(theta)[..., None]
    c = (1 - np.cos(theta))[..., None]
    return np.eye(3) + s * k + c * (k @ k)


def matrix_to_rotvec(matrices) -> np.ndarray:
    """Inverse of :func:`rotvec_to_matrix` (angles in [0, pi])."""
    from scipy.spatial.transform import Rotation  # noqa: PLC0415

    m = np.asarray(matrices, dtype=np.float64)
    return Rotation.from_matrix(m.reshape(-1, 3, 3)).as_rotvec().reshape(m.shape[:-2] + (3,))


def quaternion_to_matrix(q) -> np.ndarray:
    """Unit quaternions (..., 4) as (w, x, y, z) -> active rotation matrices (..., 3, 3)."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def geodesic_distance(a, b) -> np.ndarray:
    """Angle in degrees of the rotation taking ``a`` to ``b`` (broadcast over (..., 3, 3))."""
    rel = np.swapaxes(np.asarray(a), -1, -2) @ np.asarray(b)
    cos = (np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """n rotations drawn uniformly from SO(3) (Haar measure), (n, 3, 3)."""
    q = rng.normal(size=(n, 4))
    return quaternion_to_matrix(q)


# ----------------------------------------------------------------- HEALPix (nested)

_JRLL = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4])
_JPLL = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7])


def _compress_bits(v: np.ndarray) -> np.ndarray:
    """Keep the even-position bits of v, packed (the x coordinate of a nested index)."""
    v = v.astype(np.int64) & 0x5555555555555555
    v = (v | (v >> 1)) & 0x3333333333333333
    v = (v | (v >> 2)) & 0x0F0F0F0F0F0F0F0F
    v = (v | (v >> 4)) & 0x00FF00FF00FF00FF
    v = (v | (v >> 8)) & 0x0000FFFF0000FFFF
    v = (v | (v >> 16)) & 0x00000000FFFFFFFF
    return v


def healpix_nested_angles(level: int, pixels=None) -> tuple[np.ndarray, np.ndarray]:
    """Centres of HEALPix pixels (nested order, Nside = 2**level) as (theta, phi) radians."""
    nside = 1 << level
    npix = 12 * nside * nside
    pix = np.arange(npix) if pixels is None else np.asarray(pixels, dtype=np.int64)
    face = pix >> (2 * level)
    within = pix & (nside * nside - 1)
    ix = _compress_bits(within)
    iy = _compress_bits(within >> 1)
    jr = (_JRLL[face] << level) - ix - iy - 1
    fact2 = 4.0 / npix
    fact1 = 2.0 * nside * fact2
    north, south = jr < nside, jr > 3 * nside
    nr = np.where(north, jr, np.where(south, 4 * nside - jr, nside))
    z = np.where(
        north,
        1.0 - nr * nr * fact2,
        np.where(south, nr * nr * fact2 - 1.0, (2 * nside - jr) * fact1),
    )
    kshift = np.where(north | south, 0, (jr - nside) & 1)
    jp = (_JPLL[face] * nr + ix - iy + 1 + kshift) // 2
    jp = np.where(jp > 4 * nside, jp - 4 * nside, jp)
    jp = np.where(jp < 1, jp + 4 * nside, jp)
    phi = (jp - (kshift + 1) * 0.5) * (np.pi / 2 / nr)
    return np.arccos(np.clip(z, -1.0, 1.0)), phi


# ------------------------------------------------------------------ Hopf SO(3) grid


def grid_size(level: int) -> int:
    """Number of rotations of the grid at ``level``: 72 * 8**level."""
    return 72 * 8**level


def grid_spacing(level: int) -> float:
    """Nominal angular spacing of the grid at ``level`` in degrees (60 / 2**level)."""
    return 60.0 / 2**level


def _n_psi(level: int) -> int:
    return 6 * 2**level


def _rz(angle) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    zero, one = np.zeros_like(c), np.ones_like(c)
    return np.stack([np.stack([c, -s, zero], -1), np.stack([s, c, zero], -1), np.stack([zero, zero, one], -1)], -2)


def _ry(angle) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    zero, one = np.zeros_like(c), np.ones_like(c)
    return np.stack([np.stack([c, zero, s], -1), np.stack([zero, one, zero], -1), np.stack([-s, zero, c], -1)], -2)


def hopf_to_matrix(theta, phi, psi, southern=False) -> np.ndarray:
    """Rotation taking z to the direction (theta, phi), then turning by psi about it.

    ``R = S(theta, phi) Rz(psi)`` (radians, arrays broadcast to (...), -> (..., 3, 3)).
    Any smooth section S of the Hopf fibration keeps the Haar measure a product of
    sphere area and uniform psi, so the grid stays uniform; two sections are used so
    that no grid cell sits on a coordinate singularity: ``Rz(phi) Ry(theta) Rz(-phi)``
    (smooth except at the south pole) and, where ``southern``, ``Rz(phi) Ry(theta) Rz(phi)``
    (smooth except at the north pole).
    """
    back = np.where(southern, phi, -phi)
    return _rz(phi) @ _ry(theta) @ _rz(back) @ _rz(psi)


def grid_rotations(level: int, index=None) -> np.ndarray:
    """Rotation matrices of grid points at ``level`` (all, or the given flat indices).

    A flat index is ``pixel * n_psi + psi_index`` (nested HEALPix pixel). Pixels of the
    four southern base faces use the section that is smooth at the south pole, so the
    8 children of any grid point stay close to it. Returns (n, 3, 3) float64.
    """
    n_psi = _n_psi(level)
    index = np.arange(grid_size(level)) if index is None else np.asarray(index, dtype=np.int64)
    pixel, ipsi = np.divmod(index, n_psi)
    theta, phi = healpix_nested_angles(level, pixel)
    psi = (ipsi + 0.5) * (2 * np.pi / n_psi)
    southern = (pixel >> (2 * level)) >= 8
    return hopf_to_matrix(theta, phi, psi, southern)


def grid_children(level: int, index) -> np.ndarray:
    """The 8 children at ``level + 1`` of grid points at ``level``: (..., 8) flat indices."""
    index = np.asarray(index, dtype=np.int64)
    n_psi = _n_psi(level)
    pixel, ipsi = np.divmod(index, n_psi)
    child_pixels = pixel[..., None] * 4 + np.arange(4)
    child_psi = ipsi[..., None] * 2 + np.arange(2)
    children = child_pixels[..., :, None] * (2 * n_psi) + child_psi[..., None, :]
    return children.reshape(index.shape + (8,))


def nearest_grid_point(level: int, matrices, chunk: int = 4096) -> np.ndarray:
    """Flat index of the grid point at ``level`` closest to each rotation (..., 3, 3)."""
    grid = grid_rotations(level)
    m = np.asarray(matrices).reshape(-1, 3, 3)
    out = np.empty(len(m), dtype=np.int64)
    for start in range(0, len(m), chunk):
        # trace(A^T B) = sum of elementwise products; larger trace = smaller angle
        tr = np.einsum("nij,gij->ng", m[start : start + chunk], grid)
        out[start : start + chunk] = np.argmax(tr, axis=1)
    return out.reshape(np.shape(matrices)[:-2])
