"""The global search's bands: the coarse level scores what its 15 degree step can hold, finer levels more.

Measured on a small set with the noise real ice gives (5x the power below 25 A): searched against the true
map at 10 A, the policy's bands (the whole band from the coarse level on) must place more images within 15
degrees of their true pose than the coarse level at 0.6 of the band, the rule before.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from habinit_plugin.engine import density
from habinit_plugin.engine.abinit import AbinitRun
from habinit_plugin.engine.geometry import MapGeometry
from habinit_plugin.engine.mrc import read_map
from habinit_plugin.engine.particles import load_particles
from habinit_plugin.engine.pose_search import _band_radius, global_search
from habinit_plugin.engine.projector import volume_to_grid
from habinit_plugin.engine.search_policy import COARSE_BAND_PER_R50, coarse_resolution_A, global_settings
from habinit_plugin.engine.settings import AbinitSettings
from habinit_plugin.engine.simulate import SimulationSettings, simulate_dataset
from habinit_plugin.engine.so3 import geodesic_distance

BOX, PIXEL_SIZE_A = 64, 1.5


@pytest.fixture(scope="module")
def coloured_set(tmp_path_factory):
    """600 images of the progesterone receptor LBD (29 kDa), box 64, 1.5 A/px, SNR 0.05, noise power
    1 + 4 exp(-(s 25 A)^2)."""
    volume = density.atoms_to_map(density.bundled_structure_path("pr"), BOX, PIXEL_SIZE_A)
    settings = SimulationSettings(n_particles=600, snr=0.05, seed=3, noise_colour=4.0)
    return simulate_dataset(volume, PIXEL_SIZE_A, tmp_path_factory.mktemp("coloured"), settings)


def test_coarse_band_follows_the_particle_size():
    """A particle twice the size gets a coarse band half as fine; the band never exceeds the search band."""
    small = MapGeometry(128, 1.0, AbinitSettings(), particle_r50_px=15.0)
    large = replace(small, particle_r50_px=30.0)
    assert coarse_resolution_A(small) == pytest.approx(COARSE_BAND_PER_R50 * math.radians(15.0) * 15.0)
    assert coarse_resolution_A(large) == pytest.approx(2 * coarse_resolution_A(small))
    fine = global_settings(small, small.radius(4.0), 0.0)
    assert fine.coarse_radius == pytest.approx(small.radius(coarse_resolution_A(small)))
    assert global_settings(small, small.radius(12.0), 0.0).coarse_radius == pytest.approx(small.radius(12.0))
    bands = [_band_radius(fine, level) for level in range(fine.coarse_level, fine.final_level + 1)]
    assert bands == pytest.approx([min(fine.final_radius, bands[0] * 2**i) for i in range(len(bands))])
    assert bands[-1] == pytest.approx(fine.final_radius)


def test_the_whole_band_at_the_coarse_level_places_more_images(coloured_set):
    particles = load_particles(coloured_set["particles"])
    truth_poses = load_particles(coloured_set["gt_poses"])
    truth, _ = read_map(coloured_set["gt_map"])
    run = AbinitRun(particles, AbinitSettings(seed=0))
    run.use_full_box()
    radius = run.geometry.radius(10.0)
    batch = run.image_batch(np.arange(len(particles)), radius).within(radius)
    policy = global_settings(run.geometry, radius, run.device_bytes)
    before = replace(policy, coarse_radius=max(6.0, 0.6 * radius))  # the coarse level's band before
    before_bands = [_band_radius(before, level) for level in range(before.coarse_level, before.final_level + 1)]
    assert policy.coarse_radius == pytest.approx(radius) and before_bands[0] < 0.7 * radius
    placed = {}
    for name, settings in (("policy", policy), ("before", before)):
        result = global_search(volume_to_grid(truth, 2), 2, batch, settings)
        placed[name] = np.mean(geodesic_distance(result.rotations[:, 0], truth_poses.rotations) < 15.0)
    assert placed["policy"] > placed["before"] + 0.05, placed
