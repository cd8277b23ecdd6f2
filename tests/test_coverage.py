"""Rank growth wherever PEFT LoRA runs: GPT-2's Conv1D (fan_in_fan_out), LLaMA, rsLoRA, DoRA and lora_bias
keep the function exactly; what growth cannot keep exactly is refused before the first step."""

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

from adarank.export import write_adapter
from adarank.optim import build_optimizer, grow_and_repoint
from adarank.surgery import allocate_masked, check_growable, grow_lora, lora_layers, lora_ranks

STRATEGIES = ["merge", "expand", "masked"]


MODELS = {  # name: (base builder, LoraConfig kwargs)
    "gpt2_conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "bert_rslora": (lambda seed=0: tiny_bert(seed=seed), dict(target_modules=["query", "value"], use_rslora=True)),
    "bert_dora": (lambda seed=0: tiny_bert(seed=seed), dict(target_modules=["query", "value"], use_dora=True)),
    "bert_lora_bias": (lambda seed=0: tiny_bert(seed=seed), dict(target_modules=["query", "value"], lora_bias=True)),
}


def peft_model(name, r=2):
    from peft import LoraConfig, get_peft_model

    build, kwargs = MODELS[name]
    model = get_peft_model(build(), LoraConfig(r=r, lora_alpha=2 * r, **kwargs))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B (and a lora_bias) away from zero
        for _, layer in lora_layers(model):
            b = layer.lora_B["default"]
            b.weight.copy_(torch.randn(b.weight.shape, generator=gen) * 0.3)
            if b.bias is not None:
                b.bias.copy_(torch.randn(b.bias.shape, generator=gen) * 0.3)
    return model.eval()


def logits(model):
    ids = torch.tensor([[5, 9, 3, 17, 22, 8], [4, 4, 30, 2, 11, 1]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def supported(name, strategy):
    return not (strategy == "merge" and name in ("bert_dora", "bert_lora_bias"))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_growth_keeps_logits_twice_and_exports_to_plain_peft(tmp_path, name, strategy):
    from peft import PeftModel

    model = peft_model(name)
    if not supported(name, strategy):
        with pytest.raises(ValueError, match=r"with strategy merge.*; use expand or masked"):
            check_growable(model, strategy)
        return
    check_growable(model, strategy)
    before = logits(model)
    if strategy == "masked":
        allocate_masked(model, 8)
        torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    optimizer = build_optimizer(model, 1e-3)
    for step, rank in ((1, 4), (2, 7)):
        grow_and_repoint(model, optimizer, rank, strategy, seed=step)
        assert set(lora_ranks(model).values()) == {rank}
        assert (logits(model) - before).abs().max() <= 1e-5, f"growth to {rank} changed the logits"
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    write_adapter(model, str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(MODELS[name][0](), str(tmp_path / "adapter")).eval()
    assert (logits(reloaded) - before).abs().max() <= 1e-4


def test_rslora_keeps_its_scaling_and_alpha_follows_the_square_root_of_r():
    model = peft_model("bert_rslora")
    layer = next(layer for _, layer in lora_layers(model))
    scaling = layer.scaling["default"]
    grow_lora(model, 8, "expand", seed=0)
    assert layer.use_rslora["default"] and layer.scaling["default"] == scaling
    assert layer.lora_alpha["default"] == pytest.approx(scaling * 8**0.5)


def unsupported_setups():
    """(description, the user's PEFT model, strategy, expected message)."""
    from peft import LoraConfig, get_peft_model

    def lora(**kwargs):
        return get_peft_model(tiny_bert(), LoraConfig(r=2, lora_alpha=4, **{"target_modules": ["query", "value"], **kwargs}))

    two = lora()
    two.add_adapter("second", LoraConfig(r=2, target_modules=["query"]))
    other = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]), adapter_name="mine")
    merged = lora()
    merged.base_model.merge_adapter()
    return [
        ("DoRA with merge", lora(use_dora=True), "merge", "DoRA with strategy merge"),
        ("lora_bias with merge", lora(lora_bias=True), "merge", "lora_bias with strategy merge"),
        ("two adapters", two, "expand", "one LoRA adapter named 'default'; the model has ['default', 'second']"),
        ("an adapter not called default", other, "expand", "the model has ['mine']"),
        ("a merged layer", merged, "expand", "merged into the base weight"),
        ("LoRA on the embeddings", lora(target_modules=["word_embeddings", "query"]), "expand", "LoRA on an embedding"),
        ("not LoRA", get_peft_model(tiny_bert(), __import__("peft").IA3Config(target_modules=["query"],
                                                                            feedforward_modules=[])), "expand",
         "needs a LoRA adapter"),
        ("another LoRA variant (aLoRA)", lora(alora_invocation_tokens=[3]), "expand", "LoRA variant"),
        ("PiSSA, which rewrites the base", lora(init_lora_weights="pissa"), "expand", "rewrites the base weights"),
    ]


def test_unsupported_setups_are_refused_at_attach_before_any_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    from adarank import AdaRankCallback, AdaRankConfig

    for what, model, strategy, message in unsupported_setups():
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
        with pytest.raises(ValueError, match="AdaRankCallback: .*" + __import__("re").escape(message)):
            AdaRankCallback(AdaRankConfig(r0=2, r_max=8, strategy=strategy)).attach(trainer)
        after = dict(model.named_parameters())
        assert all(torch.equal(weights[n], after[n]) for n in weights), what


def test_our_loop_refuses_what_it_cannot_grow_before_writing_anything(tmp_path, glue_dir, bert_tok, capsys):
    from conftest import saved

    from adarank.cli import main

    base = saved(tiny_bert(vocab_size=len(bert_tok)), bert_tok, tmp_path / "base")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: '{base}', max_length: 48}}\ndata: {{task: mrpc, data_dir: '{glue_dir}'}}\n"
                      "adarank: {use_dora: true, strategy: merge}\n")
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--output-dir", str(out)]) == 2
    assert ("adarank: base_model.model.bert.encoder.layer.0.attention.self.query: DoRA with strategy merge"
            in capsys.readouterr().err)
    assert not out.exists()
    grow = ["--set", "adarank.strategy=expand", "--set", "adarank.use_rslora=true", "--set", "train.max_steps=6",
            "--set", "adarank.check_every=2", "--set", "adarank.warmup_steps=2", "--set", "adarank.criterion=threshold",
            "--set", "adarank.tol=0"]
    assert main(["train", "--config", str(config), "--output-dir", str(out), *grow]) == 0  # DoRA + rsLoRA grow
    import json

    assert json.loads((out / "results.json").read_text())["rank_schedule"] == [4, 6, 8]
