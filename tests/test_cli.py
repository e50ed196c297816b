"""The habinit command line, end to end on a small set."""

import json
import subprocess
import sys

import pytest


def habinit(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "habinit_plugin.engine", *args], capture_output=True, text=True, cwd=cwd
    )


def test_simulate_reconstruct_fsc(tmp_path):
    sim = tmp_path / "sim"
    r = habinit(
        "simulate", "--out", str(sim), "--box", "32", "--pixel-size", "3.6", "--n-particles", "600", "--snr", "1"
    )
    assert r.returncode == 0, r.stderr
    for name in ("particles.star", "particles.mrcs", "gt_poses.star", "gt_map.mrc"):
        assert (sim / name).is_file()
    r = habinit("reconstruct", "--particles", str(sim / "gt_poses.star"), "--out", str(tmp_path / "rec"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "rec" / "fsc.json").read_text())
    assert report["box"] == 32 and report["particles"] == 600
    assert report["resolution_0143"] < 9.0  # Nyquist is 7.2 A
    # one FSC schema: the viewer's plot takes reconstruct's fsc.json as it takes run's
    from matplotlib.figure import Figure

    from habinit_plugin.engine.plots import draw_fsc

    assert len(report["curve"]) == 17 and report["curve"][4]["resolution_A"] == pytest.approx(32 * 3.6 / 4)
    figure = Figure()
    draw_fsc(figure, report)
    assert figure.axes[0].get_lines()[0].get_xdata().size == 16  # every shell but the origin
    r = habinit("fsc", str(tmp_path / "rec" / "half_map_A.mrc"), str(sim / "gt_map.mrc"))
    assert r.returncode == 0, r.stderr
    assert "resolution at FSC 0.5" in r.stdout
    import mrcfile

    with mrcfile.open(tmp_path / "rec" / "half_map_A.mrc") as mrc:
        assert mrc.data.shape == (32, 32, 32)
        assert float(mrc.voxel_size.x) == 3.6 or abs(float(mrc.voxel_size.x) - 3.6) < 1e-3
        assert int(mrc.header.ispg) == 1


def test_reconstruct_without_poses_is_a_clear_error(tmp_path):
    sim = tmp_path / "sim"
    habinit("simulate", "--out", str(sim), "--box", "32", "--pixel-size", "3.6", "--n-particles", "50")
    r = habinit("reconstruct", "--particles", str(sim / "particles.star"), "--out", str(tmp_path / "rec"))
    assert r.returncode == 2
    assert "no poses" in r.stderr
