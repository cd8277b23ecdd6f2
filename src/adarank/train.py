"""Our training loop, on Accelerate (the same code runs in N processes: `adarank train --nproc-per-node N`).

    setup -> (resume) -> loop: forward, backward, step; observe; grow or prune; evaluate; checkpoint -> save

The training state is one object, saved and loaded as a unit (`_state`, `checkpoint.model_tensors`; the
files are described in checkpoint.py): a run killed at any step and resumed with `--resume` continues
exactly where its last checkpoint was, and on CPU in fp32 ends bit-identical to the run that was never
stopped. SIGINT and SIGTERM finish the current step, write a checkpoint and raise `Interrupted`.

Step losses stay on the device and are synced in one batch at logging and decision steps; one scalar is
synced every step: whether the loss is finite, since a step with a non-finite loss (or gradient norm) is
skipped, never applied. `train.max_nonfinite_steps` such steps in a row stop the run (`NonFiniteLoss`).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .checkpoint import (clean_partial, failpoint, latest_checkpoint, model_tensors, read_checkpoint, restore_model,
                         rng_state, set_rng_state, write_checkpoint)
from .config import RESUME_MAY_CHANGE, RunConfig, config_differences
from .controller import RankController, decision_record
from .data import EXTRAS, LengthGroupedBatchSampler, check_causal, load_train_eval, make_collator, tokenize
from .distributed import agree, check_launch_env, check_processes, process_max, rewrap_model, use_cpu
from .importance import ImportanceTracker
from .metrics import decode_label, decode_score, task_metrics
from .modeling import (ModelError, check_max_length, check_tokenizer, load_base_model, load_model_config, load_tokenizer,
                       model_kind, prepare_model, resolve_model_path, save_run_model)
from .optim import apply_decision, build_optimizer, build_scheduler, restart_schedule
from .report import JsonlWriter, package_versions, plot_training, write_json, write_yaml
from .rundir import RunDirError, check_output_dir, clear_run, mark_running, write_marker
from .surgery import check_growable, count_trainable, get_strategy, lora_ranks, rank_summary
from .tasks import get_task


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a step; its checkpoint is written."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint: {checkpoint}")


class NonFiniteLoss(RuntimeError):
    """The loss stayed non-finite for `train.max_nonfinite_steps` steps in a row."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(message)


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


def _comparable(cfg: dict) -> dict:
    """A config mapping with paths that exist written as real paths, so a relative and an absolute spelling
    of the same directory compare equal."""
    out = {section: dict(values) for section, values in cfg.items()}
    for section, key in (("model", "name_or_path"), ("data", "data_dir")):
        value = out.get(section, {}).get(key)
        if isinstance(value, str) and os.path.exists(value):
            out[section][key] = os.path.realpath(value)
    return out


class Run:
    """Everything one training run holds; `train(cfg)` is the entry point. `resume=True` continues the run
    in `cfg.train.output_dir` from its newest complete checkpoint; `overwrite=True` replaces the run there
    (removing only what a run writes)."""

    def __init__(self, cfg: RunConfig, model: Any = None, tokenizer: Any = None, resume: bool = False,
                 overwrite: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        tc, ac = cfg.train, cfg.adarank
        self.out = tc.output_dir
        check_launch_env()
        self.out_mode = check_output_dir(self.out, resume=resume, overwrite=overwrite)
        self.task = get_task(cfg.data.task, cfg.data.prompt_style)
        self.accelerator = Accelerator(mixed_precision=resolve_mixed_precision(tc.mixed_precision),
                                       gradient_accumulation_steps=tc.grad_accum_steps, cpu=use_cpu())
        check_processes(self.accelerator)
        self.main = self.accelerator.is_main_process
        set_seed(tc.seed)
        ckpt = self._read_resume_checkpoint() if resume else None
        self.model_path = str(resolve_model_path(cfg.model.name_or_path))
        train_rows, eval_rows = load_train_eval(self.task, cfg.data)
        if tokenizer is not None:
            check_tokenizer(tokenizer, cfg.model.name_or_path)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_path)
        mc = cfg.model
        model_config = model.config if model is not None else load_model_config(self.model_path)
        check_max_length(model_config, mc.max_length, cfg.model.name_or_path)
        if model is None:
            model, self.kind = load_base_model(self.model_path, self.task.num_labels, model_config,
                                               cfg.model.quantization, self.accelerator.device)
        else:
            self.kind = model_kind(model.config, model)
            if self.kind == "classifier" and model.config.num_labels != self.task.num_labels:
                raise ModelError(f"the model passed in has {model.config.num_labels} output(s); data.task="
                                 f"{self.task.name} needs {self.task.num_labels}"
                                 + (" (a regression head)" if self.task.regression else ""))
        if self.kind == "causal_lm" and self.tokenizer.pad_token is None:  # GPT-2, LLaMA: pad with end-of-text
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.method = cfg.method.name
        if self.kind == "causal_lm":  # before tokenizing: the targets must fit and tell the labels apart
            check_causal(self.task, self.tokenizer, mc)
        train_ds = tokenize(train_rows, self.task, self.tokenizer, self.kind, mc.max_length, mc.max_target_length)
        eval_ds = tokenize(eval_rows, self.task, self.tokenizer, self.kind, mc.max_length, mc.max_target_length)
        collate = make_collator(self.tokenizer, self.kind)
        self.targets = check_causal(self.task, self.tokenizer, mc) if self.kind == "causal_lm" else None
        lengths = [len(x["input_ids"]) for x in train_ds]
        self.sampler = LengthGroupedBatchSampler(lengths, tc.batch_size, tc.seed, mega=50 if tc.group_by_length else 1)
        # own generators: iterating a DataLoader then draws its worker seed from them, not from the global RNG
        train_loader = DataLoader(train_ds, batch_sampler=self.sampler, collate_fn=collate, generator=torch.Generator())
        order = sorted(range(len(eval_ds)), key=lambda i: len(eval_ds[i]["input_ids"]))
        eval_loader = DataLoader([eval_ds[i] for i in order], batch_size=tc.eval_batch_size, collate_fn=collate,
                                 generator=torch.Generator())

        updates_per_epoch = math.ceil(math.ceil(len(train_loader) / self.accelerator.num_processes) / tc.grad_accum_steps)
        self.updates_per_epoch = updates_per_epoch
        if self.method == "zero_shot":
            self.total_steps = 0
        else:
            self.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * updates_per_epoch))
        self.warmup_steps = math.ceil(tc.warmup_ratio * self.total_steps)
        model = prepare_model(model, self.kind, cfg, self.total_steps)
        if self.method == "adarank":  # before any step: what growth could not do exactly is refused now
            try:
                check_growable(model, ac.strategy)
            except ValueError as exc:
                raise ModelError(f"adarank: {exc}") from None
        if ckpt is not None:
            self._restore_model(model, *ckpt)
        optimizer = build_optimizer(model, tc.lr, tc.weight_decay) if self.total_steps else None
        self.scheduler = build_scheduler(optimizer, self.total_steps, self.warmup_steps, tc.lr_scheduler,
                                         tc.lr_scheduler_kwargs, ac.rewarmup_steps) if optimizer else None
        if optimizer is None:  # zero_shot
            self.optimizer = None
            self.model, self.train_loader, self.eval_loader = self.accelerator.prepare(model, train_loader, eval_loader)
        else:
            self.model, self.optimizer, self.train_loader, self.eval_loader = self.accelerator.prepare(
                model, optimizer, train_loader, eval_loader
            )
        adaptive = self.method == "adarank"
        self.controller = RankController.from_config(ac, total_steps=self.total_steps) if adaptive else None
        self.importance = ImportanceTracker(ac.importance) if adaptive and ac.grow_top_k is not None else None
        self.adalora = self.raw_model.base_model if self.method == "adalora" else None
        self._update_ranks()
        self._init_state()
        if ckpt is not None:
            self._restore_state(ckpt[0], ckpt[2])

    @property
    def raw_model(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------ training state
    def _init_state(self) -> None:
        """The state of a run at step 0 (what `_state` saves and `_restore_state` loads)."""
        self.step = self.epoch = self.batch_in_epoch = 0
        self.rank0 = self.rank_max
        self.log, self.events, self.evals = [], [], []
        self.checks: list[dict] = []  # every check's decision, held or not (how often a rule grows)
        self.pending: list[torch.Tensor] = []  # step losses not yet handed to the controller and the log
        self.micro: list[torch.Tensor] = []    # micro-batch losses of the current step
        self.trainable_sum = 0
        self.eval_time = self.decision_time = self.checkpoint_time = self.elapsed = 0.0
        self.nonfinite_steps = self.nonfinite_streak = self.skipped_since_log = 0
        self.resumes: list[dict] = []
        self.signal: int | None = None  # SIGINT/SIGTERM received by this process
        self.last_checkpoint: str | None = None

    def _optimizer_param_names(self) -> list[str]:
        names = {id(p): n for n, p in self.raw_model.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def _own_state(self) -> dict[str, Any]:
        """What differs between processes: RNG states, and the step losses not yet averaged over them."""
        return {"rng": rng_state(), "pending": torch.stack(self.pending).cpu() if self.pending else torch.zeros(0)}

    def _state(self, processes: list[dict]) -> dict[str, Any]:
        """The checkpoint's training state; `processes`: every process's `_own_state()`, by process index."""
        acc, raw = self.accelerator, self.raw_model
        state = {
            "format": 1, "config": self.cfg.to_dict(), "num_processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision, "processes": processes,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "accumulation_step": acc.step, "ranks": lora_ranks(raw),
            "optimizer": self.optimizer.state_dict(), "optimizer_params": self._optimizer_param_names(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "importance": {k: v.cpu() for k, v in self.importance.scores.items()} if self.importance else None,
            "history": {
                "rank0": self.rank0, "log": self.log, "events": self.events, "evals": self.evals,
                "checks": self.checks,
                "trainable_sum": self.trainable_sum, "eval_time": self.eval_time, "decision_time": self.decision_time,
                "checkpoint_time": self.checkpoint_time, "elapsed": self.elapsed + time.time() - self.started,
                "nonfinite_steps": self.nonfinite_steps, "skipped_since_log": self.skipped_since_log,
                "resumes": self.resumes,
            },
        }
        if self.adalora is not None:
            alloc = self.adalora.rankallocator
            state["adalora"] = {
                "rank_pattern": self.adalora.peft_config[self.adalora.trainable_adapter_name].rank_pattern,
                **{k: {n: t.cpu() for n, t in getattr(alloc, k).items()} for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")},
            }
        return state

    def _read_resume_checkpoint(self) -> tuple[str, dict, dict]:
        """The newest complete checkpoint, checked against this run's config before any model is loaded."""
        path = latest_checkpoint(self.out)
        tensors, state = read_checkpoint(path)
        differ = [k for k in config_differences(_comparable(state["config"]), _comparable(self.cfg.to_dict()))
                  if k not in RESUME_MAY_CHANGE]
        if differ:
            raise RunDirError(f"--resume: the config differs from the run's in {', '.join(differ)} (only "
                              f"{', '.join(RESUME_MAY_CHANGE)} may change on resume); {path}")
        if state["num_processes"] != self.accelerator.num_processes:
            raise RunDirError(f"--resume: the run was trained in {state['num_processes']} process(es), this is "
                              f"{self.accelerator.num_processes}; resume with --nproc-per-node {state['num_processes']}")
        if state["mixed_precision"] != self.accelerator.mixed_precision:
            raise RunDirError(f"--resume: the run trained with mixed precision {state['mixed_precision']!r}, here it "
                              f"would be {self.accelerator.mixed_precision!r}; resume it where it ran, or set "
                              f"train.mixed_precision={state['mixed_precision']}")
        return path, tensors, state

    def _restore_model(self, model: Any, path: str, tensors: dict, state: dict) -> None:
        """Give the freshly built model the checkpoint's ranks, parameters and merged base weights."""
        if "adalora" in state:
            model.peft_config[model.base_model.trainable_adapter_name].rank_pattern = state["adalora"]["rank_pattern"]
        try:
            restore_model(model, tensors, state["ranks"], path)
        except ValueError as exc:
            raise RunDirError(f"--resume: {exc}") from None

    def _restore_state(self, path: str, state: dict) -> None:
        acc = self.accelerator
        if self._optimizer_param_names() != state["optimizer_params"]:
            raise RunDirError(f"--resume: the optimizer of {path} holds other parameters than the model")
        self.last_checkpoint = path
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        if self.importance is not None:
            self.importance.scores = {k: v.to(acc.device) for k, v in state["importance"].items()}
        if self.adalora is not None:
            for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                setattr(self.adalora.rankallocator, key, {n: t.to(acc.device) for n, t in state["adalora"][key].items()})
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        acc.step = state["accumulation_step"]
        h = state["history"]
        self.rank0, self.log, self.events, self.evals = h["rank0"], h["log"], h["events"], h["evals"]
        self.checks = h.get("checks", [])
        self.trainable_sum, self.eval_time, self.decision_time = h["trainable_sum"], h["eval_time"], h["decision_time"]
        self.checkpoint_time, self.elapsed = h["checkpoint_time"], h["elapsed"]
        self.nonfinite_steps, self.skipped_since_log = h["nonfinite_steps"], h["skipped_since_log"]
        self.resumes = h["resumes"] + [{"step": self.step, "checkpoint": self.last_checkpoint}]
        self._update_ranks()
        own = state["processes"][acc.process_index]
        self.pending = [x.to(acc.device) for x in own["pending"].unbind()]
        set_rng_state(own["rng"])  # last: nothing above may draw from it

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        model, acc = self.model, self.accelerator
        model.eval()
        preds, labels, loss_sum, count = [], [], 0.0, 0
        for batch in self.eval_loader:
            extras = {k: batch.pop(k) for k in EXTRAS if k in batch}
            out = model(**batch)
            n = batch["input_ids"].shape[0]
            # from the logits, not out.loss: PEFT AdaLoRA adds its orthogonality regularizer to out.loss
            logits, target = out.logits.float(), batch["labels"]
            if self.kind == "causal_lm":  # token t predicts token t + 1
                logits, target = logits[:, :-1], target[:, 1:]
            if self.kind == "classifier" and self.task.regression:
                loss = F.mse_loss(logits[:, 0], target.float())
            else:
                loss = F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=-100)
            loss_sum += float(acc.reduce(loss * n, "sum"))
            count += int(acc.reduce(torch.tensor(n, device=acc.device), "sum"))
            if self.kind == "causal_lm":
                preds += acc.gather_for_metrics(self._likeliest(batch["input_ids"], extras["prompt_len"])).tolist()
                labels += acc.gather_for_metrics(extras["class_label"]).tolist()
            elif self.kind == "seq2seq":
                gen = self.raw_model.generate(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    max_new_tokens=self.cfg.model.max_target_length,
                )
                gen = acc.pad_across_processes(gen, dim=1, pad_index=self.tokenizer.pad_token_id)
                texts = self.tokenizer.batch_decode(acc.gather_for_metrics(gen), skip_special_tokens=True)
                preds += [decode_score(t, self.task.score_max) if self.task.regression
                          else decode_label(t, self.task.target_words) for t in texts]
                labels += acc.gather_for_metrics(extras["class_label"]).tolist()
            else:
                outputs = out.logits[:, 0].float() if self.task.regression else out.logits.argmax(-1)
                preds += acc.gather_for_metrics(outputs).tolist()
                labels += acc.gather_for_metrics(batch["labels"]).tolist()
        model.train()
        metrics = task_metrics(self.task, labels, preds)
        metrics["eval_loss"] = loss_sum / max(1, count)  # mean over examples (text-to-text: of the batch token means)
        return metrics

    def _likeliest(self, input_ids: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
        """Causal LMs: for each example the label whose target words (and end-of-sequence) are likeliest
        after the prompt: Σ log p(target token | prompt, earlier target tokens), one forward over every
        (example, label) pair. No generation, so no output can fail to decode."""
        pad = self.tokenizer.pad_token_id
        seqs, spans = [], []
        for ids, plen in zip(input_ids.tolist(), prompt_len.tolist()):
            for target in self.targets:
                seqs.append(ids[:plen] + target)
                spans.append((plen, len(target)))
        width = max(map(len, seqs))
        device = input_ids.device
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        scores = torch.stack([logp[i, start - 1 : start - 1 + length].gather(-1, ids[i, start : start + length, None]).sum()
                              for i, (start, length) in enumerate(spans)])
        return scores.view(len(prompt_len), len(self.targets)).argmax(-1)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        from tqdm.auto import tqdm

        # from here on SIGINT/SIGTERM stop the run after a step; one that comes after the last step's checkpoint
        # lets the final evaluation and save finish (the run is complete then)
        previous = self._catch_signals()
        try:
            self._open_outputs()
            self.started = time.time()
            self.bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.main, desc=self._desc())
            self.model.train()
            try:
                while self.step < self.total_steps:
                    self._train_epoch()
            finally:
                self.bar.close()
            if not self.evals or self.evals[-1]["step"] != self.step:  # the run's end (zero_shot: its only one)
                self.evals.append(self._eval_record())
            return self._finish()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _train_epoch(self) -> None:
        """The rest of the current epoch, then its end-of-epoch evaluation."""
        for batch in self._remaining_batches():
            if self._micro_step(batch):
                self._end_step()
                if self.step >= self.total_steps:
                    return
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if not self.evals or self.evals[-1]["step"] != self.step:
            self.evals.append(self._eval_record())

    def _remaining_batches(self):
        """This epoch's batches from the current position on (after a resume, the first are skipped)."""
        loader = self.train_loader
        loader.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        if self.batch_in_epoch:
            loader = self.accelerator.skip_first_batches(loader, self.batch_in_epoch)
        for batch in loader:
            self.batch_in_epoch += 1
            yield batch

    def _micro_step(self, batch: dict) -> bool:
        """Forward and backward of one micro-batch; at the end of an accumulation, the optimizer step.
        Returns whether an optimizer step ended."""
        acc = self.accelerator
        for key in EXTRAS:
            batch.pop(key, None)
        with acc.accumulate(self.model):
            loss = self.model(**batch).loss
            acc.backward(loss)
            self.micro.append(loss.detach())
            if not acc.sync_gradients:
                return False
            self._optimizer_step()
        return True

    def _optimizer_step(self) -> None:
        """Clip and step -- or skip the step when its loss or gradient norm is not finite (on any process)."""
        acc, tc = self.accelerator, self.cfg.train
        loss = torch.stack(self.micro).float().mean()
        self.micro = []
        self.pending.append(loss)
        bad = process_max(acc, not bool(torch.isfinite(loss)))[0] > 0  # every process skips, or none
        if not bad:
            if self.importance is not None:  # before clipping (and before unscaling, under fp16)
                self.importance.update(self.raw_model, acc.scaler.get_scale() if acc.scaler is not None else 1.0)
            if tc.max_grad_norm > 0:
                norm = acc.clip_grad_norm_(self.model.parameters(), tc.max_grad_norm)
            elif acc.scaler is None:
                norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in self.model.parameters()
                         if p.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
            # under fp16 the GradScaler skips steps with inf gradients itself (and lowers its scale); gradients
            # are synced by now, so every process finds the same norm
            bad = acc.scaler is None and not bool(torch.isfinite(norm))
        if bad:
            self.nonfinite_steps += 1
            self.nonfinite_streak += 1
            self.skipped_since_log += 1
        else:
            self.nonfinite_streak = 0
            self.optimizer.step()
            if not acc.optimizer_step_was_skipped:
                self.scheduler.step()
            if self.adalora is not None:  # after the step, before zero_grad (it reads the gradients)
                self.adalora.update_and_allocate(self.step)
                self._update_ranks()  # its budget allocator may have masked singular values
        self.optimizer.zero_grad(set_to_none=True)

    def _end_step(self) -> None:
        """Everything after an optimizer step: observe, log, decide, evaluate, checkpoint, stop."""
        tc = self.cfg.train
        self.step += 1
        failpoint("step", self.step)
        self.trainable_sum += self.trainable
        self.bar.update(1)
        last = self.step >= self.total_steps
        decision_step = self.controller is not None and self.controller.is_decision_step(self.step)
        if decision_step or self.step % tc.logging_steps == 0 or last:
            self._observe()
        if tc.eval_steps and self.step % tc.eval_steps == 0 and not last:
            self.evals.append(self._eval_record())
        if self.nonfinite_streak >= tc.max_nonfinite_steps:
            self._stop_nonfinite()
        stop_signal = process_max(self.accelerator, self.signal or 0)[0]  # all processes stop, or none
        due = (tc.checkpoint_every and self.step % tc.checkpoint_every == 0) or last or stop_signal
        if due and self.nonfinite_streak == 0:  # a step in a non-finite streak is not a good state to keep
            self._checkpoint()
        if stop_signal:
            if self.main:
                write_marker(self.out, status="interrupted", step=self.step)
            raise Interrupted(stop_signal, self.step, self.last_checkpoint)

    def _observe(self) -> None:
        """Sync the pending step losses (averaged over processes), feed them to the controller, log, and
        carry out a decision. Only the last pending step can be a decision step."""
        losses = self.accelerator.reduce(torch.stack(self.pending), "mean").tolist()
        self.pending = []
        first = self.step - len(losses) + 1
        decision = None
        for i, value in enumerate(losses):
            if self.controller is not None:
                decision = self.controller.observe(first + i, value)
        if decision is not None and decision.window_loss is not None:
            self.checks.append({"step": decision.step, "action": decision.action, "reason": decision.reason})
        lr = self.scheduler.get_last_lr()[0]
        rec = {"step": self.step, "epoch": round(self.step / self.updates_per_epoch, 4),
               "loss": sum(losses) / len(losses), "lr": lr,
               "rank": self.rank_max, "rank_mean": self.rank_mean}  # the ranks these steps trained at
        if self.skipped_since_log:
            rec["skipped_nonfinite"] = self.skipped_since_log
            self.skipped_since_log = 0
        self.log.append(rec)
        if self.main:
            self.log_w.write(rec)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", rank=rec["rank"], lr=f"{lr:.2e}")
        if decision is not None and decision.action != "hold":
            self._apply(decision)
        if self.importance is not None and self.controller.is_check_step(self.step):
            self.importance.reset()  # importance is accumulated over one check window

    def _apply(self, decision: Any) -> None:
        tc = self.cfg.train
        raw = self.raw_model
        start = time.perf_counter()
        details = apply_decision(raw, self.optimizer, decision, self.cfg.adarank, seed=tc.seed,
                                 importance=self.importance)
        restart_schedule(self.scheduler, decision.step)
        digests = agree(self.accelerator, raw, f"the rank change at step {decision.step}")
        if not get_strategy(self.cfg.adarank.strategy).keeps_shapes:  # DDP registered the old parameters
            self.model = rewrap_model(self.accelerator, self.model, raw)
        self._update_ranks()
        if decision.grow:  # per-layer growth grew some modules only: the model's ranks decide what is left
            self.controller.ranks_changed(decision.step, self.rank_max, min(lora_ranks(raw).values()))
        seconds = time.perf_counter() - start  # surgery and optimizer re-pointing
        self.decision_time += seconds
        event = {**decision_record(decision), "to_rank": self.rank_max, "rank_mean": self.rank_mean,
                 "seconds": seconds, "param_digests": digests, **details}
        self.events.append(event)
        if self.main:
            self.ev_w.write(event)
        self.bar.set_description(self._desc())

    # ------------------------------------------------------------------ checkpoints, signals, faults
    def _checkpoint(self) -> None:
        from accelerate.utils import gather_object

        start = time.perf_counter()
        acc = self.accelerator
        own = self._own_state()
        processes = gather_object([own]) if acc.num_processes > 1 else [own]
        if self.main:
            self.last_checkpoint = write_checkpoint(self.out, self.step, model_tensors(self.raw_model),
                                                    self._state(processes), self.cfg.train.keep_checkpoints)
            mark_running(self.out, self.step)
        acc.wait_for_everyone()
        self.checkpoint_time += time.perf_counter() - start

    def _catch_signals(self) -> dict:
        """SIGINT/SIGTERM set a flag that the loop acts on after the current step; repeats are ignored."""

        def stop(signum, _frame):
            if self.signal is None:
                self.signal = signum

        try:
            return {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: signals stay as they are
            return {}

    def _stop_nonfinite(self) -> None:
        tc = self.cfg.train
        first = self.step - self.nonfinite_streak + 1
        kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
        message = (f"the loss became non-finite at step {first}: {self.nonfinite_streak} steps in a row skipped "
                   f"(train.max_nonfinite_steps={tc.max_nonfinite_steps}); {kept}")
        if self.pending:
            self._observe()
        if self.main:
            results = self._results("nonfinite_loss")
            results["error"] = message
            write_json(os.path.join(self.out, "results.json"), results)
            write_marker(self.out, status="nonfinite_loss", step=self.step)
        self.accelerator.wait_for_everyone()
        raise NonFiniteLoss(message, first, self.last_checkpoint)

    # ------------------------------------------------------------------ outputs
    def _open_outputs(self) -> None:
        """Make the output directory this run's: new, overwritten (only run files removed) or resumed (the
        logs rewritten from the checkpoint, so lines written after it by the stopped process go)."""
        if self.main:
            out = self.out
            if self.out_mode == "overwrite":
                clear_run(out)
            os.makedirs(out, exist_ok=True)
            clean_partial(out)
            for stale in ("results.json", "training.png", "model"):  # a resumed run writes them again at its end
                path = os.path.join(out, stale)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.unlink(path)
            mark_running(out, self.step)
            write_yaml(os.path.join(out, "config.yaml"), self.cfg.to_dict())
            self.log_w = JsonlWriter(os.path.join(out, "log.jsonl"), self.log)
            self.ev_w = JsonlWriter(os.path.join(out, "rank_events.jsonl"), self.events)
        self.accelerator.wait_for_everyone()

    def _finish(self) -> dict:
        results = self._results("complete")
        if self.main:
            if self.cfg.train.save_model:
                self._save_model(os.path.join(self.out, "model"))
            write_json(os.path.join(self.out, "results.json"), results)
            if self.log:
                cfg = self.cfg
                what = f"{cfg.adarank.strategy}/{cfg.adarank.criterion}" if self.method == "adarank" else self.method
                plot_training(self.log, self.events, self.evals, os.path.join(self.out, "training.png"),
                              title=f"{cfg.data.task} · {cfg.model.name_or_path} · {what}")
            write_marker(self.out, status="complete", step=self.step)
        self.accelerator.wait_for_everyone()
        return results

    def _update_ranks(self) -> None:
        _, self.rank_max, self.rank_mean = rank_summary(self.raw_model)
        self.trainable = count_trainable(self.raw_model)

    def _desc(self) -> str:
        return f"{self.cfg.data.task} r={self.rank_max}" + (f" (mean {self.rank_mean:.1f})" if self.rank_mean != self.rank_max else "")

    def _save_model(self, out_dir: str) -> None:
        """Write into a temporary sibling, then rename: a model/ directory is always complete."""
        tmp = os.path.join(os.path.dirname(out_dir), ".tmp-" + os.path.basename(out_dir))
        shutil.rmtree(tmp, ignore_errors=True)
        if self.method in ("head", "full", "zero_shot"):  # a plain transformers model
            self.raw_model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        else:
            save_run_model(self.raw_model, self.tokenizer, tmp, self.cfg.model.name_or_path, self.kind,
                           self.task.num_labels, self.cfg.model.quantization)
        os.rename(tmp, out_dir)

    def _eval_record(self) -> dict:
        start = time.perf_counter()
        m = self.evaluate()
        self.eval_time += time.perf_counter() - start
        rec = {"step": self.step, "epoch": round(self.step / self.updates_per_epoch, 4), "rank": self.rank_max,
               "rank_mean": self.rank_mean, **m}
        self.accelerator.print(f"eval step {self.step}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
        return rec

    def _results(self, status: str) -> dict:
        cfg, steps = self.cfg, self.step
        ranks, rank_max, rank_mean = rank_summary(self.raw_model)
        wall = self.elapsed + time.time() - self.started
        train_time = wall - self.eval_time - self.decision_time - self.checkpoint_time
        return {
            "status": status,
            "task": cfg.data.task,
            "model": cfg.model.name_or_path,
            "model_path": self.model_path,
            "method": self.method,
            "strategy": cfg.adarank.strategy,
            "criterion": cfg.adarank.criterion,
            "growth_enabled": cfg.adarank.growth_enabled,
            "seed": cfg.train.seed,
            "final": {k: v for k, v in self.evals[-1].items() if k not in ("step", "epoch", "rank")} if self.evals else None,
            "evals": self.evals,
            "rank_events": self.events,
            "rank_schedule": [self.rank0] + [e["to_rank"] for e in self.events if e["action"] == "grow"],
            "growth_events": sum(e["action"] == "grow" for e in self.events),
            "checks": self.checks,
            "pruned": any(e["action"] == "prune" for e in self.events),
            "final_rank": rank_max,
            "final_rank_mean": rank_mean,
            "final_ranks": ranks,
            "trainable_params_final": self.trainable,
            "trainable_params_avg": self.trainable_sum / max(1, steps),
            "steps": steps,
            "nonfinite_steps": self.nonfinite_steps,
            "resumes": self.resumes,
            "wall_time_s": wall,
            "train_time_s": train_time,  # the loop without evaluation, rank decisions and checkpoints
            "eval_time_s": self.eval_time,
            "decision_time_s": self.decision_time,
            "checkpoint_time_s": self.checkpoint_time,
            "step_time_s": train_time / steps if steps else None,
            "peak_rss_mb": peak_rss_mb(),
            "num_processes": self.accelerator.num_processes,
            "mixed_precision": self.accelerator.mixed_precision,
            "versions": package_versions(),
            "config": cfg.to_dict(),
        }


def train(cfg: RunConfig, model: Any = None, tokenizer: Any = None, resume: bool = False, overwrite: bool = False) -> dict:
    """Train one run as `cfg` says and write its outputs into `cfg.train.output_dir`. A prebuilt base
    `model` and `tokenizer` may be passed (tests use tiny ones). `resume` continues the run there from its
    newest checkpoint; `overwrite` replaces a run there."""
    return Run(cfg, model=model, tokenizer=tokenizer, resume=resume, overwrite=overwrite).train()


__all__ = ["Interrupted", "NonFiniteLoss", "Run", "train"]
