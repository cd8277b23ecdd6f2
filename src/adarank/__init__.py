"""AdaRank: adaptive-rank LoRA fine-tuning of Hugging Face models.

Start at a small LoRA rank, grow it when the training loss stops improving (merge-and-regrow or expand in
place), hand the new factors to the optimizer, and keep the model's function unchanged at every growth.
"""

import logging

# bitsandbytes (imported by PEFT when installed) warns at import, on CPUs with AVX512-bf16, that an optional
# hub-downloaded 4-bit kernel is missing; its built-in fallback is what runs. One line of noise per command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .config import (AdaRankCfg, AdaRankConfig, ConfigError, DataConfig, ModelConfig, RunConfig,  # noqa: E402
                     TrainConfig, load_config)
from .controller import Decision, RankController
from .data import DataError
from .metrics import classification_metrics, decode_label, decode_score, regression_metrics, task_metrics
from .modeling import ModelError, check_tokenizer, load_run_model
from .importance import ImportanceTracker
from .optim import apply_decision, build_optimizer, build_scheduler, grow_and_repoint, repoint_optimizer
from .surgery import allocate_masked, grow_lora, lora_ranks, prune_lora
from .tasks import TASKS, TaskSpec, get_task

__version__ = "0.1.0"


def __getattr__(name: str):  # heavy imports only when asked for
    if name == "AdaRankCallback":
        from .callback import AdaRankCallback

        return AdaRankCallback
    if name == "export_adapter":
        from .export import export_adapter

        return export_adapter
    if name == "train":
        from .train import train

        return train
    raise AttributeError(name)


__all__ = [
    "AdaRankCallback", "AdaRankCfg", "AdaRankConfig", "ConfigError", "DataConfig", "DataError", "Decision",
    "ImportanceTracker", "apply_decision", "export_adapter", "prune_lora",
    "ModelConfig", "ModelError", "RankController", "RunConfig", "TASKS", "TaskSpec", "TrainConfig",
    "build_optimizer", "build_scheduler", "check_tokenizer", "classification_metrics", "decode_label", "decode_score",
    "get_task", "regression_metrics", "task_metrics", "grow_and_repoint", "grow_lora", "load_config", "load_run_model", "lora_ranks",
    "repoint_optimizer", "allocate_masked", "train",
]
