"""Scipion without a display: the environment a headless project needs (demo, tests, batch).

Call :func:`setup_environment` before anything imports ``pyworkflow``: Scipion reads its
configuration from environment variables at import time.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def scipion_available() -> bool:
    """True when pyworkflow, pwem and scipion-em-relion can be imported (without importing them)."""
    from importlib.util import find_spec

    return all(find_spec(name) is not None for name in ("pyworkflow", "pwem", "relion"))


def setup_environment(home: str | Path, user_data: str | Path | None = None, python: str | None = None) -> dict:
    """Point Scipion at ``home`` (config, logs) and ``user_data`` (projects); returns the variables set.

    Writes ``home/config/hosts.conf`` (a local host) when missing. Protocols run in
    subprocesses of ``python`` (default: this interpreter).
    """
    if "pyworkflow" in sys.modules and os.environ.get("SCIPION_HOME") != str(Path(home).resolve()):
        raise RuntimeError("setup_environment() must run before pyworkflow is imported")
    home = Path(home).resolve()
    user_data = Path(user_data).resolve() if user_data else home / "data"
    variables = {
        "SCIPION_HOME": str(home),
        "SCIPION_USER_DATA": str(user_data),
        "SCIPION_TESTS": str(home / "tests"),
        "SCIPION_DOMAIN": "pwem",
        "SCIPION_PYTHON": python or sys.executable,
        "SCIPION_TEST_NOSYNC": "1",
        "SCIPION_NOTIFY": "False",
        "SCIPION_LOG_LEVEL": os.environ.get("SCIPION_LOG_LEVEL", "INFO"),
    }
    os.environ.update(variables)
    for folder in (home / "config", user_data / "projects", home / "tests"):
        folder.mkdir(parents=True, exist_ok=True)
    hosts = home / "config" / "hosts.conf"
    if not hosts.exists():
        from pyworkflow.protocol.hosts import HostConfig

        HostConfig.writeBasic(str(hosts))
    return variables


def new_project(name: str, location: str | Path | None = None):
    """A new project (replacing one of the same name); the current directory becomes its folder."""
    from pyworkflow.project import Manager

    manager = Manager()
    if manager.hasProject(name):
        manager.deleteProject(name)
    project = manager.createProject(name, location=str(location) if location else None)
    os.chdir(project.path)
    return project


def launch(project, protocol, wait: bool = True):
    """Launch ``protocol`` in ``project``; returns it reloaded. Raises with the log tail on failure."""
    project.launchProtocol(protocol, wait=wait)
    if wait:
        protocol = project.getProtocol(protocol.getObjId())
        if protocol.isFailed() or not protocol.isFinished():
            tail = "\n".join(protocol.getLogsLastLines(40, logFile=0) + protocol.getLogsLastLines(20, logFile=1))
            raise RuntimeError(
                f"{protocol.getRunName()} {protocol.getStatus()}: {protocol.getErrorMessage() or ''}\n{tail}"
            )
    return protocol


TEMPLATE = Path(__file__).parent / "templates" / "habinit_relion_particles.json.template"


def workflow_from_template(values: dict, template: str | Path = TEMPLATE, out: str | Path | None = None) -> Path:
    """Fill a batch template's ``~Label|default|type|alias~`` fields by alias; returns the workflow JSON path.

    Fields not in ``values`` keep their defaults. The JSON is what
    ``python -m pyworkflow.project.scripts.create NAME workflow.json`` reads.
    """
    from pyworkflow.template import LocalTemplate

    tmpl = LocalTemplate("habinit_plugin", str(template))
    tmpl.replaceEnvVariables()
    tmpl.parseContent()
    known = {p.getAlias() for p in tmpl.getParams().values()}
    unknown = set(values) - known
    if unknown:
        raise KeyError(f"{template} has no field(s) {', '.join(sorted(unknown))}; it has {', '.join(sorted(known))}")
    for alias, value in values.items():
        tmpl.setParamValue(alias, str(value).lower() if isinstance(value, bool) else str(value))
    path = Path(tmpl.createTemplateFile())
    if out is not None:
        path = Path(shutil.move(str(path), str(out)))
    return path


def run_workflow(project, workflow: str | Path | None = None, loaded: dict | None = None) -> list:
    """Load a workflow JSON into ``project`` (or take ``loaded``, what ``project.loadProtocols`` returned)
    and run its protocols in order; returns them, finished."""
    if loaded is None:
        loaded = project.loadProtocols(str(workflow))
    done = []
    for prot in loaded.values():
        prot = project.getProtocol(prot.getObjId())  # fresh from the database: pointers see finished inputs
        done.append(launch(project, prot))
    return done
