"""Run plots from a metrics JSONL: parsed series, expert-load matrix values, PNG outputs."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from pipeline.eval.plots import expert_load, plot_run, read_metrics_log, series

pytestmark = pytest.mark.unit


def _write_log(path):
    lines = [
        {
            "step": 1,
            "loss": 4.0,
            "aux_loss": 0.02,
            "lr": 1e-4,
            "expert_counts": [[10, 10, 10, 10], [40, 0, 0, 0]],
        },
        {"step": 2, "loss": 3.0, "aux_loss": 0.01, "lr": 2e-4, "expert_counts": [[0, 0, 0, 0], [1, 1, 1, 1]]},
        {"event": "eval", "step": 2, "cer": 0.5, "cer_norm": 0.4},
        {"step": 3, "loss": float("nan"), "aux_loss": 0.01, "lr": 2e-4, "expert_counts": [[1, 2], [3]]},
        {
            "step": 4,
            "loss": 1.0,
            "aux_loss": 0.005,
            "lr": 1e-4,
            "expert_counts": [[5, 0, 0, 15], [2, 2, 0, 0]],
        },
        {"event": "eval", "step": 4, "cer": 0.25},
    ]
    text = "\n".join(json.dumps(x) for x in lines[:3]) + "\n{oops\n[1, 2]\n\n"
    text += "\n".join(json.dumps(x) for x in lines[3:]) + "\n"
    path.write_text(text)


def test_parse_and_series(tmp_path):
    _write_log(tmp_path / "metrics.jsonl")
    records, bad = read_metrics_log(tmp_path / "metrics.jsonl")
    assert len(records) == 6 and bad == 2
    assert series(records, "loss") == ([1.0, 2.0, 4.0], [4.0, 3.0, 1.0])  # NaN dropped
    assert series(records, "cer") == ([2.0, 4.0], [0.5, 0.25])
    steps, load = expert_load(records)
    assert steps.tolist() == [1.0, 2.0, 4.0]  # the ragged step 3 is skipped
    assert load.shape == (3, 2, 4)
    np.testing.assert_allclose(load[0], [[1, 1, 1, 1], [4, 0, 0, 0]])
    assert all(math.isnan(v) for v in load[1, 0]) and load[1, 1].tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(load[2], [[1, 0, 0, 3], [2, 2, 0, 0]])


def test_plot_run(tmp_path):
    _write_log(tmp_path / "metrics.jsonl")
    result = plot_run(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert result["skipped_lines"] == 2
    assert [p.name for p in result["expert_load"]] == ["expert_load_layer0.png", "expert_load_layer1.png"]
    for path, size in ((result["losses"], (800, 800)), (result["cer"], (800, 400))):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == size
    (tmp_path / "empty.jsonl").write_text('{"event": "start"}\n')
    with pytest.raises(ValueError, match="no record with loss"):
        plot_run(tmp_path / "empty.jsonl", tmp_path / "plots2")
