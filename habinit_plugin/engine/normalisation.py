"""Image intensities as the job uses them: offset, scale and contrast sign of a stack.

Stacks come from many programs: normalised by RELION (background mean 0, sd 1), in
detector counts, offset by a constant, or with the particles dark (not contrast-inverted
at extraction). The job subtracts each image's background mean (pixels outside
``BACKGROUND_RADIUS`` of the box), divides by one noise sd for the whole stack and, when
asked, flips the sign, so that a stack multiplied by 1000 and offset by a constant gives
the same map. Dark particles are detected from the mean image contrast (the centre of
a particle image is brighter than its background on average: the CTF is positive at the
lowest frequencies in RELION's convention) and refused with a message saying what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKGROUND_RADIUS = 0.45  # of the box: pixels farther from the centre are background
CENTRE_RADIUS = 0.2  # of the box: the central disc whose mean is compared with the background
SAMPLE = 1000  # images read to estimate the noise sd and the contrast
CONTRAST_Z = 4.0  # standard errors: a contrast beyond this is certain


@dataclass(frozen=True)
class ImageNormalisation:
    """pixels -> sign * (pixels - background mean of the image) / noise_sd."""

    noise_sd: float = 1.0
    sign: float = 1.0

    def apply(self, images: np.ndarray) -> np.ndarray:
        """images (B, N, N) float32 -> normalised float32 (B, N, N)."""
        offset = images[:, background_mask(images.shape[-1])].mean(axis=1)
        return ((images - offset[:, None, None]) * np.float32(self.sign / self.noise_sd)).astype(np.float32)


@dataclass(frozen=True)
class ContrastCheck:
    """The mean (centre - background) contrast of a sample of images, in standard errors (z), and its size."""

    z: float
    n_images: int

    @property
    def dark_particles(self) -> bool:
        return self.z < -CONTRAST_Z

    @property
    def white_particles(self) -> bool:
        return self.z > CONTRAST_Z


def _radius_px(box: int):
    y, x = np.mgrid[:box, :box] - box // 2
    return np.hypot(x, y)


def background_mask(box: int) -> np.ndarray:
    """(N, N) bool: the pixels outside ``BACKGROUND_RADIUS`` of the box."""
    return _radius_px(box) >= BACKGROUND_RADIUS * box


def measure_stack(images: np.ndarray) -> tuple[float, ContrastCheck]:
    """(noise sd of the background, contrast check) of sample images (B, N, N)."""
    box = images.shape[-1]
    background = images[:, background_mask(box)].astype(np.float64)
    offset = background.mean(axis=1)
    noise_sd = float(np.sqrt(np.mean(background.var(axis=1))))
    centre = images[:, _radius_px(box) < CENTRE_RADIUS * box].astype(np.float64).mean(axis=1)
    contrast = centre - offset
    error = contrast.std() / np.sqrt(len(contrast)) if len(contrast) > 1 else np.inf
    z = float(contrast.mean() / error) if error > 0 else 0.0
    return noise_sd if noise_sd > 0 else 1.0, ContrastCheck(z, len(images))


def sample_rows(n: int, seed: int = 0) -> np.ndarray:
    """Sorted rows of at most ``SAMPLE`` particles of ``n``, the same for a given seed."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, SAMPLE), replace=False))
