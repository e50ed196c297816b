"""Ab initio of one map from scratch on simulated sets, compared with the truth.

    python bench/abinit.py                         # 10 seeds on adk64_snr0.1, 3 on adk64_snr0.05,
                                                   # with/without preconditioner, profile
    python bench/abinit.py --seeds 2 --hard-seeds 0 --no-compare --no-profile   # quicker

Each run: SGD ab initio + full passes (``habinit abinit`` defaults, maximum
resolution Nyquist), then the map is aligned to the true map (rotation, shift,
hand) and its FSC against the truth and the median angular error of the poses
(after the same alignment) are measured. Success: FSC 0.5 against the truth no
worse than 1.3x the known-pose reconstruction of the same particles, and median
pose error < 5 degrees. Writes the tables to bench/results/abinit_cpu.md.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import dataset, known_pose_reference, machine, run_child  # noqa: E402

from habinit_plugin.engine.abinit import AbinitRun, run_sgd  # noqa: E402
from habinit_plugin.engine.mrc import read_map  # noqa: E402
from habinit_plugin.engine.particles import load_particles  # noqa: E402
from habinit_plugin.engine.passes import run_passes  # noqa: E402
from habinit_plugin.engine.settings import AbinitSettings  # noqa: E402
from habinit_plugin.engine.truth import compare_to_truth  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "abinit_cpu.md"


def one_run(
    name: str, seed: int, preconditioner: bool, track_every: int, n_iterations: int | None, fixed: float | None = None
) -> dict:
    """One ab initio run; returns the measurements (printed as JSON by --one).

    ``n_iterations``: SGD only, that many iterations; ``fixed``: the SGD band stays at this
    resolution (Angstrom) from the first iteration (convergence at a fixed band).
    """
    folder = dataset(name)
    particles = load_particles(folder / "particles.star")
    truth_poses = load_particles(folder / "gt_poses.star")
    truth, px = read_map(folder / "gt_map.mrc")
    schedule = {}
    if n_iterations:
        schedule.update(n_initial_iterations=n_iterations, n_final_iterations=0)
    if fixed:
        schedule.update(initial_resolution_A=fixed, sgd_resolution_A=fixed)
    settings = AbinitSettings(seed=seed, preconditioner=preconditioner, **schedule)
    t0 = time.time()
    run = AbinitRun(particles, settings)
    track = []

    def on_iteration(t: int) -> None:
        if track_every and t % track_every == 0:
            c = compare_to_truth(run.model_map(), truth, px)
            track.append((t, round(c.resolution_05, 2), round(time.time() - t0, 1)))

    run_sgd({"map": run}, on_iteration)
    t_sgd = time.time() - t0
    volumes = {}
    if not n_iterations:
        run_passes({"map": run}, volumes, {"pass": 0})
    t_all = time.time() - t0
    volume = volumes["map"] if volumes else run.model_map()
    c = compare_to_truth(volume, truth, px, run.rotations, run.origins, truth_poses.rotations, truth_poses.shifts)
    return {
        "dataset": name,
        "seed": seed,
        "preconditioner": preconditioner,
        "truth_05": c.resolution_05,
        "truth_0143": c.resolution_0143,
        "angle_error": c.median_angle_error,
        "shift_error": c.median_shift_error,
        "iterations": run.iteration,
        "sgd_s": t_sgd,
        "wall_s": t_all,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "track": track,
    }


def profile_run(name: str) -> str:
    """Where the time of one run goes (cumulative seconds of the main engine functions)."""
    profiler = cProfile.Profile()
    profiler.enable()
    one_run(name, 0, True, 0, None)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    wanted = {
        "step": "SGD iterations (all)",
        "global_search": "  global pose search (SGD + pass 1)",
        "local_search": "  local pose search (passes 2+)",
        "neighbourhood_search": "  neighbourhood scored for marginalisation (passes 2+)",
        "minibatch_gradient": "  SGD gradient (project + backproject)",
        "apply_constraints": "  real-space constraints (3D FFTs)",
        "full_pass": "full passes (all)",
        "insert": "  backprojection of the passes",
        "project": "projection (trilinear slices, all callers)",
        "backproject": "backprojection (scatter-add, all callers)",
        "image_batch": "image reading + FFT + CTF",
        "model_map": "model -> map",
    }
    rows = []
    for (file, _, func), (_, _, _, cum, _) in stats.stats.items():
        if func in wanted and "habinit_plugin" in file:
            rows.append((wanted[func], cum))
    total = max(cum for (f, _, func), (_, _, _, cum, _) in stats.stats.items() if func == "one_run")
    lines = ["| part | seconds | share |", "|---|---:|---:|"]
    for label, cum in sorted(rows, key=lambda r: list(wanted.values()).index(r[0])):
        lines.append(f"| {label} | {cum:.1f} | {100 * cum / total:.0f}% |")
    lines.append(f"| total | {total:.1f} | 100% |")
    return "\n".join(lines)


def _success(r: dict, reference: dict) -> bool:
    return "error" not in r and r["truth_05"] <= 1.3 * reference["truth_05"] and r["angle_error"] < 5.0


def _table(runs: list[dict], reference: dict) -> str:
    lines = [
        "| data set | seed | precond. | FSC 0.5 vs truth (A) | 0.143 (A) | ratio to known poses "
        "| median pose error (deg) | iterations | wall (s) | peak mem (MB) | success |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r.get('dataset')} | {r.get('seed')} | | error: {r['error']} | | | | | | | no |")
            continue
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {'yes' if r['preconditioner'] else 'no'} | {r['truth_05']:.2f} | "
            f"{r['truth_0143']:.2f} | {r['truth_05'] / reference['truth_05']:.2f} | {r['angle_error']:.2f} | "
            f"{r['iterations']} | {r['wall_s']:.0f} | {r['peak_mb']:.0f} | "
            f"{'yes' if _success(r, reference) else 'NO'} |"
        )
    return "\n".join(lines)


def _child(name: str, seed: int, *extra: str) -> dict:
    return run_child([__file__, "--one", name, str(seed), *extra])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", nargs=2, metavar=("DATASET", "SEED"), help="run once and print JSON (internal)")
    p.add_argument("--no-preconditioner", action="store_true")
    p.add_argument("--track-every", type=int, default=0)
    p.add_argument("--iterations", type=int, help="SGD iterations only (no passes), for the comparison")
    p.add_argument("--fixed-resolution", type=float, help="SGD band fixed at this resolution (A)")
    p.add_argument("--only-compare", action="store_true", help="run only the preconditioner comparison")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--hard-seeds", type=int, default=3)
    p.add_argument("--no-compare", action="store_true", help="skip the with/without preconditioner comparison")
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    if args.one:
        r = one_run(
            args.one[0],
            int(args.one[1]),
            not args.no_preconditioner,
            args.track_every,
            args.iterations,
            args.fixed_resolution,
        )
        print(json.dumps(r))
        return

    sections = [f"# Ab initio of one map (bench/abinit.py)\n\nMachine: {machine()}.\n"]
    if args.only_compare:
        args.seeds = args.hard_seeds = 0
        args.no_profile = True
    for name, n_seeds in (("adk64_snr0.05", args.hard_seeds), ("adk64_snr0.1", args.seeds)):
        if n_seeds == 0:
            continue
        reference = known_pose_reference(dataset(name))
        runs = []
        for seed in range(n_seeds):
            runs.append(_child(name, seed))
            print(_table(runs[-1:], reference).splitlines()[-1], flush=True)
        ok = sum(_success(r, reference) for r in runs)
        sections.append(
            f"## {name}: {ok}/{len(runs)} seeds succeed\n\nKnown-pose reconstruction of the same particles: FSC 0.5 "
            f"vs truth {reference['truth_05']:.2f} A (1.3x = {1.3 * reference['truth_05']:.2f} A), 0.143 "
            f"{reference['truth_0143']:.2f} A.\n\n{_table(runs, reference)}\n"
        )
        print(sections[-1], flush=True)
    if not args.no_compare:
        name = "adk64_snr0.1"
        lines = [
            "| schedule | preconditioner | FSC 0.5 vs truth of the SGD model (A) after (iterations, wall s) |",
            "|---|---|---|",
        ]
        schedules = {
            "default ramp 35 -> 10 A, 120 its": ("--iterations", "120", "--track-every", "20"),
            "band fixed at 20 A, 60 its": ("--iterations", "60", "--track-every", "10", "--fixed-resolution", "20"),
        }
        for label, schedule in schedules.items():
            for flag in ((), ("--no-preconditioner",)):
                r = _child(name, 0, *schedule, *flag)
                track = ", ".join(f"{res:.1f} A ({it}, {s:.0f} s)" for it, res, s in r.get("track", []))
                lines.append(f"| {label} | {'no' if flag else 'yes'} | {track or r.get('error')} |")
                print(lines[-1], flush=True)
        sections.append(
            "## Preconditioner: SGD iterations to resolution (seed 0, SGD phase only)\n\n"
            "'no' replaces the per-voxel weights by their mean (a scalar step of the same size).\n\n"
            + "\n".join(lines)
            + "\n"
        )
        print(sections[-1], flush=True)
    if not args.no_profile:
        sections.append(f"## Where the time goes (seed 0, adk64_snr0.1, cProfile)\n\n{profile_run('adk64_snr0.1')}\n")
        print(sections[-1], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = RESULTS.with_name("abinit_preconditioner_cpu.md") if args.only_compare else RESULTS
    results.write_text("\n".join(sections))
    print(f"written to {results}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
