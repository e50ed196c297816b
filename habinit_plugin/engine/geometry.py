"""Geometry of one map: box, pixel size and the settings' lengths in pixels.

Resolutions are in Angstrom; a "radius" is a Fourier radius in pixels of the box (a
resolution of ``box * pixel_size / radius`` A); mask and shift lengths in real-space
pixels carry ``_px``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .particle_size import MASK_PER_R50
from .settings import AbinitSettings


@dataclass(frozen=True)
class MapGeometry:
    box: int
    pixel_size_A: float
    settings: AbinitSettings
    particle_r50_px: float | None = None  # from the images (particle_size.py); None: not measured
    window_box: int | None = None  # the input box when ``box`` is a real-space crop of it (None: box itself)

    @property
    def r_limit(self) -> int:
        """The highest Fourier radius used: Nyquist - 1."""
        return self.box // 2 - 1

    @property
    def nyquist_resolution_A(self) -> float:
        """The resolution of :attr:`r_limit`."""
        return 2.0 * self.pixel_size_A * (self.box / 2) / (self.box // 2 - 1)

    @property
    def sgd_resolution_A(self) -> float:
        """Where the SGD phase stops: the settings' SGD resolution, or the maximum resolution if coarser."""
        target = self.settings.sgd_resolution_A
        if self.settings.max_resolution_A is not None:
            target = max(target, self.settings.max_resolution_A)
        return target

    def radius(self, resolution_A: float) -> float:
        """Fourier radius of a resolution, at most :attr:`r_limit`."""
        return min(self.box * self.pixel_size_A / resolution_A, float(self.r_limit))

    def resolution_A(self, radius: float) -> float:
        return self.box * self.pixel_size_A / radius

    @property
    def max_radius(self) -> float:
        """Fourier radius of the maximum resolution (Nyquist - 1 when there is none)."""
        max_resolution = self.settings.max_resolution_A
        return self.radius(max_resolution) if max_resolution else float(self.r_limit)

    @property
    def min_radius(self) -> float:
        """Fourier radius below which the search ignores frequencies (0: none)."""
        if self.settings.min_resolution_A is None:
            return 0.0
        return self.box * self.pixel_size_A / self.settings.min_resolution_A

    @property
    def sized_box(self) -> int:
        """The box the default window and max shift are fractions of: the input box, also on a crop of it."""
        return self.window_box or self.box

    def working_size(self, radius: float) -> int:
        """Size of the oversampled Fourier grid that holds a band of ``radius``."""
        n_work = min(self.box, 8 * math.ceil((2 * radius + 6) / 8))
        return self.settings.oversampling * n_work

    @property
    def mask_radius_px(self) -> float:
        """The SGD's real-space window: the setting, else 0.45 box or, when the particle's size was measured,
        :data:`.particle_size.MASK_PER_R50` times its R50 if that is smaller."""
        if self.settings.mask_radius_A is not None:
            return self.settings.mask_radius_A / self.pixel_size_A
        if self.particle_r50_px is None:
            return 0.45 * self.sized_box
        return min(0.45 * self.sized_box, MASK_PER_R50 * self.particle_r50_px)

    @property
    def r50_px(self) -> float:
        """The particle's R50 (pixels): measured, else the window's radius / :data:`.particle_size.MASK_PER_R50`."""
        return self.particle_r50_px or self.mask_radius_px / MASK_PER_R50

    @property
    def max_shift_px(self) -> float:
        """Largest shift searched: the setting, else 0.1 box or 0.3 of the mask radius if that is smaller."""
        if self.settings.max_shift_A is not None:
            return self.settings.max_shift_A / self.pixel_size_A
        return max(2.0, min(0.1 * self.sized_box, 0.3 * self.mask_radius_px))

    @property
    def window_edge_px(self) -> float:
        """Width of the window's soft edge (:func:`.sgd.apply_constraints`): the model is zero beyond
        :attr:`mask_radius_px` plus this."""
        return max(2.0, 0.1 * self.mask_radius_px)

    @property
    def crop_box(self) -> int:
        """The SGD's real-space image box: the smallest even size with no prime factor above 5 that holds the
        model's support (window and its soft edge) moved by the max shift, at most the box.

        A model confined to the window, projected at any searched shift, stays inside the crop: the images
        lose only what lies outside the window (noise, and the CTF's delocalised signal beyond the edge).
        """
        need = 2.0 * (self.mask_radius_px + self.window_edge_px + self.max_shift_px)
        size = max(2, 2 * math.ceil(need / 2))
        while not _small_primes(size):
            size += 2
        return min(self.box, size)

    def cropped(self, box: int) -> MapGeometry:
        """The geometry of images cropped in real space to ``box`` (same pixel size, same window and shift)."""
        return replace(self, box=box, window_box=self.sized_box if box != self.sized_box else None)

    def uncropped(self) -> MapGeometry:
        """The geometry of the input box this one is a crop of (itself when it is not a crop)."""
        return replace(self, box=self.sized_box, window_box=None)


def _small_primes(n: int) -> bool:
    """True when n has no prime factor above 5 (sizes FFTs are fast at)."""
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1
