"""Shared by the bench scripts: simulated data sets (cached in bench/out/) and the
known-pose reference reconstruction that ab initio results are compared with."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from habinit_plugin.engine import density
from habinit_plugin.engine.fsc import fsc, resolution_at
from habinit_plugin.engine.mrc import read_map
from habinit_plugin.engine.particles import load_particles
from habinit_plugin.engine.reconstruct import reconstruct_half_maps
from habinit_plugin.engine.simulate import SimulationSettings, simulate_dataset
from habinit_plugin.engine.symmetry import point_group

OUT = Path(__file__).parent / "out"

DATASETS = {
    # name: (box, pixel size A, particles, SNR, simulation seed[, point group of the particle])
    "adk64_snr0.1": (64, density.DEFAULT_PIXEL_SIZE, 5000, 0.1, 1),
    "c2_64_snr0.05": (64, density.DEFAULT_PIXEL_SIZE, 4000, 0.05, 11, "C2"),
    "d2_64_snr0.05": (64, 2.0, 4000, 0.05, 12, "D2"),
    "o_64_snr0.1": (64, 2.4, 4000, 0.1, 13, "O"),
    "adk64_snr0.05": (64, density.DEFAULT_PIXEL_SIZE, 5000, 0.05, 2),
    "adk32_snr0.3": (32, 2 * density.DEFAULT_PIXEL_SIZE, 1000, 0.3, 3),
    "adk256_snr0.1": (256, density.DEFAULT_PIXEL_SIZE / 2, 2000, 0.1, 4),
}


def dataset(name: str) -> Path:
    """Folder of the simulated set ``name`` (made on first use)."""
    box, pixel_size, n, snr, seed, *symmetry = DATASETS[name]
    folder = OUT / "data" / name
    if not (folder / "gt_poses.star").is_file():
        if symmetry:
            volume, _ = density.symmetric_protein_map(point_group(symmetry[0]), box, pixel_size)
        else:
            volume = density.bundled_protein_map(box, pixel_size)
        simulate_dataset(volume, pixel_size, folder, SimulationSettings(n_particles=n, snr=snr, seed=seed))
    return folder


def symmetry_of(name: str) -> str:
    """The point group of a data set's particle."""
    return (DATASETS[name][5:] or ("C1",))[0]


def known_pose_reference(folder: Path, rows: np.ndarray | None = None, symmetry: str = "C1") -> dict:
    """FSC 0.5 / 0.143 against the truth of the Wiener map from the true poses (all
    particles, or ``rows``), with ``symmetry`` imposed, and the gold-standard FSC of its halves."""
    key = "all" if rows is None else f"{len(rows)}-{int(np.sum(rows)) % 100003}"
    key += "" if symmetry == "C1" else f"-{symmetry}"
    cache = folder / f"known_pose_{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    particles = load_particles(folder / "gt_poses.star")
    if rows is not None:
        particles = particles.subset(rows)
    half = np.arange(len(particles)) % 2 + 1
    map_a, map_b, curve = reconstruct_half_maps(particles, half, symmetry=symmetry)
    truth, px = read_map(folder / "gt_map.mrc")
    vs_truth = fsc(0.5 * (map_a + map_b), truth)
    result = {
        "truth_05": resolution_at(vs_truth, 0.5, px),
        "truth_0143": resolution_at(vs_truth, 0.143, px),
        "gs_0143": resolution_at(curve, 0.143, px),
    }
    cache.write_text(json.dumps(result))
    return result


def machine() -> str:
    cpu = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"{platform.machine()} Linux, {cpu} cores, Python {platform.python_version()}, NumPy {np.__version__}"


def run_child(args: list[str]) -> dict:
    """Run ``python <this bench script> args`` and parse the JSON on its last stdout line
    (a separate process gives each run its own peak memory)."""
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])
