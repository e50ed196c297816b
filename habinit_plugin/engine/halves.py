"""Splitting particles into the two gold-standard half sets."""

from __future__ import annotations

import numpy as np

from .particles import ParticleError, ParticleSet


def image_groups(particles: ParticleSet) -> np.ndarray:
    """(P,) int64: the index of each particle's image (stack and index in it) among the distinct images,
    so that rows holding the same image have the same value."""
    key = particles.stack_of.astype(np.int64) * (int(particles.slice_of.max(initial=0)) + 1) + particles.slice_of
    return np.unique(key, return_inverse=True)[1].astype(np.int64)


def duplicated_images(particles: ParticleSet) -> tuple[int, np.ndarray]:
    """(number of images standing on more than one row, 0-based positions of the rows of the first one)."""
    groups = image_groups(particles)
    counts = np.bincount(groups)
    repeated = np.flatnonzero(counts > 1)
    if len(repeated) == 0:
        return 0, np.empty(0, dtype=np.int64)
    first_row = np.flatnonzero(counts[groups] > 1)[0]
    return len(repeated), np.flatnonzero(groups == groups[first_row])


def refuse_duplicated_images(particles: ParticleSet) -> None:
    """A ParticleError naming the input rows when one image stands on several rows: its copies could land
    in both half sets and inflate the gold-standard FSC."""
    n_images, rows = duplicated_images(particles)
    if not n_images:
        return
    first = int(rows[0])
    numbers = ", ".join(str(r + 1) for r in np.sort(particles.rows()[rows])[:5])
    raise ParticleError(
        f"{particles.source}: rows {numbers} hold the same image "
        f"{particles.slice_of[first] + 1}@{particles.stacks[particles.stack_of[first]]}; {n_images} image(s) "
        "appear on more than one row (merged particle sets?): remove the duplicated rows, or keep them with "
        "--keep-duplicates (all copies of an image then go to the same half set)"
    )


def assign_half_sets(
    particles: ParticleSet, seed: int, keep_existing: bool = True, keep_duplicates: bool = False
) -> tuple[np.ndarray, str]:
    """Half set (1 or 2) of every particle and how it was chosen.

    An input split (``rlnRandomSubset`` / cryoSPARC ``alignments3D/split``) is kept
    when ``keep_existing`` and the column exists; values other than 1 and 2 are an
    error naming the first bad row. Otherwise a seeded random split into two halves
    whose sizes differ by at most one. Rows that hold the same image are refused, or
    with ``keep_duplicates`` put in the same half set (an input split that separates
    them is refused), so that no image is ever in both halves.
    """
    groups = image_groups(particles)
    if not keep_duplicates:
        refuse_duplicated_images(particles)
    if keep_existing and particles.half_set is not None:
        return _input_split(particles, groups), "input split (rlnRandomSubset)"
    rng = np.random.default_rng(seed)
    if groups.max(initial=-1) + 1 < len(particles):
        return _random_split_of_images(groups, rng), f"random split of the images (seed {seed})"
    order = rng.permutation(len(particles))
    half = np.empty(len(particles), dtype=np.int64)
    half[order[: (len(particles) + 1) // 2]] = 1
    half[order[(len(particles) + 1) // 2 :]] = 2
    return half, f"random split (seed {seed})"


def _input_split(particles: ParticleSet, groups: np.ndarray) -> np.ndarray:
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
    n_groups = int(groups.max(initial=-1)) + 1
    lowest = np.full(n_groups, 3, dtype=np.int64)
    np.minimum.at(lowest, groups, values)
    split = np.flatnonzero(lowest[groups] != values)
    if len(split):
        rows = np.flatnonzero(groups == groups[split[0]])
        numbers = ", ".join(str(r + 1) for r in np.sort(particles.rows()[rows])[:5])
        raise ParticleError(
            f"{particles.source}: rows {numbers} hold the same image but the input split puts them in "
            "different half sets (_rlnRandomSubset 1 and 2): the halves would share it; use a new random "
            "split (--no-keep-split) or remove the duplicated rows"
        )
    return values.astype(np.int64)


def _random_split_of_images(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half set of every particle when whole images (all rows of one image) are dealt out in random order,
    each to the half with fewer particles so far."""
    sizes = np.bincount(groups)
    half_of_image = np.empty(len(sizes), dtype=np.int64)
    filled = [0, 0]
    for g in rng.permutation(len(sizes)):
        h = 0 if filled[0] <= filled[1] else 1
        half_of_image[g] = h + 1
        filled[h] += int(sizes[g])
    return half_of_image[groups]
