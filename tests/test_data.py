import json

import pytest

from adarank import DataError, get_task
from adarank.data import LengthGroupedBatchSampler, load_split, tokenize

MRPC = get_task("mrpc")


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def row(**kw):
    base = {"sentence1": "a b", "sentence2": "c d", "label": 1, "idx": 0}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not None})


def test_loads_local_layout(glue_dir):
    rows = load_split(MRPC, "train", glue_dir)
    assert len(rows) == 64 and set(rows[0]) == {"sentence1", "sentence2", "label"}
    assert len(load_split(MRPC, "train", glue_dir, limit=5)) == 5


@pytest.mark.parametrize(
    "lines, message",
    [
        ([row(), "{not json"], r"train\.jsonl:2: malformed JSON"),
        ([row(), row(sentence2=None)], r"train\.jsonl:2: missing field 'sentence2'"),
        ([row(label=None)], r"train\.jsonl:1: missing field 'label'"),
        ([row(), row(), row(label=2)], r"train\.jsonl:3: unknown label 2"),
        ([row(label="equivalent")], r"train\.jsonl:1: unknown label 'equivalent'"),
        ([row(sentence1=3)], r"train\.jsonl:1: field 'sentence1' must be a string"),
        (["[1, 2]"], r"train\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, message):
    write(tmp_path / "mrpc" / "train.jsonl", lines)
    with pytest.raises(DataError, match=message):
        load_split(MRPC, "train", str(tmp_path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"mrpc/validation\.jsonl: file not found"):
        load_split(MRPC, "validation", str(tmp_path))


def test_real_glue_files():
    """The shipped configs read ../shared/data/glue (beside the checkout, as on CI)."""
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
    rows = load_split(MRPC, "validation", root)
    assert len(rows) == 408 and sum(r["label"] for r in rows) == 279


def test_length_grouped_sampler_covers_every_index_once_per_epoch():
    lengths = [(i * 37) % 23 + 1 for i in range(103)]
    s = LengthGroupedBatchSampler(lengths, batch_size=8, seed=0, mega=4)
    e1, e2 = list(s), list(s)
    for epoch in (e1, e2):
        flat = [i for b in epoch for i in b]
        assert sorted(flat) == list(range(103)) and len(epoch) == len(s) == 13
    assert e1 != e2  # reshuffled each epoch
    # within a batch lengths are close: padding is less than a random batching would give
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in e1)
    rand = LengthGroupedBatchSampler(lengths, batch_size=8, seed=0, mega=1)
    pad_rand = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in rand)
    assert pad < pad_rand


def test_tokenize_text_to_text(t5_tok):
    rows = [{"sentence1": "the cat", "sentence2": "the dog", "label": 0}, {"sentence1": "a", "sentence2": "b", "label": 1}]
    out = tokenize(rows, MRPC, t5_tok, kind="seq2seq", max_length=32, max_target_length=8)
    assert t5_tok.decode(out[0]["input_ids"], skip_special_tokens=True).split() == "mrpc sentence1 : the cat sentence2 : the dog paraphrase :".split()
    assert t5_tok.decode(out[0]["labels"], skip_special_tokens=True) == "not equivalent"
    assert t5_tok.decode(out[1]["labels"], skip_special_tokens=True) == "equivalent"
    assert [o["class_label"] for o in out] == [0, 1]


def test_tokenize_pairs(bert_tok):
    out = tokenize([{"sentence1": "the cat", "sentence2": "the dog", "label": 1}], MRPC, bert_tok, False, 32, 8)
    assert bert_tok.convert_ids_to_tokens(out[0]["input_ids"]) == ["[CLS]", "the", "cat", "[SEP]", "the", "dog", "[SEP]"]
    assert out[0]["labels"] == 1


def test_dev_split_is_stratified_fixed_disjoint_and_keeps_the_order():
    import os

    from adarank.config import DataConfig
    from adarank.data import dev_split, load_train_eval

    root = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
    train = load_split(MRPC, "train", root)
    rest, dev = load_train_eval(MRPC, DataConfig(task="mrpc", data_dir=root, eval_split="dev"))
    assert len(dev) == round(0.1 * len(train)) and len(rest) + len(dev) == len(train)
    key = lambda r: (r["sentence1"], r["sentence2"])  # noqa: E731
    assert not {key(r) for r in rest} & {key(r) for r in dev}
    pos = sum(r["label"] for r in train) / len(train)
    assert abs(sum(r["label"] for r in dev) / len(dev) - pos) < 1 / len(dev)  # stratified: the same label mix
    # the same split every time (and for every method and run seed); another dev_seed draws another
    _, again = dev_split(train, 0.1, 0)
    assert again == dev
    index = {id(r): i for i, r in enumerate(train)}
    assert [index[id(r)] for r in again] == sorted(index[id(r)] for r in again)  # the file's order
    assert dev_split(train, 0.1, 1)[1] != dev
    # validation: the whole training split; limits apply after the split
    assert load_train_eval(MRPC, DataConfig(task="mrpc", data_dir=root))[0] == train
    short = load_train_eval(MRPC, DataConfig(task="mrpc", data_dir=root, eval_split="dev", max_train_samples=10,
                                             max_eval_samples=5))
    assert short == (rest[:10], dev[:5])


def test_dev_split_too_small_is_one_clear_error():
    from adarank.data import dev_split

    rows = [{"sentence1": "a", "sentence2": "b", "label": i % 2} for i in range(6)]
    with pytest.raises(DataError, match=r"data.dev_fraction=0.1: cannot hold out a stratified development split of 1"):
        dev_split(rows, 0.1, 0)
    assert len(dev_split(rows, 0.5, 0)[1]) == 3
