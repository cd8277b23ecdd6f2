"""Command line: `adarank train --config FILE [...]`. Verbs map to functions; YAML fills their arguments."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys

from .config import ConfigError, RunConfig, load_config


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config `adarank train` ARGS describe: the file, then --set, then the shortcut flags."""
    overrides = list(args.set or [])
    for flag, key in (("output_dir", "train.output_dir"), ("data_dir", "data.data_dir"),
                      ("max_steps", "train.max_steps"), ("seed", "train.seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides)


def _train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from .distributed import check_launch_env, launch, world_size
    from .rundir import check_output_dir

    if args.nproc_per_node is not None and world_size() == 1:  # this process launches the workers
        if args.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
        if args.nproc_per_node > 1:
            check_launch_env()  # fail here, once, rather than in every worker
            check_output_dir(cfg.train.output_dir, resume=args.resume, overwrite=args.overwrite)
            return launch(args.nproc_per_node, _without_nproc(args.argv))
    from .train import Interrupted, NonFiniteLoss, train

    try:
        results = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLoss as exc:
        _say(f"adarank: error: {exc}")
        return 1
    except Interrupted as stop:
        again = [a for a in _without_nproc(args.argv) if a not in ("--overwrite", "--resume")]
        if world_size() > 1:
            again += ["--nproc-per-node", str(world_size())]
        if stop.checkpoint is None:  # stopped within a non-finite streak before any checkpoint
            _say(f"adarank: {stop}; no checkpoint was written: start again with: adarank {shlex.join(again + ['--overwrite'])}")
        else:
            _say(f"adarank: {stop}; continue with: adarank {shlex.join(again + ['--resume'])}")
        return 128 + stop.signum
    final = results["final"]
    shown = " ".join(f"{k}={v:.4f}" for k, v in final.items() if isinstance(v, float) and k not in ("eval_loss", "rank_mean"))
    _say(
        f"done: {shown} "
        f"rank {' -> '.join(map(str, results['rank_schedule']))} in {results['wall_time_s']:.0f}s "
        f"({results['num_processes']} process{'es' if results['num_processes'] > 1 else ''}); "
        f"outputs in {cfg.train.output_dir}", err=False,
    )
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def _say(line: str, err: bool = True) -> None:
    """Print once: in several processes only the first (RANK 0) does; they would all print the same. A
    worker of `--nproc-per-node` hands an error line to its launcher instead, which prints one for all."""
    from .distributed import ERROR_FILE

    if err and os.environ.get(ERROR_FILE):
        with open(os.environ[ERROR_FILE], "w", encoding="utf-8") as fh:
            fh.write(line + "\n")
    elif os.environ.get("RANK", "0") in ("", "0"):
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


def _export(args: argparse.Namespace) -> int:
    from .export import export_adapter

    log = export_adapter(args.run_dir, args.out_dir, max_rank=args.max_rank, merged=args.merged,
                         overwrite=args.overwrite, base=args.base)
    if log["format"] == "merged":
        print(f"merged model written to {args.out_dir} (AutoModel*.from_pretrained); "
              f"max abs logit difference to the run model: {log['max_abs_logit_diff']:.2e}")
    else:
        worst = max(m["relative_error"] for m in log["modules"].values())
        print(f"PEFT adapter written to {args.out_dir}: r={log['r']}, rank_pattern for {len(log['rank_pattern'])} modules, "
              f"{'exact' if log['exact'] else f'approximate (worst relative error {worst:.2e})'}; "
              f"max abs logit difference to the run model: {log['max_abs_logit_diff']:.2e} (details in export_log.json)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    command = "adarank " + " ".join(shlex.quote(a) for a in sys.argv[1:])  # provenance, in every results file
    kwargs = dict(results_dir=args.results_dir, seeds=args.seeds,
                  methods=args.methods.split(",") if args.methods else None, quick=args.quick, jobs=args.jobs,
                  data_dir=args.data_dir, overrides=args.set, force=args.force, command=command,
                  select_only=args.select_only)
    if args.tasks:
        from .bench import run_glue

        out = run_glue(args.suite, args.tasks.split(","), args.output_dir, **kwargs)
    else:
        out = run_bench(args.suite, args.output_dir, **kwargs)
    print(f"bench: {len(out['ran'])} run(s), {len(out['skipped'])} skipped, {len(out['failed'])} failed; "
          f"report: {out['report'] or 'none (no results yet)'}")
    if out["failed"]:
        for key, log in out["failed"].items():
            print(f"bench: failed {key}: see {log}", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from .bench_report import write_report

    print(f"report written to {write_report(args.results_dir, args.out, readme=args.readme)}"
          + (f"; standings block of {args.readme} rewritten" if args.readme else ""))
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
    t.add_argument("--resume", action="store_true",
                   help="continue the run in the output directory from its newest checkpoint (same config)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in the output directory (only the files a run writes are removed)")
    t.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="train in N connected local processes (gloo on CPU, NCCL on GPUs), like torchrun")
    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="write a run as a standard PEFT LoRA adapter relative to the original base")
    e.add_argument("run_dir", help="a run's output directory (or its model/ directory), or an HF Trainer output or "
                                   "checkpoint directory trained with AdaRankCallback")
    e.add_argument("out_dir")
    e.add_argument("--max-rank", type=int, help="cap the exported rank per module (SVD truncation; errors logged)")
    e.add_argument("--merged", action="store_true", help="write a full merged model instead of an adapter")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    e.add_argument("--base", help="the base model (hub id or path) of a Trainer directory whose adapter_config.json "
                                  "does not name it")
    e.set_defaults(func=_export)
    b = sub.add_parser("bench", help="run a grid of methods x seeds from a suite of configs and report it")
    b.add_argument("--suite", default="configs/bench/mrpc_minilm", help="directory of method configs (default: %(default)s)")
    b.add_argument("--output-dir", default=None, help="run outputs (default: out/bench, or out/bench_quick with --quick)")
    b.add_argument("--results-dir", help="where the per-run results JSON and the report go (default: OUTPUT_DIR/results)")
    b.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (quick: 0)")
    b.add_argument("--methods", help="comma-separated method names of the suite (default: all)")
    b.add_argument("--quick", action="store_true", help="1 seed, 256 training / 128 validation examples, 16 steps")
    b.add_argument("--jobs", type=int, default=1, help="runs at the same time (the cores are shared out)")
    b.add_argument("--data-dir", help="= data.data_dir for every run")
    b.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override for every run (repeatable)")
    b.add_argument("--force", action="store_true", help="rerun runs that already have a results file")
    b.add_argument("--tasks", help="comma-separated GLUE tasks: run the suite on each (settings per task from the "
                                   "suite's _tasks.yaml), results in RESULTS_DIR/<task>/, then the GLUE table")
    b.add_argument("--select-only", action="store_true",
                   help="run only the learning-rate selection runs (dev split), not the reported runs")
    b.set_defaults(func=_bench)
    r = sub.add_parser("report", help="regenerate a bench's Markdown table and plots from its results files")
    r.add_argument("results_dir", help="directory of <method>__seed<k>.json files")
    r.add_argument("--out", help="Markdown file to write (default: RESULTS_DIR/RESULTS.md); plots go beside it")
    r.add_argument("--readme", help="also rewrite the standings block of this Markdown file (between the lines "
                                    "<!-- adarank report: standings begin --> and <!-- ... end -->)")
    r.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # a deprecation inside transformers that PEFT triggers on every model: noise in front of our one line
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "verb", None) == "bench":
        if args.output_dir is None:
            args.output_dir = "out/bench_quick" if args.quick else "out/bench"
        if args.jobs < 1:
            print("adarank: error: --jobs must be >= 1", file=sys.stderr)
            return 2
    received = [signal.SIGINT]

    def terminate(signum, _frame):  # SIGTERM before training starts (or after it ends): as Ctrl-C is
        received[0] = signum
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread
        previous = None
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:  # bad input: config, data, model, paths
        _say(f"adarank: error: {exc}")
        return 2
    except OSError as exc:  # the machine, not the input: a full disk, a lost file system
        _say(f"adarank: error: {exc}")
        return 1
    except KeyboardInterrupt:
        _say(f"adarank: stopped by {signal.Signals(received[0]).name} before training began or after it ended")
        return 128 + received[0]
    except RuntimeError as exc:
        from .distributed import LAUNCHED, ProcessesDisagree, lost_peer

        if isinstance(exc, ProcessesDisagree):
            _say(f"adarank: error: {exc}")
            return 1
        if not lost_peer(exc):
            raise
        if not os.environ.get(LAUNCHED):  # our launcher names the process that went; torchrun does not
            print(f"adarank: error: process {os.environ.get('RANK')} lost contact with another process of the run "
                  f"({' '.join(str(exc).split())[:200]}); continue from the last checkpoint with --resume",
                  file=sys.stderr, flush=True)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
