"""`adarank bench` and `adarank report` end to end on tiny saved models (each run is a subprocess)."""

import json
import os
import re
import statistics

import pytest
from conftest import saved, tiny_bert, tiny_t5

from adarank import ConfigError
from adarank.bench import (QUICK_OVERRIDES, Job, choose_lr, extension_jobs, plan, rate_beyond, run_bench,
                           unused_selection_files)
from adarank.bench_report import (best_fixed_rank, compare, frontier_lines, load_results, mean_std, regenerate_command,
                                   summarize, write_report)
from adarank.cli import main
from adarank.config import load_config



def make_suite(root, base, methods, glue_dir):
    suite = root / "suite"
    suite.mkdir()
    (suite / "_base.yaml").write_text(
        f"model: {{name_or_path: '{base}', max_length: 48, max_target_length: 4}}\n"
        f"data: {{task: mrpc, data_dir: '{glue_dir}'}}\n"
        "train: {max_steps: 6, batch_size: 8, lr: 0.005, eval_steps: 3, logging_steps: 2, save_model: false}\n"
        "adarank: {r0: 2, r_max: 6, check_every: 2, warmup_steps: 2, criterion: threshold, tol: 0.0}\n"
    )
    for name, body in methods.items():
        (suite / f"{name}.yaml").write_text("extends: _base.yaml\n" + body)
    return str(suite)


BERT_METHODS = {"lora_r2": "method: {name: lora}\n", "adarank_expand": "method: {name: adarank}\n"}


@pytest.fixture
def bert_suite(tmp_path, glue_dir, bert_tok):
    base = saved(tiny_bert(vocab_size=len(bert_tok)), bert_tok, tmp_path / "bert")
    return make_suite(tmp_path, base, BERT_METHODS, glue_dir)


def test_plan_is_seed_major_and_checks_every_config_first(tmp_path, bert_suite):
    jobs = plan(bert_suite, [0, 1], None, quick=True, overrides=["train.lr=0.01"])
    assert [j.key for j in jobs] == ["adarank_expand__seed0", "lora_r2__seed0", "adarank_expand__seed1", "lora_r2__seed1"]
    assert jobs[0].overrides == list(QUICK_OVERRIDES) + ["train.lr=0.01"]  # a classifier: no zero_shot run
    with pytest.raises(ConfigError, match="not in suite"):
        plan(bert_suite, [0], ["lora_r99"], quick=False, overrides=[])
    with open(os.path.join(bert_suite, "broken.yaml"), "w") as fh:
        fh.write("extends: _base.yaml\nadarank: {r0: 0}\n")
    with pytest.raises(ConfigError, match="adarank.r0 must be >= 1"):
        plan(bert_suite, [0], None, quick=False, overrides=[])


def test_bench_runs_the_grid_reports_it_and_resumes(tmp_path, bert_suite):
    out, results = tmp_path / "out", tmp_path / "results"
    summary = run_bench(bert_suite, str(out), str(results), seeds=[0, 1], jobs=2, log=lambda _: None)
    assert summary["failed"] == {} and sorted(summary["ran"]) == sorted(
        f"{m}__seed{s}" for m in BERT_METHODS for s in (0, 1))
    runs = load_results(str(results))
    assert set(runs) == set(BERT_METHODS) and all(len(rs) == 2 for rs in runs.values())
    grown = runs["adarank_expand"][0]
    assert grown["growth_events"] == 2 and grown["rank_schedule"] == [2, 4, 6]  # checks at 2 and 4
    assert runs["lora_r2"][0]["growth_events"] == 0 and runs["lora_r2"][0]["bench"]["parallel_runs"] == 2

    # the table's numbers are the means and standard deviations of the files' numbers
    text = open(summary["report"]).read()
    for method, rs in runs.items():
        acc = [r["final"]["accuracy"] * 100 for r in rs]
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        assert f"{statistics.fmean(acc):.2f} ± {statistics.stdev(acc):.2f}" in row
    assert "## AdaRank against the references" in text and "lora_r2" in text
    # the aim's verdict follows from the files: > 2 SE better than the best fixed rank at <= half its parameters
    ours, ref = ([r["final"]["accuracy"] * 100 for r in runs[m]] for m in ("adarank_expand", "lora_r2"))
    diff = statistics.fmean(ours) - statistics.fmean(ref)
    se = (statistics.variance(ours) / 2 + statistics.variance(ref) / 2) ** 0.5
    ratio = (statistics.fmean(r["trainable_params_avg"] for r in runs["adarank_expand"])
             / statistics.fmean(r["trainable_params_avg"] for r in runs["lora_r2"]))
    verdict = "met" if diff > 2 * se and ratio <= 0.5 else "not met"
    assert f"- adarank_expand: {verdict} (Δ {round(diff, 2) + 0.0:+.2f} points, 2 SE = {2 * se:.2f}; {ratio:.3g}× the parameters)" in text
    assert "adarank bench --suite" in text and "--seeds 0 1" in text
    for png in re.findall(r"\]\((\S+\.png)\)", text):
        assert os.path.getsize(os.path.join(results, png)) > 1000

    again = run_bench(bert_suite, str(out), str(results), seeds=[0, 1], log=lambda _: None)
    assert again["ran"] == [] and len(again["skipped"]) == 4


def test_report_alone_regenerates_from_the_files(tmp_path, bert_suite, capsys):
    results = tmp_path / "results"
    run_bench(bert_suite, str(tmp_path / "out"), str(results), seeds=[0], methods=["lora_r2"], log=lambda _: None)
    out_md = tmp_path / "docs" / "RESULTS.md"
    assert main(["report", str(results), "--out", str(out_md)]) == 0
    text = out_md.read_text()
    assert "../results" in text  # the results directory, relative to the report
    assert (tmp_path / "docs" / "results_double_descent.png").exists()
    rows = summarize(load_results(str(results)))
    assert rows[0]["n"] == 1 and rows[0]["accuracy"][1] == 0.0

    # benchmarks/overhead.py --output RESULTS/overhead.json: the report adds its medians and summary line
    run = {"step_time_s": 0.5, "samples_per_s": 64.0, "peak_rss_mb": 1000.0}
    overhead = {"settings": {"steps": 40, "repeats": 3, "rank": 8},
                "measurements": {"adarank": [dict(run, growth_events=[{"strategy": "merge", "seconds": 0.25}])],
                                 "lora": [run], "trainer": [dict(run, samples_per_s=32.0)]},
                "summary": {"overhead_ratio": 1.0, "growth_event_s": 0.25, "trainer_speedup": 2.0, "peak_rss_ratio": 1.0}}
    (results / "overhead.json").write_text(json.dumps(overhead))
    assert main(["report", str(results), "--out", str(out_md)]) == 0
    text = out_md.read_text()
    assert "overhead_ratio=1.000 growth_event_s=0.250 trainer_speedup=2.000 peak_rss_ratio=1.000" in text
    assert "| HF Trainer + PEFT LoRA | 0.5000 | 32.0 | 1000 |" in text and "merge" in text

    # a budget check (RESULTS/budget/<length>/: one method at several training lengths) gets its own table
    res = json.load(open(results / "lora_r2__seed0.json"))
    for name, epochs, gain in (("short", 1, 0.0), ("long", 2, 0.015)):
        (results / "budget" / name).mkdir(parents=True)
        run = json.loads(json.dumps(res))
        run["config"]["train"]["epochs"] = epochs
        run["final"]["accuracy"] += gain
        (results / "budget" / name / "lora_r2__seed0.json").write_text(json.dumps(run))
    assert main(["report", str(results), "--out", str(out_md)]) == 0
    row = next(line for line in out_md.read_text().splitlines() if line.startswith("| lora_r2 | 0.005 | 2 |"))
    assert "+1.50" in row and row.endswith("| no |")  # doubling gained 1.5 points: not long enough


def test_report_rewrites_only_the_readmes_standings_block(tmp_path, bert_suite, capsys):
    results = tmp_path / "results"
    run_bench(bert_suite, str(tmp_path / "out"), str(results), seeds=[0], log=lambda _: None)
    readme, out_md = tmp_path / "README.md", tmp_path / "docs" / "RESULTS.md"
    before = "# Tool\n\nintro\n<!-- adarank report: standings begin -->\nstale 99.9\n<!-- adarank report: standings end -->\ntail\n"
    readme.write_text(before)
    assert main(["report", str(results), "--out", str(out_md), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Tool\n\nintro\n<!-- adarank report: standings begin -->\n") and text.endswith(
        "<!-- adarank report: standings end -->\ntail\n") and "stale 99.9" not in text
    assert "[docs/RESULTS.md](docs/RESULTS.md)" in text and "lora_r2 (best fixed rank)" in text
    acc = json.load(open(results / "adarank_expand__seed0.json"))["final"]["accuracy"]
    assert f"| adarank_expand | 1 | 0.005 | {acc * 100:.2f} | " in text  # one seed: the mean, no "± 0.00"
    assert "- adarank_expand: not met" in text  # one seed: never "met"
    lora = json.load(open(results / "lora_r2__seed0.json"))
    ours = json.load(open(results / "adarank_expand__seed0.json"))
    dominated = (lora["final"]["accuracy"] > acc and lora["trainable_params_avg"] < ours["trainable_params_avg"])
    assert ("- adarank_expand: lora_r2 (" if dominated else "- adarank_expand: none") in text  # the frontier line
    assert f"--readme {readme}" in out_md.read_text()  # the regenerate command keeps the block current

    # without the markers (or with two blocks): one line, exit 2, neither file touched
    out_md.unlink()
    for bad in ("# Tool\nno block\n", before + before):
        readme.write_text(bad)
        assert main(["report", str(results), "--out", str(out_md), "--readme", str(readme)]) == 2
        assert "standings begin" in capsys.readouterr().err.strip().splitlines()[-1]
        assert readme.read_text() == bad and not out_md.exists()


def test_bench_reports_failed_runs_and_exits_nonzero(tmp_path, bert_suite, capsys):
    empty = tmp_path / "empty_glue"
    empty.mkdir()
    code = main(["bench", "--suite", bert_suite, "--seeds", "0", "--methods", "lora_r2", "--data-dir", str(empty),
                 "--output-dir", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert "failed lora_r2__seed0" in err and "bench.log" in err
    log = open(os.path.join(tmp_path, "out", "runs", "lora_r2", "seed0", "bench.log")).read()
    assert "empty_glue" in log
    assert not os.path.exists(os.path.join(tmp_path, "out", "results", "lora_r2__seed0.json"))


def test_bench_with_an_unreadable_model_fails_before_running(tmp_path, glue_dir, capsys):
    suite = make_suite(tmp_path, str(tmp_path / "no_such_model"), {"lora": "method: {name: lora}\n"}, glue_dir)
    assert main(["bench", "--suite", suite, "--seeds", "0", "--output-dir", str(tmp_path / "out")]) == 2
    assert "model.name_or_path" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_report_names_a_bad_results_file(tmp_path, capsys):
    (tmp_path / "lora__seed0.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "lora__seed0.json" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_text_to_text_bench_adds_the_zero_shot_score(tmp_path, glue_dir, t5_tok):
    base = saved(tiny_t5(vocab_size=len(t5_tok)), t5_tok, tmp_path / "t5")
    suite = make_suite(tmp_path, base, {"lora_r2": "method: {name: lora}\n"}, glue_dir)
    jobs = plan(suite, [0, 1], None, quick=False, overrides=[])
    assert [j.key for j in jobs] == ["lora_r2__seed0", "lora_r2__seed1", "zero_shot__seed0"]
    summary = run_bench(suite, str(tmp_path / "out"), str(tmp_path / "res"), seeds=[0], log=lambda _: None)
    assert summary["failed"] == {}
    runs = load_results(str(tmp_path / "res"))
    assert runs["zero_shot"][0]["steps"] == 0 and runs["zero_shot"][0]["method"] == "zero_shot"
    text = open(summary["report"]).read()
    assert next(line for line in text.splitlines() if line.startswith("| zero_shot |"))
    with open(os.path.join(tmp_path, "res", "zero_shot__seed0.json")) as fh:
        assert json.load(fh)["config"]["model"]["name_or_path"] == base


def test_bench_chooses_each_learning_rate_on_the_dev_split(tmp_path, glue_dir, bert_tok):
    """Selection runs train without the dev split and score it; the reported runs use the best rate and the
    whole training split; the report shows the selection table; a changed config makes a result stale."""
    base = saved(tiny_bert(vocab_size=len(bert_tok)), bert_tok, tmp_path / "bert")
    suite = make_suite(tmp_path, base, {"lora_r2": "method: {name: lora}\nselect: {lr: [0.0001, 0.05], seeds: [0, 1]}\n",
                                        "adarank_expand": "method: {name: adarank}\n"}, glue_dir)
    out, results = tmp_path / "out", tmp_path / "results"
    summary = run_bench(suite, str(out), str(results), seeds=[0], log=lambda _: None)
    assert summary["failed"] == {}
    sel = {f: json.load(open(results / "select" / f)) for f in os.listdir(results / "select")}
    assert sorted(sel) == [f"lora_r2__lr{lr}__seed{s}.json" for lr in ("0.0001", "0.05") for s in (0, 1)]
    for res in sel.values():  # 64 training rows: 58 trained on, 6 (10 %, stratified) scored
        assert res["config"]["data"]["eval_split"] == "dev" and res["final"]["n"] == 6
        assert res["config"]["train"]["lr"] == res["bench"]["selection_lr"]
    # select.metric's default: the task's GLUE headline (MRPC: the mean of accuracy and F1)
    mean = {lr: statistics.fmean(r["final"]["score"] for r in sel.values() if r["bench"]["selection_lr"] == lr)
            for lr in (0.0001, 0.05)}
    loss = {lr: statistics.fmean(r["final"]["eval_loss"] for r in sel.values() if r["bench"]["selection_lr"] == lr)
            for lr in (0.0001, 0.05)}
    best = max(mean, key=lambda lr: (mean[lr], -loss[lr]))
    assert summary["chosen"] == {"lora_r2": best}
    final = json.load(open(results / "lora_r2__seed0.json"))
    assert final["config"]["train"]["lr"] == best and final["config"]["data"]["eval_split"] == "validation"
    assert final["final"]["n"] == 32
    assert json.load(open(results / "adarank_expand__seed0.json"))["config"]["train"]["lr"] == 0.005  # no grid
    text = open(summary["report"]).read()
    row = next(line for line in text.splitlines() if line.startswith("| lora_r2 | ") and "**" in line)
    assert f"**{100 * mean[best]:.2f} (n=2)**" in row and row.endswith(f"| {best:g} |")

    again = run_bench(suite, str(out), str(results), seeds=[0], log=lambda _: None)
    assert again["ran"] == [] and len(again["skipped"]) == 6
    # a results file made with another config is stale: it is rerun, not reported as if current
    with open(os.path.join(suite, "adarank_expand.yaml"), "a") as fh:
        fh.write("train: {batch_size: 4}\n")
    third = run_bench(suite, str(out), str(results), seeds=[0], log=lambda _: None)
    assert third["ran"] == ["adarank_expand__seed0"]
    assert json.load(open(results / "adarank_expand__seed0.json"))["config"]["train"]["batch_size"] == 4
    assert os.path.exists(results / "adarank_expand__seed0.json.stale")  # the old one set aside, not deleted

    # a rate whose loss became non-finite counts as the worst of the grid
    other = 0.05 if best == 0.0001 else 0.0001
    for seed in (0, 1):
        path = results / "select" / f"lora_r2__lr{best:g}__seed{seed}.json"
        res = json.load(open(path))
        res["status"] = "nonfinite_loss"
        path.write_text(json.dumps(res))
    assert choose_lr(str(results), os.path.join(suite, "lora_r2.yaml"), [])[0] == other


def test_rate_beyond_a_grid_edge_steps_on_the_one_three_ladder():
    assert rate_beyond(3e-3, 1e-3) == 1e-2 and rate_beyond(1e-2, 3e-3) == 3e-2
    assert rate_beyond(3e-4, 1e-3) == 1e-4 and rate_beyond(1e-4, 3e-4) == 3e-5
    assert rate_beyond(3e-5, 1e-4) == 1e-5  # full fine-tuning's grid
    assert rate_beyond(0.5, 0.4) == 0.625  # no ladder value near: the grid's own step (x 1.25)


def test_a_best_rate_at_the_grids_edge_extends_the_grid_one_rate_at_a_time(tmp_path, bert_tok):
    """select.extend: while the best rate is the grid's smallest or largest, the next rate beyond that edge is
    asked for (no rate is chosen until it has results), at most `extend` times; with extend 0 the edge stands."""
    base = saved(tiny_bert(vocab_size=len(bert_tok)), bert_tok, tmp_path / "bert")
    suite = tmp_path / "suite"
    suite.mkdir()
    for name, extend in (("lora", ", extend: 2"), ("flat", "")):
        (suite / f"{name}.yaml").write_text(f"model: {{name_or_path: '{base}'}}\nmethod: {{name: lora}}\n"
                                            f"select: {{lr: [0.001, 0.003], seeds: [0, 1]{extend}}}\n")
    results = tmp_path / "results"
    (results / "select").mkdir(parents=True)

    def write(method, lr, score):
        for seed in (0, 1):
            job = Job(method, seed, str(suite / f"{method}.yaml"), ["data.eval_split=dev", f"train.lr={lr!r}"], lr)
            cfg = load_config(job.config, job.overrides + [f"train.seed={seed}"]).to_dict()
            (results / f"{job.key}.json").write_text(json.dumps({"config": cfg, "final": {"score": score + seed / 100,
                                                                                          "eval_loss": 0.5}}))

    reported = plan(str(suite), [0], None, False, [])
    asked = lambda: sorted({(j.method, j.lr) for j in extension_jobs(reported, str(results))})  # noqa: E731
    for method in ("lora", "flat"):
        write(method, 0.001, 0.5)
        write(method, 0.003, 0.7)
    assert choose_lr(str(results), str(suite / "flat.yaml"), [])[0] == 0.003  # extend 0: the edge is chosen
    assert asked() == [("lora", 0.01)] and choose_lr(str(results), str(suite / "lora.yaml"), [])[0] is None
    assert len(extension_jobs(reported, str(results))) == 2  # one per selection seed
    write("lora", 0.01, 0.8)  # the new edge is best again: one more step
    assert asked() == [("lora", 0.01), ("lora", 0.03)] and choose_lr(str(results), str(suite / "lora.yaml"), [])[0] is None
    write("lora", 0.03, 0.9)  # best at the edge again, but extend (2) is spent
    best, table = choose_lr(str(results), str(suite / "lora.yaml"), [])
    assert best == 0.03 and sorted(table) == [0.001, 0.003, 0.01, 0.03]
    assert table[0.03]["score"] == pytest.approx(0.905) and table[0.03]["runs"] == 2
    write("lora", 0.03, 0.6)  # the grid's inner rate wins: no further step
    assert choose_lr(str(results), str(suite / "lora.yaml"), [])[0] == 0.01
    write("lora", 0.001, 0.95)  # now the lower edge wins: the next rate below is asked for
    assert ("lora", 0.0003) in asked() and choose_lr(str(results), str(suite / "lora.yaml"), [])[0] is None
    with pytest.raises(ConfigError, match=r"select\.extend must be >= 0, got -1"):
        load_config(str(suite / "lora.yaml"), ["select.extend=-1"])
    with pytest.raises(ConfigError, match=r"select\.extend must be an integer, got 'two'"):
        load_config(str(suite / "lora.yaml"), ["select.extend=two"])


def test_selection_files_outside_the_grid_as_it_stands_are_found(tmp_path, bert_tok):
    """A rate an earlier config or an earlier extension ran, or a seed no longer selected with, is not part
    of the choice; the bench sets such files aside so that the report does not show them beside it."""
    base = saved(tiny_bert(vocab_size=len(bert_tok)), bert_tok, tmp_path / "bert")
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("lora", "lora_r3"):  # a method name that is the start of another's
        (suite / f"{name}.yaml").write_text(f"model: {{name_or_path: '{base}'}}\nmethod: {{name: lora}}\n"
                                            "select: {lr: [0.001, 0.003], seeds: [0], extend: 1}\n")
    results = tmp_path / "results"
    (results / "select").mkdir(parents=True)

    def write(method, lr, score, seed=0, epochs=None):
        job = Job(method, seed, str(suite / f"{method}.yaml"), ["data.eval_split=dev", f"train.lr={lr!r}"], lr)
        extra = [f"train.epochs={epochs}"] if epochs else []
        cfg = load_config(job.config, job.overrides + [f"train.seed={seed}"] + extra).to_dict()
        path = results / f"{job.key}.json"
        path.write_text(json.dumps({"config": cfg, "final": {"score": score, "eval_loss": 0.5}}))
        return str(path)

    reported = plan(str(suite), [0], None, False, [])
    write("lora", 0.001, 0.5)
    write("lora", 0.003, 0.7)
    assert unused_selection_files(reported, str(results)) == []  # incomplete (0.01 is asked for): nothing yet
    write("lora", 0.01, 0.6)  # the inner rate wins: the grid is 0.001, 0.003, 0.01
    old_rate = write("lora", 0.0001, 0.9, epochs=7)  # an earlier config's extension, below the grid
    other_seed = write("lora", 0.003, 0.9, seed=5)
    for lr, score in ((0.001, 0.8), (0.003, 0.4), (0.0003, 0.3)):  # lora_r3: best at 0.001, edge, 0.0003 added
        write("lora_r3", lr, score)
    assert unused_selection_files(reported, str(results)) == [old_rate, other_seed]
    assert choose_lr(str(results), str(suite / "lora.yaml"), [])[0] == 0.003


def test_bench_runs_the_rate_beyond_the_edge_and_uses_the_choice(tmp_path, glue_dir, bert_tok):
    """End to end: with two rates the best is always at an edge, so select.extend 1 runs a third, and the
    reported run trains at the rate chosen among the three."""
    base = saved(tiny_bert(vocab_size=len(bert_tok)), bert_tok, tmp_path / "bert")
    suite = make_suite(tmp_path, base, {"lora_r2": "method: {name: lora}\nselect: {lr: [0.001, 0.01], extend: 1}\n"},
                       glue_dir)
    results = tmp_path / "results"
    summary = run_bench(suite, str(tmp_path / "out"), str(results), seeds=[0], log=lambda _: None)
    assert summary["failed"] == {}
    sel = {json.load(open(results / "select" / f))["bench"]["selection_lr"]: json.load(open(results / "select" / f))
           for f in os.listdir(results / "select")}
    assert len(sel) == 3 and {0.001, 0.01} < set(sel)
    added = (set(sel) - {0.001, 0.01}).pop()
    first = max((0.001, 0.01), key=lambda lr: (sel[lr]["final"]["score"], -sel[lr]["final"]["eval_loss"]))
    assert added == (0.0001 if first == 0.001 else 0.1)
    best = max(sel, key=lambda lr: (sel[lr]["final"]["score"], -sel[lr]["final"]["eval_loss"]))
    assert summary["chosen"] == {"lora_r2": best}
    assert json.load(open(results / "lora_r2__seed0.json"))["config"]["train"]["lr"] == best
    text = open(summary["report"]).read()  # the selection table marks the added rate and says why
    header = next(line for line in text.splitlines() if line.startswith("| method | lr "))
    row = next(line for line in text.splitlines() if line.startswith("| lora_r2 | ") and line.count(" | ") == 4)
    cells = dict(zip(header.split(" | ")[1:4], row.split(" | ")[1:4]))
    assert [k for k, v in cells.items() if v.endswith("†") or v.endswith("†**")] == [f"lr {added:g}"]
    assert "added beyond the configured grid" in text
    again = run_bench(suite, str(tmp_path / "out"), str(results), seeds=[0], log=lambda _: None)
    assert again["ran"] == []  # resumes: nothing to run, the extension included


def test_glue_bench_runs_each_task_and_reports_the_glue_table(tmp_path, capsys):
    """`adarank bench --tasks`: the suite on every task (per-task settings from _tasks.yaml), a learning
    rate chosen per task on its dev split by its headline score, and the GLUE table from the files."""
    from conftest import GLUE_WORDS, tiny_bert, word_tokenizer, write_glue

    tok = word_tokenizer("bert", GLUE_WORDS)
    glue = tmp_path / "glue"
    for task in ("mrpc", "stsb"):
        write_glue(glue, task)
    base = saved(tiny_bert(vocab_size=len(tok)).bert, tok, tmp_path / "encoder")  # no head: each task adds its own
    suite = make_suite(tmp_path, base, {"lora_r2": "method: {name: lora}\nselect: {lr: [0.0001, 0.05], metric: score}\n",
                                        "adarank_expand": "method: {name: adarank}\n"}, str(glue))
    with open(os.path.join(suite, "_tasks.yaml"), "w") as fh:
        fh.write("stsb: {data: {max_train_samples: 40}}\n")
    results, out_md = tmp_path / "results", tmp_path / "docs" / "GLUE.md"
    code = main(["bench", "--suite", suite, "--tasks", "mrpc,stsb", "--seeds", "0", "1", "--output-dir",
                 str(tmp_path / "out"), "--results-dir", str(results)])
    assert code == 0, capsys.readouterr().err
    stsb = json.load(open(results / "stsb" / "lora_r2__seed1.json"))
    assert stsb["config"]["data"]["task"] == "stsb" and stsb["config"]["data"]["max_train_samples"] == 40
    assert {"pearson", "spearman", "score"} <= set(stsb["final"])
    sel = [json.load(open(results / "stsb" / "select" / f)) for f in os.listdir(results / "stsb" / "select")]
    best = max(sel, key=lambda r: (r["final"]["score"], -r["final"]["eval_loss"]))
    assert stsb["config"]["train"]["lr"] == best["bench"]["selection_lr"]

    assert main(["report", str(results), "--out", str(out_md)]) == 0
    text = out_md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| adarank_expand |"))
    per_seed = [statistics.fmean(json.load(open(results / t / f"adarank_expand__seed{s}.json"))["final"]["score"]
                                 for t in ("mrpc", "stsb")) for s in (0, 1)]
    assert f"{100 * statistics.fmean(per_seed):.2f} ± {100 * statistics.stdev(per_seed):.2f} (n=2)" in row
    mrpc = [json.load(open(results / "mrpc" / f"lora_r2__seed{s}.json"))["final"]["score"] for s in (0, 1)]
    lora_row = next(line for line in text.splitlines() if line.startswith("| lora_r2 |"))
    assert lora_row.split(" | ")[1] == f"{100 * statistics.fmean(mrpc):.2f} ± {100 * statistics.stdev(mrpc):.2f} (n=2)"
    assert "| adarank_expand | lora_r2 |" in text and "**STS-B**" in text and "| method | MRPC | STS-B | GLUE average |" in text and "first 40" in text
    ours = [json.load(open(results / "mrpc" / f"adarank_expand__seed{s}.json"))["final"]["score"] for s in (0, 1)]
    diff_row = next(line for line in text.splitlines() if line.startswith("| adarank_expand | lora_r2 |"))
    # worded as the MRPC report words its differences
    assert diff_row.split(" | ")[2] == compare({"x": mean_std(ours), "n": 2}, {"x": mean_std(mrpc), "n": 2}, "x")
    assert "--tasks mrpc,stsb" in text
    # run time per task: every run of the task, the selection runs included, summed from the files
    files = [results / "stsb" / f for f in os.listdir(results / "stsb") if f.endswith(".json")]
    files += [results / "stsb" / "select" / f for f in os.listdir(results / "stsb" / "select")]
    stsb_row = next(line for line in text.splitlines() if line.startswith("| STS-B | first 40 |")).split(" | ")
    assert stsb_row[4:6] == [str(len(files)), f"{sum(json.load(open(f))['wall_time_s'] for f in files) / 60:.1f}"]
    every = [f for t in ("mrpc", "stsb") for d in (results / t, results / t / "select") for f in d.glob("*.json")]
    hours = sum(json.load(open(f))["wall_time_s"] for f in every) / 3600
    assert f"All tasks: {hours:.1f} h of run time summed; with 1 run(s) side by side, about {hours:.1f} h elapsed." in text

    # a results file without the headline score: one line naming it, not a traceback
    bad = results / "mrpc" / "lora_r2__seed0.json"
    res = json.load(open(bad))
    del res["final"]["score"]
    bad.write_text(json.dumps(res))
    assert main(["report", str(results), "--out", str(out_md)]) == 2
    assert f"{bad}: no final.score" in capsys.readouterr().err


def test_task_overrides_read_the_suites_tasks_file(tmp_path):
    from adarank.bench import task_overrides

    (tmp_path / "_tasks.yaml").write_text("sst2: {data: {max_train_samples: 8000}, train: {epochs: 1}}\n")
    assert task_overrides(str(tmp_path), "sst2") == ["data.task=sst2", "data.max_train_samples=8000", "train.epochs=1"]
    assert task_overrides(str(tmp_path), "rte") == ["data.task=rte"]
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        task_overrides(str(tmp_path), "mnli")
    (tmp_path / "_tasks.yaml").write_text("sst2: [8000]\n")
    with pytest.raises(ConfigError, match=r"_tasks\.yaml: expected task -> config sections"):
        task_overrides(str(tmp_path), "sst2")


def test_regenerate_command_adds_the_extra_seeds_of_some_methods():
    def run(method, seed):
        return {"bench": {"suite": "s", "method": method, "seed": seed}}

    runs = {"a": [run("a", s) for s in (0, 1, 2, 3, 4)], "b": [run("b", s) for s in (0, 1, 2)],
            "c": [run("c", s) for s in (0, 1, 2, 3, 4)], "zero_shot": [run("zero_shot", 0)]}
    line = regenerate_command(runs, "res", "R.md")
    assert line == ("adarank bench --suite s --seeds 0 1 2 --results-dir res"
                    " && adarank bench --suite s --seeds 3 4 --methods a,c --results-dir res"
                    " && adarank report res --out R.md")
    # no seed that every method has: no line without --methods (an empty --seeds would not parse)
    line = regenerate_command({"a": [run("a", 0)], "b": [run("b", 3)]}, "res", None)
    assert line == ("adarank bench --suite s --seeds 0 --methods a --results-dir res"
                    " && adarank bench --suite s --seeds 3 --methods b --results-dir res")


def test_a_difference_that_rounds_to_zero_reads_plus_zero():
    a, b = {"x": (0.79411, 0.004), "n": 3}, {"x": (0.79413, 0.013), "n": 4}
    assert compare(a, b, "x").startswith("+0.00 (SE 0.69; within seed noise")
    assert compare(b, a, "x").startswith("+0.00 (SE")
    assert compare({"x": (0.8, 0.01), "n": 3}, b, "x").startswith("+0.59 (SE")


def test_equal_means_summed_in_another_order_are_a_tie_not_a_better_method():
    # 1588 of 2040 right either way (5 seeds of MRPC's 408 validation examples), in other splits over seeds
    a = [c / 408 for c in (318, 313, 326, 316, 315)]
    b = [c / 408 for c in (311, 321, 319, 317, 320)]
    assert statistics.fmean(a) != statistics.fmean(b)  # the float noise this is about
    rows = [{"method": m, "kind": k, "accuracy": (statistics.fmean(v), 0.01), "trainable_params_avg": (p, 0.0)}
            for m, k, v, p in (("ours", "adarank", a, 100.0), ("lora_small", "lora", b, 50.0),
                               ("lora_big", "lora", a, 200.0))]
    assert "- ours: none" in frontier_lines(rows, rows[:1], "accuracy")
    assert best_fixed_rank(rows, "accuracy")["method"] == "lora_small"
