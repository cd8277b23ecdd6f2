"""The rank policy: training losses in, decisions out. No torch, no model.

Every `check_every` optimizer steps after `warmup_steps`, the controller looks at the mean of the last
`check_every` losses (the window) and decides to hold or to grow the rank by `alpha` (capped at r_max):

    criterion "threshold":     grow if  mean(window) > tol                      (the original notebook)
    criterion "plateau":       grow if  (prev_mean - mean(window)) / |prev_mean| < tol
    criterion "significance":  grow if  (prev_mean - mean(window)) < tol · sqrt(var_prev/n_prev + var/n)
    criterion "fixed":         grow at every check (the non-adaptive baseline: a schedule, no loss used)

"significance" compares the drop with its own standard error, estimated from the two windows' spreads
(sample variances of the per-step losses), so it tells a plateau from a real but slow descent whatever the
loss's scale and noise; tol is then a number of standard errors (e.g. 2).

`prev_mean` is the window mean at the previous check; after a growth it is forgotten, so the plateau and
significance rules need two windows at the new rank before they can grow again.

With pruning on, a "prune" decision comes once, at the first step where `step >= ceil(prune_at·total_steps)`
or, when `prune_after_r_max_steps` is set, that many steps after r_max was reached (by every module); no
growth follows it. Under per-layer growth the loop reports the modules' ranks after each growth
(`ranks_changed`), so growth goes on while any module is below r_max.

A window holding a non-finite loss never triggers growth. In several processes the loop hands in the loss
averaged over processes, so every process takes the same decision.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from .config import CRITERIA


@dataclass(frozen=True)
class Decision:
    """action: "hold", "grow" or "prune"; rank: the rank to have after this step; reason: why (for the logs)."""

    action: str
    rank: int
    from_rank: int
    step: int
    window_loss: float | None = None
    reason: str = ""

    @property
    def grow(self) -> bool:
        return self.action == "grow"

    @property
    def prune(self) -> bool:
        return self.action == "prune"


class RankController:
    def __init__(
        self,
        r0: int = 4,
        r_max: int = 64,
        alpha: int = 2,
        tol: float = 0.10,
        check_every: int = 50,
        warmup_steps: int = 50,
        criterion: str = "plateau",
        cooldown_steps: int = 0,
        total_steps: int | None = None,
        prune: bool = False,
        prune_at: float = 1.0,
        prune_after_r_max_steps: int | None = None,
    ) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
        if not 1 <= r0 <= r_max or alpha < 1 or check_every < 1:
            raise ValueError("need 1 <= r0 <= r_max, alpha >= 1 and check_every >= 1")
        if criterion == "significance" and check_every < 2:
            raise ValueError("criterion significance needs check_every >= 2 (a window's spread needs two losses)")
        self.r0, self.r_max, self.alpha, self.tol = r0, r_max, alpha, tol
        self.check_every, self.warmup_steps = check_every, warmup_steps
        self.criterion, self.cooldown_steps = criterion, cooldown_steps
        self.total_steps = total_steps
        self.prune, self.prune_at, self.prune_after_r_max_steps = prune, prune_at, prune_after_r_max_steps
        self.rank = r0
        self.full = r0 >= r_max  # every module at r_max (per-layer growth: see `ranks_changed`)
        self.r_max_step: int | None = 0 if r0 >= r_max else None
        self.pruned = False
        self.window: deque[float] = deque(maxlen=check_every)
        self.prev_mean: float | None = None
        self.prev_var: float | None = None  # the previous window's variance of the mean (significance)
        self.last_growth_step: int | None = None
        self.last_step = 0

    @classmethod
    def from_config(cls, cfg: Any, total_steps: int | None = None) -> "RankController":
        return cls(
            r0=cfg.r0, r_max=cfg.r_max, alpha=cfg.alpha, tol=cfg.tol, check_every=cfg.check_every,
            warmup_steps=cfg.warmup_steps, criterion=cfg.criterion, cooldown_steps=cfg.cooldown_steps,
            total_steps=total_steps, prune=cfg.prune != "none", prune_at=cfg.prune_at,
            prune_after_r_max_steps=cfg.prune_after_r_max_steps,
        )

    def is_check_step(self, step: int) -> bool:
        """A step where a decision may be taken: after warmup, every check_every steps, never at the last
        step of the run (`total_steps`, when known) since a new adapter would not be trained."""
        if self.total_steps is not None and step >= self.total_steps:
            return False
        return not self.pruned and step >= self.warmup_steps and step % self.check_every == 0

    def prune_step(self) -> int | None:
        """The step at which pruning happens, as known now (None: not scheduled, or done)."""
        if not self.prune or self.pruned:
            return None
        steps = []
        if self.total_steps is not None:
            steps.append(max(1, math.ceil(self.prune_at * self.total_steps)))
        if self.prune_after_r_max_steps is not None and self.r_max_step is not None:
            steps.append(max(1, self.r_max_step + self.prune_after_r_max_steps))
        return min(steps) if steps else None

    def is_decision_step(self, step: int) -> bool:
        """True where observe() may return something other than hold: the loop syncs its losses there."""
        due = self.prune_step()
        return self.is_check_step(step) or (due is not None and step >= due)

    def observe(self, step: int, loss: float) -> Decision:
        """Record the training loss of optimizer step `step` (1-based) and decide."""
        if step <= self.last_step:
            raise ValueError(f"steps must increase: got step {step} after step {self.last_step}")
        self.last_step = step
        self.window.append(float(loss))
        due = self.prune_step()
        if due is not None and step >= due:
            self.pruned = True
            return Decision("prune", self.rank, self.rank, step, None, f"prune phase (step {due})")
        if not self.is_check_step(step):
            return self._hold(step, None, "")
        if any(not math.isfinite(x) for x in self.window):
            self.prev_mean = self.prev_var = None
            return self._hold(step, None, "non-finite loss in window")
        n = len(self.window)
        mean = sum(self.window) / n
        var = sum((x - mean) ** 2 for x in self.window) / (n - 1) / n if n > 1 else 0.0
        prev, self.prev_mean = self.prev_mean, mean
        prev_var, self.prev_var = self.prev_var, var
        if self.full:
            return self._hold(step, mean, "at r_max")
        if self.last_growth_step is not None and step - self.last_growth_step < self.cooldown_steps:
            return self._hold(step, mean, "cooldown")
        if self.criterion == "threshold":
            if mean <= self.tol:
                return self._hold(step, mean, f"window loss {mean:.4f} <= tol {self.tol}")
            reason = f"window loss {mean:.4f} > tol {self.tol}"
        elif self.criterion == "fixed":
            reason = "fixed schedule"
        elif prev is None or (self.criterion == "significance" and prev_var is None):
            return self._hold(step, mean, "first window")
        elif self.criterion == "significance":
            se = math.sqrt(prev_var + var)
            drop = (prev - mean) / se if se > 0 else (math.inf if prev > mean else 0.0)
            if drop >= self.tol:
                return self._hold(step, mean, f"drop {drop:.2f} SE >= tol {self.tol}")
            reason = f"drop {drop:.2f} SE < tol {self.tol}"
        else:
            improvement = (prev - mean) / abs(prev) if prev != 0 else 0.0
            if improvement >= self.tol:
                return self._hold(step, mean, f"improvement {improvement:.4f} >= tol {self.tol}")
            reason = f"improvement {improvement:.4f} < tol {self.tol}"
        old = self.rank
        self.last_growth_step, self.prev_mean, self.prev_var = step, None, None
        self.ranks_changed(step, min(old + self.alpha, self.r_max), min(old + self.alpha, self.r_max))
        return Decision("grow", self.rank, old, step, mean, reason)

    def ranks_changed(self, step: int, max_rank: int, min_rank: int) -> None:
        """The model's ranks after a rank change at `step`. Growth of every module (the default) follows
        the decision itself; per-layer growth grows only some modules, so the loop reports what the
        modules hold: growth goes on while any module is below r_max, and r_max is reached (for
        `prune_after_r_max_steps`) when all of them are."""
        self.rank = max_rank
        self.full = min_rank >= self.r_max
        if not self.full:  # (observe assumed every module grew; the loop's report corrects that at once)
            self.r_max_step = None
        elif self.r_max_step is None:
            self.r_max_step = step

    def _hold(self, step: int, mean: float | None, reason: str) -> Decision:
        return Decision("hold", self.rank, self.rank, step, mean, reason)

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": {
                "r0": self.r0, "r_max": self.r_max, "alpha": self.alpha, "tol": self.tol,
                "check_every": self.check_every, "warmup_steps": self.warmup_steps,
                "criterion": self.criterion, "cooldown_steps": self.cooldown_steps,
                "total_steps": self.total_steps, "prune": self.prune, "prune_at": self.prune_at,
                "prune_after_r_max_steps": self.prune_after_r_max_steps,
            },
            "r_max_step": self.r_max_step,
            "pruned": self.pruned,
            "rank": self.rank,
            "full": self.full,
            "window": list(self.window),
            "prev_mean": self.prev_mean,
            "prev_var": self.prev_var,
            "last_growth_step": self.last_growth_step,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(**state["settings"])
        self.rank = state["rank"]
        self.full = state.get("full", self.rank >= self.r_max)
        self.window.extend(state["window"])
        self.prev_mean = state["prev_mean"]
        self.prev_var = state.get("prev_var")
        self.last_growth_step = state["last_growth_step"]
        self.last_step = state["last_step"]
        self.r_max_step = state["r_max_step"]
        self.pruned = state["pruned"]


def decision_record(d: Decision) -> dict[str, Any]:
    """The rank_events.jsonl record of a decision."""
    rec = asdict(d)
    rec["to_rank"] = rec.pop("rank")
    return rec
