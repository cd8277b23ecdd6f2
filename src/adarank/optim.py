"""The optimizer and the LR schedule around rank changes.

`apply_decision` (grow or prune, then `repoint_optimizer`) is what our loop and the Trainer callback both call.

Surgery replaces LoRA Parameters (merge, expand, prune), so the optimizer would keep updating tensors the
model no longer uses. Instead of building another optimizer, `repoint_optimizer` puts each new Parameter
into the optimizer's own param groups in place of the one it replaces (matched by parameter name). The
optimizer therefore keeps its class, hyperparameters and grouping -- our AdamW, whatever the Trainer built
from `args.optim` (fused AdamW, Adafactor, 8-bit, ...), or an optimizer the user passed -- and everything
that holds it stays valid: Accelerate's wrapper and GradScaler, the LR scheduler, the Trainer and its
callback handler. The state of each parameter, as `grow_lora` says:

- KEPT (a parameter surgery did not replace, the head): unchanged;
- GROWN (`expand`, and `masked`, whose activated rows are the new entries): gradient moments (Adam's,
  SGD's momentum, ...) are zero-padded for the new rows of A and columns of B -- masked's inactive rows
  hold zero moments already -- and the step count is kept; with our loop's `GrowableAdamW` the new entries
  also get their own bias correction (they start exactly as a fresh parameter would; with another optimizer
  they share the tensor's step count); any other state (Adafactor's factored moments, 8-bit quantization
  maps, schedule-free's weight copies) would be wrong padded, so that parameter starts fresh;
- FRESH (`merge`'s new adapter, and every LoRA factor after a prune, whose coordinates the SVD changed):
  no state -- the optimizer initialises it at the next step, as for a new parameter.

LR schedule: one scheduler for the whole run, never rebuilt, since the optimizer object stays. Our loop's
is `train.lr_scheduler` (any transformers schedule, with `warmup_ratio` of the run warming up);
`rewarmup_steps > 0` multiplies it by a linear ramp from 0 over that many steps after each rank change, as
ReLoRA does after its resets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .surgery import FRESH, GROWN, KEPT, factor_names, grow_lora, lora_layers, lora_ranks, prune_lora

RESTART_ATTR = "adarank_restart"  # on our LambdaLR: the step of the last rank change (for the re-warmup ramp)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW (`GrowableAdamW`) over the trainable parameters; no weight decay on biases and norm weights
    (ndim < 2)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return GrowableAdamW([g for g in groups if g["params"]], lr=lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    name: str = "linear",
    kwargs: dict | None = None,
    rewarmup_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedule `name` over the whole run; with `rewarmup_steps`, a linear ramp from 0 back to
    it over that many steps after each `restart_schedule`."""
    from transformers import get_scheduler

    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                              scheduler_specific_kwargs=kwargs or {})
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ValueError(f"train.lr_scheduler: {name!r} is not a schedule of the step alone")
    setattr(scheduler, RESTART_ATTR, 0)
    if rewarmup_steps:
        scheduler.lr_lambdas = [_ramped(f, scheduler, rewarmup_steps) for f in scheduler.lr_lambdas]
    return scheduler


def _ramped(base, scheduler, steps: int):
    def factor(step: int) -> float:
        restart = getattr(scheduler, RESTART_ATTR)
        return base(step) * (min(1.0, (step - restart + 1) / steps) if restart > 0 else 1.0)

    return factor


def restart_schedule(scheduler: Any, step: int) -> None:
    """Start the re-warmup ramp (if the schedule has one) at `step`: the next optimizer step uses
    base(step) / rewarmup_steps."""
    if getattr(scheduler, RESTART_ATTR, None) is None:
        return
    setattr(scheduler, RESTART_ATTR, step)
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def snapshot_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple[nn.Parameter, dict]]:
    """Name -> (parameter, its optimizer state), taken before surgery."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
    return {n: (p, inner.state.get(p, {})) for n, p in model.named_parameters() if p.requires_grad}


# Per-parameter state of torch's optimizers that accumulates gradients, so that a new entry's right value is
# 0: Adam/AdamW/Adamax/NAdam/RAdam moments, AMSGrad's max, SGD momentum, RMSprop, Adagrad, Adadelta.
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg", "grad_avg",
           "sum", "acc_delta", "mu_product")


def _padded(state: dict, old: nn.Parameter, new: nn.Parameter) -> dict | None:
    """`state` for `new` (old's shape grown, or old itself with rows activated): moments zero-padded, 0-d
    tensors and numbers (the step) kept; None when some state is anything else -- factored (Adafactor),
    quantized (8-bit), a copy of the weights (schedule-free) -- which zero padding would get wrong."""
    if new.ndim != old.ndim or any(a < b for a, b in zip(new.shape, old.shape)):
        return None
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape and key in MOMENTS:
            padded = torch.zeros_like(new, dtype=value.dtype)
            padded[tuple(slice(0, s) for s in old.shape)] = value
            out[key] = padded
        elif not torch.is_tensor(value) or value.ndim == 0:
            out[key] = value.clone() if torch.is_tensor(value) else value
        else:
            return None
    return out


def repoint_optimizer(optimizer: Any, model: nn.Module, snapshot: dict[str, tuple[nn.Parameter, dict]],
                      fates: dict[str, str]) -> None:
    """Put the model's current trainable parameters into `optimizer` in place of those they replace (by
    name, as in `snapshot`) and carry their state as `fates` says (parameter name -> KEPT, GROWN, FRESH;
    a name not in it is KEPT). See the module doc."""
    inner = getattr(optimizer, "optimizer", optimizer)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    name_of = {id(old): n for n, (old, _) in snapshot.items()}
    for group in inner.param_groups:
        kept = []
        for old in group["params"]:
            name = name_of.get(id(old))
            if name in params:
                kept.append(params[name])
        group["params"] = kept
    for name, new in params.items():  # (a trainable parameter the optimizer never held stays out of it)
        old, state = snapshot.get(name, (new, {}))
        fate = fates.get(name, KEPT)
        kind = fate[0] if isinstance(fate, tuple) else fate
        if kind == KEPT and new is old:
            continue
        carried = state if kind == KEPT and new.shape == old.shape else _padded(state, old, new) if kind == GROWN else None
        if carried and kind == GROWN and isinstance(inner, GrowableAdamW):
            carried["born"] = _born(carried, new, *fate[1:])
        inner.state.pop(old, None)
        if carried:
            inner.state[new] = carried
        else:
            inner.state.pop(new, None)


def _born(state: dict, param: nn.Parameter, dim: int, start: int) -> torch.Tensor:
    """The step count each entry of a grown tensor was added at, along `dim` (broadcastable to it): entries
    from `start` on were added now."""
    born = torch.zeros(param.shape[dim], device=param.device)
    if "born" in state:  # entries added at earlier growths keep their age
        earlier = state["born"].flatten()
        born[: earlier.numel()] = earlier[: born.numel()]
    born[start:] = float(state.get("step", 0))
    return born.view(-1, 1) if dim == 0 else born.view(1, -1)


class GrowableAdamW(torch.optim.AdamW):
    """torch's AdamW, with tensors whose entries may differ in age. Growth adds rows of A and columns of B to
    a tensor that has taken many steps; with one step count per tensor, their bias correction would already
    be ≈ 1 with zero moments, so their first updates would be several times a fresh Adam's (about 1.6× after
    50 steps, 5× after 1000). `state["born"]` (set by `repoint_optimizer`) holds the step count each entry
    was added at, and such a tensor is stepped with the bias correction of each entry's own age: a new entry
    starts exactly as a freshly created parameter would, the old ones go on as they were. Tensors without
    it take torch's own AdamW step unchanged."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        aged = [(group, p) for group in self.param_groups for p in group["params"]
                if p.grad is not None and "born" in self.state.get(p, {})]
        if not aged:
            super().step()
            return loss
        held = [group["params"] for group in self.param_groups]
        skip = {id(p) for _, p in aged}
        try:
            for group in self.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in skip]
            super().step()
        finally:
            for group, params in zip(self.param_groups, held):
                group["params"] = params
        for group, p in aged:
            self._aged_step(group, p)
        return loss

    def _aged_step(self, group: dict, p: nn.Parameter) -> None:
        """AdamW's update (torch's single-tensor formulas) with a bias correction per entry."""
        state, grad = self.state[p], (-p.grad if group.get("maximize") else p.grad)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        age = float(state["step"]) - state["born"]
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        second = state["exp_avg_sq"]
        if group.get("amsgrad"):
            torch.maximum(state["max_exp_avg_sq"], second, out=state["max_exp_avg_sq"])
            second = state["max_exp_avg_sq"]
        denom = (second.sqrt() / (1 - beta2**age).sqrt()).add_(group["eps"])
        p.addcdiv_(state["exp_avg"] / (1 - beta1**age), denom, value=-group["lr"])


def grow_and_repoint(model: nn.Module, optimizer: Any, new_rank: int | dict[str, int], strategy: str, *,
                     seed: int) -> None:
    """Growth plus its optimizer consequences, for your own loop. `model` is the unwrapped PEFT model;
    use the same `seed` (e.g. seed + step) on every process."""
    snapshot = snapshot_optimizer(model, optimizer)
    repoint_optimizer(optimizer, model, snapshot, grow_lora(model, new_rank, strategy, seed=seed))


def apply_decision(model: nn.Module, optimizer: Any, decision: Any, cfg: Any, *, seed: int,
                   importance: Any = None) -> dict:
    """Carry out a controller decision (grow or prune) on the unwrapped PEFT `model` as the AdaRankConfig
    `cfg` says and re-point `optimizer`. Our loop and the Trainer callback both call this. Returns the
    details for the rank event. (Our loop then restarts its schedule's re-warmup ramp, if any.)"""
    snapshot = snapshot_optimizer(model, optimizer)
    if decision.prune:
        report = prune_lora(model, **cfg.prune_kwargs())
        fates = {n: FRESH for name, _ in lora_layers(model) for n in factor_names(name)}
        details = {"method": cfg.prune, "modules": report}
    else:
        target: int | dict[str, int] = decision.rank
        details = {}
        if cfg.grow_top_k is not None and importance is not None:
            ranks = lora_ranks(model)
            chosen = importance.top(cfg.grow_top_k, [n for n, r in ranks.items() if r < cfg.r_max])
            target = {n: min(ranks[n] + cfg.alpha, cfg.r_max) for n in chosen}
            details = {"modules": {n: {"from_rank": ranks[n], "to_rank": r} for n, r in target.items()}}
        fates = grow_lora(model, target, cfg.strategy, seed=seed + decision.step)
    repoint_optimizer(optimizer, model, snapshot, fates)
    return details


__all__ = ["GROWN", "FRESH", "KEPT", "GrowableAdamW", "apply_decision", "build_optimizer", "build_scheduler", "grow_and_repoint",
           "repoint_optimizer", "restart_schedule", "snapshot_optimizer"]
