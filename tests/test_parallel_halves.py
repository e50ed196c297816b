"""Two halves, two workers (engine/parallel_halves.py): the same result as one process, bit for bit; a worker
that dies is named with its log, and the job resumes from both checkpoints to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from habinit_plugin.engine.parallel_halves import WorkerLaunch, half_folder, worker_log
from habinit_plugin.engine.settings import DeviceSettings, WorkerSettings

# OpenBLAS results can change with its thread count (1 against 2 threads moved half map B by 5e-7 here):
# both jobs run with one BLAS thread, as each worker does on 2 cores.
ONE_THREAD = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HABINIT_THREADS="1")
HALF_MAPS = ("half_map_A.mrc", "half_map_B.mrc")


def _args(particles, out, *extra) -> list[str]:
    return [
        sys.executable, "-m", "habinit_plugin.engine", "run", "--particles", str(particles), "--out", str(out),
        "--n-initial-iterations", "12", "--n-final-iterations", "4", "--initial-batch", "24", "--final-batch", "40",
        "--n-final-passes", "2", "--align-every", "6", "--checkpoint-minutes", "0", *extra,
    ]  # fmt: skip


def _run(args) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=ONE_THREAD, timeout=900)


@pytest.fixture(scope="module")
def one_process(tiny_set, tmp_path_factory) -> Path:
    """The tiny job run in one process, one BLAS thread."""
    out = tmp_path_factory.mktemp("one_process")
    r = _run(_args(tiny_set["particles"], out))
    assert r.returncode == 0, r.stderr
    return out


def _assert_same_result(out: Path, reference: Path) -> None:
    """Half maps and particles.star bit for bit, and the GS-FSC history, as the one-process job's."""
    for name in HALF_MAPS:
        with mrcfile.open(out / name) as a, mrcfile.open(reference / name) as b:
            assert np.array_equal(a.data, b.data), name
    assert (out / "particles.star").read_bytes() == (reference / "particles.star").read_bytes()
    info, ref = (json.loads((folder / "run.json").read_text()) for folder in (out, reference))
    assert info["status"] == "finished"
    assert info["history"] == ref["history"] and len(info["history"]) == 5  # 3 in the SGD, 2 after the passes
    assert info["alignment_B_to_A"] == ref["alignment_B_to_A"]


def test_two_workers_give_the_one_process_result_bit_for_bit(tiny_set, one_process, tmp_path):
    out = tmp_path / "two"
    r = _run(_args(tiny_set["particles"], out, "--parallel-halves"))
    assert r.returncode == 0, r.stderr
    _assert_same_result(out, one_process)
    info = json.loads((out / "run.json").read_text())
    assert info["device"] == "2 workers on the cpu (1 thread(s) each)"
    assert "GS-FSC 0.143 at" in r.stdout and "half A SGD iteration" in r.stdout  # monitor and progress
    for half in "AB":
        log_text = worker_log(out, half).read_text()
        assert f"half {half}: phase 1 done" in log_text and f"half {half}: phase 2 done" in log_text
        assert (half_folder(out, half) / "checkpoint" / "state.json").is_file()
        assert not list(half_folder(out, half).glob("sgd_*.npz"))  # the monitor's snapshots were used up
    alignment = json.loads((out / "halves" / "alignment.json").read_text())
    assert alignment == info["alignment_B_to_A"]


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _iteration(out: Path, half: str) -> int:
    try:
        state = json.loads((half_folder(out, half) / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError):
        return 0
    return state.get("runs", {}).get(half, {}).get("iteration", 0)


def test_a_killed_worker_is_named_with_its_log_and_the_job_resumes_to_the_same_result(tiny_set, one_process, tmp_path):
    out = tmp_path / "killed"
    args = _args(tiny_set["particles"], out, "--parallel-halves")
    coordinator = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    _wait_for(lambda: _iteration(out, "B") >= 4, 300, "half B's checkpoint at iteration 4")
    lock = json.loads((half_folder(out, "B") / "habinit.lock").read_text())
    os.kill(lock["pid"], signal.SIGKILL)
    _, stderr = coordinator.communicate(timeout=300)
    assert coordinator.returncode == 1, stderr
    first, *tail = stderr.strip().splitlines()
    assert first == (
        f"habinit run: error: half B's worker was killed by SIGKILL in phase 1 (log: {worker_log(out, 'B')}); "
        "half A's worker was stopped at its checkpoint; rerun the same command to resume both"
    )
    log_b = worker_log(out, "B").read_text().splitlines()
    assert 1 <= len(tail) <= 15 and tail == [f"  half_B.log: {line}" for line in log_b[-len(tail) :]]
    log_a = worker_log(out, "A").read_text()
    # stopped cleanly, at a checkpoint (unless it had ended phase 1 before B was killed)
    assert "interrupted (SIGTERM)" in log_a or "half A: phase 1 done" in log_a
    assert _iteration(out, "A") >= 4
    assert not (out / "run.json").exists() and not (out / "habinit.lock").exists()
    assert not (half_folder(out, "A") / "habinit.lock").exists()

    resumed = _run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    for half in "AB":
        assert "resumed from" in worker_log(out, half).read_text()
    _assert_same_result(out, one_process)


def test_gpu_lists_and_thread_shares_of_the_workers(monkeypatch):
    monkeypatch.setenv("HABINIT_THREADS", "8")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # set by the user: kept
    launch = WorkerLaunch("p.star", None, DeviceSettings(device="gpu"), WorkerSettings(gpus="0,1,2,3"))
    env_a, env_b = launch.worker_environment("A"), launch.worker_environment("B")
    assert (env_a["CUDA_VISIBLE_DEVICES"], env_b["CUDA_VISIBLE_DEVICES"]) == ("0,1", "2,3")
    assert env_a["HABINIT_THREADS"] == env_a["OPENBLAS_NUM_THREADS"] == "4" and env_a["OMP_NUM_THREADS"] == "3"
    assert env_a["HABINIT_COORDINATOR_PID"] == str(os.getpid())
    assert launch.describe() == "2 workers: half A on GPU 0,1, half B on GPU 2,3"
    assert WorkerSettings(gpus="1").gpu_lists() == {"A": "1", "B": "1"}  # one GPU: both halves on it
    assert WorkerSettings(gpus=" 0, 1").parallel and not WorkerSettings().parallel
    with pytest.raises(ValueError, match=r"--gpus must be GPU ids separated by commas \(e.g. 0,1\), got '0;1'"):
        WorkerSettings(gpus="0;1")


def test_stage_without_two_workers_and_a_worker_without_a_prepared_job_are_one_line(tiny_set, tmp_path):
    r = _run(_args(tiny_set["particles"], tmp_path / "a", "--stage", "align"))
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "habinit run: error: --stage is a stage of the two-worker job: add --parallel-halves or --gpus"
    )
    half = [sys.executable, "-m", "habinit_plugin.engine", "half", "--out", str(tmp_path / "b"), "--half", "A"]
    r = _run([*half, "--phase", "1"])
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"habinit half: error: {tmp_path / 'b' / 'halves' / 'job.json'} is missing: run habinit run "
        "--parallel-halves (--stage prepare) first"
    )
