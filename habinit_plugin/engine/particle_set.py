"""A particle set in memory: per-particle metadata as arrays, the input as RELION 3.1 tables, images on disk.

A :class:`ParticleSet` holds per-particle metadata as arrays and the original STAR
table as text (RELION 3.1 layout: an optics block and a particles block), so that
outputs keep every input column. Images stay in their MRC stacks and are read in
batches through memory maps. particles.py reads and writes STAR files, cryosparc.py
cryoSPARC .cs files.

Poses follow RELION: ``rotations`` are the matrices of (rot, tilt, psi) and
``shifts`` are RELION origins in pixels: the particle centre sits at
``box // 2 - origin`` in the image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .ctf import CTFParams
from .mrc import MRCError, read_stack_images
from .normalisation import ImageNormalisation
from .star import StarBlock


class ParticleError(ValueError):
    """Particles cannot be used; the message names the file, row, column or particle."""


@dataclass
class ParticleSet:
    """Metadata of P particles.

    ids: (P,) int64, rlnImageId when the input has it, else the 1-based row.
    stacks: absolute paths of the image stacks; stack_of: (P,) index into stacks;
    slice_of: (P,) 0-based image index in its stack.
    pixel_size: Angstrom; box: pixels (square, even).
    ctf: per-particle CTF parameters.
    rotations: (P, 3, 3) RELION pose matrices or None; shifts: (P, 2) RELION origins
    (x, y) in pixels or None; half_set: (P,) int64 rlnRandomSubset values or None.
    table / optics: the input as a RELION 3.1 particles block and optics block.
    """

    source: str
    ids: np.ndarray
    stacks: list[str]
    stack_of: np.ndarray
    slice_of: np.ndarray
    pixel_size: float
    box: int
    ctf: CTFParams
    rotations: np.ndarray | None
    shifts: np.ndarray | None
    half_set: np.ndarray | None
    table: StarBlock
    optics: StarBlock
    input_row: np.ndarray | None = None  # (P,) 0-based row in the input file (None: 0..P-1)
    normalisation: ImageNormalisation | None = None  # applied by read_images (None: the pixels as stored)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index) -> ParticleSet:
        index = np.asarray(index, dtype=np.int64)
        return replace(
            self,
            ids=self.ids[index],
            stack_of=self.stack_of[index],
            slice_of=self.slice_of[index],
            ctf=self.ctf.subset(index),
            rotations=None if self.rotations is None else self.rotations[index],
            shifts=None if self.shifts is None else self.shifts[index],
            half_set=None if self.half_set is None else self.half_set[index],
            table=self.table.take(index),
            input_row=self.rows()[index],
        )

    def rows(self) -> np.ndarray:
        """(P,) 0-based rows of the particles in the input file."""
        return np.arange(len(self.ids)) if self.input_row is None else self.input_row

    def describe(self, i: int) -> str:
        """'particle <id> (row r of <file>, image <name>)' for error messages."""
        name = f"{self.slice_of[i] + 1}@{self.stacks[self.stack_of[i]]}"
        return f"particle {self.ids[i]} (row {self.rows()[i] + 1} of {self.source}, image {name})"

    def read_images(self, index) -> np.ndarray:
        """Images of particles ``index`` as float32 (B, box, box), in that order.

        Raises ParticleError naming the particle when an image holds NaN or Inf.
        """
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), self.box, self.box), dtype=np.float32)
        stack_ids = self.stack_of[index]
        for s in np.unique(stack_ids):
            where = np.flatnonzero(stack_ids == s)
            try:
                out[where] = read_stack_images(self.stacks[s], self.slice_of[index[where]])
            except MRCError as exc:
                raise ParticleError(str(exc)) from exc
        finite = np.isfinite(out).all(axis=(1, 2))
        if not finite.all():
            bad = int(index[np.flatnonzero(~finite)[0]])
            raise ParticleError(f"{self.describe(bad)} contains NaN or infinite pixels")
        return out if self.normalisation is None else self.normalisation.apply(out)

    def check_images(self, chunk: int = 2000) -> None:
        """Read every image once; a ParticleError naming the input row of the first one with NaN or inf."""
        for start in range(0, len(self), chunk):
            self.read_images(np.arange(start, min(start + chunk, len(self))))

    @property
    def image_bytes(self) -> int:
        """Bytes of the particles' images as float32."""
        return 4 * len(self) * self.box * self.box


class CroppedParticles:
    """A view of a :class:`ParticleSet` whose images are cropped in real space to their central ``box`` pixels.

    Same pixel size, CTF and metadata (every attribute but ``box`` and :meth:`read_images` is the set's);
    the crop starts at pixel ``set.box // 2 - box // 2`` so the box centre ``set.box // 2`` lands on
    ``box // 2`` and RELION origins in pixels keep their values. ``box`` and the set's box are even.
    """

    def __init__(self, particles: ParticleSet, box: int):
        if box % 2 or particles.box % 2 or not 0 < box <= particles.box:
            raise ValueError(f"cannot crop {particles.source}'s box {particles.box} to {box}: both even, crop <= box")
        self.full = particles
        self.box = box

    def __len__(self) -> int:
        return len(self.full)

    def __getattr__(self, name: str):
        if name == "full":  # not set yet (a copy being built)
            raise AttributeError(name)
        return getattr(self.full, name)

    def read_images(self, index) -> np.ndarray:
        """Images of particles ``index`` as float32 (B, box, box): the central crop of the set's images (after
        its normalisation)."""
        lo = self.full.box // 2 - self.box // 2
        images = self.full.read_images(index)
        return np.ascontiguousarray(images[:, lo : lo + self.box, lo : lo + self.box])

    @property
    def image_bytes(self) -> int:
        """Bytes of the cropped images as float32."""
        return 4 * len(self) * self.box * self.box
