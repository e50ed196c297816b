"""The engine's command line, safe to hand to a shell (Scipion's runJob uses one).

Every path and value is quoted with :func:`shlex.quote`, so file names holding spaces,
quotes, ``$(...)`` or backticks reach the engine unchanged and are never executed.
No Scipion imports here.
"""

from __future__ import annotations

import shlex

from ..constants import ENGINE_MODULE


def quote_all(words) -> str:
    """Words joined into one shell-safe string."""
    return " ".join(shlex.quote(str(w)) for w in words)


def engine_program(python: str, threads: int | None = None, gpus=None, activation: str = "") -> str:
    """The program part: ``[activation &&] [HABINIT_THREADS=n] [CUDA_VISIBLE_DEVICES=ids] python``.

    ``activation`` is a shell command from the plugin's configuration (e.g. ``conda activate x``)
    and is used as written; everything else is quoted.
    """
    words = []
    if threads:
        words.append(f"HABINIT_THREADS={int(threads)}")
    if gpus is not None:
        words.append("CUDA_VISIBLE_DEVICES=" + shlex.quote(",".join(str(int(g)) for g in gpus)))
    words.append(shlex.quote(str(python)))
    program = " ".join(words)
    return f"{activation.strip()} && {program}" if activation and activation.strip() else program


def engine_run_args(particles: str, out: str, image_root: str | None = None, words: list[str] | None = None) -> str:
    """Arguments of ``python -m habinit_plugin.engine run`` as one quoted string.

    words: further options as words (``engine.settings.command_words`` makes them from settings values).
    """
    command = ["-m", ENGINE_MODULE, "run", "--particles", particles, "--out", out]
    if image_root:
        command += ["--image-root", image_root]
    return quote_all(command + list(words or []))
