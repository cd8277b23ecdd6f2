"""`adarank bench`: a grid of methods x seeds on one task, every run in its own process, one results JSON
per run, then the report (`bench_report.py`).

A suite is a directory of YAML configs, one per method (`configs/bench/mrpc_minilm/`); files starting with
`_` are shared bases the method files `extends`. Every run of a suite uses the same data, epochs, batch
size and evaluation unless a method file says otherwise (the report lists every setting that differs).
A text-to-text suite also gets a `zero_shot` run: the pretrained model evaluated without training.

Runs whose results JSON already exists in the results directory are skipped (so an interrupted grid
resumes); `--force` reruns them. A failed run does not stop the others; the command then exits non-zero
and names the failed runs and their logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import yaml

from .config import RESUME_MAY_CHANGE, ConfigError, config_differences, load_config
from .rundir import read_marker

QUICK_OVERRIDES = (
    "data.max_train_samples=256", "data.max_eval_samples=128", "train.epochs=1", "train.batch_size=16",
    "train.eval_steps=4", "adarank.check_every=4", "adarank.warmup_steps=4",
)
DEFAULT_SEEDS = (0, 1, 2)


@dataclass
class Job:
    method: str
    seed: int
    config: str
    overrides: list[str]

    @property
    def key(self) -> str:
        return f"{self.method}__seed{self.seed}"


def suite_methods(suite: str) -> dict[str, str]:
    """Method name -> config path, for every `*.yaml` in `suite` that does not start with `_`."""
    if not os.path.isdir(suite):
        raise ConfigError(f"bench suite not found: {suite} (a directory of method configs, e.g. configs/bench/mrpc_minilm)")
    methods = {f[:-5]: os.path.join(suite, f) for f in sorted(os.listdir(suite))
               if f.endswith(".yaml") and not f.startswith("_")}
    if not methods:
        raise ConfigError(f"bench suite {suite} holds no method configs (*.yaml not starting with '_')")
    return methods


def is_text_to_text(config_path: str, overrides: list[str]) -> bool:
    """Whether the suite's model learns GLUE as text (seq2seq or causal LM; its config is read, not its weights)."""
    from transformers import AutoConfig

    from .modeling import ModelError, model_kind, resolve_model_path

    name = load_config(config_path, overrides).model.name_or_path
    try:
        return model_kind(AutoConfig.from_pretrained(resolve_model_path(name))) != "classifier"
    except OSError as exc:
        raise ModelError(f"model.name_or_path: cannot read the config of {name!r} ({str(exc).splitlines()[0]}); "
                         "without hub access use a local directory") from None


def plan(suite: str, seeds: list[int], methods: list[str] | None, quick: bool, overrides: list[str]) -> list[Job]:
    """The jobs of a bench, every config checked before anything runs."""
    available = suite_methods(suite)
    chosen = methods or list(available)
    unknown = [m for m in chosen if m not in available and m != "zero_shot"]
    if unknown:
        raise ConfigError(f"--methods: {unknown} not in suite {suite}; it has {sorted(available)}")
    extra = list(QUICK_OVERRIDES if quick else ()) + list(overrides)
    trained = [m for m in chosen if m != "zero_shot"]
    for method in trained:
        load_config(available[method], extra)  # fail now, naming the file, rather than mid-grid
    # seed-major: every method has a first seed before any has a second
    jobs = [Job(method, seed, available[method], extra) for seed in seeds for method in trained]
    first = available[chosen[0]] if chosen[0] in available else next(iter(available.values()))
    if (methods is None or "zero_shot" in methods) and is_text_to_text(first, extra):
        # the pretrained model does not depend on the seed: one run
        jobs.append(Job("zero_shot", seeds[0], first, extra + ["method.name=zero_shot"]))
    return jobs


def _command(job: Job, run_dir: str, data_dir: str | None, force: bool = False) -> list[str]:
    """The `adarank train` command of a job. A run directory left by an earlier, unfinished attempt is
    resumed from its checkpoint when its config is the job's; otherwise (or with --force) it is replaced."""
    args = ["--config", job.config, "--output-dir", run_dir, "--seed", str(job.seed)]
    if data_dir is not None:
        args += ["--data-dir", data_dir]
    for item in job.overrides:
        args += ["--set", item]
    marker = read_marker(run_dir)
    if marker is not None:
        args.append("--overwrite" if force or not _resumable(run_dir, marker, args) else "--resume")
    return [sys.executable, "-m", "adarank.cli", "train", *args]


def _resumable(run_dir: str, marker: dict, args: list[str]) -> bool:
    from .checkpoint import latest_checkpoint
    from .cli import build_parser, config_from_args

    if marker.get("status") == "complete" or latest_checkpoint(run_dir) is None:
        return False
    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as fh:
            previous = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return False
    current = config_from_args(build_parser().parse_args(["train", *args])).to_dict()
    return not [k for k in config_differences(previous, current) if k not in RESUME_MAY_CHANGE]


def run_bench(
    suite: str,
    output_dir: str,
    results_dir: str | None = None,
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
    quick: bool = False,
    jobs: int = 1,
    data_dir: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    command: str | None = None,
    log=print,
) -> dict:
    """Run the grid; returns {"ran": [...], "skipped": [...], "failed": {key: log path}, "report": path or None}."""
    from .bench_report import write_report

    seeds = list(DEFAULT_SEEDS[:1] if quick else DEFAULT_SEEDS) if seeds is None else list(seeds)
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    results_dir = results_dir or os.path.join(output_dir, "results")
    todo = plan(suite, seeds, methods, quick, overrides or [])
    os.makedirs(results_dir, exist_ok=True)
    pending = [j for j in todo if force or not os.path.exists(os.path.join(results_dir, j.key + ".json"))]
    skipped = [j.key for j in todo if j not in pending]
    if skipped:
        log(f"bench: {len(skipped)} run(s) already have results in {results_dir}; skipping them (--force reruns)")
    env = dict(os.environ)
    if jobs > 1:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    running: list[tuple[Job, subprocess.Popen, str, float]] = []
    ran, failed = [], {}
    queue = list(pending)
    while queue or running:
        while queue and len(running) < jobs:
            job = queue.pop(0)
            run_dir = os.path.join(output_dir, "runs", job.method, f"seed{job.seed}")
            os.makedirs(run_dir, exist_ok=True)
            log_path = os.path.join(run_dir, "bench.log")
            with open(log_path, "a", encoding="utf-8") as fh:  # an earlier attempt's log stays above
                proc = subprocess.Popen(_command(job, run_dir, data_dir, force), stdout=fh, stderr=subprocess.STDOUT,
                                        env=env)
            running.append((job, proc, run_dir, time.time()))
            log(f"bench: started {job.key}")
        time.sleep(0.5)
        for item in list(running):
            job, proc, run_dir, started = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log_path = os.path.join(run_dir, "bench.log")
            if proc.returncode != 0:
                failed[job.key] = log_path
                log(f"bench: FAILED {job.key} (exit {proc.returncode}); log: {log_path}")
                continue
            collect(run_dir, results_dir, job, suite, quick, command, jobs, env.get("OMP_NUM_THREADS"))
            ran.append(job.key)
            log(f"bench: done {job.key} in {time.time() - started:.0f}s ({len(ran) + len(failed)}/{len(pending)})")
    have_results = any(f.endswith(".json") and "__seed" in f for f in os.listdir(results_dir))
    report = write_report(results_dir) if have_results else None
    return {"ran": ran, "skipped": skipped, "failed": failed, "report": report}


def collect(run_dir: str, results_dir: str, job: Job, suite: str, quick: bool, command: str | None = None,
            jobs: int = 1, threads: str | None = None) -> str:
    """Copy a run's results.json into the results directory as `<method>__seed<k>.json`, tagged."""
    from .report import write_json

    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as fh:
        results = json.load(fh)
    results["bench"] = {"method": job.method, "seed": job.seed, "suite": suite, "config": job.config,
                        "overrides": job.overrides, "quick": quick, "command": command,
                        "parallel_runs": jobs, "omp_num_threads": threads}
    path = os.path.join(results_dir, job.key + ".json")
    write_json(path, results)
    return path


__all__ = ["Job", "QUICK_OVERRIDES", "plan", "run_bench", "suite_methods"]
