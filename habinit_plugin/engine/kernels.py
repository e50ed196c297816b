"""CUDA kernels for trilinear slice extraction and insertion (CuPy only).

:func:`project` and :func:`backproject` do what the array expressions of
:mod:`.trilinear` do, one thread per sample: the 8 corners of its trilinear cell are
read (or atomically added to) in one pass, without the index and weight arrays that
the expressions materialise. Same conventions: grid (G, G, G) complex64 or float32,
C-contiguous; coords (P, 3) frequencies (kx, ky, kz) in Fourier pixels of the box;
grid index ``G//2 + oversampling * k``; points clamped into the grid.

Each returns None where the kernels do not apply (NumPy arrays, other dtypes,
non-contiguous grids) or are switched off: the caller then uses the expressions. On
first use the kernels are compiled and checked against the expressions on a small
problem; if that fails they are switched off with a warning, so a driver or compiler
problem costs speed, never a result. ``HABINIT_KERNELS=0`` switches them off.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from .backend import array_module
from .trilinear import backproject_expressions, project_expressions

_SOURCE = r"""
// The trilinear cell of point i: the flat index of each of its 4 (y, z) rows, the weight of
// the row and the fractional x offset (the row's two voxels are index and index + 1).
struct Cell {
    long long row[4];
    float weight[4];
    float fx;
};

__device__ __forceinline__ Cell cell(const float* c, long long i, int size, float oversampling) {
    const float half = (float)(size / 2);
    const float top = (float)((double)size - 1.001);
    float g[3];
    int i0[3];
    for (int a = 0; a < 3; ++a) {
        float v = __fadd_rn(__fmul_rn(c[3 * i + a], oversampling), half);
        v = fminf(fmaxf(v, 0.0f), top);
        i0[a] = (int)v;
        g[a] = __fsub_rn(v, (float)i0[a]);
    }
    const long long base = ((long long)i0[2] * size + i0[1]) * size + i0[0];
    const long long s1 = size, s2 = (long long)size * size;
    Cell out;
    out.fx = g[0];
    for (int dz = 0; dz < 2; ++dz) {
        for (int dy = 0; dy < 2; ++dy) {
            out.row[2 * dz + dy] = base + dz * s2 + dy * s1;
            out.weight[2 * dz + dy] = (dz ? g[2] : 1.0f - g[2]) * (dy ? g[1] : 1.0f - g[1]);
        }
    }
    return out;
}

// this thread's point i and its cell; false past the last point
__device__ __forceinline__ bool thread_cell(const float* coords, long long n, int size, float oversampling,
                                            long long& i, Cell& p) {
    i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return false;
    p = cell(coords, i, size, oversampling);
    return true;
}

// a voxel pair of a row, interpolated in x; a weighted value added to the sum or the grid
__device__ __forceinline__ float lerp(float lo, float hi, float gx, float fx) { return lo * gx + hi * fx; }
__device__ __forceinline__ float2 lerp(float2 lo, float2 hi, float gx, float fx) {
    return make_float2(lo.x * gx + hi.x * fx, lo.y * gx + hi.y * fx);
}
__device__ __forceinline__ void accumulate(float& acc, float x, float w) { acc += x * w; }
__device__ __forceinline__ void accumulate(float2& acc, float2 x, float w) {
    acc.x += x.x * w;
    acc.y += x.y * w;
}
__device__ __forceinline__ void add_to(float* grid, long long k, float v, float w) { atomicAdd(grid + k, v * w); }
__device__ __forceinline__ void add_to(float* grid, long long k, float2 v, float w) {  // grid: (re, im) pairs
    atomicAdd(grid + 2 * k, v.x * w);
    atomicAdd(grid + 2 * k + 1, v.y * w);
}

template <typename T>
__device__ __forceinline__ void project(const T* grid, const float* coords, T* out, long long n, int size,
                                        float oversampling) {
    long long i;
    Cell p;
    if (!thread_cell(coords, n, size, oversampling, i, p)) return;
    const float gx = 1.0f - p.fx;
    T acc{};
    for (int r = 0; r < 4; ++r) accumulate(acc, lerp(grid[p.row[r]], grid[p.row[r] + 1], gx, p.fx), p.weight[r]);
    out[i] = acc;
}

template <typename T>
__device__ __forceinline__ void backproject(const T* values, const float* coords, float* grid, long long n, int size,
                                            float oversampling) {
    Cell p;
    long long i;
    if (!thread_cell(coords, n, size, oversampling, i, p)) return;
    const T v = values[i];
    for (int r = 0; r < 4; ++r) {
        add_to(grid, p.row[r], v, p.weight[r] * (1.0f - p.fx));
        add_to(grid, p.row[r] + 1, v, p.weight[r] * p.fx);
    }
}

extern "C" __global__ void project_c64(const float2* grid, const float* coords, float2* out, long long n, int size,
                                       float oversampling) {
    project(grid, coords, out, n, size, oversampling);
}

extern "C" __global__ void project_f32(const float* grid, const float* coords, float* out, long long n, int size,
                                       float oversampling) {
    project(grid, coords, out, n, size, oversampling);
}

extern "C" __global__ void backproject_c64(const float2* values, const float* coords, float* grid, long long n,
                                           int size, float oversampling) {
    backproject(values, coords, grid, n, size, oversampling);
}

extern "C" __global__ void backproject_f32(const float* values, const float* coords, float* grid, long long n,
                                           int size, float oversampling) {
    backproject(values, coords, grid, n, size, oversampling);
}
"""

_THREADS = 256
_state: dict = {"enabled": os.environ.get("HABINIT_KERNELS", "1") != "0", "checked": False, "module": None}


def project(grid, coords, oversampling: int):
    """Trilinear samples (P,) of ``grid`` at ``coords`` (..., 3), or None (see module doc)."""
    if not _ready(grid) or grid.dtype not in ("complex64", "float32") or not grid.flags.c_contiguous:
        return None
    xp = array_module(grid)
    points = xp.ascontiguousarray(coords.reshape(-1, 3), dtype=xp.float32)
    out = xp.empty(len(points), dtype=grid.dtype)
    name = "project_c64" if grid.dtype == xp.complex64 else "project_f32"
    _launch(name, (grid, points, out), len(points), grid.shape[0], oversampling)
    return out


def backproject(values, coords, out, oversampling: int):
    """Add the values (...) at ``coords`` (..., 3) into ``out`` in place; False where not applicable."""
    if not _ready(out) or out.dtype not in ("complex64", "float32") or not out.flags.c_contiguous:
        return False
    xp = array_module(out)
    points = xp.ascontiguousarray(coords.reshape(-1, 3), dtype=xp.float32)
    vals = xp.ascontiguousarray(values.reshape(-1), dtype=out.dtype)
    name = "backproject_c64" if out.dtype == xp.complex64 else "backproject_f32"
    target = out.view(xp.float32)
    _launch(name, (vals, points, target), len(points), out.shape[0], oversampling)
    return True


def _launch(name: str, arrays: tuple, n: int, size: int, oversampling: int) -> None:
    """One thread per point: kernel(*arrays, n, grid size, oversampling)."""
    if n:
        args = (*arrays, np.int64(n), np.int32(size), np.float32(oversampling))
        _state["module"].get_function(name)(((n + _THREADS - 1) // _THREADS,), (_THREADS,), args)


def _ready(array) -> bool:
    """True when the kernels run on this array: a CuPy array, kernels on, compiled and checked."""
    xp = array_module(array)
    if xp is np or not _state["enabled"]:
        return False
    if not _state["checked"]:
        _state["checked"] = True
        try:
            _state["module"] = xp.RawModule(code=_SOURCE, options=("--std=c++14",))
            error = _self_check(xp)
        except Exception as exc:  # noqa: BLE001 (any compile or launch failure: fall back)
            error = f"{type(exc).__name__}: {exc}"
        if error:
            _state["enabled"] = False
            warnings.warn(f"CUDA projection kernels off, array expressions used instead: {error}", stacklevel=3)
    return _state["enabled"]


def _self_check(xp) -> str | None:
    """Compare the kernels with the array expressions on a small random problem."""
    rng = np.random.default_rng(0)
    size, oversampling = 24, 2
    shape = (size,) * 3
    grid = xp.asarray((rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64))
    coords = xp.asarray(rng.uniform(-7, 7, (500, 3)).astype(np.float32))
    values = xp.asarray((rng.standard_normal(500) + 1j * rng.standard_normal(500)).astype(np.complex64))
    for kind in (np.complex64, np.float32):
        g = grid if kind is np.complex64 else xp.ascontiguousarray(grid.real)
        v = values if kind is np.complex64 else xp.ascontiguousarray(values.real)
        fast = project(g, coords, oversampling)
        slow = project_expressions(g, coords, oversampling)
        a, b = xp.zeros_like(g), xp.zeros_like(g)
        backproject(v, coords, a, oversampling)
        backproject_expressions(v, coords, size, oversampling, out=b)
        for what, x, y in (("project", fast, slow), ("backproject", a, b)):
            err = float(xp.linalg.norm(x - y) / xp.linalg.norm(y))
            if not err < 1e-5:
                return f"{what} ({np.dtype(kind).name}) differs from the array expressions by {err:.2e}"
    return None
