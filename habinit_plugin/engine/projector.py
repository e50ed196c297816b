"""Central-slice projection of a Fourier volume and its exact adjoint.

The volume is a centred complex grid ``F`` of size G = oversampling * n (n: the
real-space box it came from). Grid index ``G//2 + oversampling * k`` holds the
frequency k, in Fourier pixels of that box. Slices are sampled with trilinear
interpolation; :func:`backproject` is its exact transpose, so
``<project(F, c), y> == <F, backproject(y, c)>``.

Trilinear interpolation in Fourier space multiplies the real-space map by
``sinc^2`` of the grid (per axis); :func:`volume_to_grid` divides that out before
the FFT and :func:`grid_to_volume` after the inverse FFT ("gridding correction").
"""

from __future__ import annotations

from . import kernels
from .backend import array_module
from .fourier import centered_fftn, centered_ifftn
from .trilinear import backproject_expressions, project_expressions


def slice_coordinates(rotations, freqs):
    """3D frequencies of 2D image frequencies under pose rotations.

    rotations: (R, 3, 3) RELION pose matrices A; freqs: (M, 2) (kx, ky).
    Returns (R, M, 3) float32 (kx, ky, kz) = A^T (kx, ky, 0).
    """
    xp = array_module(rotations)
    a = xp.asarray(rotations, dtype=xp.float32)
    f = xp.asarray(freqs, dtype=xp.float32)
    return xp.matmul(f[None, :, :], a[:, :2, :])


def _sinc2_profile(box: int, grid_size: int, xp):
    """sinc^2(x / G) for x = -box//2..box - box//2 - 1 voxels (the trilinear kernel's FT)."""
    x = (xp.arange(box, dtype=xp.float64) - box // 2) / grid_size
    return xp.sinc(x) ** 2


def gridding_profile(box: int, grid_size: int, xp):
    """The separable real-space factor of trilinear interpolation, (box, box, box)."""
    p = _sinc2_profile(box, grid_size, xp)
    return (p[:, None, None] * p[None, :, None] * p[None, None, :]).astype(xp.float32)


def volume_to_grid(volume, oversampling: int = 2):
    """Real map (n, n, n) -> centred Fourier grid (G, G, G), G = oversampling * n.

    The map is divided by the trilinear gridding profile and zero-padded, so that
    slices sampled with :func:`project` match the true Fourier transform of the map.
    """
    xp = array_module(volume)
    n = volume.shape[0]
    size = oversampling * n
    padded = xp.zeros((size,) * 3, dtype=xp.float32)
    lo = size // 2 - n // 2
    corrected = volume / gridding_profile(n, size, xp)
    padded[lo : lo + n, lo : lo + n, lo : lo + n] = corrected
    return centered_fftn(padded).astype(xp.complex64)


def grid_to_volume(grid, box: int, gridding_correction: bool = True):
    """Centred Fourier grid (G, G, G) -> real map (box, box, box), inverse of :func:`volume_to_grid`.

    ``gridding_correction`` divides by the trilinear profile (for grids made by
    backprojection); without it the map is the plain inverse FFT, cropped.
    """
    xp = array_module(grid)
    size = grid.shape[0]
    lo = size // 2 - box // 2
    volume = centered_ifftn(grid).real[lo : lo + box, lo : lo + box, lo : lo + box]
    if gridding_correction:
        volume = volume / gridding_profile(box, size, xp)
    return volume.astype(xp.float32)


def project(grid, coords, oversampling: int):
    """Sample the Fourier grid at 3D frequencies (trilinear interpolation).

    grid: (G, G, G) complex (or real); coords: (..., 3) frequencies in Fourier pixels
    of the box the grid was made from. Returns (...) values, same dtype as grid.
    On a GPU a CUDA kernel does it (:mod:`.kernels`), else the array expressions.
    """
    fast = kernels.project(grid, coords, oversampling)
    if fast is not None:
        return fast.reshape(coords.shape[:-1])
    return project_expressions(grid, coords, oversampling)


def backproject(values, coords, grid_size: int, oversampling: int, out=None):
    """Adjoint of :func:`project`: spread values onto the grid, summing (in place).

    values: (...) complex or real; coords: (..., 3). ``out``: (G, G, G) array of the
    values' kind to accumulate into (created when None). Returns ``out``.
    """
    if out is None:
        out = array_module(values).zeros((grid_size,) * 3, dtype=values.dtype)
    if kernels.backproject(values, coords, out, oversampling):
        return out
    return backproject_expressions(values, coords, grid_size, oversampling, out)


def hermitian_symmetrize(grid):
    """``F(k) + conj(F(-k))`` for a centred grid (even size G).

    Backprojecting only half-plane samples fills half of every central slice; this
    adds the Friedel mates. The result is Hermitian on the grid (row 0 of each axis,
    the unpaired frequency -G/2, is left as it is).
    """
    xp = array_module(grid)
    mate = xp.flip(grid[1:, 1:, 1:], axis=(0, 1, 2))
    out = grid.copy()
    if xp.iscomplexobj(grid):
        out[1:, 1:, 1:] += xp.conj(mate)
    else:
        out[1:, 1:, 1:] += mate
    return out
