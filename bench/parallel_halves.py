"""Two halves, two workers: wall time of ``habinit run --parallel-halves`` against the one-process job.

    python bench/parallel_halves.py                       # adk64_snr0.1 (5,000 particles, box 64), CPU
    python bench/parallel_halves.py --quick               # the short schedule, to try the script
    python bench/parallel_halves.py --gpus 0,1            # on a machine with two GPUs: one each vs one GPU

CPU: both jobs run with one BLAS and FFT thread per process (OPENBLAS/OMP/MKL_NUM_THREADS=1,
HABINIT_THREADS=1 for the one-process job; each worker gets 1 on 2 cores), so the two-worker job
must give the same half maps bit for bit, which the table says. Prints a markdown table: wall time
of each job, the ratio, and whether the maps and poses are identical. Run it on an otherwise idle
machine: the ratio is what the second core (or GPU) buys.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, dataset, machine  # noqa: E402

from habinit_plugin.engine.mrc import read_map  # noqa: E402

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HABINIT_THREADS": "1"}


def run_job(particles: Path, out: Path, extra: list[str], env: dict) -> float:
    """Wall seconds of one ``habinit run`` (from scratch) with ``extra`` options."""
    command = [sys.executable, "-m", "habinit_plugin.engine", "run", "--particles", str(particles), "--out", str(out)]
    t0 = time.time()
    r = subprocess.run([*command, "--overwrite", *extra], capture_output=True, text=True, env=env)
    seconds = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{r.stderr}")
    return seconds


def same_result(a: Path, b: Path) -> bool:
    """Half maps and particles.star identical to the bit."""
    maps = all(np.array_equal(read_map(a / n)[0], read_map(b / n)[0]) for n in ("half_map_A.mrc", "half_map_B.mrc"))
    return maps and (a / "particles.star").read_bytes() == (b / "particles.star").read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="adk64_snr0.1", help="bench data set (bench/common.py DATASETS)")
    parser.add_argument("--quick", action="store_true", help="the short schedule")
    parser.add_argument("--gpus", help="GPU ids, e.g. 0,1: one worker per GPU against one GPU")
    args = parser.parse_args()
    particles = dataset(args.data) / "particles.star"
    common = ["--quick"] if args.quick else []
    if args.gpus:
        env = dict(os.environ)
        one = ["--device", "gpu", *common]
        two = ["--gpus", args.gpus, *common]
        env_one = dict(env, CUDA_VISIBLE_DEVICES=args.gpus.split(",")[0])
        device = f"GPU ({args.gpus})"
    else:
        env = env_one = dict(os.environ, **ONE_THREAD)
        one, two = common, ["--parallel-halves", *common]
        device = "CPU, 1 thread per process"
    folder = OUT / "parallel_halves" / args.data
    one_s = run_job(particles, folder / "one_process", one, env_one)
    two_s = run_job(particles, folder / "two_workers", two, env)
    identical = same_result(folder / "one_process", folder / "two_workers")
    print(f"{machine()}; {args.data}{' (--quick)' if args.quick else ''}; {device}")
    print()
    print("| job | wall (s) | ratio to one process | half maps and poses identical |")
    print("| --- | ---: | ---: | --- |")
    print(f"| one process | {one_s:.1f} | 1.00 | |")
    print(f"| two workers | {two_s:.1f} | {two_s / one_s:.2f} | {'yes' if identical else 'NO'} |")


if __name__ == "__main__":
    main()
