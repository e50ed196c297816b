"""The main job, end to end, without a display: what `bash scripts/demo.sh` runs.

1. simulate particles of the bundled protein (adenylate kinase, PDB 4AKE) with `habinit simulate`;
2. build a headless Scipion project from the plugin's batch template (import the RELION STAR,
   then homogeneous ab-initio refinement), and run it;
3. print the gold-standard resolution, the particle counts, the error against the true map and
   where the half maps and plots are.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="habinit_demo", help="output folder (default: ./habinit_demo)")
    parser.add_argument("--n-particles", type=int, default=4000, help="particles to simulate")
    parser.add_argument("--snr", type=float, default=0.05, help="signal-to-noise ratio of the images")
    parser.add_argument("--box", type=int, default=64, help="box of the simulated particles (pixels)")
    parser.add_argument("--pixel-size", type=float, default=1.8, help="Angstrom per pixel")
    parser.add_argument(
        "--quick", action="store_true", help="the engine's short test schedule (a poor map, in about a minute)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--gpu", action="store_true", help="run the engine on GPU 0 (needs CuPy)")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    sim = out / "simulated"
    t_start = time.time()
    if not (sim / "particles.star").exists():
        print(f"[1/3] simulating {args.n_particles} particles of the bundled protein (box {args.box}) ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "habinit_plugin.engine",
                "simulate",
                "--out",
                str(sim),
                "--n-particles",
                str(args.n_particles),
                "--snr",
                str(args.snr),
                "--box",
                str(args.box),
                "--pixel-size",
                str(args.pixel_size),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    else:
        print(f"[1/3] using the particles simulated before in {sim}")

    from habinit_plugin.headless import setup_environment

    setup_environment(out / "scipion", out / "scipion" / "data")
    from habinit_plugin.headless import new_project, run_workflow, workflow_from_template

    values = {
        "star": sim / "particles.star",
        "pixelsize": args.pixel_size,
        "quick": args.quick,
        "gpu": args.gpu,
        "threads": args.threads,
    }
    workflow = workflow_from_template(values, out=out / "habinit_workflow.json")
    print(f"[2/3] headless Scipion project from the batch template ({workflow.name}) ...", flush=True)
    project = new_project("habinit_demo")
    loaded = project.loadProtocols(str(workflow))
    print(f"[3/3] running {', '.join(p.getObjLabel() for p in loaded.values())} in {project.path} ...", flush=True)
    _, prot = run_workflow(project, loaded=loaded)
    report(prot, sim, time.time() - t_start)
    return 0


def report(prot, sim: Path, seconds: float) -> None:
    import json

    from habinit_plugin.engine.fsc import fsc, resolution_at
    from habinit_plugin.engine.mrc import read_map

    extra = Path(prot._getExtraPath()).resolve()
    info = json.loads((extra / "run.json").read_text())
    truth, pixel_size = read_map(sim / "gt_map.mrc")
    average, _ = read_map(extra / "map.mrc")
    # the result has its own orientation and hand: align it to the truth before comparing
    from habinit_plugin.engine.align3d import align_maps, transform_map

    aligned = transform_map(average, align_maps(truth, average, pixel_size))
    vs_truth = resolution_at(fsc(aligned, truth), 0.5, pixel_size)
    used, unused = prot.outputParticles.getSize(), info["n_unused"]
    print()
    print("habinit demo: homogeneous ab-initio refinement in Scipion (headless)")
    print(f"  protocol                {prot.getRunName()} ({prot.getStatus()}) in {Path(prot.getProject().path)}")
    print(
        f"  gold-standard FSC       0.143 at {info['resolution_0143']:.2f} A, 0.5 at {info['resolution_05']:.2f} A"
        f" (Nyquist {2 * pixel_size:.2f} A)"
    )
    print(f"  vs the true map         FSC 0.5 at {vs_truth:.2f} A (after aligning the map to the truth)")
    print(f"  particles               {used} used (outputParticles), {unused} unused, {used + unused} in")
    print(f"  half maps               {extra / 'half_map_A.mrc'}")
    print(f"                          {extra / 'half_map_B.mrc'}")
    print(f"  average map             {extra / 'map.mrc'}")
    print(f"  particles with poses    {extra / 'particles.star'}")
    print(f"  plots                   {extra / 'fsc.png'}")
    for name in ("resolution_per_iteration.png", "angular_distribution.png", "half_map_slices.png"):
        print(f"                          {extra / name}")
    print(f"  total time              {seconds / 60:.1f} min on {info.get('device', 'cpu')}")


if __name__ == "__main__":
    sys.exit(main())
