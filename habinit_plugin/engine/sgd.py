"""Preconditioned SGD on a Fourier grid: gradient, update, schedule, noise model, constraints.

The model is a centred Fourier grid V (size G = oversampling * n_work, frequency k at
index G//2 + oversampling * k) whose slices, taken with trilinear interpolation, are
the projections. With G_t the minibatch gradient of the log posterior scaled to the
size of the data set, sum_i P_i^T C_i (X_i - C_i P_i V) / s2, and W the backprojected
weights sum_i P_i^T C_i^2 / s2 (the row sums of the Hessian for trilinear slices),

    V <- V + eta (G_t - V / tau2) / (W_ema + 1 / tau2).

With eta = 1 and V = 0 this is the Wiener reconstruction of the minibatch; any
eta < 2 is stable. This is the diagonal preconditioner of Toader, Brubaker &
Lederman (2025) in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import array_module, to_numpy
from .fourier import (
    centered_fftn,
    centered_ifftn,
    phase_shift,
    radial_shells,
    shell_sum,
    soft_sphere,
)
from .minibatch import ImageBatch
from .projector import backproject, hermitian_symmetrize, project, slice_coordinates
from .reconstruct import shell_weight_means
from .settings import AbinitSettings
from .symmetry import symmetrise_grid


def sgd_update(grid, gradient, weight_ema, inv_tau2, learning_rate: float):
    """One preconditioned step; all arrays (G, G, G), inv_tau2 per voxel. Returns the new grid."""
    return grid + learning_rate * (gradient - grid * inv_tau2) / (weight_ema + inv_tau2)


def update_weight_ema(weight_ema, weight, decay: float):
    """Running mean of the backprojected weights; voxels seen for the first time take the new value."""
    xp = array_module(weight)
    mixed = decay * weight_ema + (1.0 - decay) * weight
    return xp.where(weight_ema > 0, mixed, weight).astype(xp.float32)


def resize_grid(grid, size: int):
    """Centred crop or zero-pad of a Fourier grid to (size,)*3 (same frequency spacing)."""
    xp = array_module(grid)
    old = grid.shape[0]
    if size == old:
        return grid
    out = xp.zeros((size,) * 3, dtype=grid.dtype)
    n = min(size, old)
    src = slice(old // 2 - n // 2, old // 2 - n // 2 + n)
    dst = slice(size // 2 - n // 2, size // 2 - n // 2 + n)
    out[dst, dst, dst] = grid[src, src, src]
    return out


def band_mask(size: int, oversampling: int, radius: float, xp=np):
    """Voxels of a grid whose frequency (Fourier pixels of the box) is within ``radius``."""
    return (radial_shells((size,) * 3, xp).astype(xp.float32) / oversampling) <= radius


def apply_constraints(grid, oversampling: int, mask_radius_px: float, band_radius: float, positive: bool = True):
    """Real-space constraints on a model grid: soft spherical window and non-negativity.

    mask_radius_px: window radius in pixels of the working box (grid size / oversampling);
    the grid is band-limited to ``band_radius`` Fourier pixels afterwards.
    """
    xp = array_module(grid)
    size = grid.shape[0]
    volume = centered_ifftn(grid).real
    volume = volume * soft_sphere(size, mask_radius_px, width=max(2.0, 0.1 * mask_radius_px), xp=xp)
    if positive:
        volume = xp.maximum(volume, 0.0)
    out = centered_fftn(volume.astype(xp.float32)).astype(xp.complex64)
    return out * band_mask(size, oversampling, band_radius, xp)


def centre_of_mass_shift(grid):
    """Offset (x, y, z) in grid voxels of the positive density's centre from the grid centre."""
    return centre_of_mass_px(centered_ifftn(grid).real)


def centre_of_mass_px(volume) -> np.ndarray:
    """(x, y, z) offset in voxels of a real map's positive density's centre of mass from voxel N//2."""
    xp = array_module(volume)
    positive = xp.maximum(volume, 0.0)
    total = float(positive.sum())
    if total <= 0:
        return np.zeros(3)
    axis = xp.arange(volume.shape[0], dtype=xp.float64) - volume.shape[0] // 2
    z = float((positive.sum(axis=(1, 2)) * axis).sum()) / total
    y = float((positive.sum(axis=(0, 2)) * axis).sum()) / total
    x = float((positive.sum(axis=(0, 1)) * axis).sum()) / total
    return np.array([x, y, z])


def translate_grid(grid, offset_voxels):
    """Move the real-space content of a centred Fourier grid by (x, y, z) grid voxels."""
    xp = array_module(grid)
    size = grid.shape[0]
    k = (xp.arange(size, dtype=xp.float32) - size // 2) / size
    ox, oy, oz = (float(v) for v in offset_voxels)
    ramp_z = xp.exp(-2j * np.pi * k * oz).astype(xp.complex64)
    ramp_y = xp.exp(-2j * np.pi * k * oy).astype(xp.complex64)
    ramp_x = xp.exp(-2j * np.pi * k * ox).astype(xp.complex64)
    return grid * ramp_z[:, None, None] * ramp_y[None, :, None] * ramp_x[None, None, :]


# ---------------------------------------------------------------------- noise model


@dataclass
class NoiseModel:
    """Radially symmetric noise power per integer shell (Fourier pixels of the box).

    sigma2: (n_shells,) host float64, the variance of one half-plane coefficient.
    """

    sigma2: np.ndarray

    @classmethod
    def from_spectra(cls, spectra, radii: np.ndarray, n_shells: int) -> NoiseModel:
        """Initial estimate: the mean power of image coefficients per shell (signal + noise)."""
        power = _shell_power(spectra, radii, n_shells)
        return cls(_fill_empty(power))

    @classmethod
    def from_residual_power(cls, power: np.ndarray, counts: np.ndarray) -> NoiseModel:
        """The noise power of residuals: sums of |residual|^2 per shell over ``counts`` frequencies (full-plane
        sums over all particles, (n_shells,) each); shells without frequencies take their neighbour's value."""
        return cls(_fill_empty(np.where(counts > 0, power / np.maximum(counts, 1), 0.0)))

    def update(self, residuals, radii: np.ndarray, decay: float = 0.9) -> None:
        """Blend in the mean residual power per shell of a minibatch, residuals (B, M)."""
        n = len(self.sigma2)
        power = _shell_power(residuals, radii, n)
        seen = power > 0
        self.sigma2[seen] = decay * self.sigma2[seen] + (1.0 - decay) * power[seen]

    def resampled(self, from_box: int, to_box: int) -> NoiseModel:
        """The model for images of ``to_box`` pixels (same pixel size, the same stationary noise) from this one
        of ``from_box``: shell r of ``to_box`` is at the physical frequency of shell r * from_box / to_box
        (linear interpolation, the last shell beyond), and a coefficient's variance scales as box^2 (the
        unnormalised FFT of :func:`.fourier.image_rfft`: white noise of pixel variance v gives box^2 v)."""
        shells = np.arange(to_box // 2 + 1) * (from_box / to_box)
        sigma2 = np.interp(shells, np.arange(len(self.sigma2)), self.sigma2)
        return NoiseModel(sigma2 * (to_box / from_box) ** 2)

    def per_frequency(self, radii: np.ndarray) -> np.ndarray:
        """Noise variance at each frequency of radius ``radii``, (M,) float32."""
        shells = np.minimum(np.rint(radii).astype(np.int64), len(self.sigma2) - 1)
        return self.sigma2[shells].astype(np.float32)


def _shell_power(values, radii, n_shells):
    xp = array_module(values)
    shells = xp.asarray(np.minimum(np.rint(radii).astype(np.int64), n_shells - 1))
    power = xp.mean(xp.abs(values) ** 2, axis=0).astype(xp.float64)
    sums = shell_sum(power, shells, n_shells)
    counts = shell_sum(xp.ones_like(power), shells, n_shells)
    sums, counts = to_numpy(sums), to_numpy(counts)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)


def _fill_empty(power: np.ndarray) -> np.ndarray:
    """Replace zero shells by the nearest non-zero shell's value."""
    out = power.copy()
    good = np.flatnonzero(out > 0)
    if len(good) == 0:
        return np.ones_like(out)
    for i in np.flatnonzero(out <= 0):
        out[i] = out[good[np.argmin(np.abs(good - i))]]
    return out


# ------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    """cryoSPARC-style ab initio schedule of an :class:`~.settings.AbinitSettings`.

    Iterations 0..n_initial-1 ramp the resolution from ``initial_resolution_A`` to
    ``final_resolution_A`` (linear in frequency) with minibatches of ``initial_batch``;
    the next ``n_final_iterations`` stay at ``final_resolution_A`` with minibatches
    growing to ``final_batch``. The learning rate is ``learning_rate`` for
    ``learning_rate_iterations``, then decays to ``final_learning_rate``. The posterior
    temperature (noise annealing) falls from ``initial_temperature`` to 1 over the
    initial iterations.
    """

    settings: AbinitSettings
    final_resolution_A: float

    @property
    def n_initial(self) -> int:
        return self.settings.n_initial_iterations

    @property
    def n_iterations(self) -> int:
        return self.settings.n_initial_iterations + self.settings.n_final_iterations

    def _initial_fraction(self, t: int) -> float:
        return min(t / max(self.n_initial - 1, 1), 1.0)

    def resolution(self, t: int) -> float:
        f0, f1 = 1.0 / self.settings.initial_resolution_A, 1.0 / self.final_resolution_A
        return 1.0 / (f0 + (f1 - f0) * self._initial_fraction(t))

    def batch_size(self, t: int) -> int:
        s = self.settings
        if t < self.n_initial:
            return s.initial_batch
        frac = min((t - self.n_initial) / max(s.n_final_iterations // 2, 1), 1.0)
        return int(round(s.initial_batch + frac * (s.final_batch - s.initial_batch)))

    def learning_rate(self, t: int) -> float:
        s = self.settings
        if t < s.learning_rate_iterations:
            return s.learning_rate
        rest = max(self.n_iterations - s.learning_rate_iterations, 1)
        frac = min((t - s.learning_rate_iterations) / rest, 1.0)
        return float(s.learning_rate * (s.final_learning_rate / s.learning_rate) ** frac)

    def temperature(self, t: int) -> float:
        return float(self.settings.initial_temperature ** (1.0 - self._initial_fraction(t)))


def symmetric_sums(data, weight, symmetry: str = "C1", oversampling: int = 2):
    """Hermitian completion of half-plane backprojection sums, summed over the point group."""
    data, weight = hermitian_symmetrize(data), hermitian_symmetrize(weight)
    return symmetrise_grid(data, symmetry, oversampling), symmetrise_grid(weight, symmetry, oversampling)


# ------------------------------------------------------------------------- gradient


def minibatch_gradient(grid, oversampling: int, batch: ImageBatch, rotations, origins, weights, symmetry="C1"):
    """Backprojected weighted residuals and CTF^2 weights of a minibatch at its kept poses.

    grid (G, G, G) the model; rotations (B, K, 3, 3), origins (B, K, 2) pixels, weights (B, K)
    posterior weights (host). Returns the Hermitian gradient and weight grids (G, G, G), summed
    over the point group ``symmetry``, and the residual spectra (B, M) at the best poses (k = 0).
    """
    xp = array_module(grid)
    size = grid.shape[0]
    inv_noise = batch.inverse_noise
    data = xp.zeros((size,) * 3, dtype=xp.complex64)
    weight = xp.zeros((size,) * 3, dtype=xp.float32)
    best_residual = None
    for k in range(rotations.shape[1]):
        coords = slice_coordinates(xp.asarray(rotations[:, k]), batch.freqs)
        proj = project(grid, coords, oversampling)
        centred = batch.spectra * phase_shift(batch.freqs, xp.asarray(origins[:, k]), batch.box)
        residual = centred - batch.ctf * proj
        w = xp.asarray(weights[:, k], dtype=xp.float32)[:, None]
        backproject((w * batch.ctf * inv_noise * residual).astype(xp.complex64), coords, size, oversampling, out=data)
        backproject((w * batch.ctf**2 * inv_noise).astype(xp.float32), coords, size, oversampling, out=weight)
        if k == 0:
            best_residual = residual
    data, weight = symmetric_sums(data, weight, symmetry, oversampling)
    return data, weight, best_residual


def weak_prior_tau2(weight, oversampling: int):
    """The SGD phase's weak prior per shell: 1/tau2 = 5% of the mean weight of the shell.

    weight (G, G, G) backprojected weights; returns tau2 (G // (2 oversampling) + 1,).
    """
    n_shells = weight.shape[0] // (2 * oversampling) + 1
    mean_w = shell_weight_means(weight, oversampling, n_shells)
    return 1.0 / (0.05 * array_module(weight).maximum(mean_w, 1e-30))
