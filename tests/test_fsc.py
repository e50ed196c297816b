"""FSC and resolution estimates."""

import numpy as np
import pytest

from habinit_plugin.engine.fsc import expected_full_map_fsc, fsc, resolution_at, shell_frequencies


def test_fsc_of_identical_maps_is_one_and_of_independent_noise_is_small():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(32, 32, 32)).astype(np.float32)
    b = rng.normal(size=(32, 32, 32)).astype(np.float32)
    assert np.allclose(fsc(a, a), 1.0, atol=1e-5)
    noise = fsc(a, b)[4:]
    assert np.abs(noise).max() < 0.2 and abs(noise.mean()) < 0.05


def test_fsc_is_blind_to_scale_and_sees_anticorrelation():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(16, 16, 16)).astype(np.float32)
    assert np.allclose(fsc(a, 3 * a), 1.0, atol=1e-5)
    assert np.allclose(fsc(a, -a)[1:], -1.0, atol=1e-5)


def test_resolution_interpolates_the_crossing():
    curve = np.array([1.0, 0.9, 0.7, 0.3, 0.1, 0.0])  # box 10
    assert resolution_at(curve, 0.5, 2.0) == pytest.approx(10 * 2.0 / 2.5)
    assert resolution_at(curve, 0.143, 2.0) == pytest.approx(10 * 2.0 / (3 + 0.157 / 0.2))
    assert resolution_at(np.ones(6), 0.143, 2.0) == pytest.approx(4.0)  # Nyquist


def test_shell_frequencies_and_theory():
    assert shell_frequencies(64, 2.0)[32] == pytest.approx(1 / 4.0)
    assert expected_full_map_fsc(np.array([1.0, 1 / 3, 0.0])) == pytest.approx([1.0, 0.70710678, 0.0])
