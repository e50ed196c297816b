"""Homogeneous ab-initio refinement: gold-standard half maps from particles, without a reference."""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess

import pyworkflow.protocol.params as params
from pwem.objects import FSC, SetOfClasses2D, SetOfParticles, Volume
from pwem.protocols import ProtInitialVolume, ProtRefine3D
from pyworkflow.constants import PROD
from pyworkflow.object import String
from pyworkflow.protocol.constants import STEPS_PARALLEL
from pyworkflow.protocol.params import GPU_LIST, USE_GPU

from .. import constants as cts
from ..convert.command import engine_program, engine_run_args, quote_all
from ..engine import outputs
from ..engine.settings import (
    MIN_PARTICLES_PER_HALF,
    AbinitSettings,
    DeviceSettings,
    JobSettings,
    WorkerSettings,
    command_words,
    default_of,
    option_name,
    particle_warnings,
)

MIN_PARTICLES = 2 * MIN_PARTICLES_PER_HALF


# The one place where the form meets the engine: form parameter -> engine settings field
# (habinit_plugin/engine/settings.py, which also gives the defaults and the command-line options).
FORM_TO_SETTINGS = {
    "numberOfParticles": (JobSettings, "n_particles"),
    "keepSplit": (JobSettings, "keep_split"),
    "keepDuplicates": (JobSettings, "keep_duplicates"),
    "invertContrast": (AbinitSettings, "invert_contrast"),
    "symmetryGroup": (AbinitSettings, "symmetry"),
    "symmetryAfterSgd": (JobSettings, "symmetry_after_sgd"),
    "initialResolution": (AbinitSettings, "initial_resolution_A"),
    "maximumResolution": (AbinitSettings, "max_resolution_A"),
    "numberOfInitialIterations": (AbinitSettings, "n_initial_iterations"),
    "numberOfFinalIterations": (AbinitSettings, "n_final_iterations"),
    "initialMinibatchSize": (AbinitSettings, "initial_batch"),
    "finalMinibatchSize": (AbinitSettings, "final_batch"),
    "learningRate": (AbinitSettings, "learning_rate"),
    "sgdResolution": (AbinitSettings, "sgd_resolution_A"),
    "numberOfFinalPasses": (AbinitSettings, "n_final_passes"),
    "marginalise": (AbinitSettings, "marginalise"),
    "minResolution": (AbinitSettings, "min_resolution_A"),
    "maskRadius": (AbinitSettings, "mask_radius_A"),
    "randomSeed": (AbinitSettings, "seed"),
    "gpuMemory": (DeviceSettings, "gpu_mem_GB"),
}


# The form's label and help of each engine parameter; "{default}" is the engine's default.
FORM_TEXT = {
    "numberOfParticles": (
        "Number of particles to use (0: all)",
        "How many particles to use, the first ones of the input set (as in cryoSPARC); 0 uses all "
        "of them. The others come out as 'unused particles'. Ab initio does not need every particle, but "
        "the final resolution improves with more.",
    ),
    "keepSplit": (
        "Keep the input half-set split?",
        "If the particles already carry a half-set label (_rlnRandomSubset 1/2, e.g. from a previous "
        "RELION or cryoSPARC refinement), keep it so that later refinements stay gold-standard. "
        "Otherwise the particles are split at random.",
    ),
    "keepDuplicates": (
        "Keep duplicated images?",
        "A merged set can hold the same image (same stack and index) more than once. By default the job "
        "refuses such input, because copies of one image in both half sets would inflate the gold-standard "
        "FSC. Yes keeps every copy and puts all copies of an image in the same half set (each copy still "
        "counts as a particle); removing the duplicates first is usually better.",
    ),
    "invertContrast": (
        "Invert contrast?",
        "The job expects white particles on a darker background (as RELION and cryoSPARC extract them) and "
        "refuses a set whose particles are darker than the background, before any work. Yes multiplies every "
        "image by -1, for particles extracted without 'Invert contrast'.",
    ),
    "symmetryGroup": (
        "Symmetry",
        "Point group imposed on the map, in RELION's notation: c1 (none), cN (an N-fold axis along z), dN "
        "(and 2-folds along x), t, o, or i (RELION's i2 orientation). With symmetry the orientation search covers "
        "one asymmetric unit (an I search is 60 times cheaper) and every particle counts once per symmetry "
        "copy. Highly symmetric particles often collapse into flattened maps without it. Use the same value "
        "for RELION or cryoSPARC refinements downstream. Leave c1 when unsure: a wrong symmetry gives a "
        "wrong map.",
    ),
    "symmetryAfterSgd": (
        "Find the symmetry after SGD?",
        "RELION's practice: run the stochastic gradient descent without symmetry, then let each half find the "
        "symmetry axes in its own map and impose the symmetry in the full passes. Slower, but if the particle "
        "does not have the symmetry the log and the summary say so. No: the symmetry is imposed early in the "
        "SGD (after a short start without it).",
    ),
    "initialResolution": (
        "Initial resolution (A)",
        "Resolution at which the reconstruction starts. The map is built from low resolution "
        "(large numbers) towards high resolution; starting coarse avoids locking in noise.",
    ),
    "maximumResolution": (
        "Maximum resolution (A; 0: Nyquist)",
        "Highest resolution used to align particles. 0 means the Nyquist limit (twice the "
        "pixel size). A gold-standard FSC is computed regardless, so this is a cap, not a target.",
    ),
    "numberOfInitialIterations": (
        "Number of initial iterations",
        "Iterations at the initial minibatch size while the resolution is still low (cryoSPARC default 200; "
        "here {default}).",
    ),
    "numberOfFinalIterations": (
        "Number of final iterations",
        "SGD iterations at the final minibatch size, after the initial ones (cryoSPARC's ab initio uses "
        "300; here {default}). Full passes over all particles follow.",
    ),
    "initialMinibatchSize": (
        "Initial minibatch size",
        "Particles per SGD iteration at the start. Small batches make the early, noisy steps "
        "that let ab initio escape wrong solutions (cryoSPARC default 90; here {default}).",
    ),
    "finalMinibatchSize": (
        "Final minibatch size",
        "Particles per SGD iteration at the end. Larger batches give smoother, more precise "
        "updates at high resolution (cryoSPARC default 300; here {default}).",
    ),
    "learningRate": (
        "Initial learning rate",
        "Size of the first SGD steps (cryoSPARC default 0.4). Lower it if the map jumps between "
        "very different shapes; values of 1 or more are rarely useful.",
    ),
    "sgdResolution": (
        "Resolution where SGD stops (A)",
        "Resolution at which stochastic gradient descent hands over to full passes over all particles "
        "(orientation search on every particle, then a direct reconstruction of each half map). 7 A by default: "
        "with noise as ice gives (strongest at low resolution) a hand-over at 10 A left the particles' "
        "orientations to be found in a band that holds little of their signal.",
    ),
    "numberOfFinalPasses": (
        "Full passes over all particles",
        "Full passes over all particles after SGD; each refines every orientation and rebuilds the half "
        "maps, raising the resolution towards the maximum. The first two search all orientations (the "
        "second at the resolution the first reached, which corrects the particles the SGD's map misled); "
        "the next ones search around each particle's orientation.",
    ),
    "marginalise": (
        "Marginalise over orientations",
        "From the second full pass on, insert every particle at its most probable orientations and shifts around the "
        "best one, weighted by their probabilities, as RELION does. At low SNR this gives a markedly better map "
        "than the best orientation alone; 'No' makes those passes about twice as fast.",
    ),
    "minResolution": (
        "Ignore resolutions lower than (A; 0: none)",
        "Leave out the lowest frequencies, coarser than this, when orientations are searched (helps "
        "small particles in detergent or lipid); 0 uses everything.",
    ),
    "maskRadius": (
        "Mask radius (A; 0: from the images)",
        "Radius of the soft spherical mask around the particle during the SGD, in Angstrom. 0 measures the "
        "particle in the images (how far from the centre their signal reaches; the log states it) and takes "
        "about 1.3 times its radius: a mask as large as the box lets a small particle's map grow streaks.",
    ),
    "randomSeed": (
        "Random seed",
        "Seed of the random half-set split and of the random starting maps. The same seed on the "
        "same data gives the same result; try another seed to check that the map is reproducible.",
    ),
    "gpuMemory": (
        "GPU memory to use (GB; 0: all free)",
        "Upper limit for the engine's GPU memory; 0 lets it use what the GPU has free.",
    ),
}
BASIC_PARAMS = ("numberOfParticles", "keepSplit", "symmetryGroup", "initialResolution", "maximumResolution")
INPUT_PARAMS = ("numberOfParticles", "keepSplit", "keepDuplicates", "invertContrast")
# The Ab initio tab's groups, in the order of cryoSPARC's ab initio job (resolutions, SGD schedule) and then
# what it adds (the full passes); "quickSchedule" is the form's own switch for the schedule.
ABINIT_GROUPS = {
    "Symmetry": ("symmetryGroup", "symmetryAfterSgd"),
    "Resolution": ("initialResolution", "maximumResolution", "sgdResolution", "minResolution"),
    "SGD schedule": (
        "quickSchedule",
        "numberOfInitialIterations",
        "numberOfFinalIterations",
        "initialMinibatchSize",
        "finalMinibatchSize",
        "learningRate",
    ),
    "Full passes after SGD": ("numberOfFinalPasses", "marginalise"),
    "Mask and seed": ("maskRadius", "randomSeed"),
    "Compute": ("gpuMemory",),
}


def _default(form_name: str):
    """The engine's default of a form parameter (0 where the engine's is None: 'chosen by the engine')."""
    value = default_of(*FORM_TO_SETTINGS[form_name])
    return 0.0 if value is None else value


def _engine_value(form_name: str, value):
    """A form value as the engine takes it: 0 means None (Nyquist, automatic) where the engine's default is None."""
    cls, name = FORM_TO_SETTINGS[form_name]
    return None if default_of(cls, name) is None and not value else value


def _add_engine_param(form, name: str) -> None:
    """The form parameter ``name``: its kind and default from the engine's settings, its text from FORM_TEXT."""
    default = _default(name)
    kinds = {bool: params.BooleanParam, int: params.IntParam, str: params.StringParam}
    kind = kinds.get(type(default), params.FloatParam)
    label, text = FORM_TEXT[name]
    level = params.LEVEL_NORMAL if name in BASIC_PARAMS else params.LEVEL_ADVANCED
    form.addParam(name, kind, default=default, expertLevel=level, label=label, help=text.format(default=default))


def _add_quick_schedule(form) -> None:
    form.addParam(
        "quickSchedule",
        params.BooleanParam,
        default=False,
        expertLevel=params.LEVEL_NORMAL,
        label="Quick test run?",
        help="Use a very short schedule (few iterations and small minibatches, which replaces the "
        "numbers of iterations and minibatch sizes below) to check a workflow in minutes. The map "
        "will be poor: never use it for real results.",
    )


MRC_EXTENSIONS = (".mrc", ".mrcs", ".st", ".map")

# The run header's line for USE_GPU and GPU_LIST, as pyworkflow's form draws it (pyworkflow/gui/form.py): a
# Yes/No choice and the IDs on one line labelled "GPU IDs". Every GPU message names this label.
GPU_FORM_LABEL = "GPU IDs"
DEFAULT_THREADS = 4
CLASS_PARTICLES_SQLITE = "particles_of_enabled_classes.sqlite"  # the input taken from classes, in the run folder
HAND_NOTE = (
    "The hand of a map made from scratch is arbitrary: expect the mirror image about half of the time. Check "
    "the hand against a known structure (e.g. right-handed alpha helices, or a related atomic model) and flip "
    "the map if needed (relion_image_handler --invert_hand, or Chimera's 'volume flip') before building a model."
)


@functools.lru_cache(maxsize=1)
def nvidia_gpu_present() -> bool:
    """True when ``nvidia-smi -L`` lists an NVIDIA GPU on this machine (asked once; CuPy is not imported)."""
    program = shutil.which("nvidia-smi")
    if program is None:
        return False
    try:
        out = subprocess.run([program, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU " in out.stdout


def default_threads() -> int:
    """The form's default number of threads: 4, or fewer on a machine with fewer cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(DEFAULT_THREADS, cores))


class ProtHabinitHomoAbinitRefine(ProtInitialVolume, ProtRefine3D):
    """Homogeneous ab-initio refinement: two independent half maps from scratch, with a gold-standard FSC.

    The particles (typically the good classes of a 2D classification) are split into two
    half sets. Each half set is reconstructed independently and from scratch by stochastic
    gradient descent (SGD), as in cryoSPARC's ab initio reconstruction; no input volume is
    used. A 3D alignment step (rotation, shift and hand) keeps the two half maps in
    register, so their Fourier shell correlation (FSC) is a gold-standard resolution
    estimate. SGD can escape the wrong solutions that trap expectation-maximisation
    refinement, which matters most for small particles.

    Outputs: the particles with their orientations and half-set labels, the two half maps
    (and their average), the FSC curve, and the particles that were not used.
    """

    _label = "homogeneous ab-initio refinement"
    _devStatus = PROD
    _possibleOutputs = {
        "outputVolume": Volume,
        "outputParticles": SetOfParticles,
        "outputFSC": FSC,
        "outputUnusedParticles": SetOfParticles,
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stepsExecutionMode = STEPS_PARALLEL  # the two halves' steps side by side (with 3+ threads)

    # ------------------------------------------------------------------ form
    def _defineParams(self, form):
        gpu_help = (
            f"'{GPU_FORM_LABEL}' Yes runs the engine on an NVIDIA GPU (it needs CuPy in the engine's Python: "
            "scipion installb habinit-cupy); No runs it on the CPU, the same algorithm, only slower. The default is "
            "Yes only on a machine with an NVIDIA GPU. The box holds the GPU to use, e.g. 0 (the engine uses one "
            "GPU; run nvidia-smi to see the IDs)."
        )
        form.addHidden(USE_GPU, params.BooleanParam, default=nvidia_gpu_present(), help=gpu_help)
        form.addHidden(GPU_LIST, params.StringParam, default="0", help=gpu_help)  # the line's help button shows it

        form.addSection(label="Input")
        form.addParam(
            "inputParticles",
            params.PointerParam,
            pointerClass="SetOfParticles,SetOfClasses2D",
            important=True,
            label="Input particles",
            help="Particles with CTF information, usually the good classes of a 2D classification. Give the "
            "2D classes themselves (e.g. from RELION or cryoSPARC 2D classification): the job takes the particles "
            "of the enabled classes, and the particles of disabled classes are not input at all (they are not "
            "among the unused particles either). Or give a set of particles, e.g. from a subset step. No reference "
            "volume is needed: the map is built from the particles alone.",
        )
        for name in INPUT_PARAMS:
            _add_engine_param(form, name)
        form.addSection(label="Ab initio")
        for label, names in ABINIT_GROUPS.items():
            group = form.addGroup(label)
            for name in names:
                if name == "quickSchedule":
                    _add_quick_schedule(group)
                else:
                    _add_engine_param(group, name)
        form.addParallelSection(threads=default_threads(), mpi=0)

    # ------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        """One step per half set for each of the engine's two phases, which Scipion runs side by side (each with
        its own GPUs, or as two jobs on a queue), between the coordinator's steps (engine/parallel_halves.py)."""
        convert = self._insertFunctionStep(self.convertInputStep, self.inputParticles.get().getObjId(), needsGPU=False)
        prepare = self._insertFunctionStep(
            self.engineStageStep, self._stageArgs("prepare"), prerequisites=[convert], needsGPU=False
        )
        first = [self._insertHalfStep(half, 1, prepare) for half in "AB"]
        align = self._insertFunctionStep(
            self.engineStageStep, self._stageArgs("align"), prerequisites=first, needsGPU=False
        )
        second = [self._insertHalfStep(half, 2, align) for half in "AB"]
        finish = self._insertFunctionStep(
            self.engineStageStep, self._stageArgs("outputs"), prerequisites=second, needsGPU=False
        )
        self._insertFunctionStep(self.createOutputStep, prerequisites=[finish], needsGPU=False)

    def _insertHalfStep(self, half: str, phase: int, after: int) -> int:
        return self._insertFunctionStep(self.halfStep, half, phase, prerequisites=[after], needsGPU=self.usesGpu())

    def engineStageStep(self, args):
        """The engine's coordinator: prepare the job folder, align half B onto A, or write the outputs.
        After a failure or a kill, Continue resumes from the engine's checkpoints (finished work is not redone);
        if the parameters or the input changed, the engine starts over (--restart-changed)."""
        self.runJob(self._engineProgram(gpus=None), args, numberOfThreads=1, numberOfMpi=1)

    def halfStep(self, half: str, phase: int):
        """Phase 1 (SGD and the first full pass) or 2 (the other passes) of one half set, on this step's GPUs
        (those pyworkflow gives the step's thread, or the half's share of the run header's list)."""
        gpus = None
        if self.usesGpu():
            ids = ",".join(str(g) for g in self._stepsExecutor.getGpuList() or self.getGpuList())
            gpus = WorkerSettings(gpus=ids).gpu_lists()[half].split(",")
        args = quote_all(["-m", cts.ENGINE_MODULE, "half", "--out", os.path.abspath(self._getExtraPath())])
        args += " " + quote_all(["--half", half, "--phase", phase])
        self.runJob(self._engineProgram(gpus=gpus, threads=self._halfThreads()), args, numberOfThreads=1, numberOfMpi=1)

    def _halfThreads(self) -> int:
        """Each half's share of the run's threads."""
        return max(1, self.numberOfThreads.get() // 2)

    def _stageArgs(self, stage: str) -> str:
        """The engine's command for one stage of the two-worker job (the GPUs go to the half steps)."""
        words = ["--parallel-halves", "--stage", stage]
        if self.usesGpu():
            words += ["--gpus", ",".join(str(g) for g in self.getGpuList())]
        return self._engineArgs() + " " + quote_all(words)

    def convertInputStep(self, particlesId):
        from ..convert.particles import write_particles_star

        if self._inputIsClasses():
            self._writeClassParticles()
        write_particles_star(self._inputParticleSet(), self._getExtraPath(cts.INPUT_STAR))

    def createOutputStep(self):
        info = self._readRunInfo()
        if info.get("status") != "finished":
            path = self._enginePath(outputs.RUN_JSON)
            raise RuntimeError(f"The engine did not finish: {path} is missing or incomplete")
        from ..convert.particles import fill_refined_sets, read_star_rows

        input_set = self._inputParticleSet()
        pixel_size = input_set.getSamplingRate()

        volume = Volume()
        volume.setFileName(self._enginePath(outputs.MAP))
        volume.setSamplingRate(pixel_size)
        volume.setHalfMaps([self._enginePath(outputs.HALF_MAP_A), self._enginePath(outputs.HALF_MAP_B)])
        symmetry = info.get("symmetry", "C1")
        volume.symmetryGroup = String(symmetry)  # as the engine imposed it: refine downstream with the same

        used = self._createSetOfParticles()
        used.copyInfo(input_set)
        used.setAlignmentProj()
        used.symmetryGroup = String(symmetry)
        unused = self._createSetOfParticles(suffix="unused")
        unused.copyInfo(input_set)
        rows = read_star_rows(self._enginePath(outputs.PARTICLES_STAR))
        n_used, n_unused = fill_refined_sets(input_set, used, unused, rows, pixel_size)
        if n_used != len(rows):
            raise RuntimeError(
                f"{len(rows) - n_used} particle(s) in {self._enginePath(outputs.PARTICLES_STAR)} have an rlnImageId "
                "that is not in the input set"
            )

        fsc = FSC(objLabel=self.getRunName())
        fsc.setData(*outputs.fsc_curve(outputs.read_json(self._enginePath(outputs.FSC_JSON))))

        self._defineOutputs(outputVolume=volume)
        self._defineSourceRelation(self.inputParticles, volume)
        self._defineOutputs(outputParticles=used)
        self._defineTransformRelation(self.inputParticles, used)
        self._defineOutputs(outputFSC=fsc)
        self._defineSourceRelation(volume, fsc)
        if n_unused:
            unused.setAlignment(input_set.getAlignment())
            self._defineOutputs(outputUnusedParticles=unused)
            self._defineSourceRelation(self.inputParticles, unused)
        else:
            unused.close()
            os.remove(unused.getFileName())

    # ------------------------------------------------------------------ input
    def _inputIsClasses(self) -> bool:
        return isinstance(self.inputParticles.get(), SetOfClasses2D)

    def _inputImages(self):
        """The particle set that describes the input (pixel size, CTF, acquisition, box): the input particles, or
        the particles that the input classes classified (None when the classes lost them)."""
        source = self.inputParticles.get()
        return source.getImages() if isinstance(source, SetOfClasses2D) else source

    def _enabledClassesDo(self, function) -> list:
        """``function(class)`` for each enabled class of the input classes, in class order (the iterator reuses
        one class object: ``function`` must not keep it)."""
        return [function(cls) for cls in self.inputParticles.get().iterItems() if cls.isEnabled()]

    def _inputParticleIds(self) -> list[int]:
        """objIds of the particles the job takes, sorted: every particle of a set, or the enabled particles of
        the enabled classes (as Scipion's subset from classes takes them)."""
        if not self._inputIsClasses():
            return sorted(self.inputParticles.get().getIdSet())
        ids = self._enabledClassesDo(lambda cls: cls.getUniqueValues("id", where="enabled=1"))
        return sorted(i for class_ids in ids for i in class_ids)

    def _inputSize(self) -> int:
        if not self._inputIsClasses():
            return self.inputParticles.get().getSize()
        return len(self._inputParticleIds())

    def _firstInputParticle(self):
        if not self._inputIsClasses():
            return self.inputParticles.get().getFirstItem()
        return next(self.inputParticles.get().iterClassItems(), None)

    def _writeClassParticles(self) -> None:
        """The particles of the enabled classes as one set in the run folder, ids kept; the set's information is the
        classified particles' and its alignment the classes' (as Scipion's subset from classes makes it)."""
        classes = self.inputParticles.get()
        path = self._getPath(CLASS_PARTICLES_SQLITE)
        if os.path.exists(path):
            os.remove(path)
        particles = SetOfParticles(filename=path)
        particles.copyInfo(classes.getImages())
        particles.setAlignment(classes.getFirstItem().getAlignment())
        for particle in classes.iterClassItems():
            particles.append(particle)
        particles.write()
        particles.close()

    def _inputParticleSet(self):
        """The input as one SetOfParticles: the input set, or the one _writeClassParticles wrote."""
        if not self._inputIsClasses():
            return self.inputParticles.get()
        particles = SetOfParticles(filename=self._getPath(CLASS_PARTICLES_SQLITE))
        particles.loadAllProperties()
        return particles

    # ------------------------------------------------------------------ helpers
    def _enginePath(self, *names):
        return self._getExtraPath(*names)

    def _readRunInfo(self) -> dict:
        try:
            return outputs.read_json(self._enginePath(outputs.RUN_JSON))
        except outputs.OutputError:
            return {}

    def _settingsValues(self) -> dict[type, dict]:
        """The form's values as the engine's settings fields, by settings class (through FORM_TO_SETTINGS)."""
        values: dict[type, dict] = {cls: {} for cls in (AbinitSettings, JobSettings, DeviceSettings)}
        for form_name, (cls, name) in FORM_TO_SETTINGS.items():
            values[cls][name] = _engine_value(form_name, getattr(self, form_name).get())
        return values

    def _engineWords(self) -> list[str]:
        """The engine's options for this form (the settings' option names)."""
        words = []
        for cls, values in self._settingsValues().items():
            if cls is DeviceSettings and not self.usesGpu():
                continue
            for name, value in values.items():
                words += command_words(cls, name, value)
        words += command_words(DeviceSettings, "device", "gpu" if self.usesGpu() else "cpu")
        if self.quickSchedule:
            words.append("--quick")  # replaces the numbers of iterations and minibatch sizes
        return words + ["--restart-changed"]

    def _engineArgs(self) -> str:
        return engine_run_args(
            os.path.abspath(self._getExtraPath(cts.INPUT_STAR)),
            os.path.abspath(self._getExtraPath()),
            image_root=os.path.abspath(self.getProject().getPath()) if self.getProject() else None,
            words=self._engineWords(),
        )

    def _engineProgram(self, gpus=(), threads: int | None = None) -> str:
        """The engine's program part: ``gpus`` the CUDA_VISIBLE_DEVICES ids (default: the run header's first GPU
        when GPUs are used; None: none), ``threads`` its threads (default: the run's)."""
        plugin = self.getClassPackage().Plugin
        if gpus == ():
            gpus = self.getGpuList()[:1] if self.usesGpu() else None
        return engine_program(
            plugin.getEnginePython(),
            threads=threads or self.numberOfThreads.get(),
            gpus=gpus,
            activation=plugin.getEnvActivation(),
        )

    def _visibleGpus(self) -> int | None:
        """Number of GPUs the engine's Python sees through CuPy (0 when CuPy or a GPU is missing)."""
        plugin = self.getClassPackage().Plugin
        code = "from habinit_plugin.engine.backend import gpu_available; print(int(gpu_available()))"
        program = engine_program(
            plugin.getEnginePython(), gpus=self.getGpuList()[:1], activation=plugin.getEnvActivation()
        )
        try:
            out = subprocess.run(
                f"{program} -c {shlex.quote(code)}",
                shell=True,
                env=plugin.getEnviron(),
                capture_output=True,
                text=True,
                timeout=120,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        lines = out.stdout.strip().splitlines()
        return int(lines[-1]) if out.returncode == 0 and lines and lines[-1].isdigit() else 0

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        if self.inputParticles.get() is None:
            return ["Choose the input particles (a set of particles or of 2D classes)."]
        particles = self._inputImages()
        if particles is None:
            return [
                "The input classes no longer lead to the particles they classified (their set was deleted?). "
                "Choose the classes again, or a set of particles."
            ]
        if not particles.hasCTF():
            errors.append(
                "The input particles have no CTF information. Estimate the CTF of the micrographs (e.g. with "
                "CTFFIND or Gctf) and extract the particles from them, or import the particles together with "
                "their CTF values."
            )
        size = self._inputSize()
        n_use = self.numberOfParticles.get() or 0
        used = min(size, n_use) if n_use > 0 else size
        if used < MIN_PARTICLES:
            errors.append(
                f"Only {used} particle(s) would be used; at least {MIN_PARTICLES} are needed to make two "
                "half sets, and a useful map needs thousands. Use more particles."
            )
        x, y, _ = particles.getDimensions() or (0, 0, 0)
        if x != y:
            errors.append(f"The particle images are {x} x {y} pixels; they must be square. Re-extract them.")
        elif x % 2:
            errors.append(
                f"The particle box is {x} pixels, an odd number; the reconstruction needs an even box. "
                f"Re-extract or resize the particles to a box of {x + 1} or {x - 1} pixels."
            )
        pixel_size = particles.getSamplingRate() or 0
        if pixel_size <= 0:
            errors.append("The input particles have no pixel size (sampling rate).")
        errors += self._settingsErrors()
        first = self._firstInputParticle()
        if first is not None:
            filename = first.getFileName()
            base = filename.rsplit(":", 1)[0] if ":" in os.path.basename(filename) else filename
            if not base.lower().endswith(MRC_EXTENSIONS):
                errors.append(
                    f"The particle images are in {os.path.basename(base)!r}, which is not an MRC stack; the "
                    "engine reads MRC stacks (.mrcs/.mrc). Convert them first (e.g. with 'xmipp3 - convert' or "
                    "relion_image_handler)."
                )
        if self.keepSplit and self._firstHasSplit(first):
            bad = self._badSplitValues()
            if bad:
                errors.append(
                    "You asked to keep the input half-set split, but _rlnRandomSubset has value(s) "
                    f"{', '.join(str(v) for v in bad)}; it must be 1 or 2 for every particle. Set 'Keep "
                    "the input half-set split?' to No to split them at random."
                )
        if self.usesGpu():
            gpus = self._visibleGpus()
            if gpus == 0:
                errors.append(
                    f"'{GPU_FORM_LABEL}' is Yes (use a GPU), but the engine sees none (no NVIDIA GPU visible, or "
                    "CuPy is missing in the engine's Python: " + self.getClassPackage().Plugin.getEnginePython() + "). "
                    f"Set '{GPU_FORM_LABEL}' to No to run on the CPU, or install the GPU environment "
                    "(scipion installb habinit-cupy) and point HABINIT_PYTHON at it."
                )
        return errors

    def _settingsErrors(self) -> list[str]:
        """The engine's range checks (engine/settings.py) on the form's values, in the form's words."""
        values = self._settingsValues()
        try:
            abinit = AbinitSettings(**values[AbinitSettings])
            JobSettings(abinit=abinit, **values[JobSettings])
            DeviceSettings(**values[DeviceSettings])
        except (ValueError, TypeError) as exc:
            message = str(exc)
            for form_name, (_, name) in sorted(FORM_TO_SETTINGS.items(), key=lambda item: -len(item[1][1])):
                message = message.replace(option_name(name), f"'{FORM_TEXT[form_name][0]}'")
            return [message[0].upper() + message[1:] + "."]
        return []

    @staticmethod
    def _firstHasSplit(first) -> bool:
        return first is not None and first.hasAttribute("_rlnRandomSubset")

    def _badSplitValues(self) -> list:
        """The _rlnRandomSubset values other than 1 and 2 among the input particles."""

        def values_of(particles, where=None) -> set:
            try:
                return set(particles.getUniqueValues("_rlnRandomSubset", where=where))
            except Exception:
                return {p.getAttributeValue("_rlnRandomSubset") for p in particles.iterItems() if p.isEnabled()}

        if self._inputIsClasses():
            values = set().union(*self._enabledClassesDo(lambda cls: values_of(cls, "enabled=1")))
        else:
            values = values_of(self.inputParticles.get())
        return sorted(v for v in values if v not in (1, 2))

    def _warnings(self):
        warnings = []
        particles = self._inputImages() if self.inputParticles.get() is not None else None
        if particles is None:
            return warnings
        size = self._inputSize()
        n_use = self.numberOfParticles.get() or 0
        used = min(size, n_use) if n_use > 0 else size
        if used >= MIN_PARTICLES:  # the engine's rules, on a split in two equal halves
            warnings += [w[0].upper() + w[1:] + "." for w in particle_warnings(used // 2, used - used // 2)]
        pixel_size = particles.getSamplingRate() or 0
        maximum = self.maximumResolution.get() or 0
        if pixel_size > 0 and 0 < maximum < 2 * pixel_size:
            warnings.append(
                f"The maximum resolution ({maximum:g} A) is beyond the Nyquist limit of these particles "
                f"({2 * pixel_size:.2f} A); Nyquist will be used."
            )
        if self.keepSplit and not self._firstHasSplit(self._firstInputParticle()):
            warnings.append("The input particles carry no half-set split: they will be split at random.")
        if not self.usesGpu() and used > 20000:
            warnings.append(
                f"{used} particles on the CPU will take a long time; a GPU is strongly recommended for large sets "
                f"('{GPU_FORM_LABEL}' Yes)."
            )
        if self.quickSchedule:
            warnings.append("'Quick test run' is on: the map will be poor. Turn it off for real results.")
        return warnings

    def _summary(self):
        info = self._readRunInfo()
        if info.get("status") != "finished":
            return ["Output not ready yet."]
        lines = [
            f"Gold-standard resolution: {info['resolution_0143']:.2f} A at FSC 0.143 "
            f"({info['resolution_05']:.2f} A at FSC 0.5).",
            f"Particles used: {info['n_used']}; not used: {info['n_unused']}.",
            f"Symmetry imposed: {info.get('symmetry', 'C1')} (use the same symmetry downstream).",
        ]
        masked_line = outputs.masked_resolution_line(self._enginePath(outputs.FSC_JSON))
        if masked_line:
            lines.insert(1, masked_line)
        if info.get("device"):
            lines.append(f"Computed on: {info['device']}.")
        if self.quickSchedule:
            lines.append("Quick test schedule: not a real result.")
        lines.append(HAND_NOTE)
        lines += [f"Warning: {w[0].upper() + w[1:]}." for w in info.get("warnings", [])]
        return lines

    def _methods(self):
        info = self._readRunInfo()
        if info.get("status") != "finished":
            return []
        n_total = info.get("n_used", 0) + info.get("n_unused", 0)
        n_input = self._inputSize() if self._inputImages() is not None else n_total
        return [
            f"A 3D map was obtained without a reference from {info['n_used']} of {n_input} particles with "
            "homogeneous ab-initio refinement [Kim2025] in habinit: the particles were split into two half "
            "sets, each reconstructed independently from scratch by stochastic gradient descent as in "
            "cryoSPARC ab initio [Punjani2017] with a preconditioned update [Toader2025], the two half maps "
            "being kept in register by 3D alignment. The gold-standard FSC [Scheres2012] between the half "
            f"maps reached {info['resolution_0143']:.2f} A at the 0.143 threshold [Rosenthal2003]."
        ]

    def _citations(self):
        return ["Kim2025", "Punjani2017", "Toader2025", "Scheres2012", "Rosenthal2003"]
