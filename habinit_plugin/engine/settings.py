"""The jobs' parameters: one name, one default, one unit and one lower bound each.

No NumPy and no engine imports: the Scipion process reads the form's defaults here.
Names carry their units (``_A`` Angstrom, ``_GB`` 10^9 bytes, ``_minutes``); a
resolution or radius of None means "chosen by the engine" (Nyquist, from the box).

The command line is generated from these classes (:func:`option_name`, :func:`command_words`):
the option is the name with dashes, without a unit symbol (``initial_resolution_A`` is
``--initial-resolution``, ``gpu_mem_GB`` is ``--gpu-mem``, ``checkpoint_minutes`` stays
``--checkpoint-minutes``); a switch that is on by default is turned off by ``--no-NAME``.
The Scipion form maps its parameters onto the same names through one table
(``protocols/protocol_homo_abinit.py``, ``FORM_TO_SETTINGS``).
"""

from __future__ import annotations

import re
from dataclasses import MISSING, Field, dataclass, field, fields

UNITS = {"_A": "Angstrom", "_GB": "GB (10^9 bytes)", "_minutes": "minutes"}
UNIT_SYMBOLS = ("_A", "_GB")  # left out of the option names

# Half sets smaller than this give no meaningful FSC; the protocol asks for twice as many particles.
MIN_PARTICLES_PER_HALF = 10

# Below this many particles in a half set the job runs but its map is rarely meaningful (a warning).
FEW_PARTICLES_PER_HALF = 100
# A split more unbalanced than 1 : UNBALANCED_SPLIT gives halves of very different quality (a warning).
UNBALANCED_SPLIT = 3


def particle_warnings(n_half_1: int, n_half_2: int, n_negative_defocus: int = 0) -> list[str]:
    """Warnings for input that is valid but unlikely to give a meaningful result (the engine's log and
    run.json, and the protocol's summary use these same rules)."""
    warnings = []
    if min(n_half_1, n_half_2) < FEW_PARTICLES_PER_HALF:
        warnings.append(
            f"only {n_half_1} and {n_half_2} particles in the half sets (fewer than {FEW_PARTICLES_PER_HALF}): "
            "expect a noisy, low-resolution map; ab initio usually needs thousands of particles"
        )
    if max(n_half_1, n_half_2) > UNBALANCED_SPLIT * max(min(n_half_1, n_half_2), 1):
        warnings.append(
            f"the half sets are unbalanced ({n_half_1} : {n_half_2}, more than 1 : {UNBALANCED_SPLIT}): the "
            "smaller half limits the gold-standard FSC; consider a new random split (--no-keep-split)"
        )
    if n_negative_defocus:
        warnings.append(
            f"{n_negative_defocus} particle(s) have a negative defocus (overfocus): check the CTF convention "
            "of the input (RELION: underfocus positive)"
        )
    return warnings


# ``--quick``: a short schedule for tests and demonstrations (replaces these values).
QUICK_SCHEDULE = {
    "n_initial_iterations": 40,
    "n_final_iterations": 20,
    "initial_batch": 60,
    "final_batch": 150,
    "n_final_passes": 2,
}


def parameter(
    default, help: str, *, minimum: float | None = None, above: float | None = None, cli: bool = True, choices=()
) -> Field:
    """A settings field: ``help`` for the command line; the valid range, checked on construction:
    ``minimum`` (inclusive) or ``above`` (exclusive); ``cli`` False for internal parameters without an option."""
    metadata = {"help": help, "minimum": minimum, "above": above, "cli": cli, "choices": choices}
    return field(default=default, metadata=metadata)


VALID_SYMMETRIES = "C1, Cn (n >= 2), Dn (n >= 2), T, O or I (RELION's names; I is RELION's I2 orientation)"


class SymmetryError(ValueError):
    """A symmetry name that the engine does not know; the message lists the valid forms."""


def symmetry_name(name: str) -> str:
    """The canonical spelling of a point-group name ('c2' -> 'C2', 'I2' -> 'I'); SymmetryError if unknown."""
    text = str(name).strip().upper()
    if text in ("T", "O", "I", "I2"):
        return text[0]
    match = re.fullmatch(r"([CD])([1-9][0-9]*)", text)
    if match and not (match.group(1) == "D" and match.group(2) == "1"):
        return text
    raise SymmetryError(f"unknown symmetry {name!r}: use {VALID_SYMMETRIES}")


def _check_ranges(settings) -> None:
    """A ValueError naming the option of the first value outside its range (None is always valid)."""
    for f in fields(settings):
        value, minimum, above = getattr(settings, f.name), f.metadata.get("minimum"), f.metadata.get("above")
        if value is None or isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
            continue
        if value != value:  # NaN
            raise ValueError(f"{option_name(f.name)} must be a number, got {value}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{option_name(f.name)} must be at least {minimum:g}, got {value:g}")
        if above is not None and value <= above:
            raise ValueError(f"{option_name(f.name)} must be greater than {above:g}, got {value:g}")


@dataclass(frozen=True)
class AbinitSettings:
    """One ab initio map: SGD schedule (cryoSPARC's names), search, final passes."""

    n_initial_iterations: int = parameter(120, "SGD iterations at the initial minibatch size", minimum=1)
    n_final_iterations: int = parameter(60, "SGD iterations after them, minibatch growing to the final size", minimum=0)
    initial_resolution_A: float = parameter(35.0, "resolution the SGD starts at", above=0)
    max_resolution_A: float | None = parameter(
        None,
        "highest resolution searched (default Nyquist, finer is clamped)",
        above=0,
    )
    sgd_resolution_A: float = parameter(7.0, "resolution where SGD hands over to full passes", above=0)
    initial_batch: int = parameter(90, "initial minibatch size (particles)", minimum=1)
    final_batch: int = parameter(300, "final minibatch size (particles)", minimum=1)
    learning_rate: float = parameter(0.4, "initial learning rate of the SGD", above=0)
    learning_rate_iterations: int = parameter(100, "iterations at the initial learning rate", minimum=0, cli=False)
    final_learning_rate: float = parameter(0.1, "learning rate at the last iteration", above=0, cli=False)
    initial_temperature: float = parameter(4.0, "posterior temperature at the start, annealed to 1", above=0, cli=False)
    seed: int = parameter(0, "random seed (half-set split, starting maps, minibatches)", minimum=0)
    mask_radius_A: float | None = parameter(
        None,
        "radius of the SGD's spherical window (default: 2.2 times the radius holding half of the particles' signal "
        "variance in the images, about 1.3 times the particle's radius; at most 0.45 box)",
        above=0,
    )
    max_shift_A: float | None = parameter(
        None, "largest particle shift searched (default 0.3 of the window radius, at most 0.1 box)", minimum=0
    )
    min_resolution_A: float | None = parameter(
        None,
        "ignore frequencies below this in the search (small particles)",
        above=0,
    )
    oversampling: int = parameter(2, "Fourier grid oversampling", minimum=1, cli=False)
    beam: int = parameter(8, "poses kept per image and level of the global search", minimum=1, cli=False)
    marginal_poses: int = parameter(4, "poses an SGD image is inserted at", minimum=1, cli=False)
    marginal_poses_final: int = parameter(24, "poses a local-pass image is inserted at", minimum=1, cli=False)
    centre_every: int = parameter(10, "SGD iterations between re-centrings", minimum=0, cli=False)
    # Junk (bench/real_data.py, 15% empty picks and lumps of the wrong shape): without these two the SGD of both
    # halves collapsed onto one view (map 24.6 A vs the truth); with both, 5.1 A (6.1 A with the scale alone), and
    # 4.48 A on the same set without junk.
    sgd_scale: bool = parameter(True, "per-image signal scale in the SGD update (particle_fit)", cli=False)
    minibatch_trim: float = parameter(
        0.2,
        "fraction of each SGD minibatch left out of the update: the images whose best pose explains least of them",
        minimum=0,
        cli=False,
    )
    n_final_passes: int = parameter(2, "full passes over all particles after SGD", minimum=1)
    marginalise: bool = parameter(
        True,
        "marginalisation: each particle inserted at its probable poses from the second full pass on (off: at its best "
        "pose, faster, lower resolution at low SNR)",
    )
    preconditioner: bool = parameter(True, "the preconditioned SGD step (off: a plain step, for comparison)")
    scale_invariant_search: bool = parameter(True, "scale-invariant score in the SGD search", cli=False)
    symmetry: str = parameter("C1", "point group imposed on the map, as RELION's --sym (C1, Cn, Dn, T, O, I)")
    invert_contrast: bool = parameter(
        False,
        "multiply the images by -1: for a stack with dark particles (not contrast-inverted at extraction), which "
        "the job otherwise refuses",
    )
    c1_fraction: float = parameter(
        0.25,
        "fraction of the initial SGD iterations run in C1 before the symmetry axes are found in the map and the "
        "symmetry imposed (0: from the start)",
        minimum=0,
        cli=False,
    )

    def __post_init__(self):
        _check_ranges(self)
        try:
            object.__setattr__(self, "symmetry", symmetry_name(self.symmetry))
        except SymmetryError as exc:
            raise SymmetryError(f"--symmetry: {exc}") from None
        start = self.initial_resolution_A
        for name in ("max_resolution_A", "sgd_resolution_A"):
            value = getattr(self, name)
            if value is not None and value > start:
                raise ValueError(
                    f"{option_name(name)} {value:g} A is coarser than {option_name('initial_resolution_A')} "
                    f"{start:g} A: it must be finer (a smaller number of Angstrom)"
                )


@dataclass(frozen=True)
class JobSettings:
    """The gold-standard job (``habinit run``): one ab initio per half set, aligned."""

    abinit: AbinitSettings = field(default_factory=AbinitSettings)
    n_particles: int = parameter(0, "use the first N particles (0: all; the rest are unused)", minimum=0)
    keep_split: bool = parameter(True, "keeping an input rlnRandomSubset / cryoSPARC split (off: a new random split)")
    keep_duplicates: bool = parameter(
        False, "keep images that stand on several rows (merged sets), all copies of one in the same half set"
    )
    align_every: int = parameter(40, "SGD iterations between half-map alignments", minimum=1)
    symmetry_after_sgd: bool = parameter(
        False,
        "run the SGD in C1 and impose --symmetry from the full passes on, on the axes found in each half's map "
        "(RELION's practice)",
    )
    checkpoint_minutes: float = parameter(2.0, "time between checkpoints", minimum=0)

    def __post_init__(self):
        _check_ranges(self)


@dataclass(frozen=True)
class DeviceSettings:
    """Where the job runs; no influence on the result."""

    device: str = parameter("cpu", "compute device ('auto': a GPU when CuPy sees one)", choices=("cpu", "gpu", "auto"))
    gpu_mem_GB: float | None = parameter(None, "GPU memory ceiling (GPU runs)", minimum=0)

    def __post_init__(self):
        _check_ranges(self)


@dataclass(frozen=True)
class WorkerSettings:
    """How ``habinit run`` spreads its two halves over processes (:mod:`.parallel_halves`); no influence on the
    result."""

    parallel_halves: bool = parameter(
        False, "run each half set in its own worker process, the CPU cores (or --gpus) shared between them"
    )
    gpus: str = parameter(
        "",
        "GPU ids for the two half workers, e.g. 0,1: half A on the first half of the list, half B on the rest "
        "(one id: both on it); implies --parallel-halves and --device gpu",
    )

    def __post_init__(self):
        if self.gpus and not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", self.gpus):
            raise ValueError(f"--gpus must be GPU ids separated by commas (e.g. 0,1), got {self.gpus!r}")

    @property
    def parallel(self) -> bool:
        """True when the halves run in two worker processes."""
        return self.parallel_halves or bool(self.gpus)

    def gpu_lists(self) -> dict[str, str]:
        """The CUDA_VISIBLE_DEVICES value of each half's worker ({} without --gpus)."""
        ids = [g.strip() for g in self.gpus.split(",") if g.strip()]
        if not ids:
            return {}
        cut = max(1, len(ids) // 2)
        return {"A": ",".join(ids[:cut]), "B": ",".join(ids[cut:] or ids)}


def _unit_suffix(name: str) -> str:
    return next((suffix for suffix in UNITS if name.endswith(suffix)), "")


def option_name(name: str) -> str:
    """Command-line option of a settings field: ``initial_resolution_A`` -> ``--initial-resolution``."""
    suffix = next((s for s in UNIT_SYMBOLS if name.endswith(s)), "")
    return "--" + name[: len(name) - len(suffix)].replace("_", "-")


def unit_of(name: str) -> str:
    """The unit of a settings field in words ('' when it has none)."""
    return UNITS.get(_unit_suffix(name), "")


def cli_fields(cls) -> list[Field]:
    """The fields of a settings class that have a command-line option."""
    return [f for f in fields(cls) if f.metadata.get("cli", False)]


def help_of(cls, name: str) -> str:
    """The help text of a settings field."""
    return cls.__dataclass_fields__[name].metadata["help"]


def default_of(cls, name: str):
    """The default value of field ``name`` of a settings class."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def command_words(cls, name: str, value) -> list[str]:
    """The command-line words that set field ``name`` to ``value`` ([] for the default of a switch,
    or for None)."""
    if value is None:
        return []
    option = option_name(name)
    if isinstance(default_of(cls, name), bool):
        return [] if bool(value) == default_of(cls, name) else [option if value else option.replace("--", "--no-", 1)]
    return [option, str(value)]


__all__ = [
    "FEW_PARTICLES_PER_HALF",
    "UNBALANCED_SPLIT",
    "particle_warnings",
    "AbinitSettings",
    "DeviceSettings",
    "JobSettings",
    "MIN_PARTICLES_PER_HALF",
    "QUICK_SCHEDULE",
    "SymmetryError",
    "VALID_SYMMETRIES",
    "WorkerSettings",
    "symmetry_name",
    "cli_fields",
    "command_words",
    "default_of",
    "help_of",
    "option_name",
    "unit_of",
]
