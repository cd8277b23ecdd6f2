import torch
from test_surgery import bert_inputs, bert_lora, randomize_b

from adarank.importance import ImportanceTracker
from adarank.surgery import lora_layers


def test_scores_follow_the_gradients():
    model = bert_lora()
    randomize_b(model)
    model.train()
    model(**bert_inputs(), labels=torch.tensor([0, 1, 1])).loss.backward()
    for kind in ("grad_norm", "sensitivity"):
        t = ImportanceTracker(kind)
        t.update(model)
        t.update(model)
        for name, layer in lora_layers(model):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            one = (a.grad.pow(2).sum() + b.grad.pow(2).sum()) if kind == "grad_norm" else ((a * a.grad).abs().sum() + (b * b.grad).abs().sum())
            torch.testing.assert_close(t.scores[name], 2 * one)
        names = list(t.scores)
        best = max(names, key=lambda n: float(t.scores[n]))
        assert t.top(1, names) == [best] and len(t.top(3, names)) == 3
        assert t.top(2, names[1:]) == sorted(names[1:], key=lambda n: -float(t.scores[n]))[:2]
        t.reset()
        assert t.scores == {}
