"""Rank surgery on PEFT LoRA models: grow the rank of adapted modules without changing the outputs.

Three strategies, each a small object with one interface (`Strategy.grow` on one layer, returning what
the optimizer must do with the layer's factors; `keeps_shapes`):

    merge:   W <- W + B·A·s ;  A' ~ kaiming (r' x in),  B' = 0 (out x r')     a fresh adapter     (state: fresh)
    expand:  A' = [A ; A_new] (r' x in),  B' = [B | 0] (out x r')            one adapter, grown   (state: padded)
    masked:  A, B allocated at r_max from the start; rows of A and columns   shapes never change  (state: moments kept)
             of B beyond the active rank r are zero. Growth writes random rows A[r:r'] (B[:, r:r'] stays 0).

Why masked is exact: a zero row A[j] and a zero column B[:, j] give each other zero gradients (∂L/∂B[:, j]
needs A[j]·x, ∂L/∂A[j] needs B[:, j]), so every optimizer leaves them at zero, weight decay included; the
inactive part computes nothing and trains nothing until growth activates it. Parameters keep their
identity and shape, so DDP/FSDP wrappers and the optimizer stay valid (at the memory of r_max throughout).

s = lora_alpha / r is kept constant (lora_alpha follows r, or √r under rsLoRA; masked: lora_alpha is that
of r_max), so old updates are never rescaled and B'·A'·s == B·A·s right after growth. `merge` also keeps
the merged updates per base weight, as the low-rank parts they were, in `model.adarank_merged_delta`
(merged.py), so the run can be reloaded and exported relative to the original base. Surgery only touches modules;
optimizer consequences live in `optim.py`.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from .merged import MergedUpdate, mark_tied, merge_part, merges_beside

ADAPTER = "default"
MERGED_DELTA_ATTR = "adarank_merged_delta"
ACTIVE_ATTR = "adarank_active_r"  # on a masked layer: {adapter: active rank} (its PEFT `r` is the allocated r_max)

# What the optimizer does with a layer's factors after surgery (optim.repoint_optimizer): KEPT, FRESH, or
# (GROWN, dim, start) -- entries from `start` on along `dim` are new (A's rows, B's columns)
KEPT, GROWN, FRESH = "kept", "grown", "fresh"


def grown(start: int) -> tuple[tuple, tuple]:
    """The fates of A and B when rank `start` grew: A's new rows, B's new columns."""
    return (GROWN, 0, start), (GROWN, 1, start)


def lora_layers(model: nn.Module, adapter: str = ADAPTER) -> Iterator[tuple[str, nn.Module]]:
    """(module name, PEFT LoRA layer) for every module adapted by `adapter`."""
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter in lora_a:
            yield name, module


def active_rank(layer: nn.Module, adapter: str = ADAPTER) -> int:
    """The rank a layer uses: its PEFT `r`, or for a masked layer the active part of it."""
    active = getattr(layer, ACTIVE_ATTR, None)
    return int(active[adapter]) if active and adapter in active else int(layer.r[adapter])


def is_masked(layer: nn.Module, adapter: str = ADAPTER) -> bool:
    return adapter in (getattr(layer, ACTIVE_ATTR, None) or {})


def lora_ranks(model: nn.Module, adapter: str = ADAPTER) -> dict[str, int]:
    """Module name -> current LoRA rank (for masked layers: the active rank)."""
    return {name: active_rank(layer, adapter) for name, layer in lora_layers(model, adapter)}


def factor_names(name: str, adapter: str = ADAPTER) -> tuple[str, str]:
    """The parameter names of a LoRA module's A and B."""
    return f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"


def base_module_name(module_name: str) -> str:
    """A PeftModel module name as the original model names it (PEFT's rank_pattern keys use this too)."""
    return module_name.removeprefix("base_model.model.")


def base_weight_name(module_name: str) -> str:
    """The original model's parameter name of an adapted module's weight."""
    return f"{base_module_name(module_name)}.weight"


def adalora_ranks(model: nn.Module, adapter: str = ADAPTER) -> dict[str, int]:
    """Module name -> effective rank of a PEFT AdaLoRA module: the singular values its budget allocator
    keeps (the config's `rank_pattern`); init_r before the first allocation."""
    config = getattr(model, "peft_config", {}).get(adapter)
    pattern = getattr(config, "rank_pattern", None) or {}
    kept = {key.rsplit(".lora_E", 1)[0]: int(sum(mask)) for key, mask in pattern.items()}
    out = {}
    for name, module in model.named_modules():
        lora_e = getattr(module, "lora_E", None)
        if isinstance(lora_e, nn.ParameterDict) and adapter in lora_e:
            out[name] = kept.get(base_module_name(name), lora_e[adapter].numel())
    return out


def rank_summary(model: nn.Module, adapter: str = ADAPTER) -> tuple[dict[str, int], int, float]:
    """(ranks per module, max rank, mean rank) of LoRA or AdaLoRA modules; ({}, 0, 0.0) without adapters."""
    ranks = lora_ranks(model, adapter) or adalora_ranks(model, adapter)
    if not ranks:
        return {}, 0, 0.0
    return ranks, max(ranks.values()), sum(ranks.values()) / len(ranks)


class Merge:
    """Fold the live update away -- into the base weight, or beside it (see merged.py) -- and start a fresh
    adapter at the new rank (the original's rule). The folded update is kept as the low-rank part it was."""

    name, keeps_shapes = "merge", False

    def grow(self, name: str, layer: nn.Module, rank: int, gen: torch.Generator | None, merged: dict,
             adapter: str) -> str:
        key = base_weight_name(name)
        scaling = float(layer.scaling[adapter])
        part = (layer.lora_B[adapter].weight.detach().cpu().clone(), layer.lora_A[adapter].weight.detach().cpu().clone(),
                scaling)
        entry = merged.get(key) or merged.setdefault(key, MergedUpdate(merges_beside(layer)))
        merge_part(layer, entry, part)
        set_lora_factors(layer, _new_a(rank, layer.in_features, gen), torch.zeros(layer.out_features, rank),
                         scaling, adapter)
        return FRESH


class Expand:
    """Append rows to A (random) and columns to B (zero): one adapter since the start, new Parameters."""

    name, keeps_shapes = "expand", False

    def grow(self, name: str, layer: nn.Module, rank: int, gen: torch.Generator | None, merged: dict,
             adapter: str) -> str:
        old = int(layer.r[adapter])
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        new_a = torch.cat([a.detach().float().cpu(), _new_a(rank - old, layer.in_features, gen)])
        new_b = torch.cat([b.detach().float().cpu(), torch.zeros(layer.out_features, rank - old)], dim=1)
        set_lora_factors(layer, new_a, new_b, float(layer.scaling[adapter]), adapter)
        return grown(old)


class Masked:
    """Activate rows of an adapter allocated at r_max (`allocate_masked`): no tensor changes shape."""

    name, keeps_shapes = "masked", True

    def grow(self, name: str, layer: nn.Module, rank: int, gen: torch.Generator | None, merged: dict,
             adapter: str) -> str:
        if not is_masked(layer, adapter):
            raise ValueError(f"{name}: strategy masked needs adapters allocated at r_max first (allocate_masked)")
        old, allocated = active_rank(layer, adapter), int(layer.r[adapter])
        if rank > allocated:
            raise ValueError(f"{name}: rank {rank} exceeds the {allocated} rows allocated for masked growth")
        a = layer.lora_A[adapter].weight
        with torch.no_grad():
            a[old:rank] = _new_a(rank - old, layer.in_features, gen).to(a.dtype)
        getattr(layer, ACTIVE_ATTR)[adapter] = rank
        return grown(old)  # same tensors, new entries: their state starts as a fresh parameter's would


STRATEGIES = {s.name: s for s in (Merge(), Expand(), Masked())}


def get_strategy(name: str):
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {name!r}") from None


def grow_lora(
    model: nn.Module,
    new_rank: int | dict[str, int],
    strategy: str = "merge",
    seed: int | None = None,
    adapter: str = ADAPTER,
) -> dict[str, str]:
    """Grow LoRA modules of `model` in place. Returns, for the factors of every module that grew, what the
    optimizer must do with their state (parameter name -> KEPT, GROWN or FRESH; see `optim.repoint_optimizer`).

    `new_rank` is one rank for every module, or a dict module name -> rank for some of them (per-layer
    growth; the others keep their rank). New A entries use PEFT's default init (kaiming-uniform, a=sqrt(5))
    drawn from a generator seeded with `seed` when given, so that every process of a distributed run draws
    the same numbers."""
    grower = get_strategy(strategy)
    layers = list(lora_layers(model, adapter))
    if not layers:
        raise ValueError(f"model has no LoRA modules for adapter {adapter!r}")
    targets = new_rank if isinstance(new_rank, dict) else {name: new_rank for name, _ in layers}
    unknown = sorted(set(targets) - {name for name, _ in layers})
    if unknown:
        raise ValueError(f"not LoRA modules of this model: {unknown}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    merged = getattr(model, MERGED_DELTA_ATTR, None)
    if merged is None:
        merged = {}
        setattr(model, MERGED_DELTA_ATTR, merged)
    if grower.name == "merge":
        mark_tied(model, layers)
    fates = {}
    for name, layer in layers:
        old_rank, rank = active_rank(layer, adapter), targets.get(name)
        if rank is None or rank == old_rank:
            continue
        if rank < old_rank:
            raise ValueError(f"{name}: new rank {rank} is below the current rank {old_rank}; use prune_lora to shrink")
        problem = growth_problem(name, layer, grower.name, adapter)
        if problem:
            raise NotImplementedError(problem)
        if is_masked(layer, adapter) and grower.name != "masked":
            raise ValueError(f"{name}: the adapter is allocated for masked growth; grow it with strategy masked")
        fate = grower.grow(name, layer, rank, gen, merged, adapter)
        fates.update(zip(factor_names(name, adapter), fate if isinstance(fate, tuple) else (fate, fate)))
    _sync_peft_config(model, adapter, layers)
    return fates


def allocate_masked(model: nn.Module, r_max: int, adapter: str = ADAPTER) -> None:
    """Prepare every LoRA module for masked growth: allocate A and B at `r_max` rows/columns, the part
    beyond the current rank zero, so the function is unchanged; the current rank becomes the active one.
    Call it before the optimizer is built (or re-point the optimizer after it)."""
    layers = list(lora_layers(model, adapter))
    for name, layer in layers:
        if is_masked(layer, adapter):
            continue
        rank = int(layer.r[adapter])
        if rank > r_max:
            raise ValueError(f"{name}: rank {rank} exceeds r_max {r_max}")
        a, b = layer.lora_A[adapter].weight.detach().float().cpu(), layer.lora_B[adapter].weight.detach().float().cpu()
        set_lora_factors(layer, torch.cat([a, torch.zeros(r_max - rank, layer.in_features)]),
                         torch.cat([b, torch.zeros(layer.out_features, r_max - rank)], dim=1),
                         float(layer.scaling[adapter]), adapter)
        layer.__dict__.setdefault(ACTIVE_ATTR, {})[adapter] = rank
    _sync_peft_config(model, adapter, layers)


def resize_lora(model: nn.Module, ranks: dict[str, int], adapter: str = ADAPTER) -> None:
    """Give LoRA modules the ranks `ranks` (module name -> rank) with zero factors and the same scaling,
    ready for a state dict of those shapes to be loaded (resuming a run whose ranks changed). Masked layers
    keep their shapes; only their active rank is set."""
    layers = list(lora_layers(model, adapter))
    unknown = sorted(set(ranks) - {name for name, _ in layers})
    if unknown:
        raise ValueError(f"not LoRA modules of this model: {unknown}")
    for name, layer in layers:
        rank = ranks.get(name)
        if rank is None or rank == active_rank(layer, adapter):
            continue
        if is_masked(layer, adapter):
            getattr(layer, ACTIVE_ATTR)[adapter] = rank
            continue
        set_lora_factors(layer, torch.zeros(rank, layer.in_features), torch.zeros(layer.out_features, rank),
                         float(layer.scaling[adapter]), adapter)
    _sync_peft_config(model, adapter, layers)


GROWABLE_BASES = ("Linear", "Conv1D", "Linear8bitLt", "Linear4bit")  # nn.Linear, GPT-2's Conv1D, bitsandbytes


def growth_problem(name: str, layer: nn.Module, strategy: str, adapter: str = ADAPTER) -> str | None:
    """Why growth under `strategy` could not keep this LoRA layer's function exactly (None: it can).
    rsLoRA, fan_in_fan_out (Conv1D), DoRA and lora_bias are handled; DoRA and lora_bias only where the
    update B·A is extended rather than folded into the base (expand, masked)."""
    kind = type(layer.get_base_layer()).__name__
    if kind not in GROWABLE_BASES:
        return f"{name}: a LoRA layer on {kind} (rank surgery handles Linear, Conv1D and bitsandbytes Linear layers)"
    if getattr(layer, "merged", False):
        return f"{name}: its adapter is merged into the base weight (merge_adapter()); unmerge it first"
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and not layer.use_dora.get(adapter, False):
        return f"{name}: LoRA variant {type(variant).__name__} (growth keeps the function of plain LoRA and DoRA only)"
    if strategy == "merge":
        if layer.use_dora.get(adapter, False):
            return f"{name}: DoRA with strategy merge (DoRA's weight norm does not fold into the base); use expand or masked"
        if layer.lora_bias.get(adapter, False):
            return f"{name}: lora_bias with strategy merge; use expand or masked"
    return None


def check_growable(model: nn.Module, strategy: str, adapter: str = ADAPTER) -> None:
    """Refuse, before any step, a model whose rank surgery could not keep its function: one LoRA adapter
    named 'default' and active, on layers `growth_problem` accepts. Raises ValueError naming the module."""
    adapters = sorted(getattr(model, "peft_config", {}) or {})
    if adapters != [adapter]:
        raise ValueError(f"rank growth needs one LoRA adapter named {adapter!r}; the model has {adapters or 'none'}")
    config = model.peft_config[adapter]
    if type(config).__name__ != "LoraConfig":
        raise ValueError(f"rank growth needs a LoRA adapter; {adapter!r} is a {type(config).__name__}")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().split("_")[0] in ("pissa", "olora", "corda", "loftq", "lora"):  # lora_ga
        raise ValueError(f"init_lora_weights={init!r} rewrites the base weights at setup, so there is no original base "
                         "to grow and export against; use the default initialisation")
    active = getattr(model, "active_adapters", [adapter])
    if list(active) != [adapter]:
        raise ValueError(f"rank growth needs adapter {adapter!r} active; active: {list(active)}")
    for name, module in model.named_modules():
        if adapter in (getattr(module, "lora_embedding_A", None) or {}):
            raise ValueError(f"{name}: LoRA on an embedding (rank surgery handles Linear and Conv1D layers); leave "
                             "it out of target_modules")
    layers = list(lora_layers(model, adapter))
    if not layers:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter!r}")
    for name, layer in layers:
        problem = growth_problem(name, layer, strategy, adapter)
        if problem:
            raise ValueError(problem)


def set_lora_factors(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float, adapter: str = ADAPTER) -> None:
    """Give the layer an adapter of rank r = a.shape[0] with A = a (r x in), B = b (out x r) and the same
    `scaling`, built by PEFT's own `update_layer` (its layer type, dropout, rsLoRA and DoRA handled as PEFT
    does); lora_alpha follows r (rsLoRA: √r). A DoRA magnitude and a lora_bias are kept. The new factors
    keep the old ones' dtype (PEFT would cast them to a low-precision base's)."""
    from peft import LoraConfig

    rank = a.shape[0]
    like = layer.lora_A[adapter].weight
    rslora, dora = bool(layer.use_rslora.get(adapter, False)), bool(layer.use_dora.get(adapter, False))
    bias = layer.lora_B[adapter].bias
    bias = bias.detach().clone() if bias is not None else None
    magnitude = layer.lora_magnitude_vector[adapter].weight.detach().clone() if dora else None
    dropout = getattr(layer.lora_dropout[adapter], "p", 0.0)
    alpha = scaling * (math.sqrt(rank) if rslora else rank)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, use_dora=dora,
                        lora_bias=bias is not None, init_lora_weights=True)
    layer.update_layer(adapter, rank, alpha, config)
    with torch.no_grad():
        for module, value in ((layer.lora_A[adapter], a), (layer.lora_B[adapter], b)):
            module.to(device=like.device, dtype=like.dtype)
            module.weight.copy_(value.to(like))
        if bias is not None:
            layer.lora_B[adapter].bias.copy_(bias.to(like))
        if magnitude is not None:
            layer.lora_magnitude_vector[adapter].to(dtype=magnitude.dtype)
            layer.lora_magnitude_vector[adapter].weight.copy_(magnitude)
    layer.scaling[adapter] = scaling  # = lora_alpha / r (or / √r) by construction; kept exact, not recomputed


def _new_a(rows: int, cols: int, gen: torch.Generator | None) -> torch.Tensor:
    # nn.init.kaiming_uniform_(a=sqrt(5)) as PEFT / nn.Linear do: bound = 1 / sqrt(fan_in)
    bound = 1.0 / math.sqrt(cols)
    return torch.rand(rows, cols, generator=gen) * (2 * bound) - bound


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
    config.rank_pattern = {base_module_name(n): r for n, r in ranks.items() if r != common}
    config.alpha_pattern = {base_module_name(n): alphas[n] for n, r in ranks.items() if r != common}


def count_trainable(model: nn.Module, adapter: str = ADAPTER) -> int:
    """Trainable parameters in use: the inactive rows and columns of masked adapters do not count."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for _, layer in lora_layers(model, adapter):
        if is_masked(layer, adapter):
            total -= (int(layer.r[adapter]) - active_rank(layer, adapter)) * (layer.in_features + layer.out_features)
    return total


# ---------------------------------------------------------------------------------------------- pruning
#
#   ΔW = B·A·s = U S Vᵀ          keep the top k:   B' = U_k √(S_k / s),  A' = √(S_k / s) V_kᵀ
#   so that B'·A'·s = U_k S_k V_kᵀ, the best rank-k approximation; ‖ΔW − ΔW_k‖_F = ‖S_{k+1:}‖.
#   A row never shrinks below 1/√in (PEFT's init scale): for a (near-)zero singular value B' gets a (near-)
#   zero column instead, so A' = B' = 0 - a saddle where neither factor gets a gradient - cannot happen.


def lora_svd(layer: nn.Module, adapter: str = ADAPTER, extra: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out x r), S (r), Vh (r x in) of the layer's update B·A·scaling -- plus `extra`, factors (B_m, A_m)
    of a merged update, when given -- in fp32, from two thin QRs and a small SVD (never the dense out x in
    matrix)."""
    a = layer.lora_A[adapter].weight.detach().float().cpu()
    b = layer.lora_B[adapter].weight.detach().float().cpu() * float(layer.scaling[adapter])
    if extra is not None:
        b, a = torch.cat([extra[0], b], dim=1), torch.cat([extra[1], a])
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T)
    return qb @ uc, s, (qa @ vch.T).T


def svd_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k x in), B (out x k) with B·A·scaling = U_k S_k V_kᵀ, split by square roots; an A row never
    shrinks below 1/√in (see above)."""
    a_scale = torch.sqrt(s[:k] / scaling).clamp_min(1.0 / math.sqrt(vh.shape[1]))
    b_scale = s[:k] / scaling / a_scale
    return a_scale[:, None] * vh[:k], u[:, :k] * b_scale[None, :]


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest k whose singular values hold at least `energy` of the squared Frobenius norm."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1


def budget_ranks(spectra: dict[str, tuple[torch.Tensor, int]], budget: int) -> dict[str, int]:
    """Global greedy choice: components ranked by squared singular value per parameter cost (in + out of
    their module), taken while the parameter budget allows; every module keeps at least one component."""
    ranks = {name: 1 for name in spectra}
    used = sum(cost for _, cost in spectra.values())
    if used > budget:
        raise ValueError(f"prune budget {budget} is below the {used} parameters of one component per module")
    candidates = sorted(
        ((float(s[i]) ** 2 / cost, name, i) for name, (s, cost) in spectra.items() for i in range(1, len(s))),
        reverse=True,
    )
    for _, name, i in candidates:  # within a module, values are sorted: component i comes after i - 1
        cost = spectra[name][1]
        if i == ranks[name] and used + cost <= budget:
            ranks[name] += 1
            used += cost
    return ranks


def prune_lora(
    model: nn.Module,
    rank: int | None = None,
    energy: float | None = None,
    budget: int | None = None,
    adapter: str = ADAPTER,
) -> dict[str, dict]:
    """Shrink every LoRA module to the best rank-k approximation of its update, k chosen by exactly one of
    a target `rank`, an `energy` threshold (per module) or a global parameter `budget` (A and B entries).
    Modules never go below rank 1. The scaling is kept (lora_alpha follows r). Returns, per module,
    {"from_rank", "to_rank", "error"} with error = ‖ΔW − ΔW_k‖_F = the norm of the dropped values."""
    if sum(x is not None for x in (rank, energy, budget)) != 1:
        raise ValueError("prune_lora needs exactly one of rank, energy or budget")
    if rank is not None and rank < 1:
        raise ValueError(f"prune rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"prune energy must be in (0, 1], got {energy}")
    layers = list(lora_layers(model, adapter))
    svds = {}
    for name, layer in layers:
        svds[name] = lora_svd(layer, adapter)
    if budget is not None:
        keep = budget_ranks({n: (svds[n][1], l.in_features + l.out_features) for n, l in layers}, budget)
    elif energy is not None:
        keep = {n: energy_rank(svds[n][1], energy) for n, _ in layers}
    else:
        keep = {n: rank for n, _ in layers}
    report = {}
    for name, layer in layers:
        u, s, vh = svds[name]
        old = active_rank(layer, adapter)
        k = max(1, min(keep[name], old))
        scaling = float(layer.scaling[adapter])
        a, b = svd_factors(u, s, vh, k, scaling)
        if is_masked(layer, adapter):  # in place, shapes kept: the rows beyond k become inactive (zero)
            a_w, b_w = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            with torch.no_grad():
                a_w.zero_()[:k] = a.to(a_w)
                b_w.zero_()[:, :k] = b.to(b_w)
            getattr(layer, ACTIVE_ATTR)[adapter] = k
        else:
            set_lora_factors(layer, a.cpu(), b.cpu(), scaling, adapter)
        report[name] = {"from_rank": old, "to_rank": k, "error": float(torch.linalg.vector_norm(s[k:]))}
    _sync_peft_config(model, adapter, layers)
    return report
