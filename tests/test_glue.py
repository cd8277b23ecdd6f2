"""Every GLUE task of ../shared/data/glue: its data, its text-to-text format and decoding, its metrics, and a
run of each through our loop on tiny models (encoder with a head; T5 text to text)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import GLUE_WORDS, saved, tiny_bert, tiny_gpt2, tiny_t5, word_tokenizer, write_glue

from adarank import DataError, ModelError, RunConfig, decode_score, get_task
from adarank.data import dev_split, load_split, tokenize
from adarank.metrics import decode_label
from adarank.tasks import format_score
from adarank.train import Run, train

TASKS = ("mrpc", "rte", "cola", "stsb", "wnli", "sst2")
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")

# the T5 paper's input for each task (MRPC: the original notebook's prompt), on one example of its fields
T5_INPUTS = {
    "mrpc": "mrpc sentence1 : a b sentence2 : c d paraphrase :",
    "rte": "rte sentence1 : a b sentence2 : c d",
    "wnli": "wnli sentence1 : a b sentence2 : c d",
    "stsb": "stsb sentence1 : a b sentence2 : c d",
    "cola": "cola sentence : a b",
    "sst2": "sst2 sentence : a b",
}


@pytest.fixture
def t5_glue_tok():
    return word_tokenizer("t5", GLUE_WORDS + ("a", "b", "c", "d"))


@pytest.mark.parametrize("task", TASKS)
def test_real_files_load_with_the_tasks_labels(task):
    spec = get_task(task)
    rows = load_split(spec, "validation", SHARED)
    labels = [r["label"] for r in rows]
    if spec.regression:
        assert all(isinstance(x, float) and 0 <= x <= 5 for x in labels) and len(set(labels)) > 50
    else:
        assert set(labels) == set(range(spec.num_labels))
    assert set(rows[0]) == set(spec.text_fields) | {"label"}


@pytest.mark.parametrize("task", TASKS)
def test_t5_format_every_task(task, t5_glue_tok):
    """The prompt and target T5 sees, decoded back from the token ids; STS-B's score rounds to 0.2 and
    decodes to the float it was written from."""
    spec = get_task(task)
    fields = {"sentence1": "a b", "sentence2": "c d"} if len(spec.text_fields) == 2 else {"sentence": "a b"}
    labels = [0.0, 2.36, 3.8, 4.91, 5.0] if spec.regression else list(range(spec.num_labels))
    rows = [dict(fields, label=y) for y in labels]
    out = tokenize(rows, spec, t5_glue_tok, "seq2seq", max_length=64, max_target_length=8)
    for row, ex in zip(rows, out):
        assert t5_glue_tok.decode(ex["input_ids"], skip_special_tokens=True) == T5_INPUTS[task]
        target = t5_glue_tok.decode(ex["labels"], skip_special_tokens=True)
        if spec.regression:
            assert target == format_score(row["label"])
            assert decode_score(target) == pytest.approx(round(row["label"] * 5) / 5)
            assert ex["class_label"] == row["label"]  # evaluation compares with the unrounded score
        else:
            assert target == spec.target_words[row["label"]]
    if spec.regression:
        assert [t5_glue_tok.decode(e["labels"], skip_special_tokens=True) for e in out] == [
            "0.0", "2.4", "3.8", "5.0", "5.0"]


def test_mrpc_in_the_t5_papers_format_on_request():
    """`data.prompt_style: t5`: MRPC's prompt and targets as the T5 paper writes them (the default keeps
    the original notebook's); the other tasks are the T5 paper's either way."""
    tok = word_tokenizer("t5", ("mrpc", "sentence1", "sentence2", "paraphrase", "equivalent", "not",
                                "not_equivalent", "a", "b", "c", "d"))
    rows = [{"sentence1": "a b", "sentence2": "c d", "label": y} for y in (0, 1)]
    expected = {"original": ("mrpc sentence1 : a b sentence2 : c d paraphrase :", ["not equivalent", "equivalent"]),
                "t5": ("mrpc sentence1 : a b sentence2 : c d", ["not_equivalent", "equivalent"])}
    for style, (prompt, targets) in expected.items():
        spec = get_task("mrpc", style)
        out = tokenize(rows, spec, tok, "seq2seq", max_length=64, max_target_length=8)
        assert [tok.decode(ex["input_ids"], skip_special_tokens=True) for ex in out] == [prompt, prompt]
        assert [tok.decode(ex["labels"], skip_special_tokens=True) for ex in out] == targets
        assert [decode_label(t, spec.target_words) for t in targets] == [0, 1]
    for task in TASKS[1:]:
        assert get_task(task, "t5") == get_task(task)
    with pytest.raises(ValueError, match=r"data\.prompt_style must be one of \['original', 't5'\], got 'T5'"):
        get_task("mrpc", "T5")


def test_stsb_rows_are_checked_and_split_by_score(tmp_path):
    stsb = get_task("stsb")
    path = tmp_path / "stsb" / "train.jsonl"
    path.parent.mkdir()
    for bad in (5.5, -0.1, "3.0", True):
        path.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": 1.0}) + "\n"
                        + json.dumps({"sentence1": "a", "sentence2": "b", "label": bad}) + "\n")
        with pytest.raises(DataError, match=r"train\.jsonl:2: label .* must be a number in \[0, 5\]"):
            load_split(stsb, "train", str(tmp_path))
    rows = load_split(stsb, "train", SHARED)
    rest, dev = dev_split(rows, 0.1, 0)
    assert len(dev) == round(0.1 * len(rows)) and len(rest) + len(dev) == len(rows)
    share = lambda rs, k: sum(round(r["label"]) == k for r in rs) / len(rs)  # noqa: E731
    assert all(abs(share(dev, k) - share(rows, k)) < 0.01 for k in range(6))  # stratified by whole score


def _cfg(tmp_path, glue, base, task, **train_kw):
    return RunConfig.from_dict({
        "model": {"name_or_path": str(base), "max_length": 48, "max_target_length": 6},
        "data": {"task": task, "data_dir": glue},
        "train": {"output_dir": str(tmp_path / f"run_{task}"), "max_steps": 6, "batch_size": 8, "lr": 5e-3,
                  "eval_steps": 3, "seed": 0, "save_model": False, **train_kw},
        "adarank": {"r0": 2, "r_max": 4, "check_every": 2, "warmup_steps": 2, "criterion": "fixed"},
    })


@pytest.mark.parametrize("task", TASKS)
def test_encoder_runs_every_task_with_its_metrics(tmp_path, task):
    tok = word_tokenizer("bert", GLUE_WORDS)
    glue = write_glue(tmp_path / "glue", task)
    spec = get_task(task)
    base = saved(tiny_bert(vocab_size=len(tok), num_labels=spec.num_labels), tok, tmp_path / "base")
    run = Run(_cfg(tmp_path, glue, base, task), model=tiny_bert(vocab_size=len(tok), num_labels=spec.num_labels),
              tokenizer=tok)
    final = run.train()["final"]
    expected = {"pearson", "spearman", "mse"} if spec.regression else {"accuracy", "f1_macro", spec.f1_name, "mcc"}
    assert expected | {"score", "n", "undecodable", "eval_loss"} <= set(final) and final["n"] == 32
    if spec.regression:
        # one output trained and scored by mean squared error: eval_loss is the MSE of the predictions
        model = run.raw_model.eval()
        preds, labels = [], []
        with torch.no_grad():
            for batch in run.eval_loader:
                labels.append(batch.pop("labels").float())
                preds.append(model(**batch).logits[:, 0])
        mse = F.mse_loss(torch.cat(preds), torch.cat(labels)).item()
        assert final["eval_loss"] == pytest.approx(mse, rel=1e-5) == final["mse"]


def test_stsb_loads_a_regression_head(tmp_path):
    """From a checkpoint without a head (a sentence encoder, as MiniLM's), STS-B gets one output trained by
    mean squared error."""
    from adarank.modeling import load_base_model

    tok = word_tokenizer("bert", GLUE_WORDS)
    base = saved(tiny_bert(vocab_size=len(tok)).bert, tok, tmp_path / "encoder")
    model, kind = load_base_model(base, get_task("stsb").num_labels)
    assert kind == "classifier" and model.config.num_labels == 1 and model.config.problem_type == "regression"
    batch = tok(["a b"], ["c d"], return_tensors="pt")
    out = model(**batch, labels=torch.tensor([3.8]))
    assert out.loss.item() == pytest.approx((out.logits[0, 0].item() - 3.8) ** 2, rel=1e-5)


def test_t5_outputs_decode_through_evaluation(tmp_path, t5_glue_tok):
    """What T5 generates is decoded and scored: STS-B numbers read as scores, anything else undecodable and
    scored as −1; labels decode to classes."""
    from scipy.stats import pearsonr

    for task, outputs in (("stsb", ["3.8", "0.4", "equivalent", "5.0"]), ("rte", ["entailment", "not_entailment",
                                                                                  "3.8", "entailment"])):
        spec = get_task(task)
        glue = write_glue(tmp_path / f"glue_{task}", task)
        base = saved(tiny_t5(vocab_size=len(t5_glue_tok)), t5_glue_tok, tmp_path / f"base_{task}")
        run = Run(_cfg(tmp_path, glue, base, task), model=tiny_t5(vocab_size=len(t5_glue_tok)), tokenizer=t5_glue_tok)
        labels = [x for batch in run.eval_loader for x in batch["class_label"].tolist()]
        texts = [outputs[i % len(outputs)] for i in range(len(labels))]
        queue = list(texts)

        def generate(input_ids, attention_mask, max_new_tokens):  # the model "writes" the texts in turn
            n = input_ids.shape[0]
            mine = [queue.pop(0) for _ in range(n)]
            ids = t5_glue_tok(mine, add_special_tokens=False)["input_ids"]
            return torch.tensor([[0] + x + [1] for x in ids])

        run.raw_model.generate = generate
        metrics = run.evaluate()
        if spec.regression:
            preds = [decode_score(t) if decode_score(t) is not None else -1.0 for t in texts]
            assert metrics["undecodable"] == texts.count("equivalent") == 8
            assert metrics["pearson"] == pytest.approx(pearsonr(labels, preds).statistic)
        else:
            preds = [spec.target_words.index(t) if t in spec.target_words else -1 for t in texts]
            assert metrics["undecodable"] == texts.count("3.8") == 8
            assert metrics["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / len(labels))


def test_a_classifier_head_of_the_wrong_size_is_one_line(tmp_path):
    tok = word_tokenizer("bert", GLUE_WORDS)
    glue = write_glue(tmp_path / "glue", "stsb")
    base = saved(tiny_bert(vocab_size=len(tok)), tok, tmp_path / "base")
    with pytest.raises(ModelError, match=r"has 2 output\(s\); data.task=stsb needs 1 \(a regression head\)"):
        Run(_cfg(tmp_path, glue, base, "stsb"), model=tiny_bert(vocab_size=len(tok)), tokenizer=tok)
    assert not os.path.exists(tmp_path / "run_stsb")  # nothing written


@pytest.mark.parametrize("task", TASKS)
def test_t5_text_to_text_every_task(tmp_path, task, t5_glue_tok):
    """Each task through tiny T5: trained on its targets, evaluated by generation and decoding; what does
    not decode is counted (and, for STS-B, scored as wrong)."""
    glue = write_glue(tmp_path / "glue", task)
    base = saved(tiny_t5(vocab_size=len(t5_glue_tok)), t5_glue_tok, tmp_path / "base")
    results = train(_cfg(tmp_path, glue, base, task), model=tiny_t5(vocab_size=len(t5_glue_tok)), tokenizer=t5_glue_tok)
    final, spec = results["final"], get_task(task)
    assert final["n"] == 32 and results["rank_schedule"] == [2, 4]  # decoding: test_t5_outputs_decode_through_evaluation
    assert set(spec.headline) | {"score", "undecodable"} <= set(final)


def test_causal_lm_refuses_regression_in_one_line(tmp_path):
    tok = word_tokenizer("gpt", GLUE_WORDS)
    glue = write_glue(tmp_path / "glue", "stsb")
    base = saved(tiny_gpt2(vocab_size=len(tok)), tok, tmp_path / "base")
    with pytest.raises(DataError, match="data.task=stsb is a regression task"):
        Run(_cfg(tmp_path, glue, base, "stsb"), model=tiny_gpt2(vocab_size=len(tok)), tokenizer=tok)
    assert not os.path.exists(tmp_path / "run_stsb")
