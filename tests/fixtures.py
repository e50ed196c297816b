"""Test data shared by the test modules: the tiny simulated set, its schedule, a cryoSPARC .cs writer.

The pytest fixtures that build the sets once per session are in conftest.py.
"""

from __future__ import annotations

import numpy as np

from habinit_plugin.engine import density, so3
from habinit_plugin.engine.simulate import SimulationSettings, simulate_dataset

TINY_PIXEL_SIZE = 3.6  # box 32: Nyquist 7.2 A
# a schedule short enough for tests of the job's mechanics (not of its resolution)
TINY = {
    "n_initial_iterations": 12,
    "n_final_iterations": 4,
    "initial_batch": 24,
    "final_batch": 40,
    "n_final_passes": 2,
    "sgd_resolution_A": 10.0,  # the default (7 A) takes the box-32 SGD to Nyquist at twice the cost
}


def simulate_tiny(out, n_particles: int = 160, seed: int = 5) -> dict:
    """``n_particles`` particles of the bundled protein, box 32, SNR 1."""
    volume = density.bundled_protein_map(32, TINY_PIXEL_SIZE)
    settings = SimulationSettings(n_particles=n_particles, snr=1.0, seed=seed)
    return simulate_dataset(volume, TINY_PIXEL_SIZE, out, settings)


def write_cryosparc_cs(path, particles, stack_path, split=None, uid_start: int = 12345678901234, uid_step: int = 7919):
    """A cryoSPARC particle .cs file (structured NumPy array) of a ParticleSet with poses.

    split: (n,) cryoSPARC half sets 0/1, or None for no ``alignments3D/split`` field.
    The pose is the rotation vector of the transpose of RELION's matrix; shifts are
    RELION's origins in pixels. Returns the array written.
    """
    n = len(particles)
    fields = [
        ("uid", "<u8"),
        ("blob/path", "S200"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("ctf/accel_kv", "<f4"),
        ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"),
        ("ctf/df1_A", "<f4"),
        ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"),
        ("ctf/phase_shift_rad", "<f4"),
        ("alignments3D/pose", "<f4", (3,)),
        ("alignments3D/shift", "<f4", (2,)),
        ("alignments3D/psize_A", "<f4"),
    ]
    if split is not None:
        fields.append(("alignments3D/split", "<u4"))
    cs = np.zeros(n, dtype=fields)
    cs["uid"] = np.arange(n) * uid_step + uid_start
    cs["blob/path"] = str(stack_path).encode()
    cs["blob/idx"] = particles.slice_of
    cs["blob/shape"] = particles.box
    cs["blob/psize_A"] = particles.pixel_size
    cs["ctf/accel_kv"] = particles.ctf.voltage
    cs["ctf/cs_mm"] = particles.ctf.cs
    cs["ctf/amp_contrast"] = particles.ctf.amplitude_contrast
    cs["ctf/df1_A"] = particles.ctf.defocus_u
    cs["ctf/df2_A"] = particles.ctf.defocus_v
    cs["ctf/df_angle_rad"] = np.deg2rad(particles.ctf.defocus_angle)
    cs["alignments3D/pose"] = so3.matrix_to_rotvec(np.swapaxes(particles.rotations, 1, 2))
    cs["alignments3D/shift"] = particles.shifts
    cs["alignments3D/psize_A"] = particles.pixel_size
    if split is not None:
        cs["alignments3D/split"] = split
    with open(path, "wb") as f:
        np.save(f, cs)
    return cs
