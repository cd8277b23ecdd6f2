"""AdaRank vs fixed-rank LoRA on MRPC with MiniLM-L6 (offline), through the `adarank` CLI.

    python benchmarks/mrpc_minilm.py                 # train the runs that have no results yet, then write the table
    python benchmarks/mrpc_minilm.py --report-only   # regenerate docs/mrpc_minilm.md from the JSON files
    python benchmarks/mrpc_minilm.py --only merge_plateau --epochs 1

Each run's results.json is copied to docs/results/mrpc_minilm/<run>.json; docs/mrpc_minilm.md is
generated from those files only (never typed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from adarank.rundir import read_marker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results", "mrpc_minilm")
TABLE = os.path.join(ROOT, "docs", "mrpc_minilm.md")
BASE = "configs/mrpc_minilm.yaml"

FIXED = "configs/mrpc_minilm_lora_r8.yaml"


def _fixed_at_pruned_mean(pruned_run: str):
    """Fixed-rank LoRA at the (rounded) mean final rank of a pruned run: same parameters, no growth."""

    def overrides() -> list[str]:
        with open(os.path.join(RESULTS, f"{pruned_run}.json")) as fh:
            ranks = json.load(fh)["final_ranks"]
        r = max(1, round(sum(ranks.values()) / len(ranks)))
        return [f"adarank.r0={r}", f"adarank.r_max={r}"]

    return overrides


PRUNE = ["adarank.prune=energy", "adarank.prune_energy=0.9", "adarank.prune_at=0.75"]


RUNS = {  # name: (config, overrides, or a function giving them from earlier results); trained in this order
    "merge_plateau": (BASE, ["adarank.strategy=merge", "adarank.criterion=plateau"]),
    "expand_plateau": (BASE, ["adarank.strategy=expand", "adarank.criterion=plateau"]),
    "lora_r8": (FIXED, []),
    # the full cycle: growth, then SVD pruning (energy 0.9 per module) at 75% of the run, then training on
    "merge_plateau_prune": (BASE, ["adarank.strategy=merge", *PRUNE]),
    "lora_pruned_mean": (FIXED, _fixed_at_pruned_mean("merge_plateau_prune")),
    "merge_threshold": (BASE, ["adarank.strategy=merge", "adarank.criterion=threshold"]),
    # per-layer growth: only the 6 of 12 modules with the largest gradient norm grow at each growth
    "merge_plateau_top6": (BASE, ["adarank.strategy=merge", "adarank.grow_top_k=6", "adarank.importance=grad_norm"]),
    "expand_threshold": (BASE, ["adarank.strategy=expand", "adarank.criterion=threshold"]),
    # the same three questions for the expand strategy
    "expand_plateau_prune": (BASE, ["adarank.strategy=expand", *PRUNE]),
    "lora_pruned_mean_expand": (FIXED, _fixed_at_pruned_mean("expand_plateau_prune")),
    "expand_plateau_top6": (BASE, ["adarank.strategy=expand", "adarank.grow_top_k=6", "adarank.importance=grad_norm"]),
}


def run(name: str, out_root: str, extra: list[str]) -> None:
    config, overrides = RUNS[name]
    overrides = overrides() if callable(overrides) else overrides
    out = os.path.join(out_root, name)
    cmd = [sys.executable, "-m", "adarank.cli", "train", "--config", config, "--output-dir", out]
    if read_marker(out) is not None:  # this script's own earlier run: replace it
        cmd.append("--overwrite")
    for item in overrides + extra:
        cmd += ["--set", item]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    os.makedirs(RESULTS, exist_ok=True)
    shutil.copyfile(os.path.join(out, "results.json"), os.path.join(RESULTS, f"{name}.json"))


def _method(r: dict) -> str:
    if not r["growth_enabled"]:
        return f"fixed LoRA r={r['final_rank']}"
    cfg = r["config"]["adarank"]
    extra = [f"top-{cfg['grow_top_k']} modules"] if cfg.get("grow_top_k") else []
    extra += [f"prune {cfg['prune']} {cfg['prune_energy'] if cfg['prune'] == 'energy' else ''}".strip()] if cfg.get("prune", "none") != "none" else []
    return r["strategy"] + (f" ({', '.join(extra)})" if extra else "")


def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


PAIRS = [  # (run, reference, what the comparison asks)
    ("expand_plateau", "lora_r8", "AdaRank (expand, the default) vs fixed-rank LoRA r=8"),
    ("merge_plateau", "lora_r8", "AdaRank (merge, the original) vs fixed-rank LoRA r=8"),
    ("expand_plateau", "merge_plateau", "expand vs merge (plateau)"),
    ("expand_threshold", "merge_threshold", "expand vs merge (threshold)"),
    ("expand_threshold", "expand_plateau", "threshold vs plateau (expand)"),
    ("merge_threshold", "merge_plateau", "threshold vs plateau (merge)"),
    ("merge_plateau_prune", "merge_plateau", "with the prune phase vs without (merge, plateau)"),
    ("merge_plateau_prune", "lora_pruned_mean", "pruned AdaRank vs fixed-rank LoRA at its mean final rank"),
    ("merge_plateau_top6", "merge_plateau", "per-layer growth (top-6 modules) vs every module (merge, plateau)"),
    ("expand_plateau_prune", "expand_plateau", "with the prune phase vs without (expand, plateau)"),
    ("expand_plateau_prune", "lora_pruned_mean_expand", "pruned AdaRank (expand) vs fixed-rank LoRA at its mean final rank"),
    ("expand_plateau_top6", "expand_plateau", "per-layer growth (top-6 modules) vs every module (expand, plateau)"),
]


def comparisons(results: dict[str, dict]) -> list[str]:
    """Differences computed from the results files: accuracy and F1 in points, parameters as ratios."""
    lines = []
    for run, ref, what in PAIRS:
        if run in results and ref in results:
            a, b = results[run], results[ref]
            d_acc = 100 * (a["final"]["accuracy"] - b["final"]["accuracy"])
            d_f1 = 100 * (a["final"]["f1_macro"] - b["final"]["f1_macro"])
            ratio = a["trainable_params_avg"] / b["trainable_params_avg"]
            lines.append(f"- {what} (`{run}` − `{ref}`): accuracy {d_acc:+.2f} points, F1 macro {d_f1:+.2f} points, "
                         f"step-averaged trainable parameters ×{ratio:.2f}")
    return lines


def report() -> str:
    rows, versions, commands, results = [], None, [], {}
    for name in RUNS:
        path = os.path.join(RESULTS, f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            r = results[name] = json.load(fh)
        f = r["final"]
        sched = r["rank_schedule"]
        rows.append(
            f"| {name} | {_method(r)} | {r['criterion'] if r['growth_enabled'] else '-'} "
            f"| {f['accuracy']:.4f} | {f['f1_macro']:.4f} | {f.get('f1_equivalent', f.get('f1_pos')):.4f} | {f['eval_loss']:.4f} "
            f"| {' → '.join(map(str, sched)) if len(sched) < 9 else f'{sched[0]} → … → {sched[-1]} ({len(sched) - 1} growths)'} "
            f"| {', '.join(str(e['step']) + ('p' if e['action'] == 'prune' else '') for e in r['rank_events']) or '-'} "
            f"| {sum(r['final_ranks'].values()) / len(r['final_ranks']):.2f} | {fmt_int(r['trainable_params_final'])} | {fmt_int(r['trainable_params_avg'])} | {r['wall_time_s']:.0f} |"
        )
        versions = r["versions"]
        cfg = r["config"]
        commands.append(f"- {name}: epochs={cfg['train']['epochs']}, max_steps={cfg['train']['max_steps']}, "
                        f"batch={cfg['train']['batch_size']}, lr={cfg['train']['lr']}, seed={cfg['train']['seed']}, "
                        f"r0={cfg['adarank']['r0']}, r_max={cfg['adarank']['r_max']}, tol={cfg['adarank']['tol']}, "
                        f"check_every={cfg['adarank']['check_every']}, warmup_steps={cfg['adarank']['warmup_steps']}")
    lines = [
        "# MRPC · all-MiniLM-L6-v2 · AdaRank vs fixed-rank LoRA",
        "",
        "Generated by `python benchmarks/mrpc_minilm.py --report-only` from `docs/results/mrpc_minilm/*.json`;",
        "rerun the training with `python benchmarks/mrpc_minilm.py` (the wall time of each run is in the table).",
        "Validation split (408 pairs). One seed per run: differences of about one point are within seed noise here.",
        "`p` marks the prune event; ranks in the schedule are the largest over modules.",
        "",
        "| run | method | criterion | accuracy | F1 macro | F1 (equivalent) | eval loss | rank schedule | rank events (steps) | final mean rank | trainable params (final) | trainable params (avg over steps) | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Differences (from the same files; one seed, so read a gap of a point or two as noise):",
        *comparisons(results),
        "",
        "Settings:",
        *commands,
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in (versions or {}).items()),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="runs to train (default: all missing)")
    parser.add_argument("--force", action="store_true", help="retrain runs whose results already exist")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out-root", default=os.path.join(ROOT, "out", "bench_mrpc_minilm"))
    parser.add_argument("--set", action="append", default=[], help="extra override for every run")
    args = parser.parse_args()
    if not args.report_only:
        for name in args.only or RUNS:
            if args.force or args.only or not os.path.exists(os.path.join(RESULTS, f"{name}.json")):
                run(name, args.out_root, args.set)
    text = report()
    os.makedirs(os.path.dirname(TABLE), exist_ok=True)
    with open(TABLE, "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
