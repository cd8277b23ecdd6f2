"""Check an exported adapter against its AdaRank run on the real validation data, with plain PEFT.

    adarank export out/short_prune out/short_prune_peft
    python benchmarks/export_roundtrip.py out/short_prune out/short_prune_peft

Loads the original base with `transformers` alone, attaches the adapter with `PeftModel.from_pretrained`,
and compares logits and predictions with the run model (original base + merged updates + final adapter)
on every validation example. Prints one line: max_abs_logit_diff=... agreement=... accuracy_run=... accuracy_peft=...
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def main() -> int:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from adarank import get_task, load_config, load_run_model
    from adarank.data import load_split, make_collator, tokenize
    from adarank.metrics import classification_metrics
    from adarank.modeling import resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("export_dir")
    args = parser.parse_args()
    cfg = load_config(os.path.join(args.run_dir, "config.yaml"))
    with open(os.path.join(args.run_dir, "model", "adarank_model.json")) as fh:
        meta = json.load(fh)
    task = get_task(cfg.data.task)
    run_model, tok = load_run_model(os.path.join(args.run_dir, "model"))
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(meta["base_model"]), num_labels=task.num_labels)
    peft_model = PeftModel.from_pretrained(base, args.export_dir)
    rows = load_split(task, task.eval_split, cfg.data.data_dir)
    data = tokenize(rows, task, tok, False, cfg.model.max_length, cfg.model.max_target_length)
    collate = make_collator(tok, False)
    diffs, agree, preds_run, preds_peft = [], 0, [], []
    with torch.no_grad():
        for model in (run_model, peft_model):
            model.eval()
        for i in range(0, len(data), 64):
            batch = collate(data[i : i + 64])
            batch.pop("labels")
            a, b = run_model(**batch).logits, peft_model(**batch).logits
            diffs.append(float((a - b).abs().max()))
            preds_run += a.argmax(-1).tolist()
            preds_peft += b.argmax(-1).tolist()
    labels = [r["label"] for r in rows]
    agree = sum(x == y for x, y in zip(preds_run, preds_peft)) / len(labels)
    acc_run = classification_metrics(labels, preds_run, task.num_labels)["accuracy"]
    acc_peft = classification_metrics(labels, preds_peft, task.num_labels)["accuracy"]
    print(f"max_abs_logit_diff={max(diffs):.3e} agreement={agree:.4f} accuracy_run={acc_run:.4f} accuracy_peft={acc_peft:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
