"""habinit: homogeneous ab-initio refinement, a Scipion plugin with a standalone engine.

``habinit_plugin.engine`` (the ``habinit`` command) has no Scipion imports and runs in any
Python with NumPy. Scipion finds this package through the ``pyworkflow.plugin`` entry
point and reads ``habinit_plugin.Plugin``; that class is built on first access (PEP 562
module ``__getattr__``), so ``import habinit_plugin`` itself never imports ``pwem``.
"""

from .engine import __version__

_references = ["Punjani2017", "Kim2025", "Toader2025", "Scheres2012", "Rosenthal2003"]

__all__ = ["Plugin", "__version__"]


def _define_plugin():
    """The Scipion plugin class; imports Scipion (pwem), so only called on demand."""
    import os
    import sys

    import pwem
    import pyworkflow.utils as pwutils

    from . import constants as cts

    class Plugin(pwem.Plugin):
        """Plugin variables: ``HABINIT_PYTHON`` (the interpreter that runs the engine; default the one
        running Scipion) and ``HABINIT_ENV_ACTIVATION`` (an optional shell command run first, e.g.
        ``conda activate my-cupy-env``). ``scipion installb habinit-cupy`` creates a virtual
        environment with CuPy for GPUs; point ``HABINIT_PYTHON`` at its ``bin/python`` to use it.
        """

        _url = ""  # no public home page yet
        _supportedVersions = [__version__]
        _pathVars = []  # the engine ships inside the package: nothing to install for the CPU
        _processingField = ["SPA"]

        def getName(self):
            """The name Scipion shows in the menus and run names ("habinit - ..."); the package stays habinit_plugin."""
            return cts.DISPLAY_NAME

        @classmethod
        def _defineVariables(cls):
            cls._defineVar(
                cts.HABINIT_PYTHON,
                sys.executable,
                description="Python interpreter that runs the habinit engine (it needs the habinit_plugin "
                "package; add CuPy there for GPUs). Default: the interpreter running Scipion.",
            )
            cls._defineVar(
                cts.HABINIT_ENV_ACTIVATION,
                "",
                description="Optional shell command run before the engine, e.g. 'conda activate habinit'.",
            )

        @classmethod
        def getEnginePython(cls):
            return cls.getVar(cts.HABINIT_PYTHON) or sys.executable

        @classmethod
        def getEnvActivation(cls):
            return (cls.getVar(cts.HABINIT_ENV_ACTIVATION) or "").strip()

        @classmethod
        def usesOwnPython(cls):
            """True when the engine runs in the interpreter (and environment) running Scipion."""
            return os.path.realpath(cls.getEnginePython()) == os.path.realpath(sys.executable)

        @classmethod
        def getEnviron(cls):
            """Environment of the engine process: Scipion's, minus PYTHONPATH for a foreign interpreter."""
            environ = pwutils.Environ(os.environ)
            if not cls.usesOwnPython() and "PYTHONPATH" in environ:
                del environ["PYTHONPATH"]  # Scipion's site-packages must not leak into the engine's env
            return environ

        @classmethod
        def getCupyEnvHome(cls):
            return os.path.join(pwem.Config.EM_ROOT, f"{cts.HABINIT_CUPY_ENV}-{__version__}")

        @classmethod
        def defineBinaries(cls, env):
            """``scipion installb habinit-cupy``: a virtual environment with the engine and CuPy (CUDA 12)."""
            home = cls.getCupyEnvHome()
            package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            source = package_dir if os.path.isfile(os.path.join(package_dir, "setup.py")) else "scipion-em-habinit"
            python = os.path.join(home, "bin", "python")
            commands = [
                (f"{sys.executable} -m venv {home} && touch venv_created", ["venv_created"]),
                (
                    f"{python} -m pip install --upgrade pip && {python} -m pip install '{source}[gpu]' "
                    f"&& {python} -c 'import cupy, habinit_plugin.engine' && touch cupy_installed",
                    ["cupy_installed"],
                ),
            ]
            env.addPackage(
                cts.HABINIT_CUPY_ENV,
                version=__version__,
                tar="void.tgz",
                commands=commands,
                neededProgs=[],
                default=False,
            )

    Plugin.__module__ = __name__  # Scipion derives the plugin's name and folder from this
    return Plugin


def __getattr__(name):
    if name == "Plugin":
        plugin = _define_plugin()
        globals()["Plugin"] = plugin
        return plugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
