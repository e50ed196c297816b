"""Loading particle sets from RELION STAR (3.0 and 3.1+) or cryoSPARC .cs metadata (the .cs format is
cryosparc.py's), and writing them as RELION 3.1 STAR; the set itself is particle_set.py's.

Poses follow RELION: ``rotations`` are the matrices of (rot, tilt, psi) and
``shifts`` are RELION origins in pixels: the particle centre sits at
``box // 2 - origin`` in the image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .cryosparc import cs_particles_table
from .ctf import CTFParams
from .mrc import MRCError, stack_shape
from .particle_set import ParticleError, ParticleSet
from .so3 import euler_to_matrix, matrix_to_euler
from .star import StarBlock, StarError, read_star, write_star

OPTICS_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
OLD_ORIGIN_COLUMNS = ("rlnOriginX", "rlnOriginY")
# CTFParams field: per-particle column (default 0 when absent), or optics column
CTF_COLUMNS = {
    "defocus_v": "rlnDefocusV",
    "defocus_angle": "rlnDefocusAngle",
    "phase_shift": "rlnPhaseShift",
    "bfactor": "rlnCtfBfactor",
}
CTF_OPTICS_COLUMNS = dict(zip(("voltage", "cs", "amplitude_contrast"), OPTICS_COLUMNS))


# --------------------------------------------------------------------------- loading


def load_particles(path: str | Path, image_root: str | Path | None = None) -> ParticleSet:
    """Read a RELION STAR file (3.0 or 3.1+) or a cryoSPARC ``.cs`` file.

    Relative image paths are looked up next to the metadata file, then in the
    current directory, then under ``image_root``. Every stack is checked (exists,
    readable header, square even box, same box for all, index in range).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ParticleError(f"{path}: no such particles file")
    if path.endswith(".cs"):
        table, optics = _optics_from_particle_columns(cs_particles_table(path))
        table.drop_columns([*OPTICS_COLUMNS, "rlnImagePixelSize"])
    else:
        try:
            table, optics = _tables_from_star(path)
        except StarError as exc:
            raise ParticleError(str(exc)) from exc
    try:
        return _particle_set(path, table, optics, image_root)
    except StarError as exc:
        raise ParticleError(str(exc)) from exc


def _tables_from_star(path: str) -> tuple[StarBlock, StarBlock]:
    blocks = read_star(path)
    if "particles" in blocks:
        table = blocks["particles"]
        optics = blocks.get("optics")
    else:
        candidates = [b for b in blocks.values() if b.has("rlnImageName")]
        if not candidates:
            raise ParticleError(f"{path}: no block with an _rlnImageName column (not a particles STAR file)")
        table, optics = candidates[0], blocks.get("optics")
        table.name = "particles"
    if len(table) == 0:
        raise ParticleError(f"{path}: the particles block is empty")
    if not table.has("rlnImageName"):
        raise ParticleError(f"{path}: data_particles has no _rlnImageName column")
    if optics is None:
        table, optics = _optics_from_particle_columns(table)
    return table, optics


def _optics_from_particle_columns(table: StarBlock) -> tuple[StarBlock, StarBlock]:
    """RELION 3.0 layout -> 3.1: one optics group per distinct (voltage, Cs, Q0, pixel size)."""
    n = len(table)
    columns = [c for c in OPTICS_COLUMNS if table.has(c)]
    pixel = _pixel_size_from_particle_columns(table)
    keys = [tuple(row[table.columns.index(c)] for c in columns) + (p,) for row, p in zip(table.rows, pixel)]
    groups: dict[tuple, int] = {}
    group_of = np.empty(n, dtype=np.int64)
    for i, key in enumerate(keys):
        group_of[i] = groups.setdefault(key, len(groups) + 1)
    optics = StarBlock(
        "optics", ["rlnOpticsGroup", "rlnOpticsGroupName", *columns, "rlnImagePixelSize"], source=table.source
    )
    for key, g in groups.items():
        optics.rows.append([str(g), f"opticsGroup{g}", *key[:-1], _px_text(key[-1])])
    table.set_column("rlnOpticsGroup", group_of)
    if table.has("rlnOriginX") and not table.has("rlnOriginXAngst"):
        px = np.where(np.isfinite(pixel), pixel, 1.0)
        table.set_column("rlnOriginXAngst", table.floats("rlnOriginX") * px)
        table.set_column("rlnOriginYAngst", table.floats("rlnOriginY", 0.0) * px)
        table.drop_columns(OLD_ORIGIN_COLUMNS)
    return table, optics


def _px_text(value: float) -> str:
    return "nan" if not np.isfinite(value) else f"{value:.6f}"


def _pixel_size_from_particle_columns(table: StarBlock) -> np.ndarray:
    if table.has("rlnImagePixelSize"):
        return table.floats("rlnImagePixelSize")
    if table.has("rlnPixelSize"):
        return table.floats("rlnPixelSize")
    if table.has("rlnDetectorPixelSize") and table.has("rlnMagnification"):
        return table.floats("rlnDetectorPixelSize") * 1e4 / table.floats("rlnMagnification")
    return np.full(len(table), np.nan)


def _optics_value(table: StarBlock, optics: StarBlock, column: str, default: float | None = None) -> np.ndarray:
    """Per-particle value of an optics column (particles block first, then optics block)."""
    if table.has(column):
        return table.floats(column)
    if optics.has(column):
        groups = table.ints("rlnOpticsGroup") if table.has("rlnOpticsGroup") else np.ones(len(table), np.int64)
        values = dict(zip(optics.ints("rlnOpticsGroup").tolist(), optics.floats(column).tolist()))
        missing = sorted(set(groups.tolist()) - set(values))
        if missing:
            raise ParticleError(f"{table.source}: particles refer to optics group(s) {missing} absent from data_optics")
        return np.array([values[g] for g in groups.tolist()])
    if default is not None:
        return np.full(len(table), default)
    raise ParticleError(f"{table.source}: missing CTF column _{column} (looked in data_{table.name} and data_optics)")


def _finite(table: StarBlock, column: str, values: np.ndarray) -> np.ndarray:
    """``values`` of ``column``; a ParticleError naming the file, the input row and the column where one is
    NaN or infinite."""
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        i = int(bad[0])
        raise ParticleError(
            f"{table.source}: row {i + 1}: _{column} = {values[i]} is not a finite number "
            f"({len(bad)} row(s) like it); fix or remove these particles"
        )
    return values


def _ctf_from_tables(table: StarBlock, optics: StarBlock) -> CTFParams:
    if not table.has("rlnDefocusU"):
        raise ParticleError(
            f"{table.source}: missing CTF column _rlnDefocusU: the particles need CTF parameters "
            "(run CTF estimation and extract particles with it)"
        )
    defocus_u = _finite(table, "rlnDefocusU", table.floats("rlnDefocusU"))
    optical = {
        name: _finite(table, column, _optics_value(table, optics, column))
        for name, column in CTF_OPTICS_COLUMNS.items()
    }
    per_particle = {name: _finite(table, column, table.floats(column, 0.0)) for name, column in CTF_COLUMNS.items()}
    if not table.has("rlnDefocusV"):
        per_particle["defocus_v"] = defocus_u.copy()
    return CTFParams(defocus_u=defocus_u, **per_particle, **optical)


def _single_pixel_size(table: StarBlock, optics: StarBlock) -> float:
    if table.has("rlnImagePixelSize") or optics.has("rlnImagePixelSize"):
        pixel = _optics_value(table, optics, "rlnImagePixelSize")
    else:
        pixel = _pixel_size_from_particle_columns(table)
    if not np.all(np.isfinite(pixel)):
        raise ParticleError(
            f"{table.source}: no pixel size: add _rlnImagePixelSize to data_optics "
            "(or _rlnDetectorPixelSize and _rlnMagnification to the particles)"
        )
    lo, hi = float(pixel.min()), float(pixel.max())
    if hi - lo > 1e-4 * hi:
        values = ", ".join(f"{v:g}" for v in np.unique(np.round(pixel, 5))[:8])
        raise ParticleError(
            f"{table.source}: particles have mixed pixel sizes ({values} A); "
            "re-extract or rescale them to one pixel size first"
        )
    if lo <= 0:
        raise ParticleError(f"{table.source}: pixel size must be positive, got {lo}")
    return float(pixel[0])


def _split_image_names(table: StarBlock) -> tuple[np.ndarray, list[str]]:
    slices, files = [], []
    for i, name in enumerate(table.text("rlnImageName")):
        number, sep, file = name.partition("@")
        if not sep:
            number, file = "1", name
        try:
            slices.append(int(number) - 1)
        except ValueError:
            raise ParticleError(
                f"{table.source}: row {i + 1}: _rlnImageName {name!r} is not of the form N@stack.mrcs"
            ) from None
        if slices[-1] < 0:
            raise ParticleError(
                f"{table.source}: row {i + 1}: _rlnImageName {name!r}: image numbers start at 1 (N@stack.mrcs)"
            )
        files.append(file)
    return np.array(slices, dtype=np.int64), files


def _resolve(file: str, base_dir: str, image_root) -> str | None:
    if os.path.isabs(file):
        return file if os.path.isfile(file) else None
    for root in (base_dir, os.getcwd(), image_root):
        if root is not None and os.path.isfile(os.path.join(root, file)):
            return os.path.abspath(os.path.join(root, file))
    return None


def _check_stacks(table: StarBlock, files, slices, image_root) -> tuple[list[str], np.ndarray, int]:
    base_dir = os.path.dirname(os.path.abspath(table.source))
    unique, stack_of = np.unique(np.array(files, dtype=object), return_inverse=True)
    stacks, box = [], None
    for s, file in enumerate(unique):
        first = int(np.flatnonzero(stack_of == s)[0])
        where = _resolve(file, base_dir, image_root)
        if where is None:
            looked = ", ".join(str(r) for r in (base_dir, os.getcwd(), image_root) if r is not None)
            raise ParticleError(f"{table.source}: row {first + 1}: image stack {file!r} not found (looked in {looked})")
        try:
            n, ny, nx = stack_shape(where)
        except MRCError as exc:
            raise ParticleError(f"{exc} (used by row {first + 1} of {table.source})") from exc
        if ny != nx:
            raise ParticleError(f"{where}: images are not square ({ny} x {nx} pixels)")
        if nx % 2:
            raise ParticleError(
                f"{where}: the box size is odd ({nx} pixels); reconstruction needs an even box "
                "(re-extract with an even box size)"
            )
        if box is not None and nx != box:
            raise ParticleError(f"{where}: box {nx} differs from {box} of the other stacks")
        box = nx
        in_stack = np.flatnonzero(stack_of == s)
        bad = in_stack[(slices[in_stack] < 0) | (slices[in_stack] >= n)]
        if len(bad):
            i = int(bad[0])
            raise ParticleError(
                f"{table.source}: row {i + 1}: image {slices[i] + 1}@{file} is past the end of the stack "
                f"{where}, which holds {n} image(s)"
            )
        stacks.append(where)
    return stacks, stack_of.astype(np.int32), int(box)


def _particle_set(path: str, table: StarBlock, optics: StarBlock, image_root) -> ParticleSet:
    pixel_size = _single_pixel_size(table, optics)
    ctf = _ctf_from_tables(table, optics)
    slices, files = _split_image_names(table)
    stacks, stack_of, box = _check_stacks(table, files, slices, image_root)
    n = len(table)
    if table.has("rlnImageId"):
        ids = table.ints("rlnImageId")
        if len(np.unique(ids)) != n:
            raise ParticleError(f"{path}: _rlnImageId values are not unique")
    else:
        ids = np.arange(1, n + 1, dtype=np.int64)
    rotations = shifts = None
    if all(table.has(c) for c in POSE_COLUMNS[:3]):
        rotations = euler_to_matrix(*(_finite(table, c, table.floats(c)) for c in POSE_COLUMNS[:3]))
        if table.has("rlnOriginXAngst"):
            origins = [_finite(table, c, table.floats(c, 0.0)) for c in POSE_COLUMNS[3:]]
            shifts = np.stack(origins, 1) / pixel_size
        else:
            shifts = np.zeros((n, 2))
    half_set = table.ints("rlnRandomSubset") if table.has("rlnRandomSubset") else None
    # in the order of ParticleSet's fields
    return ParticleSet(
        path, ids, stacks, stack_of, slices, pixel_size, box, ctf, rotations, shifts, half_set, table, optics
    )


# ---------------------------------------------------------------------- writing


def write_particles_star(
    path: str | Path,
    particles: ParticleSet,
    index=None,
    rotations: np.ndarray | None = None,
    shifts: np.ndarray | None = None,
    half_set: np.ndarray | None = None,
    columns: dict[str, np.ndarray] | None = None,
) -> None:
    """Write particles ``index`` (all when None) as a RELION 3.1 STAR file.

    Every input column is kept; poses (rotations (n, 3, 3), shifts (n, 2) origins in
    pixels), half sets (n,) and ``columns`` (RELION label: (n,) values) replace the
    input's when given. Written atomically.
    """
    index = np.arange(len(particles)) if index is None else np.asarray(index, dtype=np.int64)
    table = particles.table.take(index)
    table.set_column("rlnImageName", _portable_image_names(particles, index, table))
    if rotations is not None:
        table.drop_columns(OLD_ORIGIN_COLUMNS)
        angles = matrix_to_euler(rotations)
        for j, column in enumerate(POSE_COLUMNS[:3]):
            table.set_column(column, angles[:, j])
        origins = np.zeros((len(index), 2)) if shifts is None else np.asarray(shifts) * particles.pixel_size
        table.set_column("rlnOriginXAngst", origins[:, 0])
        table.set_column("rlnOriginYAngst", origins[:, 1])
    if half_set is not None:
        table.set_column("rlnRandomSubset", np.asarray(half_set, dtype=np.int64))
    for label, values in (columns or {}).items():
        table.set_column(label, values)
    if not table.has("rlnImageId"):
        table.set_column("rlnImageId", particles.ids[index])
    optics = StarBlock("optics", list(particles.optics.columns), [list(r) for r in particles.optics.rows])
    if not optics.has("rlnImageSize"):
        optics.set_column("rlnImageSize", [particles.box] * len(optics))
    if not optics.has("rlnImageDimensionality"):
        optics.set_column("rlnImageDimensionality", [2] * len(optics))
    write_star(path, [optics, table])


def _portable_image_names(particles: ParticleSet, index: np.ndarray, table: StarBlock) -> list[str]:
    """Image names that still resolve from anywhere: an input name is kept when it is
    absolute or relative to the current folder (RELION's project-folder convention);
    a name that was relative to the input STAR file's folder becomes absolute."""
    names = []
    cwd = os.getcwd()
    for name, stack, slice_ in zip(table.text("rlnImageName"), particles.stack_of[index], particles.slice_of[index]):
        file = name.partition("@")[2] or name
        resolved = particles.stacks[stack]
        here = os.path.abspath(os.path.join(cwd, file))
        names.append(name if here == os.path.abspath(resolved) else f"{slice_ + 1:06d}@{resolved}")
    return names
