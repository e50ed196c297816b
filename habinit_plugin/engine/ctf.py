"""Contrast transfer function with RELION's parameters and sign convention.

CTF(k) = sin(chi(k)) * exp(-B |k|^2 / 4) with
chi = pi*lambda*df(theta)*|k|^2 - (pi/2)*Cs*lambda^3*|k|^4 + phase_shift + arcsin(Q0),
which is RELION's ``-sin(K1*deltaf*u2 + K2*u4 - K5 - K3)`` with deltaf = -df: ``df``
is positive for underfocus and the CTF is positive at zero frequency (Q0 without a
phase plate), as for particles with inverted (white-on-black) contrast.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .backend import array_module


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    volts = voltage_kv * 1e3
    return 12.2643247 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts))


@dataclass
class CTFParams:
    """Per-particle CTF parameters, each an array of shape (P,) (RELION units).

    defocus_u, defocus_v: Angstrom (underfocus positive); defocus_angle: degrees;
    voltage: kV; cs: mm; amplitude_contrast: fraction; phase_shift: degrees;
    bfactor: Angstrom^2 (envelope exp(-B k^2 / 4)).
    """

    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    voltage: np.ndarray
    cs: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift: np.ndarray
    bfactor: np.ndarray

    def __len__(self) -> int:
        return len(self.defocus_u)

    def subset(self, index) -> CTFParams:
        return CTFParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, xp) -> CTFParams:
        return CTFParams(**{f.name: xp.asarray(getattr(self, f.name), dtype=xp.float64) for f in fields(self)})


def evaluate_ctf(params: CTFParams, freqs, pixel_size: float, box: int):
    """CTF of every particle at the given frequencies.

    params: P particles (arrays on the same device as ``freqs``);
    freqs: (M, 2) frequencies (kx, ky) in Fourier pixels of a box of ``box`` pixels
    of ``pixel_size`` Angstrom (any crop: only k / (box * pixel_size) matters).
    Returns (P, M) float32.
    """
    xp = array_module(freqs)
    f = xp.asarray(freqs, dtype=xp.float64) / (box * pixel_size)  # 1/Angstrom
    sx, sy = f[:, 0][None, :], f[:, 1][None, :]
    s2 = sx**2 + sy**2

    def col(a):
        return xp.asarray(a, dtype=xp.float64)[:, None]

    lam = electron_wavelength(col(params.voltage))
    azimuth = xp.arctan2(sy, sx) - xp.deg2rad(col(params.defocus_angle))
    mean_df = 0.5 * (col(params.defocus_u) + col(params.defocus_v))
    half_astig = 0.5 * (col(params.defocus_u) - col(params.defocus_v))
    defocus = mean_df + half_astig * xp.cos(2.0 * azimuth)
    q0 = xp.clip(col(params.amplitude_contrast), -1.0, 1.0)
    chi = (
        np.pi * lam * defocus * s2
        - 0.5 * np.pi * col(params.cs) * 1e7 * lam**3 * s2**2
        + xp.deg2rad(col(params.phase_shift))
        + xp.arcsin(q0)
    )
    ctf = xp.sin(chi) * xp.exp(-col(params.bfactor) * s2 / 4.0)
    return ctf.astype(xp.float32)
