"""Our training loop, on Accelerate (the same code runs under `accelerate launch`).

setup -> loop (forward, backward, step; controller; growth or prune) -> evaluate -> save. Losses stay on
the device and are synced in one batch at logging and decision steps, not every step.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .config import RunConfig
from .controller import RankController, decision_record
from .data import LengthGroupedBatchSampler, load_split, make_collator, tokenize
from .metrics import classification_metrics, decode_label
from .importance import ImportanceTracker
from .modeling import check_tokenizer, load_base_model, load_tokenizer, prepare_model, resolve_model_path, save_run_model
from .optim import apply_decision, build_optimizer, build_scheduler
from .report import JsonlWriter, package_versions, plot_training, write_json, write_yaml
from .surgery import count_trainable, rank_summary
from .tasks import get_task


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (MiB); None where `resource` is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


class Run:
    """Everything one training run holds; `train(cfg)` is the entry point."""

    def __init__(self, cfg: RunConfig, model: Any = None, tokenizer: Any = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        tc, ac = cfg.train, cfg.adarank
        self.task = get_task(cfg.data.task)
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(tc.mixed_precision), gradient_accumulation_steps=tc.grad_accum_steps
        )
        set_seed(tc.seed)
        self.model_path = str(resolve_model_path(cfg.model.name_or_path))
        if tokenizer is not None:
            check_tokenizer(tokenizer, cfg.model.name_or_path)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_path)
        train_rows = load_split(self.task, "train", cfg.data.data_dir, cfg.data.max_train_samples)
        eval_rows = load_split(self.task, self.task.eval_split, cfg.data.data_dir, cfg.data.max_eval_samples)
        if model is None:
            model, self.seq2seq = load_base_model(self.model_path, self.task.num_labels)
        else:
            self.seq2seq = bool(model.config.is_encoder_decoder)
        self.method = cfg.method.name
        mc = cfg.model
        train_ds = tokenize(train_rows, self.task, self.tokenizer, self.seq2seq, mc.max_length, mc.max_target_length)
        eval_ds = tokenize(eval_rows, self.task, self.tokenizer, self.seq2seq, mc.max_length, mc.max_target_length)
        collate = make_collator(self.tokenizer, self.seq2seq)
        lengths = [len(x["input_ids"]) for x in train_ds]
        sampler = LengthGroupedBatchSampler(lengths, tc.batch_size, tc.seed, mega=50 if tc.group_by_length else 1)
        train_loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate)
        order = sorted(range(len(eval_ds)), key=lambda i: len(eval_ds[i]["input_ids"]))
        self.eval_loader = DataLoader([eval_ds[i] for i in order], batch_size=tc.eval_batch_size, collate_fn=collate)

        updates_per_epoch = math.ceil(math.ceil(len(train_loader) / self.accelerator.num_processes) / tc.grad_accum_steps)
        self.updates_per_epoch = updates_per_epoch
        if self.method == "zero_shot":
            self.total_steps = 0
        else:
            self.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * updates_per_epoch))
        self.warmup_steps = math.ceil(tc.warmup_ratio * self.total_steps)
        self.model = prepare_model(model, self.seq2seq, cfg, self.total_steps)
        optimizer = build_optimizer(self.model, tc.lr, tc.weight_decay) if self.total_steps else None
        self.scheduler = build_scheduler(optimizer, self.total_steps, self.warmup_steps) if optimizer else None
        if optimizer is None:  # zero_shot
            self.optimizer = None
            self.model, self.train_loader, self.eval_loader = self.accelerator.prepare(self.model, train_loader, self.eval_loader)
        else:
            self.model, self.optimizer, self.train_loader, self.eval_loader = self.accelerator.prepare(
                self.model, optimizer, train_loader, self.eval_loader
            )
        adaptive = self.method == "adarank"
        self.controller = RankController.from_config(ac, total_steps=self.total_steps) if adaptive else None
        self.importance = ImportanceTracker(ac.importance) if adaptive and ac.grow_top_k is not None else None
        self.adalora = self.raw_model.base_model if self.method == "adalora" else None
        self._update_ranks()
        self.rank0 = self.rank_max

    @property
    def raw_model(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        model, acc = self.model, self.accelerator
        model.eval()
        preds, labels, loss_sum, count = [], [], 0.0, 0
        for batch in self.eval_loader:
            class_label = batch.pop("class_label", None)
            out = model(**batch)
            n = batch["input_ids"].shape[0]
            # from the logits, not out.loss: PEFT AdaLoRA adds its orthogonality regularizer to out.loss
            logits, target = out.logits.float(), batch["labels"]
            loss = F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=-100)
            loss_sum += float(acc.reduce(loss * n, "sum"))
            count += int(acc.reduce(torch.tensor(n, device=acc.device), "sum"))
            if self.seq2seq:
                gen = self.raw_model.generate(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    max_new_tokens=self.cfg.model.max_target_length,
                )
                gen = acc.pad_across_processes(gen, dim=1, pad_index=self.tokenizer.pad_token_id)
                texts = self.tokenizer.batch_decode(acc.gather_for_metrics(gen), skip_special_tokens=True)
                preds += [decode_label(t, self.task.target_words) for t in texts]
                labels += acc.gather_for_metrics(class_label).tolist()
            else:
                preds += acc.gather_for_metrics(out.logits.argmax(-1)).tolist()
                labels += acc.gather_for_metrics(batch["labels"]).tolist()
        model.train()
        metrics = classification_metrics(labels, preds, self.task.num_labels, self.task.positive_label)
        metrics["eval_loss"] = loss_sum / max(1, count)  # mean over examples (seq2seq: of the batch token means)
        return metrics

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        out = tc.output_dir
        self.main = acc.is_main_process
        if self.main:
            os.makedirs(out, exist_ok=True)
            write_yaml(os.path.join(out, "config.yaml"), cfg.to_dict())
            self.log_w = JsonlWriter(os.path.join(out, "log.jsonl"))
            self.ev_w = JsonlWriter(os.path.join(out, "rank_events.jsonl"))
        self.log, self.events, evals = [], [], []
        self.eval_time = self.decision_time = 0.0
        start = time.time()
        step, pending, micro, trainable_sum = 0, [], [], 0
        self.bar = tqdm(total=self.total_steps, disable=not self.main, desc=self._desc())
        self.model.train()
        done = self.total_steps == 0  # zero_shot: evaluate only
        while not done:
            for batch in self.train_loader:
                batch.pop("class_label", None)
                with acc.accumulate(self.model):
                    loss = self.model(**batch).loss
                    acc.backward(loss)
                    micro.append(loss.detach())
                    if not acc.sync_gradients:
                        continue
                    if self.importance is not None:
                        self.importance.update(self.raw_model)
                    if tc.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.model.parameters(), tc.max_grad_norm)
                    self.optimizer.step()
                    if not acc.optimizer_step_was_skipped:
                        self.scheduler.step()
                    if self.adalora is not None:  # after the step, before zero_grad (it reads the gradients)
                        self.adalora.update_and_allocate(step)
                    self.optimizer.zero_grad(set_to_none=True)
                step += 1
                pending.append(torch.stack(micro).float().mean())
                micro = []
                trainable_sum += self.trainable
                self.bar.update(1)
                last = step >= self.total_steps
                decision_step = self.controller is not None and self.controller.is_decision_step(step)
                if decision_step or step % tc.logging_steps == 0 or last:
                    self._observe(step, pending)
                    pending = []
                if tc.eval_steps and step % tc.eval_steps == 0 and not last:
                    evals.append(self._eval_record(step))
                if last:
                    done = True
                    break
            if not done or not evals or evals[-1]["step"] != step:  # every epoch's end, and the run's
                evals.append(self._eval_record(step))
        if not evals:  # zero_shot
            evals.append(self._eval_record(step))
        self.bar.close()
        wall = time.time() - start
        results = self._results(evals, self.events, trainable_sum / max(1, step), wall, step)
        if self.main:
            if tc.save_model:
                self._save_model(os.path.join(out, "model"))
            write_json(os.path.join(out, "results.json"), results)
            if self.log:
                what = f"{cfg.adarank.strategy}/{cfg.adarank.criterion}" if self.method == "adarank" else self.method
                plot_training(self.log, self.events, evals, os.path.join(out, "training.png"),
                              title=f"{cfg.data.task} · {cfg.model.name_or_path} · {what}")
        acc.wait_for_everyone()
        return results

    def _observe(self, step: int, pending: list) -> None:
        """Sync the pending step losses (averaged over processes), feed them to the controller, log, and
        carry out a decision. Only the last pending step can be a decision step."""
        losses = self.accelerator.reduce(torch.stack(pending), "mean").tolist()
        first = step - len(losses) + 1
        decision = None
        for i, value in enumerate(losses):
            if self.controller is not None:
                decision = self.controller.observe(first + i, value)
        lr = self.scheduler.get_last_lr()[0]
        rec = {"step": step, "epoch": round(step / self.updates_per_epoch, 4), "loss": sum(losses) / len(losses),
               "lr": lr, "rank": self.rank_max, "rank_mean": self.rank_mean}  # the ranks these steps trained at
        self.log.append(rec)
        if self.main:
            self.log_w.write(rec)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", rank=rec["rank"], lr=f"{lr:.2e}")
        if decision is not None and decision.action != "hold":
            self._apply(decision)
        if self.importance is not None and self.controller.is_check_step(step):
            self.importance.reset()  # importance is accumulated over one check window

    def _apply(self, decision: Any) -> None:
        tc = self.cfg.train
        raw = self.raw_model
        start = time.perf_counter()
        self.optimizer, self.scheduler, details = apply_decision(
            raw, self.optimizer, decision, self.cfg.adarank, seed=tc.seed, lr=tc.lr, weight_decay=tc.weight_decay,
            total_steps=self.total_steps, warmup_steps=self.warmup_steps, importance=self.importance,
            accelerator=self.accelerator,
        )
        if self.accelerator.num_processes > 1:  # DDP registered the old parameters: wrap again
            self.model = self.accelerator.prepare_model(raw)
        self._update_ranks()
        seconds = time.perf_counter() - start  # surgery and optimizer/scheduler rebuild
        self.decision_time += seconds
        event = {**decision_record(decision), "to_rank": self.rank_max, "rank_mean": self.rank_mean,
                 "seconds": seconds, **details}
        self.events.append(event)
        if self.main:
            self.ev_w.write(event)
        self.bar.set_description(self._desc())

    def _update_ranks(self) -> None:
        _, self.rank_max, self.rank_mean = rank_summary(self.raw_model)
        self.trainable = count_trainable(self.raw_model)

    def _desc(self) -> str:
        return f"{self.cfg.data.task} r={self.rank_max}" + (f" (mean {self.rank_mean:.1f})" if self.rank_mean != self.rank_max else "")

    def _save_model(self, out_dir: str) -> None:
        if self.method in ("head", "full", "zero_shot"):  # a plain transformers model
            self.raw_model.save_pretrained(out_dir)
            self.tokenizer.save_pretrained(out_dir)
        else:
            save_run_model(self.raw_model, self.tokenizer, out_dir, self.cfg.model.name_or_path, self.seq2seq,
                           self.task.num_labels)

    def _eval_record(self, step: int) -> dict:
        start = time.perf_counter()
        m = self.evaluate()
        self.eval_time += time.perf_counter() - start
        rec = {"step": step, "epoch": round(step / self.updates_per_epoch, 4), "rank": self.rank_max,
               "rank_mean": self.rank_mean, **m}
        self.accelerator.print(f"eval step {step}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
        return rec

    def _results(self, evals: list, events: list, trainable_avg: float, wall: float, steps: int) -> dict:
        cfg = self.cfg
        ranks, rank_max, rank_mean = rank_summary(self.raw_model)
        train_time = wall - self.eval_time - self.decision_time
        return {
            "task": cfg.data.task,
            "model": cfg.model.name_or_path,
            "model_path": self.model_path,
            "method": self.method,
            "strategy": cfg.adarank.strategy,
            "criterion": cfg.adarank.criterion,
            "growth_enabled": cfg.adarank.growth_enabled,
            "seed": cfg.train.seed,
            "final": {k: v for k, v in evals[-1].items() if k not in ("step", "epoch", "rank")},
            "evals": evals,
            "rank_events": events,
            "rank_schedule": [self.rank0] + [e["to_rank"] for e in events if e["action"] == "grow"],
            "growth_events": sum(e["action"] == "grow" for e in events),
            "pruned": any(e["action"] == "prune" for e in events),
            "final_rank": rank_max,
            "final_rank_mean": rank_mean,
            "final_ranks": ranks,
            "trainable_params_final": self.trainable,
            "trainable_params_avg": trainable_avg,
            "steps": steps,
            "wall_time_s": wall,
            "train_time_s": train_time,  # the loop without evaluation and rank decisions
            "eval_time_s": self.eval_time,
            "decision_time_s": self.decision_time,
            "step_time_s": train_time / steps if steps else None,
            "peak_rss_mb": peak_rss_mb(),
            "num_processes": self.accelerator.num_processes,
            "mixed_precision": self.accelerator.mixed_precision,
            "versions": package_versions(),
            "config": cfg.to_dict(),
        }


def train(cfg: RunConfig, model: Any = None, tokenizer: Any = None) -> dict:
    """Train one run as `cfg` says and write its outputs into `cfg.train.output_dir`. A prebuilt base
    `model` and `tokenizer` may be passed (tests use tiny ones)."""
    return Run(cfg, model=model, tokenizer=tokenizer).train()


__all__ = ["Run", "train"]
