"""Real training on MiniLM-L6 and the local MRPC files through the CLI (about a minute each): run with
`python -m pytest -m slow`."""

import json
import os

import pytest

from adarank.cli import main
from adarank.report import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["merge", "expand"])
def test_minilm_smoke_grows_and_writes_every_output(tmp_path, strategy):
    out = tmp_path / strategy
    rc = main([
        "train", "--config", os.path.join(ROOT, "configs", "mrpc_minilm.yaml"), "--output-dir", str(out),
        "--data-dir", os.path.join(ROOT, "..", "shared", "data", "glue"), "--max-steps", "60",
        "--set", "adarank.check_every=10", "--set", "adarank.warmup_steps=10", "--set", "adarank.criterion=threshold",
        "--set", f"adarank.strategy={strategy}",
    ])
    assert rc == 0
    for name in ("config.yaml", "log.jsonl", "rank_events.jsonl", "results.json", "training.png"):
        assert (out / name).is_file(), name
    events = read_jsonl(str(out / "rank_events.jsonl"))
    assert len(events) >= 2 and all(e["to_rank"] == e["from_rank"] + 2 for e in events)
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["n"] == 408 and results["strategy"] == strategy
    assert set(results["final_ranks"].values()) == {results["final_rank"]} == {events[-1]["to_rank"]}
    assert len(results["final_ranks"]) == 12  # query and value in 6 layers
