"""Orientation diagnostics (SCF of Baldwin & Lyumkis 2020) and directional (conical) FSC."""

import json
import time

import numpy as np
import pytest

from habinit_plugin.engine import so3
from habinit_plugin.engine.directional_fsc import conical_fsc, directional_resolution
from habinit_plugin.engine.fourier import centered_fftn, half_plane_frequencies
from habinit_plugin.engine.fsc import fsc, resolution_at
from habinit_plugin.engine.orientation import (
    SCF_THRESHOLD,
    expand_directions,
    orientation_report,
    sampling_compensation_factor,
    view_directions,
)
from habinit_plugin.engine.projector import slice_coordinates
from habinit_plugin.engine.symmetry import point_group

# ------------------------------------------------------------------ poses


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _poses_viewing(axes, rng):
    """RELION poses whose view direction is each row of ``axes`` (N, 3), random in-plane angle."""
    axes = np.asarray(axes, dtype=np.float64)
    tilt = np.rad2deg(np.arccos(np.clip(axes[:, 2], -1, 1)))
    rot = np.rad2deg(np.arctan2(axes[:, 1], axes[:, 0]))
    return so3.euler_to_matrix(rot, tilt, rng.uniform(0, 360, len(axes)))


def _directions_in_cone(axis, cone_deg, n, rng):
    """n directions uniform (in area) within cone_deg of axis."""
    cos_t = rng.uniform(np.cos(np.deg2rad(cone_deg)), 1.0, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    sin_t = np.sqrt(1 - cos_t**2)
    local = np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], axis=1)
    z = _unit(axis)
    x = _unit(np.cross(z, [1.0, 0.0, 0.0] if abs(z[0]) < 0.9 else [0.0, 1.0, 0.0]))
    y = np.cross(z, x)
    return local @ np.stack([x, y, z])


def _angle_to_axis(v, axis):
    return np.rad2deg(np.arccos(min(1.0, abs(float(np.dot(_unit(v), _unit(axis)))))))


def test_view_direction_is_the_normal_of_the_central_section_and_relion_s_tilt_rot():
    rng = np.random.default_rng(0)
    rot, tilt, psi = rng.uniform(0, 360, 50), rng.uniform(0, 180, 50), rng.uniform(0, 360, 50)
    a = so3.euler_to_matrix(rot, tilt, psi)
    n = view_directions(a)
    coords = slice_coordinates(a, half_plane_frequencies(6.0)).astype(np.float64)  # A^T (kx, ky, 0)
    assert np.abs(np.einsum("rmi,ri->rm", coords, n)).max() < 1e-4  # the section is perpendicular to n
    t, r = np.deg2rad(tilt), np.deg2rad(rot)
    expected = np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], axis=1)
    assert np.allclose(n, expected, atol=1e-12)
    assert np.allclose(view_directions(np.eye(3)[None]), [[0, 0, 1]])


def test_uniform_views_give_scf_near_one_and_no_warning():
    rng = np.random.default_rng(1)
    report = orientation_report(so3.random_rotations(20000, rng))
    json.dumps(report)  # JSON-safe
    assert report["scf"] > 0.97 and report["scf_star"] > 0.97
    assert report["warning"] is None and report["note"] is None
    assert report["fraction_unsampled"] == 0.0
    assert report["preferred_fraction"] < 0.08  # 1 - cos 15 deg = 0.034 expected, plus the max over directions
    assert report["n_views"] == 20000 and report["n_views_used"] == 10000


def test_a_preferred_view_of_35_percent_is_flagged_with_its_axis():
    rng = np.random.default_rng(2)
    axis = _unit([1.0, -2.0, 2.0])
    n, m = 20000, 7000
    cluster = _poses_viewing(_directions_in_cone(axis, 15.0, m, rng), rng)
    poses = np.concatenate([cluster, so3.random_rotations(n - m, rng)])
    report = orientation_report(poses)
    assert report["scf_star"] < SCF_THRESHOLD
    assert report["warning"] is not None and "SCF*" in report["warning"] and "\n" not in report["warning"]
    assert _angle_to_axis(report["preferred_direction"], axis) < 5.0
    assert _angle_to_axis(report["least_sampled_direction"], axis) < 10.0  # stretched along the view axis
    assert report["preferred_fraction"] == pytest.approx(0.35 + 0.65 * (1 - np.cos(np.deg2rad(15))), abs=0.03)
    # a milder preference (15%) passes
    mild = np.concatenate([cluster[:3000], so3.random_rotations(n - 3000, rng)])
    assert orientation_report(mild)["warning"] is None


def test_a_cluster_blurred_by_pose_errors_is_still_flagged():
    """Found poses carry errors of a few degrees: a 35% cluster then spreads (SCF* about 0.81, 28% in the cone,
    as bench/real_data.py's set); the crowded cone alone flags it, and uniform views with the same errors pass."""
    rng = np.random.default_rng(4)
    axis = _unit([0.3, 0.2, -1.0])
    n, m = 5000, 1750
    cluster = _poses_viewing(_directions_in_cone(axis, 15.0, m, rng), rng)
    poses = np.concatenate([cluster, so3.random_rotations(n - m, rng)])
    blur = so3.rotvec_to_matrix(rng.normal(0.0, np.deg2rad(6.0), (n, 3)))
    report = orientation_report(blur @ poses)
    assert report["preferred_fraction"] > 0.2 and "preferred orientation" in report["warning"]
    assert orientation_report(blur @ so3.random_rotations(n, rng))["warning"] is None


def test_views_on_one_cone_sample_fourier_space_badly():
    rng = np.random.default_rng(3)
    n = 20000
    top = orientation_report(_poses_viewing(_directions_in_cone([0, 0, 1], 5.0, n, rng), rng))
    assert top["scf_star"] < 0.05 and top["fraction_unsampled"] > 0.8 and top["warning"] is not None
    assert _angle_to_axis(top["least_sampled_direction"], [0, 0, 1]) < 5.0  # missing cone along z
    ring = np.linspace(0, 2 * np.pi, n, endpoint=False)
    tilted = 45.0  # every view 45 deg off z: Fourier directions within 45 deg of z are never sampled
    cone45 = np.stack([np.sin(np.deg2rad(tilted)) * np.cos(ring), np.sin(np.deg2rad(tilted)) * np.sin(ring)], 1)
    cone45 = np.column_stack([cone45, np.full(n, np.cos(np.deg2rad(tilted)))])
    report = orientation_report(_poses_viewing(cone45, rng))
    assert report["scf_star"] < 0.2 and report["fraction_unsampled"] == pytest.approx(1 - np.cos(np.pi / 4), abs=0.03)
    # side views only (all views perpendicular to z): every Fourier direction is sampled, S ~ 1/sin(angle to z),
    # SCF = 8 / pi^2 = 0.81, the case that defines the threshold
    side = np.column_stack([np.cos(ring), np.sin(ring), np.zeros(n)])
    scf, scf_star = sampling_compensation_factor(_poses_viewing(side, rng))
    assert scf == pytest.approx(8 / np.pi**2, abs=0.03) and scf_star == pytest.approx(scf)


def test_report_does_not_depend_on_the_in_plane_angle():
    rng = np.random.default_rng(4)
    poses = np.concatenate(
        [so3.random_rotations(3000, rng), _poses_viewing(_directions_in_cone([1, 1, 0], 10, 2000, rng), rng)]
    )
    psi = rng.uniform(0, 2 * np.pi, len(poses))
    c, s = np.cos(psi), np.sin(psi)
    rz = np.zeros((len(poses), 3, 3))
    rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1], rz[:, 2, 2] = c, -s, s, c, 1.0
    assert np.allclose(view_directions(rz @ poses), view_directions(poses), atol=1e-12)
    assert orientation_report(rz @ poses) == orientation_report(poses)


@pytest.mark.parametrize("name", ["C4", "D3", "O"])
def test_symmetry_expansion_is_the_views_of_the_equivalent_poses(name):
    rng = np.random.default_rng(5)
    poses = so3.random_rotations(7, rng)
    group = point_group(name)
    expanded = expand_directions(view_directions(poses), name)
    assert expanded.shape == (len(group) * 7, 3)
    explicit = np.concatenate([view_directions(poses @ g) for g in group])  # poses A L see the same images
    assert np.allclose(expanded, explicit, atol=1e-12)


def test_symmetry_completes_the_views():
    rng = np.random.default_rng(6)
    n = 3000
    arc = rng.uniform(0, np.pi / 2, n)  # side views over a quarter turn about z
    poses = _poses_viewing(np.column_stack([np.cos(arc), np.sin(arc), np.zeros(n)]), rng)
    c1 = orientation_report(poses)
    assert c1["scf_star"] < 0.1 and c1["warning"] is not None
    c4 = orientation_report(poses, symmetry="C4")  # the four copies make the whole ring: SCF 8 / pi^2
    assert c4["n_views_used"] == 10000  # 4 * 3000 expanded views, a fixed subset of 10000 counted
    assert c4["scf"] == pytest.approx(8 / np.pi**2, abs=0.04)
    all_views = sampling_compensation_factor(poses, "C4", max_views=20000)[0]
    assert c4["scf"] == pytest.approx(all_views, abs=0.02)
    uniform_icosahedral = orientation_report(so3.random_rotations(2000, rng), symmetry="I")
    assert uniform_icosahedral["scf_star"] > 0.97 and uniform_icosahedral["warning"] is None


def test_few_views_give_no_warning_and_empty_input_is_handled():
    rng = np.random.default_rng(7)
    small = orientation_report(so3.random_rotations(300, rng))
    assert small["warning"] is None and "too few" in small["note"]
    empty = orientation_report(np.zeros((0, 3, 3)))
    assert empty["n_views"] == 0 and empty["scf"] is None and empty["warning"] is None
    json.dumps(empty)


def test_100k_poses_take_well_under_a_few_seconds():
    rng = np.random.default_rng(8)
    poses = so3.random_rotations(100_000, rng)
    start = time.perf_counter()
    orientation_report(poses)
    assert time.perf_counter() - start < 3.0


# --------------------------------------------------------- directional FSC

BOX = 48
SIGNAL_WIDTH = 8.0  # Gaussian width (Fourier voxels) of the random map's spectrum
NOISE = 0.1  # noise sd relative to the white noise the map is made from
AXES = {"x": [1.0, 0.0, 0.0], "y": [0.0, 1.0, 0.0], "z": [0.0, 0.0, 1.0]}


def _gaussian_filter(volume, widths_xyz):
    """Multiply the spectrum by exp(-sum k_i^2 / (2 w_i^2)), widths given for (x, y, z); volume is [z, y, x]."""
    k = np.fft.fftfreq(volume.shape[0]) * volume.shape[0]
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    wx, wy, wz = widths_xyz
    h = np.exp(-(kx**2 / wx**2 + ky**2 / wy**2 + kz**2 / wz**2) / 2)
    return np.fft.ifftn(np.fft.fftn(volume) * h).real


def _noisy_halves(seed, widths_xyz=(np.inf, np.inf, np.inf)):
    """A random smooth map, low-passed by ``widths_xyz``, plus independent isotropic noise in each copy."""
    rng = np.random.default_rng(seed)
    signal = _gaussian_filter(rng.normal(size=(BOX,) * 3), (SIGNAL_WIDTH,) * 3)
    signal = _gaussian_filter(signal, widths_xyz)
    halves = [(signal + NOISE * rng.normal(size=signal.shape)).astype(np.float32) for _ in range(2)]
    return halves


def _predicted_resolution(width, pixel_size=1.0):
    """FSC = H^2 / (H^2 + noise^2) with H^2 = exp(-k^2 / w^2): the 0.143 crossing, in A."""
    w = 1.0 / np.sqrt(1.0 / SIGNAL_WIDTH**2 + 1.0 / width**2)
    k = w * np.sqrt(np.log((1 - 0.143) / (0.143 * NOISE**2)))
    return BOX * pixel_size / k


def _brute_force_conical_fsc(a, b, direction_xyz, half_angle_deg):
    """Reference: the full centred grid, voxel [iz, iy, ix] has frequency (kx, ky, kz) = (ix, iy, iz) - N//2."""
    n = a.shape[0]
    fa, fb = centered_fftn(a.astype(np.float32)), centered_fftn(b.astype(np.float32))
    k = np.arange(n) - n // 2
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    r = np.sqrt(kx**2 + ky**2 + kz**2)
    d = _unit(direction_xyz)
    cos = np.abs(kx * d[0] + ky * d[1] + kz * d[2]) / np.maximum(r, 1e-6)
    keep = (cos >= np.cos(np.deg2rad(half_angle_deg)) - 1e-6) & (np.rint(r) <= n // 2)
    shells = np.rint(r[keep]).astype(int)
    sums = [
        np.bincount(shells, weights=v[keep], minlength=n // 2 + 1)
        for v in (np.real(fa * np.conj(fb)), np.abs(fa) ** 2, np.abs(fb) ** 2)
    ]
    curve = sums[0] / np.sqrt(np.maximum(sums[1] * sums[2], 1e-30))
    curve[0] = 1.0
    return curve


@pytest.mark.parametrize("box", [32, 33])
def test_conical_fsc_matches_fsc_at_90_degrees_and_a_brute_force_cone(box):
    rng = np.random.default_rng(9)
    a = rng.normal(size=(box,) * 3).astype(np.float32)
    b = (a + rng.normal(size=a.shape)).astype(np.float32)
    assert np.allclose(conical_fsc(a, b, [[0, 0, 1], [1, 2, 3]], 90.0), fsc(a, b)[None], atol=1e-5)
    for direction in ([1, 2, 3], [0, 0, 1], [1, 0, 0]):
        expected = _brute_force_conical_fsc(a, b, direction, 25.0)
        got = conical_fsc(a, b, [direction], 25.0, min_voxels=0)[0]
        assert np.allclose(got[: box // 2], expected[: box // 2], atol=1e-5)  # the Nyquist shell: see the docstring


def test_isotropic_noise_gives_the_same_resolution_in_every_direction():
    a, b = _noisy_halves(0)
    report = directional_resolution(a, b, pixel_size=1.0)
    json.dumps(report)
    expected = _predicted_resolution(np.inf)
    assert report["spread"] < 1.3
    assert report["mean_A"] == pytest.approx(expected, rel=0.1)
    assert len(report["resolution_A"]) == len(report["directions"]) == 64
    assert report["worst_A"] / report["best_A"] == pytest.approx(report["spread"], rel=1e-3)


def test_few_voxels_in_a_cone_do_not_make_spurious_crossings():
    rng = np.random.default_rng(10)
    a = rng.normal(size=(64,) * 3).astype(np.float32)
    b = (a + rng.normal(size=a.shape)).astype(np.float32)  # FSC 0.5 in every shell and direction
    report = directional_resolution(a, b, pixel_size=1.5)
    assert report["worst_A"] == report["best_A"] == 3.0 and report["spread"] == 1.0  # Nyquist everywhere


@pytest.mark.gpu
def test_conical_fsc_on_cupy_matches_numpy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA GPU visible")
    except Exception:
        pytest.skip("no CUDA GPU visible")
    a, b = _noisy_halves(2, (np.inf, 4.0, np.inf))
    directions = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 2, 3]]
    on_gpu = conical_fsc(cupy.asarray(a), cupy.asarray(b), directions)
    assert isinstance(on_gpu, np.ndarray)
    assert np.allclose(on_gpu, conical_fsc(a, b, directions), atol=1e-4)
    assert directional_resolution(cupy.asarray(a), cupy.asarray(b), 1.0)["spread"] == pytest.approx(
        directional_resolution(a, b, 1.0)["spread"], abs=0.01
    )


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_a_map_blurred_along_one_axis_is_worst_along_that_axis(axis):
    width = 4.0  # Fourier voxels, along ``axis`` only
    widths = [width if name == axis else np.inf for name in "xyz"]
    a, b = _noisy_halves(1, widths)
    report = directional_resolution(a, b, pixel_size=1.0)
    assert _angle_to_axis(report["worst_direction"], AXES[axis]) < 30.0  # directions ~14 deg apart
    assert report["spread"] > 1.8
    along = [resolution_at(c, 0.143, 1.0) for c in conical_fsc(a, b, [AXES[name] for name in "xyz"])]
    for name, measured in zip("xyz", along):
        expected = _predicted_resolution(width if name == axis else np.inf)
        assert measured == pytest.approx(expected, rel=0.2), name
    res = np.array(report["resolution_A"])
    angles = np.array([_angle_to_axis(d, AXES[axis]) for d in report["directions"]])
    assert res[angles < 30].min() > res[angles > 60].max()  # 4.7 and 3.4 A expected at 30 and 60 deg


def test_angular_plot_bins_cover_equal_solid_angles():
    """Uniform views fill the angular distribution plot evenly, poles included (equal tilt steps left the
    rows near tilt 0 and 180 nearly empty, which reads as missing top views)."""
    from habinit_plugin.engine.plots import view_counts
    from habinit_plugin.engine.so3 import matrix_to_euler, random_rotations

    rot, tilt = matrix_to_euler(random_rotations(40000, np.random.default_rng(4)))[:, :2].T
    counts, _, tilt_edges = view_counts(rot, tilt)
    per_tilt_row = counts.sum(axis=0)
    assert counts.sum() == 40000
    assert tilt_edges[0] == 0.0 and tilt_edges[-1] == 180.0
    expected = 40000 / len(per_tilt_row)
    assert np.all(np.abs(per_tilt_row - expected) < 5 * np.sqrt(expected)), per_tilt_row
