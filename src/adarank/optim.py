"""Optimizer and LR schedule, built at the start and rebuilt after every rank change (the fp16 GradScaler is kept).

`apply_decision` (grow or prune, then rebuild) is what our loop and the Trainer callback both call. Surgery
replaces LoRA Parameters, so the old optimizer would keep updating tensors the model no longer uses; a new
AdamW is built over the current trainable parameters and the old state is carried as follows:

- a parameter that surgery did not replace (the classification head, modules that per-layer growth left
  alone): its AdamW state is kept;
- `expand`: the grown A and B inherit the moments of their old entries (zero-padded for the new rows of A
  and columns of B) and the step count, so old directions keep their adaptive step sizes while new ones
  start from zero moments;
- `merge`: the fresh adapter starts with empty state (as in the original notebook);
- prune: the re-factored A and B start with empty state (their coordinates changed with the SVD).

LR schedule: one global schedule over the whole run (linear warmup, then linear decay to 0 at the last
step). After a growth the new scheduler continues that global schedule at the current step, optionally
ramping up from 0 over `rewarmup_steps` (as ReLoRA does after each reset).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def linear_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor at optimizer step s: s/warmup during warmup, then linear decay to 0 at total_steps
    (the same curve as transformers' get_linear_schedule_with_warmup)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (ndim < 2)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    start_step: int = 0,
    rewarmup_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The global schedule, continued from `start_step`, with an optional re-warmup from there."""
    base = linear_schedule(total_steps, warmup_steps)

    def factor(local_step: int) -> float:
        ramp = min(1.0, (local_step + 1) / rewarmup_steps) if rewarmup_steps and start_step > 0 else 1.0
        return base(start_step + local_step) * ramp

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def snapshot_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple[nn.Parameter, dict]]:
    """Name -> (parameter, its optimizer state), taken before surgery."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
    return {n: (p, inner.state.get(p, {})) for n, p in model.named_parameters() if p.requires_grad}


def _carry_state(new: nn.Parameter, old: nn.Parameter, state: dict, grown: bool) -> dict | None:
    if new is old:
        return state
    if not grown or not state or new.ndim != old.ndim or any(a < b for a, b in zip(new.shape, old.shape)):
        return None
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            padded = torch.zeros_like(new, dtype=value.dtype)
            padded[tuple(slice(0, s) for s in old.shape)] = value
            out[key] = padded
        else:
            out[key] = value.clone() if torch.is_tensor(value) else value
    return out


def rebuild_after_growth(
    model: nn.Module,
    snapshot: dict[str, tuple[nn.Parameter, dict]],
    surgery: str,
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    step: int,
    rewarmup_steps: int = 0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """A new AdamW over the model's trainable parameters and the global LR schedule continued at `step`.
    `surgery` ("merge", "expand" or "prune") says how state is carried (see the module doc; after a prune
    the re-factored LoRA tensors start fresh, like after a merge)."""
    optimizer = build_optimizer(model, lr, weight_decay)
    for name, param in model.named_parameters():
        if param.requires_grad and name in snapshot:
            old, state = snapshot[name]
            carried = _carry_state(param, old, state, grown=surgery == "expand")
            if carried:
                optimizer.state[param] = carried
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, start_step=step, rewarmup_steps=rewarmup_steps)
    return optimizer, scheduler


def install_optimizer(accelerator: Any, old: Any, new: torch.optim.Optimizer) -> Any:
    """Wrap `new` for `accelerator` and drop `old` from the accelerator's bookkeeping so that the replaced
    tensors can be freed. The fp16 GradScaler is kept as it is: its loss scale was found over the run so
    far (a fresh one would start at 2^16 again and skip steps until it backs off), and it holds no state
    tied to an optimizer between steps."""
    if old in getattr(accelerator, "_optimizers", []):
        accelerator._optimizers.remove(old)
    return accelerator.prepare_optimizer(new)


def grow_and_rebuild(
    model: nn.Module,
    optimizer: Any,
    new_rank: int | dict[str, int],
    strategy: str,
    *,
    seed: int,
    step: int,
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    rewarmup_steps: int = 0,
    accelerator: Any = None,
) -> tuple[Any, torch.optim.lr_scheduler.LambdaLR]:
    """Growth plus its optimizer consequences. `model` is the unwrapped PEFT model; the generator seed is
    `seed + step`, equal on every process."""
    from .surgery import grow_lora

    snapshot = snapshot_optimizer(model, optimizer)
    grow_lora(model, new_rank, strategy, seed=seed + step)
    return _rebuild(model, optimizer, snapshot, strategy, lr, weight_decay, total_steps, warmup_steps, step,
                    rewarmup_steps, accelerator)


def _rebuild(model, old_optimizer, snapshot, surgery, lr, weight_decay, total_steps, warmup_steps, step,
             rewarmup_steps, accelerator):
    new_opt, scheduler = rebuild_after_growth(
        model, snapshot, surgery, lr, weight_decay, total_steps, warmup_steps, step, rewarmup_steps
    )
    if accelerator is not None:
        new_opt = install_optimizer(accelerator, old_optimizer, new_opt)
    return new_opt, scheduler


def apply_decision(
    model: nn.Module,
    optimizer: Any,
    decision: Any,
    cfg: Any,
    *,
    seed: int,
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    importance: Any = None,
    accelerator: Any = None,
) -> tuple[Any, torch.optim.lr_scheduler.LambdaLR, dict]:
    """Carry out a controller decision (grow or prune) on the unwrapped PEFT `model` as the AdaRankConfig
    `cfg` says, and rebuild optimizer and scheduler. Our loop and the Trainer callback both call this.
    Returns (optimizer, scheduler, details for the rank event)."""
    from .surgery import lora_ranks, prune_lora

    step = decision.step
    if decision.prune:
        snapshot = snapshot_optimizer(model, optimizer)
        report = prune_lora(model, **cfg.prune_kwargs())
        opt, sched = _rebuild(model, optimizer, snapshot, "prune", lr, weight_decay, total_steps, warmup_steps,
                              step, cfg.rewarmup_steps, accelerator)
        details = {"method": cfg.prune, "modules": report}
    else:
        target: int | dict[str, int] = decision.rank
        details = {}
        if cfg.grow_top_k is not None and importance is not None:
            ranks = lora_ranks(model)
            chosen = importance.top(cfg.grow_top_k, [n for n, r in ranks.items() if r < cfg.r_max])
            target = {n: min(ranks[n] + cfg.alpha, cfg.r_max) for n in chosen}
            details = {"modules": {n: {"from_rank": ranks[n], "to_rank": r} for n, r in target.items()}}
        opt, sched = grow_and_rebuild(
            model, optimizer, target, cfg.strategy, seed=seed, step=step, lr=lr, weight_decay=weight_decay,
            total_steps=total_steps, warmup_steps=warmup_steps, rewarmup_steps=cfg.rewarmup_steps,
            accelerator=accelerator,
        )
    return opt, sched, details
