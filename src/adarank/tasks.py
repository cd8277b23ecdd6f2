"""GLUE task specs as data: text fields, label names, the text-to-text prompt and target words.

A new classification task is one more `TaskSpec` entry, no code. The text-to-text prompt of MRPC is
the original's, exactly: `mrpc sentence1: {sentence1} sentence2: {sentence2} paraphrase:`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]       # HF glue's ClassLabel names, index = label id
    target_words: tuple[str, ...]      # text-to-text targets, index = label id
    prompt: str                        # text-to-text input, str.format over the text fields
    positive_label: int = 1            # the class of GLUE's usual F1 (MRPC: equivalent)
    eval_split: str = "validation"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


TASKS: dict[str, TaskSpec] = {
    "mrpc": TaskSpec(
        "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("not equivalent", "equivalent"),
        "mrpc sentence1: {sentence1} sentence2: {sentence2} paraphrase:",
    ),
    "rte": TaskSpec(
        "rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("entailment", "not_entailment"),
        "rte sentence1: {sentence1} sentence2: {sentence2}", positive_label=0,
    ),
    "wnli": TaskSpec(
        "wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("not_entailment", "entailment"),
        "wnli sentence1: {sentence1} sentence2: {sentence2}",
    ),
    "cola": TaskSpec(
        "cola", ("sentence",), ("unacceptable", "acceptable"), ("unacceptable", "acceptable"),
        "cola sentence: {sentence}",
    ),
    "sst2": TaskSpec(
        "sst2", ("sentence",), ("negative", "positive"), ("negative", "positive"), "sst2 sentence: {sentence}",
    ),
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"data.task: unknown task {name!r}; known: {sorted(TASKS)}") from None
