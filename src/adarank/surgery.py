"""Rank surgery on PEFT LoRA models: grow the rank of every adapted module without changing the outputs.

    merge:   W <- W + B·A·s ;  A' ~ kaiming (r' x in),  B' = 0 (out x r')       one fresh adapter
    expand:  A' = [A ; A_new] (r' x in),  B' = [B | 0] (out x r')              one adapter since the start

s = lora_alpha / r is kept constant (lora_alpha follows r), so old updates are never rescaled and
B'·A'·s == B·A·s right after growth. `merge` also accumulates the merged updates per base weight in
`model.adarank_merged_delta` (fp32, on CPU), so the run can be reloaded and exported relative to the
original base. Surgery only touches modules; optimizer consequences live in `optim.py`.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from .config import STRATEGIES

ADAPTER = "default"
MERGED_DELTA_ATTR = "adarank_merged_delta"


def lora_layers(model: nn.Module, adapter: str = ADAPTER) -> Iterator[tuple[str, nn.Module]]:
    """(module name, PEFT LoRA layer) for every module adapted by `adapter`."""
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter in lora_a:
            yield name, module


def lora_ranks(model: nn.Module, adapter: str = ADAPTER) -> dict[str, int]:
    """Module name -> current LoRA rank."""
    return {name: int(layer.r[adapter]) for name, layer in lora_layers(model, adapter)}


def base_weight_name(module_name: str) -> str:
    """The original model's parameter name of an adapted module's weight."""
    prefix = "base_model.model."
    name = module_name[len(prefix):] if module_name.startswith(prefix) else module_name
    return f"{name}.weight"


def grow_lora(
    model: nn.Module,
    new_rank: int,
    strategy: str = "merge",
    seed: int | None = None,
    adapter: str = ADAPTER,
) -> nn.Module:
    """Grow every LoRA module of `model` to rank `new_rank`, in place; returns the model to keep training.

    New A entries use PEFT's default init (kaiming-uniform, a=sqrt(5)) drawn from a generator seeded with
    `seed` when given, so that every process of a distributed run draws the same numbers."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    layers = list(lora_layers(model, adapter))
    if not layers:
        raise ValueError(f"model has no LoRA modules for adapter {adapter!r}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    merged = getattr(model, MERGED_DELTA_ATTR, None)
    if merged is None:
        merged = {}
        setattr(model, MERGED_DELTA_ATTR, merged)
    for name, layer in layers:
        old_rank = int(layer.r[adapter])
        if new_rank < old_rank:
            raise ValueError(f"{name}: new rank {new_rank} is below the current rank {old_rank}; use pruning to shrink")
        if new_rank == old_rank:
            continue
        if not isinstance(layer.get_base_layer(), nn.Linear) or layer.use_dora.get(adapter, False):
            raise NotImplementedError(f"{name}: rank growth supports plain LoRA on nn.Linear only")
        if layer.use_rslora.get(adapter, False):
            raise NotImplementedError(f"{name}: rank growth with use_rslora is not supported (scaling depends on r)")
        scaling = float(layer.scaling[adapter])
        lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
        weight = lora_a.weight
        if strategy == "merge":
            delta = layer.get_delta_weight(adapter)
            base = layer.get_base_layer().weight
            with torch.no_grad():
                base.add_(delta.to(base.dtype))
            key = base_weight_name(name)
            d32 = delta.detach().float().cpu()
            merged[key] = merged[key] + d32 if key in merged else d32
            new_a = _new_a(new_rank, layer.in_features, gen)
            new_b = torch.zeros(layer.out_features, new_rank)
        else:
            new_a = torch.cat([lora_a.weight.detach().float().cpu(), _new_a(new_rank - old_rank, layer.in_features, gen)])
            new_b = torch.cat(
                [lora_b.weight.detach().float().cpu(), torch.zeros(layer.out_features, new_rank - old_rank)], dim=1
            )
        layer.lora_A[adapter] = _linear(new_a, weight)
        layer.lora_B[adapter] = _linear(new_b, weight)
        layer.r[adapter] = new_rank
        layer.lora_alpha[adapter] = scaling * new_rank
        layer.scaling[adapter] = scaling
    _sync_peft_config(model, adapter, layers)
    return model


def _new_a(rows: int, cols: int, gen: torch.Generator | None) -> torch.Tensor:
    # nn.init.kaiming_uniform_(a=sqrt(5)) as PEFT / nn.Linear do: bound = 1 / sqrt(fan_in)
    bound = 1.0 / math.sqrt(cols)
    return torch.rand(rows, cols, generator=gen) * (2 * bound) - bound


def _linear(weight: torch.Tensor, like: torch.Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.to(like.dtype))
    lin.weight.requires_grad_(True)
    return lin


def _sync_peft_config(model: nn.Module, adapter: str, layers: list[tuple[str, nn.Module]]) -> None:
    """Keep `model.peft_config` describing the layers (r, lora_alpha, and per-module patterns)."""
    config = getattr(model, "peft_config", {}).get(adapter)
    if config is None:
        return
    ranks = {name: int(layer.r[adapter]) for name, layer in layers}
    alphas = {name: float(layer.lora_alpha[adapter]) for name, layer in layers}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    config.r = common
    config.lora_alpha = next(alphas[n] for n, r in ranks.items() if r == common)
    prefix = "base_model.model."
    config.rank_pattern = {n[len(prefix):] if n.startswith(prefix) else n: r for n, r in ranks.items() if r != common}
    config.alpha_pattern = {
        (n[len(prefix):] if n.startswith(prefix) else n): alphas[n] for n, r in ranks.items() if r != common
    }


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
