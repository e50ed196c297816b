"""The gold-standard job on particles as they come out of 2D classification (issue 15).

    python bench/real_data.py                          # every effect alone and all at once, seed 0
    python bench/real_data.py --sets all --seeds 3     # the combined set, 3 seeds
    python bench/real_data.py --sets "box 64" "box 128" "box 256"   # time per phase against the box
    python bench/real_data.py --table                  # rebuild the table from the runs kept

The sets are simulated from the bundled progesterone receptor ligand-binding domain (PDB 1A28
chain A, 29 kDa; not the adenylate kinase the engine was developed on), box 64 at 1.5 A/px,
5,000 images at SNR 0.05, with one effect of a real stack or all of them: an envelope B-factor
the CTF does not describe, coloured noise, 15% junk (empty picks and wrong lumps), 35% of the
views within 15 degrees of one direction, a per-particle signal scale (sd 0.1). Per run, as
bench/gold_standard.py: each half map's FSC 0.5 vs the truth beside the known-pose
reconstruction of the true particles of its half (junk left out), the hand, the GS-FSC vs the
full map's FSC 0.5 vs the truth; and the area under the ROC curve of the per-particle score
(rlnLogLikeliContribution) for junk, the sampling compensation factor the job reports, the
spread of the directional resolution of the full map vs the truth (worst / best direction),
the wall time per phase. The junk set is also run without its junk rows ("junk removed"): the
cost of the junk. The box series (box 64, 128, 256 at 2.0, 1.5, 1.0 A/px, 10,000 images, no effect)
shows how the time per phase and the memory grow with the box. Runs are kept in
bench/results/real_data_runs.jsonl; the table in bench/results/real_data_cpu.md is rebuilt from all of them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, known_pose_reference, machine, run_child  # noqa: E402

from habinit_plugin.engine import density  # noqa: E402
from habinit_plugin.engine.directional_fsc import directional_resolution  # noqa: E402
from habinit_plugin.engine.jobs import gold_standard_job  # noqa: E402
from habinit_plugin.engine.mrc import read_map  # noqa: E402
from habinit_plugin.engine.particles import load_particles, write_particles_star  # noqa: E402
from habinit_plugin.engine.settings import AbinitSettings, JobSettings  # noqa: E402
from habinit_plugin.engine.simulate import SimulationSettings, simulate_dataset  # noqa: E402
from habinit_plugin.engine.truth import compare_to_truth  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "real_data_cpu.md"
RUNS = Path(__file__).parent / "results" / "real_data_runs.jsonl"
SNR, SIMULATION_SEED = 0.05, 21
EFFECTS = {
    "none": {},
    "envelope": {"envelope_bfactor_A2": 65.0},
    "coloured noise": {"noise_colour": 4.0},
    "junk": {"junk_fraction": 0.15},
    "junk removed": {"junk_fraction": 0.15},  # the junk set without its junk rows
    "preferred views": {"preferred_fraction": 0.35, "preferred_cone_deg": 15.0},
    "scale": {"scale_sd": 0.1},
}
EFFECTS["all"] = {k: v for name, e in EFFECTS.items() for k, v in e.items()}
# name: (box, pixel size A, particles, effect); the box series keeps the protein and grows the box and
# its physical size (128, 192, 256 A), as users' boxes do
SETS = {effect: (64, 1.5, 5000, effect) for effect in EFFECTS}
SETS.update({f"box {box}": (box, px, 10000, "none") for box, px in ((64, 2.0), (128, 1.5), (256, 1.0))})
# small-particle data sets hold 10^5 images and more: the combined set again with four times the images
SETS["all, 20000 images"] = (64, 1.5, 20000, "all")


def dataset(name: str) -> Path:
    """Folder of the simulated set ``name`` (made on first use)."""
    box, pixel_size, n, effect = SETS[name]
    source = "junk" if effect == "junk removed" else effect
    folder = OUT / "data" / f"pr{box}_{pixel_size:g}A_{n}_{source.replace(' ', '_')}"
    if not (folder / "truth.npz").is_file():
        volume = density.atoms_to_map(density.bundled_structure_path("pr"), box, pixel_size)
        settings = SimulationSettings(n_particles=n, snr=SNR, seed=SIMULATION_SEED, **EFFECTS[source])
        simulate_dataset(volume, pixel_size, folder, settings)
    if effect == "junk removed" and not (folder / "particles_no_junk.star").is_file():
        particles = load_particles(folder / "particles.star")
        write_particles_star(folder / "particles_no_junk.star", particles, np.flatnonzero(~_is_junk(folder)))
    return folder


def _is_junk(folder: Path) -> np.ndarray:
    return np.load(folder / "truth.npz")["is_junk"].astype(bool)


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = np.argsort(np.argsort(np.concatenate([pos, neg]), kind="stable"), kind="stable") + 1.0
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def one_run(name: str, seed: int) -> dict:
    folder = dataset(name)
    star = folder / ("particles_no_junk.star" if name == "junk removed" else "particles.star")
    out = OUT / "real_data" / f"{name.replace(' ', '_')}_seed{seed}"
    t0 = time.time()
    info = gold_standard_job(str(star), out, JobSettings(abinit=AbinitSettings(seed=seed)), overwrite=True)
    wall = time.time() - t0
    truth, px = read_map(folder / "gt_map.mrc")
    true_poses = load_particles(folder / "gt_poses.star")
    junk = _is_junk(folder)
    found = load_particles(out / "particles.star")
    rows = found.ids - 1  # simulated ids are the 1-based rows of gt_poses.star
    maps = {h: read_map(out / f"half_map_{h}.mrc")[0] for h in "AB"}
    halves = half_maps_vs_truth(folder, out)
    particle = ~junk[rows]
    full_map = 0.5 * (maps["A"] + maps["B"])
    full = compare_to_truth(
        full_map, truth, px, found.rotations[particle], found.shifts[particle],
        true_poses.rotations[rows[particle]], true_poses.shifts[rows[particle]],
    )  # fmt: skip
    aligned_truth_fsc = directional_resolution(_aligned(full_map, full.alignment), truth, px)
    score = np.array(found.table.floats("rlnLogLikeliContribution"))
    return {
        "set": name,
        "seed": seed,
        "wall_s": wall,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "timings": info["timings"],
        "gs_0143": info["resolution_0143"],
        "halves": halves,
        "same_hand": halves["A"]["mirrored"] == halves["B"]["mirrored"],
        "full_truth_05": full.resolution_05,
        "angle_error": full.median_angle_error,
        "junk_auc": roc_auc(-score, junk[rows]) if junk[rows].any() else None,
        "orientation": info.get("orientation", {}),
        "directional": {k: v for k, v in aligned_truth_fsc.items() if k not in ("directions", "resolution_A")},
        "n_used": info["n_used"],
        "commit": _commit(),
    }


def _commit() -> str:
    """The checkout's commit (with "+" when it has uncommitted changes), to tell runs of different code apart."""
    here = Path(__file__).parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "../habinit_plugin"], cwd=here).returncode
    return head.stdout.strip() + ("+" if dirty else "")


def half_maps_vs_truth(folder: Path, out: Path) -> dict:
    """Each half map's FSC 0.5 and 0.143 vs the truth beside the known-pose reconstruction of the true particles
    of its half. (On these sets a half map's FSC vs the truth can run along 0.5 for several shells, where the
    0.5 crossing jumps by 1.5 A between two halves with the same curve: the 0.143 ratio is the stable one.)"""
    truth, px = read_map(folder / "gt_map.mrc")
    junk = _is_junk(folder)
    found = load_particles(out / "particles.star")
    rows = found.ids - 1  # simulated ids are the 1-based rows of gt_poses.star
    halves = {}
    for h, value in (("A", 1), ("B", 2)):
        mine = rows[(found.half_set == value) & ~junk[rows]]
        c = compare_to_truth(read_map(out / f"half_map_{h}.mrc")[0], truth, px)
        known = known_pose_reference(folder, np.sort(mine))
        halves[h] = {
            "truth_05": c.resolution_05, "known_05": known["truth_05"],
            "truth_0143": c.resolution_0143, "known_0143": known["truth_0143"], "mirrored": c.alignment.mirrored,
        }  # fmt: skip
    return halves


def rescore(r: dict) -> dict:
    """A run of the table with its half maps measured again from its output folder (when it is still there)."""
    out = OUT / "real_data" / f"{r['set'].replace(' ', '_')}_seed{r['seed']}"
    if "error" in r or "truth_0143" in r["halves"]["A"] or not (out / "half_map_A.mrc").is_file():
        return r
    return dict(r, halves=half_maps_vs_truth(dataset(r["set"]), out))


def _aligned(volume: np.ndarray, alignment) -> np.ndarray:
    from habinit_plugin.engine.align3d import transform_map

    return transform_map(volume, alignment)


def checks(r: dict) -> dict:
    return {
        "halves within 1.3x": all(h["truth_05"] <= 1.3 * h["known_05"] for h in r["halves"].values()),
        "same hand": r["same_hand"],
        "GS-FSC within 15%": abs(r["gs_0143"] - r["full_truth_05"]) <= 0.15 * r["full_truth_05"],
    }


def table(runs: list[dict]) -> str:
    lines = [
        "| set | seed | GS-FSC 0.143 (A) | full vs truth 0.5 (A) | A vs truth (known poses) "
        "| B vs truth (known poses) | worst half / known (0.5 / 0.143) | same hand | junk AUC | SCF "
        "| directional spread | wall (s) | SGD / passes (s) "
        "| peak mem (MB) | all checks | code |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r.get('set')} | {r.get('seed')} | error: {r['error']} |||||||||||||")
            continue
        a, b, t = r["halves"]["A"], r["halves"]["B"], r["timings"]
        worst = max(h["truth_05"] / h["known_05"] for h in (a, b))
        worst_0143 = max((h["truth_0143"] / h["known_0143"] for h in (a, b) if "truth_0143" in h), default=None)
        worst_text = f"{worst:.2f}" + ("" if worst_0143 is None else f" / {worst_0143:.2f}")
        passes = sum(v for k, v in t.items() if k.startswith("pass"))
        failed = [k for k, ok in checks(r).items() if not ok]
        auc = "-" if r.get("junk_auc") is None else f"{r['junk_auc']:.3f}"
        scf = r.get("orientation", {}).get("scf")
        spread = r.get("directional", {}).get("spread")
        lines.append(
            f"| {r['set']} | {r['seed']} | {r['gs_0143']:.2f} | {r['full_truth_05']:.2f} | "
            f"{a['truth_05']:.2f} ({a['known_05']:.2f}) | {b['truth_05']:.2f} ({b['known_05']:.2f}) | {worst_text} | "
            f"{'yes' if r['same_hand'] else 'NO'} | {auc} | {'-' if scf is None else f'{scf:.2f}'} | "
            f"{'-' if spread is None else f'{spread:.2f}'} | {r['wall_s']:.0f} | "
            f"{t.get('sgd', 0):.0f} / {passes:.0f} | {r['peak_mb']:.0f} | "
            f"{'yes' if not failed else 'NO: ' + ', '.join(failed)} | {r.get('commit', 'before 60d6b4a')} |"
        )
    return "\n".join(lines)


def write_results(measure_again: bool = False) -> None:
    latest = {}
    for line in RUNS.read_text().splitlines():
        r = json.loads(line)
        latest[(r["set"], r["seed"])] = r
    if measure_again:
        latest = {key: rescore(r) for key, r in latest.items()}
        with RUNS.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in latest.values())
    order = list(SETS)
    runs = sorted(latest.values(), key=lambda r: (order.index(r["set"]), r["seed"]))
    sets = "; ".join(f"{name}: box {b}, {px:g} A/px, {n} images" for name, (b, px, n, _) in SETS.items())
    text = (
        f"# Particles as from 2D classification (bench/real_data.py)\n\nMachine: {machine()}.\n\n"
        f"Progesterone receptor LBD (1A28 A), SNR {SNR}. Sets: {sets}. "
        f"Effects: {json.dumps(EFFECTS['all'])}.\n\n{table(runs)}\n"
    )
    RESULTS.write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(EFFECTS), choices=list(SETS))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--one", nargs=2, metavar=("EFFECT", "SEED"), help="run once and print JSON (internal)")
    p.add_argument("--table", action="store_true", help="only rebuild the table")
    p.add_argument("--measure-again", action="store_true", help="with --table: measure kept runs' half maps again")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], int(args.one[1]))))
        return
    if not args.table:
        for name in args.sets:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                r = run_child([__file__, "--one", name, str(seed)])
                r.setdefault("set", name), r.setdefault("seed", seed)
                with RUNS.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                print(table([r]).splitlines()[-1], flush=True)
    write_results(args.measure_again)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
