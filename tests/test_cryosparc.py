"""cryoSPARC interchange through cryosparc-tools: our particles.cs read by ``Dataset.load``, a .cs written by
cryosparc-tools with cryoSPARC 4-5's particle fields read by ``load_particles``, and the job's particles.cs."""

from __future__ import annotations

import numpy as np
import pytest
from cryosparc.dataset import Dataset

from fixtures import TINY
from habinit_plugin.engine import so3
from habinit_plugin.engine.cryosparc import write_particles_cs
from habinit_plugin.engine.jobs import gold_standard_job
from habinit_plugin.engine.particles import load_particles
from habinit_plugin.engine.settings import AbinitSettings, JobSettings


def pyem_relion_matrix(pose: np.ndarray) -> np.ndarray:
    """RELION pose matrices (P, 3, 3) of cryoSPARC poses (P, 3), written out as pyem's ``expmap`` does (a
    rotation by -|v| about v / |v|: the transpose of the usual rotation-vector matrix), independently of so3.py."""
    pose = np.asarray(pose, dtype=np.float64)
    theta = np.linalg.norm(pose, axis=1)
    w = pose / theta[:, None]
    k = np.zeros((len(pose), 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = w[:, 2], -w[:, 1], w[:, 0]
    k -= np.swapaxes(k, 1, 2)
    s, c = np.sin(theta)[:, None, None], (1 - np.cos(theta))[:, None, None]
    return np.eye(3) + s * k + c * k @ k


@pytest.fixture(scope="module")
def simulated_truth(sim_small):
    """The simulated set (300 particles, box 32) and its true RELION poses and origins in pixels."""
    truth = np.load(sim_small["truth"])
    return load_particles(sim_small["particles"]), truth["rotations"], truth["origins_px"]


def test_written_cs_reads_back_in_cryosparc_tools_and_in_load_particles(simulated_truth, tmp_path):
    particles, rotations, origins_px = simulated_truth
    used = np.arange(7, 300, 2)  # 147 particles: not all, not in a block
    half_set = np.random.default_rng(4).integers(1, 3, len(used))
    scale = np.linspace(0.5, 1.5, len(used))
    path = tmp_path / "particles.cs"
    write_particles_cs(path, particles, used, rotations[used], origins_px[used], half_set, scale)

    cs = Dataset.load(path)
    assert len(cs) == len(used)
    assert np.array_equal(cs["uid"], particles.ids[used].astype(np.uint64))
    assert set(cs["blob/path"]) == {particles.stacks[0]}
    assert np.array_equal(cs["blob/idx"], used)  # the simulated stack holds the particles in row order
    assert np.array_equal(cs["blob/shape"], np.full((len(used), 2), 32))
    assert np.all(cs["blob/psize_A"] == np.float32(particles.pixel_size))
    assert np.all(cs["blob/sign"] == 1.0)
    assert np.array_equal(cs["ctf/df1_A"], particles.ctf.defocus_u[used].astype(np.float32))
    assert np.array_equal(cs["ctf/df2_A"], particles.ctf.defocus_v[used].astype(np.float32))
    assert np.array_equal(cs["ctf/df_angle_rad"], np.deg2rad(particles.ctf.defocus_angle[used]).astype(np.float32))
    assert np.all(cs["ctf/accel_kv"] == 300.0) and np.all(cs["ctf/cs_mm"] == np.float32(2.7))
    assert np.all(cs["ctf/amp_contrast"] == np.float32(0.1)) and np.all(cs["ctf/phase_shift_rad"] == 0.0)
    assert np.abs(pyem_relion_matrix(cs["alignments3D/pose"]) - rotations[used]).max() < 1e-6
    assert np.array_equal(cs["alignments3D/shift"], origins_px[used].astype(np.float32))
    assert np.array_equal(cs["alignments3D/split"], half_set - 1)
    assert np.all(cs["alignments3D/psize_A"] == np.float32(particles.pixel_size))
    assert np.array_equal(cs["alignments3D/alpha"], scale.astype(np.float32))

    back = load_particles(path)
    assert np.array_equal(back.ids, np.arange(1, len(used) + 1))
    assert back.table.text("csUid") == [str(i) for i in particles.ids[used]]
    assert np.abs(back.rotations - rotations[used]).max() < 1e-6
    assert np.abs(back.shifts - origins_px[used].astype(np.float32)).max() < 1e-6
    assert np.array_equal(back.half_set, half_set)
    assert back.pixel_size == pytest.approx(particles.pixel_size, abs=1e-6)
    assert np.allclose(back.ctf.defocus_u, particles.ctf.defocus_u[used], rtol=1e-7)
    assert np.array_equal(back.read_images([0, 5]), particles.read_images(used[[0, 5]]))


def cryosparc_refinement_dataset(particles, rotations, origins_px, stack_name: str) -> Dataset:
    """A particle stack after cryoSPARC 4-5 refinement, built by cryosparc-tools with cryoSPARC's own fields and
    dtypes (its test data's extraction fields, then the alignments3D fields a refinement adds)."""
    n = len(particles)
    fields = [
        ("uid", "<u8"),
        ("blob/path", "O"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("blob/sign", "<f4"),
        ("blob/import_sig", "<u8"),
        ("ctf/type", "O"),
        ("ctf/exp_group_id", "<u4"),
        ("ctf/accel_kv", "<f4"),
        ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"),
        ("ctf/df1_A", "<f4"),
        ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"),
        ("ctf/phase_shift_rad", "<f4"),
        ("ctf/scale", "<f4"),
        ("ctf/scale_const", "<f4"),
        ("ctf/shift_A", "<f4", (2,)),
        ("ctf/tilt_A", "<f4", (2,)),
        ("ctf/trefoil_A", "<f4", (2,)),
        ("ctf/tetra_A", "<f4", (4,)),
        ("ctf/anisomag", "<f4", (4,)),
        ("ctf/bfactor", "<f4"),
        ("alignments3D/split", "<u4"),
        ("alignments3D/shift", "<f4", (2,)),
        ("alignments3D/pose", "<f4", (3,)),
        ("alignments3D/psize_A", "<f4"),
        ("alignments3D/error", "<f4"),
        ("alignments3D/error_min", "<f4"),
        ("alignments3D/resid_pow", "<f4"),
        ("alignments3D/slice_pow", "<f4"),
        ("alignments3D/image_pow", "<f4"),
        ("alignments3D/cross_cor", "<f4"),
        ("alignments3D/alpha", "<f4"),
        ("alignments3D/alpha_min", "<f4"),
        ("alignments3D/weight", "<f4"),
        ("alignments3D/pose_ess", "<f4"),
        ("alignments3D/shift_ess", "<f4"),
        ("alignments3D/class_posterior", "<f4"),
        ("alignments3D/class", "<u4"),
        ("alignments3D/class_ess", "<f4"),
    ]
    cs = Dataset.allocate(n, fields)
    cs["uid"] = 2**63 + np.arange(n, dtype=np.uint64) * 977  # past int64, as cryoSPARC's random uids often are
    cs["blob/path"] = [f"J7/imported/{stack_name}"] * n
    cs["blob/idx"] = particles.slice_of
    cs["blob/shape"] = particles.box
    cs["blob/psize_A"] = particles.pixel_size
    cs["blob/sign"] = 1.0
    cs["ctf/type"] = ["imported"] * n
    cs["ctf/accel_kv"] = 300.0
    cs["ctf/cs_mm"] = 2.7
    cs["ctf/amp_contrast"] = 0.07
    cs["ctf/df1_A"] = particles.ctf.defocus_u
    cs["ctf/df2_A"] = particles.ctf.defocus_v
    cs["ctf/df_angle_rad"] = np.deg2rad(particles.ctf.defocus_angle)
    cs["ctf/phase_shift_rad"] = np.deg2rad(30.0)
    cs["ctf/scale"] = 1.0
    cs["alignments3D/split"] = np.arange(n) % 2
    cs["alignments3D/shift"] = origins_px
    cs["alignments3D/pose"] = so3.matrix_to_rotvec(np.swapaxes(rotations, 1, 2))
    cs["alignments3D/psize_A"] = particles.pixel_size
    cs["alignments3D/alpha"] = 1.0
    cs["alignments3D/class_posterior"] = 1.0
    return cs


@pytest.mark.parametrize("format_name", ["NUMPY_FORMAT", "CSDAT_FORMAT"])
def test_a_cs_written_by_cryosparc_tools_is_read(simulated_truth, sim_small, tmp_path, format_name):
    """cryoSPARC's blob paths are relative to its project folder: the stacks are found with ``image_root``."""
    import cryosparc.dataset

    particles, rotations, origins_px = simulated_truth
    cs = cryosparc_refinement_dataset(particles, rotations, origins_px, sim_small["stack"].name)
    path = tmp_path / "J9_particles.cs"
    cs.save(path, format=getattr(cryosparc.dataset, format_name))
    project = tmp_path / "project"
    (project / "J7" / "imported").mkdir(parents=True)
    link = project / "J7" / "imported" / sim_small["stack"].name
    link.symlink_to(sim_small["stack"])

    read = load_particles(path, image_root=project)
    assert len(read) == 300 and read.box == 32
    assert read.stacks == [str(link)]
    assert read.table.text("csUid")[299] == str(2**63 + 299 * 977)
    assert np.abs(read.rotations - rotations).max() < 1e-6
    assert np.abs(read.shifts - origins_px.astype(np.float32)).max() < 1e-6
    assert np.array_equal(read.half_set, np.arange(300) % 2 + 1)
    assert np.allclose(read.ctf.defocus_u, particles.ctf.defocus_u, rtol=1e-7)
    assert np.allclose(read.ctf.defocus_angle, particles.ctf.defocus_angle, atol=1e-4)
    assert np.allclose(read.ctf.phase_shift, 30.0, atol=1e-4)
    assert np.allclose(read.ctf.amplitude_contrast, 0.07) and np.allclose(read.ctf.cs, 2.7)
    assert read.pixel_size == pytest.approx(particles.pixel_size, abs=1e-6)
    assert np.array_equal(read.read_images([3, 200]), particles.read_images([3, 200]))


def test_the_job_writes_particles_cs_beside_particles_star(tiny_set, tmp_path):
    """``habinit run`` on a .cs input: particles.cs has the used particles with their input uids and the poses,
    shifts and split of particles.star."""
    source = load_particles(tiny_set["particles"])
    inputs = tmp_path / "input"
    inputs.mkdir()
    write_particles_cs(inputs / "J3_particles.cs", source)
    schedule = dict(TINY, n_initial_iterations=4, n_final_iterations=0, n_final_passes=1)  # the mechanics only
    settings = JobSettings(abinit=AbinitSettings(**schedule), n_particles=120, align_every=2, checkpoint_minutes=0.0)
    gold_standard_job(str(inputs / "J3_particles.cs"), tmp_path / "job", settings)

    star = load_particles(tmp_path / "job" / "particles.star")
    cs = Dataset.load(tmp_path / "job" / "particles.cs")
    assert len(cs) == len(star) == 120
    assert np.array_equal(cs["uid"], np.array([int(u) for u in star.table.text("csUid")], dtype=np.uint64))
    assert set(cs["uid"].tolist()) <= set(source.ids.tolist())  # the input's uids were its particle ids
    assert np.array_equal(cs["blob/idx"], star.slice_of)
    assert np.abs(pyem_relion_matrix(cs["alignments3D/pose"]) - star.rotations).max() < 1e-5
    assert np.abs(cs["alignments3D/shift"] - star.shifts).max() < 1e-5
    assert np.array_equal(cs["alignments3D/split"] + 1, star.half_set)
    assert set(cs["alignments3D/split"].tolist()) == {0, 1}
