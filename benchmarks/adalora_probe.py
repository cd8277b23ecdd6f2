"""Why PEFT AdaLoRA stays at the majority class on MRPC / MiniLM: what its adapters and head do over a run,
next to fixed-rank LoRA r=8, in our own loop (`adarank.train.Run`, the same data, optimizer and schedule as
the benchmark), on the development split.

    python benchmarks/adalora_probe.py --output docs/results/adalora_probe.json

Every `--every` optimizer steps each contender records:
- `update_rel`: the adapters' update relative to the weights they adapt, ||ΔW||_F / ||W||_F averaged over
  the adapted modules (ΔW = PEFT's `get_delta_weight`: LoRA B·A·s; AdaLoRA B·(A⊙E)·s / r);
- `head_change`: ||θ_head − θ_head(0)||_F / ||θ_head(0)||_F of the classification head (trained by both);
- `kept`: AdaLoRA's singular values not masked by its budget allocator, as a fraction of those allocated;
- `loss`: the mean training loss since the previous record (AdaLoRA: with its orthogonality regularizer);
and at the end the development-split accuracy and the share of predictions of the majority class.
Contenders (`--lr` each): LoRA r=8; AdaLoRA (the bench's settings); AdaLoRA with E started at 1 instead of 0
(its update is then no longer zero at the start, and B·A moves at once); AdaLoRA without the orthogonality
regularizer; AdaLoRA with the paper's MRPC schedule and scale (adalora_paper.yaml). Runs go one at a time.
AdaLoRA's training loss includes its orthogonality regularizer (PEFT adds it to the model's loss). --output also
writes adalora_probe.md one directory above the JSON's (docs/results/x.json -> docs/adalora_probe.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

SUITE = os.path.join(ROOT, "configs", "bench", "mrpc_minilm")


def contenders(lr: float, chosen: str | None = None, only: list[str] | None = None) -> dict[str, tuple[str, list[str]]]:
    """name -> (suite config, overrides). With `chosen` (a bench results directory) each runs at the
    learning rate the bench chose for its config on the development split, else at `lr`."""
    from adarank.bench import choose_lr
    from adarank.config import ConfigError

    table = {"lora_r8": ("lora_r8.yaml", []), "adalora": ("adalora.yaml", []), "adalora_E1": ("adalora.yaml", []),
             "adalora_no_orth": ("adalora.yaml", ["adalora.orth_reg_weight=0.0"]),
             "adalora_paper": ("adalora_paper.yaml", [])}
    out = {}
    for name, (config, extra) in table.items():
        if only and name not in only:
            continue
        rate = lr
        if chosen is not None:
            rate = choose_lr(chosen, os.path.join(SUITE, config), [])[0]
            if rate is None:
                raise ConfigError(f"--chosen {chosen}: {config}'s learning-rate selection is not complete there")
        out[name] = (config, [f"train.lr={rate!r}", "data.eval_split=dev", "train.eval_steps=null"] + extra)
    return out


def probe(name: str, config: str, overrides: list[str], every: int, out_dir: str) -> dict:
    from adarank.config import load_config
    from adarank.train import Run

    cfg = load_config(os.path.join(SUITE, config), overrides + [f"train.output_dir={out_dir}/{name}"])
    run = Run(cfg, overwrite=True)
    model = run.raw_model
    layers = [(n, m) for n, m in model.named_modules()  # LoRA (ModuleDict) and AdaLoRA (ParameterDict) layers
              if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})]
    if name == "adalora_E1":  # the one change: singular values start at 1, so B·(A⊙E) starts as LoRA's B·A would
        with torch.no_grad():
            for _, layer in layers:
                layer.lora_E["default"].fill_(1.0)
    head = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    records: list[dict] = []
    losses: list[float] = []
    observe = run._observe

    def record_and_observe() -> None:
        losses.extend(float(x) for x in run.pending)
        observe()
        if run.step // every == (records[-1]["step"] // every if records else 0) and run.step != run.total_steps:
            return  # (observe runs at logging steps: record at the first one of each `every` steps)
        with torch.no_grad():
            rel = [float(layer.get_delta_weight("default").norm() / layer.get_base_layer().weight.norm())
                   for _, layer in layers]
            change = sum(float((p - head[n]).norm() ** 2) for n, p in model.named_parameters() if n in head) ** 0.5
            size = sum(float(v.norm() ** 2) for v in head.values()) ** 0.5
            rec = {"step": run.step, "loss": sum(losses) / max(1, len(losses)), "update_rel": sum(rel) / len(rel),
                   "head_change": change / size}
            if hasattr(layers[0][1], "lora_E"):
                e = torch.cat([layer.lora_E["default"].flatten() for _, layer in layers])
                rec["kept"] = float((e != 0).float().mean())
        losses.clear()
        records.append(rec)

    run._observe = record_and_observe
    return {"name": name, "lr": cfg.train.lr, "records": records, "final": run.train()["final"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=1e-3, help="every contender's learning rate (without --chosen)")
    ap.add_argument("--chosen", metavar="RESULTS_DIR",
                    help="run each contender at the rate `adarank bench` chose for its config (its select/ files)")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--max-steps", type=int, help="= train.max_steps (default: the benchmark suite's budget)")
    ap.add_argument("--only", help="comma-separated contender names (default: all)")
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "out", "adalora_probe"))
    ap.add_argument("--output", help="JSON file; adalora_probe.md goes one directory above it")
    args = ap.parse_args()
    try:
        todo = contenders(args.lr, args.chosen, args.only.split(",") if args.only else None)
    except ValueError as exc:  # ConfigError: an incomplete selection
        print(f"adalora_probe: error: {exc}", file=sys.stderr)
        return 2
    if args.max_steps:
        todo = {k: (c, ov + [f"train.max_steps={args.max_steps}"]) for k, (c, ov) in todo.items()}
    out = {"lr": None if args.chosen else args.lr, "every": args.every, "command": "python benchmarks/adalora_probe.py " + " ".join(sys.argv[1:]),
           "runs": [probe(name, cfg, ov, args.every, args.work_dir) for name, (cfg, ov) in todo.items()]}
    for r in out["runs"]:
        last = r["records"][-1]
        print(f"{r['name']}: dev accuracy {r['final']['accuracy']:.4f}, update_rel {last['update_rel']:.2e}, "
              f"head_change {last['head_change']:.3f}" + (f", kept {last['kept']:.2f}" if "kept" in last else ""))
    if args.output:
        from adarank.report import write_json

        write_json(args.output, out)
        write_markdown(out, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.output))), "adalora_probe.md"),
                       args.output)
    return 0


def write_markdown(out: dict, path: str, source: str) -> None:
    lines = ["# Why AdaLoRA stays at the majority class (MRPC, MiniLM)", "",
             f"Generated by `{out['command']}` (numbers from `{os.path.relpath(source, ROOT)}`).", "",
             ("Each contender at the learning rate the benchmark chose for its config on the development split"
              if out.get("lr") is None else f"Learning rate {out['lr']:g} for every contender")
             + ", our loop, the benchmark's settings otherwise; trained on the training split without its "
             "development split, scored on the development split.", "",
             "| contender | step | train loss | ‖ΔW‖/‖W‖ (mean over modules) | head change | E kept |",
             "|---|---|---|---|---|---|"]
    for r in out["runs"]:
        for rec in r["records"]:
            kept = f"{rec['kept']:.2f}" if "kept" in rec else "–"
            lines.append(f"| {r['name']} | {rec['step']} | {rec['loss']:.4f} | {rec['update_rel']:.2e} | "
                         f"{rec['head_change']:.3f} | {kept} |")
    lines += ["", "| contender | lr | dev accuracy | dev F1 macro | dev loss |", "|---|---|---|---|---|"]
    for r in out["runs"]:
        f = r["final"]
        lr = r.get("lr", out.get("lr"))
        lines.append(f"| {r['name']} | {lr:g} | {100 * f['accuracy']:.2f} | {100 * f['f1_macro']:.2f} | "
                     f"{f['eval_loss']:.4f} |")
    from adarank.report import atomic_write

    atomic_write(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
