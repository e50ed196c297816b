"""One job per output folder: a lock file that names the owner's process, host and command.

A second job on the same folder is refused with a message naming the owner; a lock left
by a process that is no longer running on this host is taken over (with a line in the log).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .outputs import LOCK

log = logging.getLogger("habinit")


class FolderInUseError(ValueError):
    """The output folder belongs to another running job."""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _take(path: Path, owner: dict) -> bool:
    """Create the lock file with ``owner`` in it; False when it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(owner, f)
    return True


@contextmanager
def folder_lock(out: str | Path, command: str) -> Iterator[None]:
    """Hold ``out``'s lock while the block runs; a FolderInUseError when another job holds it."""
    path = Path(out) / LOCK
    host = socket.gethostname()
    owner = {"pid": os.getpid(), "host": host, "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    while not _take(path, owner):
        holder = _owner(path)
        pid = holder.get("pid")
        if holder.get("host") == host and isinstance(pid, int) and not _running(pid):
            log.info(f"{path}: the job that held this folder (process {pid}) is gone: taking it over")
            path.unlink(missing_ok=True)
            continue
        who = f"process {pid} on {holder.get('host', '?')}, since {holder.get('since', '?')}" if holder else "?"
        raise FolderInUseError(
            f"{out} is in use by another habinit {holder.get('command', 'job')} ({who}); wait for it to end or "
            f"choose another --out (if that job is gone for good, delete {path})"
        )
    try:
        yield
    finally:
        if _owner(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
