"""Tiny offline models, tokenizers and GLUE-layout data for the tests (no downloads)."""

from __future__ import annotations

import json
import random

import pytest
import torch

WORDS = ("the cat dog sat ran on a mat log big small red blue quickly slowly house tree car road bird "
         "saw near under over man woman child ate fish bread green old new said that of and to in is it for with".split())


def make_pairs(n: int, seed: int) -> list[dict]:
    """MRPC-shaped rows: label 1 when sentence2 is sentence1 with two words swapped, else an unrelated one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s1 = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        label = rng.randint(0, 1)
        if label:
            s2 = list(s1)
            a, b = rng.sample(range(len(s2)), 2)
            s2[a], s2[b] = s2[b], s2[a]
        else:
            s2 = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        rows.append({"sentence1": " ".join(s1), "sentence2": " ".join(s2), "label": label, "idx": i})
    return rows


def task_rows(task: str, n: int, seed: int) -> list[dict]:
    """`make_pairs` rows in a task's fields: one sentence for CoLA and SST-2; for STS-B a score in [0, 5]
    (high for a swapped pair, low for an unrelated one)."""
    rows = make_pairs(n, seed)
    rng = random.Random(seed)
    if task in ("cola", "sst2"):
        return [{"sentence": r["sentence1"], "label": r["label"], "idx": r["idx"]} for r in rows]
    if task == "stsb":
        return [dict(r, label=round(rng.uniform(3.5, 5.0) if r["label"] else rng.uniform(0.0, 1.5), 3)) for r in rows]
    return rows


def write_glue(root, task: str = "mrpc", n_train: int = 64, n_eval: int = 32) -> str:
    d = root / task
    d.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("validation", n_eval, 1)):
        with open(d / f"{split}.jsonl", "w") as fh:
            for row in task_rows(task, n, seed):
                fh.write(json.dumps(row) + "\n")
    return str(root)


# every GLUE task's prompt and target words, and the digits of STS-B scores ("3.8")
GLUE_WORDS = tuple("rte wnli cola sst2 stsb sentence entailment not_entailment acceptable unacceptable positive "
                   "negative".split()) + tuple(f"{k / 5:.1f}" for k in range(26))  # "0.0" ... "5.0": one token each


def word_tokenizer(kind: str, words: tuple[str, ...] = ()):
    """A word-level fast tokenizer: BERT-style ([CLS] a [SEP] b [SEP]), T5-style (text </s>) or GPT-style
    (text as it is; <|endoftext|> ends a sequence, no pad token, as GPT-2's); `words` extend the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    extra = "mrpc sentence1 sentence2 paraphrase : equivalent not".split() + list(words)
    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    elif kind == "gpt":
        specials = ["<|endoftext|>", "<unk>"]
    else:
        specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS) | set(extra)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1] if kind == "bert" else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if words:  # a score such as "3.8" stays one token (and decodes as written); other punctuation is split off
        from tokenizers import Regex

        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\d\.\d|[^\w\s]"), "isolated")])
    if kind == "gpt":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                       unk_token="<unk>")
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_bert(vocab_size: int = 64, num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_t5(vocab_size: int = 64, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_gpt2(vocab_size: int = 64, seed: int = 0):
    """GPT-2: Conv1D layers (fan_in_fan_out), learned positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0)).eval()  # word_tokenizer("gpt")'s <|endoftext|>


def tiny_llama(vocab_size: int = 64, seed: int = 0):
    """LLaMA: rotary positions, grouped-query attention, gated MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def tiny_run_config(tmp_path, glue_dir: str, tok, template: str) -> str:
    """A YAML config file for a tiny BERT saved under tmp_path: `template` with {base} and {glue} filled."""
    base = saved(tiny_bert(vocab_size=len(tok)), tok, tmp_path / "base")
    path = tmp_path / "run.yaml"
    path.write_text(template.format(base=base, glue=glue_dir))
    return str(path)


def saved(model, tok, path) -> str:
    """Save a tiny model and its tokenizer as a local model directory; returns its path."""
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def bert_tok():
    return word_tokenizer("bert")


@pytest.fixture
def t5_tok():
    return word_tokenizer("t5")


@pytest.fixture
def glue_dir(tmp_path):
    return write_glue(tmp_path / "glue")
