"""`adarank report DIR`: the Markdown table and the plots of a bench, from its per-run results JSON files
alone (no training). Every number in the output is computed here from those files."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections import defaultdict
from typing import Any

from .report import atomic_write

KIND_ORDER = ("zero_shot", "head", "lora", "adalora", "adarank", "full")
ADAPTER_KINDS = ("lora", "adalora", "adarank")


def load_results(results_dir: str) -> dict[str, list[dict]]:
    """Method -> its runs (results dicts), from `<method>__seed<k>.json` files."""
    if not os.path.isdir(results_dir):
        raise FileNotFoundError(f"results directory not found: {results_dir}")
    runs: dict[str, list[dict]] = defaultdict(list)
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".json") or "__seed" not in name:
            continue
        path = os.path.join(results_dir, name)
        try:
            with open(path, encoding="utf-8") as fh:
                res = json.load(fh)
            method = res["bench"]["method"]
            res["final"]["eval_loss"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a bench results file ({type(exc).__name__}: {exc})") from None
        runs[method].append(res)
    if not runs:
        raise FileNotFoundError(f"{results_dir} holds no bench results (<method>__seed<k>.json)")
    return dict(sorted(runs.items(), key=lambda kv: _order(kv[0], kv[1][0])))


def load_selection(results_dir: str) -> dict[str, dict[float, list[dict]]]:
    """Method -> learning rate -> its selection runs (dev split), from `select/<method>__lr<x>__seed<k>.json`."""
    sel_dir = os.path.join(results_dir, "select")
    out: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    if not os.path.isdir(sel_dir):
        return {}
    for name in sorted(os.listdir(sel_dir)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(sel_dir, name)
        try:
            with open(path, encoding="utf-8") as fh:
                res = json.load(fh)
            out[res["bench"]["method"]][float(res["bench"]["selection_lr"])].append(res)
            res["bench"]["method"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a selection results file ({type(exc).__name__}: {exc})") from None
    return {m: dict(sorted(v.items())) for m, v in sorted(out.items(), key=lambda kv: _order(kv[0], _first(kv[1])))}


def _first(by_lr: dict[float, list[dict]]) -> dict:
    return next(iter(by_lr.values()))[0]


def selection_section(selection: dict[str, dict[float, list[dict]]], runs: dict[str, list[dict]]) -> list[str]:
    """The learning-rate selection table: per method and learning rate, the mean dev-split score of its
    selection runs; the chosen rate (the one the reported runs used) in bold."""
    if not selection:
        return []
    grids = sorted({lr for by_lr in selection.values() for lr in by_lr})
    metric = _first(next(iter(selection.values())))["config"]["select"]["metric"]
    lines = ["", "## Learning rates, chosen on the development split", "",
             f"Every method's learning rate was chosen by its mean {metric} (in percent) on the development split: "
             "a fixed, stratified "
             f"{_first(next(iter(selection.values())))['config']['data']['dev_fraction']:.0%} of the training split "
             "held out (`data.eval_split: dev`), training on the rest; ties go to the lower loss on the development split. "
             "The reported runs above then trained on the whole training split with the chosen rate (in bold). "
             "Seeds per cell: the selection seeds of the method's config."
             + (" " + ADDED_NOTE if any_added(selection) else ""), "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in grids) + " | chosen |",
             "|---|" + "---|" * (len(grids) + 1)]
    for method, by_lr in selection.items():
        used = {r["config"]["train"]["lr"] for r in runs.get(method, [])}
        chosen = ", ".join(f"{lr:g}" for lr in sorted(used)) if used else "(no reported runs yet)"
        lines.append(f"| {method} | " + " | ".join(selection_cells(by_lr, grids, used)) + f" | {chosen} |")
    return lines


def selection_cells(by_lr: dict[float, list[dict]], grid: list[float], used: set[float]) -> list[str]:
    """One table cell per learning rate of `grid`: the mean `select.metric` of its selection runs in percent
    (with n when more than one), "diverged" for a rate whose loss became non-finite (the worst of its grid),
    empty where there is no run; the rate the reported runs used in bold."""
    cells = []
    for lr in grid:
        rs = by_lr.get(lr)
        if not rs:
            cells.append("")
            continue
        if any(r.get("status") == "nonfinite_loss" for r in rs):
            cells.append("diverged")
            continue
        m, _ = mean_std([r["final"].get(r["config"]["select"]["metric"]) for r in rs])
        cell = f"{100 * m:.2f}" + (f" (n={len(rs)})" if len(rs) > 1 else "") + (" †" if added_rate(rs[0]) else "")
        cells.append(f"**{cell}**" if lr in used else cell)
    return cells


ADDED_NOTE = ("† a rate added beyond the configured grid because the best rate lay at its edge "
              "(`select.extend`).")


def added_rate(res: dict) -> bool:
    """Whether a selection run's rate lies outside its config's grid (added by `select.extend`)."""
    return float(res["bench"]["selection_lr"]) not in (res["config"]["select"]["lr"] or [])


def any_added(selection: dict[str, dict[float, list[dict]]]) -> bool:
    return any(added_rate(rs[0]) for by_lr in selection.values() for rs in by_lr.values())


def _order(method: str, res: dict) -> tuple:
    kind = res.get("method", "adarank")
    rank = res["config"]["adarank"]["r0"] if kind == "lora" else 0
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), rank, method)


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for method, rs in runs.items():
        row = {"method": method, "kind": rs[0].get("method", "adarank"), "n": len(rs),
               "seeds": sorted(r["bench"]["seed"] for r in rs)}
        for key in ("accuracy", "f1_macro", "eval_loss", "score"):
            row[key] = mean_std([r["final"].get(key) for r in rs])
        for key in ("trainable_params_final", "trainable_params_avg", "growth_events", "final_rank", "wall_time_s",
                    "step_time_s"):
            row[key] = mean_std([r.get(key) for r in rs])
        row["lr"] = sorted({r["config"]["train"]["lr"] for r in rs})
        row["epochs"] = rs[0]["config"]["train"]["epochs"]
        row["chances"] = growth_chances(rs) if row["kind"] == "adarank" and all("checks" in r for r in rs) else None
        rows.append(row)
    return rows


NO_CHANCE = ("first window", "at r_max", "cooldown", "non-finite loss in window")


def growth_chances(rs: list[dict]) -> tuple[int, int]:
    """(growths, chances) over runs: a chance is a check where the rule looked at the loss and could have
    grown (not the first window after a growth, not at r_max, not in a cooldown)."""
    checks = [c for r in rs for c in r.get("checks", []) if c["reason"] not in NO_CHANCE]
    return sum(c["action"] == "grow" for c in checks), len(checks)


def _fmt_ms(ms: tuple[float, float], digits: int = 2, scale: float = 100.0, n: int = 2) -> str:
    """mean ± std; the mean alone for one seed (n=1), which has no spread to show."""
    m, s = ms
    if math.isnan(m):
        return "–"
    return f"{m * scale:.{digits}f}" + ("" if n == 1 else f" ± {s * scale:.{digits}f}")


def _fmt_num(ms: tuple[float, float], digits: int = 0) -> str:
    m = ms[0]
    if math.isnan(m):
        return "–"
    return f"{m:,.{digits}f}"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


IGNORED_SETTINGS = ("train.output_dir", "train.seed", "method.name")


def settings(runs: dict[str, list[dict]]) -> tuple[dict[str, tuple[Any, str]], dict[str, dict[str, Any]]]:
    """From the runs' configs: (setting -> (value, which methods use it) where every method that uses the
    setting has the same value; method -> {setting: value} where they differ). A setting counts only for
    the methods it affects (adarank.* for AdaRank, its rank and LoRA fields for fixed LoRA, adalora.*)."""
    flat = {m: _flatten(rs[0]["config"]) for m, rs in runs.items()}
    kinds = {m: rs[0].get("method", "adarank") for m, rs in runs.items()}
    keys = sorted({k for f in flat.values() for k in f} - set(IGNORED_SETTINGS))
    common, differ = {}, defaultdict(dict)
    for key in keys:
        users = [m for m in flat if any(key.startswith(p) for p in _relevant_prefixes(kinds[m]))]
        if not users:
            continue
        values = {m: flat[m].get(key) for m in users}
        counts = defaultdict(int)
        for v in values.values():
            counts[json.dumps(v)] += 1
        if len(counts) == 1:
            used_by = "all" if len(users) == len(flat) else ", ".join(sorted({kinds[m] for m in users}))
            common[key] = (next(iter(values.values())), used_by)
            continue
        for m, v in values.items():
            differ[m][key] = v
    return common, dict(differ)


def _relevant_prefixes(kind: str) -> tuple[str, ...]:
    base = ("model.", "data.", "train.", "method.")
    if kind == "adarank":
        return base + ("adarank.",)
    if kind == "lora":
        return base + ("adarank.r0", "adarank.lora_alpha_ratio", "adarank.target_modules", "adarank.lora_dropout")
    if kind == "adalora":
        return base + ("adalora.", "adarank.lora_alpha_ratio", "adarank.target_modules", "adarank.lora_dropout")
    return base


def compare(a: dict, b: dict, key: str) -> str:
    """`a` minus `b` in points with the standard error of the difference and a plain verdict."""
    diff, se = _diff_se(a, b, key)
    if a["n"] < 2 or b["n"] < 2:
        verdict = "one seed: no error estimate"
    elif abs(diff) > 2 * se:
        verdict = "higher" if diff > 0 else "lower"
    else:
        verdict = "within seed noise: ≤ 2 SE"
    return f"{_signed(diff)} (SE {se:.2f}; {verdict})"


def primary(rows: list[dict]) -> str:
    """The metric the comparisons use: accuracy, or the task's headline `score` where there is no accuracy
    (STS-B)."""
    return "accuracy" if all(not math.isnan(r["accuracy"][0]) for r in rows) else "score"


def best_fixed_rank(rows: list[dict], key: str) -> dict | None:
    """The fixed-rank LoRA row with the highest mean `key`, or None without one."""
    lora = [r for r in rows if r["kind"] == "lora"]
    best = None
    for r in lora:  # the first of equal means (up to float summation order) stays
        if best is None or _higher(r[key][0], best[key][0]):
            best = r
    return best


def comparisons(rows: list[dict]) -> list[str]:
    key = primary(rows)
    by_kind = defaultdict(list)
    for r in rows:
        by_kind[r["kind"]].append(r)
    if not by_kind["adarank"]:
        return []
    best = best_fixed_rank(rows, key)
    refs = [(f"the best fixed-rank LoRA by mean {key} ({best['method']})", best)] if best else []
    refs += [(f"{r['method']}", r) for r in by_kind["adalora"] + by_kind["full"] + by_kind["head"]]
    if not refs:  # e.g. a study of AdaRank's settings alone
        return []
    lines = [f"| AdaRank run | versus | Δ {key} (points) | Δ F1 macro (points) | step-averaged trainable params, ratio |",
             "|---|---|---|---|---|"]
    for ours in by_kind["adarank"]:
        for label, ref in refs:
            ratio = ours["trainable_params_avg"][0] / ref["trainable_params_avg"][0]
            lines.append(f"| {ours['method']} | {label} | {compare(ours, ref, key)} | "
                         f"{compare(ours, ref, 'f1_macro')} | {ratio:.3g}× |")
    if best:
        lines += aim_lines(by_kind["adarank"], best, key)
    return lines + frontier_lines(rows, by_kind["adarank"], key)


def aim_lines(ours_rows: list[dict], best: dict, key: str) -> list[str]:
    """Whether each AdaRank run meets the aim against the best fixed rank (a blank line first)."""
    lines = ["", f"The aim — beat the best tuned fixed rank ({best['method']}) in {key} by more than 2 standard "
             "errors at no more than half its step-averaged trainable parameters:", ""]
    for ours in ours_rows:
        diff, se = _diff_se(ours, best, key)
        ratio = ours["trainable_params_avg"][0] / best["trainable_params_avg"][0]
        met = diff > 2 * se and ratio <= 0.5 and ours["n"] > 1 and best["n"] > 1
        lines.append(f"- {ours['method']}: {'met' if met else 'not met'} (Δ {_signed(diff)} points, 2 SE = {2 * se:.2f}; "
                     f"{ratio:.3g}× the parameters)")
    return lines


def frontier_lines(rows: list[dict], ours_rows: list[dict], key: str) -> list[str]:
    """Per AdaRank run, the methods with a higher mean `key` at fewer step-averaged parameters (a blank line first)."""
    lines = ["", f"Accuracy per parameter — the methods with a higher mean {key} at fewer step-averaged trainable "
             "parameters than each AdaRank run (means only; none: the run is on this grid's frontier):", ""]
    for ours in ours_rows:
        better = [r for r in rows if r is not ours and _higher(r[key][0], ours[key][0])
                  and r["trainable_params_avg"][0] < ours["trainable_params_avg"][0]]
        lines.append(f"- {ours['method']}: " + (", ".join(
            f"{r['method']} ({_signed((r[key][0] - ours[key][0]) * 100)} points at "
            f"{r['trainable_params_avg'][0] / ours['trainable_params_avg'][0]:.3g}× the parameters)" for r in better)
            or "none"))
    return lines


def _higher(a: float, b: float) -> bool:
    """a > b beyond float noise: two means of the same correct counts summed in another order are equal."""
    return a > b + 1e-9


def _signed(points: float) -> str:
    """`points` with its sign to 2 decimals; a difference that rounds to zero reads +0.00, never -0.00."""
    return f"{round(points, 2) + 0.0:+.2f}"


def _diff_se(a: dict, b: dict, key: str) -> tuple[float, float]:
    """Difference of means (points) and its standard error over seeds."""
    (ma, sa), (mb, sb) = a[key], b[key]
    return (ma - mb) * 100, math.sqrt(sa ** 2 / a["n"] + sb ** 2 / b["n"]) * 100


BUDGET_DIR = "budget"


def budget_section(results_dir: str) -> list[str]:
    """The budget check: `<results_dir>/budget/<name>/` each hold runs of one method and learning rate at one
    training length (e.g. `e2/`, `e4/`); per method, each length against the one half as long. A budget
    counts as long enough where doubling it gains less than 1 point of validation accuracy."""
    path = os.path.join(results_dir, BUDGET_DIR)
    if not os.path.isdir(path):
        return []
    rows = [r for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))
            and any("__seed" in f for f in os.listdir(os.path.join(path, d)))
            for r in summarize(load_results(os.path.join(path, d)))]
    if not rows:
        return []
    lines = ["", "## Is the budget long enough?", "",
             f"The same method and learning rate at several training lengths (`{BUDGET_DIR}/`), each against the one "
             "half as long. A budget counts as long enough where doubling it gains less than 1 point of validation "
             "accuracy; training is capped at 4 epochs.", "",
             "| method | lr | epochs | seeds | accuracy | F1 macro | Δ accuracy vs half as long (points) | gain < 1 point |",
             "|---|---|---|---|---|---|---|---|"]
    by_key = {(r["method"], tuple(r["lr"]), r["epochs"]): r for r in rows}
    for (method, lr, epochs), r in sorted(by_key.items()):
        half = by_key.get((method, lr, epochs / 2))
        gain = "–" if half is None else compare(r, half, "accuracy")
        small = "–" if half is None else ("yes" if (r["accuracy"][0] - half["accuracy"][0]) * 100 < 1 else "no")
        lines.append(f"| {method} | {', '.join(f'{x:g}' for x in lr)} | {epochs:g} | {r['n']} | {_fmt_ms(r['accuracy'], n=r['n'])} | "
                     f"{_fmt_ms(r['f1_macro'], n=r['n'])} | {gain} | {small} |")
    return lines


def _parallel_note(runs: dict[str, list[dict]]) -> str:
    infos = {(r["bench"].get("parallel_runs", 1), r["bench"].get("omp_num_threads")) for rs in runs.values() for r in rs}
    parts = []
    for jobs, threads in sorted(infos, key=str):
        parts.append("one run at a time" if jobs == 1 else f"{jobs} runs at a time sharing the cores"
                     + (f" ({threads} thread(s) each)" if threads else ""))
    return " and ".join(parts)


def overhead_section(results_dir: str, shown_dir: str) -> list[str]:
    """The measurements of `benchmarks/overhead.py --output RESULTS_DIR/overhead.json`, when present
    (`shown_dir`: the results directory as the command line named it)."""
    path = os.path.join(results_dir, "overhead.json")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    s, m, a = data["summary"], data["measurements"], data["settings"]
    med = {k: {key: statistics.median(r[key] for r in rs) for key in ("step_time_s", "samples_per_s", "peak_rss_mb")}
           for k, rs in m.items()}
    growth = [g for r in m["adarank"] for g in r["growth_events"]]
    lines = ["", "## Overhead", "",
             f"`python benchmarks/overhead.py --steps {a['steps']} --repeats {a['repeats']} --rank {a['rank']} "
             f"--output {os.path.join(shown_dir, 'overhead.json')}` "
             f"(same model and data, one process per measurement, contenders alternating, medians of "
             f"{a['repeats']} repeats of {a['steps']} optimizer steps at rank {a['rank']}):", "",
             "| contender | s/step | samples/s | peak RSS (MiB) |", "|---|---|---|---|"]
    names = {"adarank": "AdaRank (our loop, controller on)", "lora": "PEFT LoRA (our loop, no controller)",
             "trainer": "HF Trainer + PEFT LoRA", "trainer_grouped": "HF Trainer + PEFT LoRA, grouped by length"}
    for kind, label in names.items():
        if kind not in med:  # a measurement from before that contender was added
            continue
        lines.append(f"| {label} | {med[kind]['step_time_s']:.4f} | {med[kind]['samples_per_s']:.1f} | "
                     f"{med[kind]['peak_rss_mb']:.0f} |")
    for strategy in ("expand", "merge"):
        t = [g["seconds"] for g in growth if g["strategy"] == strategy]
        if t:
            lines.append(f"\nGrowth event ({strategy}; surgery and the optimizer's update): median "
                         f"{statistics.median(t):.4f} s, max {max(t):.4f} s over {len(t)} events.")
    lines += ["", "```", " ".join(f"{k}={v:.3f}" for k, v in s.items()), "```"]
    return lines


def markdown(results_dir: str, runs: dict[str, list[dict]], rows: list[dict], plots: dict[str, str],
             command: str | None, results_dir_abs: str, shown_dir: str) -> str:
    first = next(iter(runs.values()))[0]
    common, differ = settings(runs)
    quick = any(r["bench"].get("quick") for rs in runs.values() for r in rs)
    versions = sorted({json.dumps(r["versions"], sort_keys=True) for rs in runs.values() for r in rs})
    lines = [
        f"# Benchmark: {first['task']} · {first['model']}",
        "",
        "Generated by `adarank report` from the per-run results files in "
        f"`{results_dir}` — do not edit by hand.",
        "",
    ]
    if quick:
        lines += ["**Quick mode** (a few hundred examples, short training): a smoke test of the grid, not a result.", ""]
    if command:
        lines += ["Regenerate (runs only what has no results file yet; `adarank report` alone redraws):", "",
                  f"```bash\n{command}\n```", ""]
    splits = sorted({r["config"]["data"].get("eval_split", "validation") for rs in runs.values() for r in rs})
    split = " and ".join({"dev": "development", "validation": "validation"}[x] for x in splits)
    lines += [
        f"Accuracy, F1 macro and score (the task's GLUE headline: MRPC the mean of accuracy and F1 of "
        f"'equivalent') on the {split} split after the last step, in percent, mean ± standard deviation over "
        "seeds (one seed: its value). lr: the learning rate the runs used. Trainable parameters: at the end, and averaged over optimizer "
        "steps (AdaRank's rank changes; "
        "AdaLoRA counts every allocated entry, masked or not). Rank: the largest rank over adapted modules at the "
        "end (AdaLoRA: singular values not masked). Grew / chances (AdaRank): growths over the checks where the rule "
        "looked at the loss and could have grown, summed over seeds. Time: wall time of the run and seconds per "
        f"optimizer step without evaluation and rank changes, {_parallel_note(runs)}.",
        "",
        "| method | seeds | lr | accuracy | F1 macro | score | val loss | trainable (final) | trainable (step avg) | "
        "growth events | grew / chances | final rank | wall s | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chances = f"{r['chances'][0]} / {r['chances'][1]}" if r["chances"] else "–"
        lines.append(
            f"| {r['method']} | {r['n']} | {', '.join(f'{x:g}' for x in r['lr'])} | {_fmt_ms(r['accuracy'], n=r['n'])} | "
            f"{_fmt_ms(r['f1_macro'], n=r['n'])} | {_fmt_ms(r['score'], n=r['n'])} | "
            f"{_fmt_ms(r['eval_loss'], 3, 1.0, n=r['n'])} | {_fmt_num(r['trainable_params_final'])} | "
            f"{_fmt_num(r['trainable_params_avg'])} | {_fmt_num(r['growth_events'], 1)} | {chances} | "
            f"{_fmt_num(r['final_rank'], 1) if r['kind'] in ADAPTER_KINDS else '–'} | {_fmt_num(r['wall_time_s'])} | "
            f"{_fmt_num(r['step_time_s'], 3)} |"
        )
    lines += selection_section(load_selection(results_dir_abs), runs)
    cmp_lines = comparisons(rows)
    if cmp_lines:
        lines += ["", "## AdaRank against the references", "",
                  "Differences of means in points; SE is the standard error of the difference over seeds. "
                  "\"higher\"/\"lower\" only where |Δ| > 2 SE.", ""] + cmp_lines
    lines += budget_section(results_dir_abs)
    lines += overhead_section(results_dir_abs, shown_dir)
    lines += ["", "## Plots", ""]
    for title, path in plots.items():
        lines += [f"![{title}]({path})", ""]
    lines += ["## Settings", "", "The same for every method that uses the setting:", "",
              "| setting | value | used by |", "|---|---|---|"]
    lines += [f"| `{k}` | `{json.dumps(v)}` | {used} |" for k, (v, used) in common.items()]
    if differ:
        lines += ["", "Per method, where the methods that use a setting differ:", "", "| method | settings |", "|---|---|"]
        for m in runs:
            if m in differ:
                lines.append(f"| {m} | " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(differ[m].items())) + " |")
    lines += ["", "## Package versions", ""]
    for v in versions:
        lines.append("- " + ", ".join(f"{k} {val}" for k, val in json.loads(v).items()))
    return "\n".join(lines) + "\n"


def plot_double_descent(runs: dict[str, list[dict]], rows: list[dict], path: str) -> None:
    """Validation loss and error against LoRA rank: the fixed-rank sweep (mean ± std over seeds), the AdaRank
    runs' trajectories (each evaluation at the rank in effect then) and the other methods as levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    key = primary(rows)
    panels = (("eval_loss", "validation loss", lambda e: e["eval_loss"]),
              ("error", f"validation error (1 − {key})", lambda e: 1.0 - e[key]))
    lora = sorted((r for r in rows if r["kind"] == "lora"), key=lambda r: runs[r["method"]][0]["config"]["adarank"]["r0"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (_, ylabel, get) in zip(axes, panels):
        if lora:
            xs = [runs[r["method"]][0]["config"]["adarank"]["r0"] for r in lora]
            stats = [mean_std([get(run["final"]) for run in runs[r["method"]]]) for r in lora]
            ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], fmt="o-", color="black", capsize=3,
                        label="fixed-rank LoRA (mean ± std)")
        adarank = [m for m, rs in runs.items() if rs[0].get("method") == "adarank"]
        for i, method in enumerate(adarank):
            color = colors[i % len(colors)]
            for j, run in enumerate(runs[method]):
                evals = [e for e in run["evals"] if e.get("rank_mean")]
                ax.plot([e["rank_mean"] for e in evals], [get(e) for e in evals], "-", marker=".", color=color,
                        alpha=0.6, linewidth=1, label=f"{method} (trajectories)" if j == 0 else None)
        for k, r in enumerate(x for x in rows if x["kind"] in ("head", "full", "adalora", "zero_shot")):
            value = mean_std([get(run["final"]) for run in runs[r["method"]]])[0]
            ax.axhline(value, linestyle=("--", ":", "-.")[k % 3], color="grey", linewidth=1, label=f"{r['method']} (mean)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank (AdaRank: mean over modules at the evaluation)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Validation loss and error against rank")
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy_params(runs: dict[str, list[dict]], rows: list[dict], path: str) -> None:
    """Mean accuracy (or, without one, the task's score; ± std) against step-averaged trainable parameters,
    one point per method."""
    key = primary(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        x = r["trainable_params_avg"][0]
        if not x or math.isnan(x):
            continue
        m, s = r[key]
        ax.errorbar([x], [m * 100], yerr=[s * 100], fmt="o", capsize=3)
        ax.annotate(r["method"], (x, m * 100), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, averaged over optimizer steps")
    ax.set_ylabel(f"validation {key} (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: str) -> None:
    import tempfile

    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def regenerate_command(runs: dict[str, list[dict]], results_dir: str, out: str | None,
                       readme: str | None = None) -> str:
    """The bench command(s) that make the runs `results_dir` holds (skipping those with a results file) and
    rewrite this report: one for the seeds every method has, one more per group of methods that has further
    seeds (`--methods`)."""
    import shlex

    infos = [r["bench"] for rs in runs.values() for r in rs]
    suite = infos[0]["suite"]
    by_method: dict[str, set[int]] = {}
    for i in infos:
        if i["method"] != "zero_shot":
            by_method.setdefault(i["method"], set()).add(i["seed"])
    common = set.intersection(*by_method.values()) if by_method else {infos[0]["seed"]}
    groups: dict[tuple[int, ...], list[str]] = {}
    for method, seeds in sorted(by_method.items()):
        if seeds - common:
            groups.setdefault(tuple(sorted(seeds - common)), []).append(method)
    quick = ["--quick"] if any(i.get("quick") for i in infos) else []
    base = ["adarank", "bench", "--suite", suite]
    cmds = [base + ["--seeds", *map(str, sorted(common)), "--results-dir", results_dir] + quick] if common else []
    cmds += [base + ["--seeds", *map(str, extra), "--methods", ",".join(methods), "--results-dir", results_dir] + quick
             for extra, methods in sorted(groups.items())]
    line = " && ".join(" ".join(shlex.quote(c) for c in cmd) for cmd in cmds)
    if out is not None:
        line += " && adarank report " + shlex.quote(results_dir) + " --out " + shlex.quote(out)
        if readme is not None:
            line += " --readme " + shlex.quote(readme)
    return line


STANDINGS_BEGIN = "<!-- adarank report: standings begin -->"
STANDINGS_END = "<!-- adarank report: standings end -->"


def standings(rows: list[dict], results_dir: str, out: str) -> list[str]:
    """The short form of a report for a README: AdaRank's runs, the best fixed rank and the other references
    (mean ± std over seeds, step-averaged trainable parameters) and the aim's verdict."""
    key = primary(rows)
    best = best_fixed_rank(rows, key)
    ours = [r for r in rows if r["kind"] == "adarank"]
    shown = ours + ([best] if best else []) + [r for r in rows if r["kind"] in ("adalora", "full", "head")]
    lines = [f"Generated by `adarank report` from the per-run results files in `{results_dir}`; "
             f"details, differences with standard errors and the settings in [{out}]({out}).", "",
             f"| method | seeds | lr | {key} | F1 macro | trainable params (step avg) |", "|---|---|---|---|---|---|"]
    for r in shown:
        label = f"{r['method']} (best fixed rank)" if r is best else r["method"]
        lines.append(f"| {label} | {r['n']} | {', '.join(f'{x:g}' for x in r['lr'])} | {_fmt_ms(r[key], n=r['n'])} | "
                     f"{_fmt_ms(r['f1_macro'], n=r['n'])} | {_fmt_num(r['trainable_params_avg'])} |")
    if best and ours:
        lines += aim_lines(ours, best, key) + frontier_lines(rows, ours, key)
    return lines


def splice_block(path: str, lines: list[str]) -> str:
    """`path`'s text with the lines between its standings markers replaced; the markers must each be there
    once, in order (nothing is written otherwise)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    begin, end = text.count(STANDINGS_BEGIN), text.count(STANDINGS_END)
    if begin != 1 or end != 1 or text.index(STANDINGS_BEGIN) > text.index(STANDINGS_END):
        raise ValueError(f"{path}: needs the lines {STANDINGS_BEGIN} and {STANDINGS_END}, once each and in that "
                         f"order, around the block to write (found {begin} and {end})")
    head, rest = text.split(STANDINGS_BEGIN)
    tail = rest.split(STANDINGS_END)[1]
    return head + STANDINGS_BEGIN + "\n" + "\n".join(lines) + "\n" + STANDINGS_END + tail


def write_report(results_dir: str, out: str | None = None, command: str | None = None,
                 readme: str | None = None) -> str:
    """Write the Markdown report (default `<results_dir>/RESULTS.md`) and its PNGs beside it; returns its path.
    A GLUE results directory (a subdirectory of results per task, `adarank bench --tasks`) gets the GLUE
    table instead (default `<results_dir>/GLUE.md`)."""
    from .glue_report import task_dirs, write_glue_report

    if task_dirs(results_dir) and not any("__seed" in f for f in os.listdir(results_dir)):
        if readme is not None:
            raise ValueError("--readme: a standings block is written from one task's results directory, "
                             f"not from the GLUE directory {results_dir}")
        return write_glue_report(results_dir, out)
    runs = load_results(results_dir)
    rows = summarize(runs)
    if command is None:
        command = regenerate_command(runs, results_dir, out, readme)
    out = out or os.path.join(results_dir, "RESULTS.md")
    if readme is not None:  # checked before anything is written
        shown = os.path.relpath(os.path.abspath(out), os.path.dirname(os.path.abspath(readme)))
        readme_text = splice_block(readme, standings(rows, results_dir, shown))
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    stem = re.sub(r"\W+", "_", os.path.splitext(os.path.basename(out))[0]).lower()
    plots = {"validation loss and error against rank": f"{stem}_double_descent.png",
             "accuracy against trainable parameters": f"{stem}_accuracy_params.png"}
    plot_double_descent(runs, rows, os.path.join(out_dir, plots["validation loss and error against rank"]))
    plot_accuracy_params(runs, rows, os.path.join(out_dir, plots["accuracy against trainable parameters"]))
    rel = os.path.relpath(os.path.abspath(results_dir), out_dir)
    atomic_write(out, markdown(rel, runs, rows, plots, command, os.path.abspath(results_dir), results_dir))
    if readme is not None:
        atomic_write(readme, readme_text)
    return out


__all__ = ["load_results", "summarize", "write_report", "mean_std"]
