"""The soft solvent mask made from the half maps and the masked FSC corrected by phase randomisation.

Map pairs are simulated as the truth (a bundled protein, box 64, 1.8 A/px) plus independent white noise
in each half; the job test runs the tiny gold-standard job of test_gold_standard.py's schedule.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

import mrcfile
import numpy as np
import pytest

from fixtures import TINY, TINY_PIXEL_SIZE
from habinit_plugin.engine import density, outputs
from habinit_plugin.engine import solvent_mask as sm
from habinit_plugin.engine.fsc import fsc, resolution_at
from habinit_plugin.engine.jobs import gold_standard_job
from habinit_plugin.engine.settings import AbinitSettings, JobSettings
from habinit_plugin.engine.star import read_star

PIXEL_SIZE = density.DEFAULT_PIXEL_SIZE  # 1.8 A, box 64
NOISE_PER_SIGNAL_SD = 4.0  # unmasked FSC 0.143 near 9-10 A, the particle about 5% of the box


@pytest.fixture(scope="module")
def truths(protein_map_64) -> dict[str, np.ndarray]:
    """The two bundled proteins (adenylate kinase, PR LBD) as (64, 64, 64) maps at 1.8 A/px."""
    pr = density.atoms_to_map(density.bundled_structure_path("pr"), 64, PIXEL_SIZE)
    return {"adk": protein_map_64, "pr": pr}


def _half_maps(truth: np.ndarray, noise_per_signal: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(half map A, half map B, noise of A): the truth plus independent white noise, sd ``noise_per_signal``
    times the truth's sd."""
    rng = np.random.default_rng(seed)
    sd = noise_per_signal * float(truth.std())
    noise_a, noise_b = (sd * rng.standard_normal(truth.shape).astype(np.float32) for _ in range(2))
    return truth + noise_a, truth + noise_b, noise_a


@pytest.mark.parametrize("protein", ["adk", "pr"])
def test_mask_holds_the_particle_and_leaves_out_the_solvent(truths, protein):
    truth = truths[protein]
    map_a, map_b, _ = _half_maps(truth, NOISE_PER_SIGNAL_SD, seed=1)
    unmasked_A = resolution_at(fsc(map_a, map_b), 0.143, PIXEL_SIZE)
    solvent = sm.solvent_mask(map_a, map_b, PIXEL_SIZE, unmasked_A)
    density_inside = float(np.clip(truth, 0, None)[solvent.mask >= 1.0].sum() / np.clip(truth, 0, None).sum())
    print(
        f"{protein}: {100 * density_inside:.3f}% of the positive density at full weight; box fraction "
        f"{solvent.full_fraction:.3f} at full weight, {solvent.any_fraction:.3f} with the edge"
    )
    assert density_inside >= 0.99
    assert solvent.full_fraction <= 0.12 and solvent.any_fraction <= 0.25  # the particle is about 5% of the box
    assert solvent.mask.min() == 0.0 and solvent.mask.max() == 1.0 and solvent.mask.dtype == np.float32
    assert (solvent.extend_px, solvent.soft_edge_px, solvent.lowpass_A) == (3, 4, 15.0)  # 6 A, 8 A at 1.8 A/px


@pytest.mark.parametrize("protein", ["adk", "pr"])
def test_masked_fsc_measures_the_information_inside_the_mask(truths, protein):
    """The corrected masked FSC is above the unmasked one, and equals (within 0.1 per shell) the FSC the
    half maps would have if their noise were only inside the mask: the mask neither inflates nor loses."""
    truth = truths[protein]
    map_a, map_b, noise_a = _half_maps(truth, NOISE_PER_SIGNAL_SD, seed=2)
    noise_b = map_b - truth
    unmasked = fsc(map_a, map_b)
    solvent = sm.solvent_mask(map_a, map_b, PIXEL_SIZE, resolution_at(unmasked, 0.143, PIXEL_SIZE))
    curves = sm.masked_fsc(map_a, map_b, solvent.mask, unmasked)
    noise_in_mask_only = fsc(truth + solvent.mask * noise_a, truth + solvent.mask * noise_b)
    resolutions = {
        name: resolution_at(curve, 0.143, PIXEL_SIZE)
        for name, curve in (("unmasked", unmasked), ("masked", curves.corrected), ("oracle", noise_in_mask_only))
    }
    print(f"{protein}: FSC 0.143 (A) " + ", ".join(f"{k} {v:.2f}" for k, v in resolutions.items()))
    mid = slice(curves.randomise_from_shell + sm.CORRECT_AFTER_SHELLS, 24)  # to 4.8 A
    assert np.all(curves.corrected[mid] >= unmasked[mid]) and np.mean(curves.corrected[mid] - unmasked[mid]) > 0.2
    assert resolutions["masked"] <= resolutions["unmasked"] / 2
    assert np.max(np.abs(curves.corrected[1:] - noise_in_mask_only[1:])) < 0.1
    assert resolutions["masked"] == pytest.approx(resolutions["oracle"], rel=0.1)


def test_phase_randomisation_takes_out_the_correlation_a_tight_mask_adds(protein_map_64):
    """Half maps sharing only signal below 12 A: a tight mask (1 px edge) correlates them up to Nyquist;
    the corrected curve falls where the shared signal ends and stays low beyond (within the spread of one
    phase randomisation, as relion_postprocess: a few shells keep 0.1-0.2 at box 64)."""
    low_res_truth = sm.lowpass(protein_map_64, 12.0, PIXEL_SIZE)
    map_a, map_b, _ = _half_maps(low_res_truth, 1.0, seed=3)
    tight = sm.soft_extend(sm.lowpass(protein_map_64, 15.0, PIXEL_SIZE) > 0.1 * protein_map_64.max(), 0, 1)
    unmasked = fsc(map_a, map_b)
    curves = sm.masked_fsc(map_a, map_b, tight, unmasked)
    named = {"unmasked": unmasked, "masked": curves.masked, "corrected": curves.corrected}
    at = {(name, level): resolution_at(c, level, PIXEL_SIZE) for name, c in named.items() for level in (0.5, 0.143)}
    beyond = slice(16, None)  # 7.2 A to Nyquist, where the halves share nothing
    corrected = curves.corrected[beyond]
    print(
        ", ".join(f"{name} {at[name, 0.5]:.2f} / {at[name, 0.143]:.2f} A" for name in named),
        f"(FSC 0.5 / 0.143); beyond 7.2 A: masked mean {curves.masked[beyond].mean():.3f}, corrected mean "
        f"{corrected.mean():.3f}, max {corrected.max():.3f}",
    )
    assert curves.randomise_from_shell == 11  # where the unmasked FSC falls below 0.8, just before 12 A
    assert at["masked", 0.143] == 2 * PIXEL_SIZE and curves.masked[beyond].mean() > 0.6  # the mask's correlation
    assert at["corrected", 0.5] >= 8.5  # the shared signal ends at 8.5 A (the 12 A low-pass's cosine, shell 13.5)
    assert at["corrected", 0.143] >= 6.5
    assert corrected.mean() < 0.1 and corrected.max() < 0.3


def test_pure_noise_half_maps_stay_uncorrelated_under_the_mask(protein_map_64):
    """No common signal: the corrected masked FSC stays near 0 at every shell past the lowest (the per-shell
    spread of an FSC of noise under a mask of 7% of a 64 box is about 0.05)."""
    mask = sm.solvent_mask(protein_map_64, protein_map_64, PIXEL_SIZE).mask
    rng = np.random.default_rng(4)
    map_a, map_b = (rng.standard_normal(mask.shape).astype(np.float32) for _ in range(2))
    curves = sm.masked_fsc(map_a, map_b, mask, fsc(map_a, map_b))
    tail = curves.corrected[4:]
    print(f"noise: corrected mean beyond shell 4 {tail.mean():.3f}, max {tail.max():.3f}")
    assert curves.randomise_from_shell == 1
    assert abs(curves.corrected[4:].mean()) < 0.05 and np.abs(curves.corrected[8:]).max() < 0.2


def test_empty_maps_give_no_mask_and_say_so(tmp_path, caplog):
    flat = np.zeros((32, 32, 32), np.float32)
    (tmp_path / outputs.MASK).write_bytes(b"left by an earlier run")
    with caplog.at_level(logging.INFO, logger="habinit"):
        report = sm.mask_and_masked_fsc(tmp_path, flat, flat, np.zeros(17), 3.6, outputs.MASK)
    assert report is None and not (tmp_path / outputs.MASK).exists()
    assert "no solvent mask and no masked FSC" in caplog.text


def test_job_writes_the_mask_and_both_curves(tiny_set, tmp_path, caplog):
    out = tmp_path / "job"
    settings = JobSettings(abinit=AbinitSettings(**TINY), align_every=6, checkpoint_minutes=0.0)
    with caplog.at_level(logging.INFO, logger="habinit"):
        info = gold_standard_job(tiny_set["particles"], out, settings)
    report = outputs.read_json(out / outputs.FSC_JSON)
    assert {"resolution_0143", "resolution_05", "pixel_size", "box", "curve"} <= set(report)
    assert report["resolution_0143"] == info["resolution_0143"] and len(report["curve"]) == 17
    masked = report["masked"]
    print(f"tiny job: FSC 0.143 unmasked {report['resolution_0143']:.2f} A, masked {masked['resolution_0143']:.2f} A")
    assert len(masked["curve"]) == 17 and masked["resolution_0143"] <= report["resolution_0143"]
    assert masked["mask"]["extend_px"] == 2 and masked["mask"]["soft_edge_px"] == 3  # 7.2 A, 10.8 A at 3.6 A/px
    assert 0.02 < masked["mask"]["box_fraction_full_weight"] < 0.3
    with mrcfile.open(out / outputs.MASK) as mrc:
        assert mrc.data.shape == (32, 32, 32) and abs(float(mrc.voxel_size.x) - TINY_PIXEL_SIZE) < 1e-3
        assert float(mrc.data.min()) == 0.0 and float(mrc.data.max()) == 1.0
    assert outputs.MASK in info["outputs"]
    table = read_star(out / outputs.FSC_STAR)["fsc"]
    corrected = table.floats("rlnFourierShellCorrelationCorrected")
    assert np.allclose(corrected, [r["fsc"] for r in masked["curve"]], atol=1e-6)
    assert np.allclose(table.floats("rlnFourierShellCorrelation"), [r["fsc"] for r in report["curve"]], atol=1e-6)
    assert "solvent mask (mask.mrc)" in caplog.text and "masked FSC (phases randomised beyond" in caplog.text
    assert f"{masked['resolution_0143']:.2f} A at FSC 0.143" in outputs.masked_resolution_line(out / outputs.FSC_JSON)

    from matplotlib.figure import Figure

    from habinit_plugin.engine.plots import draw_fsc

    figure = Figure()
    draw_fsc(figure, report)
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert f"masked, corrected ({masked['resolution_0143']:.2f} A)" in labels
    assert f"unmasked ({report['resolution_0143']:.2f} A)" in labels
    _compare_with_relion_postprocess(out, masked["resolution_0143"])


def _compare_with_relion_postprocess(out, masked_A: float) -> None:
    """relion_postprocess with our mask.mrc on our half maps: its corrected resolution within one Fourier shell of
    ours (RELION gives a shell's resolution, ours is interpolated between the shells around 0.143: at box 32,
    3.6 A/px the shells are 10-15% apart here)."""
    if shutil.which("relion_postprocess") is None:
        pytest.skip("relion_postprocess is not on PATH (apt-get install relion): the RELION comparison is skipped")
    args = ["--i", "half_map_A.mrc", "--i2", "half_map_B.mrc", "--mask", outputs.MASK, "--angpix", str(TINY_PIXEL_SIZE)]
    r = subprocess.run(
        ["relion_postprocess", *args, "--o", "postprocess"], cwd=out, capture_output=True, text=True, timeout=300
    )
    general = read_star(out / "postprocess.star").get("general")
    assert general is not None, r.stdout + r.stderr
    relion_A = float(general.floats("rlnFinalResolution")[0])
    print(f"relion_postprocess with mask.mrc: {relion_A:.2f} A; ours {masked_A:.2f} A")
    with mrcfile.open(out / "half_map_A.mrc") as mrc:
        shell = 1.0 / (mrc.data.shape[0] * TINY_PIXEL_SIZE)  # 1/A
    assert abs(1.0 / relion_A - 1.0 / masked_A) <= shell, (relion_A, masked_A)
