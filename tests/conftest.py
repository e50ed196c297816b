"""Shared fixtures: simulated data sets of the bundled protein, made once per session."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures import simulate_tiny
from habinit_plugin.engine import density
from habinit_plugin.engine.simulate import SimulationSettings, simulate_dataset

PIXEL_SIZE = density.DEFAULT_PIXEL_SIZE


@pytest.fixture(scope="session")
def protein_map_64():
    return density.bundled_protein_map(64, PIXEL_SIZE)


@pytest.fixture(scope="session")
def protein_map_32():
    return density.bundled_protein_map(32, 2 * PIXEL_SIZE)


def _simulate(tmp_path_factory, name, volume, pixel_size, **settings):
    out = tmp_path_factory.mktemp(name)
    return simulate_dataset(volume, pixel_size, out, SimulationSettings(**settings))


@pytest.fixture(scope="session")
def sim_noise_free(tmp_path_factory, protein_map_64):
    """5000 noise-free particles of the bundled protein, box 64."""
    return _simulate(tmp_path_factory, "noise_free", protein_map_64, PIXEL_SIZE, n_particles=5000, snr=np.inf)


@pytest.fixture(scope="session")
def sim_snr01(tmp_path_factory, protein_map_64):
    """5000 particles of the bundled protein at SNR 0.1, box 64."""
    return _simulate(tmp_path_factory, "snr01", protein_map_64, PIXEL_SIZE, n_particles=5000, snr=0.1, seed=1)


@pytest.fixture(scope="session")
def sim_small(tmp_path_factory, protein_map_32):
    """300 particles at SNR 1, box 32: for I/O and CLI tests."""
    return _simulate(tmp_path_factory, "small", protein_map_32, 2 * PIXEL_SIZE, n_particles=300, snr=1.0, seed=2)


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """160 particles of the bundled protein, box 32, SNR 1: for the job's mechanics."""
    return simulate_tiny(tmp_path_factory.mktemp("tiny"))
