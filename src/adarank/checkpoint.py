"""Checkpoints of a training run: everything it needs to continue as if it had never stopped.

    <run>/checkpoints/step-00000040/
        model.safetensors   the trainable parameters at their current shapes (LoRA factors at each module's
                            rank, the head) and the base weights that merge-strategy growth changed
        state.pt            optimizer, LR scheduler, GradScaler, controller and importance tracker, the RNG
                            states of every process, the position in the data order, and the histories
                            results.json and training.png are built from
        checkpoint.json     the completion marker, written last: the step and the size of every file

A checkpoint is written into `checkpoints/.tmp-step-...` (each file flushed to disk) and renamed; a
directory without checkpoint.json, or whose files do not have the sizes it records, is not a checkpoint.
Only the newest `keep` checkpoints stay.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import shutil
import signal
from typing import Any

import torch

from .rundir import CHECKPOINTS

DONE = "checkpoint.json"
TENSORS = "model.safetensors"
STATE = "state.pt"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, f"step-{step:08d}")


def _complete(path: str) -> bool:
    try:
        with open(os.path.join(path, DONE), encoding="utf-8") as fh:
            files = json.load(fh)["files"]
        return all(os.path.getsize(os.path.join(path, name)) == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint of a run, oldest first."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := _NAME.match(name))]
    return sorted((step, path) for step, path in found if _complete(path))


def latest_checkpoint(run_dir: str) -> str | None:
    done = complete_checkpoints(run_dir)
    return done[-1][1] if done else None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(run_dir: str, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                     keep: int) -> str:
    """Write a complete checkpoint of `step` atomically and drop all but the newest `keep`; returns its path."""
    final = checkpoint_dir(run_dir, step)
    write_state_dir(final, tensors, state, step)
    for _, old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def write_state_dir(final: str, tensors: dict[str, torch.Tensor], state: dict[str, Any], step: int) -> None:
    """Write `final` (tensors, state, completion marker) through a temporary sibling renamed into place."""
    from safetensors.torch import save_file

    root = os.path.dirname(final)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{os.path.basename(final)}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while writing it (ours: .tmp-<name>)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(tmp, TENSORS))
    failpoint("checkpoint", step)
    with open(os.path.join(tmp, STATE), "wb") as fh:
        torch.save(state, fh)
    files = {name: os.path.getsize(os.path.join(tmp, name)) for name in (TENSORS, STATE)}
    for name in files:
        with open(os.path.join(tmp, name), "rb+") as fh:
            os.fsync(fh.fileno())
    with open(os.path.join(tmp, DONE), "w", encoding="utf-8") as fh:
        json.dump({"step": step, "files": files,
                   "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if os.path.isdir(final):  # ours, older: incomplete, or superseded (a Trainer saving the same step again)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) of a complete checkpoint."""
    from safetensors.torch import load_file

    if not _complete(path):
        raise ValueError(f"{path}: not a complete checkpoint")
    with open(os.path.join(path, STATE), "rb") as fh:
        state = torch.load(fh, map_location="cpu", weights_only=True)
    return load_file(os.path.join(path, TENSORS)), state


def clean_partial(run_dir: str) -> None:
    """Remove what a killed process left half-written in `checkpoints/`: temporary and unmarked directories."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.isdir(path) and (name.startswith(".tmp-step-") or (_NAME.match(name) and not _complete(path))):
            shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------- the model part

MERGED_PREFIX = "merged_delta::"  # tensor names of the merged updates (relative to the original base)


def model_tensors(model: torch.nn.Module, trainable: bool = True) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of a PEFT model beyond its config: the trainable parameters at their current
    shapes (unless `trainable` is False: a Trainer checkpoint's adapter files hold them) and the merged
    updates as the low-rank parts they were (merged.py): base weights they changed are rebuilt from them
    exactly, so none is saved."""
    from .merged import flat

    out = {n: p for n, p in model.named_parameters() if p.requires_grad} if trainable else {}
    out.update({MERGED_PREFIX + k: v for k, v in flat(getattr(model, "adarank_merged_delta", None) or {}).items()})
    return out


def restore_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], ranks: dict[str, int], where: str,
                  trainable: bool = True) -> None:
    """Give a PEFT model the checkpoint's per-module ranks and merged updates (replayed into the base
    weights, or set beside them, as they were in training) and -- with `trainable` -- its trainable
    parameters. The model is freshly built (at r0, on the original base), or one that trained on (a Trainer
    loading its best checkpoint): then what it merged since is taken back first."""
    from .merged import apply_record, unflat
    from .surgery import base_weight_name, lora_layers, resize_lora

    if ranks:
        resize_lora(model, ranks)
    params = dict(model.named_parameters())
    saved = {k: v for k, v in tensors.items() if not k.startswith(MERGED_PREFIX)}
    missing = sorted(n for n, p in params.items() if trainable and p.requires_grad and n not in saved)
    unknown = sorted(set(saved) - set(params))
    if missing or unknown:
        raise ValueError(f"{where} does not fit the model (missing {missing[:3]}, unknown {unknown[:3]})")
    record = unflat({k[len(MERGED_PREFIX):]: v for k, v in tensors.items() if k.startswith(MERGED_PREFIX)})
    apply_record(model, record, list(lora_layers(model)), base_weight_name)
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


# ---------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's random number generator states: Python, NumPy, torch (CPU and CUDA)."""
    import numpy as np

    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, key.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- testing aid


def failpoint(name: str, step: int) -> None:
    """Fault injection for the resume tests: with ADARANK_FAILPOINT=NAME:STEP[:RANK][:SIGNAL] this process
    sends itself SIGNAL (default SIGKILL) at the named point of that step (on that process rank only, when
    given). Points: "step" (after the optimizer step, before anything else of that step), "checkpoint"
    (halfway through writing the checkpoint)."""
    spec = os.environ.get("ADARANK_FAILPOINT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[:2] != [name, str(step)]:
        return
    if len(parts) > 2 and parts[2] and parts[2] != os.environ.get("RANK", "0"):
        return
    os.kill(os.getpid(), getattr(signal, parts[3]) if len(parts) > 3 else signal.SIGKILL)


__all__ = ["MERGED_PREFIX", "checkpoint_dir", "clean_partial", "complete_checkpoints", "failpoint",
           "latest_checkpoint", "model_tensors", "read_checkpoint", "restore_model", "rng_state", "set_rng_state",
           "write_checkpoint", "write_state_dir"]
