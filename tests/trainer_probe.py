"""Run by tests/test_distributed.py in each of several processes: a user-style HF Trainer script with
AdaRankCallback (the strategy given) on a tiny BERT; after every rank change it records this process's digest
of the trainable parameters, as JSON lines in OUT/rank<R>.jsonl."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_bert, word_tokenizer, write_glue  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from adarank import AdaRankConfig, get_task  # noqa: E402
from adarank.callback import AdaRankCallback  # noqa: E402
from adarank.data import load_split, make_collator, tokenize  # noqa: E402
from adarank.distributed import params_digest  # noqa: E402
from adarank.modeling import apply_lora  # noqa: E402


def main() -> None:
    out, strategy = sys.argv[1], sys.argv[2]
    from pathlib import Path

    tok = word_tokenizer("bert")
    glue = write_glue(Path(out) / f"glue{os.environ['RANK']}", n_train=64, n_eval=8)
    task = get_task("mrpc")
    rows = tokenize(load_split(task, "train", glue), task, tok, False, 48, 4)
    model = apply_lora(tiny_bert(vocab_size=len(tok)), False, 2, 4, None, 0.1)
    args = TrainingArguments(output_dir=os.path.join(out, "t"), per_device_train_batch_size=4, max_steps=10,
                             learning_rate=1e-2, report_to=[], save_strategy="no", eval_strategy="no",
                             logging_strategy="no", use_cpu=True, remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=make_collator(tok, False))
    callback = AdaRankCallback(AdaRankConfig(r0=2, r_max=8, alpha=2, tol=0.0, check_every=3, warmup_steps=3,
                                             criterion="threshold", strategy=strategy, grow_top_k=2, prune="rank",
                                             prune_rank=2, prune_at=0.8))
    callback.attach(trainer)
    records = []
    on_step_end = callback.on_step_end

    def traced(args, state, control, **kwargs):
        before = len(callback.events)
        result = on_step_end(args, state, control, **kwargs)
        if len(callback.events) > before:
            event = callback.events[-1]
            records.append({"step": event["step"], "action": event["action"], "to_rank": event["to_rank"],
                            "rank_mean": event["rank_mean"], "agreed": event["param_digests"],
                            "digest": params_digest(model), "wrapped": type(trainer.model_wrapped).__name__,
                            "num_processes": trainer.accelerator.num_processes})
        return result

    callback.on_step_end = traced
    trainer.train()
    with open(os.path.join(out, f"rank{os.environ['RANK']}.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
