"""Clean stops: Ctrl-C (SIGINT) or SIGTERM asks the job to stop at its next safe point.

The signal only sets a flag; the job looks at it after each SGD iteration (saves a checkpoint,
then stops) and between the chunks of a full pass (abandons the pass: the checkpoint of the
previous one stands). A second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("habinit")

_requested: list[int] = []


class Interrupted(Exception):
    """The job stopped on a signal at ``where``; exit status 128 + the signal number."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"interrupted ({signal.Signals(signum).name}) at {where}")
        self.signum = signum
        self.where = where


def _on_signal(signum, frame) -> None:
    if _requested:
        raise KeyboardInterrupt
    _requested.append(signum)
    log.info(f"{signal.Signals(signum).name} received: stopping after the current step (again to stop at once)")


def install() -> dict:
    """Route SIGINT and SIGTERM to the flag (the command line does this; library use keeps Python's defaults).
    Returns the previous handlers, for :func:`restore`."""
    _requested.clear()
    return {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}


def restore(previous: dict) -> None:
    _requested.clear()
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def requested() -> bool:
    return bool(_requested)


def check(where: str) -> None:
    """Raise :class:`Interrupted` when a stop was asked for."""
    if _requested:
        raise Interrupted(_requested[0], where)
