"""The files a finished job leaves in its output folder.

``run.json`` is written last, with status "finished": a folder whose run.json is
missing or says otherwise holds no complete result, whatever other files it has.
Each file is itself written atomically (temporary name, then rename).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import plots
from .checkpoint import write_json
from .fsc import shell_frequencies
from .mrc import write_map
from .particles import ParticleSet, write_particles_star
from .refine import JobResult
from .star import StarBlock, write_star

MAPS = ("half_map_A.mrc", "half_map_B.mrc", "map.mrc")
FILES = (
    *MAPS,
    "particles.star",
    "unused_particles.star",
    "fsc.json",
    "fsc.star",
    "fsc.png",
    "resolution_per_iteration.png",
    "angular_distribution.png",
    "half_map_slices.png",
)


def fsc_report(curve: np.ndarray, pixel_size: float, resolution_0143: float, resolution_05: float) -> dict:
    """fsc.json content: resolutions (A) and the curve per shell."""
    box = 2 * (len(curve) - 1)
    freq = shell_frequencies(box, pixel_size)
    rows = [
        {"shell": i, "resolution_A": (1.0 / f if f > 0 else None), "fsc": round(float(c), 6)}
        for i, (f, c) in enumerate(zip(freq, curve))
    ]
    return {
        "resolution_0143": resolution_0143,
        "resolution_05": resolution_05,
        "pixel_size": pixel_size,
        "box": box,
        "curve": rows,
    }


def _fsc_block(report: dict) -> StarBlock:
    rows = []
    for r in report["curve"]:
        res = r["resolution_A"]
        values = (0.0, 999.0) if res is None else (1.0 / res, res)
        rows.append([str(r["shell"]), f"{values[0]:.6f}", f"{values[1]:.4f}", f"{r['fsc']:.6f}"])
    columns = ["rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution", "rlnFourierShellCorrelation"]
    return StarBlock("fsc", columns, rows)


def clear_completion(out: Path) -> None:
    """Remove run.json before anything else is rewritten, so a kill cannot leave a stale 'finished'."""
    (out / "run.json").unlink(missing_ok=True)


def write_outputs(out: Path, particles: ParticleSet, result: JobResult, run_info: dict) -> dict:
    """Write every output file of a job, run.json last; returns run.json's content."""
    clear_completion(out)
    px = particles.pixel_size
    map_a, map_b = result.maps["A"], result.maps["B"]
    write_map(out / "half_map_A.mrc", map_a, px)
    write_map(out / "half_map_B.mrc", map_b, px)
    write_map(out / "map.mrc", 0.5 * (map_a + map_b), px)
    write_particles_star(
        out / "particles.star", particles, result.used, result.rotations, result.origins, result.half_set
    )
    unused_path = out / "unused_particles.star"
    if len(result.unused):
        write_particles_star(unused_path, particles, result.unused)
    else:
        unused_path.unlink(missing_ok=True)
    report = fsc_report(result.fsc, px, result.resolution_0143, result.resolution_05)
    write_json(out / "fsc.json", report)
    write_star(out / "fsc.star", [_fsc_block(report)])
    history = {"history": result.history, "resolution_0143": result.resolution_0143}
    plots.write_pngs(out, report, history, result.rotations, map_a, map_b)
    info = dict(
        run_info,
        status="finished",
        resolution_0143=result.resolution_0143,
        resolution_05=result.resolution_05,
        n_input=len(particles),
        n_used=len(result.used),
        n_unused=len(result.unused),
        alignment_B_to_A=result.alignment.to_dict(),
        history=result.history,
        timings=result.timings,
        warnings=result.warnings,
        outputs=[name for name in FILES if (out / name).exists()],
    )
    write_json(out / "run.json", info)
    return info
