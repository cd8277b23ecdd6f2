"""AdaRank for the HF `Trainer` / `Seq2SeqTrainer`: a thin adapter over the controller, surgery and the
optimizer rebuild that our loop uses.

    trainer = Trainer(model=peft_model, args=args, ...)
    AdaRankCallback(AdaRankConfig(...)).attach(trainer)
    trainer.train()

`attach` registers the callback and records the training loss of every micro-batch (by wrapping
`trainer.compute_loss`); at each optimizer step's end the mean over the step's micro-batches, averaged
over processes, goes to the controller. On growth the model is changed in place (so the Trainer keeps its
model object); the Trainer's optimizer and LR scheduler are replaced (Accelerate's GradScaler is kept).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from .config import AdaRankConfig
from .controller import RankController, decision_record
from .importance import ImportanceTracker
from .optim import apply_decision
from .surgery import rank_summary


class AdaRankCallback(TrainerCallback):
    def __init__(self, config: AdaRankConfig):
        self.config = config
        self.controller = RankController.from_config(config)
        self.importance = ImportanceTracker(config.importance) if config.grow_top_k is not None else None
        self.trainer: Any = None
        self.events: list[dict] = []
        self.losses: list[float] = []  # per optimizer step, as handed to the controller
        self._micro: list[torch.Tensor] = []

    def attach(self, trainer: Any) -> "AdaRankCallback":
        self.trainer = trainer
        trainer.add_callback(self)
        inner = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, **kwargs):
            result = inner(model, inputs, return_outputs=return_outputs, **kwargs)
            if model.training:
                loss = result[0] if return_outputs else result
                self._micro.append(loss.detach().float())
            return result

        trainer.compute_loss = compute_loss
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError("AdaRankCallback needs attach(trainer) before training")
        if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) != "linear":
            raise ValueError("AdaRankCallback continues a linear LR schedule after growth; set lr_scheduler_type='linear'")
        if self.trainer.accelerator.num_processes > 1:
            raise NotImplementedError(
                "AdaRankCallback runs in one process: the Trainer keeps its own reference to the DDP-wrapped model, "
                "which cannot be swapped from a callback. Use `adarank train` (our loop) under accelerate launch."
            )
        self.controller.total_steps = state.max_steps
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.importance is not None:
            self.importance.update(self.trainer.accelerator.unwrap_model(self.trainer.model))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if not self._micro:
            return control
        acc = self.trainer.accelerator
        loss = acc.reduce(torch.stack(self._micro).mean(), "mean").item()
        self._micro = []
        self.losses.append(loss)
        decision = self.controller.observe(state.global_step, loss)
        if decision.action != "hold":
            details = self._apply(decision, args, state)
            _, rank_max, rank_mean = rank_summary(self.trainer.accelerator.unwrap_model(self.trainer.model))
            self.events.append({**decision_record(decision), "to_rank": rank_max, "rank_mean": rank_mean, **details})
        if self.importance is not None and self.controller.is_check_step(state.global_step):
            self.importance.reset()
        return control

    def _apply(self, decision: Any, args: Any, state: Any) -> dict:
        trainer = self.trainer
        total = state.max_steps
        model = trainer.accelerator.unwrap_model(trainer.model)
        optimizer, scheduler, details = apply_decision(
            model, trainer.optimizer, decision, self.config, seed=args.seed, lr=args.learning_rate,
            weight_decay=args.weight_decay, total_steps=total, warmup_steps=args.get_warmup_steps(total),
            importance=self.importance, accelerator=trainer.accelerator,
        )
        trainer.optimizer, trainer.lr_scheduler = optimizer, scheduler
        return details
