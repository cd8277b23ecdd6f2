"""Load a base model and tokenizer, check them, wrap with PEFT LoRA; save and reload a run's model."""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch
from torch import nn

from .merged import apply_record, flat, unflat
from .surgery import MERGED_DELTA_ATTR, allocate_masked, base_weight_name, lora_layers

DEFAULT_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "umt5": ["q", "v"],
    "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "opt": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "camembert": ["query", "value"],
}
HEAD_NAMES = ("classifier", "score")


class ModelError(ValueError):
    """The model, its tokenizer or the LoRA targets do not fit; the message says which."""


def resolve_model_path(name_or_path: str) -> str:
    """`package:MODULE` -> MODULE.get_model_path(); anything else is returned as is (hub id or path)."""
    if name_or_path.startswith("package:"):
        module = name_or_path.split(":", 1)[1]
        try:
            get_path = importlib.import_module(module).get_model_path
        except ImportError:
            raise ModelError(f"model.name_or_path: package module {module!r} is not installed") from None
        except AttributeError:
            raise ModelError(f"model.name_or_path: package module {module!r} has no get_model_path() "
                             "(`package:MODULE` needs a pip package that ships a model)") from None
        return str(get_path())
    return name_or_path


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelError(_cannot_load(path, exc)) from None
    check_tokenizer(tok, path)
    return tok


PROBE_WORDS = ("the", "of", "and", "to", "in", "is", "it", "for", "on", "with")


def check_tokenizer(tokenizer: Any, name: str) -> None:
    """Fail loudly on a tokenizer that maps ordinary words to unknown: transformers 5 returns such a blank
    ~100-token tokenizer for `t5-base` when the hub cannot be reached. A word is known when its tokens
    decode back to letters (an unknown token decodes to nothing once special tokens are skipped)."""
    known = sum(
        any(c.isalpha() for c in tokenizer.decode(tokenizer(w, add_special_tokens=False)["input_ids"], skip_special_tokens=True))
        for w in PROBE_WORDS
    )
    if known < len(PROBE_WORDS) // 2:
        raise ModelError(
            f"tokenizer for {name!r} is blank: it knows {known} of {len(PROBE_WORDS)} common English words "
            f"({len(tokenizer)} tokens). transformers returns such a tokenizer when the hub cannot be reached: "
            "download the model first or set model.name_or_path to a local directory."
        )


def _cannot_load(path: str, exc: Exception) -> str:
    why = " ".join(str(exc).split()) or type(exc).__name__
    if os.path.isdir(path):
        return f"model.name_or_path: cannot load the model in {path} ({why[:300]})"
    return (f"model.name_or_path: cannot load {path!r} ({why[:300]}). Without hub access, "
            "set it to a local directory or a `package:MODULE` that ships the model.")


def load_model_config(path: str) -> Any:
    """The model's `transformers` config (read before any weights are)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(_cannot_load(path, exc)) from None


# Models whose learned position table starts at padding_idx + 1 (fairseq style): usable length is 2 less.
POSITION_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert")


def position_limit(config: Any) -> int | None:
    """The longest input the model's learned position embeddings allow; None for relative positions (T5)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or getattr(config, "model_type", "") in ("t5", "mt5", "umt5"):
        return None
    if config.model_type in POSITION_OFFSET_TYPES:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def check_max_length(config: Any, max_length: int, name: str) -> None:
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        raise ModelError(f"model.max_length ({max_length}) exceeds what {name!r} can read: {limit} positions "
                         "(its config's max_position_embeddings); set model.max_length to at most that")


# Causal-LM classes whose loss does not shift the labels (XLNet's permutation LM): not decoder-only here
NOT_DECODER_ONLY = ("xlnet",)


def model_kind(config: Any, model: Any = None) -> str:
    """How a model learns a GLUE task: "seq2seq" (encoder-decoder, text-to-text), "causal_lm" (decoder-only:
    text-to-text after the prompt) or "classifier" (a classification head). Decoder-only means a model type
    transformers has a causal LM for and no masked LM (BERT and RoBERTa have both). A model passed in
    already built says it by its class (a GPT2ForSequenceClassification is a classifier)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.is_encoder_decoder:
        return "seq2seq"
    if model is not None:
        return "classifier" if type(model).__name__.endswith("ForSequenceClassification") else "causal_lm"
    mtype = getattr(config, "model_type", "")
    if (mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mtype not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and mtype not in NOT_DECODER_ONLY):
        return "causal_lm"
    return "classifier"


def load_base_model(path: str, num_labels: int, config: Any = None, quantization: str | None = None,
                    device: Any = "cpu") -> tuple[nn.Module, str]:
    """(model, kind): a seq2seq LM, a causal LM or a sequence classifier as `model_kind` says; with
    `quantization` ("4bit" or "8bit") its Linear layers quantized by bitsandbytes on `device` (the head not)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    config = config if config is not None else load_model_config(path)
    extra = _quantized(quantization, device) if quantization else {}
    kind = model_kind(config)
    try:
        if kind == "seq2seq":
            model = AutoModelForSeq2SeqLM.from_pretrained(path, **extra)
        elif kind == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(path, **extra)
        else:
            if num_labels == 1:  # STS-B: one output, mean squared error
                extra["problem_type"] = "regression"
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **extra)
    except OSError as exc:  # e.g. a model directory without weights
        raise ModelError(_cannot_load(path, exc)) from None
    if quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for module in model.modules():  # bitsandbytes 0.50 on CPU: after an eval forward repacks 4-bit weights for
            if hasattr(module, "support_avx512bf16_for_cpu"):  # inference, a training forward fails; stay unpacked
                module.support_avx512bf16_for_cpu = False
    return model, kind


def _quantized(quantization: str, device: Any) -> dict:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError(f"model.quantization={quantization} needs bitsandbytes: pip install 'adarank[quantization]'") from None
    settings = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"} if quantization == "4bit" else {"load_in_8bit": True}
    return {"quantization_config": BitsAndBytesConfig(llm_int8_skip_modules=list(HEAD_NAMES) + ["lm_head"], **settings),
            "device_map": {"": str(device)}}


def _growable(module: nn.Module) -> bool:
    """A layer LoRA rank surgery handles: nn.Linear, or GPT-2's Conv1D (a Linear stored in x out)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_module_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _growable(m)})


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    if targets is None:
        mtype = getattr(model.config, "model_type", "")
        if mtype not in DEFAULT_TARGETS:
            raise ModelError(f"adarank.target_modules: no default for model type {mtype!r}; set it (Linear modules: {linear_module_names(model)})")
        targets = DEFAULT_TARGETS[mtype]
    names = set(linear_module_names(model))
    missing = [t for t in targets if t not in names]
    if missing:
        raise ModelError(f"adarank.target_modules: {missing} match no Linear (or Conv1D) module; the model has: "
                         f"{sorted(names)}")
    return list(targets)


def head_names(model: nn.Module) -> list[str]:
    """The classification head modules a sequence classifier has (trained alongside any adapter)."""
    return [h for h in HEAD_NAMES if hasattr(model, h)]


def _peft_task(model: nn.Module, kind: bool | str) -> dict[str, Any]:
    """PEFT config fields shared by LoRA and AdaLoRA: the task type and, for classifiers, the head to train."""
    from peft import TaskType

    from .data import as_kind

    kind = as_kind(kind)
    if kind != "classifier":
        return {"task_type": TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM, "modules_to_save": None}
    return {"task_type": TaskType.SEQ_CLS, "modules_to_save": head_names(model) or None}


def apply_lora(model: nn.Module, kind: bool | str, r: int, lora_alpha: float, targets: list[str] | None, dropout: float,
               **options: Any) -> nn.Module:
    """PEFT LoRA on `targets`; for classifiers the head is trained too (PEFT's modules_to_save). `options`:
    further LoraConfig fields (use_rslora, use_dora)."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, targets)
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=dropout,
                     **_peft_task(model, kind), **options)
    return get_peft_model(model, cfg)


def apply_adalora(model: nn.Module, kind: bool | str, settings: Any, lora_alpha_ratio: float, targets: list[str] | None,
                  dropout: float, total_steps: int) -> nn.Module:
    """PEFT AdaLoRA on `targets` with PEFT's `total_step` set to the run's real number of optimizer steps.
    The caller must call `model.base_model.update_and_allocate(step)` after every optimizer step."""
    from peft import AdaLoraConfig, get_peft_model

    # tinit_ratio + tfinal_ratio < 1 (checked by the config), so tinit < total_steps - tfinal: a budgeting phase
    tinit, tfinal = int(settings.tinit_ratio * total_steps), int(settings.tfinal_ratio * total_steps)
    targets = resolve_targets(model, targets)
    cfg = AdaLoraConfig(
        init_r=settings.init_r, target_r=settings.target_r, tinit=tinit, tfinal=tfinal, deltaT=settings.delta_t,
        beta1=settings.beta1, beta2=settings.beta2, orth_reg_weight=settings.orth_reg_weight, total_step=total_steps,
        lora_alpha=lora_alpha_ratio * settings.target_r, target_modules=targets, lora_dropout=dropout,
        **_peft_task(model, kind),
    )
    return get_peft_model(model, cfg)


def prepare_model(model: nn.Module, kind: bool | str, cfg: Any, total_steps: int) -> nn.Module:
    """The base model made ready for `cfg.method.name` (see `MethodConfig`)."""
    from .data import as_kind

    method, ac = cfg.method.name, cfg.adarank
    if getattr(model, "is_quantized", False) and method in ("full", "head", "zero_shot"):
        raise ModelError(f"model.quantization: method.name={method} trains or evaluates the quantized base itself; "
                         "quantized bases are for LoRA methods (adarank, lora, adalora)")
    if method in ("adarank", "lora"):
        alpha = ac.lora_alpha_ratio * (ac.r0 ** 0.5 if ac.use_rslora else ac.r0)  # a scaling of lora_alpha_ratio
        model = apply_lora(model, kind, ac.r0, alpha, ac.target_modules, ac.lora_dropout, use_rslora=ac.use_rslora,
                           use_dora=ac.use_dora)
        if method == "adarank" and ac.strategy == "masked":
            allocate_masked(model, ac.r_max)
        return model
    if method == "adalora":
        return apply_adalora(model, kind, cfg.adalora, ac.lora_alpha_ratio, ac.target_modules, ac.lora_dropout,
                             total_steps)
    if method == "head":
        heads = head_names(model)
        if as_kind(kind) != "classifier" or not heads:
            raise ModelError("method.name=head needs a sequence classifier with a `classifier` or `score` head; "
                             f"{type(model).__name__} has none")
        model.requires_grad_(False)
        for h in heads:
            getattr(model, h).requires_grad_(True)
    elif method == "full":
        model.requires_grad_(True)
    elif method == "zero_shot" and as_kind(kind) == "classifier":
        raise ModelError("method.name=zero_shot needs a text-to-text model: a classifier's head is untrained")
    return model


def save_run_model(model: nn.Module, tokenizer: Any, out_dir: str, base: str, kind: str, num_labels: int,
                   quantization: str | None = None) -> None:
    """The adapter (PEFT format), the merged updates accumulated by merge-strategy growth (low-rank factors,
    relative to the original base) and the original base's identity."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(os.path.join(out_dir, "adapter"))
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    merged = flat(getattr(model, MERGED_DELTA_ATTR, None) or {})
    save_file({k: v.contiguous() for k, v in merged.items()}, os.path.join(out_dir, "merged_delta.safetensors"))
    with open(os.path.join(out_dir, "adarank_model.json"), "w", encoding="utf-8") as fh:
        json.dump({"base_model": base, "kind": kind, "seq2seq": kind == "seq2seq", "num_labels": num_labels,
                   "quantization": quantization}, fh, indent=2)


def load_run_model(model_dir: str) -> tuple[nn.Module, Any]:
    """Rebuild a saved run's model: original base + the final adapter + the merged updates (replayed into
    the base weights, or set beside them, as in training)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    with open(os.path.join(model_dir, "adarank_model.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    base, _ = load_base_model(resolve_model_path(meta["base_model"]), meta["num_labels"],
                              quantization=meta.get("quantization"))
    model = PeftModel.from_pretrained(base, os.path.join(model_dir, "adapter"))
    record = unflat(load_file(os.path.join(model_dir, "merged_delta.safetensors")))
    apply_record(model, record, list(lora_layers(model)), base_weight_name)
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))

