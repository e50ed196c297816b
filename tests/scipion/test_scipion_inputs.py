"""The protocol's inputs and form as a user meets them: 2D classes as input, the GPU default, the schedule level,
the plugin's display name, the hand note.

Classes are built headless from the simulated set sim32 (400 particles, box 32, 3.6 A/px) with pwem's
SetOfClasses2D API: four classes of 100 particles each, class 2 disabled, one particle of class 3
disabled (Scipion's subset from classes leaves out both).
"""

from __future__ import annotations

import json
import os
import re
import stat
from importlib.util import find_spec
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from habinit_plugin.engine.particles import load_particles
from habinit_plugin.engine.star import read_star

PIXEL_SIZE = 3.6
N_CLASSES = 4
DISABLED_CLASS = 2  # class ids start at 1
DISABLED_PARTICLE_CLASS = 3  # one particle of this (enabled) class is disabled


def particle_set(path: Path, stack: Path, gt, ctf: bool = True, split=None):
    """A Scipion SetOfParticles (sqlite ``path``) of the images of ``stack``: ids 1..n, CTF from ``gt``."""
    from pwem.objects import Acquisition, CTFModel, Integer, Particle, SetOfParticles

    parts = SetOfParticles(filename=str(path))
    parts.setSamplingRate(PIXEL_SIZE)
    acquisition = Acquisition(voltage=300, sphericalAberration=2.7, amplitudeContrast=0.1, magnification=10000)
    parts.setAcquisition(acquisition)
    parts.setHasCTF(ctf)
    for i in range(len(gt)):
        part = Particle(location=(int(gt.slice_of[i]) + 1, str(stack)))
        part.setSamplingRate(PIXEL_SIZE)
        part.setAcquisition(acquisition)
        if ctf:
            model = CTFModel()
            model.setStandardDefocus(
                float(gt.ctf.defocus_u[i]), float(gt.ctf.defocus_v[i]), float(gt.ctf.defocus_angle[i])
            )
            part.setCTF(model)
        if split is not None:
            part._rlnRandomSubset = Integer(int(split[i]))
        parts.append(part)
    parts.write()
    return parts


def fill_classes(classes, particles) -> list[int]:
    """Four classes of consecutive particles (2D alignment, identity transforms); class DISABLED_CLASS disabled and
    the first particle of class DISABLED_PARTICLE_CLASS disabled. Returns the ids a subset from classes takes."""
    from pwem.constants import ALIGN_2D
    from pwem.objects import Class2D, Transform

    ids = sorted(particles.getIdSet())
    per_class = len(ids) // N_CLASSES
    taken = []
    for k in range(1, N_CLASSES + 1):
        members = set(ids[(k - 1) * per_class : k * per_class])
        cls = Class2D()
        cls.setObjId(k)
        cls.setAlignment(ALIGN_2D)
        classes.append(cls)
        for part in particles.iterItems(orderBy="id"):
            if part.getObjId() not in members:
                continue
            item = part.clone()
            item.setTransform(Transform())
            first_of_class = item.getObjId() == min(members)
            item.setEnabled(not (k == DISABLED_PARTICLE_CLASS and first_of_class))
            cls.append(item)
            if k != DISABLED_CLASS and item.isEnabled():
                taken.append(item.getObjId())
        cls.setEnabled(k != DISABLED_CLASS)
        classes.update(cls)
    classes.write()
    return sorted(taken)


@pytest.fixture(scope="module")
def sim32_gt(sim32):
    return load_particles(sim32["particles"])


@pytest.fixture(scope="module")
def headless_classes(tmp_path_factory, sim32, sim32_gt):
    """Particles with and without CTF and their classes, in sqlite files outside any project (validation only)."""
    from pwem.objects import SetOfClasses2D

    folder = tmp_path_factory.mktemp("classes")
    made = {}
    for name, ctf in (("ctf", True), ("noctf", False)):
        particles = particle_set(folder / f"particles_{name}.sqlite", Path(sim32["stack"]), sim32_gt, ctf=ctf)
        classes = SetOfClasses2D(filename=str(folder / f"classes_{name}.sqlite"))
        classes.setImages(particles)
        made[name] = (particles, classes, fill_classes(classes, particles))
    return made


def new_prot(project, **kwargs):
    from habinit_plugin.protocols import ProtHabinitHomoAbinitRefine

    return project.newProtocol(ProtHabinitHomoAbinitRefine, **kwargs)


def validate_on(project, source, **kwargs):
    prot = new_prot(project, **({"useGpu": False} | kwargs))
    prot.inputParticles.set(source)
    return prot, prot.validate()


# ----------------------------------------------------------------------------- classes, validation only


def test_classes_validate_and_give_the_enabled_classes_particles(project, headless_classes):
    particles, classes, taken = headless_classes["ctf"]
    prot, errors = validate_on(project, classes)
    assert errors == []
    assert len(taken) == 2 * 100 + 99  # classes 1 and 4, class 3 without its disabled particle
    assert prot._inputParticleIds() == taken
    assert prot._inputSize() == 299
    assert prot._inputImages().getSamplingRate() == pytest.approx(PIXEL_SIZE)
    first = prot._firstInputParticle()
    assert first.getObjId() == taken[0] and first.getFileName().endswith(".mrcs")
    # the same checks on the particles themselves: every particle is input
    prot, errors = validate_on(project, particles)
    assert errors == [] and prot._inputParticleIds() == list(range(1, 401))


def test_classes_without_ctf_get_the_particles_message(project, headless_classes):
    particles, classes, _ = headless_classes["noctf"]
    _, class_errors = validate_on(project, classes)
    _, particle_errors = validate_on(project, particles)
    assert class_errors == particle_errors
    assert len(class_errors) == 1 and "no CTF information" in class_errors[0]


def test_classes_count_rule_counts_the_enabled_particles(project, headless_classes):
    """numberOfParticles above the enabled classes' 299 particles uses 299; 'at least 20' counts them too."""
    _, classes, _ = headless_classes["ctf"]
    _, errors = validate_on(project, classes, numberOfParticles=10)
    assert len(errors) == 1 and errors[0].startswith("Only 10 particle(s) would be used; at least 20 are needed")


def test_classes_with_a_bad_split_get_the_split_message(project, tmp_path, sim32, sim32_gt):
    """A value 3 of _rlnRandomSubset in an enabled class is refused; the same value in a disabled class is not."""
    from pwem.objects import SetOfClasses2D

    split = np.where(np.arange(400) % 2, 1, 2)
    split[150] = 3  # particle id 151: class 2, disabled
    particles = particle_set(tmp_path / "split.sqlite", Path(sim32["stack"]), sim32_gt, split=split)
    classes = SetOfClasses2D(filename=str(tmp_path / "split_classes.sqlite"))
    classes.setImages(particles)
    fill_classes(classes, particles)
    assert validate_on(project, classes)[1] == []
    _, errors = validate_on(project, particles)
    assert len(errors) == 1 and "_rlnRandomSubset has value(s) 3" in errors[0]


def test_input_param_offers_classes_and_particles(project):
    param = new_prot(project).getParam("inputParticles")
    assert [c.strip() for c in param.pointerClass.get().split(",")] == ["SetOfParticles", "SetOfClasses2D"]
    assert not param.pointerCondition.get()  # 'hasCTF' cannot be evaluated on classes: validation checks it
    assert "enabled classes" in param.help.get() and "disabled classes" in param.help.get()


# ----------------------------------------------------------------------------- the form


def _gui_gpu_label() -> str:
    """The label pyworkflow's form draws on the run header's GPU line (read from its source, not imported)."""
    source = Path(find_spec("pyworkflow.gui.form").origin).read_text()
    found = re.search(r'if allowGpu:\s+self\._createHeaderLabel\(runFrame, "([^"]+)"', source)
    assert found, "pyworkflow's form no longer draws the GPU line as it did"
    return found.group(1)


def test_gpu_default_follows_this_machine_and_validates(project, headless_classes):
    """No nvidia-smi here: GPU off by default, and the default form (threads included) validates."""
    import shutil

    from pyworkflow.protocol.params import GPU_LIST, USE_GPU

    from habinit_plugin.protocols.protocol_homo_abinit import nvidia_gpu_present

    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi; the fake-nvidia-smi test covers the GPU side")
    particles, classes, _ = headless_classes["ctf"]
    prot = new_prot(project)
    assert nvidia_gpu_present() is False and prot.useGpu.get() is False and not prot.usesGpu()
    threads = prot.numberOfThreads.get()
    assert 1 <= threads <= min(4, len(os.sched_getaffinity(0)))
    for source in (particles, classes):
        prot = new_prot(project)
        prot.inputParticles.set(source)
        assert prot.validate() == []
    label = _gui_gpu_label()
    # pyworkflow blanks the labels of hidden params; the line's help button shows GPU_LIST's help
    assert prot.getParam(GPU_LIST).help.get().startswith(f"'{label}' Yes runs the engine on an NVIDIA GPU")
    assert prot.getParam(USE_GPU).help.get() == prot.getParam(GPU_LIST).help.get()


@pytest.mark.parametrize(
    ("listing", "code", "present"), [("GPU 0: NVIDIA H100 (UUID: GPU-1)", 0, True), ("NVIDIA-SMI has failed", 9, False)]
)
def test_gpu_default_with_a_fake_nvidia_smi(project, tmp_path, monkeypatch, listing, code, present):
    from habinit_plugin.protocols.protocol_homo_abinit import nvidia_gpu_present

    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] && echo '{listing}'\nexit {code}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    nvidia_gpu_present.cache_clear()
    try:
        assert nvidia_gpu_present() is present
        assert new_prot(project).useGpu.get() is present
    finally:
        monkeypatch.undo()
        nvidia_gpu_present.cache_clear()


def test_gpu_message_names_the_form_label(project, headless_classes):
    """GPU on where the engine sees none: the message says what to set, in the form's words."""
    from habinit_plugin.engine.backend import gpu_available

    if gpu_available():
        pytest.skip("the engine sees a GPU here: nothing to refuse")
    particles, _, _ = headless_classes["ctf"]
    _, errors = validate_on(project, particles, useGpu=True)
    label = _gui_gpu_label()
    assert len(errors) == 1 and f"Set '{label}' to No" in errors[0]
    assert "Use GPU?" not in errors[0]


def test_quick_schedule_is_on_the_normal_level(project):
    from pyworkflow.protocol.params import LEVEL_NORMAL

    param = new_prot(project).getParam("quickSchedule")
    assert param.expertLevel.get() == LEVEL_NORMAL


def test_display_name_is_habinit(project):
    from pwem import Domain

    from habinit_plugin.protocols import ProtHabinitHomoAbinitRefine

    assert "habinit_plugin" in Domain.getPlugins()  # the package keeps its name
    assert ProtHabinitHomoAbinitRefine.getPlugin().getName() == "habinit"
    assert ProtHabinitHomoAbinitRefine.getClassLabel() == "habinit - homogeneous ab-initio refinement"
    assert new_prot(project).getRunName() == "habinit - homogeneous ab-initio refinement"
    templates = Domain.getPlugins()["habinit_plugin"]._pluginInstance.getTemplates()
    assert [t.name for t in templates] == ["habinit_relion_particles"]


# ----------------------------------------------------------------------------- classes, end to end


def classes_in_project(project, sim32, sim32_gt, folder: Path):
    """Imported particles and a finished protocol of the project that holds their classes (outputClasses)."""
    from pwem.protocols import ProtImportParticles
    from pyworkflow.object import Pointer
    from pyworkflow.protocol import STATUS_FINISHED

    from habinit_plugin.headless import launch

    particle_set(folder / "particles.sqlite", Path(sim32["stack"]), sim32_gt).close()
    imported = project.newProtocol(
        ProtImportParticles,
        objLabel="import for classes",
        importFrom=4,
        sqliteFile=str(folder / "particles.sqlite"),
        samplingRate=PIXEL_SIZE,
        magnification=10000,
        voltage=300,
        sphericalAberration=2.7,
        amplitudeContrast=0.1,
    )
    imported = launch(project, imported)
    holder = project.newProtocol(ProtImportParticles, objLabel="2D classes (made by the test)")
    project.saveProtocol(holder)
    os.makedirs(holder._getPath(), exist_ok=True)
    classes = holder._createSetOfClasses2D(Pointer(imported, extended="outputParticles"))
    taken = fill_classes(classes, imported.outputParticles)
    holder._defineOutputs(outputClasses=classes)
    holder.setStatus(STATUS_FINISHED)
    project._storeProtocol(holder)
    return project.getProtocol(holder.getObjId()).outputClasses, taken


def test_classes_end_to_end(project, sim32, sim32_gt, tmp_path):
    """habinit on classes (quick schedule, CPU, 150 of the 299 particles): the outputs hold exactly the enabled
    classes' particles, each once, ids kept; the unused ones are the classes' particles as they were."""
    from pwem.constants import ALIGN_2D, ALIGN_PROJ

    from habinit_plugin.headless import launch
    from habinit_plugin.protocols.protocol_homo_abinit import HAND_NOTE

    classes, taken = classes_in_project(project, sim32, sim32_gt, tmp_path)
    prot = new_prot(
        project,
        objLabel="habinit on classes",
        useGpu=False,
        quickSchedule=True,
        numberOfThreads=2,
        numberOfParticles=150,
        marginalise=False,  # half the time of the local passes; the map is not what this test checks
    )
    prot.inputParticles.set(classes)
    assert prot.validate() == []
    prot = launch(project, prot)

    star_ids = read_star(Path(prot._getExtraPath("input_particles.star")))["particles"].ints("rlnImageId")
    assert sorted(star_ids) == taken  # the engine got exactly the enabled classes' particles
    used = [p.getObjId() for p in prot.outputParticles.iterItems()]
    unused = [p.getObjId() for p in prot.outputUnusedParticles.iterItems()]
    assert len(used) == 150 and len(unused) == 149
    assert sorted(used + unused) == taken  # each once, with its id
    assert prot.outputParticles.getAlignment() == ALIGN_PROJ
    assert {int(p._rlnRandomSubset) for p in prot.outputParticles.iterItems()} == {1, 2}
    unused_set = prot.outputUnusedParticles
    assert unused_set.getAlignment() == ALIGN_2D and unused_set.hasCTF()
    defocus = {i + 1: float(sim32_gt.ctf.defocus_u[i]) for i in range(len(sim32_gt))}
    for part in unused_set.iterItems():
        assert part.getCTF().getDefocusU() == pytest.approx(defocus[part.getObjId()], rel=1e-5)
        assert part.getTransform() is not None
    with mrcfile.open(prot.outputVolume.getFileName()) as mrc:
        assert mrc.data.shape == (32, 32, 32)
    info = json.loads(Path(prot._getExtraPath("run.json")).read_text())
    assert info["n_used"] == 150 and info["n_unused"] == 149
    summary = prot.summary()
    assert HAND_NOTE in summary and "relion_image_handler --invert_hand" in HAND_NOTE
    assert "of 299 particles" in " ".join(prot.methods())
