"""Several processes on CPU (gloo): `adarank train --nproc-per-node 2` starts two connected processes that
hold identical parameters after every rank change, write every log once, and resume exactly; re-wrapping
after growth stacks nothing; unconnected, FSDP and DeepSpeed launches are refused with one line."""

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_bert, tiny_run_config
from test_resume import cli, outcome

from adarank.cli import main
from adarank.distributed import LaunchError, _free_port, check_processes
from adarank.report import read_jsonl

HERE = os.path.dirname(os.path.abspath(__file__))
# forced growth at 4, 8, 12 and a prune at step 15 of 24; every process draws LoRA dropout
CONFIG = """\
model: {{name_or_path: '{base}', max_length: 48}}
data: {{task: mrpc, data_dir: '{glue}'}}
train: {{max_steps: 24, batch_size: 8, lr: 0.005, logging_steps: 2, eval_steps: 7, seed: 3, checkpoint_every: 5}}
adarank: {{r0: 2, r_max: 8, alpha: 2, tol: 0.0, check_every: 4, warmup_steps: 4, criterion: threshold,
          strategy: merge, lora_dropout: 0.1, prune: rank, prune_rank: 2, prune_at: 0.6}}
"""


@pytest.fixture
def config_file(tmp_path, glue_dir, bert_tok):
    return tiny_run_config(tmp_path, glue_dir, bert_tok, CONFIG)


def test_two_processes_agree_log_once_and_resume_exactly(tmp_path, config_file):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    done = cli(config_file, ref, [], "--nproc-per-node", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stdout.splitlines() if line.startswith("done:")] == [
        line for line in done.stdout.splitlines() if "(2 processes)" in line]
    assert done.stdout.count("done:") == 1 and done.stdout.count("eval step 7:") == 1
    results = json.load(open(os.path.join(ref, "results.json")))
    assert results["num_processes"] == 2 and results["final"]["n"] == 32  # the validation set once, not twice
    events = results["rank_events"]
    assert [(e["action"], e["step"]) for e in events] == [("grow", 4), ("grow", 8), ("grow", 12), ("prune", 15)]
    for e in events:  # each process's digest of its trainable parameters right after the rank change
        assert len(e["param_digests"]) == 2 and e["param_digests"][0] == e["param_digests"][1]
    assert len({e["param_digests"][0] for e in events}) == 4
    assert read_jsonl(os.path.join(ref, "rank_events.jsonl")) == json.loads(json.dumps(events))
    logged = [r["step"] for r in read_jsonl(os.path.join(ref, "log.jsonl"))]
    assert logged == sorted(set(logged)) and logged[-1] == 24

    killed = cli(config_file, run, [], "--nproc-per-node", "2", env={"ADARANK_FAILPOINT": "step:13:1"})
    assert killed.returncode != 0
    assert killed.stderr.strip().splitlines()[-1] == ("adarank: process 1 of 2 was killed by SIGKILL; the run stopped "
                                                      "there and continues from its last checkpoint with --resume")
    assert "Traceback" not in killed.stderr
    resumed = cli(config_file, run, [], "--nproc-per-node", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outcome(run) == outcome(ref)
    assert json.load(open(os.path.join(run, "results.json")))["resumes"][0]["step"] == 10

    # SIGINT to process 1 alone, at a step whose losses are not yet averaged over the processes (logged every
    # 2 steps): both stop after it, each checkpoints its own unlogged losses, and the resume is exact
    stopped_dir = str(tmp_path / "stopped")
    stopped = cli(config_file, stopped_dir, [], "--nproc-per-node", "2", env={"ADARANK_FAILPOINT": "step:13:1:SIGINT"})
    assert stopped.returncode == 130
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("adarank: stopped by SIGINT after step 13;") and line.endswith("--nproc-per-node 2 --resume")
    assert cli(config_file, stopped_dir, [], "--nproc-per-node", "2", "--resume").returncode == 0
    assert outcome(stopped_dir) == outcome(ref)


def spawn(nproc: int, argv: list[str], env: dict | None = None) -> tuple[list[int], list[str]]:
    """Run `nproc` connected processes of `python ARGV` (with the environment torchrun gives its workers)
    to their end: their exit codes and outputs."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "WORLD_SIZE": str(nproc), "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(nproc)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return [p.returncode for p in procs], outs


def test_rewrapping_after_growth_stacks_no_wrappers(tmp_path, config_file):
    """bf16 autocast on CPU: Accelerate patches the model's forward once; growth must not patch it again."""
    probe = tmp_path / "probe"
    probe.mkdir()
    codes, outs = spawn(2, [os.path.join(HERE, "dist_probe.py"), config_file, str(tmp_path / "out"), str(probe),
                            "train.mixed_precision=bf16"])
    assert codes == [0, 0], outs[0][-3000:]
    ranks = [read_jsonl(str(probe / f"rank{r}.jsonl")) for r in (0, 1)]
    assert [r["when"] for r in ranks[0]] == ["start", "grow@4", "grow@8", "grow@12", "prune@15"]
    assert [r["digest"] for r in ranks[0]] == [r["digest"] for r in ranks[1]]
    for rec in ranks[0] + ranks[1]:
        assert rec["wrapper"] == "DistributedDataParallel" and rec["wraps_raw"]
        assert rec["accelerator_models"] == 1 and rec["forward_wrappers"] == ranks[0][0]["forward_wrappers"] > 0


def test_masked_growth_needs_no_rewrap_in_our_loop(tmp_path, config_file):
    """strategy masked (with a prune, in place too): the same DDP wrapper all run, identical parameters."""
    probe = tmp_path / "probe"
    probe.mkdir()
    codes, outs = spawn(2, [os.path.join(HERE, "dist_probe.py"), config_file, str(tmp_path / "out"), str(probe),
                            "adarank.strategy=masked"])
    assert codes == [0, 0], outs[0][-3000:]
    ranks = [read_jsonl(str(probe / f"rank{r}.jsonl")) for r in (0, 1)]
    assert [r["when"] for r in ranks[0]] == ["start", "grow@4", "grow@8", "grow@12", "prune@15"]
    assert [r["digest"] for r in ranks[0]] == [r["digest"] for r in ranks[1]]
    assert len({r["model_id"] for r in ranks[0]}) == 1 and {r["accelerator_models"] for r in ranks[0]} == {1}


@pytest.mark.parametrize("strategy", ["masked", "expand"])
def test_the_callback_in_a_two_process_trainer(tmp_path, strategy):
    """A user's Trainer script in 2 processes (gloo): masked growth keeps both processes identical after every
    rank change; expand, which would need the DDP wrapper rebuilt, is refused with one line."""
    codes, outs = spawn(2, [os.path.join(HERE, "trainer_probe.py"), str(tmp_path), strategy])
    if strategy == "expand":
        assert all(codes)
        assert "AdaRankCallback in 2 processes needs adarank.strategy='masked'" in outs[0]
        return
    assert codes == [0, 0], outs[0][-3000:]
    ranks = [read_jsonl(str(tmp_path / f"rank{r}.jsonl")) for r in (0, 1)]
    assert [(r["step"], r["action"]) for r in ranks[0]] == [(3, "grow"), (6, "grow"), (8, "prune")]
    assert ranks[0] == ranks[1]  # the same digests, taken by each process itself
    assert all(r["agreed"] == [r["digest"]] * 2 for r in ranks[0])  # and gathered by the callback's own check
    assert all(r["num_processes"] == 2 and r["wrapped"] == "DistributedDataParallel" for r in ranks[0])
    assert ranks[0][1]["rank_mean"] < ranks[0][1]["to_rank"]  # per-layer: two modules grew at each event


def test_unconnected_and_sharded_launches_are_refused(monkeypatch, tmp_path, config_file, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match=r"started 2 processes \(WORLD_SIZE=2\) but they are not connected"):
        check_processes(SimpleNamespace(distributed_type="NO", num_processes=1))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(LaunchError, match="FSDP is not supported"):
        check_processes(SimpleNamespace(distributed_type="FSDP", num_processes=1))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    out = tmp_path / "out"
    assert main(["train", "--config", config_file, "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "adarank: error: DeepSpeed (ACCELERATE_USE_DEEPSPEED is set) is not supported: rank growth changes parameter "
        "shapes, which DeepSpeed shards; run data-parallel instead (adarank train --nproc-per-node N)")
    assert not out.exists()


def test_the_grad_scaler_and_the_optimizer_survive_a_rank_change(bert_tok):
    """fp16 cannot run on CPU; what the loop does at a rank change, done by hand on an accelerator with a
    GradScaler whose scale has moved: the optimizer object, its wrapper and the scaler all stay."""
    from accelerate import Accelerator

    from adarank import AdaRankConfig
    from adarank.controller import Decision
    from adarank.modeling import apply_lora
    from adarank.optim import apply_decision, build_optimizer

    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model = apply_lora(tiny_bert(vocab_size=len(bert_tok)), False, 2, 4, None, 0.0)
    optimizer = acc.prepare_optimizer(build_optimizer(model, 1e-3))
    acc.scaler.scale(torch.ones(()))  # the scaler starts lazily, at its first scaled loss
    acc.scaler.update(2.0**9)  # the scale the run found so far
    scaler, inner = acc.scaler, optimizer.optimizer
    apply_decision(model, optimizer, Decision("grow", 4, 2, 10), AdaRankConfig(r0=2, r_max=8, strategy="expand"), seed=0)
    assert acc.scaler is scaler and optimizer.scaler is scaler and scaler.get_scale() == 2.0**9
    assert optimizer.optimizer is inner and acc._optimizers == [optimizer]
    assert {id(p) for g in inner.param_groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
