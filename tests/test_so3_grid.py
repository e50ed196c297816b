"""Hopf-fibration SO(3) grids: size, uniform spacing, covering, parent/child nesting.

Euler <-> matrix round trips (RELION ZYZ) are tested in ``test_so3.py``; this file
covers the grids that the pose search and the map alignment walk down.
"""

from __future__ import annotations

import numpy as np
import pytest

from habinit_plugin.engine import so3


def _nearest_neighbour_angles(rotations: np.ndarray) -> np.ndarray:
    """Geodesic angle (degrees) from each rotation (n, 3, 3) to its nearest other rotation, (n,)."""
    trace = np.einsum("aij,bij->ab", rotations, rotations)
    np.fill_diagonal(trace, -np.inf)
    cos = (trace.max(axis=1) - 1.0) / 2.0
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


@pytest.mark.parametrize("level", [1, 2])
def test_grid_size_and_orthonormal(level):
    grid = so3.grid_rotations(level)
    assert so3.grid_size(level) == 72 * 8**level
    assert grid.shape == (72 * 8**level, 3, 3)
    assert np.allclose(grid @ np.swapaxes(grid, 1, 2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(grid), 1.0, atol=1e-12)
    # a subset of indices gives the same matrices as the full grid
    index = np.array([0, 5, len(grid) - 1])
    assert np.allclose(so3.grid_rotations(level, index), grid[index])


@pytest.mark.parametrize("level", [1, 2])
def test_grid_nearest_neighbour_spacing_is_uniform(level):
    """Measured: level 1 -> 27.8..30.0 deg, level 2 -> 12.7..15.0 deg (spacing 30, 15)."""
    spacing = so3.grid_spacing(level)
    assert spacing == pytest.approx(60.0 / 2**level)
    nn = _nearest_neighbour_angles(so3.grid_rotations(level))
    assert nn.min() > 0.75 * spacing  # no clumps (and no duplicate rotations)
    assert nn.max() < 1.1 * spacing  # no holes between neighbours
    assert 0.85 * spacing < nn.mean() < 1.0 * spacing


def test_naive_euler_grid_fails_the_spacing_bracket():
    """Negative control: a regular (rot, tilt, psi) grid of similar size clumps at the poles."""
    rot = np.arange(0.0, 360.0, 30.0)
    tilt = np.arange(15.0, 180.0, 30.0)
    psi = np.arange(0.0, 360.0, 45.0)
    r, t, p = np.meshgrid(rot, tilt, psi, indexing="ij")
    euler_grid = so3.euler_to_matrix(r.ravel(), t.ravel(), p.ravel())
    assert len(euler_grid) == 576 == so3.grid_size(1)
    nn = _nearest_neighbour_angles(euler_grid)
    assert nn.min() < 0.75 * so3.grid_spacing(1)


@pytest.mark.parametrize("level", [1, 2])
def test_grid_covers_so3(level):
    """Every random rotation has a grid point within 0.9 x spacing (measured 0.85 / 0.82)."""
    spacing = so3.grid_spacing(level)
    rotations = so3.random_rotations(2000, np.random.default_rng(level))
    nearest = so3.nearest_grid_point(level, rotations)
    distance = so3.geodesic_distance(so3.grid_rotations(level, nearest), rotations)
    assert distance.max() < 0.9 * spacing
    assert distance.mean() < 0.5 * spacing
    # the brute-force nearest point agrees
    grid = so3.grid_rotations(level)
    brute = np.argmin(so3.geodesic_distance(grid[None], rotations[:200, None]), axis=1)
    assert np.array_equal(brute, nearest[:200])


def test_voronoi_cells_have_equal_volume():
    """Haar-random rotations fall evenly into the cells of the level-1 grid (measured 0.84..1.22)."""
    level = 1
    n_grid = so3.grid_size(level)
    rotations = so3.random_rotations(150_000, np.random.default_rng(7))
    counts = np.bincount(so3.nearest_grid_point(level, rotations), minlength=n_grid)
    expected = len(rotations) / n_grid
    assert counts.min() > 0.7 * expected
    assert counts.max() < 1.4 * expected
    assert counts.std() / expected < 0.09  # Poisson alone gives 0.062


@pytest.mark.parametrize("level", [0, 1, 2])
def test_children_partition_the_next_level(level):
    children = so3.grid_children(level, np.arange(so3.grid_size(level)))
    assert children.shape == (so3.grid_size(level), 8)
    assert np.array_equal(np.sort(children.ravel()), np.arange(so3.grid_size(level + 1)))
    # shape is kept for any index array
    assert so3.grid_children(level, np.array([[0, 1], [2, 3]])).shape == (2, 2, 8)


@pytest.mark.parametrize("level", [1, 2])
def test_children_lie_closest_to_their_parent(level):
    """Measured: the parent is the nearest level-L point for 94% / 92% of children and
    among the 4 nearest for all; children are within 0.83 / 0.87 x spacing of the parent."""
    spacing = so3.grid_spacing(level)
    grid = so3.grid_rotations(level)
    # every parent at level 1, a random 600 (of 4608) at level 2 to keep it fast
    parents = np.arange(len(grid)) if level == 1 else np.random.default_rng(6).choice(len(grid), 600, replace=False)
    children = so3.grid_children(level, parents)
    child_rot = so3.grid_rotations(level + 1, children.ravel()).reshape(len(parents), 8, 3, 3)
    to_parent = so3.geodesic_distance(grid[parents, None], child_rot)
    assert to_parent.max() < 0.9 * spacing
    assert to_parent.mean() < 0.5 * spacing

    flat = child_rot.reshape(-1, 3, 3)
    parent_of = np.repeat(parents, 8)
    nearest = so3.nearest_grid_point(level, flat)
    assert np.mean(nearest == parent_of) >= 0.9
    trace = np.einsum("nij,gij->ng", flat, grid)
    top4 = np.argpartition(-trace, 4, axis=1)[:, :4]
    assert np.mean(np.any(top4 == parent_of[:, None], axis=1)) >= 0.99


def test_wrong_parent_is_far():
    """Negative control for the nesting test: children of a shuffled parent are not near it."""
    level = 2
    grid = so3.grid_rotations(level)
    rng = np.random.default_rng(3)
    shuffled = rng.permutation(len(grid))
    children = so3.grid_children(level, shuffled)
    child_rot = so3.grid_rotations(level + 1, children.ravel()).reshape(len(grid), 8, 3, 3)
    wrong = so3.geodesic_distance(grid[:, None], child_rot)
    assert np.mean(wrong < 0.9 * so3.grid_spacing(level)) < 0.05


def test_nearest_grid_point_of_grid_points_is_itself():
    level = 2
    index = np.random.default_rng(4).choice(so3.grid_size(level), 300, replace=False)
    assert np.array_equal(so3.nearest_grid_point(level, so3.grid_rotations(level, index)), index)
    # a small perturbation (a quarter of the minimum spacing) keeps the nearest point
    axis = np.random.default_rng(5).normal(size=(300, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    moved = so3.rotvec_to_matrix(axis * np.deg2rad(0.25 * 12.6)) @ so3.grid_rotations(level, index)
    assert np.array_equal(so3.nearest_grid_point(level, moved), index)
