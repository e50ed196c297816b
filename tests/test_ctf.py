"""CTF against the textbook weak-phase formula, written here independently of the engine."""

import numpy as np
import pytest

from habinit_plugin.engine.ctf import CTFParams, electron_wavelength, evaluate_ctf
from reference import reference_ctf, wavelength_from_constants


def test_wavelength_matches_physical_constants():
    for kv in (100, 200, 300):
        assert electron_wavelength(kv) == pytest.approx(wavelength_from_constants(kv), rel=1e-5)
    assert electron_wavelength(300) == pytest.approx(0.019687, abs=1e-6)


@pytest.mark.parametrize(
    "u, v, angle, kv, cs, q0, phase, bfac",
    [
        (15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1, 0.0, 0.0),
        (21000.0, 19000.0, 37.0, 300.0, 2.7, 0.07, 0.0, 0.0),
        (8000.0, 7000.0, 120.0, 200.0, 0.01, 0.1, 90.0, 0.0),
        (30000.0, 26000.0, -15.0, 300.0, 2.7, 0.1, 35.0, 80.0),
    ],
)
def test_ctf_matches_reference_formula(u, v, angle, kv, cs, q0, phase, bfac):
    box, pixel_size = 128, 1.1
    freqs = np.array([[0, 0], [3, 0], [0, 5], [7, -4], [17, 9], [40, -31], [0, 63], [25, 25]])
    params = CTFParams(*[np.array([x]) for x in (u, v, angle, kv, cs, q0, phase, bfac)])
    got = evaluate_ctf(params, freqs, pixel_size, box)[0]
    s = freqs / (box * pixel_size)
    expected = reference_ctf(s[:, 0], s[:, 1], u, v, angle, kv, cs, q0, phase, bfac, lam=electron_wavelength(kv))
    assert np.allclose(got, expected, atol=2e-5)


def test_ctf_is_positive_at_zero_frequency_and_depends_on_crop_only_through_frequency():
    params = CTFParams(*[np.array([x]) for x in (12000.0, 11000.0, 10.0, 300.0, 2.7, 0.1, 0.0, 0.0)])
    assert evaluate_ctf(params, np.array([[0, 0]]), 1.0, 64)[0, 0] == pytest.approx(0.1, abs=1e-6)
    # the same physical frequency on a full box and a 2x Fourier crop
    full = evaluate_ctf(params, np.array([[10, 6]]), 1.0, 128)
    crop = evaluate_ctf(params, np.array([[10, 6]]), 2.0, 64)
    assert full[0, 0] == pytest.approx(crop[0, 0], abs=1e-6)


def test_astigmatism_angle_matters():
    base = [21000.0, 19000.0, 0.0, 300.0, 2.7, 0.1, 0.0, 0.0]
    turned = list(base)
    turned[2] = 90.0
    freqs = np.array([[20, 0]])
    a = evaluate_ctf(CTFParams(*[np.array([x]) for x in base]), freqs, 1.0, 128)
    b = evaluate_ctf(CTFParams(*[np.array([x]) for x in turned]), freqs, 1.0, 128)
    assert abs(a[0, 0] - b[0, 0]) > 0.05
