"""AdaRank for the HF `Trainer` / `Seq2SeqTrainer`: a thin adapter over the controller, the surgery and the
optimizer re-pointing that our loop uses.

    trainer = Trainer(model=peft_model, args=args, ...)        # any optim / lr_scheduler_type, or optimizers=
    AdaRankCallback(AdaRankConfig(...)).attach(trainer)
    trainer.train()

`attach` registers the callback and wraps three of the Trainer's methods on this instance:

- `training_step`, to record the loss of every micro-batch as the Trainer accumulates it (already divided
  for gradient accumulation, or normalised by `num_items_in_batch`): their sum is the step's mean loss,
  which, averaged over processes, goes to the controller at the step's end;
- `accelerator.clip_grad_norm_`, to read per-layer importance before the gradients are clipped (as our
  loop does); without clipping it is read in `on_pre_optimizer_step`;
- (checkpoints: see `on_save` and `_restore`.)

On a rank change the model is changed in place (the Trainer keeps its model object) and the Trainer's own
optimizer gets the new parameters in place of the old ones (`optim.repoint_optimizer`): its class,
hyperparameters and groups -- from `args.optim`, or the optimizer passed with `optimizers=` -- stay, and
so do the LR scheduler (whatever `lr_scheduler_type`, or the user's own), the GradScaler and the callback
handler's references. In several processes the Trainer holds its DDP-wrapped model for the whole run, so
only the shape-preserving strategy `masked` can grow there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import TrainerCallback

from .config import AdaRankConfig
from .controller import RankController, decision_record
from .importance import ImportanceTracker
from .optim import apply_decision, repoint_optimizer, snapshot_optimizer
from .surgery import allocate_masked, get_strategy, rank_summary


class AdaRankCallback(TrainerCallback):
    def __init__(self, config: AdaRankConfig):
        self.config = config
        self.controller = RankController.from_config(config)
        self.importance = ImportanceTracker(config.importance) if config.grow_top_k is not None else None
        self.trainer: Any = None
        self.events: list[dict] = []
        self.losses: list[float] = []  # per optimizer step, as handed to the controller
        self._micro: list[torch.Tensor] = []
        self._importance_due = False

    @property
    def model(self) -> Any:
        """The unwrapped PEFT model the Trainer trains."""
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def attach(self, trainer: Any) -> "AdaRankCallback":
        if self.config.rewarmup_steps:
            raise ValueError("adarank.rewarmup_steps is our loop's re-warmup (adarank train); with the Trainer the LR "
                             "follows its own lr_scheduler_type across rank changes: set rewarmup_steps to 0")
        self.trainer = trainer
        trainer.add_callback(self)
        if self.config.strategy == "masked":
            snapshot = snapshot_optimizer(self.model, trainer.optimizer) if trainer.optimizer is not None else None
            allocate_masked(self.model, self.config.r_max)
            if snapshot is not None:  # an optimizer passed with optimizers=: give it the allocated factors
                repoint_optimizer(trainer.optimizer, self.model, snapshot, {})
        step = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            loss = step(model, inputs, *args, **kwargs)
            self._micro.append(loss.detach().float())
            self._importance_due = self.importance is not None
            return loss

        trainer.training_step = training_step
        clip = trainer.accelerator.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            self._read_importance()
            return clip(parameters, max_norm, *args, **kwargs)

        trainer.accelerator.clip_grad_norm_ = clip_grad_norm_
        return self

    def _read_importance(self) -> None:
        if self._importance_due:
            self.importance.update(self.model)
            self._importance_due = False

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("AdaRankCallback needs attach(trainer) before training")
        if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
            raise ValueError("AdaRankCallback does not support FSDP or DeepSpeed (they shard the parameters whose rows "
                             "growth writes); train data-parallel (DDP) with adarank.strategy='masked'")
        processes = trainer.accelerator.num_processes
        if processes > 1 and not get_strategy(self.config.strategy).keeps_shapes:
            raise ValueError(
                f"AdaRankCallback in {processes} processes needs adarank.strategy='masked': merge and expand change "
                "parameter shapes, and the Trainer keeps its DDP-wrapped model for the whole run, which a callback "
                f"cannot re-wrap (or train with `adarank train --nproc-per-node {processes}`)")
        if state.global_step == 0 and self.controller.last_step > 0:  # a second trainer.train(): start counting again
            _, rank, _ = rank_summary(self.model)
            self.controller = RankController.from_config(dataclasses.replace(self.config, r0=rank))
        self.controller.total_steps = state.max_steps
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._read_importance()  # when nothing was clipped
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if not self._micro:
            return control
        acc = self.trainer.accelerator
        loss = acc.reduce(torch.stack(self._micro).sum(), "mean").item()
        self._micro = []
        self.losses.append(loss)
        decision = self.controller.observe(state.global_step, loss)
        if decision.action != "hold":
            details = apply_decision(self.model, self.trainer.optimizer, decision, self.config, seed=args.seed,
                                     importance=self.importance)
            _, rank_max, rank_mean = rank_summary(self.model)
            self.events.append({**decision_record(decision), "to_rank": rank_max, "rank_mean": rank_mean, **details})
        if self.importance is not None and self.controller.is_check_step(state.global_step):
            self.importance.reset()
        return control
