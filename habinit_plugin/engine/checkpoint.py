"""Crash-safe checkpoints without pickle: arrays in .npz, everything else in JSON.

A checkpoint is ``state.json`` plus the ``.npz`` files it names. New array files get
a new generation number and ``state.json`` is replaced atomically last, so a kill
at any moment leaves either the old checkpoint or the new one, never a mixture.
Files are read with ``allow_pickle=False``: a crafted file cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .outputs import OutputError, atomic_write, read_json, write_json


class CheckpointError(OutputError):
    """A checkpoint that cannot be used (another job's, or damaged)."""


class Checkpoint:
    """The checkpoint folder of one job, identified by a job key (a string)."""

    def __init__(self, folder: str | Path, job_key: str):
        self.folder = Path(folder)
        self.job_key = job_key
        self.state_path = self.folder / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def matches(self) -> bool:
        """True when the checkpoint is this job's (same key); False for another job's or an unreadable one."""
        try:
            return read_json(self.state_path).get("job_key") == self.job_key
        except OutputError:
            return False

    def load(self) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
        """(state, arrays by group). Raises CheckpointError for another job's checkpoint."""
        try:
            state = read_json(self.state_path)
        except OutputError as exc:
            raise CheckpointError(str(exc)) from exc
        if state.get("job_key") != self.job_key:
            raise CheckpointError(
                f"{self.folder} holds the checkpoint of a different job (other particles or parameters); "
                "use --overwrite to start over or choose another output folder"
            )
        arrays = {}
        for group, name in state.get("arrays", {}).items():
            path = self.folder / name
            if Path(name).name != name or not path.is_file():
                raise CheckpointError(f"{self.state_path}: array file {name!r} is missing")
            try:
                with np.load(path, allow_pickle=False) as data:
                    arrays[group] = {k: data[k] for k in data.files}
            except (ValueError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot be read safely ({exc}); use --overwrite") from exc
        return state, arrays

    def save(self, state: dict, arrays: dict[str, dict[str, np.ndarray]]) -> dict:
        """Write array groups under a new generation, then state.json, then drop old files.

        Returns the state as written (with its generation and array file names)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        generation = int(state.get("generation", 0)) + 1
        names = {}
        for group, values in arrays.items():
            name = f"{group}.{generation}.npz"
            with atomic_write(self.folder / name) as tmp:
                np.savez(tmp, **values)
            names[group] = name
        state = dict(state, generation=generation, arrays=names, job_key=self.job_key)
        write_json(self.state_path, state)
        keep = set(names.values()) | {"state.json"}
        for path in self.folder.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)
        return state
