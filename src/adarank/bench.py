"""`adarank bench`: a grid of methods x seeds on one task, every run in its own process, one results JSON
per run, then the report (`bench_report.py`).

A suite is a directory of YAML configs, one per method (`configs/bench/mrpc_minilm/`); files starting with
`_` are shared bases the method files `extends`. Every run of a suite uses the same data, epochs, batch
size and evaluation unless a method file says otherwise (the report lists every setting that differs).
A text-to-text suite also gets a `zero_shot` run: the pretrained model evaluated without training.

A method whose config has a learning-rate grid (`select.lr`) first gets one selection run per value and
selection seed, trained without the development split and scored on it (`data.eval_split: dev`); its
reported runs then use the value with the best mean score; with `select.extend`, a best value at the grid's
edge first gets the next rate beyond it (`selection_state`). Selection results go to `select/` under the
results directory.

Runs whose results JSON already exists in the results directory, made with the same config, are skipped
(so an interrupted grid resumes); one made with another config is rerun; `--force` reruns them all. A failed run does not stop the others; the command then exits non-zero
and names the failed runs and their logs.
"""

from __future__ import annotations

import json
import math
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
    """One `adarank train` run of a bench: a reported run (`lr` None: the method's chosen learning rate is
    in `overrides`) or a learning-rate selection run (`lr` set: trained and scored on the dev split)."""

    method: str
    seed: int
    config: str
    overrides: list[str]
    lr: float | None = None

    @property
    def key(self) -> str:
        """The results file's name under the results directory, without `.json`."""
        if self.lr is None:
            return f"{self.method}__seed{self.seed}"
        return f"select/{self.method}__lr{self.lr:g}__seed{self.seed}"

    @property
    def run_subdir(self) -> str:
        if self.lr is None:
            return os.path.join(self.method, f"seed{self.seed}")
        return os.path.join("select", self.method, f"lr{self.lr:g}_seed{self.seed}")


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
    """The reported runs of a bench (learning rates as the configs give them), every config checked before
    anything runs."""
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


def _one_per_method(jobs: list[Job]) -> list[Job]:
    """The first reported job of each trained method among `jobs` (zero_shot has no learning rate)."""
    first: dict[str, Job] = {}
    for job in jobs:
        if job.lr is None and job.method != "zero_shot":
            first.setdefault(job.method, job)
    return list(first.values())


def selection_jobs(jobs: list[Job]) -> list[Job]:
    """The learning-rate selection runs of the methods among `jobs` whose config has a `select.lr` grid of
    two or more values: one per value and selection seed, on the dev split. Seed-major, as `plan`."""
    out = []
    for job in _one_per_method(jobs):
        cfg = load_config(job.config, job.overrides)
        sel = cfg.select
        if sel.lr is None or len(sel.lr) < 2:
            continue
        check_metric(cfg, job.config)
        out += [selection_job(job.method, job.config, job.overrides, seed, lr) for seed in sel.seeds for lr in sel.lr]
    methods = list(dict.fromkeys(j.method for j in out))
    return sorted(out, key=lambda j: (j.seed, methods.index(j.method)))  # stable: each grid in its order


def check_metric(cfg, source: str) -> None:
    """`select.metric` must be one the task reports (STS-B has no accuracy, for instance)."""
    from .tasks import get_task

    task = get_task(cfg.data.task)
    reported = ("score", "pearson", "spearman") if task.regression else ("score", "accuracy", "f1_macro", "mcc")
    if cfg.select.metric not in reported:
        raise ConfigError(f"{source}: select.metric={cfg.select.metric} is not a metric of task {task.name}; "
                          f"it reports {list(reported)} ('score' is its GLUE headline)")


def _worst_if_missing(value: float | None, worst: float) -> float:
    return worst if value is None or not math.isfinite(value) else value


def selection_job(method: str, config: str, overrides: list[str], seed: int, lr: float) -> Job:
    """The selection run of `method` at one learning rate and seed: trained and scored on the dev split."""
    return Job(method, seed, config, overrides + ["data.eval_split=dev", f"train.lr={lr!r}"], lr)


def rate_beyond(edge: float, neighbour: float) -> float:
    """The learning rate one step beyond a grid's `edge`, away from its `neighbour` in the grid: the edge
    times the ratio edge / neighbour, snapped to the 1-3 ladder (1e-4, 3e-4, 1e-3, ...) where a value of it
    lies beyond the edge within a factor of 1.5 (3e-4, 1e-3, 3e-3: 1e-4 below, 1e-2 above)."""
    target = edge * edge / neighbour
    k = math.floor(math.log10(target))
    ladder = [float(f"{m}e{e}") for e in (k - 1, k, k + 1) for m in (1, 3)]
    near = min(ladder, key=lambda v: abs(math.log(v / target)))
    beyond = near > edge if target > edge else near < edge
    return near if beyond and abs(math.log(near / target)) < math.log(1.5) else float(f"{target:.3g}")


def selection_state(results_dir: str, config: str, overrides: list[str]) -> tuple[float | None, dict[float, dict], list[float]]:
    """(chosen learning rate, {lr: {"score", "eval_loss", "runs"}}, the grid so far) for one method from its
    selection runs' results files. The grid is `select.lr` and, while the best rate is the grid's smallest or
    largest and fewer than `select.extend` rates were added, the next rate beyond that edge (`rate_beyond`).
    The chosen rate is None while any rate of the grid so far has no up-to-date results file for every
    selection seed, or when the method has no grid. Best mean `select.metric` over the selection seeds (a
    missing or non-finite score counts as the worst); ties: the lower mean loss on the dev split."""
    sel = load_config(config, overrides).select
    if sel.lr is None or len(sel.lr) < 2:
        return None, {}, []
    method = os.path.splitext(os.path.basename(config))[0]
    grid, table = list(sel.lr), {}
    while True:
        for lr in grid:
            if lr in table:
                continue
            finals = []
            for seed in sel.seeds:
                job = selection_job(method, config, overrides, seed, lr)
                path = os.path.join(results_dir, job.key + ".json")
                if _results_state(path, job) != "done":
                    return None, table, grid
                with open(path, encoding="utf-8") as fh:
                    res = json.load(fh)
                # a run stopped by a non-finite loss (this rate diverged) counts as the worst
                finals.append({} if res.get("status") == "nonfinite_loss" else res["final"] or {})
            table[lr] = {"score": sum(_worst_if_missing(f.get(sel.metric), -math.inf) for f in finals) / len(finals),
                         "eval_loss": sum(_worst_if_missing(f.get("eval_loss"), math.inf) for f in finals) / len(finals),
                         "runs": len(finals)}
        best = max(table, key=lambda lr: (table[lr]["score"], -table[lr]["eval_loss"]))
        ordered = sorted(grid)
        if len(grid) - len(sel.lr) >= sel.extend or best not in (ordered[0], ordered[-1]):
            return best, table, grid
        grid.append(rate_beyond(ordered[0], ordered[1]) if best == ordered[0] else rate_beyond(ordered[-1], ordered[-2]))


def choose_lr(results_dir: str, config: str, overrides: list[str]) -> tuple[float | None, dict[float, dict]]:
    """(chosen learning rate, {lr: {"score", "eval_loss", "runs"}}) for one method: `selection_state`'s."""
    best, table, _ = selection_state(results_dir, config, overrides)
    return best, table


def extension_jobs(jobs: list[Job], results_dir: str) -> list[Job]:
    """The selection runs of rates added beyond a grid's edge (`select.extend`) that the results so far call
    for, for the methods among `jobs`; seed-major, as `selection_jobs`."""
    out = []
    for job in _one_per_method(jobs):
        _, _, grid = selection_state(results_dir, job.config, job.overrides)
        configured = load_config(job.config, job.overrides).select
        out += [selection_job(job.method, job.config, job.overrides, seed, lr)
                for seed in configured.seeds for lr in grid if lr not in (configured.lr or [])]
    return sorted(out, key=lambda j: j.seed)


def unused_selection_files(jobs: list[Job], results_dir: str) -> list[str]:
    """Selection results files of the methods among `jobs` whose selection is complete but that are not
    part of it: a rate outside its grid as it now stands (an earlier config's rate, or a rate an earlier
    `select.extend` added that the current results no longer call for), or a seed outside `select.seeds`.
    Left in place, the report would show them beside the rates the choice was made from."""
    sel_dir = os.path.join(results_dir, "select")
    if not os.path.isdir(sel_dir):
        return []
    names = sorted(os.listdir(sel_dir))
    out = []
    for job in _one_per_method(jobs):
        best, _, grid = selection_state(results_dir, job.config, job.overrides)
        if best is None:  # incomplete: its runs are still to come (stale ones are set aside as they rerun)
            continue
        seeds = load_config(job.config, job.overrides).select.seeds
        used = {selection_job(job.method, job.config, job.overrides, seed, lr).key + ".json"
                for lr in grid for seed in seeds}
        out += [os.path.join(sel_dir, n) for n in names
                if n.startswith(f"{job.method}__lr") and n.endswith(".json") and f"select/{n}" not in used]
    return out


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


TASKS_FILE = "_tasks.yaml"


def task_overrides(suite: str, task: str) -> list[str]:
    """A GLUE suite's settings for one task, from `<suite>/_tasks.yaml` (task -> config sections, e.g.
    `sst2: {data: {max_train_samples: 8000}}`), as `section.field=value` overrides after `data.task=<task>`."""
    from .tasks import get_task

    get_task(task)  # an unknown task fails here, naming the known ones
    path = os.path.join(suite, TASKS_FILE)
    per_task = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            per_task = yaml.safe_load(fh) or {}
        if not isinstance(per_task, dict) or not all(isinstance(v, dict) for v in per_task.values()):
            raise ConfigError(f"{path}: expected task -> config sections, e.g. sst2: {{data: {{max_train_samples: 8000}}}}")
    out = [f"data.task={task}"]
    for section, fields in (per_task.get(task) or {}).items():
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}: {task}.{section} must be a mapping of fields")
        out += [f"{section}.{k}={json.dumps(v)}" for k, v in fields.items()]
    return out


def run_glue(suite: str, tasks: list[str], output_dir: str, results_dir: str | None = None, log=print,
             **kwargs) -> dict:
    """`run_bench` for every task in turn (its settings from the suite's `_tasks.yaml`), each task's runs
    and results in `<dir>/<task>/`; then the GLUE report over the tasks. Returns run_bench's summary,
    merged over the tasks (keys prefixed `<task>/`)."""
    from .glue_report import task_dirs, write_glue_report

    results_dir = results_dir or os.path.join(output_dir, "results")
    overrides = list(kwargs.pop("overrides", None) or [])
    per_task = {t: task_overrides(suite, t) for t in tasks}  # every task checked before anything runs
    for t in tasks:
        jobs = plan(suite, kwargs.get("seeds") or list(DEFAULT_SEEDS), kwargs.get("methods"), kwargs.get("quick", False),
                    per_task[t] + overrides)
        if not kwargs.get("quick"):
            selection_jobs(jobs)  # checks each grid's select.metric against the task
    merged = {"ran": [], "skipped": [], "failed": {}, "chosen": {}}
    for t in tasks:
        log(f"bench: task {t}")
        # the task's own settings first, so --set overrides them; --quick keeps its small data
        mine = per_task[t][:1] if kwargs.get("quick") else per_task[t]
        out = run_bench(suite, os.path.join(output_dir, t), os.path.join(results_dir, t),
                        overrides=mine + overrides, log=log, report=False, **kwargs)
        merged["ran"] += [f"{t}/{k}" for k in out["ran"]]
        merged["skipped"] += [f"{t}/{k}" for k in out["skipped"]]
        merged["failed"].update({f"{t}/{k}": v for k, v in out["failed"].items()})
        merged["chosen"].update({f"{t}/{k}": v for k, v in out["chosen"].items()})
    merged["report"] = write_glue_report(results_dir) if task_dirs(results_dir) else None
    return merged


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
    select_only: bool = False,
    report: bool = True,
    log=print,
) -> dict:
    """Run the bench: first every learning-rate selection run (dev split), then the reported runs with
    each method's chosen learning rate. Returns {"ran": [...], "skipped": [...], "failed": {key: log
    path}, "chosen": {method: lr}, "report": path or None}."""
    from .bench_report import write_report

    seeds = list(DEFAULT_SEEDS[:1] if quick else DEFAULT_SEEDS) if seeds is None else list(seeds)
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    results_dir = results_dir or os.path.join(output_dir, "results")
    reported = plan(suite, seeds, methods, quick, overrides or [])
    os.makedirs(results_dir, exist_ok=True)
    pool = _Pool(output_dir, results_dir, data_dir, force, jobs, suite, quick, command, log)
    if quick:
        log("bench: --quick: no learning-rate selection, each config's train.lr is used"
            + ("; --select-only: nothing to run" if select_only else ""))
    else:
        pool.run(selection_jobs(reported))
        tried: set[str] = set()
        # a best rate at the grid's edge calls for the next rate beyond it (select.extend), one at a time
        while todo := [j for j in extension_jobs(reported, results_dir) if j.key not in tried]:
            tried.update(j.key for j in todo)
            pool.run(todo)
        for path in unused_selection_files(reported, results_dir):
            _set_aside(path, log, "is not among the selection runs the choice is made from")
    chosen, finals = {}, []
    for job in reported:
        lr, _ = (None, {}) if quick or job.method == "zero_shot" else choose_lr(results_dir, job.config, job.overrides)
        grid = None if quick or job.method == "zero_shot" else load_config(job.config, job.overrides).select.lr
        if grid is not None and len(grid) > 1 and lr is None:
            # its selection is incomplete (a failed run is reported): nothing to report yet, and what an
            # earlier choice reported is not current
            _set_aside(os.path.join(results_dir, job.key + ".json"), log)
            continue
        if lr is not None:
            chosen[job.method] = lr
            job = Job(job.method, job.seed, job.config, job.overrides + [f"train.lr={lr!r}"])
        finals.append(job)
    for method, lr in chosen.items():
        log(f"bench: {method}: learning rate {lr:g} chosen on the dev split")
    if select_only:  # results of another config (e.g. an earlier choice) are not reported as current
        for job in finals:
            path = os.path.join(results_dir, job.key + ".json")
            if _results_state(path, job) == "stale":
                _set_aside(path, log)
    else:
        pool.run(finals)
    have_results = any(f.endswith(".json") and "__seed" in f for f in os.listdir(results_dir))
    written = write_report(results_dir) if report and have_results else None
    return {"ran": pool.ran, "skipped": pool.skipped, "failed": pool.failed, "chosen": chosen, "report": written}


class _Pool:
    """Runs jobs as subprocesses, `jobs` at a time; skips those whose results file is up to date."""

    def __init__(self, output_dir, results_dir, data_dir, force, jobs, suite, quick, command, log):
        self.output_dir, self.results_dir, self.data_dir, self.force = output_dir, results_dir, data_dir, force
        self.jobs, self.suite, self.quick, self.command, self.log = jobs, suite, quick, command, log
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.failed: dict[str, str] = {}
        self.env = dict(os.environ)
        if jobs > 1:  # share the cores instead of oversubscribing them
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))

    def run(self, todo: list[Job]) -> None:
        pending, stale, skipped = [], [], []
        for job in todo:
            path = os.path.join(self.results_dir, job.key + ".json")
            state = "run" if self.force else _results_state(path, job)
            if state == "done":
                skipped.append(job.key)
            else:
                pending.append(job)
                if state == "stale":
                    stale.append(job.key)
                    _set_aside(path, lambda _: None)  # never read as current, even if its rerun fails
        self.skipped += skipped
        if skipped:
            self.log(f"bench: {len(skipped)} run(s) already have results in {self.results_dir}; skipping them "
                     "(--force reruns)")
        if stale:
            self.log(f"bench: {len(stale)} results file(s) were made with another config; rerunning: {', '.join(stale)}")
        running: list[tuple[Job, subprocess.Popen, str, float]] = []
        done = 0
        queue = list(pending)
        while queue or running:
            while queue and len(running) < self.jobs:
                job = queue.pop(0)
                run_dir = os.path.join(self.output_dir, "runs", job.run_subdir)
                os.makedirs(run_dir, exist_ok=True)
                log_path = os.path.join(run_dir, "bench.log")
                with open(log_path, "a", encoding="utf-8") as fh:  # an earlier attempt's log stays above
                    proc = subprocess.Popen(_command(job, run_dir, self.data_dir, self.force), stdout=fh,
                                            stderr=subprocess.STDOUT, env=self.env)
                running.append((job, proc, run_dir, time.time()))
                self.log(f"bench: started {job.key}")
            time.sleep(0.5)
            for item in list(running):
                job, proc, run_dir, started = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                done += 1
                log_path = os.path.join(run_dir, "bench.log")
                if proc.returncode != 0 and job.lr is not None and _diverged(run_dir):
                    self.log(f"bench: {job.key}: the loss became non-finite at this learning rate; counted as the "
                             f"worst of its grid (log: {log_path})")
                elif proc.returncode != 0:
                    self.failed[job.key] = log_path
                    self.log(f"bench: FAILED {job.key} (exit {proc.returncode}); log: {log_path}")
                    continue
                collect(run_dir, self.results_dir, job, self.suite, self.quick, self.command, self.jobs,
                        self.env.get("OMP_NUM_THREADS"))
                self.ran.append(job.key)
                self.log(f"bench: done {job.key} in {time.time() - started:.0f}s ({done}/{len(pending)})")


IGNORED_IN_RESULTS = ("train.output_dir", "data.data_dir")  # where a run was written and read from
DEV_SPLIT_FIELDS = ("data.dev_fraction", "data.dev_seed")  # no effect on a run scored on validation


def _diverged(run_dir: str) -> bool:
    """Whether a run stopped because its loss became non-finite (its results.json says so)."""
    try:
        with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as fh:
            return json.load(fh).get("status") == "nonfinite_loss"
    except (OSError, ValueError):
        return False


def _set_aside(path: str, log, why: str = "was made with another config or learning rate") -> None:
    """Rename a results file that is no longer current to `<name>.stale` (kept, never read as a result)."""
    if os.path.exists(path):
        os.replace(path, path + ".stale")
        log(f"bench: {path} {why}; set aside as {os.path.basename(path)}.stale")


def _results_state(path: str, job: Job) -> str:
    """"done" when `path` holds the results of `job`'s config, "stale" when it holds another config's
    (the config or a chosen learning rate changed since), "run" when there is none."""
    if not os.path.exists(path):
        return "run"
    try:
        with open(path, encoding="utf-8") as fh:
            previous = json.load(fh)["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return "stale"
    current = load_config(job.config, job.overrides + [f"train.seed={job.seed}"]).to_dict()
    ignored = RESUME_MAY_CHANGE + IGNORED_IN_RESULTS
    if current["data"]["eval_split"] == "validation":
        ignored += DEV_SPLIT_FIELDS
    differ = [k for k in config_differences(previous, current) if k not in ignored]
    return "stale" if differ else "done"


def collect(run_dir: str, results_dir: str, job: Job, suite: str, quick: bool, command: str | None = None,
            jobs: int = 1, threads: str | None = None) -> str:
    """Copy a run's results.json into the results directory as `<method>__seed<k>.json`, tagged."""
    from .report import write_json

    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as fh:
        results = json.load(fh)
    results["bench"] = {"method": job.method, "seed": job.seed, "suite": suite, "config": job.config,
                        "overrides": job.overrides, "quick": quick, "command": command,
                        "parallel_runs": jobs, "omp_num_threads": threads}
    results["bench"]["selection_lr"] = job.lr
    path = os.path.join(results_dir, job.key + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, results)
    return path


__all__ = ["Job", "QUICK_OVERRIDES", "choose_lr", "extension_jobs", "rate_beyond", "plan", "run_bench", "run_glue", "selection_jobs", "suite_methods",
           "task_overrides"]
