"""The viewer's figures from an engine output folder, headless and without Scipion."""

from __future__ import annotations

import json

import numpy as np
import pytest

from habinit_plugin.engine.mrc import write_map
from habinit_plugin.engine.star import StarBlock, write_star
from habinit_plugin.figures import write_all


@pytest.mark.no_scipion
@pytest.mark.parametrize("box", [32, 64])
def test_viewer_figures_render_from_engine_files(tmp_path, box):
    px = 1.8
    shells = np.arange(box // 2 + 1)
    curve = [{"shell": 0, "resolution_A": None, "fsc": 1.0}] + [
        {"shell": int(s), "resolution_A": box * px / s, "fsc": float(np.exp(-((s / 10) ** 2)))} for s in shells[1:]
    ]
    (tmp_path / "fsc.json").write_text(
        json.dumps({"resolution_0143": 8.0, "resolution_05": 10.0, "pixel_size": px, "box": box, "curve": curve})
    )
    history = [
        {"iteration": i, "phase": "sgd", "resolution_0143": 20 - i / 10, "working_resolution": 20} for i in (40, 80)
    ]
    history += [{"iteration": 81, "phase": "pass 1", "resolution_0143": 9.0}]
    (tmp_path / "run.json").write_text(json.dumps({"status": "finished", "resolution_0143": 8.0, "history": history}))
    rng = np.random.default_rng(0)
    block = StarBlock("particles", [], [[] for _ in range(500)])
    block.set_column("rlnAngleRot", rng.uniform(-180, 180, 500))
    block.set_column("rlnAngleTilt", np.degrees(np.arccos(rng.uniform(-1, 1, 500))))
    block.set_column("rlnAnglePsi", rng.uniform(-180, 180, 500))
    write_star(tmp_path / "particles.star", [block])
    for name in ("half_map_A.mrc", "half_map_B.mrc"):
        write_map(tmp_path / name, rng.normal(size=(box, box, box)).astype(np.float32), px)
    paths = write_all(tmp_path, tmp_path / "png")
    assert sorted(paths) == ["angular", "fsc", "history", "slices"]
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
