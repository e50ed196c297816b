"""Independent reference formulas and generators for tests (no engine code)."""

import numpy as np
from scipy import ndimage


def wavelength_from_constants(kv):
    """Relativistic electron wavelength in Angstrom from physical constants."""
    h, m, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    v = kv * 1e3
    return h / np.sqrt(2 * m * e * v * (1 + e * v / (2 * m * c * c))) * 1e10


def reference_ctf(sx, sy, u, v, angle_deg, kv, cs_mm, q0, phase_deg, bfactor, lam=None):
    """sqrt(1-Q^2) sin(chi + phi) + Q cos(chi + phi), chi = pi lam dz s^2 - pi/2 Cs lam^3 s^4 (s in 1/A).

    lam: wavelength in Angstrom (default: from physical constants). Phases reach
    hundreds of radians at high frequency, so a 1e-5 relative difference in the
    wavelength shows at the 1e-3 level: compare formulas at one wavelength.
    """
    lam = wavelength_from_constants(kv) if lam is None else lam
    s2 = sx**2 + sy**2
    theta = np.arctan2(sy, sx)
    dz = 0.5 * (u + v) + 0.5 * (u - v) * np.cos(2 * (theta - np.deg2rad(angle_deg)))
    chi = np.pi * lam * dz * s2 - 0.5 * np.pi * cs_mm * 1e7 * lam**3 * s2**2
    phi = np.deg2rad(phase_deg)
    return (np.sqrt(1 - q0**2) * np.sin(chi + phi) + q0 * np.cos(chi + phi)) * np.exp(-bfactor * s2 / 4)


def relion_particle_image(coefficients, rotation, origin, defocus, pixel_size, kv=300.0, cs=2.7, q0=0.1):
    """A particle image made the way RELION describes it, from scratch.

    coefficients: cubic-spline coefficients of the map (ndimage.spline_filter);
    rotation: RELION matrix A (a map point r appears at (A r)_xy); origin: RELION
    origin (x, y) in pixels (the particle centre is at box//2 - origin); defocus (A).
    """
    n = coefficients.shape[0]
    z, y, x = np.mgrid[0:n, 0:n, 0:n] - n // 2
    r = np.stack([x, y, z], -1).reshape(-1, 3).astype(np.float64)
    src = r @ rotation
    coords = np.stack([src[:, 2], src[:, 1], src[:, 0]]) + n // 2
    rotated = ndimage.map_coordinates(coefficients, coords, order=3, prefilter=False, mode="constant")
    projection = rotated.reshape(n, n, n).sum(axis=0)
    spectrum = np.fft.fft2(np.fft.ifftshift(projection))
    k = np.fft.fftfreq(n, 1.0 / n)
    ky, kx = np.meshgrid(k, k, indexing="ij")
    ctf = reference_ctf(kx / (n * pixel_size), ky / (n * pixel_size), defocus, defocus, 0.0, kv, cs, q0, 0.0, 0.0)
    shift = -np.asarray(origin)  # content moves by -origin
    ramp = np.exp(-2j * np.pi * (kx * shift[0] + ky * shift[1]) / n)
    return np.fft.fftshift(np.fft.ifft2(spectrum * ctf * ramp).real).astype(np.float32)
