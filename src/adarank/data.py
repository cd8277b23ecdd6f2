"""GLUE data from the hub or a local HF-layout directory, tokenized once, batched by length.

Local layout: `<data_dir>/<task>/<split>.jsonl`, one JSON object per line with HF glue's fields and
integer labels. Every problem is reported with the file and line.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

from .tasks import TaskSpec, format_score


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


def load_split(task: TaskSpec, split: str, data_dir: str | None = None, limit: int | None = None) -> list[dict]:
    """Examples of one split as dicts with the task's text fields and an int `label`."""
    if data_dir is None:
        rows = _load_hub(task, split)
        return [_check_row(dict(r), task, f"hub glue/{task.name}/{split}", i + 1) for i, r in enumerate(rows)][:limit]
    path = os.path.join(data_dir, task.name, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected the HF glue layout <data_dir>/<task>/<split>.jsonl)")
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON: {exc.msg}") from None
            rows.append(_check_row(row, task, path, lineno))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def dev_split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(rest, dev): a stratified `fraction` of `rows` held out as the development split (scikit-learn's
    `train_test_split` stratified by label — a regression score by its nearest whole number —,
    `random_state=seed`); both keep the file's order."""
    from sklearn.model_selection import train_test_split

    labels = [round(r["label"]) if isinstance(r["label"], float) else r["label"] for r in rows]  # STS-B: by whole score
    counts = {lab: labels.count(lab) for lab in set(labels)}
    n_dev = round(fraction * len(rows))
    if min(counts.values()) < 2 or not len(counts) <= n_dev <= len(rows) - len(counts):
        raise DataError(f"data.dev_fraction={fraction}: cannot hold out a stratified development split of {n_dev} "
                        f"from {len(rows)} training examples with label counts {dict(sorted(counts.items()))}")
    rest, dev = train_test_split(range(len(rows)), test_size=n_dev, stratify=labels, random_state=seed)
    return [rows[i] for i in sorted(rest)], [rows[i] for i in sorted(dev)]


def load_train_eval(task: TaskSpec, data: Any) -> tuple[list[dict], list[dict]]:
    """The training and evaluation examples a run uses (`data`: a `DataConfig`): the whole training split
    and the task's validation split, or (eval_split "dev") the training split without its development
    split, and the development split. The limits apply after the split."""
    if data.eval_split == "dev":
        rest, dev = dev_split(load_split(task, "train", data.data_dir), data.dev_fraction, data.dev_seed)
        return rest[: data.max_train_samples], dev[: data.max_eval_samples]
    return (load_split(task, "train", data.data_dir, data.max_train_samples),
            load_split(task, task.eval_split, data.data_dir, data.max_eval_samples))


def _load_hub(task: TaskSpec, split: str) -> Any:
    """`datasets.load_dataset("glue", task)`; when the hub cannot be reached (and HF_DATASETS_OFFLINE /
    HF_HUB_OFFLINE do not ask for the local cache) one quick request says so at once, instead of the
    minute of retries `datasets` spends before its ConnectionError."""
    import datasets
    from huggingface_hub import constants

    hint = ("data.data_dir is null, so GLUE is read from the Hugging Face hub, which {}; set data.data_dir "
            "(or --data-dir) to a local copy in the HF glue layout <dir>/<task>/<split>.jsonl")
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if not offline:
        from huggingface_hub.utils import get_session

        try:
            get_session().head(constants.ENDPOINT, timeout=10)
        except Exception as exc:  # any transport error: DNS, refused, timeout, proxy
            raise DataError(hint.format(f"cannot be reached ({_why(exc)})")) from None
    try:
        return datasets.load_dataset("glue", task.name, split=split)
    except (ConnectionError, OSError) as exc:
        raise DataError(hint.format(f"failed ({_why(exc)})")) from None


def _why(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _check_row(row: Any, task: TaskSpec, path: str, lineno: int) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    for f in task.text_fields:
        if f not in row:
            raise DataError(f"{path}:{lineno}: missing field '{f}' (task {task.name} needs {list(task.text_fields)} and 'label')")
        if not isinstance(row[f], str):
            raise DataError(f"{path}:{lineno}: field '{f}' must be a string")
    if "label" not in row:
        raise DataError(f"{path}:{lineno}: missing field 'label'")
    label = row["label"]
    if task.regression:
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= label <= task.score_max:
            raise DataError(f"{path}:{lineno}: label {label!r} for task {task.name} must be a number in "
                            f"[0, {task.score_max:g}]")
        return {**{f: row[f] for f in task.text_fields}, "label": float(label)}
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < task.num_labels:
        raise DataError(
            f"{path}:{lineno}: unknown label {label!r} for task {task.name} (expected 0..{task.num_labels - 1}: "
            f"{', '.join(task.label_names)})"
        )
    return {**{f: row[f] for f in task.text_fields}, "label": label}


KINDS = ("classifier", "seq2seq", "causal_lm")
EXTRAS = ("class_label", "prompt_len")  # batch entries for evaluation, not for the model


def as_kind(kind: bool | str) -> str:
    """A model kind: "classifier" (encoder + head), "seq2seq" (T5-style text-to-text) or "causal_lm"
    (decoder-only text-to-text); a bool means seq2seq (True) or classifier (False)."""
    if isinstance(kind, bool):
        return "seq2seq" if kind else "classifier"
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {list(KINDS)}, got {kind!r}")
    return kind


def causal_targets(task: TaskSpec, tokenizer: Any, max_target_length: int) -> list[list[int]]:
    """Per label: the target word's tokens after the prompt (" word", then the end-of-sequence token)."""
    eos = tokenizer.eos_token_id
    return [tokenizer(" " + w, add_special_tokens=False)["input_ids"][: max_target_length - 1] + [eos]
            for w in task.target_words]


def check_causal(task: TaskSpec, tokenizer: Any, model_config: Any) -> list[list[int]]:
    """The causal-LM targets, checked before any step: an end-of-sequence token to end them, different
    targets for different labels, and room for a prompt within model.max_length."""
    if task.regression:
        raise DataError(f"data.task={task.name} is a regression task; a causal LM is evaluated here by comparing the "
                        "likelihoods of the class words, so use an encoder (a regression head) or a seq2seq model")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no end-of-sequence token; a causal LM's target words need one after them")
    targets = causal_targets(task, tokenizer, model_config.max_target_length)
    same = [(task.label_names[i], task.label_names[j]) for i in range(len(targets)) for j in range(i)
            if targets[i] == targets[j]]
    if same:
        raise DataError(f"model.max_target_length={model_config.max_target_length} makes the targets of "
                        f"{same[0][1]} and {same[0][0]} identical; raise it")
    longest = max(map(len, targets))
    if model_config.max_length - longest < 8:
        raise DataError(f"model.max_length={model_config.max_length} leaves {model_config.max_length - longest} "
                        f"tokens for the prompt after {longest} target tokens; raise it")
    return targets


def tokenize(rows: list[dict], task: TaskSpec, tokenizer: Any, kind: bool | str, max_length: int,
             max_target_length: int) -> list[dict]:
    """Tokenize every example once. Classifiers get the text pair; seq2seq models the prompt as input and
    the target word's token ids (STS-B: the score as text) as `labels`; causal LMs the prompt followed by the target word as input,
    with `labels` -100 on the prompt (the loss is on the target tokens only) and `prompt_len`. The class id
    stays in `class_label` for evaluation."""
    kind = as_kind(kind)
    if kind == "seq2seq":
        enc = tokenizer([task.prompt.format(**r) for r in rows], truncation=True, max_length=max_length)
        if task.regression:  # the score as T5 writes it, per example
            targets = tokenizer([format_score(r["label"]) for r in rows], truncation=True,
                                max_length=max_target_length)["input_ids"]
        else:
            words = tokenizer(list(task.target_words), truncation=True, max_length=max_target_length)["input_ids"]
            targets = [words[r["label"]] for r in rows]
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": target, "class_label": r["label"]}
            for ids, mask, target, r in zip(enc["input_ids"], enc["attention_mask"], targets, rows)
        ]
    if kind == "causal_lm":
        targets = causal_targets(task, tokenizer, max_target_length)
        room = max_length - max(len(t) for t in targets)
        out = []
        for ids, r in zip(tokenizer([task.prompt.format(**r) for r in rows])["input_ids"], rows):
            if len(ids) > room:  # keep the start (a BOS token, the task name) and the end (the cue before the target)
                ids = ids[: room // 2] + ids[len(ids) - (room - room // 2):]
            target = targets[r["label"]]
            out.append({"input_ids": ids + target, "labels": [-100] * len(ids) + target, "prompt_len": len(ids),
                        "class_label": r["label"]})
        return out
    texts = [[r[f] for r in rows] for f in task.text_fields]
    enc = tokenizer(*texts, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": r["label"]} for i, r in enumerate(rows)]


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar length: shuffle, cut into mega-batches of `mega` batches, sort each by
    length, split into batches, shuffle the batch order. Less padding, same data each epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, shuffle: bool = True, mega: int = 50):
        self.lengths, self.batch_size, self.seed, self.shuffle, self.mega = lengths, batch_size, seed, shuffle, mega
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        idx = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(idx)
        size = self.batch_size * self.mega
        batches = []
        for i in range(0, len(idx), size):
            chunk = sorted(idx[i : i + size], key=lambda j: self.lengths[j], reverse=True)
            batches += [chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


def make_collator(tokenizer: Any, kind: bool | str):
    """Dynamic padding: pad to the longest in the batch (labels with -100); the EXTRAS as tensors."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    kind = as_kind(kind)
    if kind == "classifier":
        return DataCollatorWithPadding(tokenizer)
    inner = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100) if kind == "seq2seq" else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        extras = {k: torch.tensor([f[k] for f in features]) for k in EXTRAS if k in features[0]}
        plain = [{k: v for k, v in f.items() if k not in EXTRAS} for f in features]
        if inner is not None:
            batch = inner(plain)
        else:  # causal LM: pad on the right, labels with -100
            width = max(len(f["input_ids"]) for f in plain)
            batch = {"input_ids": torch.tensor([f["input_ids"] + [pad] * (width - len(f["input_ids"])) for f in plain]),
                     "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                                                     for f in plain]),
                     "labels": torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in plain])}
        return {**batch, **extras}

    return collate
