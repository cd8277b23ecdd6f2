"""Memory held for merge-strategy updates, and the time of a growth event, on layers of a 7B model's width:
the dense record the library kept before against the low-rank one it keeps now, side by side in one run.

    python benchmarks/merged_memory.py --output docs/results/merged_memory.json

A stack of `--layers` Linear(4096, 4096) layers (fp32, or `--dtype bf16`) with PEFT LoRA on every one,
grown by merge from r0 = 4 to 8, 12 and 16 (so three merges, of ranks 4, 8 and 12). Each growth is timed
from the decision to the new adapter, `--repeats` times, alternating the two contenders:

- dense (before): each merge adds B·A·s into the base weight and keeps ΔW_merged as a dense fp32 out x in
  matrix per layer (the library's record until this change, reimplemented here as the baseline);
- low-rank (now): `surgery.grow_lora(..., "merge")` -- the record is the low-rank part of each merge (B_i, A_i),
  from which the base weights are rebuilt exactly (no copy of them is kept or saved); a bf16 base is not
  changed at all (the update acts beside it).

Memory is the bytes of the record's tensors (exact, not sampled). The figures for a 7B model are computed
from the same per-element costs for LLaMA-7B's shapes (32 layers; q,v or all seven Linear modules per layer)
and the same merged ranks. The last line is `dense_mb=... lowrank_mb=... ratio=... dense_event_s=...
lowrank_event_s=...`; --output also writes docs/merged_memory.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS = (8, 12, 16)
LLAMA_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
            "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}  # (in, out), x32 layers


def stack(layers: int, width: int, dtype: torch.dtype) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).to(dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[str(i) for i in range(layers)]))
    return model


def dense_merge(model: nn.Module, rank: int, record: dict) -> None:
    """The former merge: the update added into the base weight and kept as a dense fp32 matrix."""
    from adarank.surgery import _new_a, base_weight_name, lora_layers, set_lora_factors

    for name, layer in lora_layers(model):
        delta = layer.get_delta_weight("default")
        base = layer.get_base_layer().weight
        with torch.no_grad():
            base.add_(delta.to(base.dtype))
        key = base_weight_name(name)
        d32 = delta.detach().float().cpu()
        record[key] = record[key] + d32 if key in record else d32
        set_lora_factors(layer, _new_a(rank, layer.in_features, None), torch.zeros(layer.out_features, rank),
                         float(layer.scaling["default"]))


def measure(kind: str, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    from adarank.surgery import MERGED_DELTA_ATTR, grow_lora

    model = stack(args.layers, args.width, dtype)
    times, record = [], {}
    for rank in RANKS:
        with torch.no_grad():  # each adapter trained a little before it is merged
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        start = time.perf_counter()
        if kind == "dense":
            dense_merge(model, rank, record)
        else:
            grow_lora(model, rank, "merge", seed=rank)
        times.append(time.perf_counter() - start)
    if kind == "dense":
        tensors = list(record.values())
    else:  # the parts kept per merge (and nothing else: no copy of any base weight)
        tensors = [t for entry in getattr(model, MERGED_DELTA_ATTR).values() for b, a, _ in entry.parts for t in (b, a)]
    held = sum(t.numel() * t.element_size() for t in tensors)
    del model
    gc.collect()
    return {"kind": kind, "record_mb": held / 2**20, "event_s": times}


def seven_b(merged_ranks: int) -> dict:
    """MiB a LLaMA-7B record would hold, dense against low-rank, for q,v or all linear modules."""
    out = {}
    for targets, names in (("q_proj,v_proj", ("q_proj", "v_proj")), ("all linear", tuple(LLAMA_7B))):
        dense = 32 * sum(LLAMA_7B[n][0] * LLAMA_7B[n][1] for n in names) * 4 / 2**20
        lowrank = 32 * sum(merged_ranks * (LLAMA_7B[n][0] + LLAMA_7B[n][1]) for n in names) * 4 / 2**20
        out[targets] = {"dense_mb": dense, "lowrank_mb": lowrank}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--output", help="write every measurement here (and docs/merged_memory.md)")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    runs = []
    for rep in range(args.repeats):
        for kind in (("dense", "lowrank") if rep % 2 == 0 else ("lowrank", "dense")):
            runs.append(measure(kind, args, dtype))
            print(f"repeat {rep + 1}/{args.repeats} {kind}: record {runs[-1]['record_mb']:.1f} MiB, growth events "
                  + ", ".join(f"{t:.3f}" for t in runs[-1]["event_s"]) + " s", flush=True)

    def med(kind: str, key: str) -> float:
        values = [v for r in runs if r["kind"] == kind for v in (r[key] if isinstance(r[key], list) else [r[key]])]
        return statistics.median(values)

    merged_ranks = 4 + 8 + 12  # the ranks the three merges fold
    summary = {"dense_mb": med("dense", "record_mb"), "lowrank_mb": med("lowrank", "record_mb"),
               "dense_event_s": med("dense", "event_s"), "lowrank_event_s": med("lowrank", "event_s")}
    summary["ratio"] = summary["dense_mb"] / summary["lowrank_mb"]
    data = {"settings": vars(args), "measurements": runs, "summary": summary, "llama_7b": seven_b(merged_ranks),
            "merged_ranks": merged_ranks}
    if args.output:
        from adarank.report import atomic_write, write_json

        write_json(args.output, data)
        lines = ["# Merged updates: memory and growth time, dense record against low-rank", "",
                 "Generated by `python benchmarks/merged_memory.py --output docs/results/merged_memory.json` (what is "
                 "measured: the script's docstring); do not edit.", "",
                 f"{args.layers} layers of {args.width}×{args.width} ({args.dtype}), merges at growths to "
                 f"r = {', '.join(map(str, RANKS))} (merged ranks {merged_ranks} in all), medians of {args.repeats} "
                 "alternating repeats.", "",
                 "| record | held (MiB) | time per growth event (s) |", "|---|---|---|",
                 f"| dense (before) | {summary['dense_mb']:.1f} | {summary['dense_event_s']:.3f} |",
                 f"| low-rank (now) | {summary['lowrank_mb']:.1f} | {summary['lowrank_event_s']:.3f} |", "",
                 f"The low-rank record holds {summary['ratio']:.0f}× less.", "",
                 "What a LLaMA-7B run would hold for the same merged ranks (fp32 record):", "",
                 "| targets | dense (MiB) | low-rank (MiB) |", "|---|---|---|"]
        lines += [f"| {t} | {v['dense_mb']:.0f} | {v['lowrank_mb']:.0f} |" for t, v in data["llama_7b"].items()]
        atomic_write(os.path.join(ROOT, "docs", "merged_memory.md"), "\n".join(lines) + "\n")
    print(" ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
