"""cryoSPARC particle ``.cs`` files, read and written through cryosparc-tools' ``Dataset``.

A ``.cs`` file is a table of fields named ``prefix/name`` (NumPy's ``.npy`` record layout,
or cryoSPARC's compressed CSDAT stream; ``Dataset.load`` reads both). Conventions, as
pyem's csparc2star maps them (its ``expmap`` gives the transpose of the usual rotation-vector matrix):

- ``alignments3D/pose`` (rad, float32 x 3) is the rotation vector of the *transpose* of
  RELION's (rot, tilt, psi) matrix;
- ``alignments3D/shift`` (float32 x 2) is RELION's origin in pixels of
  ``alignments3D/psize_A`` (RELION: ``rlnOriginXAngst = shift_x * psize_A``);
- ``alignments3D/split`` (uint32) is 0/1 where RELION's ``rlnRandomSubset`` is 1/2;
- ``blob/idx`` is 0-based where RELION's ``N@stack`` is 1-based; angles are radians.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cryosparc.dataset import Dataset

from .outputs import atomic_write
from .particle_set import ParticleError, ParticleSet
from .so3 import matrix_to_euler, matrix_to_rotvec, rotvec_to_matrix
from .star import StarBlock

CS_MAGIC = (b"\x93NUMPY", b"\x95CSDAT")  # NumPy .npy and cryoSPARC's CSDAT stream
UID_COLUMN = "csUid"  # the STAR column that carries a .cs input's uid to the outputs
CS_REQUIRED = (
    "blob/path",
    "blob/idx",
    "blob/psize_A",
    "ctf/accel_kv",
    "ctf/cs_mm",
    "ctf/amp_contrast",
    "ctf/df1_A",
    "ctf/df2_A",
    "ctf/df_angle_rad",
)
# the particle fields cryoSPARC 4-5 writes after extraction or import (cryosparc-tools' test data)
PARTICLE_FIELDS = [
    ("uid", "<u8"),
    ("blob/path", "O"),
    ("blob/idx", "<u4"),
    ("blob/shape", "<u4", (2,)),
    ("blob/psize_A", "<f4"),
    ("blob/sign", "<f4"),
    ("ctf/type", "O"),
    ("ctf/exp_group_id", "<u4"),
    ("ctf/accel_kv", "<f4"),
    ("ctf/cs_mm", "<f4"),
    ("ctf/amp_contrast", "<f4"),
    ("ctf/df1_A", "<f4"),
    ("ctf/df2_A", "<f4"),
    ("ctf/df_angle_rad", "<f4"),
    ("ctf/phase_shift_rad", "<f4"),
    ("ctf/scale", "<f4"),
    ("ctf/scale_const", "<f4"),
    ("ctf/shift_A", "<f4", (2,)),
    ("ctf/tilt_A", "<f4", (2,)),
    ("ctf/trefoil_A", "<f4", (2,)),
    ("ctf/tetra_A", "<f4", (4,)),
    ("ctf/anisomag", "<f4", (4,)),
    ("ctf/bfactor", "<f4"),
]
ALIGNMENT_FIELDS = [
    ("alignments3D/split", "<u4"),
    ("alignments3D/shift", "<f4", (2,)),
    ("alignments3D/pose", "<f4", (3,)),
    ("alignments3D/psize_A", "<f4"),
    ("alignments3D/alpha", "<f4"),
]


def cs_pose_to_rotations(pose: np.ndarray) -> np.ndarray:
    """cryoSPARC poses (P, 3) rotation vectors (rad) -> RELION pose matrices (P, 3, 3)."""
    return np.swapaxes(rotvec_to_matrix(np.asarray(pose, dtype=np.float64)), -1, -2)


def rotations_to_cs_pose(rotations: np.ndarray) -> np.ndarray:
    """RELION pose matrices (P, 3, 3) -> cryoSPARC poses (P, 3) rotation vectors (rad)."""
    return matrix_to_rotvec(np.swapaxes(np.asarray(rotations, dtype=np.float64), -1, -2))


# --------------------------------------------------------------------------- reading


def load_dataset(path: str | Path) -> Dataset:
    """The ``.cs`` file at ``path`` as a Dataset; a one-line ParticleError when it is not one."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic not in CS_MAGIC:
        raise ParticleError(
            f"{path}: not a cryoSPARC .cs file (a .cs is a NumPy record array or a CSDAT stream; this is neither)"
        )
    try:
        return Dataset.load(str(path))
    except Exception as exc:
        cause = exc.__cause__ or exc
        if "allow_pickle" in str(cause):
            raise ParticleError(f"{path}: cannot read .cs without pickle ({cause})") from exc
        raise ParticleError(f"{path}: not a cryoSPARC .cs file ({cause})") from exc


def cs_particles_table(path: str) -> StarBlock:
    """A cryoSPARC particle .cs file as one RELION particles block, the optics columns (voltage, Cs, amplitude
    contrast, ``rlnImagePixelSize``) on every row (particles.py groups them into data_optics)."""
    cs = load_dataset(path)
    missing = [f for f in CS_REQUIRED if f not in cs]
    if missing:
        raise ParticleError(f"{path}: missing cryoSPARC field(s) {', '.join(missing)}")
    n = len(cs)
    if n == 0:
        raise ParticleError(f"{path}: holds no particles")
    blob = [_text(p) for p in cs["blob/path"]]
    blob = [p[1:] if p.startswith(">") else p for p in blob]
    table = StarBlock("particles", [], [[] for _ in range(n)], path)
    table.set_column("rlnImageName", [f"{i + 1:06d}@{p}" for i, p in zip(np.asarray(cs["blob/idx"]), blob)])
    table.set_column("rlnDefocusU", cs["ctf/df1_A"])
    table.set_column("rlnDefocusV", cs["ctf/df2_A"])
    table.set_column("rlnDefocusAngle", np.rad2deg(cs["ctf/df_angle_rad"]))
    if "ctf/phase_shift_rad" in cs:
        table.set_column("rlnPhaseShift", np.rad2deg(cs["ctf/phase_shift_rad"]))
    if "ctf/bfactor" in cs:
        table.set_column("rlnCtfBfactor", cs["ctf/bfactor"])
    table.set_column(UID_COLUMN, [str(int(u)) for u in cs["uid"]])
    if "alignments3D/pose" in cs:
        _pose_columns(table, cs)
    if "alignments3D/split" in cs:
        table.set_column("rlnRandomSubset", np.asarray(cs["alignments3D/split"], dtype=np.int64) + 1)
    table.set_column("rlnVoltage", cs["ctf/accel_kv"])
    table.set_column("rlnSphericalAberration", cs["ctf/cs_mm"])
    table.set_column("rlnAmplitudeContrast", cs["ctf/amp_contrast"])
    table.set_column("rlnImagePixelSize", cs["blob/psize_A"])
    return table


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pose_columns(table: StarBlock, cs: Dataset) -> None:
    """RELION angles (deg) and origins (A) from ``alignments3D/pose`` and ``/shift``."""
    angles = matrix_to_euler(cs_pose_to_rotations(cs["alignments3D/pose"]))
    psize_A = cs["alignments3D/psize_A"] if "alignments3D/psize_A" in cs else cs["blob/psize_A"]
    shift_px = np.asarray(cs["alignments3D/shift"], dtype=np.float64) if "alignments3D/shift" in cs else 0.0
    origins_A = np.zeros((len(cs), 2)) + shift_px * np.asarray(psize_A, dtype=np.float64)[:, None]
    for j, column in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        table.set_column(column, angles[:, j])
    table.set_column("rlnOriginXAngst", origins_A[:, 0])
    table.set_column("rlnOriginYAngst", origins_A[:, 1])


# --------------------------------------------------------------------------- writing


def particle_uids(particles: ParticleSet, index: np.ndarray) -> np.ndarray:
    """(n,) uint64 cryoSPARC uids of particles ``index``: the input's uid where the input came from a .cs
    (the ``csUid`` column), else the particle id."""
    if particles.table.has(UID_COLUMN):
        texts = particles.table.take(index).text(UID_COLUMN)
        return np.array([int(t) for t in texts], dtype=np.uint64)
    return particles.ids[index].astype(np.uint64)


def particles_dataset(
    particles: ParticleSet,
    index=None,
    rotations: np.ndarray | None = None,
    shifts: np.ndarray | None = None,
    half_set: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> Dataset:
    """A cryoSPARC particle Dataset of particles ``index`` (all when None), one row each.

    rotations: (n, 3, 3) RELION pose matrices (no ``alignments3D`` fields when None);
    shifts: (n, 2) RELION origins in pixels (zero when None); half_set: (n,) 1/2 (split 0/1;
    all 0 when None); scale: (n,) per-particle signal scale as ``alignments3D/alpha`` (1 when None).
    ``blob/sign`` is +1 for particles brighter than the background (RELION's convention), -1 for a
    stack the job read with its contrast inverted.
    """
    index = np.arange(len(particles)) if index is None else np.asarray(index, dtype=np.int64)
    n = len(index)
    fields = PARTICLE_FIELDS + (ALIGNMENT_FIELDS if rotations is not None else [])
    cs = Dataset.allocate(n, fields)
    cs["uid"] = particle_uids(particles, index)
    cs["blob/path"] = [particles.stacks[s] for s in particles.stack_of[index]]
    cs["blob/idx"] = particles.slice_of[index]
    cs["blob/shape"] = particles.box
    cs["blob/psize_A"] = particles.pixel_size
    cs["blob/sign"] = 1.0 if particles.normalisation is None else particles.normalisation.sign
    _ctf_fields(cs, particles, index)
    if rotations is not None:
        cs["alignments3D/pose"] = rotations_to_cs_pose(rotations)
        cs["alignments3D/shift"] = 0.0 if shifts is None else np.asarray(shifts, dtype=np.float64)
        cs["alignments3D/psize_A"] = particles.pixel_size
        cs["alignments3D/split"] = 0 if half_set is None else np.asarray(half_set, dtype=np.int64) - 1
        cs["alignments3D/alpha"] = 1.0 if scale is None else np.asarray(scale, dtype=np.float64)
    return cs


def _ctf_fields(cs: Dataset, particles: ParticleSet, index: np.ndarray) -> None:
    """The ``ctf/*`` fields of particles ``index``, as cryoSPARC's Import Particle Stack fills them."""
    ctf = particles.ctf.subset(index)
    table = particles.table
    cs["ctf/type"] = ["imported"] * len(index)
    cs["ctf/exp_group_id"] = table.take(index).ints("rlnOpticsGroup") if table.has("rlnOpticsGroup") else 1
    cs["ctf/accel_kv"] = ctf.voltage
    cs["ctf/cs_mm"] = ctf.cs
    cs["ctf/amp_contrast"] = ctf.amplitude_contrast
    cs["ctf/df1_A"] = ctf.defocus_u
    cs["ctf/df2_A"] = ctf.defocus_v
    cs["ctf/df_angle_rad"] = np.deg2rad(ctf.defocus_angle)
    cs["ctf/phase_shift_rad"] = np.deg2rad(ctf.phase_shift)
    cs["ctf/scale"] = 1.0
    cs["ctf/bfactor"] = ctf.bfactor


def write_particles_cs(
    path: str | Path,
    particles: ParticleSet,
    index=None,
    rotations: np.ndarray | None = None,
    shifts: np.ndarray | None = None,
    half_set: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> None:
    """Write particles ``index`` as a cryoSPARC ``.cs`` file (NumPy layout, as cryoSPARC writes it), atomically.

    Arguments as :func:`particles_dataset`; image paths are absolute.
    """
    cs = particles_dataset(particles, index, rotations, shifts, half_set, scale)
    with atomic_write(path) as tmp:
        cs.save(str(tmp))
