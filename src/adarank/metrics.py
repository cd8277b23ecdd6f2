"""Classification metrics (scikit-learn) and robust decoding of generated text to labels."""

from __future__ import annotations

import re
from typing import Sequence

from sklearn.metrics import accuracy_score, f1_score

UNDECODABLE = -1


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


def classification_metrics(labels: Sequence[int], preds: Sequence[int], num_labels: int, positive_label: int = 1) -> dict:
    """accuracy; f1_macro (macro over classes, what the original reports); f1_pos (F1 of the positive
    class, GLUE's usual MRPC F1); undecodable (predictions that matched no label; counted wrong)."""
    labels, preds = list(map(int, labels)), list(map(int, preds))
    classes = list(range(num_labels))
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1_macro": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        "f1_pos": float(f1_score(labels, preds, labels=[positive_label], average="macro", zero_division=0)),
        "undecodable": sum(p == UNDECODABLE for p in preds),
        "n": len(labels),
    }
