"""Finding the symmetry axes of a map made without symmetry, and putting the map onto RELION's axes.

A map V has the symmetry G about axes turned by a frame Q when W(x) = V(Q^T x) has it about RELION's
axes, i.e. when V is unchanged by S = Q^T L Q for every L of G; it is enough that it is unchanged by
the group's generators. Every frame of a Hopf grid is scored by the mean correlation of V with V turned
by each generator's S (each with its best translation, at a low resolution), and the best few frames are
refined by a pattern search that halves its steps. Before that, the map is centred on its centre of mass,
which a symmetric map's axes go through.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .align3d import Alignment, _Problem, transform_map, working_box
from .backend import array_module, to_numpy
from .fourier import resample_volume
from .projector import grid_to_volume, project, volume_to_grid
from .sgd import centre_of_mass_px
from .so3 import grid_rotations, rotvec_to_matrix
from .symmetry import (
    _generators,
    _rotation_about,
    _sphere_coordinates,
    group_order,
    point_group,
    symmetrise_grid,
    symmetry_name,
)


@dataclass
class SymmetryFit:
    """frame: (3, 3) Q, the map turned by Q has the group's axes along RELION's; centre_px: (x, y, z) offset of
    the map's centre of mass from the box centre (pixels); score: mean correlation with the generators'
    copies; operator_correlations: (|G|,) the correlation of the map on the axes with each operator's copy."""

    frame: np.ndarray
    centre_px: np.ndarray
    score: float
    operator_correlations: np.ndarray

    def to_dict(self) -> dict:
        return {
            "frame": self.frame.tolist(),
            "centre_px": self.centre_px.tolist(),
            "score": self.score,
            "operator_correlations": self.operator_correlations.tolist(),
        }


def _generator_matrices(name: str) -> np.ndarray:
    return np.array([_rotation_about(axis, fold) for fold, axis in _generators(symmetry_name(name))])


def _frame_scores(problem: _Problem, frames: np.ndarray, generators: np.ndarray) -> np.ndarray:
    """Mean over generators g of the correlation of V with V(S y), S = Q^T g Q, for each frame Q (F, 3, 3)."""
    # transform_map's matrix M turns V into V(M^T x): M = S^T = Q^T g^T Q
    matrices = np.einsum("fji,gkj,fkl->fgil", frames, generators, frames).reshape(-1, 3, 3)
    scores, _ = problem.score(matrices, exact=False)
    return scores.reshape(len(frames), len(generators)).mean(axis=1)


def _refine_frame(problem: _Problem, frame: np.ndarray, generators: np.ndarray, score: float):
    step = 8.0
    offsets = np.array([0.0, -1.0, 1.0])
    while step >= 0.25:
        vecs = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).reshape(-1, 3)[1:]
        for _ in range(4):
            candidates = rotvec_to_matrix(np.deg2rad(step) * vecs) @ frame
            scores = _frame_scores(problem, candidates, generators)
            best = int(np.argmax(scores))
            if scores[best] <= score:
                break
            frame, score = candidates[best], float(scores[best])
        step /= 2.0
    return frame, score


def find_symmetry_axes(
    volume, pixel_size: float, name: str, resolution_A: float = 12.0, candidates: int = 4
) -> SymmetryFit:
    """The frame that puts the symmetry axes of ``volume`` (N, N, N) along RELION's axes of group ``name``.

    The search runs at ``resolution_A`` (its coarse grid at twice that); returns a :class:`SymmetryFit`.
    """
    xp = array_module(volume)
    volume = xp.asarray(volume, dtype=xp.float32)
    full = volume.shape[0]
    centre = centre_of_mass_px(volume)
    # everything below runs on the map Fourier-cropped to the box that the search resolution needs
    n = working_box(full, pixel_size, resolution_A)
    volume = resample_volume(volume, n) if n < full else volume
    pixel_size = pixel_size * full / n
    generators = _generator_matrices(name)
    centred = transform_map(volume, Alignment(np.eye(3), -centre * n / full), oversampling=2)
    coarse_res = 2.0 * resolution_A
    coarse = _Problem(centred, centred, pixel_size, working_box(n, pixel_size, coarse_res), coarse_res)
    frames = grid_rotations(2)
    scores = _frame_scores(coarse, frames, generators)
    fine = _Problem(centred, centred, pixel_size, working_box(n, pixel_size, resolution_A), resolution_A)
    best_frame, best_score = None, -np.inf
    for i in np.argsort(-scores)[:candidates]:
        frame, score = _refine_frame(
            fine, frames[i], generators, float(_frame_scores(fine, frames[i : i + 1], generators)[0])
        )
        if score > best_score:
            best_frame, best_score = frame, score
    on_axes = transform_map(centred, Alignment(best_frame, np.zeros(3)), oversampling=2)
    return SymmetryFit(best_frame, centre, best_score, operator_correlations(on_axes, name, pixel_size, resolution_A))


def operator_correlations(volume, name: str, pixel_size: float, resolution_A: float) -> np.ndarray:
    """(|G|,) correlation of ``volume`` with its copy turned by each operator of the group (1 for the identity),
    over the frequencies up to ``resolution_A`` (as :func:`map_correlation`)."""
    xp = array_module(volume)
    grid = volume_to_grid(xp.asarray(volume, dtype=xp.float32), 2)
    coords, inside = _low_frequencies(grid.shape[0], volume.shape[0] * pixel_size / resolution_A, xp)
    values = grid.reshape(-1)[inside]
    turned = [project(grid, coords @ xp.asarray(r.T, dtype=xp.float32), 2) for r in point_group(name)]
    return np.array([_correlation(values, t) for t in turned])


def map_correlation(a, b, pixel_size: float, resolution_A: float) -> float:
    """Correlation of two maps (N, N, N) over their Fourier coefficients up to ``resolution_A``, the mean left out."""
    xp = array_module(a)
    grids = [volume_to_grid(xp.asarray(v, dtype=xp.float32), 2) for v in (a, b)]
    _, inside = _low_frequencies(grids[0].shape[0], a.shape[0] * pixel_size / resolution_A, xp)
    return _correlation(grids[0].reshape(-1)[inside], grids[1].reshape(-1)[inside])


def _low_frequencies(size: int, radius: float, xp):
    coords, inside = _sphere_coordinates(size, 2, xp)
    low = xp.sum(coords * coords, axis=1) <= radius * radius
    return coords[low], inside[low]


def _correlation(u, v) -> float:
    xp = array_module(u)
    u, v = u - u.mean(), v - v.mean()
    cross = xp.real(xp.sum(u * xp.conj(v)))
    return float(to_numpy(cross / xp.sqrt(xp.sum(xp.abs(u) ** 2) * xp.sum(xp.abs(v) ** 2))))


def symmetrise_map(volume, name: str):
    """The mean of a map (N, N, N) over the operators of the group about the box centre (float32)."""
    xp = array_module(volume)
    n = volume.shape[0]
    grid = symmetrise_grid(volume_to_grid(xp.asarray(volume, dtype=xp.float32), 2), name, 2) / group_order(name)
    return grid_to_volume(grid, n, gridding_correction=False)


def onto_axes(volume, fit: SymmetryFit, name: str):
    """The map centred, turned onto RELION's axes and symmetrised."""
    centred = transform_map(volume, Alignment(np.eye(3), -fit.centre_px), oversampling=2)
    return symmetrise_map(transform_map(centred, Alignment(fit.frame, np.zeros(3)), oversampling=2), name)
