"""The gold-standard job on symmetric particles, with and without the symmetry imposed.

    python bench/symmetry.py                       # C2, D2 and O sets, one seed each, and O in C1
    python bench/symmetry.py --seeds 3 --sets c2_64_snr0.05

The sets (bench/common.py) are copies of a core of the bundled protein placed by the group's
operators (``habinit simulate --symmetry``), box 64. Per run, as bench/gold_standard.py: each half
map's FSC 0.5 against the truth beside the known-pose reconstruction of the same half with the same
symmetry, the hand, the GS-FSC against the full map's FSC vs truth, the median pose error (modulo the
particle's group) and the wall time. Writes bench/results/symmetry_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import dataset, machine, run_child, symmetry_of  # noqa: E402
from gold_standard import _checks, _table  # noqa: E402

GOLD_STANDARD = str(Path(__file__).parent / "gold_standard.py")
RESULTS = Path(__file__).parent / "results" / "symmetry_cpu.md"
SPEED = Path(__file__).parent / "results" / "symmetry_search_speed_cpu.md"
RUNS = Path(__file__).parent / "results" / "symmetry_runs.jsonl"  # kept in git: the table is rebuilt from every run
SETS = ("c2_64_snr0.05", "d2_64_snr0.05", "o_64_snr0.1")


def search_speed(repeats: int = 3) -> str:
    """Time of one global pose search (200 images of the O set at its SGD-end band) per point group."""
    from habinit_plugin.engine.abinit import AbinitRun
    from habinit_plugin.engine.mrc import read_map
    from habinit_plugin.engine.particles import load_particles
    from habinit_plugin.engine.pose_search import global_search
    from habinit_plugin.engine.projector import volume_to_grid
    from habinit_plugin.engine.search_policy import global_settings
    from habinit_plugin.engine.settings import AbinitSettings
    from habinit_plugin.engine.symmetry import group_order

    folder = dataset("o_64_snr0.1")
    particles = load_particles(folder / "particles.star")
    grid = volume_to_grid(read_map(folder / "gt_map.mrc")[0], 2)
    lines = [
        "| symmetry | order | coarse level (s) | speed-up | whole search (s) | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = None
    for name in ("C1", "C2", "D2", "O", "I"):
        run = AbinitRun(particles, AbinitSettings(symmetry=name, c1_fraction=0.0))
        radius = run.geometry.radius(10.0)
        batch = run.image_batch(np.arange(200), radius)
        settings = global_settings(run.geometry, radius, run.device_bytes)
        coarse_only = replace(settings, final_level=settings.coarse_level)
        times = []
        for search in (coarse_only, settings):
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                global_search(grid, 2, batch, search)
                runs.append(time.perf_counter() - t0)
            times.append(min(runs))
        base = base or times
        lines.append(
            f"| {name} | {group_order(name)} | {times[0]:.2f} | {base[0] / times[0]:.1f} | {times[1]:.2f} | "
            f"{base[1] / times[1]:.1f} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(SETS))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--no-c1", action="store_true", help="leave out the C1 job on the O set")
    p.add_argument("--jobs", nargs="+", metavar="SET:SYMMETRY:SEED", help="these runs only (SYMMETRY: O, C1, O+after)")
    p.add_argument("--search-speed", action="store_true", help="only time the pose search per point group")
    args = p.parse_args()
    if args.search_speed:
        table = search_speed()
        SPEED.write_text(
            f"# Pose search per point group (bench/symmetry.py --search-speed)\n\nMachine: {machine()}.\n\n{table}\n"
        )
        print(table)
        return
    jobs = [(name, symmetry_of(name), seed) for name in args.sets for seed in range(args.seeds)]
    if not args.no_c1 and "o_64_snr0.1" in args.sets:
        jobs.append(("o_64_snr0.1", "C1", 0))
    if args.jobs:
        jobs = [(name, symmetry, int(seed)) for name, symmetry, seed in (j.split(":") for j in args.jobs)]
    for name, symmetry, seed in jobs:
        r = run_child([GOLD_STANDARD, "--one", name, str(seed), symmetry])
        r.setdefault("dataset", name), r.setdefault("symmetry", symmetry), r.setdefault("seed", seed)
        with RUNS.open("a") as f:  # every run is kept: a session may end at any moment
            f.write(json.dumps(r) + "\n")
        print(_table([r]).splitlines()[-1], flush=True)
        write_results()


def write_results() -> None:
    """The table of every run in RUNS (the latest of each set, symmetry and seed), by set."""
    latest = {}
    for line in RUNS.read_text().splitlines():
        r = json.loads(line)
        latest[(r["dataset"], r["symmetry"], r["seed"])] = r
    runs = sorted(latest.values(), key=lambda r: (r["dataset"], r["symmetry"], r["seed"]))
    imposed = [r for r in runs if r["symmetry"] != "C1"]
    ok = sum("error" not in r and all(_checks(r).values()) for r in imposed)
    axes = [f"{r['dataset']} {r['symmetry']} seed {r['seed']}: {r['axes_error_deg']:.2f}" for r in runs
            if "axes_error_deg" in r]  # fmt: skip
    text = (
        f"# Symmetric particles (bench/symmetry.py)\n\nMachine: {machine()}.\n\n"
        f"{ok}/{len(imposed)} runs with the symmetry imposed pass every check.\n\n{_table(runs)}\n\n"
        f"Degrees between each map's rotation onto the truth and the nearest rotation that keeps the truth's "
        f"axes: {'; '.join(axes)}.\n"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
