"""Which pose search at which band: Hopf levels, shift grids, local and posterior neighbourhoods.

One policy for the SGD phase and the full passes, from a map's geometry and a search band
``radius`` (Fourier pixels). ``device_bytes`` is the device memory for one chunk's candidate
projections (:func:`.gpu_budget.candidate_bytes`).
"""

from __future__ import annotations

import math

import numpy as np

from .geometry import MapGeometry
from .pose_search import LocalSettings, NeighbourhoodSettings, SearchSettings
from .so3 import grid_spacing


def global_settings(geometry: MapGeometry, radius: float, device_bytes: float) -> SearchSettings:
    """Hopf levels (down to about 1/radius radians), band and shift grid of a global search."""
    target = math.degrees(1.0 / max(radius, 1.0))
    final_level = int(np.clip(math.ceil(math.log2(60.0 / target)), 2, 6))
    coarse_radius = min(radius, max(6.0, 0.6 * radius))
    step = float(np.clip(geometry.box / (4.0 * coarse_radius), 1.0, geometry.max_shift_px / 2))
    return SearchSettings(
        coarse_level=2,
        final_level=final_level,
        beam=geometry.settings.beam,
        max_shift_px=geometry.max_shift_px,
        coarse_shift_step_px=step,
        coarse_radius=coarse_radius,
        final_radius=radius,
        min_radius=geometry.min_radius,
        device_bytes=device_bytes,
        scale_invariant=geometry.settings.scale_invariant_search,
        symmetry=geometry.settings.symmetry,
    )


def final_spacing_deg(geometry: MapGeometry, radius: float) -> float:
    """Angular spacing of the finest level of a global search at ``radius``."""
    return grid_spacing(global_settings(geometry, radius, 0.0).final_level)


def local_settings(geometry: MapGeometry, radius: float, device_bytes: float) -> LocalSettings:
    """Local search around the current poses: first step twice the global search's finest spacing."""
    return LocalSettings(
        angle_step_deg=2.0 * final_spacing_deg(geometry, radius),
        shift_step_px=1.0,
        n_levels=4,
        radius=radius,
        min_radius=geometry.min_radius,
        max_shift_px=geometry.max_shift_px,
        device_bytes=device_bytes,
    )


def posterior_settings(geometry: MapGeometry, radius: float, device_bytes: float) -> NeighbourhoodSettings:
    """Neighbourhood for marginalisation: the finest search grid's step, 2.2 steps in every
    direction (33 rotations, about +-4 degrees at 5 A), times half-pixel shifts, the most
    probable ``marginal_poses_final`` poses kept.

    At SNR 0.05 a narrower one (half the step, 12 poses) kept only a third of the gain.
    """
    step = final_spacing_deg(geometry, radius)
    return NeighbourhoodSettings(
        angle_step_deg=step,
        angle_radius_deg=2.2 * step,
        shift_step_px=0.5,
        shift_radius_px=0.8,
        keep=geometry.settings.marginal_poses_final,
        radius=radius,
        min_radius=geometry.min_radius,
        max_shift_px=geometry.max_shift_px,
        device_bytes=device_bytes,
    )
