"""GLUE metrics (scikit-learn, SciPy) and robust decoding of generated text to labels or scores."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Sequence

from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

if TYPE_CHECKING:
    from .tasks import TaskSpec

UNDECODABLE = -1
UNDECODABLE_SCORE = -1.0  # what an undecodable STS-B output counts as (outside [0, 5]: wrong), as in T5's code


def _norm(text: str) -> str:
    text = text.lower().replace("_", " ").replace("-", " ")
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def decode_label(text: str, target_words: Sequence[str]) -> int:
    """The label id whose target word the generated text spells, ignoring case, whitespace, punctuation
    and `_`/`-` separators (`Not_Equivalent.` -> "not equivalent"); UNDECODABLE (-1) otherwise."""
    norm = _norm(text)
    for label, word in enumerate(target_words):
        if norm == _norm(word):
            return label
    return UNDECODABLE


def decode_score(text: str, score_max: float = 5.0) -> float | None:
    """The STS-B score a generated text writes ("3.8", " 4 "), or None when it is not one number in
    [0, score_max]."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and 0.0 <= value <= score_max else None


def classification_metrics(labels: Sequence[int], preds: Sequence[int], num_labels: int, positive_label: int = 1,
                           f1_name: str = "f1_pos") -> dict:
    """accuracy; f1_macro (macro over classes, what the original reports); `f1_name` (F1 of the
    positive class, GLUE's MRPC F1 — the name says which class, e.g. f1_equivalent); mcc (Matthews
    correlation, GLUE's CoLA metric); undecodable (predictions that matched no label; counted wrong)."""
    labels, preds = list(map(int, labels)), list(map(int, preds))
    classes = list(range(num_labels))
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1_macro": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        f1_name: float(f1_score(labels, preds, labels=[positive_label], average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, preds)),
        "undecodable": sum(p == UNDECODABLE for p in preds),
        "n": len(labels),
    }


def regression_metrics(labels: Sequence[float], preds: Sequence[float | None]) -> dict:
    """pearson and spearman correlation (SciPy; 0 where the predictions are constant, as a constant
    predictor earns nothing), mse; undecodable outputs (None, or a non-finite prediction) count as
    UNDECODABLE_SCORE and are counted in `undecodable`."""
    from scipy.stats import pearsonr, spearmanr

    preds = [None if v is None or not math.isfinite(v) else v for v in preds]  # a diverged regressor's NaN too
    undecodable = sum(p is None for p in preds)
    y = [float(v) for v in labels]
    p = [UNDECODABLE_SCORE if v is None else float(v) for v in preds]
    constant = len(set(p)) < 2 or len(set(y)) < 2
    return {
        "pearson": 0.0 if constant else float(pearsonr(y, p).statistic),
        "spearman": 0.0 if constant else float(spearmanr(y, p).statistic),
        "mse": sum((a - b) ** 2 for a, b in zip(y, p)) / max(1, len(y)),
        "undecodable": undecodable,
        "n": len(y),
    }


def task_metrics(task: "TaskSpec", labels: Sequence, preds: Sequence) -> dict:
    """The task's metrics and `score`: its GLUE headline (the mean of `task.headline`: MRPC accuracy and
    F1, STS-B Pearson and Spearman, CoLA MCC, the others accuracy)."""
    if task.regression:
        metrics = regression_metrics(labels, preds)
    else:
        metrics = classification_metrics(labels, preds, task.num_labels, task.positive_label, task.f1_name)
    metrics["score"] = sum(metrics[k] for k in task.headline) / len(task.headline)
    return metrics
