"""STAR values with spaces, quotes, backslashes and shell syntax survive a write/read round trip."""

import numpy as np

from habinit_plugin.engine.mrc import new_stack
from habinit_plugin.engine.particles import load_particles, write_particles_star
from habinit_plugin.engine.star import StarBlock, read_star, write_star

HOSTILE = ["plain", "with space", "it's", 'say "hi"', "both ' and \" here", "back\\slash x", "$(touch pwned)", ""]


def test_values_round_trip(tmp_path):
    block = StarBlock("particles", ["rlnImageName", "rlnMicrographName"], [[v, "m"] for v in HOSTILE])
    write_star(tmp_path / "q.star", [block])
    assert read_star(tmp_path / "q.star")["particles"].text("rlnImageName") == HOSTILE
    assert not (tmp_path / "pwned").exists()


def test_particles_from_a_stack_path_with_space_and_quote(tmp_path):
    folder = tmp_path / "it's a folder"
    folder.mkdir()
    stack = new_stack(folder / "my stack.mrcs", 3, 16, 2.0)
    stack.data[:] = np.arange(3, dtype=np.float32)[:, None, None]
    stack.close()
    optics = StarBlock(
        "optics",
        ["rlnOpticsGroup", "rlnImagePixelSize", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
         "rlnImageSize"],
        [["1", "2.0", "300", "2.7", "0.1", "16"]],
    )  # fmt: skip
    names = [f"{i + 1:06d}@{folder / 'my stack.mrcs'}" for i in range(3)]
    particles = StarBlock(
        "particles",
        ["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnOpticsGroup"],
        [[n, "10000", "10000", "0", "1"] for n in names],
    )
    write_star(tmp_path / "in.star", [optics, particles])
    loaded = load_particles(tmp_path / "in.star")
    write_particles_star(tmp_path / "out.star", loaded, None, np.tile(np.eye(3), (3, 1, 1)), np.zeros((3, 2)))
    again = load_particles(tmp_path / "out.star")
    assert list(again.ids) == list(loaded.ids)
    assert np.array_equal(again.read_images([0, 1, 2])[:, 0, 0], [0.0, 1.0, 2.0])
