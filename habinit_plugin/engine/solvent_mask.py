"""A soft solvent mask made from the half maps, and the masked FSC corrected by phase randomisation.

The unmasked gold-standard FSC counts the solvent's noise: in a box much larger than the particle
it reads a coarser resolution than RELION post-processing or cryoSPARC's masked curves. This module
gives the masked curve beside it, made the way those programs make theirs:

* the mask (:func:`solvent_mask`): the average of the two half maps, low-pass filtered to
  ``LOWPASS_A`` (or to the gold-standard resolution when that is coarser), is thresholded at
  ``solvent level + max(THRESHOLD_FRACTION_OF_MAX x (maximum - solvent level), NOISE_SIGMAS x noise sd)``,
  where the solvent level is the median of the filtered map (the particle fills less than half the
  box) and the noise sd is that of the filtered half difference (A - B) / 2, the noise of the filtered
  average; the voxels above are extended by ``EXTEND_A`` and given a raised-cosine edge
  ``SOFT_EDGE_A`` wide (RELION's relion_mask_create: threshold, --extend_inimask, --width_soft_edge;
  cryoSPARC's dynamic mask: threshold, near, far);
* the corrected FSC (:func:`masked_fsc`), Chen et al. (2013), as relion_postprocess: the phases of
  both half maps are randomised beyond the first shell where the unmasked FSC falls below
  ``RANDOMISE_BELOW_FSC``, the randomised maps are masked, and beyond that shell (plus
  ``CORRECT_AFTER_SHELLS``) FSC_true = (FSC_masked - FSC_random) / (1 - FSC_random), so that
  correlation brought in by the mask itself is taken out.

Maps are (N, N, N) float arrays indexed [z, y, x], N even; curves are per integer Fourier shell
0..N/2, as :func:`.fsc.fsc`. NumPy only (the job's maps are on the host when outputs are written).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import fft_kwargs, fft_module
from .fsc import fsc, resolution_at

log = logging.getLogger("habinit")

LOWPASS_A = 15.0  # RELION's and cryoSPARC's usual low-pass for a mask
LOWPASS_EDGE_SHELLS = 2  # raised-cosine width of the low-pass, shells
THRESHOLD_FRACTION_OF_MAX = 0.1  # of the filtered average's maximum above the solvent level
NOISE_SIGMAS = 4.0  # the threshold is at least this many noise sd of the filtered average
EXTEND_A = 6.0  # cryoSPARC's dynamic mask 'near'; RELION's 3 px at 2 A/px
MIN_EXTEND_PX = 2
SOFT_EDGE_A = 8.0  # cryoSPARC's 'far' - 'near' (14 - 6 A)
MIN_SOFT_EDGE_PX = 3
RANDOMISE_BELOW_FSC = 0.8  # relion_postprocess --randomize_at_fsc
CORRECT_AFTER_SHELLS = 2  # relion_postprocess corrects from 2 shells beyond the randomised one
PHASE_SEED = 0
PHASE_STREAM = 2013  # the random phases' own stream: np.random.default_rng([seed, PHASE_STREAM])


@dataclass(frozen=True)
class SolventMask:
    """A soft mask (N, N, N) float32 in [0, 1] and how it was made (density in the maps' units)."""

    mask: np.ndarray
    lowpass_A: float
    solvent_level: float
    threshold: float
    noise_sd: float
    extend_px: int
    soft_edge_px: int
    pixel_size: float

    @property
    def full_fraction(self) -> float:
        """Fraction of the box at full weight (mask 1)."""
        return float(np.mean(self.mask >= 1.0))

    @property
    def any_fraction(self) -> float:
        """Fraction of the box with any weight (mask > 0), the soft edge included."""
        return float(np.mean(self.mask > 0.0))

    def describe(self) -> dict:
        """The mask's parameters for fsc.json (lengths in A and px, fractions of the box)."""
        return {
            "lowpass_A": self.lowpass_A,
            "solvent_level": self.solvent_level,
            "threshold": self.threshold,
            "threshold_rule": (
                f"solvent level (median) + max({THRESHOLD_FRACTION_OF_MAX:g} x (maximum - solvent level), "
                f"{NOISE_SIGMAS:g} noise sd of the filtered average)"
            ),
            "noise_sd": self.noise_sd,
            "extend_px": self.extend_px,
            "extend_A": self.extend_px * self.pixel_size,
            "soft_edge_px": self.soft_edge_px,
            "soft_edge_A": self.soft_edge_px * self.pixel_size,
            "box_fraction_full_weight": self.full_fraction,
            "box_fraction_any_weight": self.any_fraction,
        }


@dataclass(frozen=True)
class MaskedFSC:
    """Curves (N/2 + 1,) per shell: corrected, as masked, of the phase-randomised masked maps."""

    corrected: np.ndarray
    masked: np.ndarray
    phase_randomised: np.ndarray
    randomise_from_shell: int


# ------------------------------------------------------------------------------ the mask


def shell_radius(box: int) -> np.ndarray:
    """(N, N, N//2 + 1) float32: the Fourier radius (shells) of each coefficient of ``np.fft.rfftn``."""
    kz = np.fft.fftfreq(box, 1.0 / box).astype(np.float32)
    kx = np.fft.rfftfreq(box, 1.0 / box).astype(np.float32)
    return np.sqrt(kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2)


def lowpass(volume: np.ndarray, resolution_A: float, pixel_size: float) -> np.ndarray:
    """``volume`` (N, N, N) low-pass filtered to ``resolution_A``: 1 up to that shell, a raised cosine
    ``LOWPASS_EDGE_SHELLS`` wide beyond it. Returns (N, N, N) float32."""
    box = volume.shape[0]
    cutoff = box * pixel_size / resolution_A
    edge = np.clip((shell_radius(box) - cutoff) / LOWPASS_EDGE_SHELLS, 0.0, 1.0)
    fft = fft_module(np)
    spectrum = fft.rfftn(volume.astype(np.float32), **fft_kwargs(np)) * (0.5 + 0.5 * np.cos(np.pi * edge))
    return fft.irfftn(spectrum, s=volume.shape, **fft_kwargs(np)).astype(np.float32)


def mask_lowpass_A(pixel_size: float, gold_standard_A: float | None = None) -> float:
    """The mask's low-pass (A): ``LOWPASS_A``, or the gold-standard resolution when coarser, and at least
    the Nyquist resolution."""
    return max(LOWPASS_A, gold_standard_A or 0.0, 2.0 * pixel_size)


def mask_threshold(filtered_average: np.ndarray, filtered_half_difference: np.ndarray) -> tuple[float, float, float]:
    """(threshold, solvent level, noise sd) for the filtered average (N, N, N), from its median, its
    maximum and the sd of the filtered half difference (N, N, N); see the module doc."""
    solvent = float(np.median(filtered_average))
    noise_sd = float(np.std(filtered_half_difference))
    height = float(filtered_average.max()) - solvent
    return solvent + max(THRESHOLD_FRACTION_OF_MAX * height, NOISE_SIGMAS * noise_sd), solvent, noise_sd


def soft_extend(seed: np.ndarray, extend_px: float, soft_edge_px: float) -> np.ndarray:
    """Mask (N, N, N) float32: 1 within ``extend_px`` of a voxel of ``seed`` (N, N, N) bool, falling as a
    raised cosine to 0 over the next ``soft_edge_px``."""
    from scipy.ndimage import distance_transform_edt

    if not seed.any():
        return np.zeros(seed.shape, np.float32)
    distance = distance_transform_edt(~seed).astype(np.float32)
    edge = np.clip((distance - extend_px) / max(soft_edge_px, 1e-6), 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * edge)).astype(np.float32)


def solvent_mask(
    map_a: np.ndarray, map_b: np.ndarray, pixel_size: float, gold_standard_A: float | None = None
) -> SolventMask:
    """The soft mask of the particle in half maps ``map_a``, ``map_b`` (N, N, N), pixel size in A;
    ``gold_standard_A`` (their FSC 0.143 resolution) coarsens the low-pass when coarser than 15 A."""
    lowpass_A = mask_lowpass_A(pixel_size, gold_standard_A)
    average = lowpass(0.5 * (map_a + map_b), lowpass_A, pixel_size)
    difference = lowpass(0.5 * (map_a - map_b), lowpass_A, pixel_size)
    threshold, solvent, noise_sd = mask_threshold(average, difference)
    extend_px = max(MIN_EXTEND_PX, round(EXTEND_A / pixel_size))
    soft_edge_px = max(MIN_SOFT_EDGE_PX, round(SOFT_EDGE_A / pixel_size))
    mask = soft_extend(average > threshold, extend_px, soft_edge_px)
    return SolventMask(mask, lowpass_A, solvent, threshold, noise_sd, extend_px, soft_edge_px, pixel_size)


# ------------------------------------------------------------------- the corrected FSC


def randomise_from_shell(unmasked: np.ndarray, below: float = RANDOMISE_BELOW_FSC) -> int:
    """The first shell (>= 1) where the unmasked FSC (N/2 + 1,) falls below ``below``; N/2 if it never does
    (then nothing is corrected: relion_postprocess stops with an error instead)."""
    under = np.flatnonzero(np.asarray(unmasked[1:]) < below)
    return int(under[0]) + 1 if len(under) else len(unmasked) - 1


def randomise_phases_beyond(volume: np.ndarray, shell: int, rng: np.random.Generator) -> np.ndarray:
    """``volume`` (N, N, N) with the phases of every Fourier coefficient in shell ``shell`` and beyond (radius
    rounded) made random, amplitudes kept. The phases are those of a real white-noise volume, so the
    result is real (Hermitian symmetry kept). Returns (N, N, N) float32."""
    fft, kwargs = fft_module(np), fft_kwargs(np)
    spectrum = fft.rfftn(volume.astype(np.float32), **kwargs)
    noise = fft.rfftn(rng.standard_normal(volume.shape, dtype=np.float32), **kwargs)
    beyond = np.rint(shell_radius(volume.shape[0])) >= shell
    spectrum[beyond] = np.abs(spectrum[beyond]) * noise[beyond] / np.maximum(np.abs(noise[beyond]), 1e-30)
    return fft.irfftn(spectrum, s=volume.shape, **kwargs).astype(np.float32)


def corrected_fsc(masked: np.ndarray, phase_randomised: np.ndarray, from_shell: int) -> np.ndarray:
    """Chen et al. (2013): (masked - random) / (1 - random) from shell ``from_shell`` on, 0 where the
    random curve is the higher, the masked curve before. Curves (N/2 + 1,); returns the same."""
    out = np.array(masked, dtype=np.float64)
    random = np.asarray(phase_randomised, dtype=np.float64)[from_shell:]
    tail = out[from_shell:]
    out[from_shell:] = np.where(random > tail, 0.0, (tail - random) / np.maximum(1.0 - random, 1e-6))
    return out


def masked_fsc(
    map_a: np.ndarray, map_b: np.ndarray, mask: np.ndarray, unmasked: np.ndarray, seed: int = PHASE_SEED
) -> MaskedFSC:
    """The FSC of the half maps (N, N, N) under ``mask`` (N, N, N), corrected by phase randomisation
    beyond where the ``unmasked`` FSC (N/2 + 1,) falls below ``RANDOMISE_BELOW_FSC``."""
    shell = randomise_from_shell(unmasked)
    rng = np.random.default_rng([seed, PHASE_STREAM])
    as_masked = fsc(map_a, map_b, mask)
    randomised = fsc(randomise_phases_beyond(map_a, shell, rng), randomise_phases_beyond(map_b, shell, rng), mask)
    corrected = corrected_fsc(as_masked, randomised, shell + CORRECT_AFTER_SHELLS)
    return MaskedFSC(corrected, as_masked, randomised, shell)


# ------------------------------------------------------------------------- fsc.json, log


def masked_fsc_report(curves: MaskedFSC, solvent: SolventMask) -> dict:
    """fsc.json's "masked" entry: resolutions (A) of the corrected curve, the mask, and the curves per shell
    (``fsc`` corrected, ``fsc_masked`` as masked, ``fsc_phase_randomised``)."""
    px = solvent.pixel_size
    box = 2 * (len(curves.corrected) - 1)
    rows = [
        {
            "shell": k,
            "resolution_A": (box * px / k if k > 0 else None),
            "fsc": round(float(curves.corrected[k]), 6),
            "fsc_masked": round(float(curves.masked[k]), 6),
            "fsc_phase_randomised": round(float(curves.phase_randomised[k]), 6),
        }
        for k in range(len(curves.corrected))
    ]
    return {
        "resolution_0143": resolution_at(curves.corrected, 0.143, px),
        "resolution_05": resolution_at(curves.corrected, 0.5, px),
        "randomised_from_shell": curves.randomise_from_shell,
        "randomised_from_A": box * px / curves.randomise_from_shell,
        "mask": solvent.describe(),
        "curve": rows,
    }


def mask_and_masked_fsc(
    out: Path, map_a: np.ndarray, map_b: np.ndarray, unmasked: np.ndarray, pixel_size: float, mask_name: str
) -> dict | None:
    """Make the solvent mask of the half maps (N, N, N), write it as ``out / mask_name``, log it, and return
    fsc.json's "masked" entry (:func:`masked_fsc_report`); ``unmasked`` is their FSC (N/2 + 1,). None, with
    a warning logged and no mask file, when no density stands above the threshold (maps of noise)."""
    from .mrc import write_map

    gold_standard_A = resolution_at(unmasked, 0.143, pixel_size)
    solvent = solvent_mask(map_a, map_b, pixel_size, gold_standard_A)
    if solvent.full_fraction == 0.0:
        (out / mask_name).unlink(missing_ok=True)
        log.warning(
            f"warning: no density of the half maps' average stands {NOISE_SIGMAS:g} noise sd above the solvent at "
            f"{solvent.lowpass_A:.1f} A: no solvent mask and no masked FSC"
        )
        return None
    write_map(out / mask_name, solvent.mask, pixel_size)
    report = masked_fsc_report(masked_fsc(map_a, map_b, solvent.mask, unmasked), solvent)
    log.info(
        f"solvent mask ({mask_name}): the half maps' average low-pass filtered to {solvent.lowpass_A:.1f} A, "
        f"threshold {solvent.threshold:.4g} (solvent {solvent.solvent_level:.3g} + max({THRESHOLD_FRACTION_OF_MAX:g}"
        f" of the maximum, {NOISE_SIGMAS:g} noise sd {solvent.noise_sd:.3g})), extended by {solvent.extend_px} px "
        f"({solvent.extend_px * pixel_size:.1f} A), soft cosine edge {solvent.soft_edge_px} px "
        f"({solvent.soft_edge_px * pixel_size:.1f} A); {100 * solvent.full_fraction:.1f}% of the box at full "
        f"weight, {100 * solvent.any_fraction:.1f}% with the edge"
    )
    log.info(
        f"masked FSC (phases randomised beyond {report['randomised_from_A']:.1f} A, corrected as Chen et al. 2013): "
        f"0.143 at {report['resolution_0143']:.2f} A, 0.5 at {report['resolution_05']:.2f} A; unmasked 0.143 at "
        f"{gold_standard_A:.2f} A"
    )
    return report
