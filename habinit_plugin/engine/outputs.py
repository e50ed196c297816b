"""The output folder of a job: its file names, the atomic write, JSON, the FSC schema.

Standard library only: the Scipion process reads the names and the FSC here without
loading the numerical engine. Every file of a job is written under a temporary name and
renamed (:func:`atomic_write`), and ``run.json`` is written last with status "finished":
a folder whose run.json is missing or says otherwise holds no complete result.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HALF_MAP_A = "half_map_A.mrc"
HALF_MAP_B = "half_map_B.mrc"
HALF_MAPS = {"A": HALF_MAP_A, "B": HALF_MAP_B}
MAP = "map.mrc"  # the average of the half maps (habinit run), or the one map (habinit abinit)
MASK = "mask.mrc"  # the soft solvent mask of the masked FSC (engine/solvent_mask.py)
PARTICLES_STAR = "particles.star"
PARTICLES_CS = "particles.cs"  # the same particles for cryoSPARC (cryosparc.py)
UNUSED_PARTICLES_STAR = "unused_particles.star"
FSC_JSON = "fsc.json"
FSC_STAR = "fsc.star"
RUN_JSON = "run.json"
CHECKPOINT = "checkpoint"
LOCK = "habinit.lock"  # held while a job runs in the folder (folder_lock.py)
PLOTS = {
    "fsc": "fsc.png",
    "history": "resolution_per_iteration.png",
    "angular": "angular_distribution.png",
    "slices": "half_map_slices.png",
}
RUN_FILES = (
    HALF_MAP_A,
    HALF_MAP_B,
    MAP,
    MASK,
    PARTICLES_STAR,
    PARTICLES_CS,
    UNUSED_PARTICLES_STAR,
    FSC_JSON,
    FSC_STAR,
    *PLOTS.values(),
)


def map_at_iteration(iteration: int) -> str:
    """The map ``habinit abinit --save-every`` writes after ``iteration`` SGD iterations."""
    return f"map_iteration_{iteration:04d}.mrc"


# --------------------------------------------------------------------------- writing


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is synced and renamed to ``path``.

    The temporary name keeps the extension (``x.mrc`` -> ``x.tmp.mrc``) for writers that
    look at it. On an error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_safe(value):
    """``value`` with arrays and NumPy scalars as lists and numbers, NaN and inf as None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # NumPy / CuPy arrays and scalars
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: dict) -> None:
    """Write JSON atomically; NaN and inf become null (valid JSON)."""
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(json_safe(data), f, indent=1)


class OutputError(ValueError):
    """An output or checkpoint file that cannot be read."""


class ResultError(ValueError):
    """A result that must not be written as finished (a map with NaN voxels, a NaN FSC)."""


def read_json(path: str | Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputError(f"{path}: cannot read ({exc})") from exc


def clear_completion(out: str | Path) -> None:
    """Remove run.json before anything else is rewritten, so a kill cannot leave a stale 'finished'."""
    (Path(out) / RUN_JSON).unlink(missing_ok=True)


def existing_outputs(out: str | Path) -> list[str]:
    """The job files (:data:`RUN_FILES`) present in ``out``."""
    return [name for name in RUN_FILES if (Path(out) / name).exists()]


# ------------------------------------------------------------------------ FSC schema


def fsc_report(curve, pixel_size: float, resolution_0143: float, resolution_05: float) -> dict:
    """fsc.json: resolutions (A) and the curve per shell (shell k at k / (box * pixel size) 1/A).

    curve: FSC per shell, shells 0 .. box/2. The same schema for ``habinit run``,
    ``abinit``, ``reconstruct`` and ``fsc --json``, so the viewer can plot any of them.
    """
    curve = [float(c) for c in curve]
    box = 2 * (len(curve) - 1)
    rows = [
        {"shell": k, "resolution_A": (box * pixel_size / k if k > 0 else None), "fsc": round(c, 6)}
        for k, c in enumerate(curve)
    ]
    return {
        "resolution_0143": resolution_0143,
        "resolution_05": resolution_05,
        "pixel_size": pixel_size,
        "box": box,
        "curve": rows,
    }


FSC_STAR_COLUMNS = ["rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution", "rlnFourierShellCorrelation"]
# RELION post-processing's names for the masked curves, added when fsc.json has a "masked" entry
FSC_STAR_MASKED_COLUMNS = {
    "fsc": "rlnFourierShellCorrelationCorrected",
    "fsc_masked": "rlnFourierShellCorrelationMaskedMaps",
    "fsc_phase_randomised": "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps",
}


def fsc_star_columns(report: dict) -> list[str]:
    """The columns of fsc.star's ``data_fsc`` block: :data:`FSC_STAR_COLUMNS`, then the masked curves' if any."""
    return FSC_STAR_COLUMNS + (list(FSC_STAR_MASKED_COLUMNS.values()) if report.get("masked") else [])


def fsc_star_rows(report: dict) -> list[list[str]]:
    """Rows of the ``data_fsc`` block of fsc.star (RELION's columns, :func:`fsc_star_columns`)."""
    masked = report.get("masked") or {}
    rows = []
    for k, r in enumerate(report["curve"]):
        res = r["resolution_A"]
        frequency, angstrom = (0.0, 999.0) if res is None else (1.0 / res, res)
        row = [str(r["shell"]), f"{frequency:.6f}", f"{angstrom:.4f}", f"{r['fsc']:.6f}"]
        if masked:
            row += [f"{masked['curve'][k][key]:.6f}" for key in FSC_STAR_MASKED_COLUMNS]
        rows.append(row)
    return rows


def fsc_curve(report: dict) -> tuple[list[float], list[float]]:
    """(spatial frequency in 1/A, FSC) per shell of an fsc.json report (or of its "masked" entry)."""
    frequency = [0.0 if r["resolution_A"] is None else 1.0 / r["resolution_A"] for r in report["curve"]]
    return frequency, [r["fsc"] for r in report["curve"]]


def masked_resolution_line(fsc_json: str | Path) -> str | None:
    """The summary's line on the masked resolution of a run's fsc.json, or None (no file, no masked FSC)."""
    try:
        masked = read_json(fsc_json).get("masked")
    except OutputError:
        return None
    if not masked:
        return None
    mask = masked["mask"]
    return (
        f"Masked resolution: {masked['resolution_0143']:.2f} A at FSC 0.143 ({masked['resolution_05']:.2f} A at "
        f"0.5), with a soft mask made from the half maps ({100 * mask['box_fraction_any_weight']:.0f}% of the box, "
        f"{MASK}) and corrected by phase randomisation, as RELION post-processing reports it."
    )
