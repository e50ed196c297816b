"""PNG plots of a job's results (matplotlib, Agg: no display needed).

The Scipion viewer draws the same figures from the same JSON files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    tmp.replace(path)


def plot_fsc(report: dict, path: str | Path) -> None:
    """FSC curve against spatial frequency with the 0.143 and 0.5 thresholds.

    report: the content of fsc.json (``curve`` rows with ``resolution_A`` and ``fsc``).
    """
    plt = _pyplot()
    rows = report["curve"][1:]
    freq = [1.0 / r["resolution_A"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(freq, [r["fsc"] for r in rows], "-", color="tab:blue", label="half map A vs B")
    for threshold, style in ((0.143, "--"), (0.5, ":")):
        ax.axhline(threshold, color="grey", linestyle=style, linewidth=1)
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    r1, r2 = report["resolution_0143"], report["resolution_05"]
    ax.set_title(f"Gold-standard FSC: {r1:.2f} A at 0.143, {r2:.2f} A at 0.5")
    ax.legend(loc="upper right")
    _save(fig, path)


def plot_resolution_history(history: list[dict], path: str | Path) -> None:
    """Gold-standard resolution (0.143) per iteration; history rows from run.json."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [h for h in history if h.get("resolution_0143")]
    ax.plot([h["iteration"] for h in rows], [h["resolution_0143"] for h in rows], "o-", label="GS-FSC 0.143")
    work = [h for h in rows if h.get("working_resolution")]
    if work:
        ax.plot([h["iteration"] for h in work], [h["working_resolution"] for h in work], "--", label="SGD resolution")
    ax.set_xlabel("iteration (SGD iterations, then full passes)")
    ax.set_ylabel("resolution (A)")
    ax.invert_yaxis()
    ax.legend()
    _save(fig, path)


def plot_angular_distribution(rotations: np.ndarray, path: str | Path) -> None:
    """Projection directions (RELION rot, tilt) of particles, rotations (P, 3, 3)."""
    from .so3 import matrix_to_euler

    plt = _pyplot()
    angles = matrix_to_euler(np.asarray(rotations))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    counts, _, _, image = ax.hist2d(angles[:, 0], angles[:, 1], bins=(72, 36), range=((-180, 180), (0, 180)))
    fig.colorbar(image, ax=ax, label="particles")
    ax.set_xlabel("rot (degrees)")
    ax.set_ylabel("tilt (degrees)")
    ax.set_title(f"Angular distribution ({len(angles)} particles)")
    _save(fig, path)


def plot_half_map_slices(map_a: np.ndarray, map_b: np.ndarray, path: str | Path) -> None:
    """Central slices (z, y, x) of both half maps, (N, N, N) each."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    for row, (name, volume) in enumerate((("A", map_a), ("B", map_b))):
        n = volume.shape[0] // 2
        for col, (label, image) in enumerate((("z", volume[n]), ("y", volume[:, n]), ("x", volume[:, :, n]))):
            axes[row, col].imshow(image, cmap="gray", origin="lower")
            axes[row, col].set_title(f"half map {name}, central {label} slice")
            axes[row, col].axis("off")
    _save(fig, path)
