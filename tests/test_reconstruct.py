"""Known-pose Wiener reconstruction of the bundled protein against its ground truth."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from habinit_plugin.engine import density
from habinit_plugin.engine.fsc import expected_full_map_fsc, fsc
from habinit_plugin.engine.halves import assign_half_sets
from habinit_plugin.engine.mrc import read_map
from habinit_plugin.engine.particles import load_particles
from habinit_plugin.engine.reconstruct import reconstruct_half_maps
from habinit_plugin.engine.star import StarBlock, write_star
from reference import relion_particle_image


def reconstruct(path, **kwargs):
    particles = load_particles(path)
    half, _ = assign_half_sets(particles, seed=0)
    return reconstruct_half_maps(particles, half, **kwargs)


def test_noise_free_reconstruction_matches_truth_to_90_percent_nyquist(sim_noise_free):
    map_a, map_b, _ = reconstruct(sim_noise_free["gt_poses"])
    truth, _ = read_map(sim_noise_free["gt_map"])
    curve = fsc((map_a + map_b) / 2, truth)
    last = int(0.9 * 32)
    assert curve[1 : last + 1].min() >= 0.9, np.round(curve, 3)


def test_noisy_half_maps_follow_the_gold_standard_relation(sim_snr01):
    map_a, map_b, _ = reconstruct(sim_snr01["gt_poses"])
    truth, _ = read_map(sim_snr01["gt_map"])
    half = fsc(map_a, map_b)
    vs_truth = fsc((map_a + map_b) / 2, truth)
    shells = np.flatnonzero(half > 0.2)
    shells = shells[shells > 0]
    assert len(shells) > 20  # the test covers most of the spectrum
    gap = np.abs(vs_truth[shells] - expected_full_map_fsc(half[shells]))
    assert gap.max() < 0.1, np.round(gap, 3)


def test_wrong_poses_destroy_the_reconstruction(sim_snr01, tmp_path):
    """Transposed rotations or flipped shifts must fail: the numbers above check the conventions."""
    particles = load_particles(sim_snr01["gt_poses"]).subset(np.arange(2000))
    truth, _ = read_map(sim_snr01["gt_map"])
    half, _ = assign_half_sets(particles, 0)
    good = reconstruct_half_maps(particles, half)
    wrong_rot = particles.subset(np.arange(len(particles)))
    wrong_rot.rotations = np.swapaxes(particles.rotations, 1, 2)
    wrong_shift = particles.subset(np.arange(len(particles)))
    wrong_shift.shifts = -particles.shifts
    scores = {}
    for name, p in (
        ("good", good),
        ("rot", reconstruct_half_maps(wrong_rot, half)),
        ("shift", reconstruct_half_maps(wrong_shift, half)),
    ):
        scores[name] = fsc((p[0] + p[1]) / 2, truth)[8:16].mean()
    assert scores["good"] > 0.8
    assert scores["rot"] < 0.5 and scores["shift"] < 0.75, scores


def test_relion_star_written_by_hand_reconstructs(tmp_path):
    """Images made here from Euler angles and origins (RELION's definitions), written as RELION 3.1."""
    import mrcfile

    box, pixel_size, n = 32, 2 * density.DEFAULT_PIXEL_SIZE, 1200
    truth = density.bundled_protein_map(box, pixel_size)
    coefficients = ndimage.spline_filter(truth.astype(np.float64), order=3)
    rng = np.random.default_rng(5)
    # RELION angles: A = Rz(psi) Ry(tilt) Rz(rot), passive; i.e. the transpose of scipy's intrinsic ZYZ
    angles = np.column_stack(
        [rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)]
    )
    matrices = np.swapaxes(Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix(), 1, 2)
    origins = rng.uniform(-2.5, 2.5, size=(n, 2))
    defocus = rng.uniform(8000, 20000, n)
    images = np.stack(
        [relion_particle_image(coefficients, m, o, d, pixel_size) for m, o, d in zip(matrices, origins, defocus)]
    )
    with mrcfile.new(tmp_path / "hand.mrcs") as mrc:
        mrc.set_data(images)
        mrc.set_image_stack()
    optics = StarBlock(
        "optics",
        [
            "rlnOpticsGroup",
            "rlnVoltage",
            "rlnSphericalAberration",
            "rlnAmplitudeContrast",
            "rlnImagePixelSize",
            "rlnImageSize",
            "rlnImageDimensionality",
        ],
        [["1", "300", "2.7", "0.1", f"{pixel_size}", str(box), "2"]],
    )
    table = StarBlock("particles", [], [[] for _ in range(n)])
    table.set_column("rlnImageName", [f"{i + 1}@hand.mrcs" for i in range(n)])
    table.set_column("rlnOpticsGroup", [1] * n)
    for name, values in [
        ("rlnDefocusU", defocus),
        ("rlnDefocusV", defocus),
        ("rlnDefocusAngle", [0.0] * n),
        ("rlnAngleRot", angles[:, 0]),
        ("rlnAngleTilt", angles[:, 1]),
        ("rlnAnglePsi", angles[:, 2]),
        ("rlnOriginXAngst", origins[:, 0] * pixel_size),
        ("rlnOriginYAngst", origins[:, 1] * pixel_size),
    ]:
        table.set_column(name, values)
    write_star(tmp_path / "hand.star", [optics, table])
    map_a, map_b, _ = reconstruct(tmp_path / "hand.star")
    curve = fsc((map_a + map_b) / 2, truth)
    assert curve[1:13].min() > 0.9, np.round(curve, 3)


@pytest.mark.parametrize("batch_size", [333])
def test_batching_does_not_change_the_result(sim_small, batch_size):
    a1, b1, _ = reconstruct(sim_small["gt_poses"], batch_size=1000)
    a2, b2, _ = reconstruct(sim_small["gt_poses"], batch_size=batch_size)
    assert np.allclose(a1, a2, atol=1e-4 * np.abs(a1).max())
