"""Per-module importance of LoRA modules, accumulated over the check window (for per-layer growth).

    grad_norm:    Σ_steps ‖∇A‖² + ‖∇B‖²
    sensitivity:  Σ_steps Σ |A ⊙ ∇A| + Σ |B ⊙ ∇B|        (AdaLoRA's sensitivity, on the LoRA factors)

Scores stay on the device (no host sync per step); `top` reads them once per growth.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import IMPORTANCE
from .surgery import ADAPTER, lora_layers


class ImportanceTracker:
    def __init__(self, kind: str = "grad_norm", adapter: str = ADAPTER):
        if kind not in IMPORTANCE:
            raise ValueError(f"importance must be one of {list(IMPORTANCE)}, got {kind!r}")
        self.kind, self.adapter = kind, adapter
        self.scores: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, model: nn.Module, grad_scale: float = 1.0) -> None:
        """Add this step's scores; call after backward, before the optimizer step (and before clipping).
        `grad_scale`: the fp16 GradScaler's scale the gradients still carry; a step whose scores are not
        finite (the scaler will skip it) adds nothing."""
        for name, layer in lora_layers(model, self.adapter):
            score = None
            for p in (layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight):
                if p.grad is None:
                    continue
                g = p.grad.float() / grad_scale
                s = g.pow(2).sum() if self.kind == "grad_norm" else (p.float() * g).abs().sum()
                score = s if score is None else score + s
            if score is not None:
                score = torch.where(torch.isfinite(score), score, torch.zeros_like(score))  # no host sync
                self.scores[name] = self.scores[name] + score if name in self.scores else score

    def top(self, k: int, candidates: list[str]) -> list[str]:
        """The k candidates with the highest accumulated score (ties and unscored modules by name)."""
        values = {n: float(self.scores[n]) if n in self.scores else 0.0 for n in candidates}
        return sorted(candidates, key=lambda n: (-values[n], n))[:k]

    def reset(self) -> None:
        self.scores = {}
