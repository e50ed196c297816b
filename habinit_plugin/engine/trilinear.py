"""Trilinear slice extraction and insertion written as array expressions (NumPy or CuPy).

The reference implementation of :mod:`.projector`'s :func:`~.projector.project` and
:func:`~.projector.backproject`, with the same conventions: grid (G, G, G), coords
(..., 3) frequencies (kx, ky, kz) in Fourier pixels of the box, grid index
``G//2 + oversampling * k``, points clamped into the grid. The CUDA kernels
(:mod:`.kernels`) are checked against these functions.
"""

from __future__ import annotations

from .backend import array_module, scatter_add


def _trilinear(coords, grid_size: int, oversampling: int):
    """Base flat index and fractional offsets of the trilinear cell of each point.

    coords: (..., 3) frequencies (kx, ky, kz). Returns base (P,) int32 (int64 for huge
    grids) and fx, fy, fz (P,) float32. Points are clamped into the grid.
    """
    xp = array_module(coords)
    g = coords.reshape(-1, 3).astype(xp.float32) * xp.float32(oversampling) + xp.float32(grid_size // 2)
    xp.clip(g, 0, grid_size - 1.001, out=g)
    index_type = xp.int32 if grid_size**3 < 2**31 else xp.int64
    i0 = g.astype(index_type)  # floor: g >= 0
    frac = g - i0.astype(xp.float32)
    base = (i0[:, 2] * grid_size + i0[:, 1]) * grid_size + i0[:, 0]
    return base, frac[:, 0].copy(), frac[:, 1].copy(), frac[:, 2].copy()


def _yz_corners(fy, fz, grid_size: int):
    """Flat offset and weight of the 4 (y, z) corners of the cell (generator)."""
    for dz, wz in ((0, 1 - fz), (1, fz)):
        for dy, wy in ((0, 1 - fy), (1, fy)):
            yield (dz * grid_size + dy) * grid_size, wz * wy


def project_expressions(grid, coords, oversampling: int):
    """:func:`project` as array expressions (NumPy or CuPy)."""
    xp = array_module(grid)
    size = grid.shape[0]
    flat = grid.reshape(-1)
    base, fx, fy, fz = _trilinear(coords, size, oversampling)
    gx = 1 - fx
    out = xp.zeros(base.shape, dtype=grid.dtype)
    for offset, weight in _yz_corners(fy, fz, size):
        low = flat.take(base + offset)
        high = flat.take(base + (offset + 1))
        out += (low * gx + high * fx) * weight
    return out.reshape(coords.shape[:-1])


def backproject_expressions(values, coords, grid_size: int, oversampling: int, out=None):
    """:func:`backproject` as array expressions (NumPy or CuPy)."""
    xp = array_module(values)
    if out is None:
        out = xp.zeros((grid_size,) * 3, dtype=values.dtype)
    flat = out.reshape(-1)
    base, fx, fy, fz = _trilinear(coords, grid_size, oversampling)
    vals = values.reshape(-1)
    gx = 1 - fx
    for offset, weight in _yz_corners(fy, fz, grid_size):
        weighted = vals * weight
        scatter_add(flat, base + offset, weighted * gx)
        scatter_add(flat, base + (offset + 1), weighted * fx)
    return out
