"""Nothing destroyed or mixed, and every fault as one line: run directories, exports, non-finite losses,
and the input errors that used to end in tracebacks."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import saved, tiny_bert

from adarank.cli import main
from adarank.report import dumps, strict


@pytest.fixture
def config(tmp_path, glue_dir, bert_tok):
    base = saved(tiny_bert(vocab_size=len(bert_tok)), bert_tok, tmp_path / "base")
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{name_or_path: '{base}', max_length: 48}}\ndata: {{task: mrpc, data_dir: '{glue_dir}'}}\n"
                    "train: {max_steps: 8, batch_size: 8, lr: 0.005, logging_steps: 2, checkpoint_every: 4}\n"
                    "adarank: {r0: 2, r_max: 4, check_every: 4, warmup_steps: 4, criterion: threshold, tol: 0.0}\n")
    return str(path)


def run(config, out, *extra):
    return main(["train", "--config", config, "--output-dir", str(out), *extra])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def snapshot(path) -> dict:
    """Every file under `path` with its bytes."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


def test_a_finished_run_is_refused_and_overwrite_removes_only_run_files(tmp_path, config, capsys):
    out = tmp_path / "run"
    assert run(config, out) == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert run(config, out) == 2
    assert one_line(capsys) == (f"adarank: error: train.output_dir: {out} already holds an AdaRank run (complete); "
                                "continue it with --resume or replace it with --overwrite")
    assert snapshot(out) == before
    assert run(config, out, "--resume", "--overwrite") == 2
    assert "exclude each other" in one_line(capsys)
    assert run(config, out, "--overwrite", "--set", "train.save_model=false") == 0
    assert (out / "notes.txt").read_text() == "mine" and not (out / "model").exists()  # the old model went with it
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
    capsys.readouterr()
    assert main(["export", str(out), str(tmp_path / "exp")]) == 2  # no model: nothing old is exported instead
    assert one_line(capsys) == f"adarank: error: {out}: the run saved no model (train.save_model: false); nothing to export"


def test_directories_that_are_not_runs_are_never_written_over(tmp_path, config, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("someone else's")
    for flags in ((), ("--overwrite",), ("--resume",)):
        assert run(config, foreign, *flags) == 2
        assert "holds config.yaml but no adarank_run.json, so it is not an AdaRank run" in one_line(capsys)
    assert snapshot(foreign) == {"config.yaml": b"someone else's"}

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert run(config, a_file) == 2
    assert one_line(capsys) == f"adarank: error: train.output_dir: {a_file} exists and is not a directory"
    assert run(config, "/proc/adarank-run") == 2  # read-only, even for root
    assert one_line(capsys).startswith("adarank: error: train.output_dir: cannot write in /proc")
    assert run(config, tmp_path / "new", "--resume") == 2
    assert "holds no AdaRank run to continue" in one_line(capsys)
    assert not (tmp_path / "new").exists()


def test_export_never_deletes_what_it_did_not_write(tmp_path, config, capsys):
    out = tmp_path / "runs" / "run"
    assert run(config, out) == 0
    before = snapshot(tmp_path / "runs")
    for target, what in ((out, "the run directory"), (tmp_path / "runs", "a directory that contains the run"),
                         (tmp_path, "a directory that contains the run")):
        assert main(["export", str(out), str(target)]) == 2
        assert one_line(capsys) == f"adarank: error: export target {target} is {what}; choose a new directory"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    for flags in ((), ("--overwrite",)):
        assert main(["export", str(out), str(busy), *flags]) == 2
    assert "holds no earlier export" in one_line(capsys)
    assert snapshot(busy) == {"keep.txt": b"mine"} and snapshot(tmp_path / "runs") == before
    for bad in ("0", "-3"):
        assert main(["export", str(out), str(tmp_path / "e"), "--max-rank", bad]) == 2
        assert one_line(capsys) == f"adarank: error: --max-rank must be >= 1, got {bad}"

    exp = tmp_path / "exp"
    assert main(["export", str(out), str(exp)]) == 0
    first = json.loads((exp / "export_log.json").read_text())
    assert main(["export", str(out), str(exp), "--max-rank", "1"]) == 2  # an export is not replaced unasked
    assert main(["export", str(out), str(exp), "--max-rank", "1", "--overwrite"]) == 0
    assert json.loads((exp / "export_log.json").read_text())["r"] == 1 != first["r"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary directories left
    (exp / "README.md").write_text("my model card")  # the user's edit of a file the export wrote
    (exp / "notes.txt").write_text("mine")  # and a file of their own: --overwrite takes neither
    capsys.readouterr()
    assert main(["export", str(out), str(exp), "--overwrite"]) == 2
    assert one_line(capsys) == (f"adarank: error: export target {exp} holds files the earlier export did not write or "
                                "that were changed since (README.md, notes.txt); move them or choose a new directory")
    assert (exp / "README.md").read_text() == "my model card" and (exp / "notes.txt").read_text() == "mine"
    assert snapshot(tmp_path / "runs") == before


def test_a_non_finite_loss_is_skipped_counted_and_stops_the_run(tmp_path, config, capsys):
    out = tmp_path / "run"
    rc = run(config, out, "--set", "train.lr=1e30", "--set", "train.max_grad_norm=0", "--set", "train.max_steps=40",
             "--set", "train.checkpoint_every=2", "--set", "train.max_nonfinite_steps=5")
    assert rc == 1
    line = one_line(capsys)
    assert line.startswith("adarank: error: the loss became non-finite at step ")
    assert "5 steps in a row skipped (train.max_nonfinite_steps=5); the last good checkpoint is " in line
    text = (out / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in results.json"))
    assert results["status"] == "nonfinite_loss" and results["nonfinite_steps"] == 5 and results["error"] in line
    first = int(line.split("at step ")[1].split(":")[0])
    assert results["steps"] == first + 4
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_nonfinite", 0) for r in log) == 5
    assert all(r["loss"] is None and r["nonfinite"] == {"loss": "nan"} for r in log if r.get("skipped_nonfinite") == 2)
    # no checkpoint in the streak: the newest is the one the message names, from before it
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert int(ckpts[-1].split("-")[1]) < first and line.endswith(ckpts[-1])
    assert json.loads((out / "adarank_run.json").read_text())["status"] == "nonfinite_loss"
    assert main(["export", str(out), str(tmp_path / "exp")]) == 2
    assert "stopped on a non-finite loss" in one_line(capsys)


def test_strict_json_replaces_non_finite_numbers_and_says_which():
    obj = {"loss": float("nan"), "evals": [{"eval_loss": float("inf")}, {"eval_loss": 0.5}], "n": 3}
    assert strict(obj) == {"loss": None, "evals": [{"eval_loss": None}, {"eval_loss": 0.5}], "n": 3,
                           "nonfinite": {"loss": "nan", "evals[0].eval_loss": "inf"}}
    assert json.loads(dumps(obj))["nonfinite"]["loss"] == "nan"
    assert strict({"a": 1.0}) == {"a": 1.0}


def test_input_errors_are_one_line_before_anything_is_written(tmp_path, config, glue_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    cases = {
        "model.max_length": (["--set", "model.max_length=100"], "model.max_length (100) exceeds what"),
        "package without get_model_path": (["--set", "model.name_or_path=package:json"],
                                           "package module 'json' has no get_model_path()"),
        "unknown --set field": (["--set", "train.learning_rate=1"],
                                "override 'train.learning_rate=1': unknown field train.learning_rate"),
    }
    empty = tmp_path / "empty_model"  # config and tokenizer, but no weights
    shutil.copytree(tmp_path / "base", empty, ignore=shutil.ignore_patterns("*.safetensors"))
    cases["model directory without weights"] = (["--set", f"model.name_or_path={empty}"],
                                                f"cannot load the model in {empty}")
    for name, (flags, expected) in cases.items():
        assert run(config, out, *flags) == 2, name
        line = one_line(capsys)
        assert expected in line, (name, line)
        assert not out.exists(), name

    child = tmp_path / "child.yaml"
    child.write_text("extends: missing.yaml\n")
    assert run(str(child), out) == 2
    assert one_line(capsys) == f"adarank: error: {child}: extends: 'missing.yaml' not found (looked for {tmp_path / 'missing.yaml'})"

    broken = tmp_path / "glue_bad" / "mrpc"
    broken.mkdir(parents=True)
    good = open(os.path.join(glue_dir, "mrpc", "train.jsonl"), "rb").read().splitlines(keepends=True)
    (broken / "train.jsonl").write_bytes(good[0] + b'{"sentence1": "caf\xe9", "sentence2": "b", "label": 0}\n')
    assert run(config, out, "--data-dir", str(tmp_path / "glue_bad")) == 2
    assert one_line(capsys).endswith("train.jsonl:2: not valid UTF-8 (byte 0xe9 at column 19)")

    # data_dir null without hub access: one quick request, then one line (no minute of retries)
    import huggingface_hub.utils
    from huggingface_hub import constants

    class Offline:
        def head(self, *args, **kwargs):
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.utils, "get_session", Offline)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert run(config, out, "--set", "data.data_dir=null") == 2
    assert one_line(capsys) == ("adarank: error: data.data_dir is null, so GLUE is read from the Hugging Face hub, which "
                                "cannot be reached (ConnectionError: Name or service not known); set data.data_dir (or "
                                "--data-dir) to a local copy in the HF glue layout <dir>/<task>/<split>.jsonl")
    assert not out.exists()


def test_non_finite_gradients_with_a_finite_loss_never_reach_the_weights(tmp_path, config):
    """No clipping (max_grad_norm 0), a finite loss, an inf gradient: the step is skipped all the same."""
    import torch

    from adarank import load_config
    from adarank.train import NonFiniteLoss, Run

    cfg = load_config(config, [f"train.output_dir={tmp_path / 'run'}", "train.max_grad_norm=0",
                               "train.max_nonfinite_steps=3", "train.checkpoint_every=1"])
    run = Run(cfg)
    params = {n: p for n, p in run.raw_model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    hooked = next(p for n, p in params.items() if "lora_B" in n)
    hooked.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(NonFiniteLoss, match="non-finite at step 1: 3 steps in a row skipped"):
        run.train()
    assert all(torch.equal(before[n], p) for n, p in params.items())
    assert all(math.isfinite(r["loss"]) for r in run.log)  # the losses were finite throughout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_in_progress_is_neither_resumed_nor_replaced(tmp_path, config, capsys):
    out = tmp_path / "run"
    assert run(config, out, "--max-steps", "4") == 0
    marker = json.loads((out / "adarank_run.json").read_text())
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        marker.update(status="running", pid=alive.pid, host=socket.gethostname())
        (out / "adarank_run.json").write_text(json.dumps(marker))
        for flag in ("--overwrite", "--resume"):
            assert run(config, out, flag) == 2
            assert one_line(capsys) == (f"adarank: error: train.output_dir: a run is in progress in {out} (process "
                                        f"{alive.pid} on this machine); stop it before you resume or replace it")
    finally:
        alive.kill()
        alive.wait()
    assert run(config, out, "--overwrite") == 0  # once it is gone
