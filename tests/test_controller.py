import math

import pytest

from adarank import RankController


def run(ctrl, losses, start=1):
    return [d for i, x in enumerate(losses, start) if (d := ctrl.observe(i, x)).grow]


def test_threshold_grows_every_check_while_loss_above_tol():
    c = RankController(r0=4, r_max=10, alpha=2, tol=0.5, check_every=2, warmup_steps=4, criterion="threshold")
    grows = run(c, [0.9] * 12)
    assert [(d.step, d.from_rank, d.rank) for d in grows] == [(4, 4, 6), (6, 6, 8), (8, 8, 10)]
    assert c.rank == 10  # capped at r_max


def test_threshold_holds_below_tol():
    c = RankController(r0=4, r_max=64, tol=0.5, check_every=2, warmup_steps=0, criterion="threshold")
    assert run(c, [0.4] * 10) == []


def test_plateau_grows_when_improvement_below_tol():
    c = RankController(r0=4, r_max=64, alpha=4, tol=0.1, check_every=2, warmup_steps=0, criterion="plateau")
    # windows: [1,1] -> 1.0 (first), [0.5,0.5] -> 50% better (hold), [0.48,0.48] -> 4% better (grow)
    grows = run(c, [1, 1, 0.5, 0.5, 0.48, 0.48])
    assert [(d.step, d.rank) for d in grows] == [(6, 8)]
    assert "improvement" in grows[0].reason and math.isclose(grows[0].window_loss, 0.48)
    # after a growth the previous window is forgotten: the next check only sets a new reference
    assert run(c, [0.48, 0.48], start=7) == []
    assert [d.rank for d in run(c, [0.48, 0.48], start=9)] == [12]


def test_window_is_the_last_check_every_losses():
    c = RankController(r0=4, r_max=64, tol=0.5, check_every=3, warmup_steps=0, criterion="threshold")
    for step, loss in enumerate([100, 100, 100, 0.1, 0.1], 1):
        c.observe(step, loss)
    d = c.observe(6, 0.1)
    assert not d.grow and math.isclose(d.window_loss, 0.1)


def test_non_finite_loss_never_grows():
    c = RankController(r0=4, r_max=64, tol=0.0, check_every=2, warmup_steps=0, criterion="threshold")
    assert run(c, [1.0, float("nan"), float("inf"), 1.0]) == []
    assert run(c, [1.0, 1.0], start=5)[0].rank == 6  # finite again: grows


def test_cooldown_and_last_step():
    c = RankController(r0=4, r_max=64, tol=0.0, check_every=2, warmup_steps=0, criterion="threshold",
                       cooldown_steps=4, total_steps=10)
    assert [d.step for d in run(c, [1.0] * 10)] == [2, 6]  # 4 within cooldown, 8 too, 10 is the last step


def test_state_dict_resumes_exactly():
    losses = [1.0, 0.9, 0.85, 0.84, 0.84, 0.83, 0.5, 0.49, 0.49, 0.49, 0.3, 0.3]
    ref = RankController(r0=4, r_max=64, tol=0.05, check_every=2, warmup_steps=2)
    full = [(d.step, d.rank) for d in run(ref, losses)]
    a = RankController(r0=4, r_max=64, tol=0.05, check_every=2, warmup_steps=2)
    first = [(d.step, d.rank) for d in run(a, losses[:5])]
    b = RankController()
    b.load_state_dict(a.state_dict())
    second = [(d.step, d.rank) for d in run(b, losses[5:], start=6)]
    assert first + second == full and len(full) >= 2
    assert b.state_dict() == ref.state_dict()


def test_steps_must_increase():
    c = RankController()
    c.observe(1, 1.0)
    with pytest.raises(ValueError, match="steps must increase"):
        c.observe(1, 1.0)


def test_fixed_rank_never_grows():
    c = RankController(r0=8, r_max=8, tol=0.0, check_every=1, warmup_steps=0, criterion="threshold")
    assert run(c, [1.0] * 5) == []


def test_prune_phase_at_a_fraction_of_the_run_then_no_growth():
    c = RankController(r0=4, r_max=64, tol=0.0, check_every=2, warmup_steps=0, criterion="threshold",
                       total_steps=20, prune=True, prune_at=0.5)
    decisions = [c.observe(i, 1.0) for i in range(1, 21)]
    acts = [(d.step, d.action) for d in decisions if d.action != "hold"]
    assert acts == [(2, "grow"), (4, "grow"), (6, "grow"), (8, "grow"), (10, "prune")]
    assert c.prune_step() is None and not c.is_decision_step(12)


def test_prune_after_reaching_r_max():
    c = RankController(r0=4, r_max=8, alpha=2, tol=0.0, check_every=2, warmup_steps=0, criterion="threshold",
                       total_steps=100, prune=True, prune_at=1.0, prune_after_r_max_steps=3)
    acts = [(d.step, d.action, d.rank) for i in range(1, 30) if (d := c.observe(i, 1.0)).action != "hold"]
    assert acts == [(2, "grow", 6), (4, "grow", 8), (7, "prune", 8)]


def test_prune_state_resumes():
    kw = dict(r0=4, r_max=8, tol=0.0, check_every=2, warmup_steps=0, criterion="threshold", total_steps=100,
              prune=True, prune_at=1.0, prune_after_r_max_steps=3)
    a = RankController(**kw)
    for i in range(1, 6):
        a.observe(i, 1.0)
    b = RankController()
    b.load_state_dict(a.state_dict())
    assert b.is_decision_step(7) and b.observe(6, 1.0).action == "hold" and b.observe(7, 1.0).prune


def test_per_layer_growth_goes_on_until_every_module_reaches_r_max():
    """The loop reports the modules' ranks after each growth: with 3 modules growing one at a time from 2 to
    4, growth continues past the controller's own count until the last module is full; r_max is reached
    (and the prune after it scheduled) only then."""
    ctrl = RankController(r0=2, r_max=4, alpha=2, tol=0.0, check_every=2, warmup_steps=2, criterion="threshold",
                          total_steps=40, prune=True, prune_after_r_max_steps=3)
    ranks = [2, 2, 2]
    grown_at = []
    for step in range(1, 20):
        d = ctrl.observe(step, 1.0)
        if d.grow:
            ranks[ranks.index(2)] = 4  # per-layer: one module grows
            ctrl.ranks_changed(step, max(ranks), min(ranks))
            grown_at.append(step)
        if d.prune:
            break
    assert grown_at == [2, 4, 6] and ctrl.r_max_step == 6 and (d.prune, d.step) == (True, 9)


def test_fixed_grows_at_every_check_whatever_the_loss():
    c = RankController(r0=4, r_max=12, alpha=2, check_every=3, warmup_steps=3, criterion="fixed")
    grown = [s for s in range(1, 16) if c.observe(s, 1.0 / s).grow]  # a loss falling fast: plateau would hold
    assert grown == [3, 6, 9, 12]  # 4 -> 6 -> 8 -> 10 -> 12, then at r_max
    assert c.rank == 12


def test_significance_holds_on_a_real_descent_and_grows_on_noise():
    """The same relative improvement (5 %) is a plateau under noise and a real descent without it: the
    significance rule tells them apart, the relative rule (tol 0.10) cannot."""
    def windows(noise):  # two windows of 50 losses, the second 5 % lower, each alternating ±noise around its mean
        return [m + noise * (-1) ** i for m in (1.0, 0.95) for i in range(50)]

    for noise, grows in ((0.01, False), (0.2, True)):
        sig = RankController(r0=4, r_max=64, tol=2.0, check_every=50, warmup_steps=0, criterion="significance")
        rel = RankController(r0=4, r_max=64, tol=0.10, check_every=50, warmup_steps=0, criterion="plateau")
        losses = windows(noise)
        assert [s for s, x in enumerate(losses, 1) if sig.observe(s, x).grow] == ([100] if grows else [])
        assert [s for s, x in enumerate(losses, 1) if rel.observe(s, x).grow] == [100]


def test_significance_state_round_trip():
    kw = dict(r0=4, r_max=64, tol=2.0, check_every=4, warmup_steps=0, criterion="significance")
    a, b = RankController(**kw), RankController(**kw)
    losses = [1.0, 0.9, 1.1, 0.95, 0.7, 0.72, 0.69, 0.71, 0.7, 0.71, 0.69, 0.7]
    for s, x in enumerate(losses[:6], 1):
        a.observe(s, x)
    b.load_state_dict(a.state_dict())
    assert b.prev_var == a.prev_var is not None
    assert [a.observe(s, x) for s, x in enumerate(losses[6:], 7)] == [b.observe(s, x) for s, x in enumerate(losses[6:], 7)]
