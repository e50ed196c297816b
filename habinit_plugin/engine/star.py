"""STAR tables (RELION metadata) read with emtable, kept as text.

Values stay the text that was read, so that columns the engine does not use are
written back unchanged. Numeric access goes through :meth:`StarBlock.floats` and
:meth:`StarBlock.ints`, whose errors name the file, the column and the row.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .outputs import atomic_write


class StarError(ValueError):
    """A STAR file cannot be used; the message names the file, block, column or row."""


@dataclass
class StarBlock:
    """One ``data_<name>`` block as text: columns (labels without '_') and rows."""

    name: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.rows)

    def has(self, column: str) -> bool:
        return column in self.columns

    def text(self, column: str) -> list[str]:
        """The values of ``column`` as text; StarError when the column is absent."""
        if column not in self.columns:
            raise StarError(f"{self.source}: block data_{self.name} has no column _{column}")
        j = self.columns.index(column)
        return [row[j] for row in self.rows]

    def floats(self, column: str, default: float | None = None) -> np.ndarray:
        """Column as float64; ``default`` fills a missing column (else StarError)."""
        if column not in self.columns:
            if default is None:
                raise StarError(f"{self.source}: block data_{self.name} has no column _{column}")
            return np.full(len(self.rows), default, dtype=np.float64)
        values = self.text(column)
        try:
            return np.array(values, dtype=np.float64)
        except ValueError:
            for i, v in enumerate(values):
                try:
                    float(v)
                except ValueError:
                    raise StarError(
                        f"{self.source}: data_{self.name} row {i + 1}: _{column} = {v!r} is not a number"
                    ) from None
            raise

    def ints(self, column: str) -> np.ndarray:
        values = self.floats(column)
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            bad = int(np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))[0])
            raise StarError(
                f"{self.source}: data_{self.name} row {bad + 1}: _{column} = "
                f"{self.rows[bad][self.columns.index(column)]!r} is not an integer"
            )
        return values.astype(np.int64)

    def set_column(self, column: str, values) -> None:
        """Replace or append a column (values are formatted as text)."""
        texts = [_format(v) for v in values]
        if len(texts) != len(self.rows):
            raise ValueError(f"column _{column}: {len(texts)} values for {len(self.rows)} rows")
        if column in self.columns:
            j = self.columns.index(column)
            for row, t in zip(self.rows, texts):
                row[j] = t
        else:
            self.columns.append(column)
            for row, t in zip(self.rows, texts):
                row.append(t)

    def drop_columns(self, names) -> None:
        keep = [j for j, c in enumerate(self.columns) if c not in set(names)]
        self.columns = [self.columns[j] for j in keep]
        self.rows = [[row[j] for j in keep] for row in self.rows]

    def take(self, index) -> StarBlock:
        """A new block with the rows at ``index`` (copied)."""
        return StarBlock(self.name, list(self.columns), [list(self.rows[i]) for i in index], self.source)


def _format(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6f}"
    return str(value)


def block_names(path: str | Path) -> list[str]:
    """Names of the ``data_`` blocks of a STAR file, in order."""
    names = []
    with open(path) as f:
        for line in f:
            if line.startswith("data_"):
                names.append(line.strip()[5:])
    return names


def read_star(path: str | Path) -> dict[str, StarBlock]:
    """All blocks of a STAR file, by name (``''`` for an unnamed ``data_``)."""
    from emtable import Table  # noqa: PLC0415

    path = str(path)
    if not os.path.isfile(path):
        raise StarError(f"{path}: no such STAR file")
    blocks = {}
    try:
        names = block_names(path)
        if not names:
            raise StarError(f"{path}: no data_ block found (is this a STAR file?)")
        ragged = _ragged_row(path)  # emtable drops extra values without a word
        if ragged:
            raise StarError(ragged)
        for name in names:
            table = Table()
            # one pass per block (emtable may consume the next header); emtable prints its internals on errors
            with open(path) as f, contextlib.redirect_stdout(io.StringIO()):
                table.readStar(f, name, guessType=False)
            rows = [list(r) for r in table]
            blocks[name] = StarBlock(name, table.getColumnNames(), rows, path)
    except StarError:
        raise
    except Exception as exc:  # emtable raises bare Exceptions on malformed files
        raise StarError(f"{path}: cannot be parsed as STAR ({exc})") from exc
    return blocks


def _ragged_row(path: str) -> str | None:
    """'file: data_x row r has n values for m columns' for the first loop row of the wrong length, or None."""
    block, columns, row = "", 0, 0
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            text = line.strip()
            if text.startswith("data_"):
                block, columns, row = text[5:], 0, 0
            elif text.startswith("_") and row == 0:
                columns += 1
            elif text and not text.startswith(("#", "loop_")) and columns:
                row += 1
                try:
                    values = len(shlex.split(text, comments=True) if any(q in text for q in "\"'#") else text.split())
                except ValueError:
                    return f"{path}: data_{block} row {row} (line {line_number}) has an unclosed quote"
                if values != columns:
                    return (
                        f"{path}: data_{block} row {row} (line {line_number}) has {values} values for {columns} columns"
                    )
    return None


def write_star(path: str | Path, blocks: list[StarBlock]) -> None:
    """Write blocks as a RELION 3.1 STAR file (atomically: temporary file, then rename)."""
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        for block in blocks:
            f.write(f"\n# version 30001\n\ndata_{block.name}\n\nloop_\n")
            for j, column in enumerate(block.columns):
                f.write(f"_{column} #{j + 1}\n")
            rows = _quoted_rows(block.rows)
            widths = [max(len(v) for v in col) for col in zip(*rows)] if rows else []
            for row in rows:
                f.write(" ".join(v.rjust(w) for v, w in zip(row, widths)) + "\n")
            f.write("\n")


def _quoted_rows(rows: list[list[str]]) -> list[list[str]]:
    """Tokens of a loop. emtable picks shell-like splitting for a whole loop only when its
    first row holds a quote, so when any row needs quotes the first row gets some too."""
    out = [[_quote(v) for v in row] for row in rows]
    needs_quotes = any(t != v for row, raw in zip(out, rows) for t, v in zip(row, raw))
    if needs_quotes and out and not any(c in "\"'" for t in out[0] for c in t):
        out[0][0] = f'"{out[0][0]}"'
    return out


def _quote(value: str) -> str:
    """A STAR token for ``value``: bare when it can be, else quoted so that readers that
    split lines like a shell (emtable) and RELION's quoted strings both get it back."""
    if value and not any(c.isspace() or c in "\"'\\" for c in value):
        return value
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    if "'" not in value and "\\" not in value:
        return f"'{value}'"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
