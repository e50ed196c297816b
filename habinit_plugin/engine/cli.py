"""Command line: ``habinit <command>`` (also ``python -m habinit_plugin.engine``).

Commands: simulate, reconstruct, fsc, abinit, run, align, demo. Each prints what it did and where
the files are; errors in the input end the program with one clear message.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import density, stop
from .align3d import AlignSettings, align_maps, transform_map
from .backend import DeviceError, get_xp
from .fsc import fsc, resolution_at
from .gold_standard import GoldStandardJob
from .jobs import CPU, gold_standard_job, reconstruct_job, single_abinit_job
from .mrc import MRCError, read_map, write_map
from .outputs import HALF_MAP_A, HALF_MAP_B, fsc_curve, fsc_report, write_json
from .parallel_halves import STAGES, WorkerError, WorkerLaunch, half_worker_job
from .particles import ParticleError
from .settings import (
    QUICK_SCHEDULE,
    AbinitSettings,
    DeviceSettings,
    JobSettings,
    SymmetryError,
    WorkerSettings,
    cli_fields,
    help_of,
    option_name,
    symmetry_name,
    unit_of,
)
from .simulate import SimulationSettings, describe_effects, simulate_dataset
from .so3 import matrix_to_euler
from .star import StarError
from .symmetry import point_group
from .symmetry_search import find_symmetry_axes, onto_axes

log = logging.getLogger("habinit")

USER_ERRORS = (ParticleError, StarError, MRCError, DeviceError, ValueError, FileExistsError)


def _setup_logging(verbose: bool = True) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s habinit %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


# ------------------------------------------------------------------------ simulate


def add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="simulate particles from a map (default: the bundled protein)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--map", help="MRC map to project (default: the bundled protein, see --protein)")
    p.add_argument(
        "--model", help="atomic model to simulate (PDB/mmCIF, optionally gzipped), centred in --box at --pixel-size"
    )
    p.add_argument(
        "--protein",
        choices=tuple(density.BUNDLED_STRUCTURES),
        help="bundled protein: adk (adenylate kinase 4AKE, the default) or pr (progesterone receptor LBD 1A28)",
    )
    p.add_argument("--box", type=int, default=density.DEFAULT_BOX, help="box of the bundled map (pixels)")
    p.add_argument("--pixel-size", type=float, default=density.DEFAULT_PIXEL_SIZE, help="Angstrom per pixel")
    p.add_argument("--n-particles", type=int, default=5000)
    p.add_argument("--snr", type=float, default=0.1, help="signal/noise variance ratio ('inf': no noise)")
    p.add_argument(
        "--symmetry",
        default="C1",
        type=_symmetry_option,
        help="build a particle with this point group from copies of the protein (--protein or --model; RELION's names)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--defocus", type=float, nargs=2, default=(10000.0, 25000.0), help="range, Angstrom")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"))
    g = p.add_argument_group("effects of real particle stacks (all off by default; truth.npz records them)")
    g.add_argument(
        "--envelope-bfactor",
        type=float,
        default=0.0,
        help="B (A^2): signal times exp(-B s^2 / 4), not written to the STAR (a decay the CTF does not describe)",
    )
    g.add_argument(
        "--coloured-noise",
        type=float,
        default=0.0,
        help="c: noise power 1 + c exp(-(s * 25 A)^2), same variance (more power at low frequency, as ice)",
    )
    g.add_argument(
        "--preferred-fraction",
        type=float,
        default=0.0,
        help="fraction of the particles viewed from within --preferred-cone of one random direction",
    )
    g.add_argument("--preferred-cone", type=float, default=15.0, help="half-angle of that cone, degrees")
    g.add_argument(
        "--junk-fraction",
        type=float,
        default=0.0,
        help="fraction of the images without a particle: half empty, half lumps",
    )
    g.add_argument("--scale-sd", type=float, default=0.0, help="per-image signal scale ~ Normal(1, sd), at least 0.2")
    g.add_argument("--intensity-scale", type=float, default=1.0, help="written pixels: value * scale + offset")
    g.add_argument("--intensity-offset", type=float, default=0.0, help="see --intensity-scale")
    g.add_argument(
        "--invert-contrast", action="store_true", help="dark particles (a stack that was not contrast-inverted)"
    )
    p.set_defaults(func=run_simulate)


def _simulated_object(args) -> tuple[np.ndarray, float]:
    """The map to simulate and its pixel size, from --map, --model, --protein and --symmetry."""
    model, protein = getattr(args, "model", None), getattr(args, "protein", None)
    symmetric = getattr(args, "symmetry", "C1") != "C1"
    if args.map and model:
        raise ValueError("--map and --model both give the object to simulate: use one")
    if protein and (args.map or model):
        raise ValueError(f"--protein picks a bundled protein: leave it out with --{'map' if args.map else 'model'}")
    if args.map and symmetric:
        raise ValueError("--symmetry builds its particle from the bundled protein: leave out --map")
    if model and not Path(model).is_file():
        raise ValueError(f"--model {model}: no such file")
    structure = model or density.bundled_structure_path(protein or density.DEFAULT_PROTEIN)
    if symmetric:
        group = point_group(args.symmetry)
        volume, unit_radius = density.symmetric_protein_map(group, args.box, args.pixel_size, model_path=structure)
        log.info(f"{args.symmetry}: {len(group)} copies of a {unit_radius:.0f} A core of {Path(structure).name}")
        return volume, args.pixel_size
    if args.map:
        return read_map(args.map)
    return density.atoms_to_map(structure, args.box, args.pixel_size), args.pixel_size


def run_simulate(args) -> dict:
    xp = get_xp(args.device)
    settings = SimulationSettings(
        n_particles=args.n_particles,
        snr=args.snr,
        seed=args.seed,
        defocus_min=args.defocus[0],
        defocus_max=args.defocus[1],
        envelope_bfactor_A2=getattr(args, "envelope_bfactor", 0.0),
        noise_colour=getattr(args, "coloured_noise", 0.0),
        preferred_fraction=getattr(args, "preferred_fraction", 0.0),
        preferred_cone_deg=getattr(args, "preferred_cone", 15.0),
        junk_fraction=getattr(args, "junk_fraction", 0.0),
        scale_sd=getattr(args, "scale_sd", 0.0),
        intensity_scale=getattr(args, "intensity_scale", 1.0),
        intensity_offset=getattr(args, "intensity_offset", 0.0),
        invert_contrast=getattr(args, "invert_contrast", False),
    )
    settings.check()
    volume, pixel_size = _simulated_object(args)
    for line in describe_effects(settings):
        log.info(line)
    t0 = time.time()
    paths = simulate_dataset(volume, pixel_size, args.out, settings, xp=xp)
    log.info(
        f"simulated {args.n_particles} particles, box {volume.shape[0]}, {pixel_size:g} A/px, "
        f"SNR {args.snr:g} in {time.time() - t0:.1f} s"
    )
    for key, path in paths.items():
        log.info(f"  {key:10s} {path}")
    return paths


def _symmetry_option(text: str) -> str:
    try:
        return symmetry_name(text)
    except SymmetryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------- reconstruct


def add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="Wiener half maps from particles with known poses")
    p.add_argument("--particles", required=True, help="RELION .star or cryoSPARC .cs with poses")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (when no rlnRandomSubset)")
    p.add_argument("--no-keep-split", action="store_true", help="ignore an input rlnRandomSubset")
    p.add_argument("--keep-duplicates", action="store_true", help=help_of(JobSettings, "keep_duplicates"))
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--image-root", help="folder that relative image paths are relative to")
    p.add_argument("--symmetry", default="C1", type=_symmetry_option, help=help_of(AbinitSettings, "symmetry"))
    add_settings_arguments(p, DeviceSettings)
    p.set_defaults(func=run_reconstruct)


def run_reconstruct(args) -> dict:
    return reconstruct_job(
        args.particles,
        args.out,
        args.seed,
        not args.no_keep_split,
        args.batch_size,
        settings_from_arguments(args, DeviceSettings),
        args.image_root,
        args.keep_duplicates,
        args.symmetry,
    )


# ----------------------------------------------------------------------------- fsc


def _add_two_maps(p) -> None:
    p.add_argument("map_a", help="MRC map (the reference)")
    p.add_argument("map_b", help="MRC map of the same box and pixel size")


def _read_two_maps(args) -> tuple[np.ndarray, np.ndarray, float]:
    """Maps A and B of the command line and their pixel size; a clear error when they do not match."""
    a, pixel_size = read_map(args.map_a)
    b, pixel_b = read_map(args.map_b)
    if a.shape != b.shape:
        raise ValueError(f"{args.map_a} {a.shape} and {args.map_b} {b.shape} differ in box size")
    if abs(pixel_size - pixel_b) > 1e-3 * pixel_size:
        raise ValueError(f"{args.map_a} ({pixel_size:g} A/px) and {args.map_b} ({pixel_b:g} A/px) differ in pixel size")
    return a, b, pixel_size


def add_fsc(sub) -> None:
    p = sub.add_parser("fsc", help="FSC of two maps, resolution at 0.5 and 0.143")
    _add_two_maps(p)
    p.add_argument("--mask", help="MRC mask multiplied into both maps")
    p.add_argument("--json", help="write the curve and resolutions to this JSON file")
    p.set_defaults(func=run_fsc)


def run_fsc(args) -> dict:
    a, b, pixel_size = _read_two_maps(args)
    mask = read_map(args.mask)[0] if args.mask else None
    if mask is not None and mask.shape != a.shape:
        raise ValueError(f"mask {args.mask} {mask.shape} does not match the maps {a.shape}")
    curve = fsc(a, b, mask)
    resolutions = resolution_at(curve, 0.143, pixel_size), resolution_at(curve, 0.5, pixel_size)
    report = fsc_report(curve, pixel_size, *resolutions)
    print(f"{'shell':>5} {'1/A':>8} {'A':>7} {'FSC':>7}")
    for s, (f, c) in enumerate(zip(*fsc_curve(report))):
        res = f"{1 / f:7.2f}" if f > 0 else "    inf"
        print(f"{s:5d} {f:8.4f} {res} {c:7.3f}")
    print(f"resolution at FSC 0.5: {report['resolution_05']:.2f} A; at 0.143: {report['resolution_0143']:.2f} A")
    if args.json:
        write_json(Path(args.json), report)
    return report


# ---------------------------------------------------------------------------- demo


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="simulate the bundled protein and reconstruct it from the known poses")
    p.add_argument("--out", default="habinit_demo", help="output folder (default: ./habinit_demo)")
    p.add_argument("--n-particles", type=int, default=5000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"))
    p.set_defaults(func=run_demo)


def run_demo(args) -> dict:
    out = Path(args.out)
    sim = argparse.Namespace(
        out=str(out / "simulated"),
        map=None,
        box=density.DEFAULT_BOX,
        pixel_size=density.DEFAULT_PIXEL_SIZE,
        n_particles=args.n_particles,
        snr=args.snr,
        seed=args.seed,
        defocus=(10000.0, 25000.0),
        device=args.device,
    )
    paths = run_simulate(sim)
    rec = argparse.Namespace(
        particles=str(paths["gt_poses"]),
        out=str(out / "reconstruction"),
        seed=args.seed,
        no_keep_split=False,
        keep_duplicates=False,
        symmetry="C1",
        batch_size=1000,
        image_root=None,
        device=args.device,
        gpu_mem_GB=None,
    )
    report = run_reconstruct(rec)
    truth, pixel_size = read_map(paths["gt_map"])
    map_a, _ = read_map(out / "reconstruction" / HALF_MAP_A)
    map_b, _ = read_map(out / "reconstruction" / HALF_MAP_B)
    vs_truth = fsc((map_a + map_b) / 2, truth)
    res_truth = resolution_at(vs_truth, 0.5, pixel_size)
    print()
    print("habinit demo: known-pose reconstruction of the bundled protein (adenylate kinase, 4AKE)")
    print(f"  particles            {args.n_particles} at SNR {args.snr:g}, box {truth.shape[0]}, {pixel_size:g} A/px")
    print(f"  gold-standard FSC    0.143 at {report['resolution_0143']:.2f} A, 0.5 at {report['resolution_05']:.2f} A")
    print(f"  vs ground truth      FSC 0.5 at {res_truth:.2f} A (Nyquist {2 * pixel_size:.2f} A)")
    print(f"  half maps            {out / 'reconstruction' / HALF_MAP_A}")
    print(f"                       {out / 'reconstruction' / HALF_MAP_B}")
    print(f"  ground truth map     {paths['gt_map']}")
    return {"gs_resolution_0143": report["resolution_0143"], "truth_resolution_05": res_truth}


# ------------------------------------------------------------------ ab initio jobs


def _option_help(f) -> str:
    """The help of a settings field's option: what it is, its unit and its default."""
    unit, default = unit_of(f.name), f.default
    return (
        f.metadata["help"] + (f" [{unit}]" if unit else "") + ("" if default in (None, "") else f"; default {default}")
    )


def add_settings_arguments(p, cls) -> None:
    """One option per field of a settings class (:mod:`.settings`): name, default, unit and help."""
    for f in cli_fields(cls):
        option, default = option_name(f.name), f.default
        if isinstance(default, bool):  # a switch: --NAME turns on an off default, --no-NAME turns off an on one
            flag = option.replace("--", "--no-", 1) if default else option
            action = "store_false" if default else "store_true"
            p.add_argument(
                flag, dest=f.name, action=action, help=("switch off " if default else "") + f.metadata["help"]
            )
            continue
        kind = float if default is None else type(default)
        metavar = f.name.rsplit("_", 1)[1].upper() if unit_of(f.name) else {float: "X", int: "N"}.get(kind)
        choices = f.metadata.get("choices") or None
        p.add_argument(
            option, dest=f.name, type=kind, default=default, choices=choices, metavar=metavar, help=_option_help(f)
        )


def settings_from_arguments(args, cls, **values):
    """A settings object from the parsed options of :func:`add_settings_arguments`, ``values`` replacing them."""
    return cls(**dict({f.name: getattr(args, f.name) for f in cli_fields(cls)}, **values))


def _add_abinit_arguments(p) -> None:
    """Input, output and device options, and the parameters cryoSPARC users know from its ab initio job."""
    p.add_argument("--particles", required=True, help="RELION .star (3.0 or 3.1+) or cryoSPARC .cs particles")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-root", help="folder that relative image paths are relative to")
    add_settings_arguments(p, AbinitSettings)
    p.add_argument("--quick", action="store_true", help="a short schedule for tests and demonstrations")
    add_settings_arguments(p, DeviceSettings)


def _abinit_settings(args) -> AbinitSettings:
    return settings_from_arguments(args, AbinitSettings, **(QUICK_SCHEDULE if args.quick else {}))


def add_run(sub) -> None:
    p = sub.add_parser("run", help="the gold-standard job: two half maps from scratch, aligned, with their FSC")
    _add_abinit_arguments(p)
    add_settings_arguments(p, JobSettings)
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    p.add_argument(
        "--restart-changed",
        action="store_true",
        help="start over when the output folder holds the checkpoint of other particles or parameters "
        "(default: refuse it)",
    )
    add_settings_arguments(p, WorkerSettings)
    p.add_argument(
        "--stage",
        choices=STAGES,
        help="with --parallel-halves: this stage of the coordinator only, the workers (habinit half) being run "
        "apart, as Scipion's steps do (prepare; phase 1 of both halves; align; phase 2; outputs)",
    )
    p.set_defaults(func=run_run)


def run_run(args) -> dict:
    settings = settings_from_arguments(args, JobSettings, abinit=_abinit_settings(args))
    device = settings_from_arguments(args, DeviceSettings)
    workers = settings_from_arguments(args, WorkerSettings)
    make_job = GoldStandardJob
    if workers.parallel:
        if workers.gpus:  # each worker on its GPUs; the coordinator's alignments on the CPU, holding no GPU
            device, worker_device = CPU, replace(device, device="gpu")
        else:
            worker_device = device
        make_job = WorkerLaunch(args.particles, args.image_root, worker_device, workers, args.stage).job
    elif args.stage:
        raise ValueError("--stage is a stage of the two-worker job: add --parallel-halves or --gpus")
    return gold_standard_job(
        args.particles,
        args.out,
        settings,
        device,
        args.overwrite,
        args.image_root,
        args.restart_changed,
        make_job,
    )


def add_half(sub) -> None:
    p = sub.add_parser(
        "half", help="one half's worker of the two-worker job (habinit run --parallel-halves starts them)"
    )
    p.add_argument("--out", required=True, help="the job's folder, prepared by habinit run --parallel-halves")
    p.add_argument("--half", required=True, choices=("A", "B"))
    p.add_argument(
        "--phase",
        required=True,
        type=int,
        choices=(1, 2),
        help="1: SGD and the first full pass; 2 (after habinit run --stage align): the other passes",
    )
    p.set_defaults(func=run_half)


def run_half(args) -> None:
    half_worker_job(args.out, args.half, args.phase)


def add_abinit(sub) -> None:
    p = sub.add_parser("abinit", help="one ab initio map from all given particles (no half sets)")
    _add_abinit_arguments(p)
    p.add_argument("--save-every", type=int, default=50, help="write the map every N iterations (0: never)")
    p.set_defaults(func=run_abinit)


def run_abinit(args) -> dict:
    device = settings_from_arguments(args, DeviceSettings)
    return single_abinit_job(args.particles, args.out, _abinit_settings(args), args.image_root, device, args.save_every)


def add_align(sub) -> None:
    p = sub.add_parser("align", help="align map B onto map A (rotation, shift and hand)")
    _add_two_maps(p)
    p.add_argument("--out", help="write map B, aligned, to this MRC file")
    p.add_argument("--no-mirror", action="store_true", help="do not try the other hand")
    p.set_defaults(func=run_align)


def run_align(args) -> dict:
    a, b, pixel_size = _read_two_maps(args)
    alignment = align_maps(a, b, pixel_size, AlignSettings(allow_mirror=not args.no_mirror))
    angles = matrix_to_euler(alignment.rotation[None])[0]
    aligned = transform_map(b, alignment)
    print(f"map B -> map A: rotation (rot, tilt, psi) {np.round(angles, 2).tolist()} deg, ")
    hand = "mirrored" if alignment.mirrored else "same"
    print(f"  shift {np.round(alignment.shift * pixel_size, 2).tolist()} A, hand {hand}")
    after = resolution_at(fsc(a, aligned), 0.5, pixel_size)
    print(f"  correlation {alignment.score:.3f}; FSC 0.5 after alignment at {after:.2f} A")
    if args.out:
        write_map(args.out, aligned, pixel_size)
        print(f"  aligned map B: {args.out}")
    return alignment.to_dict()


def add_symmetry(sub) -> None:
    p = sub.add_parser(
        "symmetry", help="find the symmetry axes of a map made in C1, put the map on RELION's axes and symmetrise it"
    )
    p.add_argument("map", help="MRC map (made without symmetry)")
    p.add_argument("--symmetry", required=True, type=_symmetry_option, help="point group, RELION's names")
    p.add_argument("--out", required=True, help="MRC file for the map on the axes, symmetrised")
    p.add_argument("--resolution", type=float, default=12.0, help="resolution of the axis search (A)")
    p.set_defaults(func=run_symmetry)


def run_symmetry(args) -> dict:
    volume, pixel_size = read_map(args.map)
    if not args.resolution > 2 * pixel_size:
        raise ValueError(f"--resolution must be coarser than Nyquist ({2 * pixel_size:g} A), got {args.resolution:g}")
    fit = find_symmetry_axes(volume, pixel_size, args.symmetry, args.resolution)
    angles = matrix_to_euler(fit.frame[None])[0]
    print(f"{args.symmetry} axes found: turn (rot, tilt, psi) {np.round(angles, 2).tolist()} deg about the map's")
    print(f"  centre of mass, {np.round(fit.centre_px * pixel_size, 2).tolist()} A from the box centre")
    print(f"{'operator':>8} {'correlation':>11}  (with its copy, up to {args.resolution:g} A)")
    for k, c in enumerate(fit.operator_correlations):
        print(f"{k + 1:8d} {c:11.3f}")
    weakest = float(np.min(fit.operator_correlations))
    if weakest < 0.5:
        log.warning(
            f"warning: the map's copy under one operator correlates only {weakest:.2f} with it: the map may not "
            f"have {args.symmetry} symmetry"
        )
    write_map(args.out, onto_axes(volume, fit, args.symmetry), pixel_size)
    print(f"  map on the axes, symmetrised: {args.out}")
    return fit.to_dict()


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="habinit", description="Homogeneous ab-initio refinement engine (gold-standard SGD ab initio)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        add_simulate,
        add_reconstruct,
        add_fsc,
        add_abinit,
        add_run,
        add_half,
        add_align,
        add_symmetry,
        add_demo,
    )
    for add in commands:
        add(sub)
    return parser


WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR}
RESUME_ADVICE = {
    "run": "rerun the same command to resume",
    "half": "rerun the same command to resume",
    "abinit": "habinit abinit keeps no checkpoint: rerun it to start over",
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    previous = stop.install()
    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"habinit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"habinit {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except stop.Interrupted as exc:
        advice = RESUME_ADVICE.get(args.command, "nothing was finished")
        print(f"habinit {args.command}: {exc}; {advice}", file=sys.stderr)
        return 128 + exc.signum
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        where = exc.filename or "the output folder"
        print(f"habinit {args.command}: error: cannot write {where}: {exc.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"habinit {args.command}: stopped at once (second interrupt)", file=sys.stderr)
        return 130
    finally:
        stop.restore(previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
