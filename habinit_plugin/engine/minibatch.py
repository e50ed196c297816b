"""A minibatch of particle images as the search and the updates use it.

Images are read from the stacks (host), transformed and sampled at the half-plane
frequencies of a band (sorted by radius), on the compute device, with their CTF and
the noise weight per frequency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import array_module, to_device
from .ctf import CTFParams, evaluate_ctf
from .fourier import hermitian_weights, image_rfft, sample_spectra


@dataclass
class ImageBatch:
    """What the search needs of a minibatch, on the compute device.

    spectra: (B, M) half-plane spectra of the raw images (not centred);
    ctf: (B, M); noise_weight: (M,) Hermitian weight / noise variance per frequency;
    freqs: (M, 2) frequencies sorted by radius; radii: (M,) their radii (host).
    box: image box in pixels.
    """

    spectra: object
    ctf: object
    noise_weight: object
    freqs: object
    radii: np.ndarray
    box: int

    def band(self, r_max: float, r_min: float = 0.0) -> tuple[int, int]:
        """(start, stop) of the frequencies with r_min <= |k| <= r_max (they are sorted)."""
        return int(np.searchsorted(self.radii, r_min, "left")), int(np.searchsorted(self.radii, r_max, "right"))

    def rows(self, rows) -> ImageBatch:
        """The images ``rows`` (host indices)."""
        r = array_module(self.spectra).asarray(rows)
        return ImageBatch(self.spectra[r], self.ctf[r], self.noise_weight, self.freqs, self.radii, self.box)

    def scaled(self, scales) -> ImageBatch:
        """The batch with each image's CTF multiplied by its signal scale, ``scales`` (B,) host."""
        xp = array_module(self.spectra)
        ctf = self.ctf * xp.asarray(scales, dtype=xp.float32)[:, None]
        return ImageBatch(self.spectra, ctf, self.noise_weight, self.freqs, self.radii, self.box)

    @property
    def inverse_noise(self):
        """1 / noise variance per frequency (M,), without the Hermitian weight."""
        return self.noise_weight / hermitian_weights(self.freqs)

    def within(self, radius: float) -> ImageBatch:
        """The frequencies within ``radius`` (Fourier pixels)."""
        m = int(np.searchsorted(self.radii, radius, "right"))
        return ImageBatch(
            self.spectra[:, :m], self.ctf[:, :m], self.noise_weight[:m], self.freqs[:m], self.radii[:m], self.box
        )


def image_spectra(images, freqs: np.ndarray, xp):
    """Half-plane spectra (B, M) on the device of host images (B, box, box) at ``freqs`` (M, 2)."""
    return sample_spectra(image_rfft(to_device(images, xp)), xp.asarray(freqs))


def image_batch(
    images, ctf: CTFParams, freqs: np.ndarray, radii: np.ndarray, noise_variance: np.ndarray, pixel_size: float, xp
) -> ImageBatch:
    """The batch of host images (B, box, box) with CTF parameters ``ctf`` (B particles).

    freqs (M, 2) and radii (M,): host, sorted by radius; noise_variance (M,) per frequency.
    """
    box = images.shape[-1]
    spectra = image_spectra(images, freqs, xp)
    freqs_dev = xp.asarray(freqs)
    ctf_values = evaluate_ctf(ctf.to(xp), freqs_dev, pixel_size, box)
    weight = hermitian_weights(freqs_dev) / xp.asarray(noise_variance)
    return ImageBatch(spectra, ctf_values, weight, freqs_dev, radii, box)
