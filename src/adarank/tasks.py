"""GLUE task specs as data: text fields, label names, the text-to-text prompt and target words, and the
metrics GLUE scores the task by.

A new classification task is one more `TaskSpec` entry, no code. Text-to-text prompts and targets are
the T5 paper's (`<task> sentence1: ... sentence2: ...`, the label name as the target), except MRPC's by
default, which is the original notebook's exactly: `mrpc sentence1: {sentence1} sentence2: {sentence2}
paraphrase:` -> "equivalent" / "not equivalent", so that results compare with the original's;
`data.prompt_style: t5` gives the T5 paper's for MRPC too (T5_PAPER). STS-B is regression: a similarity
score in [0, 5]; as text, the score rounded to the nearest 0.2 and written with one decimal ("3.8"), as in
the T5 paper.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]       # HF glue's ClassLabel names, index = label id
    target_words: tuple[str, ...]      # text-to-text targets, index = label id
    prompt: str                        # text-to-text input, str.format over the text fields
    positive_label: int = 1            # the class of GLUE's usual F1 (MRPC: equivalent)
    eval_split: str = "validation"
    regression: bool = False           # STS-B: a score in [0, score_max], one output, mean squared error
    headline: tuple[str, ...] = ("accuracy",)  # GLUE's score for the task: the mean of these metrics
    score_max: float = 5.0

    @property
    def num_labels(self) -> int:
        """Outputs of a classifier head: one per class, one for regression."""
        return 1 if self.regression else len(self.label_names)

    @property
    def f1_name(self) -> str:
        """The metric name of the F1 of `positive_label`: `f1_<class name>` (MRPC: f1_equivalent)."""
        return f"f1_{self.label_names[self.positive_label]}"


def format_score(score: float) -> str:
    """An STS-B score as T5 writes it: rounded to the nearest 0.2, one decimal."""
    return f"{round(score * 5) / 5:.1f}"


TASKS: dict[str, TaskSpec] = {
    "mrpc": TaskSpec(
        "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("not equivalent", "equivalent"),
        "mrpc sentence1: {sentence1} sentence2: {sentence2} paraphrase:", headline=("accuracy", "f1_equivalent"),
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
        "cola sentence: {sentence}", headline=("mcc",),
    ),
    "stsb": TaskSpec(
        "stsb", ("sentence1", "sentence2"), (), (), "stsb sentence1: {sentence1} sentence2: {sentence2}",
        regression=True, headline=("pearson", "spearman"),
    ),
    "sst2": TaskSpec(
        "sst2", ("sentence",), ("negative", "positive"), ("negative", "positive"), "sst2 sentence: {sentence}",
    ),
}


# The T5 paper's text-to-text format where the default (the original notebook's) differs: (prompt, targets).
T5_PAPER: dict[str, tuple[str, tuple[str, ...]]] = {
    "mrpc": ("mrpc sentence1: {sentence1} sentence2: {sentence2}", ("not_equivalent", "equivalent")),
}
PROMPT_STYLES = ("original", "t5")


def get_task(name: str, prompt_style: str = "original") -> TaskSpec:
    """The task's spec; `prompt_style` "t5" swaps in the T5 paper's prompt and targets where the default
    differs (MRPC)."""
    try:
        spec = TASKS[name]
    except KeyError:
        raise ValueError(f"data.task: unknown task {name!r}; known: {sorted(TASKS)}") from None
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"data.prompt_style must be one of {list(PROMPT_STYLES)}, got {prompt_style!r}")
    if prompt_style == "t5" and name in T5_PAPER:
        prompt, targets = T5_PAPER[name]
        spec = replace(spec, prompt=prompt, target_words=targets)
    return spec
