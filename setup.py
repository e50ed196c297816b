"""scipion-em-habinit: Homogeneous Ab-Initio Refinement for Scipion, with a standalone engine."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "habinit_plugin/engine/__init__.py").read_text()).group(1)

setup(
    name="scipion-em-habinit",
    version=version,
    description="Homogeneous ab-initio refinement: gold-standard SGD ab initio half maps (Scipion plugin and CLI)",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    python_requires=">=3.9",
    packages=find_packages(include=["habinit_plugin", "habinit_plugin.*"]),
    package_data={"habinit_plugin": ["protocols.conf", "templates/*", "engine/data/*"]},
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.9",
        "mrcfile>=1.4",
        "emtable>=0.0.14",
        "gemmi>=0.6",
        "matplotlib>=3.5",
        "cryosparc-tools>=4.6,<6",  # cryoSPARC .cs files (engine/cryosparc.py); wheels for CPython 3.9-3.13
    ],
    extras_require={
        "test": ["pytest>=7"],
        "gpu": ["cupy-cuda12x>=13"],
        # The Scipion side (protocol, viewer); Scipion pins NumPy 1.26, so keep it out of a GPU/NumPy 2 env.
        "scipion": ["scipion-pyworkflow>=3.11.7", "scipion-em>=3.11.1", "scipion-em-relion>=5.0.2"],
    },
    entry_points={
        "console_scripts": ["habinit = habinit_plugin.engine.cli:main"],
        "pyworkflow.plugin": ["habinit_plugin = habinit_plugin"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Bio-Informatics",
    ],
)
