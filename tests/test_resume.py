"""Checkpoints and exact resume: a run killed (SIGKILL, in a subprocess) or stopped (SIGINT/SIGTERM) after a
rank change and resumed with --resume ends bit-identical to the run that was never stopped."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import tiny_run_config

from adarank import load_config
from adarank.checkpoint import complete_checkpoints
from adarank.cli import main
from adarank.report import read_jsonl
from adarank.train import train

# every step draws LoRA dropout from the RNG; 8 batches an epoch, so 24 steps cross two epoch ends
CONFIG = """\
model: {{name_or_path: '{base}', max_length: 48}}
data: {{task: mrpc, data_dir: '{glue}'}}
train: {{max_steps: 24, batch_size: 8, lr: 0.005, logging_steps: 2, eval_steps: 7, seed: 3, checkpoint_every: 5}}
adarank: {{r0: 2, r_max: 8, alpha: 2, tol: 0.0, check_every: 4, warmup_steps: 4, criterion: threshold,
          lora_dropout: 0.1}}
"""

# name: (overrides, ADARANK_FAILPOINT, expected exit code, step of the checkpoint the resume starts from)
SCENARIOS = {
    "merge": (["adarank.strategy=merge"], "step:13", -signal.SIGKILL, 10),
    "expand_killed_mid_checkpoint": (["adarank.strategy=expand"], "checkpoint:15", -signal.SIGKILL, 10),
    "per_layer_sigint": (["adarank.strategy=expand", "adarank.grow_top_k=1", "adarank.importance=sensitivity"],
                         "step:11::SIGINT", 130, 11),
    "prune_sigterm": (["adarank.strategy=expand", "adarank.prune=rank", "adarank.prune_rank=2", "adarank.prune_at=0.6"],
                      "step:17::SIGTERM", 143, 17),
    # 3 micro-batches a step over 8 batches an epoch: every epoch ends in a step of 2 (the loader's end syncs)
    "merge_grad_accum": (["adarank.strategy=merge", "train.grad_accum_steps=3"], "step:7", -signal.SIGKILL, 5),
    # the checkpoint at step 8 is the epoch's last step, taken before that epoch's end-of-epoch evaluation
    "expand_epoch_end": (["adarank.strategy=expand", "train.checkpoint_every=8", "train.eval_steps=null"], "step:11",
                         -signal.SIGKILL, 8),
    "adalora": (["method.name=adalora", "adalora.init_r=4", "adalora.target_r=2", "adalora.delta_t=2"], "step:14",
                -signal.SIGKILL, 10),
}


@pytest.fixture
def config_file(tmp_path, glue_dir, bert_tok):
    return tiny_run_config(tmp_path, glue_dir, bert_tok, CONFIG)


def cli(config: str, out: str, overrides: list[str], *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "adarank.cli", "train", "--config", config, "--output-dir", out, *extra]
    for item in overrides:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def outcome(out: str) -> dict:
    """What the run computed (not how long it took): results without timings, and the logs as written."""
    with open(os.path.join(out, "results.json")) as fh:
        results = json.load(fh)
    for event in results["rank_events"]:
        event.pop("seconds")
    keep = ("final", "evals", "rank_events", "rank_schedule", "final_ranks", "trainable_params_avg", "steps",
            "nonfinite_steps", "status")
    return {**{k: results[k] for k in keep}, "log": read_jsonl(os.path.join(out, "log.jsonl")),
            "events_file": [{k: v for k, v in e.items() if k != "seconds"}
                            for e in read_jsonl(os.path.join(out, "rank_events.jsonl"))]}


@pytest.mark.parametrize("name", SCENARIOS)
def test_killed_or_stopped_run_resumes_bit_identical(tmp_path, config_file, name):
    overrides, failpoint, code, resumed_at = SCENARIOS[name]
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    train(load_config(config_file, overrides + [f"train.output_dir={ref_dir}"]))

    stopped = cli(config_file, run_dir, overrides, env={"ADARANK_FAILPOINT": failpoint})
    assert stopped.returncode == code, stopped.stderr[-2000:]
    assert not os.path.exists(os.path.join(run_dir, "results.json"))
    assert complete_checkpoints(run_dir)[-1][0] == resumed_at
    if code > 0:  # SIGINT/SIGTERM: the step finished, a checkpoint was written, one line says how to go on
        last = stopped.stderr.strip().splitlines()[-1]
        assert last.startswith(f"adarank: stopped by {'SIGINT' if code == 130 else 'SIGTERM'} after step {resumed_at}")
        assert last.endswith("--resume") and "Traceback" not in stopped.stderr
    else:  # the process died where it stood: its log may hold lines past the checkpoint
        assert read_jsonl(os.path.join(run_dir, "log.jsonl"))[-1]["step"] > resumed_at or "checkpoint" in failpoint
    if "checkpoint" in failpoint:  # killed halfway through writing it: the half-written one is ignored
        assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [".tmp-step-00000015", "step-00000005",
                                                                            "step-00000010"]

    results = train(load_config(config_file, overrides + [f"train.output_dir={run_dir}"]), resume=True)
    assert results["resumes"] == [{"step": resumed_at, "checkpoint": os.path.join(run_dir, "checkpoints",
                                                                                  f"step-{resumed_at:08d}")}]
    reference, resumed = outcome(ref_dir), outcome(run_dir)
    assert resumed == reference
    assert resumed["final"]["n"] == 32
    if name == "adalora":  # no rank events: its budget allocator masked singular values before and after the kill
        ranks = resumed["final_ranks"]
        assert sum(ranks.values()) == 2 * len(ranks) and max(ranks.values()) < 4  # target_r=2 budget from init_r=4
    else:
        assert len(resumed["rank_events"]) >= 3
    logged = [r["step"] for r in resumed["log"]]
    assert logged == sorted(set(logged)) and logged[-1] == 24  # each record once, none lost


def test_resume_refuses_a_changed_config_and_a_finished_run(tmp_path, config_file, capsys):
    out = str(tmp_path / "run")
    stopped = cli(config_file, out, [], env={"ADARANK_FAILPOINT": "step:7::SIGINT"})
    assert stopped.returncode == 130
    args = ["train", "--config", config_file, "--output-dir", out]
    assert main(args + ["--resume", "--set", "train.lr=0.01"]) == 2
    assert "--resume: the config differs from the run's in train.lr" in capsys.readouterr().err
    assert main(args) == 2  # neither --resume nor --overwrite
    assert "already holds an AdaRank run (interrupted at step 7); continue it with --resume" in capsys.readouterr().err
    # what may change on resume: how often to checkpoint and how many to keep
    assert main(args + ["--resume", "--set", "train.checkpoint_every=3", "--set", "train.keep_checkpoints=1"]) == 0
    assert [s for s, _ in complete_checkpoints(out)] == [24]
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    assert "is complete; there is nothing to continue" in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_refused(tmp_path, config_file, capsys):
    out = tmp_path / "run"
    killed = cli(config_file, str(out), [], env={"ADARANK_FAILPOINT": "step:3"})  # before the first checkpoint
    assert killed.returncode == -signal.SIGKILL and (out / "adarank_run.json").exists()
    assert main(["train", "--config", config_file, "--output-dir", str(out), "--resume"]) == 2
    assert "has no complete checkpoint; start it again with --overwrite" in capsys.readouterr().err
    assert main(["train", "--config", config_file, "--output-dir", str(out), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
