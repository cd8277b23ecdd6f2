"""The updates merge-strategy growth folded away: kept as the low-rank parts they were, never as dense matrices.

    record[key] = MergedUpdate(beside, parts=[(B_1, A_1, s_1), (B_2, A_2, s_2), ...])    (CPU, as trained)
    ΔW_merged = Σ_i B_i·A_i·s_i            (out x in; memory grows with the merged ranks, not the layer size)

Where the update acts, fixed at a layer's first merge:

- into the base weight (a full-precision nn.Linear or Conv1D, not shared with another module): W += Δ_i,
  merge by merge. Rebuilding the model replays the same additions in the same order from the same parts
  (`delta` is the one formula both use), so a resumed run's base weights are bit-identical to the trained
  ones without any copy of them being kept or saved;
- beside the base weight (bf16/fp16 -- each merge would round into it --, quantized, or tied to another
  module): the base is never changed; a forward hook adds x·(B_cat·A_cat)ᵀ, computed in fp32 outside
  autocast, from the parts concatenated. The model that reloads and exports is the one that trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

BESIDE = ("adarank_merged_B", "adarank_merged_A")  # buffers of a layer whose merged update acts beside it
TIED_ATTR = "_adarank_tied"  # set at setup on a layer whose base weight another module shares


@dataclass
class MergedUpdate:
    beside: bool
    parts: list[tuple[torch.Tensor, torch.Tensor | None, float]] = field(default_factory=list)  # A None: B is dense

    @property
    def rank(self) -> int:
        return sum(b.shape[1] for b, a, _ in self.parts if a is not None)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_cat, A_cat), fp32, with ΔW_merged = B_cat·A_cat (a dense part from an old run: as ΔW·I)."""
        bs, as_ = [], []
        for b, a, s in self.parts:
            if a is None:
                bs.append(b.float()), as_.append(torch.eye(b.shape[1]))
            else:
                bs.append(b.float() * s), as_.append(a.float())
        return torch.cat(bs, dim=1), torch.cat(as_)

    def dense(self) -> torch.Tensor:
        b, a = self.factors()
        return b @ a


def merges_beside(layer: nn.Module) -> bool:
    """Whether a merge leaves this layer's base weight alone (see the module doc)."""
    base = layer.get_base_layer()
    return (type(base).__name__ not in ("Linear", "Conv1D") or base.weight.dtype not in (torch.float32, torch.float64)
            or getattr(layer, TIED_ATTR, False))


def mark_tied(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """Mark the LoRA layers whose base weight is also another module's (a tied lm_head and embedding):
    a merge into it would change the other module too."""
    seen: dict[int, nn.Module] = {}
    tied = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if seen.setdefault(p.data_ptr(), module) is not module:
                tied.add(p.data_ptr())
    for _, layer in layers:
        setattr(layer, TIED_ATTR, layer.get_base_layer().weight.data_ptr() in tied)


def delta(layer: nn.Module, part: tuple[torch.Tensor, torch.Tensor | None, float], like: torch.Tensor) -> torch.Tensor:
    """One merged part as the update of the layer's base weight (its orientation, on its device): the same
    arithmetic at merge time and at every replay, hence the same bits (PEFT's get_delta_weight order)."""
    b, a, s = part
    if a is None:
        out = b.to(like.device)
    else:
        out = b.to(like.device) @ a.to(like.device)
        out = (out.T if layer.fan_in_fan_out else out) * s
    return out.to(like.dtype)


def merge_part(layer: nn.Module, entry: MergedUpdate, part: tuple) -> None:
    """Fold one more part into the layer: added to its base weight, or to what acts beside it."""
    entry.parts.append(part)
    if entry.beside:
        set_beside(layer, entry)
    else:
        weight = layer.get_base_layer().weight
        with torch.no_grad():
            weight.add_(delta(layer, part, weight))


def _hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    b, a = getattr(module, BESIDE[0]), getattr(module, BESIDE[1])
    with torch.autocast(output.device.type, enabled=False):  # fp32, under mixed precision too
        return output + ((args[0].to(a.dtype) @ a.T) @ b.T).to(output.dtype)


def set_beside(layer: nn.Module, entry: MergedUpdate | None) -> None:
    """Make `entry` (or nothing) act beside the layer's base weight, in fp32, on the layer's device."""
    device = layer.lora_A[next(iter(layer.lora_A))].weight.device
    b, a = entry.factors() if entry is not None and entry.parts else (torch.zeros(layer.out_features, 0),
                                                                      torch.zeros(0, layer.in_features))
    for name, value in zip(BESIDE, (b, a)):
        layer.register_buffer(name, value.to(device=device, dtype=torch.float32), persistent=False)
    if not getattr(layer, "_adarank_hooked", False):
        layer.register_forward_hook(_hook)
        layer._adarank_hooked = True


def apply_record(model: nn.Module, record: dict[str, MergedUpdate], layers: list[tuple[str, nn.Module]],
                 key_of) -> None:
    """Give `model` the merged updates of `record` in place of those it holds now: an update added into a
    base weight since is subtracted again (in reverse order; exact up to rounding), the record's are
    replayed (exactly) or set beside. For a model built afresh on the original base this is the replay."""
    current = getattr(model, "adarank_merged_delta", None) or {}
    with torch.no_grad():
        for name, layer in layers:
            key = key_of(name)
            now, then = current.get(key), record.get(key)
            if now is then:
                continue
            weight = layer.get_base_layer().weight
            if now is not None and not now.beside:
                for part in reversed(now.parts):
                    weight.sub_(delta(layer, part, weight))
            if then is None:
                if now is not None and now.beside:
                    set_beside(layer, None)
            elif then.beside:
                set_beside(layer, then)
            else:
                if now is not None and now.beside:
                    set_beside(layer, None)
                for part in then.parts:
                    weight.add_(delta(layer, part, weight))
    model.adarank_merged_delta = record


def fold_beside(layer: nn.Module) -> None:
    """Add what acts beside the layer into its base weight (rounded to its dtype), for a merged export."""
    if not hasattr(layer, BESIDE[0]):
        return
    weight = layer.get_base_layer().weight
    if not weight.dtype.is_floating_point:
        raise ValueError("a merged (--merged) export of a quantized base is not supported; export the adapter")
    dense = getattr(layer, BESIDE[0]) @ getattr(layer, BESIDE[1])
    with torch.no_grad():
        weight.add_((dense.T if layer.fan_in_fan_out else dense).to(weight))
    set_beside(layer, None)


def flat(record: dict[str, MergedUpdate]) -> dict[str, torch.Tensor]:
    """The record as flat tensors (safetensors): KEY::beside, KEY::i::B, KEY::i::A, KEY::i::s."""
    out = {}
    for key, entry in record.items():
        out[f"{key}::beside"] = torch.tensor(int(entry.beside))
        for i, (b, a, s) in enumerate(entry.parts):
            out[f"{key}::{i}::B"], out[f"{key}::{i}::s"] = b.contiguous(), torch.tensor(float(s))
            if a is not None:
                out[f"{key}::{i}::A"] = a.contiguous()
    return out


def unflat(tensors: dict[str, torch.Tensor]) -> dict[str, MergedUpdate]:
    """`flat`'s inverse; a run saved before this format (KEY -> dense ΔW) reads as one dense part."""
    record: dict[str, MergedUpdate] = {}
    for name in tensors:
        if "::" not in name:  # the former dense record (into a full-precision base)
            record[name] = MergedUpdate(False, [(tensors[name], None, 1.0)])
        elif name.endswith("::beside"):
            key = name[: -len("::beside")]
            count = len({n.split("::")[-2] for n in tensors if n.startswith(key + "::") and n.endswith("::s")})
            record[key] = MergedUpdate(bool(tensors[name]), [
                (tensors[f"{key}::{i}::B"], tensors.get(f"{key}::{i}::A"), float(tensors[f"{key}::{i}::s"]))
                for i in range(count)])
    return record


__all__ = ["BESIDE", "MergedUpdate", "apply_record", "delta", "flat", "fold_beside", "mark_tied", "merge_part",
           "merges_beside", "set_beside", "unflat"]
