"""The viewer's figures, drawn from the engine's output files into a matplotlib Figure.

No Scipion imports: :func:`write_all` renders every figure to PNG headless (Agg), the
Scipion viewer puts the same figures in its plot windows. The engine writes PNGs of its
own (engine/plots.py) for batch users; these read the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import constants as cts


def load_json(folder: str | Path, name: str) -> dict:
    path = Path(folder) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: has the run finished?")
    with open(path) as f:
        return json.load(f)


def draw_fsc(figure, report: dict) -> None:
    """Gold-standard FSC against spatial frequency, with the 0.143 and 0.5 thresholds."""
    rows = [r for r in report["curve"] if r.get("resolution_A")]
    freq = np.array([1.0 / r["resolution_A"] for r in rows])
    curve = np.array([r["fsc"] for r in rows])
    ax = figure.add_subplot(111)
    ax.plot(freq, curve, "-", color="tab:blue", label="half map A vs half map B")
    ax.axhline(0.143, color="grey", linestyle="--", linewidth=1, label="0.143")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="0.5")
    res = report.get("resolution_0143")
    if res:
        ax.axvline(1.0 / res, color="tab:red", linewidth=1, label=f"{res:.2f} A")
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(0.0, freq.max() * 1.02)
    ax.set_title(f"Gold-standard FSC: {res:.2f} A at 0.143" if res else "Gold-standard FSC")
    top = ax.secondary_xaxis("top", functions=(_inverse, _inverse))
    ticks = [r for r in (50, 30, 20, 15, 10, 8, 6, 5, 4, 3.5, 3, 2.5, 2) if freq.min() <= 1.0 / r <= freq.max()]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{r:g}" for r in ticks])
    top.set_xlabel("resolution (A)")
    ax.legend(loc="upper right", fontsize=8)


def _inverse(x):
    """1/x for the resolution axis, finite everywhere (matplotlib also maps the axis limits through it)."""
    return 1.0 / np.maximum(np.asarray(x, dtype=float), 1e-6)


def draw_history(figure, run_info: dict) -> None:
    """Gold-standard resolution (FSC 0.143) per SGD iteration, then after each full pass (run.json's history)."""
    history = [h for h in run_info.get("history", []) if h.get("resolution_0143")]
    sgd = [h for h in history if str(h.get("phase", "sgd")) == "sgd"]
    passes = [h for h in history if str(h.get("phase", "sgd")) != "sgd"]
    ax = figure.add_subplot(111)
    if history:
        if sgd:
            ax.plot([h["iteration"] for h in sgd], [h["resolution_0143"] for h in sgd], "o-", label="SGD, FSC 0.143")
        if passes:
            ax.plot(
                [h["iteration"] for h in passes],
                [h["resolution_0143"] for h in passes],
                "s-",
                color="tab:green",
                label="after each full pass, FSC 0.143",
            )
        working = [h for h in sgd if h.get("working_resolution")]
        if working:
            ax.plot(
                [h["iteration"] for h in working],
                [h["working_resolution"] for h in working],
                "--",
                color="tab:orange",
                label="resolution used for alignment",
            )
        ax.invert_yaxis()
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no history recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("iteration (SGD iterations, then one step per full pass)")
    ax.set_ylabel("resolution (A)")
    ax.set_title(f"Resolution per iteration: {run_info.get('resolution_0143', float('nan')):.2f} A at the end")


def draw_angular_distribution(figure, rot: np.ndarray, tilt: np.ndarray) -> None:
    """Projection directions: particle counts over (rot, tilt), degrees."""
    ax = figure.add_subplot(111)
    n_tilt = int(np.clip(np.sqrt(len(rot) / 8.0), 6, 36))  # about 4 particles per bin on average, 5 to 30 deg
    counts, _, _, image = ax.hist2d(rot, tilt, bins=(2 * n_tilt, n_tilt), range=((-180, 180), (0, 180)), cmap="viridis")
    figure.colorbar(image, ax=ax, label="particles")
    ax.set_xlabel("rot (degrees)")
    ax.set_ylabel("tilt (degrees)")
    ax.set_title(f"Angular distribution of {len(rot)} particles")


def draw_half_map_slices(figure, map_a: np.ndarray, map_b: np.ndarray) -> None:
    """Central z, y and x slices of both half maps, on one grey scale per map."""
    for row, (name, volume) in enumerate((("A", map_a), ("B", map_b))):
        c = volume.shape[0] // 2
        lo, hi = np.percentile(volume, [0.5, 99.5])
        for col, (label, image) in enumerate((("z", volume[c]), ("y", volume[:, c]), ("x", volume[:, :, c]))):
            ax = figure.add_subplot(2, 3, 3 * row + col + 1)
            ax.imshow(image, cmap="gray", origin="lower", vmin=lo, vmax=hi)
            ax.set_title(f"half map {name}, central {label} slice", fontsize=8)
            ax.axis("off")


def read_angles(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """rlnAngleRot and rlnAngleTilt of the engine's particles.star."""
    from .engine.star import read_star

    blocks = read_star(Path(folder) / cts.PARTICLES_STAR)
    block = blocks.get("particles") or next(b for b in blocks.values() if b.has("rlnAngleRot"))
    return block.floats("rlnAngleRot"), block.floats("rlnAngleTilt")


def read_half_maps(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    from .engine.mrc import read_map

    return read_map(Path(folder) / cts.HALF_MAP_A)[0], read_map(Path(folder) / cts.HALF_MAP_B)[0]


FIGURES = {
    # name: (figure size, function(figure, folder))
    "fsc": ((6.5, 4.5), lambda fig, d: draw_fsc(fig, load_json(d, cts.FSC_JSON))),
    "history": ((6.5, 4.5), lambda fig, d: draw_history(fig, load_json(d, cts.RUN_JSON))),
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
