import math

import pytest
import torch

from util import get_lr


def test_lr_sequence_closed_form():
    lr, n = 1e-4, 10
    seq = [get_lr(e, lr, n) for e in range(1, n + 1)]
    assert seq[0] == lr and seq[1] == pytest.approx(10 * lr) and seq[2] == pytest.approx(10 * lr)
    for e in range(4, n + 1):
        assert seq[e - 1] == pytest.approx(10 * lr * (1 + math.cos(math.pi * (e - 2) / (n - 1))) / 2)
    assert get_lr(1, 3e-5, 1) == 3e-5


@pytest.mark.parametrize("n", [2, 3, 5, 14, 40])
def test_lr_matches_torch_cosine_warm_restarts_after_warmup(n):
    """After the one-epoch warm-up, epoch e >= 3 equals CosineAnnealingWarmRestarts(T_0=n-1)
    on a base of 10*lr stepped to e-2 (what the original's GradualWarmupSchedulerV2 hands over)."""
    lr = 5e-5
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=10 * lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=n - 1)
    for e in range(3, n + 1):
        sched.step(0 if e == 3 else e - 2)
        assert get_lr(e, lr, n) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)


def test_lr_depends_only_on_epoch():
    assert [get_lr(e, 1e-4, 20) for e in (5, 6)] == [get_lr(e, 1e-4, 20) for e in (5, 6)]
