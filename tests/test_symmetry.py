"""Point groups in RELION's conventions, the asymmetric unit of the pose grid, symmetrised grids."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from habinit_plugin.engine import symmetry
from habinit_plugin.engine.projector import volume_to_grid
from habinit_plugin.engine.settings import SymmetryError
from habinit_plugin.engine.so3 import grid_rotations, grid_spacing, random_rotations, rotvec_to_matrix
from habinit_plugin.engine.symmetry import (
    asymmetric_unit,
    canonical_poses,
    distance_modulo,
    point_group,
    snap_to_normaliser,
    symmetry_name,
)

ORDERS = {"C1": 1, "C2": 2, "C3": 3, "C7": 7, "D2": 4, "D7": 14, "T": 12, "O": 24, "I": 60}


def _contains(group, matrix, tolerance: float = 1e-9) -> bool:
    return bool(np.min(np.abs(group - matrix).reshape(len(group), -1).max(axis=1)) < tolerance)


@pytest.mark.parametrize("name, order", ORDERS.items())
def test_each_group_is_a_group_of_its_order(name, order):
    """Closure, inverses, identity, proper rotations, no element twice."""
    group = point_group(name)
    assert len(group) == order and np.allclose(group[0], np.eye(3))
    assert np.allclose(np.einsum("gij,gkj->gik", group, group), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(group), 1.0)
    for a in group:
        assert _contains(group, a.T)
        for b in group:
            assert _contains(group, a @ b)
    distinct = np.abs(group[:, None] - group[None]).reshape(order, order, -1).max(axis=2) + np.eye(order)
    assert distinct.min() > 1e-3


def _turn(axis, degrees):
    axis = np.asarray(axis, dtype=float)
    return rotvec_to_matrix(axis / np.linalg.norm(axis) * np.deg2rad(degrees))


@pytest.mark.parametrize(
    "name, element",
    [
        ("C4", np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])),  # 90 degrees about z
        ("D2", np.diag([1, -1, -1])),  # RELION's Dn: 2-fold about x
        ("D7", np.diag([1, -1, -1])),
        ("D3", _turn([np.cos(np.pi / 3), np.sin(np.pi / 3), 0], 180)),  # the other 2-folds, in the xy plane
        ("O", np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]])),  # 3-fold along (1, 1, 1): x -> y -> z
        ("O", _turn([1, 0, 0], 90)),  # 4-folds along x, y and z
        ("T", _turn([0, 0.816496, 0.577350], 180)),  # RELION's T: 2-fold along (0, 0.816496, 0.577350)
        ("T", _turn([0, 0, 1], 120)),
        ("I", np.diag([-1, -1, 1])),  # RELION's I2: 2-fold along z
        ("I", _turn([0.525731112119, 0, 0.850650808354], 72)),  # 5-fold
        ("I", _turn([0, 0.356822089773, 0.934172358963], 120)),  # 3-fold
        ("I", np.diag([1, -1, -1])),  # I2 also has 2-folds along x and y
    ],
)
def test_elements_checked_by_hand_against_relion(name, element):
    """RELION gives its axes to 6-12 digits."""
    assert _contains(point_group(name), element, tolerance=1e-5)


def test_o_and_t_do_not_contain_what_relion_s_do_not():
    assert not _contains(point_group("T"), _turn([0, 0, 1], 90))  # T has no 4-fold
    assert not _contains(point_group("I"), _turn([0, 0, 1], 72))  # I2's 5-folds are not along z


@pytest.mark.parametrize("text, name", [("c1", "C1"), (" d7 ", "D7"), ("I2", "I"), ("o", "O"), ("C12", "C12")])
def test_names_are_read_as_relion_writes_them(text, name):
    assert symmetry_name(text) == name


@pytest.mark.parametrize("text", ["", "C0", "D1", "X3", "Cn", "I5", "C-2", "D2h"])
def test_unknown_names_list_the_valid_forms(text):
    with pytest.raises(SymmetryError, match=r"unknown symmetry .*: use C1, Cn \(n >= 2\), Dn \(n >= 2\), T, O or I"):
        symmetry_name(text)


@pytest.mark.parametrize("name", ["C2", "C3", "C7", "D2", "D7", "T", "O", "I"])
def test_the_asymmetric_unit_covers_the_poses_once(name):
    """Hopf level 3 (7.5 degrees): the asymmetric unit holds 1/|G| of the grid, and its copies under the group
    are a grid as dense as the whole grid everywhere (as many points near every random rotation, on average)
    that leaves every rotation within the grid spacing of one of its points."""
    level, group = 3, point_group(name)
    full = grid_rotations(level)
    unit = full[asymmetric_unit(level, name)]
    # an n-fold axis along z that does not divide the grid's 48 turns about z: the unit holds 6 or 7 turns
    n_psi, fold = 6 * 2**level, int(name[1:]) if name[0] in "CD" else 1
    tolerance = 0.03 if n_psi % fold == 0 else fold / n_psi
    assert abs(len(unit) * len(group) / len(full) - 1.0) < tolerance
    copies = np.einsum("pij,gjk->pgik", unit, group).reshape(-1, 3, 3)
    sample = random_rotations(1500, np.random.default_rng(0))

    def near(points, radius_deg):
        traces = np.einsum("sij,pij->sp", sample, points)
        angles = np.rad2deg(np.arccos(np.clip((traces - 1) / 2, -1, 1)))
        return angles.min(axis=1), (angles < radius_deg).sum(axis=1)

    nearest_full, count_full = near(full, 10.0)
    nearest_unit, count_unit = near(copies, 10.0)
    assert nearest_unit.max() <= grid_spacing(level) and nearest_full.max() <= grid_spacing(level)
    assert abs(count_unit.mean() / count_full.mean() - 1.0) < tolerance + 0.01
    poses = canonical_poses(sample, name)
    assert np.allclose(symmetry.canonical_poses(poses, name), poses)  # canonical poses stay put
    assert np.allclose(distance_modulo(sample, poses, name), 0.0, atol=1e-5)


def test_distance_modulo_the_group_sees_equivalent_poses_as_one():
    rng = np.random.default_rng(1)
    a = random_rotations(50, rng)
    group = point_group("D7")
    b = a @ group[rng.integers(0, len(group), 50)] @ _turn([0.3, -0.2, 0.9], 2.0)
    assert np.allclose(distance_modulo(a, b, "D7"), 2.0, atol=1e-6)


@pytest.mark.parametrize("name", ["C3", "D2", "D5", "T", "O", "I"])
def test_snapping_to_the_normaliser_recovers_a_turn_that_keeps_the_axes(name):
    """Two half maps built in the same frame differ by a rotation that maps the group onto itself: found
    again from a guess 3 degrees off."""
    rng = np.random.default_rng(2)
    if name[0] == "C":
        exact = _turn([0, 0, 1], 77.0) @ np.diag([1.0, -1.0, -1.0])
    else:
        exact = symmetry._normaliser_elements(name)[5]
    guess = exact @ rotvec_to_matrix(np.deg2rad(3.0) * rng.normal(size=3) / np.sqrt(3))
    snapped = snap_to_normaliser(guess, name)
    if name[0] == "C":  # any turn about the axis keeps it: the guess's own turn, the axis exactly
        assert distance_modulo(snapped, exact, "C1")[0] < 3.5 and np.allclose(snapped[:, 2], exact[:, 2])
    else:
        assert np.allclose(snapped, exact, atol=1e-9)
    group = point_group(name)
    mapped = np.einsum("ij,gjk,lk->gil", snapped, group, snapped)
    assert all(_contains(group, m) for m in mapped)  # the axes are kept
    if name in ("D2", "T"):
        assert len(symmetry._normaliser_elements(name)) == 24


def test_a_symmetrised_grid_is_symmetric_and_keeps_a_symmetric_one():
    """sum_L grid(L k): invariant under the group; a map that already has the symmetry comes back |G| times
    itself (up to trilinear interpolation)."""
    rng = np.random.default_rng(3)
    volume = np.zeros((24, 24, 24), dtype=np.float32)
    volume[8:16, 9:14, 10:17] = rng.random((8, 5, 7))
    grid = volume_to_grid(volume, 2)
    once = symmetry.symmetrise_grid(grid, "D2", 2)
    twice = symmetry.symmetrise_grid(once, "D2", 2)
    inner = symmetry._sphere_coordinates(48, 2, np)[1]
    core = np.flatnonzero(np.abs(np.asarray(symmetry._sphere_coordinates(48, 2, np)[0])).max(axis=1) < 8)
    a, b = once.reshape(-1)[inner][core], twice.reshape(-1)[inner][core] / 4
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()
    assert symmetry.symmetrise_grid(grid, "C1", 2) is grid


# ---------------------------------------------------------------- the job with symmetry


@pytest.fixture(scope="module")
def d2_set(tmp_path_factory):
    """400 particles of a D2 tetramer of cores of the bundled protein, box 32, SNR 1."""
    from fixtures import TINY_PIXEL_SIZE
    from habinit_plugin.engine import density
    from habinit_plugin.engine.simulate import SimulationSettings, simulate_dataset

    volume, _ = density.symmetric_protein_map(point_group("D2"), 32, TINY_PIXEL_SIZE)
    settings = SimulationSettings(n_particles=400, snr=1.0, seed=8)
    return simulate_dataset(volume, TINY_PIXEL_SIZE, tmp_path_factory.mktemp("d2"), settings)


def _two_fold_z(volume):
    """The map turned by 180 degrees about z (x, y -> -x, -y about voxel box//2), exactly."""
    return np.roll(np.flip(volume, axis=(1, 2)), 1, axis=(1, 2))


def test_the_simulated_particle_has_its_symmetry(d2_set):
    from habinit_plugin.engine.mrc import read_map

    truth, _ = read_map(d2_set["gt_map"])
    assert np.corrcoef(truth.ravel(), _two_fold_z(truth).ravel())[0, 1] > 0.999
    assert np.corrcoef(truth.ravel(), np.transpose(truth, (0, 2, 1)).ravel())[0, 1] < 0.8  # not also a 4-fold


def test_a_known_pose_reconstruction_with_symmetry_beats_c1(d2_set):
    """The same particles, D2 imposed: each counts four times, the map is closer to the truth."""
    from habinit_plugin.engine.fsc import fsc
    from habinit_plugin.engine.mrc import read_map
    from habinit_plugin.engine.particles import load_particles
    from habinit_plugin.engine.reconstruct import reconstruct_half_maps

    particles = load_particles(d2_set["gt_poses"]).subset(np.arange(24))
    truth, px = read_map(d2_set["gt_map"])
    half = np.arange(len(particles)) % 2 + 1
    scores = {}
    for name in ("C1", "D2"):
        a, b, _ = reconstruct_half_maps(particles, half, symmetry=name)
        scores[name] = float(np.mean(fsc(0.5 * (a + b), truth)[6:16]))  # 19 A to Nyquist
        if name == "D2":
            assert np.corrcoef(a.ravel(), _two_fold_z(a).ravel())[0, 1] > 0.99
    assert scores["D2"] > scores["C1"] + 0.1, scores


def test_the_job_with_symmetry_finds_the_map_on_the_axes(d2_set, tmp_path):
    """A short D2 job: a symmetric map, on RELION's axes (so the truth is found without turning it), near the
    truth; every pose in the asymmetric unit; the symmetry in run.json."""
    from fixtures import TINY
    from habinit_plugin.engine.jobs import gold_standard_job
    from habinit_plugin.engine.mrc import read_map
    from habinit_plugin.engine.particles import load_particles
    from habinit_plugin.engine.settings import AbinitSettings, JobSettings
    from habinit_plugin.engine.truth import compare_to_truth

    settings = JobSettings(abinit=AbinitSettings(**TINY, symmetry="d2"), align_every=6, checkpoint_minutes=0.0)
    info = gold_standard_job(d2_set["particles"], tmp_path / "job", settings)
    assert info["status"] == "finished" and info["symmetry"] == "D2"
    volume, px = read_map(tmp_path / "job" / "map.mrc")
    assert np.corrcoef(volume.ravel(), _two_fold_z(volume).ravel())[0, 1] > 0.99
    truth, _ = read_map(d2_set["gt_map"])
    found = load_particles(tmp_path / "job" / "particles.star")
    true_poses = load_particles(d2_set["gt_poses"])
    c = compare_to_truth(volume, truth, px, found.rotations, found.shifts, true_poses.rotations, true_poses.shifts,
                         symmetry="D2")  # fmt: skip
    assert c.resolution_05 < 10.0, c.resolution_05
    axes = snap_to_normaliser(c.alignment.rotation, "D2")  # onto the truth by a turn that keeps the axes
    assert distance_modulo(c.alignment.rotation, axes, "C1")[0] < 3.0
    assert c.median_angle_error < 10.0
    assert np.allclose(canonical_poses(found.rotations, "D2"), found.rotations)


def test_an_unknown_symmetry_is_a_usage_error(tmp_path):
    import subprocess
    import sys

    args = ["run", "--particles", str(tmp_path / "none.star"), "--out", str(tmp_path / "o"), "--symmetry", "D1"]
    r = subprocess.run([sys.executable, "-m", "habinit_plugin.engine", *args], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown symmetry 'D1': use C1, Cn (n >= 2)" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, pixel_size", [("C3", 2.0), ("D2", 2.4), ("O", 3.0)])
def test_the_axes_of_a_turned_and_shifted_map_are_found(name, pixel_size):
    """The truth turned and moved off centre: the frame found puts it back on RELION's axes within a
    degree, and every operator's copy then correlates > 0.9 with it (< 0.7 before)."""
    from habinit_plugin.engine import density
    from habinit_plugin.engine.align3d import Alignment, transform_map
    from habinit_plugin.engine.symmetry_search import find_symmetry_axes, operator_correlations

    truth, _ = density.symmetric_protein_map(point_group(name), 48, pixel_size)
    turn = random_rotations(1, np.random.default_rng(5))[0]
    moved = transform_map(truth, Alignment(turn, np.array([2.0, -1.5, 1.0])))
    fit = find_symmetry_axes(moved, pixel_size, name)
    back = fit.frame @ turn  # the truth turned by this: must keep the axes
    assert distance_modulo(back, snap_to_normaliser(back, name), "C1")[0] < 1.0
    assert fit.operator_correlations.min() > 0.9
    assert operator_correlations(moved, name, pixel_size, 12.0)[1:].max() < 0.7


def test_symmetry_after_a_c1_sgd_finds_the_axes_in_each_half(d2_set, tmp_path):
    """RELION's practice: SGD in C1, then each half finds D2's axes in its own map; the final map sits on the
    truth's axes within a degree and is near the truth."""
    from fixtures import TINY
    from habinit_plugin.engine.jobs import gold_standard_job
    from habinit_plugin.engine.mrc import read_map
    from habinit_plugin.engine.settings import AbinitSettings, JobSettings
    from habinit_plugin.engine.truth import compare_to_truth

    abinit = AbinitSettings(**TINY, symmetry="D2")
    settings = JobSettings(abinit=abinit, align_every=6, checkpoint_minutes=0.0, symmetry_after_sgd=True)
    info = gold_standard_job(d2_set["particles"], tmp_path / "job", settings)
    assert info["status"] == "finished" and info["symmetry"] == "D2"
    volume, px = read_map(tmp_path / "job" / "map.mrc")
    truth, _ = read_map(d2_set["gt_map"])
    c = compare_to_truth(volume, truth, px)
    assert distance_modulo(c.alignment.rotation, snap_to_normaliser(c.alignment.rotation, "D2"), "C1")[0] < 1.0
    assert c.resolution_05 < 10.0
    assert not any("symmetry" in w for w in info["warnings"])


def test_a_symmetry_the_particle_lacks_is_a_warning(tiny_set, tmp_path):
    """C2 on the asymmetric protein, found after a C1 SGD: neither half's copies agree as well as the halves do,
    a warning in the log and run.json (the job still finishes: the map is then a C2 average)."""
    from habinit_plugin.engine.jobs import gold_standard_job
    from habinit_plugin.engine.settings import QUICK_SCHEDULE, AbinitSettings, JobSettings

    abinit = AbinitSettings(**QUICK_SCHEDULE, symmetry="C2")  # halves that agree (0.99 at 12 A)
    settings = JobSettings(abinit=abinit, align_every=6, checkpoint_minutes=0.0, symmetry_after_sgd=True)
    info = gold_standard_job(tiny_set["particles"], tmp_path / "job", settings)
    warned = [w for w in info["warnings"] if "may not have C2 symmetry" in w]
    assert len(warned) == 1 and "the C1 maps of both halves agree with their copies under the C2" in warned[0]


@pytest.mark.skipif(shutil.which("relion_image_handler") is None, reason="RELION (Debian's relion) not installed")
@pytest.mark.parametrize("name", ["C3", "D2", "D7", "T", "O", "I"])
def test_our_symmetrised_map_is_relion_s(name, tmp_path):
    """RELION 3.1's relion_image_handler --sym and our symmetrisation of the same off-centre protein agree (to
    8 A, past the two programs' interpolations), far better than with the group turned by 30 degrees about x."""
    import subprocess

    from habinit_plugin.engine import density
    from habinit_plugin.engine.align3d import Alignment, transform_map
    from habinit_plugin.engine.mrc import read_map, write_map
    from habinit_plugin.engine.symmetry_search import map_correlation, symmetrise_map

    volume = np.roll(density.bundled_protein_map(48, 2.4), (3, -2, 5), axis=(0, 1, 2))
    write_map(tmp_path / "in.mrc", volume, 2.4)
    subprocess.run(
        ["relion_image_handler", "--i", str(tmp_path / "in.mrc"), "--sym", name, "--o", str(tmp_path / "out.mrc")],
        check=True,
        capture_output=True,
    )
    relion, _ = read_map(tmp_path / "out.mrc")
    ours = symmetrise_map(volume, name)
    turn = Alignment(_turn([1, 0, 0], 30.0), np.zeros(3))
    other = transform_map(symmetrise_map(transform_map(volume, Alignment(turn.matrix.T, np.zeros(3))), name), turn)
    same, turned = map_correlation(relion, ours, 2.4, 8.0), map_correlation(relion, other, 2.4, 8.0)
    assert same > 0.995 and 1 - same < 0.2 * (1 - turned), (same, turned)  # measured 0.9988 to 0.9998


def test_a_run_resumed_after_the_symmetry_was_found_goes_on_bit_for_bit(d2_set):
    """The C1 start, the switch to D2 and a resume from the state saved after it: the same model as a run never
    stopped."""
    from fixtures import TINY
    from habinit_plugin.engine.abinit import AbinitRun
    from habinit_plugin.engine.particles import load_particles
    from habinit_plugin.engine.settings import AbinitSettings

    particles = load_particles(d2_set["particles"])
    settings = AbinitSettings(**TINY, symmetry="D2", seed=3)
    alone = AbinitRun(particles, settings)
    for _ in range(6):
        alone.step()
    first = AbinitRun(particles, settings)
    for _ in range(4):
        first.step()
    assert first.settings.symmetry == "D2"  # found at iteration 3 (a quarter of 12)
    arrays, meta = first.get_state()
    resumed = AbinitRun(particles, settings)
    resumed.set_state(arrays, meta)
    assert resumed.settings.symmetry == "D2" and resumed.geometry.settings.symmetry == "D2"
    for _ in range(2):
        resumed.step()
    assert np.array_equal(resumed.grid, alone.grid) and np.array_equal(resumed.rotations, alone.rotations)
