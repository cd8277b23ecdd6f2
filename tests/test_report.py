import json
import os

import pytest

from adarank.report import plot_training, write_json


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "results.json"
    write_json(str(path), {"a": 1})
    with pytest.raises(TypeError):
        write_json(str(path), {"bad": object()})
    assert json.loads(path.read_text()) == {"a": 1}  # the old file is intact
    assert os.listdir(tmp_path) == ["results.json"]  # and no temporary file is left


def test_plot_marks_growth_and_prune(tmp_path):
    log = [{"step": s, "loss": 1.0 / s, "rank": 4 if s <= 10 else 6, "rank_mean": 4 if s <= 10 else 5.5} for s in range(2, 21, 2)]
    events = [{"step": 10, "action": "grow"}, {"step": 16, "action": "prune"}]
    plot_training(log, events, [{"step": 20, "accuracy": 0.7}], str(tmp_path / "training.png"), title="t")
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["training.png"]
