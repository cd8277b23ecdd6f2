import pytest

from adarank import classification_metrics, decode_label, get_task
from adarank.metrics import UNDECODABLE

WORDS = get_task("mrpc").target_words


@pytest.mark.parametrize(
    "text, label",
    [
        ("equivalent", 1), ("Equivalent", 1), ("  equivalent.  ", 1), ("EQUIVALENT!", 1),
        ("not equivalent", 0), ("Not Equivalent", 0), ("not_equivalent", 0), ("not-equivalent", 0),
        ("not  equivalent .", 0), ("\tnot\nequivalent", 0),
        ("", UNDECODABLE), ("equiv", UNDECODABLE), ("not", UNDECODABLE), ("equivalent equivalent", UNDECODABLE),
        ("yes", UNDECODABLE), ("not equivalent either", UNDECODABLE), ("nonequivalent", UNDECODABLE),
    ],
)
def test_decode_label(text, label):
    assert decode_label(text, WORDS) == label


def test_metrics_against_known_values():
    labels = [1, 1, 1, 0, 0, 1]
    preds = [1, 0, 1, 0, 1, UNDECODABLE]
    m = classification_metrics(labels, preds, num_labels=2, positive_label=1)
    assert m["accuracy"] == pytest.approx(3 / 6)
    # positive class: tp=2, fp=1, fn=2 -> P=2/3, R=1/2, F1=4/7; negative: tp=1, fp=1, fn=1 -> F1=1/2
    assert m["f1_pos"] == pytest.approx(4 / 7)
    assert m["f1_macro"] == pytest.approx((4 / 7 + 1 / 2) / 2)
    assert m["undecodable"] == 1 and m["n"] == 6


def test_task_registry():
    mrpc = get_task("mrpc")
    assert mrpc.prompt.format(sentence1="A", sentence2="B") == "mrpc sentence1: A sentence2: B paraphrase:"
    assert mrpc.target_words == ("not equivalent", "equivalent")
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        get_task("mnli")
