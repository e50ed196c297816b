"""Splitting particles into the two gold-standard half sets."""

from __future__ import annotations

import numpy as np

from .particles import ParticleError, ParticleSet


def assign_half_sets(particles: ParticleSet, seed: int, keep_existing: bool = True) -> tuple[np.ndarray, str]:
    """Half set (1 or 2) of every particle and how it was chosen.

    An input split (``rlnRandomSubset`` / cryoSPARC ``alignments3D/split``) is kept
    when ``keep_existing`` and the column exists; values other than 1 and 2 are an
    error naming the first bad row. Otherwise a seeded random split into two halves
    whose sizes differ by at most one.
    """
    if keep_existing and particles.half_set is not None:
        values = particles.half_set
        bad = np.flatnonzero((values != 1) & (values != 2))
        if len(bad):
            i = int(bad[0])
            found = ", ".join(str(v) for v in np.unique(values[bad])[:5])
            raise ParticleError(
                f"{particles.source}: _rlnRandomSubset must be 1 or 2 for every particle to keep the input "
                f"split, but {len(bad)} particle(s) have other values ({found}), first {particles.describe(i)}; "
                "fix the column or do not keep the input split"
            )
        return values.astype(np.int64), "input split (rlnRandomSubset)"
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(particles))
    half = np.empty(len(particles), dtype=np.int64)
    half[order[: (len(particles) + 1) // 2]] = 1
    half[order[(len(particles) + 1) // 2 :]] = 2
    return half, f"random split (seed {seed})"
