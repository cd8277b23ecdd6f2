"""Low-precision and quantized bases: a bf16 base and bitsandbytes 4-bit/8-bit bases (on the CPU) grow under
every strategy without changing the function; merge leaves them untouched (its update is applied beside, in
fp32), so that the model that reloads and exports is the model that trained."""

import json
import os

import pytest
import torch
from conftest import saved, tiny_bert

from adarank import RunConfig, load_run_model
from adarank.export import export_adapter
from adarank.optim import build_optimizer, grow_and_repoint
from adarank.merged import merges_beside, set_beside
from adarank.surgery import MERGED_DELTA_ATTR, allocate_masked, lora_layers
from adarank.train import Run

IDS = torch.tensor([[5, 9, 3, 17, 22, 8], [4, 4, 30, 2, 11, 1]])


def bert128(vocab_size=64):
    """bitsandbytes' 4-bit CPU kernels want rows in blocks of 64: a tiny BERT of width 128."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def run_config(tmp_path, glue_dir, base, **model):
    return RunConfig.from_dict({
        "model": {"name_or_path": str(base), "max_length": 48, **model},
        "data": {"task": "mrpc", "data_dir": glue_dir},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 10, "batch_size": 8, "lr": 5e-3, "seed": 0,
                  "logging_steps": 2},
        "adarank": {"r0": 2, "r_max": 8, "check_every": 3, "warmup_steps": 3, "criterion": "threshold", "tol": 0.0,
                    "strategy": "merge"},
    })


def test_a_bf16_run_with_merge_reloads_and_exports_as_the_model_that_trained(tmp_path, glue_dir, bert_tok):
    base = tmp_path / "bf16"
    saved(tiny_bert(vocab_size=len(bert_tok)).to(torch.bfloat16), bert_tok, base)
    run = Run(run_config(tmp_path, glue_dir, base))
    frozen = {n: p.detach().clone() for n, p in run.raw_model.named_parameters() if "base_layer.weight" in n}
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    results = run.train()
    assert results["rank_schedule"] == [2, 4, 6, 8]
    model = run.raw_model
    assert all(merges_beside(layer) for _, layer in lora_layers(model))
    after = dict(model.named_parameters())
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)  # merge never rounded into the bf16 weights
    assert all(e.beside and e.rank == 2 + 4 + 6 for e in getattr(model, MERGED_DELTA_ATTR).values())
    trained = logits(model)

    reloaded, _ = load_run_model(str(tmp_path / "run" / "model"))
    assert torch.equal(logits(reloaded), trained)
    log = export_adapter(str(tmp_path / "run"), str(tmp_path / "export"))
    for _, layer in lora_layers(model):  # what the merged updates contribute: far more than the export's error
        set_beside(layer, None)
    contribution = float((logits(model) - trained).abs().max())
    assert contribution > 0 and log["max_abs_logit_diff"] <= contribution / 10  # an export without them would not
    print(f"bf16 base, merge: reloaded logit difference 0, exported {log['max_abs_logit_diff']:.2e} "
          f"(the merged updates move the logits by {contribution:.2e})")


def test_a_bf16_decoder_merges_beside_its_conv1d_layers_and_exports_merged(tmp_path, glue_dir):
    """GPT-2 (Conv1D, stored in x out) in bf16: merged updates act beside it; the --merged export folds them in."""
    from conftest import tiny_gpt2, word_tokenizer

    tok = word_tokenizer("gpt")
    base = saved(tiny_gpt2(vocab_size=len(tok)).to(torch.bfloat16), tok, tmp_path / "gpt2")
    cfg = run_config(tmp_path, glue_dir, base)
    cfg.model.max_target_length = 4
    run = Run(cfg)
    assert run.train()["rank_schedule"] == [2, 4, 6, 8]
    assert all(type(layer.get_base_layer()).__name__ == "Conv1D" and merges_beside(layer)
               for _, layer in lora_layers(run.raw_model))
    trained = logits(run.raw_model)
    assert torch.equal(logits(load_run_model(str(tmp_path / "run" / "model"))[0]), trained)
    log = export_adapter(str(tmp_path / "run"), str(tmp_path / "merged"), merged=True)
    assert log["format"] == "merged" and log["max_abs_logit_diff"] <= 5e-2  # bf16 weights, rounded once


@pytest.mark.parametrize("strategy", ["merge", "expand", "masked"])
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_growth_on_a_quantized_base_keeps_the_function_and_trains(tmp_path, kind, strategy):
    from peft import LoraConfig, get_peft_model

    from adarank.modeling import load_base_model

    bert128().save_pretrained(tmp_path / "base")
    model, _ = load_base_model(str(tmp_path / "base"), 2, quantization=kind)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    layer = next(layer for _, layer in lora_layers(model))
    assert type(layer.get_base_layer()).__name__ == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[kind]
    with torch.no_grad():
        for _, lay in lora_layers(model):
            lay.lora_B["default"].weight.normal_(0, 0.3)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    before = logits(model)
    if strategy == "masked":
        allocate_masked(model, 8)
    optimizer = build_optimizer(model, 1e-2)
    for step, rank in ((1, 4), (2, 6)):
        grow_and_repoint(model, optimizer, rank, strategy, seed=step)
        assert (logits(model) - before).abs().max() <= 1e-5
    after = dict(model.named_parameters())
    assert all(torch.equal(packed[n], after[n]) for n in packed)  # the quantized weights are never touched
    model.train()
    model(input_ids=IDS, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    assert (logits(model) - before).abs().max() > 1e-4  # and it trains


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_adarank_train_on_a_quantized_base_with_merge(tmp_path, glue_dir, bert_tok, kind):
    base = saved(bert128(vocab_size=len(bert_tok)), bert_tok, tmp_path / "base")
    run = Run(run_config(tmp_path, glue_dir, base, quantization=kind))
    results = run.train()
    assert results["rank_schedule"] == [2, 4, 6, 8] and results["status"] == "complete"
    trained = logits(run.raw_model)
    reloaded, _ = load_run_model(str(tmp_path / "run" / "model"))
    assert torch.equal(logits(reloaded), trained)
    with open(os.path.join(tmp_path, "run", "model", "adarank_model.json")) as fh:
        assert json.load(fh)["quantization"] == kind
