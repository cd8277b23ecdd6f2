"""Export AdaRank-trained LoRA as a standard PEFT LoRA adapter relative to the *original* base model, or as
a merged model -- from an `adarank train` run directory, from an HF Trainer output or checkpoint trained
with `AdaRankCallback`, or from a model in memory (`export_model`).

For every adapted module the total update since the original base is

    ΔW_total = W_now − W_original = (merged updates, kept by merge-strategy growth) + B·A·scaling

factored by SVD: B = U_k √(S_k/s), A = √(S_k/s) V_kᵀ. k is the numerical rank of ΔW_total (exact), or
`max_rank` when smaller (then the error ‖S_{k+1:}‖ is reported per module in export_log.json).
`PeftModel.from_pretrained(original_base, OUT_DIR)` then computes what the AdaRank model computes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from typing import Any, Callable

import torch

from .modeling import load_base_model, load_run_model, resolve_model_path
from .report import write_json
from .rundir import describe, read_marker
from .surgery import ADAPTER, MERGED_DELTA_ATTR, base_module_name, base_weight_name, lora_layers, lora_svd, svd_factors

RANK_RTOL = 1e-6  # singular values below RANK_RTOL · s_max count as zero
EXPORT_LOG = "export_log.json"  # written last into every export: also what marks a directory as one


# ---------------------------------------------------------------------------------------------- directories


def _model_dir(run_dir: str) -> str:
    for candidate in (os.path.join(run_dir, "model"), run_dir):
        if os.path.isfile(os.path.join(candidate, "adarank_model.json")):
            return candidate
    marker = read_marker(run_dir)
    if marker is not None and marker.get("status") == "nonfinite_loss":
        raise FileNotFoundError(f"{run_dir}: the run stopped on a non-finite loss (see its results.json) and has no "
                                "model to export")
    if marker is not None and marker.get("status") != "complete":
        raise FileNotFoundError(f"{run_dir}: the run has no model yet ({describe(marker)}); finish it with "
                                "`adarank train ... --resume`, then export")
    if marker is not None and not os.path.isdir(os.path.join(run_dir, "model")):
        raise FileNotFoundError(f"{run_dir}: the run saved no model (train.save_model: false); nothing to export")
    raise FileNotFoundError(f"{run_dir}: no AdaRank run here (expected model/adarank_model.json; runs of method "
                            "head or full save a plain transformers model in model/: load it with from_pretrained)")


def _check_target(run_dir: str | None, out_dir: str, overwrite: bool) -> None:
    """Refuse a target that would destroy what the export did not write: the run itself, a directory that
    contains the run, a non-empty directory (unless `overwrite` and it holds an earlier export)."""
    run, out = os.path.realpath(run_dir) if run_dir else None, os.path.realpath(out_dir)
    if run is not None and (out == run or run.startswith(out.rstrip(os.sep) + os.sep)):
        raise ValueError(f"export target {out_dir} is {'the run directory' if out == run else 'a directory that contains the run'}; "
                         "choose a new directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export target {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ValueError(f"export target {out_dir} is not empty; choose a new directory (or --overwrite to replace "
                             "an earlier export)")
        if not os.path.isfile(os.path.join(out_dir, EXPORT_LOG)):
            raise ValueError(f"export target {out_dir} holds no earlier export ({EXPORT_LOG}); --overwrite replaces only "
                             "an export, so choose a new directory")
        try:
            with open(os.path.join(out_dir, EXPORT_LOG), encoding="utf-8") as fh:
                wrote = json.load(fh)["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"export target {out_dir}: its {EXPORT_LOG} does not list the files that export wrote; "
                             "remove the directory yourself or choose a new one") from None
        now = _files(out_dir)
        changed = sorted(f for f in now if f != EXPORT_LOG and now[f] != wrote.get(f))
        if changed:
            raise ValueError(f"export target {out_dir} holds files the earlier export did not write or that were changed "
                             f"since ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); move them or "
                             "choose a new directory")


def _install(tmp: str, out_dir: str) -> None:
    """Move the finished export `tmp` to `out_dir`, replacing an empty directory or an earlier export
    (checked by `_check_target`) only once the new one is complete."""
    if not os.path.isdir(out_dir):
        os.replace(tmp, out_dir)
        return
    if not os.listdir(out_dir):
        os.rmdir(out_dir)
        os.replace(tmp, out_dir)
        return
    old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)), prefix=f".old-{os.path.basename(os.path.abspath(out_dir))}-")
    os.rmdir(old)
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old)


def _files(root: str) -> dict[str, list[int]]:
    """Every file under `root` (relative path) -> [size, modification time in ns]: what tells that a file
    is still the one an export wrote (renaming the directory keeps both)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), root)] = [st.st_size, st.st_mtime_ns]
    return out


# ---------------------------------------------------------------------------------------------- in memory


def write_adapter(model: Any, directory: str, max_rank: int | None = None, base_model: str | None = None) -> dict:
    """Write a PEFT LoRA model trained by AdaRank (in memory; merged updates, per-module and masked ranks
    included) into `directory` as a standard PEFT adapter of the original base: adapter_config.json and
    adapter_model.safetensors, the head (modules_to_save) as trained. Returns the export log."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if max_rank is not None and max_rank < 1:
        raise ValueError(f"--max-rank must be >= 1, got {max_rank}")
    if not any(True for _ in lora_layers(model)):
        raise ValueError("the model's adapter is not LoRA (PEFT AdaLoRA?): it already saves as a PEFT adapter, or "
                         "export it with --merged")
    run_cfg = model.peft_config[ADAPTER]
    merged = getattr(model, MERGED_DELTA_ATTR, None) or {}
    factors, modules = {}, {}
    for name, layer in lora_layers(model):
        scaling = float(layer.scaling[ADAPTER])
        entry = merged.get(base_weight_name(name))
        u, s, vh = lora_svd(layer, extra=entry.factors() if entry else None)  # live + merged, never dense
        numerical = int((s > RANK_RTOL * s[0]).sum()) if s[0] > 0 else 0
        k = max(1, min(numerical, max_rank) if max_rank else numerical)
        factors[name] = (*svd_factors(u, s, vh, k, scaling), scaling)
        norm = float(torch.linalg.vector_norm(s))
        err = float(torch.linalg.vector_norm(s[k:]))
        modules[name] = {"numerical_rank": numerical, "exported_rank": k, "exact": k >= numerical,
                         "frobenius_error": err, "relative_error": err / norm if norm else 0.0}
    ranks = {base_module_name(n): f[0].shape[0] for n, f in factors.items()}
    root = math.sqrt if run_cfg.use_rslora else (lambda k: k)  # rsLoRA: scaling = lora_alpha / √r
    alphas = {base_module_name(n): f[2] * root(f[0].shape[0]) for n, f in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = next(a for n, a in alphas.items() if ranks[n] == r)
    config = copy.deepcopy(run_cfg)  # everything the user set (targets, bias, layers...), with the exported ranks
    config.r, config.lora_alpha = r, lora_alpha
    config.rank_pattern = {n: k for n, k in ranks.items() if k != r}
    config.alpha_pattern = {n: a for n, a in alphas.items() if ranks[n] != r}
    config.base_model_name_or_path = base_model or run_cfg.base_model_name_or_path
    config.inference_mode = True
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    for name, (a, b, _) in factors.items():  # the live factors' names, with the total update's factors
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a.contiguous(), b.contiguous()
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    save_file(state, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    return {"format": "peft_lora", "base_model": config.base_model_name_or_path, "r": r, "lora_alpha": lora_alpha,
            "rank_pattern": config.rank_pattern, "modules": modules, "exact": all(m["exact"] for m in modules.values())}


def export_model(model: Any, out_dir: str, max_rank: int | None = None, overwrite: bool = False) -> dict:
    """Export a model in memory (e.g. `trainer.model` after training with AdaRankCallback) as a standard PEFT
    adapter of the original base into a new directory `out_dir` (built aside and renamed; `overwrite`
    replaces only an earlier, unchanged export). Returns the export log."""
    _check_target(None, out_dir, overwrite)
    return _into(out_dir, lambda tmp: write_adapter(model, tmp, max_rank))


# ---------------------------------------------------------------------------------------------- from a directory


def _trainer_source(path: str, base: str | None) -> tuple[Callable[[], Any], dict]:
    """A Trainer output or checkpoint with a PEFT adapter: (loader of the model, meta). Its adarank/ state,
    when there, says what merge folded into the base (a checkpoint's adapter is relative to that base)."""
    from peft import PeftConfig, PeftModel
    from safetensors.torch import safe_open

    from .checkpoint import read_checkpoint, restore_model

    cfg = PeftConfig.from_pretrained(path)
    base_path = base or cfg.base_model_name_or_path
    if not base_path:
        raise ValueError(f"{path}: adapter_config.json does not name its base model; give it with --base PATH")
    kind = {"SEQ_2_SEQ_LM": "seq2seq", "CAUSAL_LM": "causal_lm"}.get(str(getattr(cfg.task_type, "value", cfg.task_type)),
                                                                      "classifier")
    num_labels = 2
    weights = os.path.join(path, "adapter_model.safetensors")
    if kind == "classifier" and os.path.isfile(weights):
        with safe_open(weights, "pt") as fh:
            heads = [k for k in fh.keys() if k.endswith((".classifier.weight", ".score.weight", ".classifier.out_proj.weight"))]
            num_labels = fh.get_slice(heads[0]).get_shape()[0] if heads else num_labels
    meta = {"base_model": base_path, "kind": kind, "num_labels": num_labels}

    def load() -> Any:
        model = PeftModel.from_pretrained(load_base_model(resolve_model_path(base_path), num_labels)[0], path)
        state_dir = os.path.join(path, "adarank")
        if os.path.isdir(state_dir):
            tensors, _ = read_checkpoint(state_dir)
            restore_model(model, tensors, {}, state_dir, trainable=False)
        return model

    return load, meta


def _source(run_dir: str, base: str | None) -> tuple[Callable[[], Any], Any, dict]:
    """(loader of the model, tokenizer or None, meta) of an `adarank train` run or a Trainer directory."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(run_dir, "adapter_config.json")):
        model_dir = _model_dir(run_dir)
        with open(os.path.join(model_dir, "adarank_model.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
        return (lambda: load_run_model(model_dir)[0]), AutoTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer")), meta
    load, meta = _trainer_source(run_dir, base)
    has_tokenizer = any(os.path.isfile(os.path.join(run_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    return load, AutoTokenizer.from_pretrained(run_dir) if has_tokenizer else None, meta


def export_adapter(run_dir: str, out_dir: str, max_rank: int | None = None, merged: bool = False,
                   overwrite: bool = False, base: str | None = None) -> dict:
    """Write a PEFT adapter directory (or, with `merged`, a full merged model) for the run in `run_dir` -- an
    `adarank train` run, or a Trainer output or checkpoint directory (`base`: its base model, when its
    adapter_config.json does not name it) -- verify it against the run model on a fixed random batch, and
    return the export log. The export is built in a temporary sibling of `out_dir` and renamed; nothing the
    export did not write is deleted."""
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"--max-rank must be >= 1, got {max_rank}")
    _check_target(run_dir, out_dir, overwrite)
    load, tokenizer, meta = _source(run_dir, base)
    run_model = load()
    run_model.eval()
    bad = sorted(n for n, p in run_model.named_parameters() if not bool(torch.isfinite(p).all()))
    if bad:
        raise ValueError(f"{run_dir}: the run's model has non-finite weights ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); nothing exported")

    def write(tmp: str) -> dict:
        from peft import PeftModel

        if merged:
            log = {"format": "merged", "base_model": meta["base_model"]}
            _merged_model(load()).save_pretrained(tmp)
            exported = load_base_model(tmp, meta["num_labels"])[0]
        else:
            log = write_adapter(run_model, tmp, max_rank, meta["base_model"])
            base = load_base_model(resolve_model_path(meta["base_model"]), meta["num_labels"],
                                   quantization=meta.get("quantization"))[0]
            exported = PeftModel.from_pretrained(base, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        kind = meta.get("kind") or ("seq2seq" if meta.get("seq2seq") else "classifier")  # runs saved before "kind"
        log["max_abs_logit_diff"] = _compare(run_model, exported, kind == "seq2seq", run_model.config.vocab_size)
        return log

    return _into(out_dir, write)


def _merged_model(model: Any) -> Any:
    """The plain transformers model: updates merged beside a low-precision base weight folded into it
    (rounded to its dtype, as any merged export of such a base is), then PEFT's merge_and_unload."""
    from .merged import fold_beside

    for _, layer in lora_layers(model):
        fold_beside(layer)
    return model.merge_and_unload()


def _into(out_dir: str, write: Callable[[str], dict]) -> dict:
    """Run `write(tmp)` in a temporary sibling of `out_dir`, add the export log, and rename it into place."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):  # left by an export of this target that was killed while writing
        if stale.startswith(f".tmp-{name}-") and os.path.isdir(os.path.join(parent, stale)):
            shutil.rmtree(os.path.join(parent, stale))
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the export's mode
    try:
        log = write(tmp)
        log["files"] = _files(tmp)  # what --overwrite may replace later, as long as it is unchanged
        write_json(os.path.join(tmp, EXPORT_LOG), log)
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return log


@torch.no_grad()
def _compare(a: Any, b: Any, seq2seq: bool, vocab: int) -> float:
    """Max abs logit difference of two models on a fixed random batch."""
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, max(6, vocab), (4, 24), generator=g)}
    if seq2seq:
        batch["decoder_input_ids"] = torch.randint(5, max(6, vocab), (4, 4), generator=g)
    a.eval(), b.eval()
    return float((a(**batch).logits - b(**batch).logits).abs().max())
