"""The shape of the package: no import cycle, settings and outputs free of NumPy, one name per parameter."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from habinit_plugin.engine import cli
from habinit_plugin.engine.settings import (
    AbinitSettings,
    DeviceSettings,
    JobSettings,
    cli_fields,
    command_words,
    default_of,
    option_name,
)

PACKAGE = Path(__file__).resolve().parents[1] / "habinit_plugin"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package modules a module imports anywhere in it (top level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def _import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    return {name: _imports(path, known) for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_not_even_a_lazy_one():
    graph = _import_graph()
    assert len(graph) > 30 and "habinit_plugin.engine.projector" in graph["habinit_plugin.engine.abinit"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_settings_and_outputs_import_without_numpy():
    """The Scipion process reads defaults and file names here without loading the numerical engine."""
    code = (
        "import sys, habinit_plugin.engine.settings, habinit_plugin.engine.outputs\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('numpy', 'scipy', 'mrcfile', 'emtable')]\n"
        "assert not loaded, loaded\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "command, classes",
    [("run", (AbinitSettings, JobSettings, DeviceSettings)), ("abinit", (AbinitSettings, DeviceSettings))],
)
def test_every_setting_has_one_option_with_its_default(command, classes):
    """The CLI is generated from the settings: parsing no option gives the settings' defaults."""
    args = cli.build_parser().parse_args([command, "--particles", "p.star", "--out", "o"])
    for cls in classes:
        for f in cli_fields(cls):
            assert getattr(args, f.name) == default_of(cls, f.name), f.name
    assert cli.settings_from_arguments(args, AbinitSettings) == AbinitSettings()
    help_text = cli.build_parser()._subparsers._group_actions[0].choices[command].format_help()
    for cls in classes:
        for f in cli_fields(cls):
            assert option_name(f.name).replace("--", "") in help_text, f.name


def test_command_words_round_trip_through_the_parser():
    """Values written as options by ``command_words`` (what the protocol does) parse back to themselves."""
    values = {
        "initial_resolution_A": 30.0,
        "max_resolution_A": 4.5,
        "learning_rate": 0.3,
        "marginalise": False,
        "preconditioner": True,
        "seed": 7,
        "mask_radius_A": 60.0,
    }
    words = [w for name, value in values.items() for w in command_words(AbinitSettings, name, value)]
    words += command_words(JobSettings, "keep_split", False) + command_words(JobSettings, "n_particles", 100)
    assert "--no-marginalise" in words and "--no-keep-split" in words and "--initial-resolution" in words
    args = cli.build_parser().parse_args(["run", "--particles", "p", "--out", "o", *words])
    settings = cli.settings_from_arguments(args, JobSettings, abinit=cli.settings_from_arguments(args, AbinitSettings))
    for name, value in values.items():
        assert getattr(settings.abinit, name) == value
    assert settings.keep_split is False and settings.n_particles == 100


def test_units_are_in_the_names():
    """Lengths and resolutions carry their unit; no field is named after a bare length."""
    for cls in (AbinitSettings, JobSettings, DeviceSettings):
        for f in fields(cls):
            if any(word in f.name for word in ("resolution", "radius", "shift", "mem", "minutes")):
                assert f.name.endswith(("_A", "_GB", "_minutes")), f.name


def test_option_names():
    assert option_name("initial_resolution_A") == "--initial-resolution"
    assert option_name("gpu_mem_GB") == "--gpu-mem"
    assert option_name("checkpoint_minutes") == "--checkpoint-minutes"
    assert option_name("n_final_passes") == "--n-final-passes"


def test_minimums_are_checked_with_the_option_name():
    with pytest.raises(ValueError, match="--initial-batch must be at least 1, got 0"):
        AbinitSettings(initial_batch=0)
    with pytest.raises(ValueError, match="--n-particles must be at least 0"):
        JobSettings(n_particles=-5)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"initial_resolution_A": 0.0}, "--initial-resolution must be greater than 0, got 0"),
        ({"max_resolution_A": -3.0}, "--max-resolution must be greater than 0, got -3"),
        ({"max_resolution_A": 50.0}, "--max-resolution 50 A is coarser than --initial-resolution 35 A"),
        ({"sgd_resolution_A": 40.0}, "--sgd-resolution 40 A is coarser than --initial-resolution 35 A"),
        ({"learning_rate": -1.0}, "--learning-rate must be greater than 0, got -1"),
        ({"mask_radius_A": 0.0}, "--mask-radius must be greater than 0"),
        ({"learning_rate": float("nan")}, "--learning-rate must be a number, got nan"),
    ],
)
def test_out_of_range_settings_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        AbinitSettings(**values)


def test_out_of_range_options_stop_the_command_before_any_work(tmp_path):
    """A bad option value is one line naming the option, exit 2, before the particles are read."""
    for option, value in (("--initial-resolution", "0"), ("--align-every", "0"), ("--n-particles", "-5")):
        args = ["run", "--particles", str(tmp_path / "none.star"), "--out", str(tmp_path / "out"), option, value]
        out = subprocess.run([sys.executable, "-m", "habinit_plugin.engine", *args], capture_output=True, text=True)
        assert out.returncode == 2 and f"error: {option} must be" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and "none.star" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_particle_warnings_rules():
    from habinit_plugin.engine.settings import particle_warnings

    assert particle_warnings(2500, 2500) == []
    assert "fewer than 100" in particle_warnings(60, 70)[0]
    assert "unbalanced (295 : 5" in " ".join(particle_warnings(295, 5))
    assert particle_warnings(400, 1300) and not particle_warnings(400, 1200)  # 1 : 3 is the limit
    assert "2 particle(s) have a negative defocus" in particle_warnings(500, 500, 2)[0]
