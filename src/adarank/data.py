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

from .tasks import TaskSpec


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
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < task.num_labels:
        raise DataError(
            f"{path}:{lineno}: unknown label {label!r} for task {task.name} (expected 0..{task.num_labels - 1}: "
            f"{', '.join(task.label_names)})"
        )
    return {**{f: row[f] for f in task.text_fields}, "label": label}


def tokenize(rows: list[dict], task: TaskSpec, tokenizer: Any, seq2seq: bool, max_length: int, max_target_length: int) -> list[dict]:
    """Tokenize every example once. Encoders get the text pair; seq2seq models the prompt and the target
    word's token ids as `labels` (the class id stays in `class_label` for evaluation)."""
    if seq2seq:
        enc = tokenizer([task.prompt.format(**r) for r in rows], truncation=True, max_length=max_length)
        targets = tokenizer(list(task.target_words), truncation=True, max_length=max_target_length)["input_ids"]
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": targets[r["label"]], "class_label": r["label"]}
            for ids, mask, r in zip(enc["input_ids"], enc["attention_mask"], rows)
        ]
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


def make_collator(tokenizer: Any, seq2seq: bool):
    """Dynamic padding: pad to the longest in the batch (labels of seq2seq with -100)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if seq2seq:
        inner = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

        def collate(features: list[dict]) -> dict[str, torch.Tensor]:
            class_labels = torch.tensor([f["class_label"] for f in features])
            batch = inner([{k: v for k, v in f.items() if k != "class_label"} for f in features])
            batch["class_label"] = class_labels
            return batch

        return collate
    return DataCollatorWithPadding(tokenizer)
