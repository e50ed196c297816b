"""RELION 3.1's own programs on the gold-standard job's outputs (issue 16, the convention proof outside Scipion).

``relion_reconstruct --subset 1|2`` of our particles.star gives our half maps A|B (rlnRandomSubset 1 is half A),
and ``relion_postprocess`` of our half maps gives our FSC, with no alignment and no map moved: RELION reads our
angles, origins (A), CTF, half-set labels, pixel size and map headers the way we wrote them.

What the two programs do that ours do not, and how the comparison accounts for it (each was measured, not assumed):

- relion_reconstruct multiplies its map by a soft sphere of the box's radius (``softMaskOutsideMap`` in
  ``BackProjector::windowToOridimRealSpace``); noise outside it is in our maps only. With pure-noise images and the
  same poses the two programs' maps correlate 0.70-0.85 per shell over the whole box and 0.99 inside a sphere of
  radius box/2 - 2, so both maps are compared inside that sphere.
- relion_reconstruct without ``--fsc`` divides by the weights with no prior, which at 80 particles a half leaves
  noise that our Wiener half maps do not have. ``--fsc`` gives it our prior: it takes the curve F as a half-map FSC
  and regularises a map of all particles with SSNR(sqrt(2F / (1 + F))), so it is given F^2 / (2 - F^2), which
  makes that SSNR(F) = F / (1 - F), the prior of a half map (ours and RELION's refinement's).
- our reconstruction uses frequencies |k| <= box/2 - 1; ``--maxres`` gives relion_reconstruct the same limit.
- relion_postprocess's FSC sums the half-complex FFT grid (the kx = 0 plane weighs twice as much as the rest);
  ours sums the full grid. The test reproduces RELION's curve from our maps to 1e-4 that way, then bounds its
  difference from fsc.json. RELION's rlnFinalResolution is the last shell at or above 0.143 (no interpolation).
- relion_postprocess 3.1.3 with no mask writes postprocess.star and then exits 1 in its plot
  (``MetaDataTable::addToCPlot2D ERROR: cannot find y-axis label``); with a mask it needs Ghostscript (``gs``),
  which Debian's relion does not install. The test runs it with no mask (the unmasked curve is the one fsc.json
  holds) and reads postprocess.star whatever its exit status, failing when that file is not written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures import TINY
from habinit_plugin.engine.fsc import fsc, resolution_at
from habinit_plugin.engine.mrc import read_map
from habinit_plugin.engine.star import read_star

RELION_PROGRAMS = ("relion_reconstruct", "relion_postprocess")
pytestmark = pytest.mark.skipif(
    any(shutil.which(p) is None for p in RELION_PROGRAMS),
    reason="RELION 3.1 (Debian's relion: relion_reconstruct, relion_postprocess) is not on PATH",
)
HALF_MAP_OF_SUBSET = {1: "half_map_A.mrc", 2: "half_map_B.mrc"}
MIN_CORRELATION = 0.95  # issue 16: per shell up to our gold-standard resolution, and in real space


@pytest.fixture(scope="module")
def tiny_job(tiny_set, tmp_path_factory) -> tuple[Path, dict, float]:
    """The gold-standard job on the tiny set (160 particles, box 32, 3.6 A/px); (folder, fsc.json, seconds)."""
    from habinit_plugin.engine.jobs import gold_standard_job
    from habinit_plugin.engine.settings import AbinitSettings, JobSettings

    out = tmp_path_factory.mktemp("relion_programs") / "job"
    settings = JobSettings(abinit=AbinitSettings(**TINY), align_every=6, checkpoint_minutes=0.0)
    t0 = time.time()
    gold_standard_job(str(tiny_set["particles"]), out, settings)
    return out, json.loads((out / "fsc.json").read_text()), time.time() - t0


def _run_relion(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def _write_relion_prior_star(path: Path, curve_half: np.ndarray) -> None:
    """``relion_reconstruct --fsc`` input (rlnSpectralIndex, rlnGoldStandardFsc) that makes RELION regularise with
    the half-map SSNR F / (1 - F) of ``curve_half`` (shells 0 .. box/2), see the module docstring."""
    f = np.clip(np.asarray(curve_half, dtype=np.float64), 0.001, 0.999)
    lines = ["data_fsc", "loop_", "_rlnSpectralIndex #1", "_rlnGoldStandardFsc #2"]
    lines += [f"{k} {v:.8f}" for k, v in enumerate(f * f / (2.0 - f * f))]
    path.write_text("\n".join(lines) + "\n")


def _sphere(box: int, radius_px: float) -> np.ndarray:
    """(box, box, box) float32 mask: 1 inside ``radius_px`` of the centre voxel box//2, else 0."""
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    return (np.sqrt(x * x + y * y + z * z) < radius_px).astype(np.float32)


def _half_complex_fsc(map_a: np.ndarray, map_b: np.ndarray) -> np.ndarray:
    """FSC per shell 0 .. box/2 summed over the half-complex (rfftn) grid, shell = round(|k|): RELION's getFSC."""
    box = map_a.shape[0]
    fa, fb = np.fft.rfftn(map_a.astype(np.float64)), np.fft.rfftn(map_b.astype(np.float64))
    k = np.fft.fftfreq(box) * box
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(box // 2 + 1)[None, None, :] ** 2)
    shell = np.floor(radius + 0.5).astype(np.int64)
    inside = shell <= box // 2
    n = box // 2 + 1
    cross = np.bincount(shell[inside], np.real(fa * np.conj(fb))[inside], n)
    power_a = np.bincount(shell[inside], (np.abs(fa) ** 2)[inside], n)
    power_b = np.bincount(shell[inside], (np.abs(fb) ** 2)[inside], n)
    return cross / np.sqrt(power_a * power_b)


@pytest.fixture(scope="module")
def relion_half_maps(tiny_job, tmp_path_factory) -> dict[int, np.ndarray]:
    """relion_reconstruct --subset n --ctf of the job's particles.star for n = 1, 2, with our FSC's prior and our
    frequency limit (module docstring); pixel size from the optics table. {n: (box, box, box) map}."""
    job, report, _ = tiny_job
    box, pixel_size = report["box"], report["pixel_size"]
    folder = tmp_path_factory.mktemp("relion_reconstruct")
    prior = folder / "prior.star"
    _write_relion_prior_star(prior, _curve(report))
    max_res_A = box * pixel_size / (box // 2 - 1) * (1 + 1e-6)  # RELION's r_max = ceil(box * px / maxres) = box/2 - 1
    maps = {}
    t0 = time.time()
    for n in (1, 2):
        out = folder / f"relion_subset{n}.mrc"
        args = ["relion_reconstruct", "--i", str(job / "particles.star"), "--o", str(out), "--subset", str(n)]
        args += ["--ctf", "--fsc", str(prior), "--maxres", f"{max_res_A:.6f}"]
        run = _run_relion(args, folder)
        assert run.returncode == 0 and out.is_file(), f"{' '.join(args)} failed: {run.stderr[-2000:]}"
        maps[n], relion_px = read_map(out)
        assert maps[n].shape == (box,) * 3 and abs(relion_px - pixel_size) < 1e-3, (maps[n].shape, relion_px)
    print(f"\nthe job took {tiny_job[2]:.1f} s, relion_reconstruct of both half sets {time.time() - t0:.1f} s")
    return maps


def _curve(report: dict) -> np.ndarray:
    """fsc.json's (unmasked) gold-standard FSC per shell 0 .. box/2."""
    return np.array([row["fsc"] for row in report["curve"]])


def _compared_shells(report: dict, resolution_A: float) -> slice:
    """Shells 1 .. the last one at or below 1 / ``resolution_A``, within our reconstruction's band (box/2 - 2: the
    shell box/2 - 1 is half outside |k| <= box/2 - 1)."""
    box, pixel_size = report["box"], report["pixel_size"]
    return slice(1, min(int(np.floor(box * pixel_size / resolution_A)), box // 2 - 2) + 1)


def _our_wiener_half_map(particles_star: Path, subset: int, curve_half: np.ndarray) -> np.ndarray:
    """Our direct reconstruction (the engine's Backprojection and Wiener division, no per-particle scale, best pose
    only) of the particles of ``particles_star`` with rlnRandomSubset == ``subset``, at their poses, with the prior
    of the half-map FSC ``curve_half``: what relion_reconstruct computes, by our code. (box, box, box) float32."""
    from habinit_plugin.engine.ctf import evaluate_ctf
    from habinit_plugin.engine.particles import load_particles
    from habinit_plugin.engine.reconstruct import (
        Backprojection,
        particle_spectra,
        reconstruction_frequencies,
        tau2_from_fsc,
        wiener_map,
    )

    particles = load_particles(particles_star)
    rows = np.flatnonzero(particles.half_set == subset)
    freqs = reconstruction_frequencies(particles.box)
    ctf = evaluate_ctf(particles.ctf.subset(rows), freqs, particles.pixel_size, particles.box)
    spectra = particle_spectra(particles.read_images(rows), freqs, particles.shifts[rows])
    sums = Backprojection.zeros(particles.box)
    sums.insert(spectra, ctf, particles.rotations[rows], freqs)
    sums = sums.completed()
    return wiener_map(sums, tau2_from_fsc(curve_half, sums.weight, sums.oversampling))


def _low_pass(volume: np.ndarray, last_shell: int) -> np.ndarray:
    """(box, box, box) map with every Fourier component beyond shell ``last_shell`` (round(|k|)) set to zero."""
    k = np.fft.fftfreq(volume.shape[0]) * volume.shape[0]
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    return np.fft.ifftn(np.fft.fftn(volume) * (np.floor(radius + 0.5) <= last_shell)).real


def _correlations(relion: np.ndarray, ours: np.ndarray, shells: slice) -> tuple[float, np.ndarray]:
    """(real-space correlation up to the last of ``shells``, per-shell correlation over ``shells``) of two maps
    inside the sphere of radius box/2 - 2 that relion_reconstruct keeps."""
    mask = _sphere(relion.shape[0], relion.shape[0] // 2 - 2)
    band = [_low_pass(m * mask, shells.stop - 1).ravel() for m in (relion, ours)]
    return float(np.corrcoef(*band)[0, 1]), fsc(relion, ours, mask)[shells]


def test_relion_reconstruct_of_our_particles_is_our_reconstruction(tiny_job, relion_half_maps):
    """The conventions, with nothing else different: our Wiener reconstruction of each half set of particles.star
    (poses, origins in A, CTF, rlnRandomSubset, pixel size as written) and relion_reconstruct's, with the same
    prior, agree to >= 0.95 at every shell up to our gold-standard resolution (lowest shell measured 0.966-0.991 on
    eight sets) and >= 0.99 in real space up to it (measured 0.997-0.999), with no alignment."""
    job, report, _ = tiny_job
    shells = _compared_shells(report, report["resolution_0143"])
    for n in (1, 2):
        ours = _our_wiener_half_map(job / "particles.star", n, _curve(report))
        real_space, per_shell = _correlations(relion_half_maps[n], ours, shells)
        print(
            f"\nrelion_reconstruct --subset {n} vs our reconstruction of subset {n}, same prior: real-space "
            f"correlation to GS {real_space:.4f}, per shell {shells.start}-{shells.stop - 1} (to "
            f"{report['resolution_0143']:.2f} A) min {per_shell.min():.4f} {np.round(per_shell, 3).tolist()}"
        )
        assert per_shell.min() >= MIN_CORRELATION and real_space >= 0.99


def test_relion_reconstruct_of_each_half_set_is_our_half_map(tiny_job, relion_half_maps):
    """relion_reconstruct --subset n of our particles.star against our half map of subset n (1: A, 2: B), no
    alignment: >= 0.95 in real space up to our gold-standard resolution (measured 0.966-0.997 on eight sets) and at
    every shell up to our FSC 0.5 resolution, >= 0.90 at every shell up to the gold-standard one (lowest shell
    measured 0.933-0.991), and well above the other half map's correlation near the resolution (the half sets are
    the right way round). Near the resolution a half map's SSNR is ~0.17 and its prior weighs the noise: ours is set
    by the internal halves of the last pass and each particle's fitted signal scale (issue 15) weighs it, neither of
    which RELION has (the test above gives both the same prior and no scale: >= 0.966 there)."""
    job, report, _ = tiny_job
    up_to_gs = _compared_shells(report, report["resolution_0143"])
    up_to_05 = _compared_shells(report, report["resolution_05"])
    for n, name in HALF_MAP_OF_SUBSET.items():
        ours, other = read_map(job / name)[0], read_map(job / HALF_MAP_OF_SUBSET[3 - n])[0]
        real_space, per_shell = _correlations(relion_half_maps[n], ours, up_to_gs)
        _, other_shell = _correlations(relion_half_maps[n], other, up_to_gs)
        print(
            f"\nrelion_reconstruct --subset {n} vs {name} (GS {report['resolution_0143']:.2f} A, shells "
            f"{up_to_gs.start}-{up_to_gs.stop - 1}): real-space correlation to GS {real_space:.4f}, per shell min "
            f"{per_shell.min():.4f} {np.round(per_shell, 3).tolist()}; vs the other half map "
            f"{np.round(other_shell, 3).tolist()}"
        )
        assert real_space >= MIN_CORRELATION
        assert per_shell[: up_to_05.stop - 1].min() >= MIN_CORRELATION and per_shell.min() >= 0.90
        assert (per_shell - other_shell)[-3:].min() >= 0.3


def test_relion_postprocess_fsc_is_ours(tiny_job, tmp_path):
    """relion_postprocess (no mask, pixel size from our map headers) on our half maps: its unmasked FSC is our two
    maps' FSC on the half-complex grid to 1e-4, within 0.05 of fsc.json at every shell (measured 0.007-0.034 on eight
    sets, from the weight of the kx = 0 plane); its curve crosses 0.143 within 3% of our resolution, and its
    rlnFinalResolution is the shell our crossing lies in."""
    job, report, _ = tiny_job
    box, pixel_size, resolution_A = report["box"], report["pixel_size"], report["resolution_0143"]
    ours = _curve(report)
    for n, name in HALF_MAP_OF_SUBSET.items():  # RELION finds half 2 by replacing "half1" with "half2" in --i
        (tmp_path / f"run_half{n}_class001_unfil.mrc").symlink_to(job / name)
    args = ["relion_postprocess", "--i", "run_half1_class001_unfil.mrc", "--o", "postprocess"]
    run = _run_relion(args, tmp_path)
    star = tmp_path / "postprocess.star"
    assert star.is_file(), f"{' '.join(args)} wrote no postprocess.star (exit {run.returncode}): {run.stderr[-2000:]}"
    blocks = read_star(star)
    table = blocks["fsc"]
    relion = table.floats("rlnFourierShellCorrelationUnmaskedMaps")
    shells = table.ints("rlnSpectralIndex")
    final_resolution_A = float(blocks["general"].floats("rlnFinalResolution")[0])
    assert np.array_equal(shells, np.arange(box // 2 + 1))
    header_resolution_A = table.floats("rlnAngstromResolution")[1:]
    assert np.allclose(header_resolution_A, box * pixel_size / shells[1:], rtol=1e-4)  # our header's pixel size

    half_a, half_b = read_map(job / "half_map_A.mrc")[0], read_map(job / "half_map_B.mrc")[0]
    same_maps = np.abs(relion - _half_complex_fsc(half_a, half_b)).max()
    difference = np.abs(relion - ours).max()
    relion_interpolated_A = resolution_at(relion, 0.143, pixel_size)
    crossing_shell = box * pixel_size / resolution_A
    print(
        f"\nrelion_postprocess unmasked FSC vs fsc.json: max |difference| {difference:.4f} (vs the half-complex sum of "
        f"our maps {same_maps:.1e}); rlnFinalResolution {final_resolution_A:.2f} A, RELION's curve at 0.143 "
        f"{relion_interpolated_A:.2f} A, ours {resolution_A:.2f} A"
    )
    assert same_maps < 1e-4
    assert difference < 0.05
    final_shell = box * pixel_size / final_resolution_A
    assert abs(final_shell - round(final_shell)) < 1e-3  # a shell's resolution, as RELION reports it
    assert final_shell - 0.1 <= crossing_shell < final_shell + 1.1  # ours crosses in that shell (+- 0.1)
    assert abs(relion_interpolated_A / resolution_A - 1) < 0.03
