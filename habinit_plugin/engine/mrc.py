"""MRC maps and image stacks (mrcfile), memory-mapped where it matters.

Arrays are indexed [z, y, x] (maps) and [n, y, x] (stacks); voxel sizes in Angstrom.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np

from .outputs import atomic_write


class MRCError(ValueError):
    """An MRC file is missing or unreadable; the message names it."""


def _open_header(path: str | Path):
    path = str(path)
    if not os.path.isfile(path):
        raise MRCError(f"{path}: no such MRC file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mrcfile.open(path, mode="r", header_only=True, permissive=True)
    except Exception as exc:
        raise MRCError(f"{path}: not a readable MRC file ({exc})") from exc


def stack_shape(path: str | Path) -> tuple[int, int, int]:
    """(n_images, ny, nx) of an MRC stack, read from the header alone."""
    with _open_header(path) as mrc:
        h = mrc.header
        if h is None:
            raise MRCError(f"{path}: MRC header is corrupt")
        nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise MRCError(f"{path}: MRC header gives an empty shape ({nz}, {ny}, {nx})")
    expected = 1024 + int(h.nsymbt) + nx * ny * nz * _mode_bytes(int(h.mode), path)
    if os.path.getsize(path) < expected:
        raise MRCError(
            f"{path}: file is truncated ({os.path.getsize(path)} bytes, the header announces "
            f"{nz} images of {ny} x {nx} needing {expected})"
        )
    return nz, ny, nx


def _mode_bytes(mode: int, path) -> int:
    sizes = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}
    if mode not in sizes:
        raise MRCError(f"{path}: MRC mode {mode} is not supported (use 0, 1, 2, 6 or 12)")
    return sizes[mode]


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """A 3D map as float32 [z, y, x] and its voxel size in Angstrom (x axis); an MRCError for a map
    that is not cubic or holds NaN or infinite voxels."""
    path = str(path)
    if not os.path.isfile(path):
        raise MRCError(f"{path}: no such map file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=True) as mrc:
                data = np.asarray(mrc.data, dtype=np.float32).copy()
                voxel = float(mrc.voxel_size.x)
    except Exception as exc:
        raise MRCError(f"{path}: not a readable MRC map ({exc})") from exc
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise MRCError(f"{path}: expected a cubic 3D map, got shape {data.shape}")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise MRCError(f"{path}: {bad} voxel(s) are NaN or infinite; the map is not usable")
    return data, voxel


def write_map(path: str | Path, volume: np.ndarray, voxel_size: float) -> None:
    """Write a 3D map (ispg = 1, origin 0) atomically (temporary file, then rename)."""
    with atomic_write(path) as tmp, mrcfile.new(str(tmp), overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
        mrc.set_volume()
        mrc.voxel_size = voxel_size
        mrc.update_header_stats()


def new_stack(path: str | Path, n: int, box: int, pixel_size: float):
    """Create an MRC stack of n float32 images and return it memory-mapped for writing."""
    mrc = mrcfile.new_mmap(str(path), shape=(n, box, box), mrc_mode=2, overwrite=True)
    mrc.set_image_stack()
    mrc.voxel_size = pixel_size
    return mrc


def read_stack_images(path: str, indices: np.ndarray) -> np.ndarray:
    """Images ``indices`` (0-based) of one MRC stack as float32 (n, ny, nx), read memory-mapped."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
    except Exception as exc:
        raise MRCError(f"{path}: cannot open image stack ({exc})") from exc
    with mrc:
        data = mrc.data if mrc.data.ndim == 3 else mrc.data[None]
        order = np.argsort(indices)
        out = np.empty((len(indices),) + data.shape[1:], dtype=np.float32)
        out[order] = data[np.asarray(indices)[order]]
    return out
