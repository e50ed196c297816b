"""The protocol in a headless Scipion project: three ways in, outputs, interop, viewer, hostile paths.

Particles (box 32, a few hundred, simulated from the bundled protein) come in as
1. a Scipion sqlite set built with pwem objects (image files + CTF), whose stack path holds a
   space, quotes and ``$(...)``;
2. a RELION 3.1 STAR imported through scipion-em-relion, with a half-set split to keep;
3. a set derived from a cryoSPARC ``.cs`` file (poses as rotation vectors, split 0/1), converted
   to STAR by the engine and imported like RELION's.
Each is refined with the quick schedule on the CPU (``--quick``), then the outputs are checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fixtures import write_cryosparc_cs
from habinit_plugin.engine.particles import load_particles, write_particles_star
from habinit_plugin.engine.so3 import euler_to_matrix
from habinit_plugin.engine.star import read_star

PIXEL_SIZE = 3.6
HOSTILE_DIR = 'stacks with space, it\'s "quoted" $(touch PWNED_DIR)'
HOSTILE_STACK = "part icles 'q' $(touch PWNED_FILE) `touch PWNED_TICK`.mrcs"


# ----------------------------------------------------------------------------- helpers


def import_particles(project, **kwargs):
    from pwem.protocols import ProtImportParticles

    from habinit_plugin.headless import launch

    kwargs = (
        dict(samplingRate=PIXEL_SIZE, magnification=10000, voltage=300, sphericalAberration=2.7, amplitudeContrast=0.1)
        | kwargs
    )
    prot = project.newProtocol(ProtImportParticles, **kwargs)
    return launch(project, prot)


def run_habinit(project, particles, label, **kwargs):
    from habinit_plugin.headless import launch
    from habinit_plugin.protocols import ProtHabinitHomoAbinitRefine

    kwargs = dict(useGpu=False, quickSchedule=True, numberOfThreads=2) | kwargs
    prot = project.newProtocol(ProtHabinitHomoAbinitRefine, objLabel=label, **kwargs)
    prot.inputParticles.set(particles)
    assert prot.validate() == []
    return launch(project, prot)


def check_outputs(prot, input_set, n_used_max):
    """Everything SCIPION.md asks of the outputs; at most ``n_used_max`` particles are used."""
    from pwem.constants import ALIGN_PROJ

    extra = Path(prot._getExtraPath())
    info = json.loads((extra / "run.json").read_text())
    assert info["status"] == "finished"
    input_ids = {p.getObjId() for p in input_set.iterItems()}
    n_input = len(input_ids)

    # particles: ids preserved, used + unused = input, 3D alignment and half set on every item
    used = prot.outputParticles
    n_used = used.getSize()
    assert n_used == info["n_used"] and 0 < n_used <= n_used_max
    assert used.getAlignment() == ALIGN_PROJ
    assert used.getSamplingRate() == pytest.approx(input_set.getSamplingRate())
    used_ids, halves = set(), []
    for part in used.iterItems():
        used_ids.add(part.getObjId())
        assert part.getTransform() is not None
        matrix = part.getTransform().getMatrix()
        assert np.allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-5)
        assert part.hasAttribute("_rlnRandomSubset")
        halves.append(int(part._rlnRandomSubset))
        assert float(part._rlnLogLikeliContribution) >= 0 and 0 < float(part._rlnMaxValueProbDistribution) <= 1
    assert set(halves) == {1, 2}
    assert used_ids <= input_ids
    n_unused = n_input - n_used
    assert info["n_unused"] == n_unused
    if n_unused:
        unused_ids = {p.getObjId() for p in prot.outputUnusedParticles.iterItems()}
        assert unused_ids | used_ids == input_ids and not unused_ids & used_ids
        assert len(read_star(extra / "unused_particles.star")["particles"]) == n_unused
    else:
        assert not prot.hasAttribute("outputUnusedParticles")

    # volume: average map with the two half maps, input box and pixel size
    volume = prot.outputVolume
    box = input_set.getXDim()
    assert volume.getDim() == (box, box, box)
    assert volume.getSamplingRate() == pytest.approx(input_set.getSamplingRate())
    halves_files = volume.getHalfMaps(asList=True)
    assert len(halves_files) == 2
    import mrcfile

    for path in [volume.getFileName(), *halves_files]:
        with mrcfile.open(path, permissive=True) as mrc:
            assert mrc.data.shape == (box, box, box)
            assert float(mrc.voxel_size.x) == pytest.approx(input_set.getSamplingRate(), rel=1e-4)
            assert int(mrc.header.ispg) == 1
    with (
        mrcfile.open(halves_files[0]) as a,
        mrcfile.open(halves_files[1]) as b,
        mrcfile.open(volume.getFileName()) as m,
    ):
        assert np.allclose(m.data, (a.data + b.data) / 2, atol=1e-4 * float(np.abs(m.data).max()))

    # FSC: the same curve as the engine's files
    fsc_json = json.loads((extra / "fsc.json").read_text())
    x, y = prot.outputFSC.getData()
    rows = fsc_json["curve"]
    assert len(x) == len(rows)
    for xi, yi, row in zip(x, y, rows):
        assert yi == pytest.approx(row["fsc"], abs=1e-5)
        if row["resolution_A"]:
            assert xi == pytest.approx(1.0 / row["resolution_A"], rel=1e-4)
    assert fsc_json["resolution_0143"] == pytest.approx(info["resolution_0143"])

    # the engine's PNGs for batch users
    for name in ("fsc.png", "resolution_per_iteration.png", "angular_distribution.png", "half_map_slices.png"):
        assert (extra / name).stat().st_size > 1000

    summary = " ".join(prot.summary())
    assert f"{info['resolution_0143']:.2f} A" in summary and f"Particles used: {n_used}" in summary
    assert prot.methods()
    return info


def run_killed_then_continued(project, prot, timeout=600):
    """Launch ``prot``, kill its engine (half A's worker: with 2 threads the half steps run one at a time) once it
    has written a checkpoint, check that the run failed, then Continue it. Returns the finished protocol and the
    engine's log of the continued run."""
    import signal
    import time

    import psutil
    from pyworkflow.protocol.constants import MODE_RESUME

    from habinit_plugin.headless import launch

    project.launchProtocol(prot, wait=False)
    extra = None
    deadline = time.time() + timeout
    extra = Path(prot._getExtraPath()).resolve()
    while time.time() < deadline:
        project._updateProtocol(prot)  # status from the run's own database
        if (extra / "halves" / "A" / "checkpoint" / "state.json").exists() or not prot.isActive():
            break
        time.sleep(0.2)
    assert prot.isActive(), f"the engine finished or failed before it could be killed: {prot.getStatus()}"
    engines = [
        p
        for p in psutil.process_iter(["pid", "cmdline"])
        if "habinit_plugin.engine" in (p.info["cmdline"] or []) and str(extra) in " ".join(p.info["cmdline"])
    ]
    assert len(engines) == 1, engines
    engines[0].send_signal(signal.SIGKILL)
    while prot.isActive() and time.time() < deadline:
        time.sleep(0.5)
        project._updateProtocol(prot)
    assert prot.isFailed(), prot.getStatus()
    assert not (extra / "run.json").exists() and not prot.hasAttribute("outputVolume")
    log_before = Path(prot.getStdoutLog()).read_text(errors="replace")

    prot.runMode.set(MODE_RESUME)
    prot = launch(project, prot)
    log_after = Path(prot.getStdoutLog()).read_text(errors="replace")
    return prot, log_after[len(log_before) :] if log_after.startswith(log_before) else log_after


def rotations_from_star(block):
    return euler_to_matrix(*(block.floats(c) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))


# ----------------------------------------------------------------------------- tests
# relion_run (the batch template on sim32, one finished run for the session) is in conftest.py


def test_relion_star_import_keeps_split_and_outputs(relion_run):
    imported, prot = relion_run
    input_set = imported.outputParticles
    check_outputs(prot, input_set, 300)
    input_split = {p.getObjId(): int(p._rlnRandomSubset) for p in input_set.iterItems()}
    for part in prot.outputParticles.iterItems():
        assert int(part._rlnRandomSubset) == input_split[part.getObjId()]
    assert prot.outputParticles.getSize() == 300 and prot.outputUnusedParticles.getSize() == 100


def test_relion_writer_gives_the_engine_poses_and_split(relion_run, tmp_path):
    """Our outputParticles through scipion-em-relion's writeSetOfParticles == the engine's particles.star."""
    from relion.convert import writeSetOfParticles

    _, prot = relion_run
    star = tmp_path / "from_scipion.star"
    writeSetOfParticles(prot.outputParticles, str(star))
    ours = read_star(star)["particles"]
    engine = read_star(Path(prot._getExtraPath("particles.star")))["particles"]
    ours_ids, engine_ids = ours.ints("rlnImageId"), engine.ints("rlnImageId")
    assert sorted(ours_ids) == sorted(engine_ids)
    order = np.argsort(ours_ids)
    engine_order = np.argsort(engine_ids)
    assert np.allclose(rotations_from_star(ours)[order], rotations_from_star(engine)[engine_order], atol=1e-4)
    for column in ("rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.allclose(ours.floats(column)[order], engine.floats(column)[engine_order], atol=1e-3)
    assert np.array_equal(ours.ints("rlnRandomSubset")[order], engine.ints("rlnRandomSubset")[engine_order])


def test_relion_postprocess_accepts_the_protocol(project, relion_run):
    """RELION post-processing's 'refinement protocol' pointer takes ours and finds the half maps."""
    from pyworkflow.plugin import Domain

    ProtRelionPostprocess = Domain.importFromPlugin("relion.protocols", "ProtRelionPostprocess", doRaise=True)
    _, prot = relion_run
    post = project.newProtocol(ProtRelionPostprocess, relionInput=True)
    post.protRefine.set(prot)
    param = post.getParam("protRefine")
    classes = [c.strip() for c in param.pointerClass.get().split(",")]
    assert any(cls in [k.__name__ for k in type(prot).mro()] for cls in classes)
    assert param.validate(post.protRefine) in (None, [], "")
    half_maps = post.protRefine.get().outputVolume.getHalfMaps(asList=True)
    assert len(half_maps) == 2 and all(os.path.exists(p) for p in half_maps)


def test_viewer_plots_headless(project, relion_run, tmp_path):
    from habinit_plugin.viewers import HabinitHomoAbinitViewer

    _, prot = relion_run
    viewer = HabinitHomoAbinitViewer(project=project, protocol=prot)
    viewer.setProtocol(prot)
    for param, views in ((k, f(k)) for k, f in viewer._getVisualizeDict().items()):
        path = tmp_path / f"{param}.png"
        views[0].savefig(str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_sqlite_set_with_hostile_stack_path(project, sim32, scipion_root):
    """Image files + CTF in a Scipion sqlite set, stack path with space, quotes and $(...): works, runs nothing."""
    from pwem.objects import Acquisition, CTFModel, Particle, SetOfParticles

    gt = load_particles(sim32["particles"])
    folder = scipion_root / "hostile" / HOSTILE_DIR
    folder.mkdir(parents=True)
    stack = folder / HOSTILE_STACK
    shutil.copy(sim32["stack"], stack)
    sqlite = scipion_root / "hostile" / "particles.sqlite"
    parts = SetOfParticles(filename=str(sqlite))
    parts.setSamplingRate(PIXEL_SIZE)
    acq = Acquisition(voltage=300, sphericalAberration=2.7, amplitudeContrast=0.1, magnification=10000)
    parts.setAcquisition(acq)
    parts.setHasCTF(True)
    for i in range(len(gt)):
        part = Particle(location=(int(gt.slice_of[i]) + 1, str(stack)))
        part.setSamplingRate(PIXEL_SIZE)
        part.setAcquisition(acq)
        ctf = CTFModel()
        ctf.setStandardDefocus(float(gt.ctf.defocus_u[i]), float(gt.ctf.defocus_v[i]), float(gt.ctf.defocus_angle[i]))
        part.setCTF(ctf)
        parts.append(part)
    parts.write()
    parts.close()

    imported = import_particles(project, objLabel="import sqlite", importFrom=4, sqliteFile=str(sqlite))
    input_set = imported.outputParticles
    assert input_set.getSize() == len(gt)
    prot = run_habinit(project, input_set, "habinit (sqlite, hostile path)")
    check_outputs(prot, input_set, len(gt))
    star = read_star(Path(prot._getExtraPath("input_particles.star")))["particles"]
    stacks = {name.split("@", 1)[1] for name in star.text("rlnImageName")}
    assert len(stacks) == 1 and os.path.samefile(stacks.pop(), stack)  # a plain-named link to the hostile stack
    assert not list(scipion_root.rglob("PWNED*")) and not list(Path(project.path).rglob("PWNED*"))
    assert not list(Path.cwd().glob("PWNED*"))


def test_cryosparc_cs_derived_set(project, sim32, tmp_path):
    """A cryoSPARC .cs (rotation-vector poses, split 0/1) -> STAR by the engine -> Scipion; the split is kept."""
    gt = load_particles(sim32["gt_poses"])
    folder = tmp_path / "cryosparc"
    folder.mkdir()
    shutil.copy(sim32["stack"], folder / "J12_particles.mrcs")
    n = len(gt)
    split = np.random.default_rng(1).integers(0, 2, n)
    write_cryosparc_cs(folder / "J12_particles.cs", gt, "J12_particles.mrcs", split=split, uid_start=10**15, uid_step=1)

    derived = load_particles(folder / "J12_particles.cs")
    write_particles_star(folder / "J12_particles.star", derived)
    star = folder / "J12_particles.star"  # Scipion's RELION import wants image paths relative to the STAR file
    star.write_text(star.read_text().replace(f"{folder}/", ""))
    imported = import_particles(
        project, objLabel="import cryoSPARC-derived", importFrom=3, starFile=str(folder / "J12_particles.star")
    )
    input_set = imported.outputParticles

    # this run is also the Continue test: the engine is killed mid-run, then the protocol is continued
    from habinit_plugin.protocols import ProtHabinitHomoAbinitRefine

    prot = project.newProtocol(
        ProtHabinitHomoAbinitRefine,
        objLabel="habinit (cryoSPARC .cs, killed, continued)",
        useGpu=False,
        quickSchedule=True,
        numberOfThreads=2,
    )
    prot.inputParticles.set(input_set)
    prot, continued_log = run_killed_then_continued(project, prot)
    resumed = re.search(r"resumed from .*\(phase (\w+), iteration (\d+)\)", continued_log)
    assert resumed, continued_log[-3000:]
    iteration = int(resumed.group(2))
    half_a = continued_log[resumed.end() : continued_log.index("half A: phase 1 done")]  # then half B's step
    redone = [int(k) for k in re.findall(r"SGD iteration (\d+)/", half_a)]
    assert all(k > iteration for k in redone), (iteration, redone)  # no finished SGD iteration is redone
    assert json.loads(Path(prot._getExtraPath("run.json")).read_text())["resumed"] is True
    check_outputs(prot, input_set, n)
    by_id = {p.getObjId(): int(p._rlnRandomSubset) for p in prot.outputParticles.iterItems()}
    assert [by_id[i + 1] for i in range(n)] == list(split + 1)  # cryoSPARC split 0/1 kept as 1/2


def test_a_symmetric_set_with_its_symmetry(project, tmp_path):
    """A D2 tetramer imported from RELION STAR, refined with Symmetry 'd2': the outputs carry the symmetry, the
    map has it, the poses lie in the asymmetric unit."""
    from habinit_plugin.engine import density
    from habinit_plugin.engine.simulate import SimulationSettings, simulate_dataset
    from habinit_plugin.engine.symmetry import canonical_poses, point_group

    volume, _ = density.symmetric_protein_map(point_group("D2"), 32, PIXEL_SIZE)
    paths = simulate_dataset(volume, PIXEL_SIZE, tmp_path / "d2", SimulationSettings(n_particles=300, snr=1.0, seed=4))
    imported = import_particles(project, objLabel="import D2", importFrom=3, starFile=str(paths["particles"]))
    prot = run_habinit(project, imported.outputParticles, "habinit D2", symmetryGroup="d2")
    info = check_outputs(prot, imported.outputParticles, 300)
    assert info["symmetry"] == "D2" and info["parameters"]["abinit"]["symmetry"] == "D2"
    assert prot.outputVolume.symmetryGroup.get() == "D2" and prot.outputParticles.symmetryGroup.get() == "D2"
    assert "Symmetry imposed: D2" in " ".join(prot.summary())
    import mrcfile

    with mrcfile.open(prot.outputVolume.getFileName()) as mrc:
        m = np.array(mrc.data)
    turned = np.roll(np.flip(m, axis=(1, 2)), 1, axis=(1, 2))  # 180 degrees about z
    assert np.corrcoef(m.ravel(), turned.ravel())[0, 1] > 0.99
    rotations = load_particles(Path(prot._getExtraPath("particles.star"))).rotations
    assert np.allclose(canonical_poses(rotations, "D2"), rotations)
