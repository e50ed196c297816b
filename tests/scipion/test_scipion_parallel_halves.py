"""The protocol's half steps side by side: one step per half set and phase, run in parallel by Scipion's
threads (STEPS_PARALLEL), between the coordinator's prepare, align and outputs steps."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from test_scipion_protocol import check_outputs, import_particles, run_habinit


def _time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(str(text))


def test_half_steps_run_side_by_side_and_give_the_outputs(project, sim32):
    imported = import_particles(
        project, objLabel="import for parallel halves", importFrom=3, starFile=str(sim32["split_star"])
    )
    input_set = imported.outputParticles
    # 3 threads: the main one and 2 that run steps, so the two halves' steps run at once
    prot = run_habinit(project, input_set, "habinit (halves side by side)", numberOfThreads=3)
    assert prot.isFinished(), prot.getStatus()
    check_outputs(prot, input_set, 400)

    steps = prot.loadSteps()
    names = [s.funcName.get() for s in steps]
    assert names == [
        "convertInputStep", "engineStageStep", "halfStep", "halfStep", "engineStageStep", "halfStep", "halfStep",
        "engineStageStep", "createOutputStep",
    ]  # fmt: skip
    by_index = {s.getIndex() or k + 1: s for k, s in enumerate(steps)}
    halves = [s for s in steps if s.funcName.get() == "halfStep"]
    assert [set(map(int, s.getPrerequisites())) for s in halves] == [{2}, {2}, {5}, {5}]
    assert set(map(int, by_index[5].getPrerequisites())) == {3, 4}  # the alignment waits for both halves
    for first, second in (halves[:2], halves[2:]):  # each phase: both halves ran at the same time
        start = max(_time(first.initTime), _time(second.initTime))
        end = min(_time(first.endTime), _time(second.endTime))
        assert start < end, [(s.initTime.get(), s.endTime.get()) for s in (first, second)]

    extra = Path(prot._getExtraPath())
    info = json.loads((extra / "run.json").read_text())
    assert info["device"] == "2 workers on the cpu (1 thread(s) each)"
    assert json.loads((extra / "halves" / "alignment.json").read_text()) == info["alignment_B_to_A"]
    for half in "AB":
        status = json.loads((extra / "halves" / half / "status.json").read_text())
        assert status["stage"] == "phase 2 done" and (extra / "halves" / half / "result.npz").is_file()
    log = Path(prot.getStdoutLog()).read_text(errors="replace")
    assert "half A: phase 1 done" in log and "half B: phase 2 done" in log
    assert "aligned half B onto half A" in log and "after pass 2: gold-standard FSC 0.143" in log
