"""The gold-standard job: independence of the halves, outputs, resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from fixtures import TINY, TINY_PIXEL_SIZE
from habinit_plugin.engine import jobs
from habinit_plugin.engine.checkpoint import CheckpointError
from habinit_plugin.engine.gold_standard import GoldStandardJob
from habinit_plugin.engine.jobs import gold_standard_job
from habinit_plugin.engine.particles import ParticleError, load_particles
from habinit_plugin.engine.settings import AbinitSettings, JobSettings
from habinit_plugin.engine.star import read_star, write_star

PIXEL_SIZE = TINY_PIXEL_SIZE


def _settings(**job) -> JobSettings:
    return JobSettings(abinit=AbinitSettings(**TINY), align_every=6, checkpoint_minutes=0.0, **job)


def _copy_with_changed_pixels(paths, folder: Path, rows: np.ndarray) -> Path:
    """A copy of the set whose images ``rows`` are replaced by fresh noise."""
    folder.mkdir()
    shutil.copy(paths["particles"], folder / "particles.star")
    shutil.copy(paths["stack"], folder / "particles.mrcs")
    with mrcfile.mmap(folder / "particles.mrcs", "r+") as mrc:
        rng = np.random.default_rng(99)
        mrc.data[rows] = rng.standard_normal(mrc.data[rows].shape).astype(np.float32)
    return folder / "particles.star"


def test_half_a_does_not_see_half_b(tiny_set, tmp_path):
    """Changing the images of half B leaves half map A bit for bit the same, over a run with
    alignments and checkpoints; and changing half A's images leaves half B's SGD model
    (before its alignment onto A) bit for bit the same."""
    particles = load_particles(tiny_set["particles"])
    first = GoldStandardJob(particles, _settings(), tmp_path / "run1")
    result = first.run()
    rows_b = first.used[first.half_set == 2]
    rows_a = first.used[first.half_set == 1]
    assert len(result.history) >= 3  # alignments happened during SGD and after the passes
    assert (tmp_path / "run1" / "checkpoint" / "state.json").is_file()

    changed_b = load_particles(_copy_with_changed_pixels(tiny_set, tmp_path / "changed_b", rows_b))
    second = GoldStandardJob(changed_b, _settings(), tmp_path / "run2")
    result_b = second.run()
    assert np.array_equal(result.maps["A"], result_b.maps["A"])
    assert not np.array_equal(result.maps["B"], result_b.maps["B"])  # the change did reach half B

    changed_a = load_particles(_copy_with_changed_pixels(tiny_set, tmp_path / "changed_a", rows_a))
    sgd_only = [GoldStandardJob(p, _settings(), tmp_path / f"sgd{i}") for i, p in enumerate((particles, changed_a))]
    for job in sgd_only:
        job._sgd_phase()
    assert np.array_equal(sgd_only[0].runs["B"].grid, sgd_only[1].runs["B"].grid)
    assert not np.array_equal(sgd_only[0].runs["A"].grid, sgd_only[1].runs["A"].grid)


def _habinit(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "habinit_plugin.engine", *args], capture_output=True, text=True, **kwargs
    )


def _tiny_args(particles, out, *extra):
    return [
        "run", "--particles", str(particles), "--out", str(out),
        "--n-initial-iterations", "12", "--n-final-iterations", "4", "--initial-batch", "24", "--final-batch", "40",
        "--n-final-passes", "2", "--align-every", "6", "--checkpoint-minutes", "0", *extra,
    ]  # fmt: skip


def test_outputs_keep_every_particle(tiny_set, tmp_path):
    out = tmp_path / "job"
    r = _habinit(*_tiny_args(tiny_set["particles"], out, "--n-particles", "120", "--max-resolution", "2"))
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["n_used"] == 120 and info["n_unused"] == 40
    assert any("Nyquist" in w for w in info["warnings"])  # 2 A was clamped to 7.2 A, and said so
    used = load_particles(out / "particles.star")
    unused = load_particles(out / "unused_particles.star")
    source = load_particles(tiny_set["particles"])
    assert sorted([*used.ids, *unused.ids]) == sorted(source.ids)
    assert set(used.half_set) == {1, 2} and used.rotations is not None
    # every input column is kept, with its values, and images still resolve from the new folder
    columns = read_star(tiny_set["particles"])["particles"].columns
    table = read_star(out / "particles.star")["particles"]
    for column in columns:
        assert column in table.columns
    by_id = {int(i): k for k, i in enumerate(source.ids)}
    rows = [by_id[int(i)] for i in used.ids]
    assert np.allclose(used.ctf.defocus_u, source.ctf.defocus_u[rows])
    assert np.array_equal(used.read_images([0, 5]), source.read_images([rows[0], rows[5]]))
    for name in ("half_map_A.mrc", "half_map_B.mrc", "map.mrc"):
        with mrcfile.open(out / name) as mrc:
            assert mrc.data.shape == (32, 32, 32) and abs(float(mrc.voxel_size.x) - PIXEL_SIZE) < 1e-3
    report = json.loads((out / "fsc.json").read_text())
    assert report["resolution_0143"] == info["resolution_0143"] and len(report["curve"]) == 17
    for png in ("fsc.png", "resolution_per_iteration.png", "angular_distribution.png", "half_map_slices.png"):
        assert (out / png).stat().st_size > 1000
    # the same command again returns the finished result without recomputing
    t0 = time.time()
    r = _habinit(*_tiny_args(tiny_set["particles"], out, "--n-particles", "120", "--max-resolution", "2"))
    assert r.returncode == 0 and "already holds the finished result" in r.stdout
    assert time.time() - t0 < 30


def test_killed_run_resumes(tiny_set, tmp_path):
    out = tmp_path / "job"
    args = _tiny_args(tiny_set["particles"], out, "--n-initial-iterations", "30")
    process = subprocess.Popen([sys.executable, "-m", "habinit_plugin.engine", *args], stdout=subprocess.PIPE)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text()).get("runs", {}).get("A", {}).get("iteration", 0) >= 4:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = json.loads(state.read_text())
    assert saved["phase"] == "sgd", "the kill should land in the SGD phase"
    assert not (out / "run.json").exists()
    r = _habinit(*args)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["resumed"]
    assert info["resolution_0143"] < 20.0


def test_kill_while_writing_outputs_leaves_nothing_complete(tiny_set, tmp_path, monkeypatch):
    particles = str(tiny_set["particles"])
    gold_standard_job(particles, tmp_path, _settings())
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "finished"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(jobs.plots, "write_pngs", killed)
    os.remove(tmp_path / "run.json")  # as after a kill before the outputs were complete
    with pytest.raises(KeyboardInterrupt):
        gold_standard_job(particles, tmp_path, _settings(), overwrite=False)
    assert not (tmp_path / "run.json").exists()  # the maps on disk do not pass for a finished result


def test_other_jobs_checkpoint_is_refused(tiny_set, tmp_path):
    r = _habinit(*_tiny_args(tiny_set["particles"], tmp_path, "--n-initial-iterations", "2", "--n-final-passes", "1"))
    assert r.returncode == 0, r.stderr
    r = _habinit(*_tiny_args(tiny_set["particles"], tmp_path, "--n-initial-iterations", "3"))
    assert r.returncode == 2 and "checkpoint of a different job" in r.stderr
    assert "--overwrite" in r.stderr


def test_crafted_checkpoint_cannot_run_code(tiny_set, tmp_path):
    particles = load_particles(tiny_set["particles"])
    job = GoldStandardJob(particles, _settings(), tmp_path)
    job.save()
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    np.save(tmp_path / "checkpoint" / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    os.replace(tmp_path / "checkpoint" / "evil.npy", tmp_path / "checkpoint" / state["arrays"]["A"])
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        GoldStandardJob(particles, _settings(), tmp_path).resume()


def _with_split(paths, folder: Path, values) -> Path:
    blocks = read_star(paths["particles"])
    table = blocks["particles"]
    table.set_column("rlnRandomSubset", values)
    folder.mkdir()
    shutil.copy(paths["stack"], folder / "particles.mrcs")
    write_star(folder / "particles.star", [blocks["optics"], table])
    return folder / "particles.star"


@pytest.mark.parametrize(
    "values, message",
    [
        (lambda n: [1] * (n - 1) + [2], "at least 10 per half set"),
        (lambda n: [1, 2, 3] * (n // 3) + [1] * (n % 3), "must be 1 or 2"),
    ],
)
def test_bad_split_is_a_clear_error(tiny_set, tmp_path, values, message):
    star = _with_split(tiny_set, tmp_path / "in", values(160))
    r = _habinit(*_tiny_args(star, tmp_path / "out"))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_requested_without_gpu(tiny_set, tmp_path):
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    r = _habinit(*_tiny_args(tiny_set["particles"], tmp_path / "out", "--device", "gpu"))
    assert r.returncode == 2 and "gpu" in r.stderr.lower()
    assert not (tmp_path / "out").exists()


def test_second_job_on_a_folder_is_refused_and_the_first_is_unchanged(tiny_set, tmp_path):
    """Two `habinit run` on one folder: the second is refused at once, naming the first; the first ends
    bit for bit as a job that ran alone."""
    busy, alone = tmp_path / "busy", tmp_path / "alone"
    first = subprocess.Popen(
        [sys.executable, "-m", "habinit_plugin.engine", *_tiny_args(tiny_set["particles"], busy)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = busy / "habinit.lock"
    deadline = time.time() + 60
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()
    t0 = time.time()
    second = _habinit(*_tiny_args(tiny_set["particles"], busy, "--overwrite"))
    refused_after = time.time() - t0
    assert second.returncode == 2 and "is in use by another habinit run" in second.stderr, second.stderr
    assert f"process {first.pid} on " in second.stderr
    assert refused_after < 5.0  # measured 0.2 s alone: the interpreter start and reading the particles
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert not lock.exists()
    assert _habinit(*_tiny_args(tiny_set["particles"], alone)).returncode == 0
    for name in ("half_map_A.mrc", "half_map_B.mrc"):
        with mrcfile.open(busy / name) as a, mrcfile.open(alone / name) as b:
            assert np.array_equal(a.data, b.data)


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_set, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "job"
    out.mkdir()
    import socket

    lock = {"pid": int(gone.stdout), "host": socket.gethostname(), "command": "run", "since": "earlier"}
    (out / "habinit.lock").write_text(json.dumps(lock))
    r = _habinit(*_tiny_args(tiny_set["particles"], out, "--n-initial-iterations", "2", "--n-final-passes", "1"))
    assert r.returncode == 0, r.stderr
    assert f"(process {lock['pid']}) is gone: taking it over" in r.stdout
    assert not (out / "habinit.lock").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_ctrl_c_during_sgd_saves_and_resumes_bit_for_bit(tiny_set, tmp_path):
    """SIGINT in the SGD phase: one line, exit 130, a checkpoint at the iteration it stopped at, and the
    resumed job ends bit for bit as one that was never interrupted."""
    stopped, alone = tmp_path / "stopped", tmp_path / "alone"
    args = _tiny_args(tiny_set["particles"], stopped, "--n-initial-iterations", "20", "--checkpoint-minutes", "100")
    command = [sys.executable, "-m", "habinit_plugin.engine", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # the log prints every 10 iterations
        if "SGD iteration 10/" in line:
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    message = [line for line in stderr.splitlines() if line.strip()]
    assert len(message) == 1 and "interrupted (SIGINT) at SGD iteration" in message[0], stderr
    assert "rerun the same command to resume" in message[0] and "Traceback" not in stderr
    stopped_at = int(message[0].split("SGD iteration ")[1].split("/")[0])
    state = json.loads((stopped / "checkpoint" / "state.json").read_text())
    assert state["phase"] == "sgd" and state["runs"]["A"]["iteration"] == stopped_at >= 10
    assert not (stopped / "run.json").exists() and not (stopped / "habinit.lock").exists()
    resumed = _habinit(*args)
    assert resumed.returncode == 0 and f"iteration {stopped_at})" in resumed.stdout, resumed.stderr
    solo = _tiny_args(tiny_set["particles"], alone, "--n-initial-iterations", "20", "--checkpoint-minutes", "100")
    assert _habinit(*solo).returncode == 0
    for name in ("half_map_A.mrc", "half_map_B.mrc"):
        with mrcfile.open(stopped / name) as a, mrcfile.open(alone / name) as b:
            assert np.array_equal(a.data, b.data)


def test_nan_pixel_is_found_before_any_work_and_names_the_input_row(tiny_set, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(tiny_set["particles"], folder / "particles.star")
    shutil.copy(tiny_set["stack"], folder / "particles.mrcs")
    with mrcfile.mmap(folder / "particles.mrcs", "r+") as mrc:
        mrc.data[56, 10, 10] = np.nan
    out = tmp_path / "out"
    r = _habinit(*_tiny_args(folder / "particles.star", out))
    assert r.returncode == 2 and "(row 57 of " in r.stderr and "57@" in r.stderr, r.stderr
    assert "NaN or infinite pixels" in r.stderr and not out.exists()
    # inside a half set the row is still the input's
    particles = load_particles(folder / "particles.star")
    half = particles.subset(np.arange(40, 160))
    with pytest.raises(ParticleError, match=r"\(row 57 of "):
        half.check_images()


def test_unwritable_or_full_output_folder_is_one_line_before_any_work(tiny_set, tmp_path, monkeypatch, capsys):
    from habinit_plugin.engine import cli

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli.main(_tiny_args(tiny_set["particles"], blocker / "out")) == 1
    assert f"cannot write {blocker / 'out'}" in capsys.readouterr().err
    monkeypatch.setattr(jobs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "full"
    assert cli.main(_tiny_args(tiny_set["particles"], out)) == 2
    err = capsys.readouterr().err
    assert f"{out}: only 0 MB free, the checkpoint and outputs need about" in err
    assert not (out / "checkpoint").exists()


def test_disk_full_during_the_run_is_one_line_and_the_checkpoint_stays_usable(tiny_set, tmp_path, monkeypatch, capsys):
    import errno

    from habinit_plugin.engine import checkpoint, cli

    out = tmp_path / "job"
    args = _tiny_args(tiny_set["particles"], out)
    saves = []
    real_savez = checkpoint.np.savez

    def savez_until_full(path, **arrays):
        saves.append(path)
        if len(saves) > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_savez(path, **arrays)

    monkeypatch.setattr(checkpoint.np, "savez", savez_until_full)
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "No space left on device" in err[0]
    assert not (out / "run.json").exists() and not list((out / "checkpoint").glob("*.tmp*"))
    monkeypatch.setattr(checkpoint.np, "savez", real_savez)
    assert cli.main(args) == 0  # resumes from the last complete checkpoint
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_valid_but_meaningless_input_warns_in_log_and_run_json(tiny_set, tmp_path):
    """295 : 5 is refused (a half set needs 10); 150 : 10 runs, with the small and unbalanced halves said."""
    star = _with_split(tiny_set, tmp_path / "in", [1] * 150 + [2] * 10)
    r = _habinit(*_tiny_args(star, tmp_path / "out", "--n-initial-iterations", "2", "--n-final-passes", "1"))
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    text = " ".join(info["warnings"])
    assert "only 150 and 10 particles in the half sets" in text and "unbalanced (150 : 10" in text
    assert "warning: the half sets are unbalanced" in r.stdout


def test_sigterm_stops_habinit_abinit_with_one_line_and_exit_143(tiny_set, tmp_path):
    args = ["abinit", "--particles", str(tiny_set["particles"]), "--out", str(tmp_path / "one")]
    args += ["--n-initial-iterations", "40", "--initial-batch", "24", "--final-batch", "40"]
    command = [sys.executable, "-m", "habinit_plugin.engine", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "SGD iteration 10/" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 143 and len(lines) == 1, stderr
    assert "interrupted (SIGTERM) at SGD iteration" in lines[0] and "keeps no checkpoint" in lines[0]
    assert not (tmp_path / "one" / "run.json").exists() and not (tmp_path / "one" / "habinit.lock").exists()


def _split_name(image_name: str) -> tuple[str, str]:
    index, stack = image_name.split("@")
    return index, stack


def _with_duplicated_rows(paths, folder: Path, copies: np.ndarray) -> Path:
    """The set with the rows ``copies`` appended once more (new image ids, same images), as a merge of two
    picking jobs gives."""
    folder.mkdir()
    blocks = read_star(paths["particles"])
    table = blocks["particles"]
    n = len(table)
    extra = table.take(copies)
    if extra.has("rlnImageId"):
        extra.set_column("rlnImageId", np.arange(n + 1, n + 1 + len(copies)))
    table.rows += extra.rows
    here = Path(paths["particles"]).parent
    table.set_column(
        "rlnImageName", [f"{i}@{here / stack}" for i, stack in map(_split_name, table.text("rlnImageName"))]
    )
    write_star(folder / "particles.star", list(blocks.values()))
    return folder / "particles.star"


def test_duplicated_images_never_reach_both_half_sets(tiny_set, tmp_path):
    """40 of 160 images on two rows: `run` refuses them naming the rows (exit 2, nothing written); with
    --keep-duplicates every copy is kept, each image in one half set only, every row out exactly once."""
    path = _with_duplicated_rows(tiny_set, tmp_path / "merged", np.arange(0, 80, 2))
    refused = _habinit(*_tiny_args(path, tmp_path / "refused"))
    assert refused.returncode == 2, refused.stderr
    assert "rows 1, 161 hold the same image 1@" in refused.stderr and "40 image(s) appear" in refused.stderr
    assert "--keep-duplicates" in refused.stderr and not (tmp_path / "refused").exists()

    out = tmp_path / "kept"
    kept = _habinit(*_tiny_args(path, out, "--keep-duplicates", "--n-initial-iterations", "2", "--n-final-passes", "1"))
    assert kept.returncode == 0, kept.stderr
    assert "40 image(s) stand on more than one row" in kept.stdout
    table = read_star(out / "particles.star")["particles"]
    subset_of_image: dict[str, set] = {}
    for name, subset in zip(table.text("rlnImageName"), table.ints("rlnRandomSubset")):
        subset_of_image.setdefault(name, set()).add(int(subset))
    assert len(subset_of_image) == 160 and all(len(s) == 1 for s in subset_of_image.values())
    assert sorted(table.ints("rlnImageId")) == list(range(1, 201))
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and any("stand on more than one row" in w for w in info["warnings"])
