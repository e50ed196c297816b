"""GPU benchmark of the engine (issue 6): parity with the CPU, kernel efficiency, memory budget, end to end.

One command, one device call (under 10 minutes on an H100; the work tree copied there, CuPy
preinstalled, mrcfile and gemmi carried as wheels, see bench/results/README_gpu.md):

    PYTHONUNBUFFERED=1 python3 bench/gpu.py

Smoke run on the CPU (small sizes, a few minutes, nothing written to bench/results):

    .venv/bin/python bench/gpu.py --small --device cpu

Sections (``--sections``, comma-separated, in this order):

* ``env``: device, versions.
* ``rates``: the device's measured SGEMM rate (float32 matmul, n = 8192) and copy bandwidth
  (device-to-device, bytes read + written), host-to-device bandwidth (pageable and through
  the engine's pinned buffers).
* ``data``: simulates the large set (default 100,000 particles, box 128, 0.9 A/px, SNR 0.1)
  on the device batch by batch (projection, CTF, shift, noise drawn on the device), written
  to a memory-mapped MRC stack with RELION STAR files and the ground-truth map.
* ``kernels``: pose search on images of that set (global search as the SGD phase and the
  first full pass run it, local search as the later passes run it): achieved FLOP/s of the
  scoring matrix products (2 m n k per product, counted from the search's shapes) against
  the SGEMM rate, for the coarse scoring alone, its matrix product alone, and whole searches;
  projection and backprojection: achieved bytes/s (a minimal-traffic model: coordinates,
  values and the 8 trilinear corners of each sample, read-modify-write for the adjoint)
  against the copy bandwidth.
* ``parity``: CPU (NumPy) against the device on small problems: Fourier grid, central slices,
  backprojection, simulated images, Wiener half maps, best poses of noise-free images.
* ``memory``: the pool limit frees cached blocks before failing; a forced out-of-memory
  error recovered by splitting; ``reconstruct_half_maps`` under a 0.2 GB limit on a stack
  more than 3x that size (peak pool footprint against the limit, maps against unlimited).
* ``e2e``: ``habinit run --device gpu --gpu-mem 2`` on the large set in a child process
  (pool peak and device memory sampled there), per-phase times from run.json, then the
  ground-truth checks of the gold-standard issue: each half map's FSC 0.5 against the truth
  within 1.3x of the known-pose reconstruction of its half, the GS-FSC 0.143 within 15% of
  the full map's FSC 0.5 against the truth, same hand, median pose error below 5 degrees.

Every section is timed and guarded: an error is recorded in the table and the next section
runs. The table is rewritten after each section to ``$OUT/gpu_results.md`` (when OUT is set)
and at the end to ``bench/results/gpu_<device>.md`` (not with --small), with the raw numbers
in ``gpu_results.json``. ``--budget-s`` bounds the whole run: the end-to-end job gets what
is left (less a reserve for the truth comparison) and is stopped when it runs over.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from habinit_plugin.engine import gpu_budget, oom, so3  # noqa: E402
from habinit_plugin.engine.backend import device_name, get_xp, to_device, to_numpy  # noqa: E402

SECTIONS = ("env", "rates", "data", "kernels", "parity", "memory", "e2e")


# ---------------------------------------------------------------------------- report


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Report:
    """Tables in section order, raw values for the JSON, written after every section."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.tables: dict[str, Table] = {}
        self.values: dict[str, object] = {}
        self.section_times: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.device = "?"

    def table(self, key: str, title: str, header: list[str]) -> Table:
        if key not in self.tables:
            self.tables[key] = Table(title, header)
        return self.tables[key]

    def elapsed(self) -> float:
        return time.time() - self.t0

    def remaining(self) -> float:
        return self.args.budget_s - self.elapsed()

    def markdown(self) -> str:
        a = self.args
        lines = [
            f"# habinit GPU benchmark: {self.device}",
            "",
            f"`python3 bench/gpu.py {' '.join(shlex.quote(x) for x in sys.argv[1:])}` "
            f"({'small sizes, ' if a.small else ''}device {a.device}, {a.n_particles} particles at box {a.box}, "
            f"{a.pixel_size:g} A/px, SNR {a.snr:g}; {time.strftime('%Y-%m-%d %H:%M')}, "
            f"{self.elapsed():.0f} s in all).",
            "",
        ]
        for table in self.tables.values():
            lines += [f"## {table.title}", ""]
            lines.append("| " + " | ".join(table.header) + " |")
            lines.append("|" + "|".join("---" for _ in table.header) + "|")
            for row in table.rows:
                lines.append("| " + " | ".join(str(c) for c in row) + " |")
            lines.append("")
            for note in table.notes:
                lines.append(note)
                lines.append("")
        if self.errors:
            lines += ["## Errors", ""]
            for name, text in self.errors.items():
                lines += [f"### {name}", "", "```", text.rstrip(), "```", ""]
        times = ", ".join(f"{k} {v:.0f} s" for k, v in self.section_times.items())
        lines += [f"Section times: {times}.", ""]
        return "\n".join(lines)

    def write(self, final: bool = False) -> list[Path]:
        text = self.markdown()
        written = []
        out = os.environ.get("OUT")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            written.append(_write(Path(out) / "gpu_results.md", text))
            raw = {
                "values": self.values,
                "section_seconds": self.section_times,
                "errors": self.errors,
                "device": self.device,
            }
            written.append(_write(Path(out) / "gpu_results.json", json.dumps(raw, indent=1, default=_json_default)))
            if final and not self.args.small:
                written.append(_write(Path(out) / self.result_name(), text))
        if final:
            if self.args.small:
                target = Path(self.args.work_dir) / "gpu_results_small.md"
            else:
                target = ROOT / "bench" / "results" / self.result_name()
            written.append(_write(target, text))
        return written

    def result_name(self) -> str:
        name = re.sub(r"^(gpu|cpu)\s+", "", self.device) if self.device.startswith("gpu") else self.device
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
        return f"gpu_{slug}.md"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def verdict(ok) -> str:
    if ok is None:
        return "n/a"
    return "PASS" if ok else "FAIL"


# -------------------------------------------------------------------------- timing


def sync(xp) -> None:
    if xp is not np:
        xp.cuda.Device().synchronize()


def timed(xp, fn, repeat: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Best wall time of ``fn()`` (device synchronised) over ``repeat`` runs, and its last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    sync(xp)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        sync(xp)
        best = min(best, time.perf_counter() - t0)
    return best, result


# --------------------------------------------------------------------------- volumes


def protein_map(box: int, pixel_size: float, seed: int = 0) -> tuple[np.ndarray, str]:
    """The bundled protein (adenylate kinase) at this box; a blob of Gaussians without gemmi."""
    try:
        from habinit_plugin.engine import density  # noqa: PLC0415

        return density.bundled_protein_map(box, pixel_size), "adenylate kinase (4AKE, gemmi)"
    except ImportError:
        rng = np.random.default_rng(seed)
        axis = np.arange(box, dtype=np.float32) - box // 2
        z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
        volume = np.zeros((box,) * 3, dtype=np.float32)
        sigma = 2.0 / pixel_size
        for centre in rng.normal(0.0, 8.0 / pixel_size, size=(200, 3)):
            r2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
            volume += np.exp(-r2 / (2 * sigma**2))
        return volume, "200 random Gaussians (gemmi not installed)"


# ------------------------------------------------------------------------ simulation


def simulate_on_device(volume, pixel_size, out: Path, n: int, snr: float, seed: int, xp, batch: int, log=print):
    """``engine.simulate.simulate_dataset`` with the noise drawn on the device, batch by batch.

    Same poses, CTFs, files and conventions (noise calibrated on the first batch to the SNR,
    images scaled to unit noise variance); the images never leave the device until their
    batch is written to the memory-mapped stack.
    """
    from habinit_plugin.engine.mrc import new_stack, write_map  # noqa: PLC0415
    from habinit_plugin.engine.projector import volume_to_grid  # noqa: PLC0415
    from habinit_plugin.engine.simulate import (  # noqa: PLC0415
        SimulationSettings,
        _optics_block,
        _particles_block,
        clean_images,
        random_poses,
    )
    from habinit_plugin.engine.star import write_star  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    box = volume.shape[0]
    settings = SimulationSettings(n_particles=n, snr=snr, seed=seed, batch_size=batch)
    poses = random_poses(settings, pixel_size, box)
    grid = volume_to_grid(xp.asarray(volume, dtype=xp.float32), settings.oversampling)
    if xp is np:
        rng = np.random.default_rng(seed + 1)

        def normal(shape):
            return rng.standard_normal(shape, dtype=np.float32)
    else:
        rng = xp.random.RandomState(seed + 1)

        def normal(shape):
            return rng.standard_normal(shape, dtype=xp.float32)

    tmp = out / "particles.mrcs.tmp"
    stack = new_stack(tmp, n, box, pixel_size)
    sigma = scale = None
    t0 = time.time()
    try:
        for start in range(0, n, batch):
            index = np.arange(start, min(start + batch, n))
            images = clean_images(grid, poses, index, pixel_size, box, settings.oversampling)
            if sigma is None:
                sigma = float(xp.sqrt(xp.mean(xp.var(images, axis=(1, 2))) / snr)) if math.isfinite(snr) else 0.0
                scale = 1.0 / sigma if sigma > 0 else 1.0
            if sigma > 0:
                images = images + xp.float32(sigma) * normal(images.shape)
            stack.data[index] = to_numpy((images * xp.float32(scale)).astype(xp.float32))
            if log and (start // batch) % 10 == 0:
                log(f"  simulated {index[-1] + 1}/{n} particles ({time.time() - t0:.1f} s)")
        stack.flush()
    finally:
        stack.close()
    del grid
    os.replace(tmp, out / "particles.mrcs")
    write_map(out / "gt_map.mrc", volume * scale, pixel_size)
    names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    optics = _optics_block(settings, pixel_size, box)
    write_star(out / "particles.star", [optics, _particles_block(names, poses.ctf)])
    with_poses = _particles_block(names, poses.ctf)
    angles = so3.matrix_to_euler(poses.rotations)
    for j, column in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        with_poses.set_column(column, angles[:, j])
    with_poses.set_column("rlnOriginXAngst", poses.origins[:, 0] * pixel_size)
    with_poses.set_column("rlnOriginYAngst", poses.origins[:, 1] * pixel_size)
    write_star(out / "gt_poses.star", [optics, with_poses])
    return {"particles": out / "particles.star", "gt_poses": out / "gt_poses.star", "gt_map": out / "gt_map.mrc"}


# -------------------------------------------------------------------------- sections


class Bench:
    def __init__(self, args):
        self.args = args
        self.xp = get_xp(args.device)
        self.report = Report(args)
        self.report.device = device_name(self.xp)
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.rates: dict[str, float] = {}
        self.data: dict[str, Path] | None = None
        self.volume = None

    def log(self, message: str) -> None:
        print(f"[{self.report.elapsed():6.1f} s] {message}", flush=True)

    def run(self, sections: list[str]) -> int:
        for name in sections:
            if self.report.remaining() < 5:
                self.report.errors[name] = "skipped: the time budget (--budget-s) is spent"
                continue
            self.log(f"== {name}")
            t0 = time.time()
            try:
                getattr(self, f"section_{name}")()
            except Exception:
                text = traceback.format_exc()
                self.report.errors[name] = text[-4000:]
                self.log(f"{name} failed:\n{text}")
            finally:
                self.report.section_times[name] = time.time() - t0
                gpu_budget.set_gpu_memory_limit(self.xp, 0)
                oom.release_memory(self.xp)
                self.report.write()
        for path in self.report.write(final=True):
            self.log(f"wrote {path}")
        print(self.report.markdown())
        return 0

    # ------------------------------------------------------------------------- env

    def section_env(self) -> None:
        import scipy  # noqa: PLC0415

        xp = self.xp
        t = self.report.table("env", "Device and versions", ["item", "value"])
        rows = [
            ["device", self.report.device],
            ["python", platform.python_version()],
            ["numpy", np.__version__],
            ["scipy", scipy.__version__],
            ["CPU cores", str(os.cpu_count())],
        ]
        if xp is not np:
            props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
            free, total = xp.cuda.runtime.memGetInfo()
            rows += [
                ["cupy", xp.__version__],
                ["CUDA runtime", str(xp.cuda.runtime.runtimeGetVersion())],
                ["CUDA driver", str(xp.cuda.runtime.driverGetVersion())],
                ["multiprocessors", str(props.get("multiProcessorCount"))],
                ["GPU memory", f"{total / 1e9:.1f} GB ({free / 1e9:.1f} GB free)"],
                ["TF32 for float32 matmul (CUPY_TF32)", os.environ.get("CUPY_TF32", "0 (off)")],
            ]
        try:
            import gemmi  # noqa: F401, PLC0415

            rows.append(["gemmi", "installed (bundled protein map)"])
        except ImportError:
            rows.append(["gemmi", "missing: a Gaussian blob map is used"])
        t.rows += rows
        self.report.values["env"] = dict(rows)

    # ----------------------------------------------------------------------- rates

    def section_rates(self) -> None:
        xp, small = self.xp, self.args.small
        t = self.report.table("rates", "Measured device rates (the references)", ["rate", "value", "how"])
        n = 512 if small else 8192
        a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
        b = xp.asarray(np.random.default_rng(1).standard_normal((n, n), dtype=np.float32))
        seconds, _ = timed(xp, lambda: a @ b, repeat=5, warmup=2)
        sgemm = 2.0 * n**3 / seconds
        self.rates["sgemm"] = sgemm
        t.rows.append(["SGEMM", f"{sgemm / 1e12:.2f} TFLOP/s", f"float32 {n}x{n} @ {n}x{n}, best of 5"])
        a = b = None  # free the matrices

        nbytes = (16 if small else 1024) * 2**20
        src = xp.ones(nbytes // 4, dtype=xp.float32)
        dst = xp.empty_like(src)

        def copy():
            dst[...] = src

        seconds, _ = timed(xp, copy, repeat=10, warmup=2)
        bandwidth = 2.0 * nbytes / seconds
        self.rates["copy"] = bandwidth
        t.rows.append(
            ["device copy", f"{bandwidth / 1e9:.0f} GB/s", f"{nbytes >> 20} MiB device to device, read + write"]
        )
        src = dst = None

        host = np.ones((64 if small else 256) * 2**20 // 4, dtype=np.float32)
        if xp is not np:
            seconds, _ = timed(xp, lambda: xp.asarray(host), repeat=5)
            t.rows.append(["host to device, cupy.asarray", f"{host.nbytes / seconds / 1e9:.1f} GB/s", "pageable"])
            seconds, _ = timed(xp, lambda: to_device(host, xp), repeat=5)
            t.rows.append(
                ["host to device, backend.to_device", f"{host.nbytes / seconds / 1e9:.1f} GB/s", "pinned, reused"]
            )
        self.report.values["rates"] = dict(self.rates)

    # ------------------------------------------------------------------------ data

    def _dataset(self) -> dict[str, Path]:
        if self.data is None:
            a = self.args
            folder = self.work / f"sim_box{a.box}_n{a.n_particles}"
            if not (folder / "gt_poses.star").is_file():
                self.section_data()
            else:
                self.data = {k: folder / f"{k}.star" for k in ("particles", "gt_poses")}
                self.data["gt_map"] = folder / "gt_map.mrc"
        return self.data

    def section_data(self) -> None:
        a, xp = self.args, self.xp
        volume, what = protein_map(a.box, a.pixel_size)
        self.volume = volume
        folder = self.work / f"sim_box{a.box}_n{a.n_particles}"
        t0 = time.time()
        batch = 2000 if a.box <= 128 else 500
        self.data = simulate_on_device(volume, a.pixel_size, folder, a.n_particles, a.snr, 0, xp, batch, self.log)
        seconds = time.time() - t0
        stack_gb = a.n_particles * a.box * a.box * 4 / 1e9
        t = self.report.table("data", "Simulated data set", ["item", "value"])
        t.rows += [
            ["map", what],
            ["particles", f"{a.n_particles:,} at box {a.box}, {a.pixel_size:g} A/px, SNR {a.snr:g}"],
            ["stack", f"{stack_gb:.2f} GB, memory-mapped MRC ({folder})"],
            ["simulation time", f"{seconds:.1f} s ({a.n_particles / seconds:,.0f} particles/s, device {a.device})"],
        ]
        self.report.values["data"] = {"seconds": seconds, "stack_gb": stack_gb, "map": what}

    # --------------------------------------------------------------------- kernels

    def section_kernels(self) -> None:
        from habinit_plugin.engine.abinit import AbinitRun  # noqa: PLC0415
        from habinit_plugin.engine.fourier import phase_shift  # noqa: PLC0415
        from habinit_plugin.engine.particles import load_particles  # noqa: PLC0415
        from habinit_plugin.engine.pose_search import (  # noqa: PLC0415
            LocalSettings,
            _band_radius,
            _grid,
            _project_band,
            _shared_energies,
            global_search,
            local_search,
            shift_grid,
        )
        from habinit_plugin.engine.projector import backproject, project, slice_coordinates, volume_to_grid  # noqa: PLC0415
        from habinit_plugin.engine.search_policy import global_settings  # noqa: PLC0415
        from habinit_plugin.engine.settings import AbinitSettings  # noqa: PLC0415

        a, xp = self.args, self.xp
        if "sgemm" not in self.rates:
            self.section_rates()
        sgemm, copy_bw = self.rates["sgemm"], self.rates["copy"]
        data = self._dataset()
        particles = load_particles(data["gt_poses"])
        truth_map = self.volume if self.volume is not None else protein_map(a.box, a.pixel_size)[0]
        t = self.report.table(
            "kernels",
            "Kernel efficiency",
            ["kernel", "problem", "time", "achieved", "reference", "ratio"],
        )
        values = {}

        # pose search, as the SGD phase and the first full pass call it (search at 10 A)
        n_img = 64 if a.small else 1000
        run = AbinitRun(particles.subset(np.arange(min(len(particles), 4 * n_img))), AbinitSettings(seed=0), xp=xp)
        reference = volume_to_grid(xp.asarray(truth_map, dtype=xp.float32), 2)
        radius = run.geometry.radius(run.geometry.sgd_resolution_A)
        settings = global_settings(run.geometry, radius, run.device_bytes)
        index = np.arange(n_img)
        batch = run.image_batch(index, radius)
        seconds, result = timed(xp, lambda: global_search(reference, 2, batch, settings), repeat=1, warmup=1)
        coarse_flops, refine_flops = global_search_flops(batch, settings, n_img)
        total = coarse_flops + refine_flops
        t.rows.append(
            [
                "global pose search (whole)",
                f"{n_img} images, Hopf levels {settings.coarse_level}-{settings.final_level}, radius {radius:.1f} px, "
                f"{len(shift_grid(settings.max_shift_px, settings.coarse_shift_step_px))} coarse shifts",
                f"{seconds * 1e3:.0f} ms ({n_img / seconds:,.0f} images/s)",
                f"{total / seconds / 1e12:.3f} TFLOP/s",
                f"SGEMM {sgemm / 1e12:.2f} TFLOP/s",
                f"{total / seconds / sgemm:.1%}",
            ]
        )
        truth_err = so3.geodesic_distance(result.rotations[:, 0], particles.rotations[index])
        values["global_search"] = {
            "seconds": seconds,
            "flops": total,
            "coarse_flops": coarse_flops,
            "images": n_img,
            "median_error_vs_truth_deg": float(np.median(truth_err)),
        }

        # the coarse scoring alone (one chunk as global_search makes it) and its matrix product alone
        lo, hi = batch.band(_band_radius(settings, settings.coarse_level), settings.min_radius)
        freqs = batch.freqs[lo:hi]
        rotations = _grid(settings.coarse_level)
        proj = _project_band(reference, 2, rotations, freqs)
        shifts = shift_grid(settings.max_shift_px, settings.coarse_shift_step_px)
        ramps = phase_shift(freqs, xp.asarray(shifts), batch.box)
        chunk = min(n_img, max(1, int(2e7 // (len(shifts) * len(rotations)))))
        rows = slice(0, chunk)
        m, s_, r_ = hi - lo, len(shifts), len(rotations)
        seconds, _ = timed(
            xp, lambda: _shared_energies(batch, (lo, hi), proj, ramps, rows, settings.scale_invariant), repeat=3
        )
        flops = 2.0 * chunk * r_ * m * (2 * s_ + 1)
        t.rows.append(
            [
                "coarse scoring (_shared_energies)",
                f"{chunk} images x {s_} shifts x {r_} rotations, m = {m}",
                f"{seconds * 1e3:.1f} ms",
                f"{flops / seconds / 1e12:.3f} TFLOP/s",
                f"SGEMM {sgemm / 1e12:.2f} TFLOP/s",
                f"{flops / seconds / sgemm:.1%}",
            ]
        )
        values["coarse_scoring"] = {"seconds": seconds, "flops": flops}
        lhs = xp.asarray(np.random.default_rng(2).standard_normal((chunk * s_, 2 * m), dtype=np.float32))
        rhs = xp.asarray(np.random.default_rng(3).standard_normal((r_, 2 * m), dtype=np.float32))
        seconds, _ = timed(xp, lambda: lhs @ rhs.T, repeat=5)
        flops = 2.0 * chunk * s_ * 2 * m * r_
        t.rows.append(
            [
                "coarse cross-term matmul alone",
                f"({chunk * s_} x {2 * m}) @ ({2 * m} x {r_})",
                f"{seconds * 1e3:.2f} ms",
                f"{flops / seconds / 1e12:.3f} TFLOP/s",
                f"SGEMM {sgemm / 1e12:.2f} TFLOP/s",
                f"{flops / seconds / sgemm:.1%}",
            ]
        )
        values["coarse_matmul"] = {"seconds": seconds, "flops": flops}
        lhs = rhs = proj = ramps = None

        # local search at Nyquist, as the later full passes call it
        local_radius = float(run.geometry.r_limit)
        lbatch = run.image_batch(index, local_radius)
        local = LocalSettings(
            angle_step_deg=2 * so3.grid_spacing(settings.final_level),
            shift_step_px=1.0,
            n_levels=4,
            radius=local_radius,
            max_shift_px=run.geometry.max_shift_px,
        )
        start_r, start_o = particles.rotations[index], particles.shifts[index]
        seconds, _ = timed(xp, lambda: local_search(reference, 2, lbatch, start_r, start_o, local), repeat=1, warmup=1)
        lo, hi = lbatch.band(local.radius, local.min_radius)
        flops = 2.0 * n_img * local.n_levels * 27 * (hi - lo) * (2 * 9 + 1)
        t.rows.append(
            [
                "local pose search (whole)",
                f"{n_img} images, 4 levels x 27 rotations x 9 shifts, radius {local_radius:.0f} px, m = {hi - lo}",
                f"{seconds * 1e3:.0f} ms ({n_img / seconds:,.0f} images/s)",
                f"{flops / seconds / 1e12:.3f} TFLOP/s",
                f"SGEMM {sgemm / 1e12:.2f} TFLOP/s",
                f"{flops / seconds / sgemm:.1%}",
            ]
        )
        values["local_search"] = {"seconds": seconds, "flops": flops}
        lbatch = batch = None

        # projection and backprojection at full resolution on the 2x padded grid
        from habinit_plugin.engine.fourier import half_plane_frequencies  # noqa: PLC0415

        n_rot = 64 if a.small else 2000
        rot = so3.random_rotations(n_rot, np.random.default_rng(4))
        hp = half_plane_frequencies(a.box // 2 - 1)
        coords = slice_coordinates(xp.asarray(rot), xp.asarray(hp))
        samples = int(np.prod(coords.shape[:-1]))
        size = reference.shape[0]
        seconds, values_c = timed(xp, lambda: project(reference, coords, 2), repeat=3)
        model = 12 + 8 * 8 + 8
        t.rows.append(
            [
                "project (trilinear slices)",
                f"{n_rot} slices x {hp.shape[0]} frequencies, grid {size}^3 complex64",
                f"{seconds * 1e3:.1f} ms ({samples / seconds / 1e9:.2f} G samples/s)",
                f"{samples * model / seconds / 1e9:.0f} GB/s",
                f"copy {copy_bw / 1e9:.0f} GB/s",
                f"{samples * model / seconds / copy_bw:.1%}",
            ]
        )
        values["project"] = {"seconds": seconds, "samples": samples, "bytes_model": model}
        grid_out = xp.zeros_like(reference)
        seconds, _ = timed(xp, lambda: backproject(values_c, coords, size, 2, out=grid_out), repeat=3)
        model = 12 + 8 + 8 * 16
        t.rows.append(
            [
                "backproject (adjoint, complex)",
                f"same samples into {size}^3 complex64",
                f"{seconds * 1e3:.1f} ms ({samples / seconds / 1e9:.2f} G samples/s)",
                f"{samples * model / seconds / 1e9:.0f} GB/s",
                f"copy {copy_bw / 1e9:.0f} GB/s",
                f"{samples * model / seconds / copy_bw:.1%}",
            ]
        )
        values["backproject"] = {"seconds": seconds, "samples": samples, "bytes_model": model}
        weights = xp.abs(values_c).astype(xp.float32)
        weight_out = xp.zeros(reference.shape, dtype=xp.float32)
        seconds, _ = timed(xp, lambda: backproject(weights, coords, size, 2, out=weight_out), repeat=3)
        model = 12 + 4 + 8 * 8
        t.rows.append(
            [
                "backproject (adjoint, float32 weights)",
                f"same samples into {size}^3 float32",
                f"{seconds * 1e3:.1f} ms ({samples / seconds / 1e9:.2f} G samples/s)",
                f"{samples * model / seconds / 1e9:.0f} GB/s",
                f"copy {copy_bw / 1e9:.0f} GB/s",
                f"{samples * model / seconds / copy_bw:.1%}",
            ]
        )
        values["backproject_weights"] = {"seconds": seconds, "samples": samples, "bytes_model": model}
        self._expression_rows(t, values, reference, coords, values_c, samples, copy_bw)
        t.notes.append(
            "FLOPs: 2 m n k for every scoring matrix product the search makes (cross term with [Re, Im] stacked "
            "rows, and the CTF^2 term), counted from its shapes; time: the whole call, device synchronised. "
            "Bytes: a minimal-traffic model per sample: projection 84 B (3 float32 coordinates, 8 corners of "
            "complex64 read, 1 written), backprojection 148 B (coordinates, value, 8 corners read and written) "
            "or 80 B for float32 weights. On the GPU, project and backproject run the CUDA kernels of "
            "engine/kernels.py (one thread per sample); the rows '(array expressions)' time the NumPy-style "
            "expressions they replace, which move several times that traffic through temporaries."
        )
        self.report.values["kernels"] = values

    def _expression_rows(self, t: Table, values: dict, reference, coords, values_c, samples: int, copy_bw) -> None:
        """Time projection and backprojection through the array expressions, for comparison with the kernels."""
        from habinit_plugin.engine import kernels  # noqa: PLC0415
        from habinit_plugin.engine.trilinear import backproject_expressions, project_expressions  # noqa: PLC0415

        xp, size = self.xp, reference.shape[0]
        values["kernels_on"] = bool(kernels._state["enabled"]) and xp is not np
        t.rows.append(["CUDA kernels in use", "yes" if values["kernels_on"] else "no", "", "", "", ""])
        out = xp.zeros_like(reference)
        cases = (
            ("project (array expressions)", 84, lambda: project_expressions(reference, coords, 2)),
            ("backproject (array expressions)", 148, lambda: backproject_expressions(values_c, coords, size, 2, out)),
        )
        for name, model, fn in cases:
            seconds, _ = timed(xp, fn, repeat=2)
            rate = samples * model / seconds
            t.rows.append(
                [name, "same samples", f"{seconds * 1e3:.1f} ms", f"{rate / 1e9:.0f} GB/s", "", f"{rate / copy_bw:.1%}"]
            )
            values[name] = {"seconds": seconds}

    # ---------------------------------------------------------------------- parity

    def section_parity(self) -> None:
        from habinit_plugin.engine.ctf import evaluate_ctf  # noqa: PLC0415
        from habinit_plugin.engine.fourier import (  # noqa: PLC0415
            half_plane_frequencies,
            hermitian_weights,
            image_rfft,
            sample_spectra,
        )
        from habinit_plugin.engine.fsc import fsc  # noqa: PLC0415
        from habinit_plugin.engine.minibatch import ImageBatch  # noqa: PLC0415
        from habinit_plugin.engine.particles import load_particles  # noqa: PLC0415
        from habinit_plugin.engine.pose_search import SearchSettings, global_search  # noqa: PLC0415
        from habinit_plugin.engine.projector import backproject, project, slice_coordinates, volume_to_grid  # noqa: PLC0415
        from habinit_plugin.engine.reconstruct import reconstruct_half_maps  # noqa: PLC0415
        from habinit_plugin.engine.simulate import (  # noqa: PLC0415
            SimulationSettings,
            clean_images,
            random_poses,
            simulate_dataset,
        )

        a, xp = self.args, self.xp
        t = self.report.table(
            "parity", "Parity: device against CPU (NumPy)", ["check", "metric", "value", "tolerance", "verdict"]
        )
        values = {}

        def row(name, metric, value, tol, ok=None):
            ok = (value <= tol) if ok is None else ok
            t.rows.append([name, metric, fmt(value), fmt(tol), verdict(ok)])
            values[name] = {"metric": metric, "value": value, "tolerance": tol, "ok": bool(ok)}

        box = 32 if a.small else 64
        volume, _ = protein_map(box, 1.8 * 64 / box)
        grid_cpu = volume_to_grid(volume, 2)
        grid_dev = volume_to_grid(xp.asarray(volume), 2)
        row("Fourier grid (volume_to_grid)", "relative L2", rel_l2(grid_dev, grid_cpu), 1e-5)
        row("Fourier grid (volume_to_grid)", "max error / max", max_err(grid_dev, grid_cpu), 1e-4)
        rotations = so3.random_rotations(300, np.random.default_rng(1))
        freqs = half_plane_frequencies(box // 2 - 1)
        coords = slice_coordinates(rotations, freqs)
        coords_dev = slice_coordinates(xp.asarray(rotations), xp.asarray(freqs))
        proj_cpu = project(grid_cpu, coords, 2)
        row(
            "slices, same grid (project)",
            "relative L2",
            rel_l2(project(xp.asarray(grid_cpu), xp.asarray(coords), 2), proj_cpu),
            1e-6,
        )
        proj_dev = project(grid_dev, coords_dev, 2)
        row("slices, map to slices", "relative L2", rel_l2(proj_dev, proj_cpu), 1e-5)
        row("slices, map to slices", "max error / max", max_err(proj_dev, proj_cpu), 1e-4)
        rng = np.random.default_rng(2)
        vals = (rng.standard_normal(coords.shape[:-1]) + 1j * rng.standard_normal(coords.shape[:-1])).astype(
            np.complex64
        )
        size = grid_cpu.shape[0]
        bp_cpu = backproject(vals, coords, size, 2)
        bp_dev = backproject(xp.asarray(vals), xp.asarray(coords), size, 2)
        row("backprojection (complex)", "relative L2", rel_l2(bp_dev, bp_cpu), 1e-5)
        w = np.abs(vals).astype(np.float32)
        row(
            "backprojection (float32)",
            "relative L2",
            rel_l2(backproject(xp.asarray(w), xp.asarray(coords), size, 2), backproject(w, coords, size, 2)),
            1e-5,
        )
        del grid_cpu, grid_dev, bp_cpu, bp_dev

        sbox, spx = (32, 3.6) if a.small else (48, 2.4)
        svol, _ = protein_map(sbox, spx)
        poses = random_poses(SimulationSettings(n_particles=64, seed=4), spx, sbox)
        index = np.arange(64)
        img_cpu = clean_images(volume_to_grid(svol, 4), poses, index, spx, sbox, 4)
        img_dev = clean_images(volume_to_grid(xp.asarray(svol), 4), poses, index, spx, sbox, 4)
        row("simulated images (clean_images)", "relative L2", rel_l2(img_dev, img_cpu), 1e-5)

        n_rec = 400 if a.small else 1500
        folder = self.work / f"parity_box{sbox}_n{n_rec}"
        if not (folder / "gt_poses.star").is_file():
            simulate_dataset(svol, spx, folder, SimulationSettings(n_particles=n_rec, snr=1.0, seed=5))
        particles = load_particles(folder / "gt_poses.star")
        half = np.arange(n_rec) % 2 + 1
        a_cpu, b_cpu, c_cpu = reconstruct_half_maps(particles, half, xp=np, batch_size=400)
        a_dev, b_dev, c_dev = reconstruct_half_maps(particles, half, xp=xp, batch_size=400)
        row("Wiener half map A", "relative L2", rel_l2(a_dev, a_cpu), 1e-4)
        row("Wiener half map B", "relative L2", rel_l2(b_dev, b_cpu), 1e-4)
        row("half-map FSC curve", "max difference", float(np.abs(np.asarray(c_dev) - np.asarray(c_cpu)).max()), 1e-3)
        values["wiener_fsc_vs_truth_min"] = float(fsc(0.5 * (a_dev + b_dev), svol)[1 : sbox // 4].min())

        n_img, radius, level = (20, 14, 4) if a.small else (50, 22, 5)
        poses = random_poses(SimulationSettings(n_particles=n_img, seed=11, shift_sigma=4.0), spx, sbox)
        index = np.arange(n_img)
        images = clean_images(volume_to_grid(svol, 4), poses, index, spx, sbox, oversampling=4)
        freqs = half_plane_frequencies(radius)
        radii = np.hypot(freqs[:, 0], freqs[:, 1])
        spectra = sample_spectra(image_rfft(images), freqs)
        ctf = evaluate_ctf(poses.ctf.subset(index), freqs, spx, sbox)
        weight = hermitian_weights(freqs)
        settings = SearchSettings(
            coarse_level=2,
            final_level=level,
            beam=8,
            max_shift_px=6.0,
            coarse_shift_step_px=1.5,
            coarse_radius=10.0,
            final_radius=float(radius),
        )
        grid = volume_to_grid(svol, 2)
        cpu = global_search(grid, 2, ImageBatch(spectra, ctf, weight, freqs, radii, sbox), settings)
        dev_batch = ImageBatch(xp.asarray(spectra), xp.asarray(ctf), xp.asarray(weight), xp.asarray(freqs), radii, sbox)
        dev = global_search(xp.asarray(grid), 2, dev_batch, settings)
        diff = so3.geodesic_distance(dev.rotations[:, 0], cpu.rotations[:, 0])
        same = int(np.sum(diff < 1e-3))
        row(
            "best poses, noise-free (global_search)",
            f"identical best poses of {n_img}",
            same,
            n_img - 2,
            ok=same >= n_img - 2,
        )
        err = so3.geodesic_distance(dev.rotations[:, 0], poses.rotations)
        row(
            "best poses vs truth (device)",
            "max error, deg (< final spacing)",
            float(err.max()),
            so3.grid_spacing(level),
        )
        t.notes.append(
            "Relative L2 = ||device - cpu|| / ||cpu||; max error relative to the largest |value|. Both sides compute "
            "in float32; differences come from FFT algorithms, fused multiply-adds and the order of atomic additions."
        )
        self.report.values["parity"] = values

    # ---------------------------------------------------------------------- memory

    def section_memory(self) -> None:
        from habinit_plugin.engine.particles import load_particles  # noqa: PLC0415
        from habinit_plugin.engine.reconstruct import reconstruct_half_maps  # noqa: PLC0415

        xp = self.xp
        gb = gpu_budget.GB
        t = self.report.table("memory", "Memory budget", ["check", "value", "limit / expected", "verdict"])
        values = {}
        on_gpu = xp is not np

        # 1. a forced out-of-memory error, recovered by splitting (real pool limit on the GPU)
        index = np.arange(400)
        expected = float((index.astype(np.float64) * 2.0).sum())

        def func(part):
            if not on_gpu and len(part) > 50:
                raise MemoryError("forced (CPU run: MemoryError above 50 items)")
            block = xp.ones((len(part), 250_000), dtype=xp.float32)  # 1 MB per item
            return float((block[:, 0] * xp.asarray(part, dtype=xp.float32) * 2.0).sum())

        gpu_budget.set_gpu_memory_limit(xp, 0.1)
        oom.STATS.reset()
        with gpu_budget.MemoryPeak(xp) as peak:
            pieces = oom.OOMSplitter(xp=xp).run(func, index)
        total = sum(r for _, r in pieces)
        ok = abs(total - expected) <= 1e-6 * expected and oom.STATS.ooms > 0
        t.rows.append(
            [
                "forced out-of-memory, split and recovered",
                f"{oom.STATS.ooms} errors caught, {len(pieces)} pieces, same sum: {abs(total - expected) < 1e-3}",
                "400 items x 1 MB under 0.1 GB",
                verdict(ok),
            ]
        )
        if on_gpu:
            t.rows.append(
                [
                    "  pool peak during it",
                    f"{peak.peak_bytes / gb:.3f} GB",
                    "0.100 GB",
                    verdict(peak.peak_bytes <= 0.1 * gb),
                ]
            )
        values["forced_oom"] = {"ooms": oom.STATS.ooms, "pieces": len(pieces), "ok": ok, "peak": peak.peak_bytes}
        gpu_budget.set_gpu_memory_limit(xp, 0)
        oom.release_memory(xp)

        if not on_gpu:
            t.rows.append(["reconstruction under a pool limit", "n/a on the CPU", "", "n/a"])
            self.report.values["memory"] = values
            return

        # 2. cached blocks are freed before the pool limit fails an allocation
        gpu_budget.set_gpu_memory_limit(xp, 0.1)
        try:
            block = xp.empty(50_000_000, dtype=xp.uint8)
            del block
            block = xp.empty(60_000_000, dtype=xp.uint8)
            del block
            ok = True
        except MemoryError:
            ok = False
        t.rows.append(
            ["cached 50 MB + new 60 MB under 0.1 GB", "allocated" if ok else "OutOfMemoryError", "", verdict(ok)]
        )
        gpu_budget.set_gpu_memory_limit(xp, 0)
        oom.release_memory(xp)

        # 3. reconstruct_half_maps under 0.2 GB on a stack > 3x that, batches of 8000 asked for
        limit_gb, box, n = 0.2, 64, 40_000
        folder = self.work / f"memory_box{box}_n{n}"
        if not (folder / "gt_poses.star").is_file():
            volume, _ = protein_map(box, 1.8)
            simulate_on_device(volume, 1.8, folder, n, 1.0, 6, xp, 4000, None)
        oom.release_memory(xp)
        particles = load_particles(folder / "gt_poses.star")
        half = np.arange(n) % 2 + 1
        t0 = time.time()
        a_ref, b_ref, _ = reconstruct_half_maps(particles, half, xp=xp, batch_size=1000)
        unlimited = time.time() - t0
        oom.release_memory(xp)
        limit = gpu_budget.set_gpu_memory_limit(xp, limit_gb)
        oom.STATS.reset()
        error = None
        t0 = time.time()
        with gpu_budget.MemoryPeak(xp) as peak:
            try:
                a_lim, b_lim, _ = reconstruct_half_maps(
                    particles, half, xp=xp, batch_size=8000, memory_limit_bytes=limit
                )
            except Exception as exc:  # e.g. OutOfMemoryError while the engine does not split yet
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
        limited = time.time() - t0
        stack_gb = n * box * box * 4 / gb
        t.rows.append(
            ["stack size / limit", f"{stack_gb:.2f} GB / {limit_gb} GB", "> 3x", verdict(stack_gb > 3 * limit_gb)]
        )
        if error is None:
            same = max(rel_l2(a_lim, a_ref), rel_l2(b_lim, b_ref))
            t.rows.append(
                [
                    "reconstruct_half_maps, pool peak",
                    f"{peak.peak_bytes / gb:.3f} GB",
                    f"{limit_gb} GB",
                    verdict(peak.peak_bytes <= limit_gb * gb),
                ]
            )
            t.rows.append(["  maps vs unlimited", f"relative L2 {fmt(same)}", "1e-4", verdict(same <= 1e-4)])
            t.rows.append(
                [
                    "  time limited / unlimited",
                    f"{limited:.1f} s / {unlimited:.1f} s",
                    f"{oom.STATS.ooms} out-of-memory errors caught",
                    "",
                ]
            )
        else:
            t.rows.append(["reconstruct_half_maps under the limit", error, f"{limit_gb} GB", "FAIL"])
        values["reconstruction"] = {
            "peak": peak.peak_bytes,
            "limit": limit_gb * gb,
            "error": error,
            "ooms": oom.STATS.ooms,
            "seconds_limited": limited,
            "seconds_unlimited": unlimited,
        }
        t.notes.append(
            "Pool peak: the most bytes CuPy's default memory pool held from the device (arrays, cached blocks, FFT "
            "work areas), seen at every allocation by the engine's allocator (gpu_budget.MemoryPeak). The CUDA context "
            "and library handles are outside the pool."
        )
        self.report.values["memory"] = values

    # ------------------------------------------------------------------------- e2e

    def section_e2e(self) -> None:
        a, xp = self.args, self.xp
        data = self._dataset()
        out = self.work / "run"
        argv = [
            "run",
            "--particles",
            str(data["particles"]),
            "--out",
            str(out),
            "--device",
            a.device,
            "--overwrite",
        ]
        if xp is not np:
            argv += ["--gpu-mem", f"{a.gpu_mem:g}"]
        argv += shlex.split(a.e2e_args)
        result_json = self.work / "e2e_child.json"
        result_json.unlink(missing_ok=True)
        log_path = self.work / "e2e.log"
        reserve = 20 if a.small else 90
        timeout = max(30.0, self.report.remaining() - reserve)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":"))
        command = [sys.executable, str(Path(__file__).resolve()), "--e2e-child", str(result_json), a.device, *argv]
        self.log(f"habinit {' '.join(argv)} (timeout {timeout:.0f} s)")
        oom.release_memory(xp)
        baseline = device_used(xp)
        t0 = time.time()
        timed_out = False
        with open(log_path, "w") as log_file:
            try:
                done = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=timeout)
                rc = done.returncode
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
        wall = time.time() - t0
        log_tail = log_path.read_text(errors="replace")[-6000:]
        if os.environ.get("OUT"):
            _write(Path(os.environ["OUT"]) / "e2e_log.txt", log_tail)
        child = json.loads(result_json.read_text()) if result_json.is_file() else {}
        t = self.report.table("e2e", "End to end: habinit run", ["item", "value", "target", "verdict"])
        values = {"argv": argv, "wall_s": wall, "rc": rc, "timed_out": timed_out, "child": child}
        self.report.values["e2e"] = values
        t.rows.append(["command", "`habinit " + " ".join(shlex.quote(x) for x in argv[:1] + argv[5:]) + "`", "", ""])
        t.rows.append(["wall time (process)", f"{wall:.0f} s", "< 600 s", verdict(wall < 600 and rc == 0)])
        if timed_out or rc != 0:
            status = "stopped at the time budget" if timed_out else f"exit status {rc}"
            t.rows.append(["status", status, "finished", "FAIL"])
            t.notes.append("Last lines of the job's log:\n\n```\n" + "\n".join(log_tail.splitlines()[-25:]) + "\n```")
            return
        info = json.loads((out / "run.json").read_text())
        for phase, seconds in info.get("timings", {}).items():
            t.rows.append([f"  phase: {phase}", f"{seconds:.1f} s", "", ""])
        child_wall = child.get("wall_s")
        if child_wall is not None:
            accounted = sum(info.get("timings", {}).values())
            t.rows.append(["  other (loading, set-up, outputs)", f"{child_wall - accounted:.1f} s", "", ""])
        t.rows.append(["particles used / unused", f"{info.get('n_used')} / {info.get('n_unused')}", "", ""])
        t.rows.append(["GS-FSC 0.143 (reported)", f"{info['resolution_0143']:.2f} A", "", ""])
        if xp is not np:
            limit = child.get("limit_bytes")
            peak = child.get("pool_peak_bytes", 0)
            t.rows.append(
                [
                    "--gpu-mem applied by the CLI",
                    "yes" if limit else "no (the pool had no limit: wiring missing)",
                    f"{a.gpu_mem:g} GB",
                    verdict(bool(limit)),
                ]
            )
            t.rows.append(
                ["pool peak", f"{peak / 1e9:.3f} GB", f"<= {a.gpu_mem:g} GB", verdict(peak <= a.gpu_mem * 1e9)]
            )
            t.rows.append(
                ["out-of-memory errors caught and split in the job", fmt(child.get("oom_errors_caught")), "", ""]
            )
            used = child.get("device_used_peak_bytes")
            if used is not None:
                t.rows.append(
                    [
                        "device memory in use, peak (sampled, all processes, less the bench's own)",
                        f"{(used - baseline) / 1e9:.3f} GB",
                        "pool + CUDA context + libraries",
                        "",
                    ]
                )
        if self.report.remaining() < (10 if a.small else 45):
            t.rows.append(["ground-truth comparison", "skipped: out of time", "", "n/a"])
            return
        self._truth(t, data, out, info, wall, values)

    def _truth(self, t: Table, data, out: Path, info: dict, wall: float, values: dict) -> None:
        from habinit_plugin.engine.fsc import fsc, resolution_at  # noqa: PLC0415
        from habinit_plugin.engine.mrc import read_map  # noqa: PLC0415
        from habinit_plugin.engine.particles import load_particles  # noqa: PLC0415
        from habinit_plugin.engine.reconstruct import reconstruct_half_maps  # noqa: PLC0415
        from habinit_plugin.engine.truth import compare_to_truth  # noqa: PLC0415

        xp = self.xp
        t0 = time.time()
        truth, px = read_map(data["gt_map"])
        truth_poses = load_particles(data["gt_poses"])
        found = load_particles(out / "particles.star")
        row_of = {int(i): k for k, i in enumerate(truth_poses.ids)}
        rows = np.array([row_of[int(i)] for i in found.ids])
        maps = {h: read_map(out / f"half_map_{h}.mrc")[0] for h in "AB"}
        halves = {}
        for h, value in (("A", 1), ("B", 2)):
            mine = np.sort(rows[found.half_set == value])
            comparison = compare_to_truth(maps[h], truth, px, xp=xp)
            subset = truth_poses.subset(mine)
            k_a, k_b, _ = reconstruct_half_maps(subset, np.arange(len(mine)) % 2 + 1, xp=xp, batch_size=1000)
            known = resolution_at(fsc(0.5 * (k_a + k_b), truth), 0.5, px)
            halves[h] = {
                "truth_05": comparison.resolution_05,
                "known_05": known,
                "mirrored": comparison.alignment.mirrored,
            }
        full = compare_to_truth(
            0.5 * (maps["A"] + maps["B"]),
            truth,
            px,
            found.rotations,
            found.shifts,
            truth_poses.rotations[rows],
            truth_poses.shifts[rows],
            xp=xp,
        )
        for h in "AB":
            r = halves[h]
            ok = r["truth_05"] <= 1.3 * r["known_05"]
            t.rows.append(
                [
                    f"half {h}: FSC 0.5 vs truth / known-pose of its half",
                    f"{r['truth_05']:.2f} A / {r['known_05']:.2f} A (x{r['truth_05'] / r['known_05']:.2f})",
                    "<= 1.3x",
                    verdict(ok),
                ]
            )
        gs = info["resolution_0143"]
        gap = abs(gs - full.resolution_05) / full.resolution_05
        t.rows.append(
            [
                "GS-FSC 0.143 vs full map FSC 0.5 vs truth",
                f"{gs:.2f} A vs {full.resolution_05:.2f} A ({gap:.0%})",
                "within 15%",
                verdict(gap <= 0.15),
            ]
        )
        same_hand = halves["A"]["mirrored"] == halves["B"]["mirrored"]
        t.rows.append(["halves in the same hand", fmt(same_hand), "yes", verdict(same_hand)])
        t.rows.append(
            [
                "median pose error (after global alignment)",
                f"{full.median_angle_error:.2f} deg",
                "< 5 deg",
                verdict(full.median_angle_error < 5.0),
            ]
        )
        t.rows.append(["(truth comparison time)", f"{time.time() - t0:.0f} s", "", ""])
        values["truth"] = {
            "halves": halves,
            "gs_0143": gs,
            "full_truth_05": full.resolution_05,
            "median_angle_error": full.median_angle_error,
            "wall_s": wall,
        }


# ------------------------------------------------------------------------ helpers


def rel_l2(a, b) -> float:
    a = np.asarray(to_numpy(a), dtype=np.complex128)
    b = np.asarray(to_numpy(b), dtype=np.complex128)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def max_err(a, b) -> float:
    a, b = to_numpy(a), to_numpy(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def device_used(xp) -> int | None:
    if xp is np:
        return None
    free, total = xp.cuda.runtime.memGetInfo()
    return int(total - free)


def global_search_flops(batch, settings, n_images: int) -> tuple[float, float]:
    """FLOPs of the scoring matrix products of ``global_search`` (coarse level, refinement levels)."""
    from habinit_plugin.engine.pose_search import _band_radius, _grid, shift_grid  # noqa: PLC0415

    lo, hi = batch.band(_band_radius(settings, settings.coarse_level), settings.min_radius)
    m = hi - lo
    n_rot = len(_grid(settings.coarse_level))
    n_shift = len(shift_grid(settings.max_shift_px, settings.coarse_shift_step_px))
    coarse = 2.0 * n_images * n_rot * m * (2 * n_shift + 1)
    refine = 0.0
    step = settings.coarse_shift_step
    for level in range(settings.coarse_level + 1, settings.final_level + 1):
        step /= 2.0
        n_delta = len(shift_grid(step * 1.5, step))
        lo, hi = batch.band(_band_radius(settings, level), settings.min_radius)
        refine += 2.0 * n_images * settings.beam * 8 * (hi - lo) * (2 * n_delta + 1)
    return coarse, refine


# -------------------------------------------------------------------- e2e child


def e2e_child(argv: list[str]) -> int:
    """``bench/gpu.py --e2e-child RESULT.json DEVICE <habinit args>``: the CLI in this process,
    with the pool peak (engine allocator) and the device memory in use sampled every 0.1 s."""
    result_path, device, cli_args = Path(argv[0]), argv[1], argv[2:]
    from habinit_plugin.engine import cli  # noqa: PLC0415

    xp = get_xp(device)
    sampled = {"max": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                sampled["max"] = max(sampled["max"], device_used(xp) or 0)
            except Exception:
                return
            stop.wait(0.1)

    thread = None
    if xp is not np:
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
    t0 = time.time()
    with gpu_budget.MemoryPeak(xp) as peak:
        rc = cli.main(cli_args)
    wall = time.time() - t0
    stop.set()
    if thread is not None:
        thread.join(timeout=1)
    result = {
        "rc": rc,
        "wall_s": wall,
        "pool_peak_bytes": peak.peak_bytes if xp is not np else None,
        "limit_bytes": gpu_budget.gpu_memory_limit(xp),
        "device_used_peak_bytes": sampled["max"] if xp is not np else None,
        "oom_errors_caught": oom.STATS.ooms,
    }
    result_path.write_text(json.dumps(result))
    return int(rc)


# ---------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    p.add_argument("--small", action="store_true", help="small sizes for a smoke run (CPU or GPU)")
    p.add_argument("--n-particles", type=int, help="large set (default 100000; --small 1200)")
    p.add_argument("--box", type=int, help="box of the large set (default 128; --small 32)")
    p.add_argument("--pixel-size", type=float, help="Angstrom (default 0.9; --small 3.6)")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--gpu-mem", type=float, default=2.0, help="GB, passed to habinit run")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, help="seconds for the whole run (default 560; --small 170)")
    p.add_argument("--e2e-args", default=None, help="extra arguments for habinit run (default none; --small --quick)")
    p.add_argument("--work-dir", help="scratch folder (default /tmp/habinit_gpu_bench; --small bench/out/gpu_small)")
    args = p.parse_args(argv)
    small = args.small
    defaults = {
        "n_particles": 1200 if small else 100_000,
        "box": 32 if small else 128,
        "pixel_size": 3.6 if small else 0.9,
        "budget_s": 170.0 if small else 560.0,
        "e2e_args": "--quick" if small else "",
        "work_dir": str(ROOT / "bench" / "out" / "gpu_small") if small else "/tmp/habinit_gpu_bench",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--e2e-child":
        return e2e_child(argv[1:])
    args = parse_args(argv)
    bench = Bench(args)
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    return bench.run(sections)


if __name__ == "__main__":
    sys.exit(main())
