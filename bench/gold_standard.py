"""The gold-standard job (``habinit run``) on simulated sets, compared with the truth.

    python bench/gold_standard.py                  # 10 seeds on adk64_snr0.1, 2 on adk64_snr0.05
    python bench/gold_standard.py --seeds 1 --hard-seeds 0

Per seed: wall time, peak memory, time per phase, the reported gold-standard FSC
(0.143), each half map's FSC 0.5 against the truth (after aligning it to the truth)
beside the known-pose reconstruction of the same half, whether the halves came out
in the same hand, the full map's FSC 0.5 against the truth (the GS-FSC 0.143 must
lie within 15% of it) and the median pose error. Writes
bench/results/gold_standard_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, dataset, known_pose_reference, machine, run_child, symmetry_of  # noqa: E402

from habinit_plugin.engine.jobs import gold_standard_job  # noqa: E402
from habinit_plugin.engine.mrc import read_map  # noqa: E402
from habinit_plugin.engine.particles import load_particles  # noqa: E402
from habinit_plugin.engine.settings import AbinitSettings, JobSettings  # noqa: E402
from habinit_plugin.engine.truth import compare_to_truth  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gold_standard_cpu.md"


def one_run(name: str, seed: int, symmetry: str = "C1") -> dict:
    """One job on data set ``name`` with ``symmetry`` imposed ("O+after": found after a C1 SGD), compared with
    the truth."""
    folder = dataset(name)
    out = OUT / "gold_standard" / f"{name}_{symmetry}_seed{seed}"
    t0 = time.time()
    group, after = symmetry.removesuffix("+after"), symmetry.endswith("+after")
    settings = JobSettings(abinit=AbinitSettings(seed=seed, symmetry=group), symmetry_after_sgd=after)
    symmetry = group
    info = gold_standard_job(str(folder / "particles.star"), out, settings, overwrite=True)
    wall = time.time() - t0
    truth, px = read_map(folder / "gt_map.mrc")
    truth_poses = load_particles(folder / "gt_poses.star")
    found = load_particles(out / "particles.star")
    row_of = {int(i): k for k, i in enumerate(truth_poses.ids)}
    rows = np.array([row_of[int(i)] for i in found.ids])
    maps = {h: read_map(out / f"half_map_{h}.mrc")[0] for h in "AB"}
    halves = {}
    for h, value in (("A", 1), ("B", 2)):
        mine = found.half_set == value
        c = compare_to_truth(maps[h], truth, px)
        reference = known_pose_reference(folder, np.sort(rows[mine]), symmetry)
        halves[h] = {"truth_05": c.resolution_05, "known_05": reference["truth_05"], "mirrored": c.alignment.mirrored}
    full = compare_to_truth(
        0.5 * (maps["A"] + maps["B"]),
        truth,
        px,
        found.rotations,
        found.shifts,
        truth_poses.rotations[rows],
        truth_poses.shifts[rows],
        symmetry=symmetry_of(name),
    )
    return {
        "dataset": name,
        "symmetry": symmetry + ("+after" if after else ""),
        "axes_error_deg": _axes_error(full.alignment, symmetry_of(name)),
        "seed": seed,
        "wall_s": wall,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "timings": info["timings"],
        "gs_0143": info["resolution_0143"],
        "halves": halves,
        "same_hand": halves["A"]["mirrored"] == halves["B"]["mirrored"],
        "full_truth_05": full.resolution_05,
        "angle_error": full.median_angle_error,
        "n_used": info["n_used"],
    }


def _axes_error(alignment, symmetry: str) -> float:
    """Degrees between the map-to-truth rotation and the nearest one that keeps the truth's symmetry axes."""
    from habinit_plugin.engine.symmetry import distance_modulo, snap_to_normaliser

    rotation = alignment.rotation
    return float(distance_modulo(rotation, snap_to_normaliser(rotation, symmetry), "C1")[0])


def _checks(r: dict) -> dict:
    return {
        "halves within 1.3x": all(h["truth_05"] <= 1.3 * h["known_05"] for h in r["halves"].values()),
        "same hand": r["same_hand"],
        "GS-FSC within 15%": abs(r["gs_0143"] - r["full_truth_05"]) <= 0.15 * r["full_truth_05"],
        "pose error < 5": r["angle_error"] < 5.0,
    }


def _table(runs: list[dict]) -> str:
    lines = [
        "| data set | seed | GS-FSC 0.143 (A) | full vs truth 0.5 (A) | A vs truth 0.5 (known poses) | "
        "B vs truth 0.5 (known poses) | same hand | median pose error (deg) | wall (s) | SGD / align / passes (s) "
        "| peak mem (MB) | all checks |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r.get('dataset')} | {r.get('seed')} | error: {r['error']} |||||||||")
            continue
        a, b = r["halves"]["A"], r["halves"]["B"]
        t = r["timings"]
        passes = sum(v for k, v in t.items() if k.startswith("pass"))
        failed = [k for k, ok in _checks(r).items() if not ok]
        lines.append(
            f"| {r['dataset']}{'' if r.get('symmetry', 'C1') == 'C1' else ', ' + r['symmetry'] + ' imposed'} | "
            f"{r['seed']} | {r['gs_0143']:.2f} | {r['full_truth_05']:.2f} | "
            f"{a['truth_05']:.2f} ({a['known_05']:.2f}) | {b['truth_05']:.2f} ({b['known_05']:.2f}) | "
            f"{'yes' if r['same_hand'] else 'NO'} | {r['angle_error']:.2f} | {r['wall_s']:.0f} | "
            f"{t.get('sgd', 0):.0f} / {t.get('alignment', 0):.0f} / {passes:.0f} | {r['peak_mb']:.0f} | "
            f"{'yes' if not failed else 'NO: ' + ', '.join(failed)} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs=3, metavar=("DATASET", "SEED", "SYM"), help="run once and print JSON (internal)")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--hard-seeds", type=int, default=2)
    args = p.parse_args()
    if args.one:
        r = one_run(args.one[0], int(args.one[1]), args.one[2])
        print(json.dumps(r))
        return
    sections = [f"# Gold-standard job (bench/gold_standard.py)\n\nMachine: {machine()}.\n"]
    for name, n_seeds in (("adk64_snr0.05", args.hard_seeds), ("adk64_snr0.1", args.seeds)):
        if n_seeds == 0:
            continue
        runs = []
        for seed in range(n_seeds):
            runs.append(run_child([__file__, "--one", name, str(seed), "C1"]))
            print(_table(runs[-1:]).splitlines()[-1], flush=True)
        ok = sum("error" not in r and all(_checks(r).values()) for r in runs)
        sections.append(f"## {name}: {ok}/{len(runs)} seeds pass every check\n\n{_table(runs)}\n")
        print(sections[-1], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(sections))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
