"""Run outputs: JSONL logs, atomic JSON/YAML writes, package versions and the training plot.

Everything written here is strict JSON: a non-finite float (NaN, ±inf), which `json` would write as a bare
`NaN` that strict parsers reject, becomes `null`, and the record gets a `nonfinite` field that says which
fields were what (`{"loss": "nan", "final.eval_loss": "inf"}`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from importlib import metadata
from typing import Any

import yaml

PACKAGES = ("adarank", "torch", "transformers", "peft", "accelerate", "datasets", "scikit-learn")


def atomic_write(path: str, text: str) -> None:
    """Write via a temporary file in the same directory and rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None; a top-level dict gets a `nonfinite` field naming
    the replaced fields (dotted paths) and their values."""
    found: dict[str, str] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            found[path] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            return None
        if isinstance(value, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    out = walk(obj, "")
    if found and isinstance(out, dict):
        out["nonfinite"] = {**(out.get("nonfinite") or {}), **found}
    return out


def dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def write_json(path: str, obj: Any) -> None:
    atomic_write(path, dumps(obj, indent=2) + "\n")


def write_yaml(path: str, obj: Any) -> None:
    atomic_write(path, yaml.safe_dump(obj, sort_keys=False))


class JsonlWriter:
    """Appends one strict-JSON record per line. The file starts as `records` (written atomically): empty
    for a new run, the checkpoint's history for a resumed one (so lines written after that checkpoint by
    the interrupted process disappear)."""

    def __init__(self, path: str, records: list[dict] | None = None):
        self.path = path
        atomic_write(path, "".join(dumps(r) + "\n" for r in records or []))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def plot_training(log: list[dict], events: list[dict], evals: list[dict], path: str, title: str = "") -> None:
    """Two panels over optimizer steps: training loss with growth (red) and prune (black) markers and the
    validation accuracy (or score); the LoRA rank in effect (max and mean over modules)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_rank) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[2, 1])
    steps = [r["step"] for r in log]
    ax_loss.plot(steps, [r["loss"] for r in log], color="tab:blue", label="train loss")
    styles = {"grow": ("tab:red", "--", "rank growth"), "prune": ("black", ":", "SVD prune")}
    seen = set()
    for ev in events:
        color, style, label = styles[ev["action"]]
        ax_loss.axvline(ev["step"], color=color, linestyle=style, alpha=0.7, label=None if label in seen else label)
        seen.add(label)
    ax_loss.set_ylabel("training loss")
    if evals:
        ax_acc = ax_loss.twinx()
        metric = "accuracy" if "accuracy" in evals[0] else "score"  # STS-B: its score (Pearson/Spearman mean)
        ax_acc.plot([e["step"] for e in evals], [e[metric] for e in evals], "o-", color="tab:green", label=f"val {metric}")
        ax_acc.set_ylabel(f"validation {metric}")
        ax_acc.legend(loc="upper right")
    ax_loss.legend(loc="upper left")
    # a log record's rank is the one its steps trained at: draw it over the steps up to x
    ax_rank.step(steps, [r["rank"] for r in log], where="pre", color="tab:purple", label="max over modules")
    if any(r.get("rank_mean", r["rank"]) != r["rank"] for r in log):
        ax_rank.step(steps, [r["rank_mean"] for r in log], where="pre", color="tab:orange", label="mean over modules")
        ax_rank.legend(loc="upper left")
    ax_rank.set_ylabel("LoRA rank")
    ax_rank.set_xlabel("optimizer step")
    if title:
        ax_loss.set_title(title)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
