"""Particle metadata and images: STAR (RELION 3.0 / 3.1) and cryoSPARC .cs round trips."""

import mrcfile
import numpy as np
import pytest

from fixtures import write_cryosparc_cs
from habinit_plugin.engine import density, so3
from habinit_plugin.engine.particles import load_particles, write_particles_star
from habinit_plugin.engine.simulate import SimulationSettings, random_poses
from habinit_plugin.engine.star import StarBlock, read_star, write_star


def test_simulated_star_round_trip(sim_small):
    particles = load_particles(sim_small["particles"])
    gt = load_particles(sim_small["gt_poses"])
    truth = random_poses(SimulationSettings(n_particles=300, snr=1.0, seed=2), 2 * density.DEFAULT_PIXEL_SIZE, 32)
    assert len(particles) == 300 and particles.box == 32
    assert particles.pixel_size == pytest.approx(2 * density.DEFAULT_PIXEL_SIZE)
    assert np.array_equal(particles.ids, np.arange(1, 301))
    assert particles.rotations is None and gt.rotations is not None
    for name in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast"):
        assert np.allclose(getattr(particles.ctf, name), getattr(truth.ctf, name), atol=1e-5), name
    assert np.allclose(gt.rotations, truth.rotations, atol=1e-5)
    assert np.allclose(gt.shifts, truth.origins, atol=1e-5)
    with mrcfile.open(sim_small["stack"]) as mrc:
        stack = np.array(mrc.data)
    index = np.array([5, 0, 299, 17])
    assert np.array_equal(particles.read_images(index), stack[index])


def test_written_star_keeps_columns_and_new_poses(sim_small, tmp_path):
    particles = load_particles(sim_small["particles"])
    rng = np.random.default_rng(0)
    rotations = so3.random_rotations(len(particles), rng)
    shifts = rng.normal(size=(len(particles), 2))
    half = rng.integers(1, 3, len(particles))
    out = tmp_path / "out.star"
    # written next to the stack's folder? no: elsewhere, so image paths must resolve from the input folder
    write_particles_star(out, particles, rotations=rotations, shifts=shifts, half_set=half)
    back = load_particles(out, image_root=sim_small["particles"].parent)
    assert set(particles.table.columns) <= set(back.table.columns)
    assert np.array_equal(back.ids, particles.ids)
    assert np.allclose(back.rotations, rotations, atol=1e-5)
    assert np.allclose(back.shifts, shifts, atol=1e-5)
    assert np.array_equal(back.half_set, half)
    assert np.array_equal(back.read_images([3]), particles.read_images([3]))
    blocks = read_star(out)
    assert list(blocks) == ["optics", "particles"]
    assert blocks["optics"].has("rlnImageSize") and blocks["optics"].has("rlnImagePixelSize")


def test_relion_30_star_is_read(sim_small, tmp_path):
    """Single data_ block, optics per particle, pixel size from detector pixel and magnification."""
    gt = load_particles(sim_small["gt_poses"])
    px = gt.pixel_size
    table = StarBlock("", [], [[] for _ in range(len(gt))])
    table.set_column("rlnImageName", [f"{s + 1:06d}@{sim_small['stack']}" for s in gt.slice_of])
    for name, values in [
        ("rlnDefocusU", gt.ctf.defocus_u),
        ("rlnDefocusV", gt.ctf.defocus_v),
        ("rlnDefocusAngle", gt.ctf.defocus_angle),
        ("rlnVoltage", gt.ctf.voltage),
        ("rlnSphericalAberration", gt.ctf.cs),
        ("rlnAmplitudeContrast", gt.ctf.amplitude_contrast),
        ("rlnDetectorPixelSize", np.full(len(gt), px)),
        ("rlnMagnification", np.full(len(gt), 10000.0)),
    ]:
        table.set_column(name, values)
    angles = so3.matrix_to_euler(gt.rotations)
    for j, name in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        table.set_column(name, angles[:, j])
    table.set_column("rlnOriginX", gt.shifts[:, 0])
    table.set_column("rlnOriginY", gt.shifts[:, 1])
    path = tmp_path / "relion30.star"
    write_star(path, [table])
    old = load_particles(path)
    assert old.pixel_size == pytest.approx(px)
    assert np.allclose(old.rotations, gt.rotations, atol=1e-5)
    assert np.allclose(old.shifts, gt.shifts, atol=1e-5)
    assert np.allclose(old.ctf.defocus_u, gt.ctf.defocus_u)
    assert np.array_equal(old.read_images([0, 7]), gt.read_images([0, 7]))
    assert len(old.optics) == 1


def test_cryosparc_cs_is_read_to_the_same_particles(sim_small, tmp_path):
    gt = load_particles(sim_small["gt_poses"])
    cs = write_cryosparc_cs(tmp_path / "particles.cs", gt, sim_small["stack"], split=np.arange(len(gt)) % 2)
    from_cs = load_particles(tmp_path / "particles.cs")
    assert len(from_cs) == len(gt)
    assert np.array_equal(from_cs.ids, np.arange(1, len(gt) + 1))
    assert np.allclose(from_cs.rotations, gt.rotations, atol=1e-5)
    assert np.allclose(from_cs.shifts, gt.shifts, atol=1e-4)
    assert np.array_equal(from_cs.half_set, np.arange(len(gt)) % 2 + 1)
    assert np.allclose(from_cs.ctf.defocus_angle, gt.ctf.defocus_angle, atol=1e-3)
    assert np.array_equal(from_cs.read_images([4, 9]), gt.read_images([4, 9]))
    assert from_cs.table.text("csUid")[3] == str(int(cs["uid"][3]))


def test_cs_with_object_strings_is_refused_without_pickle(tmp_path):
    arr = np.zeros(2, dtype=[("blob/path", "O"), ("blob/idx", "<u4")])
    arr["blob/path"] = ["a.mrc", "b.mrc"]
    path = tmp_path / "pickled.cs"
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=True)
    from habinit_plugin.engine.particles import ParticleError

    with pytest.raises(ParticleError, match="pickle"):
        load_particles(path)
