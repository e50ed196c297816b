"""Known-pose reconstruction: habinit vs cryoDRGN ``backproject_voxel`` on the same particles.

Simulates (once) the bundled protein with ``habinit simulate`` (box 64, 1.8 A/px,
5000 particles, SNR 0.1 by default), then times, as separate processes:

* ``habinit reconstruct --particles gt_poses.star`` (two Wiener half maps, FSC prior);
* cryoDRGN: ``parse_pose_star`` and ``parse_ctf_star`` on the same STAR file (reported
  as preprocessing), then ``backproject_voxel particles.mrcs --poses --ctf``.

For each: wall time of the command (process start to exit, imports included), the
reconstruction time the tool reports itself, peak resident memory (``ru_maxrss`` of
the child from ``os.wait4``), particles per second (over the command's wall time),
the FSC = 0.5 resolution of the full map against the ground truth ``gt_map.mrc``
(habinit: the mean of its two half maps; cryoDRGN: ``backproject.mrc``), and the
unmasked half-map FSC = 0.143 resolution, computed the same way for both.

cryoDRGN is found through ``--cryodrgn PATH``, else the ``CRYODRGN`` environment
variable, else ``cryodrgn`` on PATH; without it the cryoDRGN row is skipped with a
message. It needs its own environment (it pulls in torch), e.g.::

    python3 -m venv /tmp/venv_drgn && /tmp/venv_drgn/bin/pip install torch==2.13.0 cryodrgn
    python bench/reconstruct_speed.py --cryodrgn /tmp/venv_drgn/bin/cryodrgn \\
        --write bench/results/reconstruct_speed_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from habinit_plugin.engine.fourier import soft_sphere
from habinit_plugin.engine.fsc import fsc, resolution_at
from habinit_plugin.engine.mrc import read_map


@dataclass
class Measured:
    """One command: wall seconds, peak RSS in MiB, exit status, combined output."""

    seconds: float
    peak_mib: float
    returncode: int
    output: str


@dataclass
class Row:
    """One line of the table; resolutions in Angstrom as (no mask, soft spherical mask), None where not measured."""

    tool: str
    wall_s: float
    compute_s: float | None
    peak_mib: float
    particles_per_s: float
    fsc_gt_05: tuple[float, float]
    half_fsc_0143: tuple[float, float] | None
    mean_fsc_masked: float
    note: str = ""


def run_measured(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> Measured:
    """Run ``cmd`` to completion; wall time and the child's own peak RSS (Linux: ru_maxrss in KiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # read the output while it runs (no deadlock on a full pipe), then reap with wait4 for its rusage
    output = proc.stdout.read() if proc.stdout is not None else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(seconds, usage.ru_maxrss / 1024.0, proc.returncode, output)


def _check(measured: Measured, what: str) -> None:
    if measured.returncode != 0:
        sys.stderr.write(measured.output[-4000:])
        raise SystemExit(f"{what} failed with exit status {measured.returncode}")


def habinit_command() -> list[str]:
    """The habinit CLI of the interpreter running this script."""
    return [sys.executable, "-m", "habinit_plugin.engine"]


def simulate(data: Path, n_particles: int, snr: float, box: int, seed: int) -> None:
    """Write the particle set with ``habinit simulate`` unless an equal one is already there."""
    stamp = data / "bench_params.json"
    params = {"n_particles": n_particles, "snr": snr, "box": box, "seed": seed}
    if stamp.exists() and json.loads(stamp.read_text()) == params and (data / "gt_poses.star").exists():
        print(f"reusing the simulated particles in {data}", file=sys.stderr)
        return
    cmd = habinit_command() + ["simulate", "--out", str(data), "--n-particles", str(n_particles)]
    cmd += ["--snr", str(snr), "--box", str(box), "--seed", str(seed)]
    print("simulating:", " ".join(cmd), file=sys.stderr)
    _check(run_measured(cmd), "habinit simulate")
    stamp.write_text(json.dumps(params))


MASK_RADIUS = 0.375  # of the box: 24 px at box 64, the protein fits inside
MASK_EDGE = 0.09375  # of the box: 6 px raised-cosine edge at box 64


def map_resolutions(full_map: np.ndarray, half_a: np.ndarray | None, half_b: np.ndarray | None, gt: np.ndarray, px):
    """(FSC 0.5 vs ground truth, half-map FSC 0.143) in Angstrom, each as (no mask, soft sphere mask),
    and the mean masked FSC vs ground truth over shells 1 .. box/2 - 1.

    The second is None without half maps. At high SNR both resolutions sit at Nyquist,
    so the mean FSC is what tells the maps apart. The mask matters for this comparison: a
    reconstruction without gridding correction (cryoDRGN) has noise that fades toward
    the box edge, which raises its unmasked FSC; inside a mask around the particle the
    comparison is of the particle alone.
    """
    box = gt.shape[0]
    mask = soft_sphere(box, MASK_RADIUS * box, width=MASK_EDGE * box)
    versus_gt = tuple(resolution_at(fsc(full_map, gt, m), 0.5, px) for m in (None, mask))
    halves = None
    if half_a is not None and half_b is not None:
        halves = tuple(resolution_at(fsc(half_a, half_b, m), 0.143, px) for m in (None, mask))
    mean_fsc = float(np.mean(fsc(full_map, gt, mask)[1 : box // 2]))
    return versus_gt, halves, mean_fsc


def best_of(runs: list[tuple[Measured, float | None]]) -> tuple[Measured, float | None]:
    """Shortest wall time of repeated runs, with the shortest self-reported time and the largest peak memory."""
    fastest = min(runs, key=lambda r: r[0].seconds)[0]
    own = [r[1] for r in runs if r[1] is not None]
    peak = max(r[0].peak_mib for r in runs)
    return Measured(fastest.seconds, peak, fastest.returncode, fastest.output), (min(own) if own else None)


def bench_habinit(data: Path, n: int, gt: np.ndarray, px: float, repeat: int) -> Row:
    out = data / "habinit_reconstruct"
    cmd = habinit_command() + ["reconstruct", "--particles", str(data / "gt_poses.star"), "--out", str(out)]
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        measured = run_measured(cmd)
        _check(measured, "habinit reconstruct")
        runs.append((measured, float(json.loads((out / "fsc.json").read_text())["seconds"])))
    measured, own = best_of(runs)
    half_a, _ = read_map(out / "half_map_A.mrc")
    half_b, _ = read_map(out / "half_map_B.mrc")
    versus_gt, halves, mean_fsc = map_resolutions(0.5 * (half_a + half_b), half_a, half_b, gt, px)
    return Row(
        "habinit reconstruct (NumPy, CPU)",
        measured.seconds,
        own,
        measured.peak_mib,
        n / measured.seconds,
        versus_gt,
        halves,
        mean_fsc,
        "full map = mean of the two Wiener half maps",
    )


def find_cryodrgn(explicit: str | None) -> str | None:
    """Path of a working ``cryodrgn`` executable, or None (with the reason on stderr)."""
    candidate = explicit or os.environ.get("CRYODRGN") or shutil.which("cryodrgn")
    if not candidate:
        print("cryoDRGN row skipped: no cryodrgn executable (give --cryodrgn PATH or set CRYODRGN)", file=sys.stderr)
        return None
    if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
        print(f"cryoDRGN row skipped: {candidate} is not an executable file", file=sys.stderr)
        return None
    probe = subprocess.run([candidate, "backproject_voxel", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or [""]
        print(f"cryoDRGN row skipped: `{candidate} backproject_voxel --help` failed: {tail[0]}", file=sys.stderr)
        return None
    return candidate


def cryodrgn_version(exe: str) -> str:
    done = subprocess.run([exe, "--version"], capture_output=True, text=True)
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[-1] if text else "unknown"


def bench_cryodrgn(exe: str, data: Path, n: int, box: int, gt: np.ndarray, px: float, repeat: int) -> tuple[Row, float]:
    """The cryoDRGN row and the wall time of its STAR -> pkl preprocessing."""
    work = data / "cryodrgn"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    star = str(data / "gt_poses.star")
    common = ["-D", str(box), "--Apix", f"{px:g}"]
    pose = run_measured([exe, "parse_pose_star", star, *common, "-o", str(work / "poses.pkl")])
    _check(pose, "cryodrgn parse_pose_star")
    ctf = run_measured([exe, "parse_ctf_star", star, *common, "-o", str(work / "ctf.pkl")])
    _check(ctf, "cryodrgn parse_ctf_star")
    out = work / "backproject"
    cmd = [exe, "backproject_voxel", str(data / "particles.mrcs"), "--poses", str(work / "poses.pkl")]
    cmd += ["--ctf", str(work / "ctf.pkl"), "-o", str(out)]
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        measured = run_measured(cmd)
        _check(measured, "cryodrgn backproject_voxel")
        found = re.search(r"Backprojected [\d,]+ images in ([\d.]+)s", measured.output)
        runs.append((measured, float(found.group(1)) if found else None))
    measured, compute = best_of(runs)
    full, _ = read_map(out / "backproject.mrc")
    half_a = half_b = None
    if (out / "half_map_a.mrc").exists() and (out / "half_map_b.mrc").exists():
        half_a, _ = read_map(out / "half_map_a.mrc")
        half_b, _ = read_map(out / "half_map_b.mrc")
    versus_gt, halves, mean_fsc = map_resolutions(full, half_a, half_b, gt, px)
    row = Row(
        "cryoDRGN backproject_voxel (torch, CPU)",
        measured.seconds,
        compute,
        max(measured.peak_mib, pose.peak_mib, ctf.peak_mib),
        n / measured.seconds,
        versus_gt,
        halves,
        mean_fsc,
        "full map = backproject.mrc (all particles); default --reg-weight 1",
    )
    return row, pose.seconds + ctf.seconds


def _fmt(value, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, tuple):
        return " / ".join(format(v, spec) for v in value)
    return format(value, spec)


def table(rows: list[Row]) -> str:
    lines = [
        "| tool | wall (s) | reconstruction (s, own log) | peak RSS (MiB) | particles/s (wall) "
        "| FSC=0.5 vs ground truth (A), no mask / mask | half-map FSC=0.143 (A), no mask / mask "
        "| mean FSC vs ground truth, mask | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tool} | {r.wall_s:.1f} | {_fmt(r.compute_s, '.1f')} | {r.peak_mib:.0f} | {r.particles_per_s:.0f} "
            f"| {_fmt(r.fsc_gt_05, '.2f')} | {_fmt(r.half_fsc_0143, '.2f')} | {r.mean_fsc_masked:.3f} | {r.note} |"
        )
    return "\n".join(lines)


def machine_line() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cores} cores ({model or platform.processor() or platform.machine()}), load average {load} at the start"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/habinit_bench_reconstruct", help="folder for the simulated particles")
    p.add_argument("--n-particles", type=int, default=5000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cryodrgn", help="path of the cryodrgn executable (default: $CRYODRGN, then PATH)")
    p.add_argument("--skip-cryodrgn", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="run each reconstruction this many times, keep the fastest")
    p.add_argument("--write", help="also write the table (with the machine and versions) to this markdown file")
    args = p.parse_args(argv)

    machine = machine_line()
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    simulate(data, args.n_particles, args.snr, args.box, args.seed)
    gt, px = read_map(data / "gt_map.mrc")
    px = round(px, 4)

    rows = [bench_habinit(data, args.n_particles, gt, px, args.repeat)]
    preprocessing = None
    versions = [f"habinit_plugin (this checkout), NumPy {np.__version__}, Python {platform.python_version()}"]
    exe = None if args.skip_cryodrgn else find_cryodrgn(args.cryodrgn)
    if args.skip_cryodrgn:
        print("cryoDRGN row skipped: --skip-cryodrgn", file=sys.stderr)
    if exe is not None:
        row, preprocessing = bench_cryodrgn(exe, data, args.n_particles, args.box, gt, px, args.repeat)
        rows.append(row)
        versions.append(f"{cryodrgn_version(exe)} ({exe})")

    header = [
        f"Known-pose reconstruction, {args.n_particles} simulated particles of the bundled protein "
        f"(adenylate kinase), box {args.box}, {px:g} A/px, SNR {args.snr:g} (`habinit simulate`), "
        f"poses and CTF from `gt_poses.star`.",
        "",
        f"Machine: {machine}; CPU only.",
        "Versions: " + "; ".join(versions) + ".",
        "",
    ]
    notes = [
        "",
        f"wall: the whole command as a separate process (interpreter start and imports included), "
        f"fastest of {args.repeat}; "
        "reconstruction: the time the tool logs for its own backprojection/reconstruction; "
        "peak RSS: `ru_maxrss` of the process (for cryoDRGN the largest of its three commands); "
        f"FSC against `gt_map.mrc` (Nyquist {2 * px:.2f} A) without a mask and with a soft sphere "
        f"(radius {MASK_RADIUS * args.box:g} px, {MASK_EDGE * args.box:g} px cosine edge) on both maps; "
        "half-map FSC: the two half maps each tool writes, computed by the same code for both. "
        "habinit reconstructs to |k| <= box/2 - 1, so its FSC cannot reach the Nyquist shell "
        f"(best possible {args.box * px / (args.box // 2 - 1):.2f} A); "
        "cryoDRGN does not correct for its interpolation kernel, so its noise fades toward the box edge, "
        "which raises its unmasked FSC. Mean FSC: the masked FSC against the ground truth averaged over "
        f"shells 1 to {args.box // 2 - 1} (both resolutions sit near Nyquist at this SNR).",
    ]
    if preprocessing is not None:
        notes.append(
            f"cryoDRGN also needs `parse_pose_star` + `parse_ctf_star` to turn the STAR file into pkl "
            f"files: {preprocessing:.1f} s more (not in its row); habinit reads the STAR file directly."
        )
    else:
        notes.append("No cryoDRGN row: it was skipped or not available (the reason is on stderr).")
    text = "\n".join(header) + table(rows) + "\n" + "\n".join(notes) + "\n"
    print(text)
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
