"""Command line: `adarank train --config FILE [...]`. Verbs map to functions; YAML fills their arguments."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    for flag, key in (("output_dir", "train.output_dir"), ("data_dir", "data.data_dir"),
                      ("max_steps", "train.max_steps"), ("seed", "train.seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    from .train import train

    results = train(cfg)
    final = results["final"]
    print(
        f"done: accuracy={final['accuracy']:.4f} f1_macro={final['f1_macro']:.4f} f1_pos={final['f1_pos']:.4f} "
        f"rank {' -> '.join(map(str, results['rank_schedule']))} in {results['wall_time_s']:.0f}s; "
        f"outputs in {cfg.train.output_dir}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_adapter

    log = export_adapter(args.run_dir, args.out_dir, max_rank=args.max_rank, merged=args.merged)
    if log["format"] == "merged":
        print(f"merged model written to {args.out_dir} (AutoModel*.from_pretrained); "
              f"max abs logit difference to the run model: {log['max_abs_logit_diff']:.2e}")
    else:
        worst = max(m["relative_error"] for m in log["modules"].values())
        print(f"PEFT adapter written to {args.out_dir}: r={log['r']}, rank_pattern for {len(log['rank_pattern'])} modules, "
              f"{'exact' if log['exact'] else f'approximate (worst relative error {worst:.2e})'}; "
              f"max abs logit difference to the run model: {log['max_abs_logit_diff']:.2e} (details in export_log.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adarank", description="Adaptive-rank LoRA fine-tuning.")
    sub = parser.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="train one run from a YAML config")
    t.add_argument("--config", required=True, help="YAML file with sections model, data, train, adarank")
    t.add_argument("--output-dir", help="= train.output_dir")
    t.add_argument("--data-dir", help="= data.data_dir (HF glue layout: <dir>/<task>/<split>.jsonl)")
    t.add_argument("--max-steps", type=int, help="= train.max_steps (optimizer steps)")
    t.add_argument("--seed", type=int, help="= train.seed")
    t.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override any config field, value parsed as YAML (repeatable), e.g. --set adarank.tol=0.05")
    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="write a run as a standard PEFT LoRA adapter relative to the original base")
    e.add_argument("run_dir", help="a run's output directory (or its model/ directory)")
    e.add_argument("out_dir")
    e.add_argument("--max-rank", type=int, help="cap the exported rank per module (SVD truncation; errors logged)")
    e.add_argument("--merged", action="store_true", help="write a full merged model instead of an adapter")
    e.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"adarank: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
