"""Run by tests/test_distributed.py in each of several processes: one training run that records, after every
rank change, what this process holds (its parameter digest, the DDP wrapper, the accelerator's model list,
the model's forward), as JSON lines in PROBE_DIR/rank<R>.jsonl."""

import json
import os
import sys

from adarank import load_config
from adarank.distributed import params_digest
from adarank.train import Run


def wrappers(forward) -> int:
    """How many decorators (autocast, fp32 conversion) sit on a forward: the `__wrapped__` chain's length."""
    f, depth = getattr(forward, "__func__", forward), 0
    while hasattr(f, "__wrapped__"):
        f, depth = f.__wrapped__, depth + 1
    return depth


def main() -> None:
    config, out, probe_dir, *overrides = sys.argv[1:]
    run = Run(load_config(config, [f"train.output_dir={out}", *overrides]))
    records = []

    def snapshot(when):
        raw = run.raw_model
        records.append({"when": when, "digest": params_digest(raw), "wrapper": type(run.model).__name__,
                        "wraps_raw": getattr(run.model, "module", None) is raw,
                        "accelerator_models": len(run.accelerator._models), "model_id": id(run.model),
                        "forward_wrappers": wrappers(raw.forward)})

    apply = run._apply

    def traced(decision):
        apply(decision)
        snapshot(f"{decision.action}@{decision.step}")

    run._apply = traced
    snapshot("start")
    run.train()
    with open(os.path.join(probe_dir, f"rank{os.environ['RANK']}.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
