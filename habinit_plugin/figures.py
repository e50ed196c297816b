"""The viewer's figures, drawn from the engine's output files into a matplotlib Figure.

No Scipion imports: :func:`write_all` renders every figure to PNG headless (Agg), the
Scipion viewer puts the same figures in its plot windows. The drawing is engine/plots.py's,
which also writes them as PNG for batch users; this module reads them from the files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .engine import outputs
from .engine.plots import draw_angular_distribution, draw_fsc, draw_half_map_slices, draw_history


def load_json(folder: str | Path, name: str) -> dict:
    path = Path(folder) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: has the run finished?")
    return outputs.read_json(path)


def read_angles(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """rlnAngleRot and rlnAngleTilt of the engine's particles.star."""
    from .engine.star import read_star

    blocks = read_star(Path(folder) / outputs.PARTICLES_STAR)
    block = blocks.get("particles") or next(b for b in blocks.values() if b.has("rlnAngleRot"))
    return block.floats("rlnAngleRot"), block.floats("rlnAngleTilt")


def read_half_maps(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    from .engine.mrc import read_map

    return read_map(Path(folder) / outputs.HALF_MAP_A)[0], read_map(Path(folder) / outputs.HALF_MAP_B)[0]


FIGURES = {
    # name: (figure size, function(figure, folder))
    "fsc": ((6.5, 4.5), lambda fig, d: draw_fsc(fig, load_json(d, outputs.FSC_JSON))),
    "history": ((6.5, 4.5), lambda fig, d: draw_history(fig, load_json(d, outputs.RUN_JSON))),
    "angular": ((7.5, 4.0), lambda fig, d: draw_angular_distribution(fig, *read_angles(d))),
    "slices": ((9.0, 6.0), lambda fig, d: draw_half_map_slices(fig, *read_half_maps(d))),
}


def write_all(folder: str | Path, out: str | Path) -> dict[str, Path]:
    """Render every figure of the run in ``folder`` to PNG files in ``out`` (headless)."""
    from matplotlib.figure import Figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (size, draw) in FIGURES.items():
        figure = Figure(figsize=size)
        draw(figure, folder)
        figure.tight_layout()
        paths[name] = out / f"viewer_{name}.png"
        figure.savefig(paths[name], dpi=100)
    return paths
