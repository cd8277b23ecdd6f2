
import pytest
import torch
from conftest import tiny_bert, tiny_t5

from adarank import grow_lora, lora_ranks
from adarank.modeling import apply_lora
from adarank.optim import build_optimizer, grow_and_repoint, snapshot_optimizer
from adarank.surgery import MERGED_DELTA_ATTR, lora_layers

STRATEGIES = ["merge", "expand"]


def bert_lora(r=4):
    torch.manual_seed(1)
    return apply_lora(tiny_bert(), kind="classifier", r=r, lora_alpha=2 * r, targets=None, dropout=0.0)


def t5_lora(r=4):
    torch.manual_seed(1)
    return apply_lora(tiny_t5(), kind="seq2seq", r=r, lora_alpha=2 * r, targets=None, dropout=0.0)


def bert_inputs():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(4, 60, (3, 9), generator=g), "attention_mask": torch.ones(3, 9, dtype=torch.long)}


def t5_inputs():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(3, 60, (3, 9), generator=g), "decoder_input_ids": torch.randint(3, 60, (3, 4), generator=g)}


def randomize_b(model):
    """LoRA B starts at zero; give it values so that the invariants are not trivially true."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("build, inputs", [(bert_lora, bert_inputs), (t5_lora, t5_inputs)])
def test_growth_preserves_outputs(build, inputs, strategy):
    model = build()
    randomize_b(model)
    x = inputs()
    before = outputs(model, x)
    grow_lora(model, 10, strategy, seed=0)
    after = outputs(model, x)
    assert set(lora_ranks(model).values()) == {10}
    assert (after - before).abs().max().item() <= 1e-5
    grow_lora(model, 16, strategy, seed=1)
    assert (outputs(model, x) - before).abs().max().item() <= 1e-5


def test_merge_folds_the_update_into_the_base_weight():
    model = bert_lora()
    randomize_b(model)
    expected = {}
    for name, layer in lora_layers(model):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected[name] = layer.get_base_layer().weight.detach() + b.detach() @ a.detach() * layer.scaling["default"]
    grow_lora(model, 6, "merge", seed=0)
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), expected[name], atol=1e-6, rtol=0)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert layer.lora_alpha["default"] == 12 and layer.scaling["default"] == 2.0
    assert len(getattr(model, MERGED_DELTA_ATTR)) == len(list(lora_layers(model)))


def test_merged_delta_accumulates_over_growths_as_low_rank_factors():
    model = bert_lora()
    original = {n: p.detach().clone() for n, p in model.base_model.model.named_parameters() if "base_layer.weight" in n}
    for rank in (6, 8):
        randomize_b(model)
        grow_lora(model, rank, "merge", seed=rank)
    merged = getattr(model, MERGED_DELTA_ATTR)
    for name, w0 in original.items():
        key = name.replace(".base_layer", "")
        now = dict(model.base_model.model.named_parameters())[name].detach()
        entry = merged[key]
        assert [b.shape[1] for b, _, _ in entry.parts] == [4, 6] and entry.rank == 10  # not the layer's size
        torch.testing.assert_close(now - w0, entry.dense(), atol=1e-6, rtol=0)


def test_expand_keeps_the_old_factors():
    model = bert_lora()
    randomize_b(model)
    old = {n: (l.lora_A["default"].weight.detach().clone(), l.lora_B["default"].weight.detach().clone()) for n, l in lora_layers(model)}
    grow_lora(model, 7, "expand", seed=0)
    for name, layer in lora_layers(model):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.shape[0] == 7 and b.shape[1] == 7
        torch.testing.assert_close(a[:4], old[name][0])
        torch.testing.assert_close(b[:, :4], old[name][1])
        assert torch.count_nonzero(b[:, 4:]) == 0 and torch.count_nonzero(a[4:]) > 0


def test_seeded_growth_is_reproducible():
    m1, m2 = bert_lora(), bert_lora()
    grow_lora(m1, 8, "merge", seed=5)
    grow_lora(m2, 8, "merge", seed=5)
    for (_, l1), (_, l2) in zip(lora_layers(m1), lora_layers(m2)):
        assert torch.equal(l1.lora_A["default"].weight, l2.lora_A["default"].weight)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_only_lora_and_head_train_and_new_factors_change_after_a_step(strategy):
    """After growth the optimizer holds exactly the trainable tensors. One step changes every B (and the old
    rows of A); a new A entry faces a zero B column, so its gradient is exactly 0 at that first step (as for
    any fresh LoRA adapter) - it changes at the second step. Frozen weights never change."""
    model = bert_lora()
    randomize_b(model)
    model.train()
    opt = build_optimizer(model, lr=1e-2)
    x = {**bert_inputs(), "labels": torch.tensor([0, 1, 1])}
    model(**x).loss.backward()
    opt.step()
    opt.zero_grad()
    grow_and_repoint(model, opt, 8, strategy, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    new = (slice(4, None), slice(None)) if strategy == "expand" else (slice(None), slice(None))

    def changed(name, p, part):
        sl = part if "lora_A" in name else part[::-1]
        return (p.detach()[sl] != before[name][sl]).all().item()

    model(**x).loss.backward()
    opt.step()
    opt.zero_grad()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            assert changed(n, p, new), f"{n}: new entries did not change after one step"
        if "lora_A" in n and strategy == "merge":
            assert torch.equal(p, before[n]), f"{n}: a fresh A has zero gradient at the first step"
    model(**x).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in before:
            assert changed(n, p, new), f"{n}: new entries did not change after two steps"
        elif n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"


def test_expand_carries_optimizer_state_and_merge_starts_fresh():
    for strategy in STRATEGIES:
        model = bert_lora()
        model.train()
        opt = build_optimizer(model, lr=1e-2)
        model(**bert_inputs(), labels=torch.tensor([0, 1, 1])).loss.backward()
        opt.step()
        snap = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for n, (_, s) in snapshot_optimizer(model, opt).items()}
        grow_and_repoint(model, opt, 6, strategy, seed=0)
        params = dict(model.named_parameters())
        a_name = next(n for n in params if "lora_A" in n)
        head = next(n for n in params if "classifier" in n and params[n].requires_grad)
        torch.testing.assert_close(opt.state[params[head]]["exp_avg"], snap[head]["exp_avg"])  # untouched params keep state
        if strategy == "expand":
            st = opt.state[params[a_name]]
            torch.testing.assert_close(st["exp_avg"][:4], snap[a_name]["exp_avg"])
            assert torch.count_nonzero(st["exp_avg"][4:]) == 0
        else:
            assert params[a_name] not in opt.state


def test_cannot_shrink_and_unknown_strategy():
    model = bert_lora(r=8)
    with pytest.raises(ValueError, match="below the current rank"):
        grow_lora(model, 4, "merge")
    with pytest.raises(ValueError, match="strategy"):
        grow_lora(model, 10, "sideways")


def test_peft_config_follows_growth():
    model = bert_lora()
    grow_lora(model, 12, "expand", seed=0)
    cfg = model.peft_config["default"]
    assert cfg.r == 12 and cfg.lora_alpha == 24 and not cfg.rank_pattern
