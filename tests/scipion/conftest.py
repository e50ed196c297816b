"""Headless Scipion for the protocol tests: environment, one project, simulated particles.

Scipion reads its configuration from the environment when pyworkflow is first imported,
so the variables are set here, at collection time, before any test module imports it.
Everything Scipion writes (config, logs, projects) lands in one temporary folder.
Without Scipion installed (``pip install -e .[scipion]``) these tests skip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from habinit_plugin.headless import scipion_available

SCIPION = scipion_available()
SKIP_REASON = "Scipion is not installed (pip install -e '.[scipion]')"
_ROOT = Path(tempfile.mkdtemp(prefix="habinit_scipion_"))

if SCIPION:
    from habinit_plugin.headless import setup_environment

    setup_environment(_ROOT / "home", _ROOT / "data")


def pytest_configure(config):
    config.addinivalue_line("markers", "no_scipion: a test of the Scipion side that runs without Scipion")


def pytest_collection_modifyitems(config, items):
    if SCIPION:
        return
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here and "no_scipion" not in item.keywords:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get("HABINIT_KEEP_SCIPION_TMP"):
        shutil.rmtree(_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def scipion_root():
    return _ROOT


@pytest.fixture(scope="session")
def project():
    """One headless project for the session (the working directory is restored afterwards)."""
    from habinit_plugin.headless import new_project

    cwd = os.getcwd()
    proj = new_project("habinit_tests")
    yield proj
    os.chdir(cwd)


@pytest.fixture(scope="session")
def sim32(tmp_path_factory, protein_map_32):
    """400 simulated particles of the bundled protein, box 32, 3.6 A/px, SNR 1, with a random split column."""
    from habinit_plugin.engine.simulate import SimulationSettings, simulate_dataset
    from habinit_plugin.engine.star import read_star, write_star

    out = tmp_path_factory.mktemp("sim32")
    paths = simulate_dataset(
        protein_map_32, 3.6, out, SimulationSettings(n_particles=400, snr=1.0, seed=5, shift_sigma=2.0)
    )
    blocks = read_star(paths["particles"])
    particles = blocks["particles"]
    rng = np.random.default_rng(3)
    particles.set_column("rlnRandomSubset", rng.permutation(np.arange(len(particles)) % 2 + 1))
    paths["split_star"] = out / "particles_split.star"
    write_star(paths["split_star"], [blocks["optics"], particles])
    return paths


@pytest.fixture(scope="session")
def relion_run(project, sim32, tmp_path_factory):
    """The batch template: RELION 3.1 STAR (with rlnRandomSubset) -> import -> habinit on 300 of 400 particles.

    One finished run for the session (the protocol, viewer and GUI tests read it; none changes it).
    """
    from habinit_plugin.headless import run_workflow, workflow_from_template

    values = {
        "star": sim32["split_star"],
        "pixelsize": 3.6,
        "nparticles": 300,
        "quick": True,
        "gpu": False,
        "threads": 2,
    }
    workflow = workflow_from_template(values, out=tmp_path_factory.mktemp("workflow") / "habinit.json")
    imported, prot = run_workflow(project, workflow)
    assert prot.getClassName() == "ProtHabinitHomoAbinitRefine" and prot.numberOfParticles.get() == 300
    return imported, prot
