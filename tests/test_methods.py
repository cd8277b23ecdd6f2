"""The reference methods of the benchmark on tiny models: fixed LoRA, PEFT AdaLoRA, head only, full
fine-tuning, zero-shot; and the config's `extends`."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import saved, tiny_bert, tiny_t5

from adarank import ConfigError, RunConfig, load_config
from adarank.modeling import ModelError
from adarank.surgery import adalora_ranks
from adarank.train import Run


def method_cfg(tmp_path, glue_dir, base, method, **sections):
    raw = {
        "model": {"name_or_path": str(base), "max_length": 48},
        "data": {"task": "mrpc", "data_dir": glue_dir},
        "train": {"output_dir": str(tmp_path / method), "max_steps": 20, "batch_size": 8, "lr": 5e-3,
                  "logging_steps": 2, "eval_steps": 10, "seed": 3, "save_model": False},
        "adarank": {"r0": 4, "r_max": 8, "check_every": 4, "warmup_steps": 4, "criterion": "threshold", "tol": 0.0},
        "method": {"name": method},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return RunConfig.from_dict(raw)



def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def bert_base(tmp_path, bert_tok):
    return saved(tiny_bert(vocab_size=len(bert_tok)), bert_tok, tmp_path / "base")


def test_lora_method_trains_a_fixed_rank_without_controller(tmp_path, glue_dir, bert_tok, bert_base):
    # the adarank settings would grow at every check (tol 0 threshold); method lora ignores them
    run = Run(method_cfg(tmp_path, glue_dir, bert_base, "lora"), model=tiny_bert(vocab_size=len(bert_tok)), tokenizer=bert_tok)
    assert run.controller is None
    results = run.train()
    assert results["method"] == "lora" and results["rank_events"] == [] and results["growth_events"] == 0
    assert results["rank_schedule"] == [4] and set(results["final_ranks"].values()) == {4}
    assert results["steps"] == 20 and results["step_time_s"] > 0
    # the one checkpoint (at the last step) holds the fixed-rank adapter and the head
    ckpts = os.listdir(os.path.join(results["config"]["train"]["output_dir"], "checkpoints"))
    assert ckpts == ["step-00000020"] and results["checkpoint_time_s"] > 0


def test_head_only_leaves_the_backbone_untouched(tmp_path, glue_dir, bert_tok, bert_base):
    run = Run(method_cfg(tmp_path, glue_dir, bert_base, "head"), model=tiny_bert(vocab_size=len(bert_tok)), tokenizer=bert_tok)
    before = params(run.raw_model)
    trainable = {n for n, p in run.raw_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("classifier.") for n in trainable)
    results = run.train()
    after = params(run.raw_model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable
    assert results["trainable_params_final"] == sum(before[n].numel() for n in trainable)
    assert results["final_rank"] == 0 and results["final_ranks"] == {}


def test_full_finetuning_trains_every_parameter(tmp_path, glue_dir, bert_tok, bert_base):
    run = Run(method_cfg(tmp_path, glue_dir, bert_base, "full"), model=tiny_bert(vocab_size=len(bert_tok)), tokenizer=bert_tok)
    before = params(run.raw_model)
    results = run.train()
    after = params(run.raw_model)
    assert results["trainable_params_final"] == sum(p.numel() for p in before.values())
    # every weight matrix moved (embeddings of tokens that never occur may not)
    moved = [n for n in before if before[n].ndim == 2 and "embeddings" not in n]
    assert moved and all(not torch.equal(before[n], after[n]) for n in moved)


def test_adalora_allocates_its_budget_with_update_and_allocate(tmp_path, glue_dir, bert_tok, bert_base):
    cfg = method_cfg(tmp_path, glue_dir, bert_base, "adalora",
                     adalora={"init_r": 6, "target_r": 2, "tinit_ratio": 0.1, "tfinal_ratio": 0.3, "delta_t": 2})
    run = Run(cfg, model=tiny_bert(vocab_size=len(bert_tok)), tokenizer=bert_tok)
    peft_cfg = run.raw_model.peft_config["default"]
    assert peft_cfg.total_step == 20 and (peft_cfg.tinit, peft_cfg.tfinal, peft_cfg.deltaT) == (2, 6, 2)
    assert set(adalora_ranks(run.raw_model).values()) == {6}
    results = run.train()
    ranks = adalora_ranks(run.raw_model)
    # the budget is target_r per module on average: 4 modules (2 layers x query, value) x 2
    assert len(ranks) == 4 and sum(ranks.values()) == 2 * len(ranks) and results["final_ranks"] == ranks
    # the masked singular values are exactly the zero ones
    for name, module in run.raw_model.named_modules():
        if name in ranks:
            assert int(torch.count_nonzero(module.lora_E["default"])) == ranks[name]
    assert results["final_rank"] == max(ranks.values()) and results["method"] == "adalora"


def test_eval_loss_is_the_task_loss_without_adalora_regularizer(tmp_path, glue_dir, bert_tok, bert_base):
    cfg = method_cfg(tmp_path, glue_dir, bert_base, "adalora", adalora={"orth_reg_weight": 10.0})
    run = Run(cfg, model=tiny_bert(vocab_size=len(bert_tok)), tokenizer=bert_tok)
    metrics = run.evaluate()
    model = run.raw_model
    model.eval()
    total, n, with_reg = 0.0, 0, 0.0
    with torch.no_grad():
        for batch in run.eval_loader:
            batch = dict(batch)
            batch.pop("class_label", None)
            out = model(**batch)
            total += F.cross_entropy(out.logits, batch["labels"], reduction="sum").item()
            with_reg += out.loss.item() * len(batch["labels"])
            n += len(batch["labels"])
    assert metrics["eval_loss"] == pytest.approx(total / n, rel=1e-5)
    assert with_reg / n > total / n + 1e-3  # PEFT's out.loss carries the regularizer; ours does not


def test_zero_shot_evaluates_a_text_to_text_model_without_training(tmp_path, glue_dir, t5_tok):
    base = saved(tiny_t5(vocab_size=len(t5_tok)), t5_tok, tmp_path / "t5")
    cfg = method_cfg(tmp_path, glue_dir, base, "zero_shot")
    cfg.model.max_target_length = 4
    model = tiny_t5(vocab_size=len(t5_tok))
    before = params(model)
    results = Run(cfg, model=model, tokenizer=t5_tok).train()
    assert results["steps"] == 0 and results["method"] == "zero_shot" and len(results["evals"]) == 1
    assert results["final"]["n"] == 32
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["zero_shot", "head"])
def test_methods_that_do_not_fit_the_model_are_refused(tmp_path, glue_dir, bert_tok, t5_tok, method):
    if method == "zero_shot":  # a classifier's head is untrained
        base, model, tok = tmp_path / "b", tiny_bert(vocab_size=len(bert_tok)), bert_tok
    else:  # a text-to-text model has no classification head
        base, model, tok = tmp_path / "t", tiny_t5(vocab_size=len(t5_tok)), t5_tok
    saved(copy.deepcopy(model), tok, base)
    with pytest.raises(ModelError, match=f"method.name={method}"):
        Run(method_cfg(tmp_path, glue_dir, base, method), model=model, tokenizer=tok)


def test_method_and_adalora_fields_are_checked():
    with pytest.raises(ConfigError, match="method.name must be one of"):
        RunConfig.from_dict({"method": {"name": "qlora"}})
    with pytest.raises(ConfigError, match="adalora.target_r"):
        RunConfig.from_dict({"adalora": {"init_r": 4, "target_r": 8}})
    with pytest.raises(ConfigError, match="tinit_ratio \\+ adalora.tfinal_ratio"):
        RunConfig.from_dict({"adalora": {"tinit_ratio": 0.6, "tfinal_ratio": 0.4}})


def test_extends_merges_sections_field_by_field(tmp_path):
    (tmp_path / "_base.yaml").write_text("train: {lr: 0.001, epochs: 1}\nadarank: {r0: 4}\n")
    (tmp_path / "m.yaml").write_text("extends: _base.yaml\ntrain: {lr: 0.0001}\nmethod: {name: full}\n")
    cfg = load_config(str(tmp_path / "m.yaml"), ["train.epochs=2"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.adarank.r0, cfg.method.name) == (1e-4, 2, 4, "full")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(str(tmp_path / "c.yaml"))


def test_adalora_runs_export_merged_but_not_as_lora(tmp_path, glue_dir, bert_tok, bert_base):
    from adarank.export import export_adapter

    cfg = method_cfg(tmp_path, glue_dir, bert_base, "adalora", train={"save_model": True})
    Run(cfg, model=tiny_bert(vocab_size=len(bert_tok)), tokenizer=bert_tok).train()
    with pytest.raises(ValueError, match="not LoRA"):
        export_adapter(cfg.train.output_dir, str(tmp_path / "peft"))
    assert not (tmp_path / "peft").exists()
    log = export_adapter(cfg.train.output_dir, str(tmp_path / "merged"), merged=True)
    assert log["format"] == "merged" and log["max_abs_logit_diff"] < 1e-4
