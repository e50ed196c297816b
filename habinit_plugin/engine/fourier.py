"""Fourier-space helpers shared by the engine.

Conventions
-----------
* Real-space arrays are indexed ``[z, y, x]`` (volumes) or ``[y, x]`` (images); the
  centre of a box of size N is the voxel ``N // 2`` on every axis, and it is the phase
  origin of every Fourier transform here.
* Frequencies are integer or real *Fourier pixels* of the full particle box N
  (cycles per box); ``k / (N * pixel_size)`` is the spatial frequency in 1/Angstrom.
* Images are handled as a list of Fourier coefficients on a *half plane* of
  frequencies (``kx > 0``, or ``kx == 0`` and ``ky >= 0``) inside a disc. The other
  half is the complex conjugate (real images), so full-plane sums are half-plane
  sums weighted by :func:`hermitian_weights`.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module, fft_kwargs, fft_module


def _centered(transform: str, x, axes):
    """``fftn`` or ``ifftn`` of x with the phase origin and the zero frequency at index N//2."""
    xp = array_module(x)
    fft = fft_module(xp)
    axes = tuple(range(x.ndim)) if axes is None else axes
    shifted = fft.ifftshift(x, axes=axes)
    return fft.fftshift(getattr(fft, transform)(shifted, axes=axes, **fft_kwargs(xp)), axes=axes)


def centered_fftn(x, axes=None):
    """FFT with the phase origin at index N//2 and zero frequency at index N//2."""
    return _centered("fftn", x, axes)


def centered_ifftn(x, axes=None):
    """Inverse of :func:`centered_fftn` (complex output)."""
    return _centered("ifftn", x, axes)


def image_rfft(images):
    """Half-spectrum FFT of real images, phase origin at pixel N//2.

    images: (..., N, N) real. Returns (..., N, N//2 + 1) complex64, indexed
    ``[ky mod N, kx]`` (unshifted ky, kx >= 0).
    """
    xp = array_module(images)
    fft = fft_module(xp)
    shifted = fft.ifftshift(images.astype(xp.float32, copy=False), axes=(-2, -1))
    return fft.rfft2(shifted, **fft_kwargs(xp)).astype(xp.complex64, copy=False)


def image_irfft(spectra, box: int):
    """Inverse of :func:`image_rfft`: (..., N, N//2 + 1) complex -> (..., N, N) float32."""
    xp = array_module(spectra)
    fft = fft_module(xp)
    images = fft.irfft2(spectra, s=(box, box), **fft_kwargs(xp))
    return fft.fftshift(images, axes=(-2, -1)).astype(xp.float32, copy=False)


def half_plane_frequencies(r_max: float, r_min: float = 0.0) -> np.ndarray:
    """Integer frequencies (kx, ky) of the half plane with r_min <= |k| <= r_max.

    Returns (M, 2) int32, sorted by radius so that a prefix is a smaller disc.
    """
    r = int(np.floor(r_max))
    ky, kx = np.mgrid[-r : r + 1, 0 : r + 1]
    kx, ky = kx.ravel(), ky.ravel()
    radius2 = kx**2 + ky**2
    keep = (kx > 0) | ((kx == 0) & (ky >= 0))
    keep &= (radius2 <= r_max**2) & (radius2 >= r_min**2)
    freqs = np.stack([kx[keep], ky[keep]], axis=1).astype(np.int32)
    order = np.argsort(radius2[keep], kind="stable")
    return freqs[order]


def hermitian_weights(freqs):
    """Weight of each half-plane frequency in a full-plane sum: 1 at k = 0, else 2.

    freqs: (M, 2). Returns (M,) float32 on the same device.
    """
    xp = array_module(freqs)
    is_origin = (freqs[:, 0] == 0) & (freqs[:, 1] == 0)
    return xp.where(is_origin, 1.0, 2.0).astype(xp.float32)


def sample_spectra(spectra, freqs):
    """Pick the half-plane coefficients ``freqs`` (M, 2) out of rfft spectra.

    spectra: (..., N, N//2 + 1) from :func:`image_rfft`. Returns (..., M) complex64.
    """
    box = spectra.shape[-2]
    return spectra[..., freqs[:, 1] % box, freqs[:, 0]]


def fill_spectra(values, freqs, box: int):
    """Scatter half-plane coefficients back into an rfft layout (others zero).

    values: (..., M) complex. Returns (..., N, N//2 + 1) complex64. Coefficients on
    the kx = 0 column are completed by Hermitian symmetry so that the inverse
    transform is the real image whose samples are ``values``.
    """
    xp = array_module(values)
    out = xp.zeros(values.shape[:-1] + (box, box // 2 + 1), dtype=xp.complex64)
    iy = freqs[:, 1] % box
    out[..., iy, freqs[:, 0]] = values
    on_axis = (freqs[:, 0] == 0) & (freqs[:, 1] > 0)
    out[..., (-freqs[on_axis, 1]) % box, 0] = xp.conj(values[..., on_axis])
    return out


def phase_shift(freqs, shifts, box: int):
    """Phase ramps that translate images by ``shifts`` pixels.

    freqs: (M, 2) frequencies; shifts: (..., 2) as (dx, dy) in pixels of box N.
    Returns (..., M) complex64 ``exp(-2 pi i k.s / N)``: multiplying a spectrum by it
    moves the image content by +s.
    """
    xp = array_module(shifts)
    k = xp.asarray(freqs, dtype=xp.float32)
    s = xp.asarray(shifts, dtype=xp.float32)
    phase = (-2.0 * np.pi / box) * (s @ k.T)
    return xp.exp(1j * phase).astype(xp.complex64)


def radial_shells(shape, xp=np):
    """Integer radius (rounded) of every voxel of a centred FT grid of ``shape``."""
    squares = xp.ix_(*[(xp.arange(n) - n // 2).astype(xp.float32) ** 2 for n in shape])  # broadcast, not copied
    radius = xp.sqrt(sum(squares))
    return xp.rint(radius).astype(xp.int32)


def shell_sum(values, shells, n_shells: int):
    """Sum of ``values`` over each integer shell 0..n_shells-1 (others ignored)."""
    xp = array_module(values)
    inside = shells < n_shells
    return xp.bincount(shells[inside].ravel(), weights=values[inside].ravel(), minlength=n_shells)[:n_shells]


def shell_mean(values, shells, n_shells: int):
    xp = array_module(values)
    counts = shell_sum(xp.ones_like(values, dtype=xp.float32), shells, n_shells)
    return shell_sum(values, shells, n_shells) / xp.maximum(counts, 1)


def resample_volume(volume, new_box: int):
    """Fourier crop or zero-pad a real map to ``new_box``, same physical extent.

    The pixel size changes by box / new_box; densities keep their values.
    """
    xp = array_module(volume)
    box = volume.shape[0]
    if new_box == box:
        return volume.copy()
    spectrum = centered_fftn(volume.astype(xp.float32))
    out = xp.zeros((new_box,) * 3, dtype=xp.complex64)
    n = min(box, new_box)
    src = slice(box // 2 - n // 2, box // 2 - n // 2 + n)
    dst = slice(new_box // 2 - n // 2, new_box // 2 - n // 2 + n)
    out[dst, dst, dst] = spectrum[src, src, src]
    scale = (new_box / box) ** 3
    return (centered_ifftn(out).real * scale).astype(xp.float32)


def pad_volume(volume, new_box: int):
    """Zero-pad a real map (n, n, n) in real space to (new_box,)*3 around the centre (voxel n//2 lands on
    new_box//2; same pixel size, densities unchanged). n and new_box even, n <= new_box."""
    xp = array_module(volume)
    box = volume.shape[0]
    out = xp.zeros((new_box,) * 3, dtype=volume.dtype)
    lo = new_box // 2 - box // 2
    out[lo : lo + box, lo : lo + box, lo : lo + box] = volume
    return out


def crop_volume(volume, new_box: int):
    """The central (new_box,)*3 of a real map (n, n, n) (voxel n//2 lands on new_box//2; same pixel size):
    :func:`pad_volume` undone. n and new_box even, new_box <= n."""
    lo = volume.shape[0] // 2 - new_box // 2
    return volume[lo : lo + new_box, lo : lo + new_box, lo : lo + new_box]


def soft_sphere(box: int, radius: float, width: float = 3.0, xp=np, ndim: int = 3):
    """Real-space mask: 1 inside ``radius`` pixels, raised-cosine edge ``width`` wide."""
    grids = xp.meshgrid(*[xp.arange(box, dtype=xp.float32) - box // 2] * ndim, indexing="ij")
    r = xp.sqrt(sum(g**2 for g in grids))
    edge = xp.clip((r - radius) / max(width, 1e-6), 0.0, 1.0)
    return (0.5 + 0.5 * xp.cos(np.pi * edge)).astype(xp.float32)
