"""Comparison of a result with the ground truth of a simulated data set.

A map from scratch is defined up to a rotation, a translation and the hand, so it is
first aligned onto the true map (:func:`align3d.align_maps`); its poses are moved by
the same transform before the angular errors are measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .align3d import Alignment, align_maps, apply_to_poses, transform_map
from .backend import to_numpy
from .fsc import fsc, resolution_at
from .symmetry import distance_modulo


@dataclass
class TruthComparison:
    """Resolutions in Angstrom, angles in degrees, shifts in pixels."""

    alignment: Alignment
    fsc: np.ndarray
    resolution_05: float
    resolution_0143: float
    median_angle_error: float | None = None
    median_shift_error: float | None = None

    def to_dict(self) -> dict:
        return {
            "truth_resolution_05": self.resolution_05,
            "truth_resolution_0143": self.resolution_0143,
            "median_angle_error_deg": self.median_angle_error,
            "median_shift_error_px": self.median_shift_error,
            "mirrored": self.alignment.mirrored,
        }


def compare_to_truth(
    volume: np.ndarray,
    truth: np.ndarray,
    pixel_size: float,
    rotations: np.ndarray | None = None,
    origins: np.ndarray | None = None,
    true_rotations: np.ndarray | None = None,
    true_origins: np.ndarray | None = None,
    alignment: Alignment | None = None,
    xp=np,
    symmetry: str = "C1",
) -> TruthComparison:
    """Align ``volume`` (N, N, N) onto ``truth`` and measure FSC and pose errors.

    rotations (P, 3, 3) and origins (P, 2) (pixels) are the poses found for the
    particles whose true poses are ``true_rotations``/``true_origins``. Pass
    ``alignment`` to reuse a transform found before. The maps are aligned on ``xp``'s device.
    """
    alignment = alignment or align_maps(truth, volume, pixel_size, xp=xp)
    aligned = to_numpy(transform_map(xp.asarray(volume, dtype=xp.float32), alignment))
    curve = fsc(aligned, truth)
    result = TruthComparison(
        alignment, curve, resolution_at(curve, 0.5, pixel_size), resolution_at(curve, 0.143, pixel_size)
    )
    if rotations is not None and true_rotations is not None:
        moved, moved_origins = apply_to_poses(alignment, rotations, origins)
        result.median_angle_error = float(np.median(distance_modulo(moved, true_rotations, symmetry)))
        if true_origins is not None:
            result.median_shift_error = float(np.median(np.linalg.norm(moved_origins - true_origins, axis=1)))
    return result
