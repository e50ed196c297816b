"""Digests of what `habinit run`, `abinit` and `reconstruct` produce, to prove a change leaves results bit for bit.

    python bench/job_digests.py [--out bench/out/digests]

Simulates 1200 particles of the bundled protein (box 64, SNR 0.1, seed 3) once, runs five jobs on the
CPU (the quick gold-standard job; one with other options and 1000 of the particles; a short one with
3 full passes; the quick single ab initio; the known-pose reconstruction) and prints a table: sha256
(first 16 hex digits) of every map's voxels and of the particles' poses, half sets, ids and image
names. Run it on two checkouts and compare the tables. Writes bench/results/job_digests_cpu.md.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np

from habinit_plugin.engine.star import read_star

RESULTS = Path(__file__).parent / "results" / "job_digests_cpu.md"
POSE_COLUMNS = ("rlnAngle", "rlnOrigin", "rlnRandomSubset", "rlnImageId", "rlnImageName")


def jobs(sim: Path) -> dict[str, list[str]]:
    star = str(sim / "particles.star")
    return {
        "run_quick": ["run", "--particles", star, "--quick", "--seed", "5"],
        "run_opts": [
            "run", "--particles", star, "--quick", "--seed", "2", "--no-marginalise", "--min-resolution", "40",
            "--mask-radius", "50", "--align-every", "10", "--n-final-passes", "3", "--n-particles", "1000",
        ],
        "run_3passes": [
            "run", "--particles", star, "--n-initial-iterations", "30", "--n-final-iterations", "10",
            "--initial-batch", "60", "--final-batch", "150", "--n-final-passes", "3", "--seed", "4",
            "--n-particles", "1000",
        ],
        "ab_quick": ["abinit", "--particles", star, "--quick", "--seed", "5", "--save-every", "0"],
        "rec": ["reconstruct", "--particles", str(sim / "gt_poses.star")],
    }  # fmt: skip


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.glob("*.mrc")):
        with mrcfile.open(path, permissive=True) as mrc:
            out[path.name] = hashlib.sha256(np.ascontiguousarray(mrc.data).tobytes()).hexdigest()[:16]
    star = folder / "particles.star"
    if star.exists():
        h = hashlib.sha256()
        for block in read_star(star).values():
            for column in block.columns:
                if column.startswith(POSE_COLUMNS):
                    h.update(column.encode() + "|".join(block.text(column)).encode())
        out["particles.star poses"] = h.hexdigest()[:16]
    return out


def habinit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "habinit_plugin.engine", *args], check=True, capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "out" / "digests"))
    out = Path(p.parse_args().out)
    sim = out / "sim"
    if not (sim / "particles.star").exists():
        habinit("simulate", "--out", str(sim), "--n-particles", "1200", "--snr", "0.1", "--seed", "3")
    rows = ["| job | file | sha256 (16) |", "|---|---|---|"]
    for name, args in jobs(sim).items():
        habinit(*args, "--out", str(out / name), *(["--overwrite"] if args[0] == "run" else []))
        rows += [f"| {name} | {file} | `{digest}` |" for file, digest in digests(out / name).items()]
    table = "\n".join(rows)
    print(table)
    RESULTS.write_text(f"# Job digests (CPU)\n\n`python bench/job_digests.py`\n\n{table}\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
