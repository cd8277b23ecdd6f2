"""Decoder-only causal LMs (GPT-2, LLaMA): GLUE as the prompt followed by the target words, the loss on the
target tokens only, evaluation by which label's target words are likeliest after the prompt; through our
loop (`adarank train`) and through a plain HF Trainer with the callback."""

import json
import os

import pytest
import torch
from conftest import saved, tiny_gpt2, tiny_llama, word_tokenizer

from adarank import AdaRankConfig, RunConfig, get_task, load_run_model
from adarank.data import causal_targets, load_split, make_collator, tokenize
from adarank.export import export_adapter
from adarank.modeling import model_kind
from adarank.train import Run

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture
def gpt_tok():
    return word_tokenizer("gpt")


def test_the_kind_of_a_model_decides_how_it_learns_a_task():
    from transformers import (BertConfig, GPT2Config, GPT2ForSequenceClassification, LlamaConfig, RobertaConfig,
                              T5Config, XLNetConfig)

    assert [model_kind(c()) for c in (GPT2Config, LlamaConfig, BertConfig, RobertaConfig, T5Config, XLNetConfig)] == [
        "causal_lm", "causal_lm", "classifier", "classifier", "seq2seq", "classifier"]
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    assert model_kind(config, GPT2ForSequenceClassification(config)) == "classifier"  # a model passed in: its class


def test_causal_targets_that_cannot_work_are_refused_before_any_step(tmp_path, glue_dir, gpt_tok):
    from adarank.data import DataError

    base = saved(tiny_gpt2(vocab_size=len(gpt_tok)), gpt_tok, tmp_path / "gpt2")
    for overrides, message in (({"max_target_length": 1}, "makes the targets of not_equivalent and equivalent identical"),
                               ({"max_length": 10}, "tokens for the prompt after")):
        cfg = run_config(tmp_path, glue_dir, base, "expand")
        for k, v in overrides.items():
            setattr(cfg.model, k, v)
        with pytest.raises(DataError, match=message):
            Run(cfg)
        assert not os.path.exists(cfg.train.output_dir)


def test_causal_examples_put_the_loss_on_the_target_words_only(gpt_tok, glue_dir):
    task = get_task("mrpc")
    rows = load_split(task, "train", glue_dir)[:4]
    examples = tokenize(rows, task, gpt_tok, "causal_lm", 48, 4)
    targets = causal_targets(task, gpt_tok, 4)
    word = gpt_tok(" not equivalent", add_special_tokens=False)["input_ids"]
    assert len(word) == 2 and targets[0] == word + [gpt_tok.eos_token_id]
    for ex, row in zip(examples, rows):
        prompt = ex["input_ids"][: ex["prompt_len"]]
        assert prompt == gpt_tok(task.prompt.format(**row))["input_ids"]
        assert ex["input_ids"][ex["prompt_len"]:] == targets[row["label"]] == ex["labels"][ex["prompt_len"]:]
        assert set(ex["labels"][: ex["prompt_len"]]) == {-100}
    short = tokenize(rows, task, gpt_tok, "causal_lm", 12, 4)[0]  # a prompt cut to fit keeps its cue at the end
    cue = gpt_tok("paraphrase:", add_special_tokens=False)["input_ids"]
    assert len(short["input_ids"]) <= 12 and short["input_ids"][short["prompt_len"] - len(cue): short["prompt_len"]] == cue


def run_config(tmp_path, glue_dir, base, strategy):
    return RunConfig.from_dict({
        "model": {"name_or_path": str(base), "max_length": 48, "max_target_length": 4},
        "data": {"task": "mrpc", "data_dir": glue_dir},
        "train": {"output_dir": str(tmp_path / f"run_{strategy}"), "max_steps": 12, "batch_size": 8, "lr": 5e-3,
                  "seed": 0, "logging_steps": 2},
        "adarank": {"r0": 2, "r_max": 8, "check_every": 4, "warmup_steps": 4, "criterion": "threshold", "tol": 0.0,
                    "strategy": strategy},
    })


@pytest.mark.parametrize("strategy", ["merge", "expand"])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_adarank_train_on_a_decoder_only_model(tmp_path, glue_dir, gpt_tok, arch, strategy):
    base = saved(BUILDERS[arch](vocab_size=len(gpt_tok)), gpt_tok, tmp_path / arch)
    run = Run(run_config(tmp_path, glue_dir, base, strategy))
    assert run.kind == "causal_lm"
    results = run.train()
    assert results["rank_schedule"] == [2, 4, 6] and results["final"]["n"] == 32
    assert results["final"]["undecodable"] == 0  # scored, never generated
    log = [json.loads(line) for line in open(os.path.join(run.out, "log.jsonl"))]
    assert log[-1]["loss"] < log[0]["loss"]  # the targets are two fixed phrases: it learns them

    # evaluation: the label whose target tokens are likeliest, checked here one (example, label) at a time
    model = run.raw_model.eval()
    batch = next(iter(run.eval_loader))
    predicted = run._likeliest(batch["input_ids"], batch["prompt_len"])
    for ids, plen, pred in zip(batch["input_ids"].tolist(), batch["prompt_len"].tolist(), predicted.tolist()):
        scores = []
        for target in run.targets:
            seq = torch.tensor([ids[:plen] + target])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=seq).logits.float(), -1)[0]
            scores.append(sum(float(logp[plen - 1 + j, t]) for j, t in enumerate(target)))
        assert pred == max(range(len(scores)), key=scores.__getitem__)

    reloaded, _ = load_run_model(os.path.join(run.out, "model"))
    ids = torch.tensor([[4, 9, 12, 30, 7]])
    with torch.no_grad():
        assert (reloaded.eval()(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-5
    assert export_adapter(run.out, str(tmp_path / "export"))["max_abs_logit_diff"] <= 1e-4


def test_the_callback_grows_a_decoder_only_model_in_a_plain_trainer(tmp_path, glue_dir, gpt_tok):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import Trainer, TrainingArguments

    from adarank.callback import AdaRankCallback

    task = get_task("mrpc")
    rows = tokenize(load_split(task, "train", glue_dir), task, gpt_tok, "causal_lm", 48, 4)
    collate = make_collator(gpt_tok, "causal_lm")

    def lm_batch(features):  # the model gets inputs and labels only
        return {k: v for k, v in collate(features).items() if k not in ("class_label", "prompt_len")}

    model = get_peft_model(tiny_llama(vocab_size=len(gpt_tok)), LoraConfig(task_type=TaskType.CAUSAL_LM, r=2,
                                                                            lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    trainer = Trainer(model=model, train_dataset=rows, data_collator=lm_batch,
                      args=TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=8, max_steps=10,
                                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                                             use_cpu=True, remove_unused_columns=False, seed=0))
    callback = AdaRankCallback(AdaRankConfig(r0=2, r_max=8, check_every=3, warmup_steps=3, criterion="threshold",
                                             tol=0.0)).attach(trainer)
    trainer.train()
    assert [(e["step"], e["to_rank"]) for e in callback.events] == [(3, 4), (6, 6), (9, 8)]
    assert callback.losses[-1] < callback.losses[0]
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    with open(out / "adapter_config.json") as fh:
        assert json.load(fh)["task_type"] == "CAUSAL_LM"
