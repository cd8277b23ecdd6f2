"""Optimizer state after growth: with our loop's GrowableAdamW, entries added by growth start exactly as a
freshly created parameter would (their own bias correction), while the old entries go on as if nothing
had happened."""

import torch
from torch import nn

from adarank.optim import GROWN, GrowableAdamW, repoint_optimizer, snapshot_optimizer


class One(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.w = nn.Parameter(value.clone())


def test_new_entries_update_as_a_fresh_adamw_and_old_ones_as_before():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, 3, generator=g) for _ in range(320)]
    settings = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    model = One(torch.randn(4, 3, generator=g))
    reference_old = One(model.w.detach())  # the same 4 rows, never grown
    opt, ref_opt = GrowableAdamW(model.parameters(), **settings), torch.optim.AdamW(reference_old.parameters(), **settings)
    for grad in grads[:300]:
        for m, o in ((model, opt), (reference_old, ref_opt)):
            m.w.grad = grad[:4].clone()
            o.step()
    # growth at step 300: two rows appended (as expand does to A)
    new_rows = torch.randn(2, 3, generator=g)
    snapshot = snapshot_optimizer(model, opt)
    model.w = nn.Parameter(torch.cat([model.w.detach(), new_rows]))
    repoint_optimizer(opt, model, snapshot, {"w": (GROWN, 0, 4)})
    fresh = One(new_rows)  # what the new rows would do as a parameter of their own, created now
    fresh_opt = torch.optim.AdamW(fresh.parameters(), **settings)
    for grad in grads[300:]:
        model.w.grad, reference_old.w.grad, fresh.w.grad = grad.clone(), grad[:4].clone(), grad[4:].clone()
        opt.step(), ref_opt.step(), fresh_opt.step()
        torch.testing.assert_close(model.w[4:], fresh.w, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(model.w[:4], reference_old.w, atol=1e-7, rtol=1e-6)


def test_a_shared_step_count_would_boost_the_first_update_of_new_entries():
    """What GrowableAdamW removes: torch's AdamW, one step count per tensor, gives an entry added after 300
    steps a first update 0.1 / sqrt(0.001 / (1 - 0.999^301)) = 1.6 times a fresh parameter's (zero moments,
    the first moment's bias correction already 1, the second's 0.26)."""
    settings = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model = One(torch.zeros(2, 1))
    opt = torch.optim.AdamW(model.parameters(), **settings)
    for _ in range(300):
        model.w.grad = torch.ones(2, 1)
        opt.step()
    snapshot = snapshot_optimizer(model, opt)
    model.w = nn.Parameter(torch.cat([model.w.detach(), torch.zeros(1, 1)]))
    repoint_optimizer(opt, model, snapshot, {"w": (GROWN, 0, 2)})
    model.w.grad = torch.ones(3, 1)
    before = model.w.detach().clone()
    opt.step()
    first = float(before[2] - model.w[2])
    assert abs(first / 1e-2 - 1.61) < 0.01  # a fresh AdamW's first step moves by lr (= 1e-2) for a constant gradient
