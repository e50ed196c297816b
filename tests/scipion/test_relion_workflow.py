"""The workflow with the real RELION programs around habinit, in one headless Scipion project (issue 16).

import a simulated set -> scipion-em-relion 2D classification (the real ``relion_refine``, EM, not VDAM) ->
habinit on the 2D classes (quick schedule, CPU) -> scipion-em-relion post-processing of our half maps with our
``mask.mrc`` imported as a mask, and 3D auto-refine (``relion_refine_mpi``) with local searches from our poses, our
map (low-passed) as reference, our mask, and our half-set split.

RELION is Debian's 3.1.3 (``apt-get install relion``, as CI does), driven by scipion-em-relion 5 through a
``RELION_HOME`` whose ``bin/`` links to the Debian programs; its folder name holds no "4.0" or "5.0", so the plugin
treats it as "not RELION 5". Three things this needs that a user meets too:

- 2D classification with "Use VDAM algorithm?" (``useGradientAlg``) No: RELION 3.1 has no ``--grad``.
- 3D auto-refine needs 3 MPI processes (the plugin refuses fewer, and ``relion_refine`` without MPI refuses
  ``--split_random_halves``): a leader and one follower per half set. On a 2-core machine Open MPI must be allowed
  to oversubscribe (``OMPI_MCA_rmaps_base_oversubscribe``), the idle leader must yield its core
  (``OMPI_MCA_mpi_yield_when_idle``), and as root (CI) ``mpirun`` runs only with ``OMPI_ALLOW_RUN_AS_ROOT``.
- Ghostscript is not needed: without ``gs`` relion_postprocess 3.1.3 writes an empty logfile.pdf and exits 0 (when
  its ``--o`` has a folder, as Scipion's has).

The data: 600 particles of the bundled protein (about 50 A across), box 32, 3.6 A/px (Nyquist 7.2 A), SNR 0.1:
enough noise that the resolutions (9-11 A) are well below Nyquist, so that the comparisons can fail.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from habinit_plugin.engine.mrc import read_map
from habinit_plugin.engine.truth import compare_to_truth

RELION_PROGRAMS = ("relion_refine", "relion_refine_mpi", "relion_postprocess", "relion_image_handler", "mpirun")
pytestmark = pytest.mark.skipif(
    any(shutil.which(p) is None for p in RELION_PROGRAMS),
    reason="RELION 3.1 (Debian's relion: relion_refine, relion_refine_mpi, relion_postprocess, "
    "relion_image_handler) or mpirun is not on PATH",
)

PIXEL_SIZE_A = 3.6
BOX_PX = 32
N_PARTICLES = 600
SNR = 0.1
PARTICLE_DIAMETER_A = 80  # the protein is about 50 A across; RELION's circular mask for the images
N_CLASSES_2D = 3
N_ITERATIONS_2D = 10
REFERENCE_LOW_PASS_A = 15.0  # our map as auto-refine's reference, low-passed (RELION's --ini_high)
# scipion-em-relion passes the index in its list of samplings as --healpix_order; RELION runs order 4 as 3.75 degrees
# (the list labels it 1.8): the initial sampling and the one local searches start from, so they start at once
LOCAL_SAMPLING_INDEX = 4
# RELION's seed is the time by default; fixed as our protocol's is (randomSeed 0), so that CI repeats one run
RELION_SEED = "--random_seed 0"
RESOLUTION_TOLERANCE = 0.10  # RELION's post-processing vs our gold-standard FSC (issue 16)
# Open MPI for 3 processes on any machine: oversubscribe small ones, let the idle leader yield, allow root (CI)
MPI_ENVIRONMENT = {
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",  # containers may forbid the ptrace that CMA needs
}


@pytest.fixture(scope="module")
def relion31_home(tmp_path_factory):
    """A RELION_HOME for scipion-em-relion whose bin/ links to the Debian programs (the folder of relion_refine),
    set for this process's plugin and for the protocols' subprocesses, with the MPI variables; all restored after."""
    from relion import Plugin
    from relion.constants import RELION_HOME

    debian_bin = Path(shutil.which("relion_refine")).resolve().parent
    home = tmp_path_factory.mktemp("relion_home") / "relion-3.1-debian"
    (home / "bin").mkdir(parents=True)
    for program in sorted(debian_bin.glob("relion_*")):
        (home / "bin" / program.name).symlink_to(program)
    variables = {RELION_HOME: str(home)} | MPI_ENVIRONMENT
    saved_environment = {name: os.environ.get(name) for name in variables}
    saved_home = Plugin.getVar(RELION_HOME)
    os.environ.update(variables)
    Plugin._vars[RELION_HOME] = str(home)
    assert not Plugin.IS_GT50() and Plugin.getHome("bin", "relion_refine") == str(home / "bin" / "relion_refine")
    yield home
    if saved_home is None:
        Plugin._vars.pop(RELION_HOME, None)
    else:
        Plugin._vars[RELION_HOME] = saved_home
    for name, value in saved_environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict:
    """The simulated set (module docstring): particles.star (CTF, no poses), stack, gt_map.mrc."""
    from habinit_plugin.engine import density
    from habinit_plugin.engine.simulate import SimulationSettings, simulate_dataset

    volume = density.bundled_protein_map(BOX_PX, PIXEL_SIZE_A)
    settings = SimulationSettings(n_particles=N_PARTICLES, snr=SNR, seed=5, shift_sigma=2.0)
    return simulate_dataset(volume, PIXEL_SIZE_A, tmp_path_factory.mktemp("relion_workflow_sim"), settings)


def _timed_launch(project, prot, seconds: dict, step: str):
    """Launch ``prot`` (waiting; raises with its log tail on failure); its wall time goes to ``seconds[step]``."""
    from habinit_plugin.headless import launch

    assert prot.validate() == [], f"{step}: {prot.validate()}"
    start = time.monotonic()
    prot = launch(project, prot)
    seconds[step] = time.monotonic() - start
    return prot


@pytest.fixture(scope="module")
def workflow(project, relion31_home, simulated) -> dict:
    """Every step of the workflow, finished: {step name: protocol}, with "seconds": {step name: wall time}."""
    from pwem.protocols import ProtImportMask, ProtImportParticles
    from pyworkflow.plugin import Domain

    from habinit_plugin.protocols import ProtHabinitHomoAbinitRefine

    relion = {
        name: Domain.importFromPlugin("relion.protocols", name, doRaise=True)
        for name in ("ProtRelionClassify2D", "ProtRelionPostprocess", "ProtRelionRefine3D")
    }
    seconds: dict[str, float] = {}
    steps = {"seconds": seconds}
    new = project.newProtocol

    steps["import"] = _timed_launch(
        project,
        new(
            ProtImportParticles,
            objLabel="import simulated (RELION STAR)",
            importFrom=ProtImportParticles.IMPORT_FROM_RELION,
            starFile=str(simulated["particles"]),
            samplingRate=PIXEL_SIZE_A,
            magnification=10000,
            voltage=300,
            sphericalAberration=2.7,
            amplitudeContrast=0.1,
        ),
        seconds,
        "import",
    )
    classify = new(
        relion["ProtRelionClassify2D"],
        objLabel="relion 2D classification (3.1, EM)",
        numberOfClasses=N_CLASSES_2D,
        useGradientAlg=False,  # VDAM (--grad) is RELION 4+
        numberOfIterations=N_ITERATIONS_2D,
        maskDiameterA=PARTICLE_DIAMETER_A,
        doGpu=False,
        numberOfMpi=1,
        numberOfThreads=2,
        extraParams=RELION_SEED,
    )
    classify.inputParticles.set(steps["import"].outputParticles)
    steps["classify2d"] = _timed_launch(project, classify, seconds, "classify2d")

    habinit = new(
        ProtHabinitHomoAbinitRefine,
        objLabel="habinit on the RELION classes",
        useGpu=False,
        quickSchedule=True,
        numberOfThreads=2,
    )
    habinit.inputParticles.set(steps["classify2d"].outputClasses)
    steps["habinit"] = _timed_launch(project, habinit, seconds, "habinit")

    mask = new(
        ProtImportMask,
        objLabel="our mask.mrc as a mask",
        maskPath=os.path.abspath(steps["habinit"]._getExtraPath("mask.mrc")),
        samplingRate=PIXEL_SIZE_A,
    )
    steps["mask"] = _timed_launch(project, mask, seconds, "import mask")

    post = new(
        relion["ProtRelionPostprocess"],
        objLabel="relion post-processing of our half maps",
        relionInput=True,
        doAutoBfactor=False,  # the Guinier fit starts at 10 A, about the resolution here; sharpening is not checked
        bfactor=0.0,
    )
    post.protRefine.set(steps["habinit"])
    post.solventMask.set(steps["mask"].outputMask)
    steps["postprocess"] = _timed_launch(project, post, seconds, "postprocess")

    refine = new(
        relion["ProtRelionRefine3D"],
        objLabel="relion 3D auto-refine from our poses",
        copyAlignment=True,  # "Consider previous alignment?": start from our poses
        angularSamplingDeg=LOCAL_SAMPLING_INDEX,  # initial sampling = local-search sampling: local from the start
        localSearchAutoSamplingDeg=LOCAL_SAMPLING_INDEX,
        offsetSearchRangePix=3.0,
        offsetSearchStepPix=1.0,
        initialLowPassFilterA=REFERENCE_LOW_PASS_A,
        maskDiameterA=PARTICLE_DIAMETER_A,
        symmetryGroup="c1",
        doGpu=False,
        numberOfMpi=3,  # a leader and one follower per half set (the plugin's minimum)
        numberOfThreads=1,
        extraParams=RELION_SEED,
    )
    refine.inputParticles.set(steps["habinit"].outputParticles)
    refine.referenceVolume.set(steps["habinit"].outputVolume)
    refine.referenceMask.set(steps["mask"].outputMask)
    steps["refine3d"] = _timed_launch(project, refine, seconds, "refine3d")
    return steps


def _postprocess_star(post, table_name: str):
    """A table of relion_postprocess's postprocess.star ("general" or "fsc"), as emtable reads it."""
    from emtable import Table

    return Table(fileName=post._getExtraPath("postprocess.star"), tableName=table_name)


def _postprocess_resolution_A(post) -> float:
    """rlnFinalResolution of relion_postprocess (Angstrom): the last shell whose corrected FSC is >= 0.143."""
    return float(_postprocess_star(post, "general")[0].rlnFinalResolution)


def _auto_refine_resolution_A(refine) -> float:
    """RELION auto-refine's own final gold-standard resolution, unmasked (relion_model.star, Angstrom)."""
    from emtable import Table

    table = Table(fileName=refine._getExtraPath("relion_model.star"), tableName="model_general")
    return float(table[0].rlnCurrentResolution)


def _habinit_report(habinit) -> dict:
    """Our fsc.json: "curve" (unmasked) and "masked" (curve, resolutions, the mask's parameters)."""
    return json.loads(Path(habinit._getExtraPath("fsc.json")).read_text())


@pytest.fixture(scope="module")
def against_truth(workflow, simulated) -> dict:
    """{"habinit": ..., "relion": ...}: each map aligned onto the true map by our align3d, mirror allowed (a map
    from scratch has an arbitrary hand), with its FSC against it (engine.truth.TruthComparison)."""
    truth, _ = read_map(simulated["gt_map"])
    maps = {"habinit": workflow["habinit"].outputVolume, "relion": workflow["refine3d"].outputVolume}
    return {name: compare_to_truth(read_map(v.getFileName())[0], truth, PIXEL_SIZE_A) for name, v in maps.items()}


def test_every_step_finishes_with_its_outputs(workflow, against_truth, capsys):
    """Each protocol finished with the outputs the next one takes; the run's numbers go to the terminal."""
    classes = workflow["classify2d"].outputClasses
    assert classes.getSize() >= 1 and sum(cls.getSize() for cls in classes.iterItems()) == N_PARTICLES
    habinit = workflow["habinit"]
    assert habinit.outputParticles.getSize() == N_PARTICLES and len(habinit.outputVolume.getHalfMaps(asList=True)) == 2
    assert os.path.exists(workflow["postprocess"].outputVolume.getFileName())
    refined = workflow["refine3d"]
    assert os.path.exists(refined.outputVolume.getFileName()) and refined.outputParticles.getSize() == N_PARTICLES
    report, seconds = _habinit_report(habinit), workflow["seconds"]
    ours, relion = against_truth["habinit"], against_truth["relion"]
    post_A = _postprocess_resolution_A(workflow["postprocess"])
    with capsys.disabled():
        print(
            f"\nRELION 3.1 workflow, {N_PARTICLES} particles, box {BOX_PX}, {PIXEL_SIZE_A} A/px, SNR {SNR}:"
            f"\n  step times: "
            + ", ".join(f"{step} {s:.0f} s" for step, s in seconds.items())
            + f" (total {sum(seconds.values()):.0f} s); RELION 2D classification {seconds['classify2d']:.0f} s"
            f"\n  habinit GS-FSC 0.143: {report['resolution_0143']:.2f} A unmasked, "
            f"{report['masked']['resolution_0143']:.2f} A masked"
            f"\n  RELION post-processing of our half maps (our mask): {post_A:.2f} A"
            f"\n  RELION auto-refine from our poses: own GS-FSC {_auto_refine_resolution_A(refined):.2f} A unmasked"
            f"\n  FSC 0.5 vs truth: RELION auto-refine {relion.resolution_05:.2f} A, habinit {ours.resolution_05:.2f} A"
            f" (FSC 0.143: {relion.resolution_0143:.2f} A, {ours.resolution_0143:.2f} A; hand mirrored: "
            f"{relion.alignment.mirrored}, {ours.alignment.mirrored})"
        )


def test_relion_auto_refine_keeps_our_half_set_split(workflow):
    """Every particle of RELION's refinement has the rlnRandomSubset it had in ours (both halves present)."""
    ours = {p.getObjId(): int(p._rlnRandomSubset) for p in workflow["habinit"].outputParticles.iterItems()}
    relion = {p.getObjId(): int(p._rlnRandomSubset) for p in workflow["refine3d"].outputParticles.iterItems()}
    assert set(ours.values()) == {1, 2}
    assert relion == ours


def _poses(particles) -> dict[int, np.ndarray]:
    """{particle id: (4, 4) Scipion transform matrix (rotation, shift in pixels)} of a set with 3D alignment."""
    return {p.getObjId(): np.array(p.getTransform().getMatrix()) for p in particles.iterItems()}


def test_relion_auto_refine_searches_locally_from_our_poses(workflow):
    """RELION searches locally from its first iteration (a rotational prior in it001's model: 3.75 degrees) and its
    final poses stay near ours: median rotation between the two < 15 degrees (measured 7: the scatter of the poses
    at SNR 0.1; poses read in another convention would be about 100 degrees away) and median shift change < 1 px
    (measured 0.5)."""
    from emtable import Table

    refine = workflow["refine3d"]
    first = Table(fileName=refine._getExtraPath("relion_it001_half1_model.star"), tableName="model_general")
    assert 0 < float(first[0].rlnSigmaPriorRotAngle) <= 4.0
    ours, relion = _poses(workflow["habinit"].outputParticles), _poses(refine.outputParticles)
    assert set(relion) == set(ours)
    ids = sorted(ours)
    rotation_ours = np.array([ours[i][:3, :3] for i in ids])
    rotation_relion = np.array([relion[i][:3, :3] for i in ids])
    cosine = (np.einsum("pij,pij->p", rotation_ours, rotation_relion) - 1.0) / 2.0
    angle_deg = np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))
    shift_px = np.linalg.norm(np.array([ours[i][:2, 3] - relion[i][:2, 3] for i in ids]), axis=1)
    assert np.median(angle_deg) < 15.0, np.percentile(angle_deg, [25, 50, 75])
    assert np.median(shift_px) < 1.0, np.percentile(shift_px, [25, 50, 75])


def test_relion_auto_refine_is_no_worse_than_ours_against_the_truth(against_truth):
    """RELION's refined map (from our poses, map and split) against the true map: its FSC 0.5 resolution is no
    worse than our map's, and it kept our map's hand. Measured with RELION's seed 0: 9.67 A vs 10.60 A. RELION's
    result depends on its seed here (300 particles a half set at SNR 0.1; the seed moves its angular grid each
    iteration): seeds 0-4 and two time seeds gave 9.55-11.36 A, and one of the seven (seed 3, 11.36 A) was worse
    than ours; at FSC 0.143 against the truth all seven were better than ours (7.2-8.3 A vs 8.5 A)."""
    ours, relion = against_truth["habinit"], against_truth["relion"]
    assert relion.alignment.mirrored == ours.alignment.mirrored
    assert relion.resolution_05 <= ours.resolution_05, (relion.resolution_05, ours.resolution_05)


def test_relion_postprocess_resolution_is_our_gold_standard_fsc(workflow):
    """relion_postprocess of our half maps with our mask against our masked GS-FSC: the same mask and the same
    correction (phase randomisation beyond the unmasked FSC's 0.8 shell), so this is the like-for-like pair (our
    unmasked resolution is coarser: the solvent's noise is in it). The resolutions agree within 10% (measured 9.60 A
    vs 9.13 A: RELION reports the last shell >= 0.143, ours interpolates the crossing), and the curves shell by shell
    up to our resolution within 0.1 masked (measured max 0.04) and 0.05 unmasked (measured max 0.02)."""
    report = _habinit_report(workflow["habinit"])
    relion_A, ours_A = _postprocess_resolution_A(workflow["postprocess"]), report["masked"]["resolution_0143"]
    assert abs(relion_A - ours_A) <= RESOLUTION_TOLERANCE * ours_A, (relion_A, ours_A, report["resolution_0143"])

    rows = list(_postprocess_star(workflow["postprocess"], "fsc"))
    shells = range(1, int(BOX_PX * PIXEL_SIZE_A / ours_A) + 1)
    relion_masked = np.array([float(rows[k].rlnFourierShellCorrelationCorrected) for k in shells])
    relion_unmasked = np.array([float(rows[k].rlnFourierShellCorrelationUnmaskedMaps) for k in shells])
    ours_masked = np.array([report["masked"]["curve"][k]["fsc"] for k in shells])
    ours_unmasked = np.array([report["curve"][k]["fsc"] for k in shells])
    assert np.abs(relion_masked - ours_masked).max() <= 0.1, np.round(relion_masked - ours_masked, 3)
    assert np.abs(relion_unmasked - ours_unmasked).max() <= 0.05, np.round(relion_unmasked - ours_unmasked, 3)
