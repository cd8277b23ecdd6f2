"""AdaRank's overhead on one machine, in one run: step time against PEFT LoRA at the same rank, the time of a
growth event, peak memory, and throughput against the HF Trainer with PEFT LoRA on the same job.

    python benchmarks/overhead.py                       # MRPC, all-MiniLM-L6-v2, rank 8, 40 steps x 3 repeats
    python benchmarks/overhead.py --steps 20 --repeats 2

Every measurement runs in its own process (peak RSS is per process); the contenders alternate, their order
rotating with each repeat, and each figure is the median over repeats:

- adarank: our loop with the rank controller on (checks every 10 steps, a criterion that never fires, so
  every step is at rank 8) -- then, in the same process, growth events alternating expand and merge, each
  timed from the decision to the rebuilt optimizer and scheduler;
- lora: our loop with fixed-rank PEFT LoRA r=8 (no controller);
- trainer: `transformers.Trainer` + PEFT LoRA r=8, the usual recipe: the same tokenized examples,
  `DataCollatorWithPadding`, the same batch size, LR schedule and number of steps;
- trainer_grouped: the same with the Trainer's own length grouping (`train_sampling_strategy=
  "group_by_length"`), its best-configured form for padding-bound batches (our loop groups by length too).

Step time and samples/s count the training loop only: ours without its evaluation at the end, the Trainer's
from `on_train_begin` to `on_train_end` (its setup inside `trainer.train()` excluded; it evaluates nothing). The last line is

    overhead_ratio=<adarank s/step / lora s/step> growth_event_s=<median> trainer_speedup=<adarank samples/s /
    trainer samples/s> trainer_grouped_speedup=<adarank samples/s / trainer_grouped samples/s>
    peak_rss_ratio=<adarank / lora>
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "mrpc_minilm.yaml")


def run_config(kind: str, args: argparse.Namespace, out_dir: str):
    from adarank import load_config

    overrides = [f"train.output_dir={out_dir}", f"train.max_steps={args.steps}", f"train.seed={args.seed}",
                 "train.save_model=false", "train.logging_steps=10", f"adarank.r0={args.rank}",
                 f"data.data_dir={args.data_dir}"]
    if kind == "adarank":  # controller on, checks every 10 steps, never grows during the timed steps
        overrides += ["method.name=adarank", "adarank.r_max=64", "adarank.criterion=threshold", "adarank.tol=1.0e9",
                      "adarank.check_every=10", "adarank.warmup_steps=10"]
    else:
        overrides += ["method.name=lora"]
    return load_config(CONFIG, overrides)


def worker_loop(kind: str, args: argparse.Namespace) -> dict:
    from adarank.controller import Decision
    from adarank.train import Run, peak_rss_mb

    with tempfile.TemporaryDirectory() as tmp:
        run = Run(run_config(kind, args, tmp))
        res = run.train()
        out = {"kind": kind, "steps": res["steps"], "step_time_s": res["step_time_s"],
               "samples_per_s": res["steps"] * run.cfg.train.batch_size / res["train_time_s"],
               "peak_rss_mb": peak_rss_mb(), "rank": res["final_rank"]}
        if kind == "adarank":
            times = []
            for i in range(args.growth_events):
                run.cfg.adarank.strategy = ("expand", "merge")[i % 2]
                rank = run.rank_max
                start = time.perf_counter()
                run._apply(Decision("grow", rank + run.cfg.adarank.alpha, rank, res["steps"]))
                times.append({"strategy": run.cfg.adarank.strategy, "from_rank": rank, "seconds": time.perf_counter() - start})
            out["growth_events"] = times
    return out


def _loop_clock():
    """A Trainer callback timing the training loop alone, from `on_train_begin` (the optimizer, scheduler and
    dataloader already built) to `on_train_end` -- what our loop's step time counts, without the setup
    `trainer.train()` does before its loop."""
    from transformers import TrainerCallback

    class LoopClock(TrainerCallback):
        seconds = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start

    return LoopClock()


def worker_trainer(args: argparse.Namespace, grouped: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from adarank import load_config
    from adarank.data import load_split, tokenize
    from adarank.modeling import apply_lora, load_base_model, load_tokenizer, resolve_model_path
    from adarank.tasks import get_task
    from adarank.train import peak_rss_mb

    cfg = run_config("lora", args, "unused")
    tc, ac = cfg.train, cfg.adarank
    torch.manual_seed(args.seed)
    path = resolve_model_path(cfg.model.name_or_path)
    task = get_task(cfg.data.task)
    tokenizer = load_tokenizer(path)
    rows = tokenize(load_split(task, "train", cfg.data.data_dir), task, tokenizer, False, cfg.model.max_length, 8)
    dataset = Dataset.from_list([{k: v for k, v in r.items() if k != "class_label"} for r in rows])
    model, _ = load_base_model(path, task.num_labels)
    model = apply_lora(model, False, ac.r0, ac.lora_alpha_ratio * ac.r0, ac.target_modules, ac.lora_dropout)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=tc.batch_size, max_steps=args.steps, learning_rate=tc.lr,
            warmup_steps=math.ceil(tc.warmup_ratio * args.steps), lr_scheduler_type="linear", max_grad_norm=tc.max_grad_norm,
            logging_steps=tc.logging_steps, save_strategy="no", eval_strategy="no", report_to=[], seed=args.seed,
            train_sampling_strategy="group_by_length" if grouped else "random",
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        )
        clock = _loop_clock()
        trainer = Trainer(model=model, args=targs, train_dataset=dataset,
                          data_collator=DataCollatorWithPadding(tokenizer), callbacks=[clock])
        trainer.train()
        wall = clock.seconds
    return {"kind": "trainer_grouped" if grouped else "trainer", "steps": args.steps, "step_time_s": wall / args.steps,
            "samples_per_s": args.steps * tc.batch_size / wall, "peak_rss_mb": peak_rss_mb()}


def spawn(kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--steps", str(args.steps), "--rank",
           str(args.rank), "--seed", str(args.seed), "--data-dir", args.data_dir, "--growth-events", str(args.growth_events)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"overhead: the {kind} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--growth-events", type=int, default=6, help="timed growth events per adarank repeat")
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "glue"))
    parser.add_argument("--output", help="also write every measurement as JSON here")
    parser.add_argument("--worker", choices=["adarank", "lora", "trainer", "trainer_grouped"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        res = (worker_trainer(args, grouped=args.worker == "trainer_grouped") if args.worker.startswith("trainer")
               else worker_loop(args.worker, args))
        print(json.dumps(res))
        return 0

    kinds = ["adarank", "lora", "trainer", "trainer_grouped"]
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for rep in range(args.repeats):
        order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
        for kind in order:
            res = spawn(kind, args)
            results[kind].append(res)
            print(f"repeat {rep + 1}/{args.repeats} {kind}: {res['step_time_s']:.4f} s/step, "
                  f"{res['samples_per_s']:.1f} samples/s, peak RSS {res['peak_rss_mb']:.0f} MiB", flush=True)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    growth = [g for r in results["adarank"] for g in r["growth_events"]]
    for strategy in ("expand", "merge"):
        times = [g["seconds"] for g in growth if g["strategy"] == strategy]
        print(f"growth events ({strategy}, rank {args.rank} and up, the optimizer's update included): "
              f"median {statistics.median(times):.4f} s, max {max(times):.4f} s over {len(times)}")
    for kind in kinds:
        print(f"{kind}: median {med(kind, 'step_time_s'):.4f} s/step, {med(kind, 'samples_per_s'):.1f} samples/s, "
              f"peak RSS {med(kind, 'peak_rss_mb'):.0f} MiB")
    summary = {
        "overhead_ratio": med("adarank", "step_time_s") / med("lora", "step_time_s"),
        "growth_event_s": statistics.median(g["seconds"] for g in growth),
        "trainer_speedup": med("adarank", "samples_per_s") / med("trainer", "samples_per_s"),
        "trainer_grouped_speedup": med("adarank", "samples_per_s") / med("trainer_grouped", "samples_per_s"),
        "peak_rss_ratio": med("adarank", "peak_rss_mb") / med("lora", "peak_rss_mb"),
    }
    if args.output:
        from adarank.report import write_json

        write_json(args.output, {"settings": vars(args), "measurements": results, "summary": summary})
    print(" ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
