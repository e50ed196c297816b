"""The plugin as Scipion sees it (discovery, menu, variables, template) and the engine without Scipion.

No protocol runs here: these take seconds.
"""

from __future__ import annotations

import configparser
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from habinit_plugin.convert.command import engine_program, engine_run_args

PACKAGE = Path(__file__).resolve().parents[2] / "habinit_plugin"

BLOCK_SCIPION = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('pyworkflow', 'pwem', 'relion', 'cryosparc2'):
            raise ImportError('Scipion is not installed here: ' + name)
sys.meta_path.insert(0, Block())
"""


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter (a clean sys.modules); fails the test when it fails."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.no_scipion
def test_engine_and_package_import_without_scipion():
    """The engine (every module) and the package root import where Scipion cannot be imported."""
    code = BLOCK_SCIPION + (
        "import pkgutil, importlib, habinit_plugin, habinit_plugin.engine as e\n"
        "names = [m.name for m in pkgutil.walk_packages(e.__path__, 'habinit_plugin.engine.')]\n"
        "[importlib.import_module(n) for n in names if not n.endswith('__main__')]\n"
        "import habinit_plugin.convert.command, habinit_plugin.constants, habinit_plugin.headless\n"
        "import habinit_plugin.figures\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('pyworkflow', 'pwem')]\n"
        "try:\n    habinit_plugin.Plugin\nexcept ImportError as exc:\n    print('no Plugin:', exc)\n"
        "print(len(names), 'engine modules')\n"
    )
    out = _python(code)
    assert "engine modules" in out.stdout and "no Plugin" in out.stdout
    cli = subprocess.run(
        [sys.executable, "-c", BLOCK_SCIPION + "from habinit_plugin.engine.cli import main; main(['--help'])"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0 and "habinit" in cli.stdout, cli.stderr


@pytest.mark.no_scipion
def test_engine_command_is_shell_safe(tmp_path):
    """Paths with spaces, quotes, $(...) and backticks reach the program unchanged; nothing runs."""
    fake_python = tmp_path / "fake python"
    fake_python.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "env = [os.environ.get('HABINIT_THREADS'), os.environ.get('CUDA_VISIBLE_DEVICES')]\n"
        "print(json.dumps(env + sys.argv[1:]))\n"
    )
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IXUSR)
    weird = tmp_path / 'it\'s a "dir" $(touch PWNED1) `touch PWNED2` ; touch PWNED3 & %(GPU)s'
    star = str(weird / "input particles.star")
    out = str(weird / "out")
    program = engine_program(str(fake_python), threads=3, gpus=[1])
    words = ["--seed", "1; touch PWNED4", "--quick"]
    args = engine_run_args(star, out, image_root=str(weird), words=words)
    result = subprocess.run(f"{program} {args}", shell=True, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    assert argv == [
        "3",
        "1",
        "-m",
        "habinit_plugin.engine",
        "run",
        "--particles",
        star,
        "--out",
        out,
        "--image-root",
        str(weird),
        "--seed",
        "1; touch PWNED4",
        "--quick",
    ]
    assert not list(tmp_path.rglob("PWNED*"))
    assert engine_program("/usr/bin/python3", activation="conda activate x") == "conda activate x && /usr/bin/python3"


def test_plugin_discovered_with_protocol_viewer_menu_and_template():
    from pwem import Domain
    from pyworkflow.viewer import DESKTOP_TKINTER

    import habinit_plugin

    plugins = Domain.getPlugins()
    assert "habinit_plugin" in plugins
    module = plugins["habinit_plugin"]
    assert module.Plugin.__module__ == "habinit_plugin"
    protocols = Domain.getProtocols()
    assert "ProtHabinitHomoAbinitRefine" in protocols
    prot_class = protocols["ProtHabinitHomoAbinitRefine"]
    assert prot_class._label == "homogeneous ab-initio refinement"
    from pwem.protocols import ProtInitialVolume, ProtRefine3D

    assert issubclass(prot_class, ProtInitialVolume) and issubclass(prot_class, ProtRefine3D)
    viewers = Domain.findViewers(prot_class.__name__, DESKTOP_TKINTER)
    assert "HabinitHomoAbinitViewer" in [v.__name__ for v in viewers]

    # the menu file: valid INI + JSON, the protocol under 3D > Initial volume and 3D > Refine
    cp = configparser.ConfigParser()
    cp.optionxform = str
    cp.read(PACKAGE / "protocols.conf")
    tree = json.loads(cp["PROTOCOLS"]["Protocols SPA"])
    three_d = next(s for s in tree if s["text"] == "3D")
    groups = {g["text"]: [c.get("value") for c in g["children"]] for g in three_d["children"]}
    assert "ProtHabinitHomoAbinitRefine" in groups["Initial volume"]
    assert "ProtHabinitHomoAbinitRefine" in groups["Refine"]

    # bibliography and references
    assert {"Punjani2017", "Toader2025", "Kim2025", "Scheres2012", "Rosenthal2003"} <= set(module._bibtex)
    assert set(habinit_plugin._references) <= set(module._bibtex)

    # variables: the engine's interpreter defaults to the running one
    plugin = module.Plugin
    assert plugin.getVar("HABINIT_PYTHON") == os.environ.get("HABINIT_PYTHON", sys.executable)
    assert plugin.getEnviron() is not None
    assert plugin.validateInstallation() == []

    # the optional CuPy environment for `scipion installb`
    class FakeEnv:
        packages = []

        def addPackage(self, name, **kwargs):
            self.packages.append((name, kwargs))

    plugin.defineBinaries(FakeEnv())
    (name, kwargs), *_ = FakeEnv.packages
    assert name == "habinit-cupy" and kwargs["default"] is False
    assert any("cupy" in cmd for cmd, _ in kwargs["commands"])

    # the batch template is listed and parses
    templates = module._pluginInstance.getTemplates()
    assert [t.name for t in templates] == ["habinit_relion_particles"]
    templates[0].replaceEnvVariables()
    templates[0].parseContent()
    aliases = {p.getAlias() for p in templates[0].getParams().values()}
    assert {"star", "pixelsize", "gpu", "quick"} <= aliases


def test_validate_messages(tmp_path, project, sim32):
    """Each bad input gets a message a biologist understands; good input passes."""
    from pwem.objects import CTFModel, Particle, SetOfParticles

    from habinit_plugin.protocols import ProtHabinitHomoAbinitRefine

    def make_set(name, n, box=32, ctf=True, split=None, extension=".mrcs"):
        stack = tmp_path / f"{name}{extension}"
        with mrcfile.new(str(stack), overwrite=True) as mrc:
            mrc.set_data(np.zeros((n, box, box), dtype=np.float32))
            mrc.set_image_stack()
        parts = SetOfParticles(filename=str(tmp_path / f"{name}.sqlite"))
        parts.setSamplingRate(3.6)
        parts.setHasCTF(ctf)
        for i in range(n):
            p = Particle(location=(i + 1, str(stack)))
            p.setSamplingRate(3.6)
            if ctf:
                c = CTFModel()
                c.setStandardDefocus(15000, 14000, 10)
                p.setCTF(c)
            if split is not None:
                from pwem.objects import Integer

                p._rlnRandomSubset = Integer(split[i % len(split)])
            parts.append(p)
        parts.write()
        return parts

    def errors(parts, **kwargs):
        kwargs.setdefault("useGpu", False)
        prot = project.newProtocol(ProtHabinitHomoAbinitRefine, **kwargs)
        prot.inputParticles.set(parts)
        return " ".join(prot.validate())

    good = make_set("good", 40)
    assert errors(good) == ""
    assert "no CTF information" in errors(make_set("noctf", 40, ctf=False))
    assert "at least 20 are needed" in errors(make_set("few", 8))
    assert "at least 20 are needed" in errors(good, numberOfParticles=10)
    assert "odd number" in errors(make_set("odd", 40, box=33))
    assert "finer" in errors(good, initialResolution=10, maximumResolution=20)
    assert "not an MRC stack" in errors(make_set("spider", 40, extension=".stk"))
    assert "must be 1 or 2" in errors(make_set("badsplit", 40, split=[1, 2, 3]))
    assert errors(make_set("badsplit2", 40, split=[1, 2, 0]), keepSplit=False) == ""
    gpu = errors(good, useGpu=True)
    if "sees none" not in gpu:  # a machine with a GPU and CuPy: nothing to complain about
        assert gpu == ""
    else:
        assert "Set 'GPU IDs' to No" in gpu


def test_protocol_loads_no_numerical_engine_module():
    """Scipion imports the protocol (form defaults, option names, file names) without the numerical code."""
    code = (
        "import sys, habinit_plugin.protocols, habinit_plugin.viewers\n"
        "engine = {m for m in sys.modules if m.startswith('habinit_plugin.engine.')}\n"
        "numerical = {'abinit', 'pose_search', 'projector', 'sgd', 'reconstruct', 'passes', 'align3d', 'fourier'}\n"
        "loaded = sorted(m for m in engine if m.rsplit('.', 1)[1] in numerical)\n"
        "assert 'habinit_plugin.engine.settings' in engine, engine\n"
        "assert not loaded, loaded\n"
        "print(sorted(engine))\n"
    )
    _python(code)


def test_form_defaults_are_the_engine_defaults(project):
    """A protocol with the default form runs the engine with exactly the engine's default settings."""
    from habinit_plugin.engine.cli import build_parser, settings_from_arguments
    from habinit_plugin.engine.settings import AbinitSettings, DeviceSettings, JobSettings
    from habinit_plugin.protocols import ProtHabinitHomoAbinitRefine
    from habinit_plugin.protocols.protocol_homo_abinit import FORM_TO_SETTINGS

    prot = project.newProtocol(ProtHabinitHomoAbinitRefine, useGpu=False)
    words = prot._engineWords()
    args = build_parser().parse_args(["run", "--particles", "p.star", "--out", "o", *words])
    abinit = settings_from_arguments(args, AbinitSettings)
    assert settings_from_arguments(args, JobSettings, abinit=abinit) == JobSettings()
    assert settings_from_arguments(args, DeviceSettings) == DeviceSettings()
    assert "--restart-changed" in words and "--quick" not in words
    # a changed form value reaches the engine under the settings' name
    prot = project.newProtocol(ProtHabinitHomoAbinitRefine, useGpu=False, learningRate=0.25, marginalise=False)
    args = build_parser().parse_args(["run", "--particles", "p.star", "--out", "o", *prot._engineWords()])
    abinit = settings_from_arguments(args, AbinitSettings)
    assert abinit.learning_rate == 0.25 and abinit.marginalise is False
    assert all(prot.getDefinition().getParam(name) is not None for name in FORM_TO_SETTINGS)


def test_validate_uses_the_engine_ranges_in_the_form_words(project, sim32):
    """The form's numbers are checked by the engine's own rules (engine/settings.py), named by their labels."""
    from habinit_plugin.protocols import ProtHabinitHomoAbinitRefine

    def errors(**kwargs):
        prot = project.newProtocol(ProtHabinitHomoAbinitRefine, useGpu=False, **kwargs)
        return prot._settingsErrors()

    assert errors() == []
    assert errors(learningRate=-1.0) == ["'Initial learning rate' must be greater than 0, got -1."]
    assert "'Number of particles to use (0: all)' must be at least 0" in errors(numberOfParticles=-5)[0]
    assert "'Full passes over all particles' must be at least 1" in errors(numberOfFinalPasses=0)[0]
    assert (
        "'Maximum resolution (A; 0: Nyquist)' 20 A is coarser than 'Initial resolution (A)' 10 A"
        in errors(initialResolution=10.0, maximumResolution=20.0)[0]
    )
    assert errors(symmetryGroup="d7") == []
    assert "'Symmetry': unknown symmetry 'x5': use C1, Cn (n >= 2)" in errors(symmetryGroup="x5")[0]
