"""Export round trip: AdaRank run -> standard PEFT adapter on the original base (or a merged model)."""

import json
import os

import pytest
import torch
from conftest import tiny_bert, tiny_t5

from adarank import RunConfig, load_run_model
from adarank.cli import main
from adarank.export import export_adapter
from adarank.train import train

INPUTS = ["the cat sat on the mat", "a dog ran", "the old man ate fish with bread"]


def run(tmp_path, glue_dir, tok, build, **adarank):
    base = tmp_path / "base"
    build(vocab_size=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    settings = dict(r0=2, r_max=6, alpha=2, tol=0.0, check_every=3, warmup_steps=3, criterion="threshold",
                    strategy="merge", prune="energy", prune_energy=0.9, prune_at=0.75)
    settings.update(adarank)
    cfg = RunConfig.from_dict({
        "model": {"name_or_path": str(base), "max_length": 48, "max_target_length": 4},
        "data": {"task": "mrpc", "data_dir": glue_dir},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 16, "batch_size": 8, "lr": 2e-2, "seed": 0},
        "adarank": settings,
    })
    results = train(cfg, model=build(vocab_size=len(tok)), tokenizer=tok)
    return base, cfg.train.output_dir, results


def logits(model, tok, seq2seq):
    model.eval()
    batch = tok(INPUTS, padding=True, return_tensors="pt")
    if seq2seq:
        batch["decoder_input_ids"] = torch.zeros(len(INPUTS), 2, dtype=torch.long)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_export_after_merge_growth_and_per_layer_pruning_loads_in_plain_peft(tmp_path, glue_dir, bert_tok, t5_tok, arch):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    tok, build, auto = (bert_tok, tiny_bert, AutoModelForSequenceClassification) if arch == "bert" else (t5_tok, tiny_t5, AutoModelForSeq2SeqLM)
    base, run_dir, results = run(tmp_path, glue_dir, tok, build)
    actions = [e["action"] for e in results["rank_events"]]
    assert actions.count("grow") >= 2 and actions[-1] == "prune"
    if arch == "t5":  # energy pruning left different ranks per module
        assert len(set(results["final_ranks"].values())) > 1
    ref = logits(load_run_model(os.path.join(run_dir, "model"))[0], tok, arch == "t5")

    out = tmp_path / "adapter"
    log = export_adapter(run_dir, str(out))
    assert log["exact"] and log["max_abs_logit_diff"] <= 1e-4
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and set(cfg) >= {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules"}
    assert (out / "adapter_model.safetensors").is_file()
    if arch == "bert":
        assert "classifier" in cfg["modules_to_save"]
    # merge-strategy growth: the total update since the original base has a higher rank than the last adapter
    assert max(m["exported_rank"] for m in log["modules"].values()) > max(results["final_ranks"].values())

    plain = PeftModel.from_pretrained(auto.from_pretrained(base), str(out))  # plain PEFT, the original base
    assert (logits(plain, tok, arch == "t5") - ref).abs().max().item() <= 1e-4


def test_truncated_export_reports_its_error(tmp_path, glue_dir, bert_tok):
    _, run_dir, _ = run(tmp_path, glue_dir, bert_tok, tiny_bert)
    log = export_adapter(run_dir, str(tmp_path / "small"), max_rank=1)
    assert not log["exact"] and all(m["exported_rank"] == 1 for m in log["modules"].values())
    assert all(m["frobenius_error"] > 0 for m in log["modules"].values() if m["numerical_rank"] > 1)


def test_merged_export_loads_with_automodel(tmp_path, glue_dir, bert_tok, capsys):
    from transformers import AutoModelForSequenceClassification

    _, run_dir, _ = run(tmp_path, glue_dir, bert_tok, tiny_bert, prune="none")
    ref = logits(load_run_model(os.path.join(run_dir, "model"))[0], bert_tok, False)
    assert main(["export", run_dir, str(tmp_path / "merged"), "--merged"]) == 0
    assert "merged model written" in capsys.readouterr().out
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert (logits(merged, bert_tok, False) - ref).abs().max().item() <= 1e-4


def test_export_of_a_missing_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "no AdaRank run here" in capsys.readouterr().err and not (tmp_path / "out").exists()
