"""Rotations: RELION Euler convention, round trips, cryoSPARC rotation vectors."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from habinit_plugin.engine import so3


def test_euler_matrix_is_relion_zyz():
    """A = Rz(psi) Ry(tilt) Rz(rot) with passive axis rotations: the inverse of scipy's intrinsic ZYZ."""
    rng = np.random.default_rng(0)
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], size=(50, 3))
    ours = so3.euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    scipy_active = Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix()
    assert np.allclose(ours, np.swapaxes(scipy_active, 1, 2), atol=1e-12)
    # RELION's documented first row at rot = 90, tilt = 0, psi = 0: (cos g cos a - ..., ...) = (0, 1, 0)
    assert np.allclose(so3.euler_to_matrix(90.0, 0.0, 0.0)[0], [0.0, 1.0, 0.0], atol=1e-12)


def test_euler_round_trip():
    rng = np.random.default_rng(1)
    matrices = so3.random_rotations(500, rng)
    angles = so3.matrix_to_euler(matrices)
    assert np.all((angles[:, 1] >= 0) & (angles[:, 1] <= 180))
    back = so3.euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    assert np.allclose(back, matrices, atol=1e-10)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_euler_at_the_poles(tilt):
    m = so3.euler_to_matrix(25.0, tilt, 40.0)
    rot, t, psi = so3.matrix_to_euler(m)
    assert t == pytest.approx(tilt)
    assert np.allclose(so3.euler_to_matrix(rot, t, psi), m, atol=1e-12)


def test_rotation_vector_is_rodrigues():
    rng = np.random.default_rng(2)
    vecs = rng.normal(size=(20, 3))
    assert np.allclose(so3.rotvec_to_matrix(vecs), Rotation.from_rotvec(vecs).as_matrix(), atol=1e-12)
    assert np.allclose(so3.matrix_to_rotvec(so3.rotvec_to_matrix(vecs)), Rotation.from_rotvec(vecs).as_rotvec())


def test_geodesic_distance():
    a = so3.euler_to_matrix(10.0, 20.0, 30.0)
    b = a @ so3.rotvec_to_matrix(np.array([0.0, 0.0, np.deg2rad(7.0)]))
    assert so3.geodesic_distance(a, b) == pytest.approx(7.0, abs=1e-6)
    assert so3.geodesic_distance(a, a) == pytest.approx(0.0, abs=1e-6)
