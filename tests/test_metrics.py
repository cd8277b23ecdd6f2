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


def test_mcc_known_values_and_the_all_acceptable_model():
    from adarank import task_metrics

    cola = get_task("cola")
    # tp=1 tn=2 fp=0 fn=1: (1·2 − 0·1) / sqrt((1+0)(1+1)(2+0)(2+1)) = 2/sqrt(12)
    m = task_metrics(cola, [1, 1, 0, 0], [1, 0, 0, 0])
    assert m["mcc"] == pytest.approx(2 / 12 ** 0.5) and m["score"] == m["mcc"]
    # always "acceptable" on CoLA's validation mix (721 of 1043): accuracy 0.691, and MCC 0
    labels = [1] * 721 + [0] * 322
    m = task_metrics(cola, labels, [1] * len(labels))
    assert m["accuracy"] == pytest.approx(721 / 1043) and round(m["accuracy"], 3) == 0.691 and m["mcc"] == 0.0
    assert "f1_acceptable" in m and "f1_pos" not in m


def test_headline_scores_and_f1_names():
    from adarank import task_metrics

    mrpc = task_metrics(get_task("mrpc"), [1, 1, 1, 0], [1, 1, 0, 0])
    assert mrpc["f1_equivalent"] == pytest.approx(0.8) and mrpc["score"] == pytest.approx((0.75 + 0.8) / 2)
    rte = task_metrics(get_task("rte"), [0, 0, 1, 1], [0, 1, 1, 1])  # f1 of entailment (label 0)
    assert rte["f1_entailment"] == pytest.approx(2 / 3) and rte["score"] == rte["accuracy"] == 0.75
    for name in ("wnli", "sst2"):
        assert set(get_task(name).headline) == {"accuracy"}


@pytest.mark.parametrize("text, score", [("3.8", 3.8), (" 4 ", 4.0), ("0.0", 0.0), ("5.0", 5.0), ("5.2", None),
                                         ("-0.2", None), ("nan", None), ("three", None), ("", None), ("3.8 4.0", None)])
def test_decode_score(text, score):
    from adarank import decode_score

    assert decode_score(text) == score


def test_format_score_rounds_to_the_nearest_fifth():
    from adarank.tasks import format_score

    assert [format_score(x) for x in (0.0, 3.75, 3.69, 2.5, 4.9, 5.0, 1.1)] == ["0.0", "3.8", "3.6", "2.4", "4.8", "5.0", "1.2"]


def test_regression_metrics_known_values_and_undecodable():
    from scipy.stats import pearsonr, spearmanr

    from adarank import task_metrics

    stsb = get_task("stsb")
    labels, preds = [0.0, 1.0, 2.5, 4.0, 5.0], [0.4, 1.0, 2.0, 4.4, 4.6]
    m = task_metrics(stsb, labels, preds)
    assert m["pearson"] == pytest.approx(pearsonr(labels, preds).statistic) and m["spearman"] == pytest.approx(1.0)
    assert m["score"] == pytest.approx((m["pearson"] + 1.0) / 2) and m["mse"] == pytest.approx((0.16 * 3 + 0.25) / 5)
    # an undecodable output counts as -1 (wrong), and is reported
    m = task_metrics(stsb, labels, [0.4, None, 2.0, 4.4, 4.6])
    assert m["undecodable"] == 1 and m["spearman"] == pytest.approx(spearmanr(labels, [0.4, -1, 2.0, 4.4, 4.6]).statistic)
    # a constant predictor earns nothing (SciPy would give nan)
    assert task_metrics(stsb, labels, [2.5] * 5)["pearson"] == 0.0


def test_a_diverged_regressor_counts_as_undecodable_not_nan():
    from adarank import task_metrics

    m = task_metrics(get_task("stsb"), [0.0, 2.0, 4.0, 5.0], [float("nan"), 2.0, float("inf"), 4.5])
    assert m["undecodable"] == 2 and all(m[k] == m[k] for k in ("pearson", "spearman", "score", "mse"))  # not NaN
