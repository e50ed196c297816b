"""The job's figures (matplotlib, Agg: no display needed), drawn into a Figure.

The engine writes them as PNG next to its outputs (:func:`write_pngs`); the Scipion
viewer (habinit_plugin/figures.py) puts the same ``draw_*`` figures in its windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .outputs import PLOTS, atomic_write


def draw_fsc(figure, report: dict) -> None:
    """Gold-standard FSC against spatial frequency, with the 0.143 and 0.5 thresholds; with the masked FSC
    (corrected by phase randomisation) and the phase-randomised masked curve beside it when ``report`` has a
    "masked" entry (fsc.json of ``habinit run``)."""
    freq, curve = _curve(report)
    masked = report.get("masked")
    res = report.get("resolution_0143")
    ax = figure.add_subplot(111)
    label = "unmasked" + (f" ({res:.2f} A)" if res else "") if masked else "half map A vs half map B"
    ax.plot(freq, curve, "-", color="tab:blue", label=label)
    if masked:
        masked_res = masked["resolution_0143"]
        ax.plot(*_curve(masked), "-", color="tab:orange", label=f"masked, corrected ({masked_res:.2f} A)")
        random_freq, random_curve = _curve(masked, "fsc_phase_randomised")
        ax.plot(random_freq, random_curve, "-", color="grey", linewidth=0.8, label="masked, phases randomised")
    ax.axhline(0.143, color="grey", linestyle="--", linewidth=1, label="0.143")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="0.5")
    if res:
        colour, label = ("tab:blue", None) if masked else ("tab:red", f"{res:.2f} A")  # masked: in the curve's label
        ax.axvline(1.0 / res, color=colour, linewidth=1, label=label)
    if masked:
        ax.axvline(1.0 / masked_res, color="tab:orange", linewidth=1)
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(0.0, freq.max() * 1.02)
    if masked:
        ax.set_title(f"Gold-standard FSC at 0.143: {res:.2f} A unmasked, {masked_res:.2f} A masked")
    else:
        ax.set_title(f"Gold-standard FSC: {res:.2f} A at 0.143" if res else "Gold-standard FSC")
    top = ax.secondary_xaxis("top", functions=(_inverse, _inverse))
    ticks = [r for r in (50, 30, 20, 15, 10, 8, 6, 5, 4, 3.5, 3, 2.5, 2) if freq.min() <= 1.0 / r <= freq.max()]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{r:g}" for r in ticks])
    top.set_xlabel("resolution (A)")
    ax.legend(loc="upper right", fontsize=8)


def _curve(report: dict, key: str = "fsc") -> tuple[np.ndarray, np.ndarray]:
    """(spatial frequency 1/A, ``key``) of the shells of a report's curve past the origin."""
    rows = [r for r in report["curve"] if r.get("resolution_A")]
    return np.array([1.0 / r["resolution_A"] for r in rows]), np.array([r[key] for r in rows])


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
        working = [h for h in sgd if h.get("working_resolution")]
        curves = (
            (sgd, "resolution_0143", "o-", "tab:blue", "SGD, FSC 0.143"),
            (passes, "resolution_0143", "s-", "tab:green", "after each full pass, FSC 0.143"),
            (working, "working_resolution", "--", "tab:orange", "resolution used for alignment"),
        )
        for rows, key, style, colour, label in curves:
            if rows:
                ax.plot([h["iteration"] for h in rows], [h[key] for h in rows], style, color=colour, label=label)
        ax.invert_yaxis()
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no history recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("iteration (SGD iterations, then one step per full pass)")
    ax.set_ylabel("resolution (A)")
    ax.set_title(f"Resolution per iteration: {run_info.get('resolution_0143', float('nan')):.2f} A at the end")


def view_counts(rot: np.ndarray, tilt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Particles per projection direction on equal-area bins: counts (n_rot, n_tilt), rot edges (n_rot + 1,)
    and tilt edges (n_tilt + 1,), degrees. The tilt edges are uniform in cos(tilt), so every bin covers the
    same solid angle and uniform views give flat counts (equal steps in tilt would show the poles empty)."""
    n_tilt = int(np.clip(np.sqrt(len(rot) / 8.0), 6, 36))  # about 4 particles per bin on average
    rot_edges = np.linspace(-180.0, 180.0, 2 * n_tilt + 1)
    tilt_edges = np.degrees(np.arccos(np.linspace(1.0, -1.0, n_tilt + 1)))
    counts, _, _ = np.histogram2d(rot, np.clip(tilt, 0.0, 180.0), bins=(rot_edges, tilt_edges))
    return counts, rot_edges, tilt_edges


def draw_angular_distribution(figure, rot: np.ndarray, tilt: np.ndarray) -> None:
    """Projection directions: particle counts over (rot, tilt), degrees, on bins of equal solid angle."""
    ax = figure.add_subplot(111)
    counts, rot_edges, tilt_edges = view_counts(rot, tilt)
    image = ax.pcolormesh(rot_edges, tilt_edges, counts.T, cmap="viridis")
    figure.colorbar(image, ax=ax, label="particles per bin (equal solid angle)")
    ax.set_xlabel("rot (degrees)")
    ax.set_ylabel("tilt (degrees)")
    ax.set_ylim(180, 0)
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


def _save(draw, size: tuple[float, float], path: Path) -> None:
    """Render ``draw(figure)`` to ``path`` atomically (temporary name, then rename)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    draw(figure)
    figure.tight_layout()
    with atomic_write(path) as tmp:
        figure.savefig(tmp, dpi=110)


def write_pngs(out: Path, report: dict, run_info: dict, rotations: np.ndarray, map_a, map_b) -> None:
    """The job's figures as PNG in ``out`` (the names of :data:`.outputs.PLOTS`).

    report: fsc.json content; run_info: with ``history`` and ``resolution_0143`` (run.json);
    rotations (P, 3, 3) RELION matrices; map_a, map_b (N, N, N).
    """
    from .so3 import matrix_to_euler

    rot, tilt = matrix_to_euler(np.asarray(rotations))[:, :2].T
    _save(lambda f: draw_fsc(f, report), (6.5, 4.5), out / PLOTS["fsc"])
    _save(lambda f: draw_history(f, run_info), (6.5, 4.5), out / PLOTS["history"])
    _save(lambda f: draw_angular_distribution(f, rot, tilt), (7.5, 4.0), out / PLOTS["angular"])
    _save(lambda f: draw_half_map_slices(f, map_a, map_b), (9.0, 6.0), out / PLOTS["slices"])
