import math

import pytest
import torch
from test_surgery import bert_inputs, bert_lora, outputs, randomize_b, t5_inputs, t5_lora

from adarank import grow_lora, lora_ranks
from adarank.optim import build_optimizer
from adarank.surgery import budget_ranks, energy_rank, lora_layers, prune_lora


def deltas(model):
    return {n: (l.lora_B["default"].weight @ l.lora_A["default"].weight * l.scaling["default"]).detach()
            for n, l in lora_layers(model)}


@pytest.mark.parametrize("build, inputs", [(bert_lora, bert_inputs), (t5_lora, t5_inputs)])
def test_pruning_to_full_rank_leaves_outputs_unchanged(build, inputs):
    model = build(r=6)
    randomize_b(model)
    x = inputs()
    before = outputs(model, x)
    prune_lora(model, rank=6)
    assert (outputs(model, x) - before).abs().max().item() <= 1e-5
    assert set(lora_ranks(model).values()) == {6}


@pytest.mark.parametrize("how", [{"rank": 3}, {"energy": 0.8}, {"budget": 2000}])
def test_frobenius_error_equals_the_dropped_singular_values(how):
    model = bert_lora(r=8)
    randomize_b(model)
    full = deltas(model)
    spectra = {n: torch.linalg.svdvals(d) for n, d in full.items()}
    report = prune_lora(model, **how)
    after = deltas(model)
    for name, rec in report.items():
        k = rec["to_rank"]
        dropped = float(torch.linalg.vector_norm(spectra[name][k:]))
        assert math.isclose(float(torch.linalg.matrix_norm(full[name] - after[name])), dropped, rel_tol=1e-3, abs_tol=1e-5)
        assert math.isclose(rec["error"], dropped, rel_tol=1e-3, abs_tol=1e-5)
        assert lora_ranks(model)[name] == k >= 1


def test_energy_gives_per_module_ranks_and_budget_is_respected():
    model = bert_lora(r=8)
    randomize_b(model)
    with torch.no_grad():  # make one module's update nearly rank one
        name, layer = next(iter(lora_layers(model)))
        layer.lora_B["default"].weight[:, 1:] *= 1e-3
    prune_lora(model, energy=0.95)
    ranks = lora_ranks(model)
    assert ranks[name] == 1 and max(ranks.values()) > 1
    assert model.peft_config["default"].rank_pattern  # per-module ranks are carried for PEFT
    model2 = bert_lora(r=8)
    randomize_b(model2)
    prune_lora(model2, budget=3000)
    cost = sum(k * (l.in_features + l.out_features) for (_, l), k in zip(lora_layers(model2), lora_ranks(model2).values()))
    assert cost <= 3000


def test_energy_and_budget_helpers():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert energy_rank(s, 9 / 14) == 1 and energy_rank(s, 0.65) == 2 and energy_rank(s, 1.0) == 3
    assert energy_rank(torch.zeros(3), 0.9) == 1
    ranks = budget_ranks({"a": (torch.tensor([10.0, 9.0, 1.0]), 10), "b": (torch.tensor([5.0, 4.0]), 10)}, budget=40)
    assert ranks == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="budget"):
        budget_ranks({"a": (torch.tensor([1.0]), 10)}, budget=5)


def test_after_pruning_only_kept_parameters_train_and_training_continues():
    model = bert_lora(r=8)
    randomize_b(model)
    grow_lora(model, 10, "merge", seed=0)  # B = 0: a zero update must not leave a dead adapter
    prune_lora(model, rank=3)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_" in n and p.shape[0 if "lora_A" in n else 1] == 3) or "classifier" in n for n, p in trainable.items())
    model.train()
    opt = build_optimizer(model, lr=1e-2)
    x = {**bert_inputs(), "labels": torch.tensor([0, 1, 1])}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    losses = []
    for _ in range(3):
        loss = model(**x).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())
    assert losses[-1] < losses[0]


def test_prune_arguments():
    model = bert_lora()
    with pytest.raises(ValueError, match="exactly one"):
        prune_lora(model, rank=2, energy=0.9)
    with pytest.raises(ValueError, match="energy"):
        prune_lora(model, energy=1.5)
