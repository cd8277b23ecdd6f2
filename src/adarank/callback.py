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
- `_load_from_checkpoint` and `_load_best_model`, to give the model the checkpoint's ranks and merged base
  weights before the Trainer loads the checkpoint's adapter into it (and, on resume, the controller's state),
  and `save_model`, so that what it writes is whole (below).

Checkpoints: `on_save` adds `adarank/` to every Trainer checkpoint -- per-module ranks, the base weights merge
changed and the merged updates (exactly), the controller, importance and events -- beside the checkpoint's
adapter, which stays relative to the current base as the Trainer's own loading needs. `trainer.save_model`
then rewrites the adapter it saved, when merge folded updates into the base or masked holds zero rows, as
one relative to the original base (`export.write_adapter`; expand's adapter is that already), so
`PeftModel.from_pretrained(original_base, dir)` reproduces the trained model under every strategy, and adds
`adarank/` (without merged weights: that adapter already holds them).

On a rank change the model is changed in place (the Trainer keeps its model object) and the Trainer's own
optimizer gets the new parameters in place of the old ones (`optim.repoint_optimizer`): its class,
hyperparameters and groups -- from `args.optim`, or the optimizer passed with `optimizers=` -- stay, and
so do the LR scheduler (whatever `lr_scheduler_type`, or the user's own), the GradScaler and the callback
handler's references. In several processes the Trainer holds its DDP-wrapped model for the whole run, so
only the shape-preserving strategy `masked` can grow there.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from transformers import TrainerCallback

from .config import AdaRankConfig
from .controller import RankController, decision_record
from .importance import ImportanceTracker
from .checkpoint import model_tensors, read_checkpoint, restore_model, write_state_dir
from .export import write_adapter
from .distributed import agree
from .optim import apply_decision, repoint_optimizer, snapshot_optimizer
from .surgery import (FRESH, MERGED_DELTA_ATTR, allocate_masked, check_growable, factor_names, get_strategy, lora_layers,
                      lora_ranks, rank_summary)

STATE_DIR = "adarank"  # in Trainer checkpoints and save_model outputs


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
        self._check_model()
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
        self._wrap_clip()
        load_checkpoint, load_best, save = trainer._load_from_checkpoint, trainer._load_best_model, trainer.save_model
        push = trainer._push_from_checkpoint

        def _load_from_checkpoint(resume_from_checkpoint, *args, **kwargs):
            self._restore(resume_from_checkpoint, resume=True)
            return load_checkpoint(resume_from_checkpoint, *args, **kwargs)

        def _load_best_model(*args, **kwargs):
            self._restore(trainer.state.best_model_checkpoint, resume=False)
            return load_best(*args, **kwargs)

        def save_model(output_dir=None, _internal_call=False):
            save(output_dir, _internal_call)
            # a checkpoint (the Trainer's internal save into checkpoint-N) keeps its live adapter; what the user
            # saves, and what push_to_hub saves into output_dir, gets the adapter of the original base
            if trainer.args.should_save and (not _internal_call or output_dir is None):
                out = output_dir if output_dir is not None else trainer.args.output_dir
                if getattr(self.model, MERGED_DELTA_ATTR, None) or self.config.strategy == "masked":
                    write_adapter(self.model, out)  # merged updates folded in; masked zero rows dropped
                self.save_state(out, whole=True)

        def _push_from_checkpoint(checkpoint_folder, *args, **kwargs):  # before on_save: add our state first
            if trainer.args.should_save:
                self.save_state(checkpoint_folder)
            return push(checkpoint_folder, *args, **kwargs)

        trainer._load_from_checkpoint, trainer._load_best_model = _load_from_checkpoint, _load_best_model
        trainer.save_model, trainer._push_from_checkpoint = save_model, _push_from_checkpoint
        return self

    def _check_model(self) -> None:
        """At attach, not at the first growth: what growth could not do exactly (`surgery.check_growable`), a
        rank other than r0, and an optimizer passed with optimizers= that does not hold the LoRA factors."""
        model = self.model
        try:
            check_growable(model, self.config.strategy)
        except ValueError as exc:
            raise ValueError(f"AdaRankCallback: {exc}") from None
        ranks = set(lora_ranks(model).values())
        if ranks != {self.config.r0}:
            raise ValueError(f"the model's LoRA rank is {sorted(ranks)} but AdaRankConfig.r0 is {self.config.r0}: "
                             "set r0 to the rank the model was built with")
        if self.trainer.optimizer is not None:
            inner = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
            held = {id(p) for g in inner.param_groups for p in g["params"]}
            left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held and "lora_" in n]
            if left:
                raise ValueError(f"the optimizer passed to the Trainer does not hold the LoRA factors {left[:3]}: "
                                 "build it from the model's trainable parameters")

    def _wrap_clip(self) -> None:
        """Read importance before the Trainer clips the gradients (again when the Trainer made a new
        accelerator, as hyperparameter search does)."""
        acc = self.trainer.accelerator
        if getattr(acc, "_adarank_wrapped", False):
            return
        clip = acc.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            self._read_importance()
            return clip(parameters, max_norm, *args, **kwargs)

        acc.clip_grad_norm_, acc._adarank_wrapped = clip_grad_norm_, True

    def save_state(self, directory: str, whole: bool = False) -> str:
        """Write AdaRank's state into `directory`/adarank (atomically). `whole`: the adapter beside it is
        relative to the original base already, so merged base weights are not part of it."""
        tensors = {} if whole else model_tensors(self.model, trainable=False)
        state = {"format": 1, "config": dataclasses.asdict(self.config), "adapter": "whole" if whole else "live",
                 "ranks": lora_ranks(self.model), "controller": self.controller.state_dict(),
                 "importance": {k: v.cpu() for k, v in self.importance.scores.items()} if self.importance else None,
                 "events": self.events, "losses": self.losses}
        path = os.path.join(directory, STATE_DIR)
        write_state_dir(path, tensors, state, self.controller.last_step)
        return path

    def _restore(self, directory: str, resume: bool) -> None:
        """Before the Trainer loads the adapter of checkpoint `directory`: its ranks and merged base weights;
        with `resume`, also the controller, importance and events."""
        path = os.path.join(directory, STATE_DIR)
        if not os.path.isdir(path):
            raise ValueError(f"{directory} holds no AdaRank state ({STATE_DIR}/): it was not saved with "
                             "AdaRankCallback attached, so its ranks and the controller cannot be restored")
        tensors, state = read_checkpoint(path)
        if state["adapter"] != "live":
            raise ValueError(f"{directory}: a save_model output (its adapter is relative to the original base); "
                             "resume from a checkpoint-N directory")
        optimizer = self.trainer.optimizer  # one passed with optimizers=, or kept from an earlier train()
        snapshot = snapshot_optimizer(self.model, optimizer) if optimizer is not None else None
        restore_model(self.model, tensors, state["ranks"], path, trainable=False)
        if snapshot is not None:  # it must hold the resized factors; their state comes from the checkpoint
            repoint_optimizer(optimizer, self.model, snapshot,
                              {n: FRESH for name, _ in lora_layers(self.model) for n in factor_names(name)})
        if resume:
            self.controller.load_state_dict(state["controller"])
            if self.importance is not None and state["importance"] is not None:
                self.importance.scores = {k: v.to(self.trainer.accelerator.device) for k, v in state["importance"].items()}
            self.events, self.losses = state["events"], state["losses"]

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            self.save_state(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        return control

    def _read_importance(self) -> None:
        if self._importance_due:
            scaler = self.trainer.accelerator.scaler
            self.importance.update(self.model, scaler.get_scale() if scaler is not None else 1.0)
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
        self._wrap_clip()
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
            digests = agree(acc, self.model, f"the rank change at step {decision.step}")
            ranks, rank_max, rank_mean = rank_summary(self.model)
            if decision.grow:  # as our loop: per-layer growth leaves it to the modules' ranks
                self.controller.ranks_changed(decision.step, rank_max, min(ranks.values()))
            self.events.append({**decision_record(decision), "to_rank": rank_max, "rank_mean": rank_mean,
                                "param_digests": digests, **details})
        if self.importance is not None and self.controller.is_check_step(state.global_step):
            self.importance.reset()
        return control
