"""habinit simulate's effects of real particle stacks: each off by default, each present and measurable.

Small seeded sets (box 48 at 2.4 A/px, or box 32 at 3.6 A/px, a few hundred particles). Noise-free runs
(snr inf) of the same seed give the signal each image holds, so the effects are checked image by image.
"""

from __future__ import annotations

import logging
from unittest import mock

import mrcfile
import numpy as np
import pytest

from habinit_plugin.engine import density, simulate
from habinit_plugin.engine.cli import main
from habinit_plugin.engine.fourier import image_rfft
from habinit_plugin.engine.particles import load_particles
from habinit_plugin.engine.projector import volume_to_grid
from habinit_plugin.engine.simulate import SimulationSettings, simulate_dataset

BOX, PIXEL_SIZE = 48, 2.4  # 115 A box, Nyquist 4.8 A


@pytest.fixture(autouse=True)
def restore_logging():
    """main() points the log at this test's captured stdout: put the handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def volume():
    return density.bundled_protein_map(BOX, PIXEL_SIZE)


def run(volume, out, pixel_size=PIXEL_SIZE, **settings):
    """Simulate; returns (stack (P, N, N) float32, truth dict, paths)."""
    paths = simulate_dataset(volume, pixel_size, out, SimulationSettings(**settings))
    with mrcfile.open(paths["stack"]) as mrc:
        stack = np.array(mrc.data)
    with np.load(paths["truth"]) as npz:
        truth = {key: npz[key] for key in npz.files}
    return stack, truth, paths


def shells(box):
    """Integer Fourier radius (rounded) of the rfft layout of image_rfft, (N, N//2 + 1)."""
    ky = np.fft.fftfreq(box, 1.0 / box)[:, None]
    kx = np.arange(box // 2 + 1)[None, :]
    return np.rint(np.hypot(kx, ky)).astype(int)


def shell_power(images, box):
    """Mean over the images and the rfft coefficients of each shell 0..box//2 of |image_rfft|^2; counts."""
    power = (np.abs(image_rfft(images.astype(np.float32))) ** 2).astype(np.float64).mean(axis=0)
    r = shells(box)
    inside = r <= box // 2
    counts = np.bincount(r[inside], minlength=box // 2 + 1)
    return np.bincount(r[inside], weights=power[inside], minlength=box // 2 + 1) / counts, counts


def correlation(a, b):
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# ------------------------------------------------------------------------------ defaults


def test_defaults_write_what_the_default_settings_write(tmp_path, capsys):
    """The CLI with every effect option absent, or given at its default value, writes the stack of a
    plain SimulationSettings(); truth.npz then records no effect."""
    common = ["--box", "32", "--pixel-size", "3.6", "--n-particles", "120", "--seed", "4", "--snr", "0.5"]
    assert main(["simulate", "--out", str(tmp_path / "cli"), *common]) == 0
    explicit = [
        *("--envelope-bfactor", "0", "--coloured-noise", "0", "--preferred-fraction", "0"),
        *("--junk-fraction", "0", "--scale-sd", "0", "--intensity-scale", "1", "--intensity-offset", "0"),
    ]
    assert main(["simulate", "--out", str(tmp_path / "explicit"), *common, *explicit, "--protein", "adk"]) == 0
    volume = density.bundled_protein_map(32, 3.6)
    plain, truth, _ = run(volume, tmp_path / "api", 3.6, n_particles=120, seed=4, snr=0.5)
    for name in ("cli", "explicit"):
        with mrcfile.open(tmp_path / name / "particles.mrcs") as mrc:
            assert np.array_equal(np.array(mrc.data), plain)
        for star in ("particles.star", "gt_poses.star"):
            assert (tmp_path / name / star).read_bytes() == (tmp_path / "api" / star).read_bytes()
    assert "envelope" not in capsys.readouterr().out  # no effect line in the log
    keys = """rotations origins_px scale is_junk junk_kind in_preferred_cone preferred_direction noise_power_per_shell
    envelope_bfactor_A2 intensity_scale intensity_offset invert_contrast pixel_size_A snr image_scale""".split()
    assert set(keys) <= set(truth)
    assert truth["rotations"].shape == (120, 3, 3) and truth["origins_px"].shape == (120, 2)
    assert not truth["is_junk"].any() and not truth["in_preferred_cone"].any()
    assert np.all(truth["junk_kind"] == 0) and np.all(truth["scale"] == 1.0)
    assert np.isnan(truth["preferred_direction"]).all()
    assert truth["oversampling"] == 4 and truth["box"] == 32 and truth["pixel_size_A"] == 3.6
    assert float(truth["intensity_scale"]) == 1.0 and float(truth["intensity_offset"]) == 0.0
    assert not bool(truth["invert_contrast"]) and float(truth["envelope_bfactor_A2"]) == 0.0
    # white noise of unit variance: |image_rfft|^2 = box^2 at every frequency
    np.testing.assert_allclose(truth["noise_power_per_shell"], 32**2, rtol=1e-12)
    assert truth["noise_power_per_shell"].shape == (17,)
    # the poses of truth.npz are gt_poses.star's
    read = load_particles(tmp_path / "api" / "gt_poses.star")
    np.testing.assert_allclose(read.rotations, truth["rotations"], atol=1e-5)
    np.testing.assert_allclose(read.shifts, truth["origins_px"], atol=1e-5)


# ------------------------------------------------------------------------------ envelope


def test_envelope_bfactor_decays_the_signal_only(tmp_path, volume):
    bfactor = 100.0  # exp(-B s^2 / 2) = 0.11 in power at Nyquist
    plain, _, p0 = run(volume, tmp_path / "plain", n_particles=150, snr=np.inf, seed=6)
    decayed, truth, p1 = run(volume, tmp_path / "env", n_particles=150, snr=np.inf, seed=6, envelope_bfactor_A2=bfactor)
    assert float(truth["envelope_bfactor_A2"]) == bfactor
    # the STAR files do not describe it (rlnCtfBfactor stays 0)
    assert p0["particles"].read_bytes() == p1["particles"].read_bytes()
    assert np.all(load_particles(p1["particles"]).ctf.bfactor == 0.0)
    power0, _ = shell_power(plain, BOX)
    power1, _ = shell_power(decayed, BOX)
    r = np.arange(1, BOX // 2 + 1)
    s = r / (BOX * PIXEL_SIZE)  # 1/A
    ratio = power1[1:] / power0[1:]
    # shell by shell, the ratio is exp(-B s^2 / 2) within the spread of s across a shell (+-0.5 px)
    np.testing.assert_allclose(ratio, np.exp(-bfactor * s**2 / 2), rtol=0.12)
    # and exactly the power-weighted mean of exp(-B s^2 / 2) over each shell's coefficients
    spectra0 = (np.abs(image_rfft(plain)) ** 2).astype(np.float64).sum(axis=0)
    ky = np.fft.fftfreq(BOX, 1.0 / BOX)[:, None]
    kx = np.arange(BOX // 2 + 1)[None, :]
    weight = np.exp(-bfactor * (kx**2 + ky**2) / (BOX * PIXEL_SIZE) ** 2 / 2)
    rr = shells(BOX)
    expected = np.array([(spectra0 * weight)[rr == k].sum() / spectra0[rr == k].sum() for k in r])
    np.testing.assert_allclose(ratio, expected, rtol=2e-3)
    assert ratio[-1] < 0.15 and ratio[0] > 0.99


# ------------------------------------------------------------------------- coloured noise


def test_coloured_noise_has_the_recorded_spectrum_and_the_same_snr(tmp_path, volume):
    n, colour = 300, 4.0
    clean, _, _ = run(volume, tmp_path / "clean", n_particles=n, snr=np.inf, seed=1, noise_colour=colour)
    noisy, truth, _ = run(volume, tmp_path / "noisy", n_particles=n, snr=0.5, seed=1, noise_colour=colour)
    noise = noisy.astype(np.float64) - float(truth["image_scale"]) * clean
    expected = truth["noise_power_per_shell"]
    assert expected.shape == (BOX // 2 + 1,)
    assert expected[0] / expected[-1] == pytest.approx(1 + colour, rel=2e-3)  # 5x the power at the lowest s
    measured, counts = shell_power(noise, BOX)
    # each shell's mean |F|^2 is a mean of n * count exponential variables: relative sd 1/sqrt(n * count)
    tolerance = 4 / np.sqrt(n * counts[1:]) + 0.01
    assert np.all(np.abs(measured[1:] / expected[1:] - 1) < tolerance)
    # pooled over every coefficient of shells 1..N/2
    assert (counts * measured)[1:].sum() / (counts * expected)[1:].sum() == pytest.approx(1.0, abs=0.01)
    # same real-space variance (1 in the stack), so --snr means the same
    assert noise.var() == pytest.approx(1.0, rel=0.03)
    signal_var = float(truth["image_scale"]) ** 2 * np.var(clean, axis=(1, 2)).mean()
    assert signal_var / noise.var() == pytest.approx(0.5, rel=0.04)
    # white noise: flat, box^2 per coefficient
    white, truth_w, _ = run(volume, tmp_path / "white", n_particles=n, snr=0.5, seed=1)
    flat, _ = shell_power(white.astype(np.float64) - float(truth_w["image_scale"]) * clean, BOX)
    np.testing.assert_allclose(truth_w["noise_power_per_shell"], BOX**2)
    assert flat[BOX // 4 :].mean() / BOX**2 == pytest.approx(1.0, abs=0.02)
    assert measured[1] / measured[-1] > 3.5 and flat[1] / flat[-1] < 1.3


# --------------------------------------------------------------------- preferred orientation


def test_preferred_orientation_fills_the_cone(tmp_path, volume):
    n, fraction, cone = 400, 0.3, 15.0
    _, truth, paths = run(
        volume,
        tmp_path / "pref",
        n_particles=n,
        snr=np.inf,
        seed=9,
        preferred_fraction=fraction,
        preferred_cone_deg=cone,
    )
    direction = truth["preferred_direction"]
    assert direction.shape == (3,) and np.linalg.norm(direction) == pytest.approx(1.0)
    poses = load_particles(paths["gt_poses"])
    views = poses.rotations[:, 2, :]  # A^T e_z: the direction the map is projected along
    cosine = views @ direction
    in_cone = cosine >= np.cos(np.deg2rad(cone))
    uniform_share = (1 - np.cos(np.deg2rad(cone))) / 2  # 1.7% of the sphere
    assert in_cone.mean() == pytest.approx(fraction + (1 - fraction) * uniform_share, abs=0.025)
    chosen = truth["in_preferred_cone"]
    assert chosen.sum() == round(fraction * n) and np.all(in_cone[chosen])
    # uniform within the cap: cos(theta) uniform on [cos 15, 1]
    assert cosine[chosen].mean() == pytest.approx((1 + np.cos(np.deg2rad(cone))) / 2, abs=0.004)
    assert np.quantile(cosine[chosen], 0.5) == pytest.approx((1 + np.cos(np.deg2rad(cone))) / 2, abs=0.006)
    # in-plane angle uniform: the first row of A turns freely about the view
    psi = np.deg2rad(poses.table.floats("rlnAnglePsi")[chosen])
    assert abs(np.cos(psi).mean()) < 0.25 and abs(np.sin(psi).mean()) < 0.25
    # the other views stay uniform
    assert np.linalg.norm(views[~chosen].mean(axis=0)) < 4 * np.sqrt(1 / 3 / (~chosen).sum())
    # without the option the same cone holds only its uniform share
    _, _, plain = run(volume, tmp_path / "plain", n_particles=n, snr=np.inf, seed=9)
    plain_views = load_particles(plain["gt_poses"]).rotations[:, 2, :]
    assert (plain_views @ direction >= np.cos(np.deg2rad(cone))).mean() < 0.05


# ------------------------------------------------------------------------------------- junk


def test_junk_images_are_empty_or_lumps(tmp_path, volume):
    n = 200
    plain, _, _ = run(volume, tmp_path / "plain", n_particles=n, snr=np.inf, seed=7)
    junked, truth, paths = run(volume, tmp_path / "junk", n_particles=n, snr=np.inf, seed=7, junk_fraction=0.3)
    kind = truth["junk_kind"]
    assert np.array_equal(truth["is_junk"], kind != 0)
    assert np.bincount(kind, minlength=3).tolist() == [140, 30, 30]
    assert len(load_particles(paths["gt_poses"])) == n  # every row keeps a pose
    np.testing.assert_array_equal(junked[kind == 0], plain[kind == 0])  # particles as without junk
    assert np.all(junked[kind == 1] == 0.0)  # empty picks: no signal
    lumps = np.flatnonzero(kind == 2)
    assert np.array_equal(np.sort(truth["lump_rows"]), lumps)
    corr = np.array([correlation(junked[i], plain[i]) for i in lumps])
    assert corr.mean() < 0.6 and corr.max() < 0.85  # not the particle seen at that row's pose
    # the particle's integrated density (the image sum is the DC term, the same CTF for both)
    sums = np.array([junked[i].sum() / plain[i].sum() for i in lumps])
    assert np.all(np.abs(sums - 1) < 0.1)
    norms = np.array([np.linalg.norm(junked[i]) / np.linalg.norm(plain[i]) for i in lumps])
    assert np.all((norms > 0.4) & (norms < 2.5))
    # with noise, junk rows get the same noise: empty rows have unit variance
    noisy, truth_noisy, _ = run(volume, tmp_path / "noisy", n_particles=n, snr=0.2, seed=7, junk_fraction=0.3)
    assert np.array_equal(truth_noisy["junk_kind"], kind)
    assert noisy[kind == 1].var() == pytest.approx(1.0, rel=0.03)
    # the SNR is calibrated on the particles: the same noise level as without junk
    _, truth_plain_noisy, _ = run(volume, tmp_path / "plain_noisy", n_particles=n, snr=0.2, seed=7)
    assert float(truth_noisy["image_scale"]) == pytest.approx(float(truth_plain_noisy["image_scale"]), rel=0.1)


# ---------------------------------------------------------------------------------- scale


def test_per_image_scale(tmp_path, volume):
    n, sd = 200, 0.3
    plain, _, _ = run(volume, tmp_path / "plain", n_particles=n, snr=np.inf, seed=3)
    scaled, truth, _ = run(volume, tmp_path / "scaled", n_particles=n, snr=np.inf, seed=3, scale_sd=sd)
    scale = truth["scale"]
    ratio = np.linalg.norm(scaled, axis=(1, 2)) / np.linalg.norm(plain, axis=(1, 2))
    np.testing.assert_allclose(ratio, scale, rtol=1e-5)
    assert scale.min() >= 0.2 and float(truth["scale_sd"]) == sd
    assert scale.mean() == pytest.approx(1.0, abs=4 * sd / np.sqrt(n))
    assert scale.std() == pytest.approx(sd, rel=0.2)


# ---------------------------------------------------------------------- intensity and sign


def test_intensity_scale_offset_and_inverted_contrast(tmp_path, volume):
    n = 100
    base, truth0, _ = run(volume, tmp_path / "base", n_particles=n, snr=1.0, seed=5)
    clean, _, _ = run(volume, tmp_path / "clean", n_particles=n, snr=np.inf, seed=5)
    raw, truth, _ = run(
        volume, tmp_path / "raw", n_particles=n, snr=1.0, seed=5, intensity_scale=40.0, intensity_offset=-3.0
    )
    assert float(truth["intensity_scale"]) == 40.0 and float(truth["intensity_offset"]) == -3.0
    np.testing.assert_allclose(raw, base.astype(np.float64) * 40.0 - 3.0, rtol=1e-5, atol=1e-4)
    assert raw.mean() == pytest.approx(40.0 * base.mean() - 3.0, rel=1e-4, abs=1e-3)
    assert raw.std() == pytest.approx(40.0 * base.std(), rel=1e-4)
    # the recorded noise spectrum is that of the stack as written
    np.testing.assert_allclose(truth["noise_power_per_shell"], 40.0**2 * truth0["noise_power_per_shell"])
    inverted, truth_inv, _ = run(volume, tmp_path / "inv", n_particles=n, snr=1.0, seed=5, invert_contrast=True)
    assert bool(truth_inv["invert_contrast"])
    signal = float(truth0["image_scale"]) * clean
    # base = signal + noise, inverted = -signal + noise: the same noise, the signal with the opposite sign
    np.testing.assert_allclose((base - inverted) / 2, signal, atol=1e-5)
    assert np.mean([correlation(inverted[i], signal[i]) for i in range(n)]) < -0.5
    assert np.mean([correlation(base[i], signal[i]) for i in range(n)]) > 0.5


# --------------------------------------------------------------------------------- objects


def test_bundled_pr_and_model(tmp_path, capsys):
    common = ["--box", "32", "--pixel-size", "3.6", "--n-particles", "10", "--snr", "inf"]
    pr_path = density.bundled_structure_path("pr")
    assert pr_path.name == "progesterone_receptor_1a28_A.pdb.gz" and pr_path.is_file()
    assert main(["simulate", "--out", str(tmp_path / "adk"), *common]) == 0
    assert main(["simulate", "--out", str(tmp_path / "pr"), *common, "--protein", "pr"]) == 0
    assert main(["simulate", "--out", str(tmp_path / "model"), *common, "--model", str(pr_path)]) == 0
    maps = {}
    for name in ("adk", "pr", "model"):
        with mrcfile.open(tmp_path / name / "gt_map.mrc") as mrc:
            maps[name] = np.array(mrc.data, dtype=np.float64)
    assert np.array_equal(maps["pr"], maps["model"])
    assert correlation(maps["pr"], maps["adk"]) < 0.8
    pr = maps["pr"]
    centre = [np.sum(pr.sum(axis=tuple(a for a in range(3) if a != ax)) * np.arange(32)) / pr.sum() for ax in range(3)]
    np.testing.assert_allclose(centre, 16, atol=1.0)  # centred in the box


def test_contradictory_or_bad_options_are_one_line_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x"), "--box", "32", "--pixel-size", "3.6", "--n-particles", "10"]
    pr = str(density.bundled_structure_path("pr"))
    cases = [
        (["--map", "m.mrc", "--model", pr], "--model"),
        (["--model", pr, "--protein", "adk"], "--protein"),
        (["--map", "m.mrc", "--protein", "pr"], "--protein"),
        (["--model", str(tmp_path / "missing.pdb")], "--model"),
        (["--junk-fraction", "1"], "--junk-fraction"),
        (["--preferred-fraction", "1.5"], "--preferred-fraction"),
        (["--preferred-cone", "0"], "--preferred-cone"),
        (["--scale-sd", "-0.1"], "--scale-sd"),
        (["--coloured-noise", "-1"], "--coloured-noise"),
        (["--envelope-bfactor", "-50"], "--envelope-bfactor"),
        (["--intensity-scale", "0"], "--intensity-scale"),
    ]
    for extra, option in cases:
        assert main(["simulate", *out, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("habinit simulate: error:") and option in err and "\n" not in err, err
    assert not (tmp_path / "x" / "particles.mrcs").exists()


# ----------------------------------------------------------------------- large boxes


def test_projection_grid_is_capped_at_512():
    assert simulate.grid_oversampling(64) == (4, 256)
    assert simulate.grid_oversampling(128) == (4, 512)  # existing data keep their 4x grid
    assert simulate.grid_oversampling(256) == (2.0, 512)
    assert simulate.grid_oversampling(384) == (pytest.approx(4 / 3), 512)
    assert simulate.grid_oversampling(640) == (1.0, 640)
    assert simulate.MAX_BATCH_PIXELS // 256**2 == 125  # images per batch at box 256


def test_capped_grid_projects_like_the_full_one():
    """The in-place capped grid equals volume_to_grid's where the oversampling is an integer (a cap of 64 for
    box 32: 2x), and at any oversampling its projections approach the exact ones (those of an 8x grid) as
    the oversampling grows: 2x, 2.5x, 3x."""
    box, pixel_size = 32, 3.6
    volume = density.bundled_protein_map(box, pixel_size)
    poses = simulate.random_poses(SimulationSettings(n_particles=40, seed=2), pixel_size, box)
    index = np.arange(40)
    exact = simulate.clean_images(volume_to_grid(volume, 8), poses, index, pixel_size, box, 8)
    errors = []
    for cap, factor in ((64, 2.0), (80, 2.5), (96, 3.0)):
        with mock.patch.object(simulate, "MAX_GRID", cap):
            grid, oversampling = simulate.simulation_grid(volume)
        assert oversampling == factor and grid.shape == (cap,) * 3 and grid.dtype == np.complex64
        if cap == 64:
            reference = volume_to_grid(volume, 2)
            assert np.abs(grid - reference).max() < 1e-5 * np.abs(reference).max()
        images = simulate.clean_images(grid, poses, index, pixel_size, box, oversampling)
        errors.append(np.linalg.norm(images - exact) / np.linalg.norm(exact))
    assert errors[0] > errors[1] > errors[2] and errors[1] < 0.02, errors
