import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import ArcFaceLossAdaptiveMargin, dynamic_margins


def test_dynamic_margins_match_original_formula():
    n = np.array([2, 3, 5, 10, 100, 1000])
    tmp = np.sqrt(1 / np.sqrt(n))
    want = (tmp - tmp.min()) / (tmp.max() - tmp.min()) * 0.45 + 0.05
    got = dynamic_margins(n)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] == pytest.approx(0.5) and got[-1] == pytest.approx(0.05)
    assert np.all(np.diff(got) < 0)  # bigger class, smaller margin


def test_dynamic_margins_other_family_member():
    n = np.array([1.0, 16.0, 81.0])
    t = n ** -0.5
    want = 0.1 + (t - t.min()) / (t.max() - t.min()) * 0.2
    np.testing.assert_allclose(dynamic_margins(n, power=0.5, m_min=0.1, m_max=0.3), want)


def reference_loss(cos, labels, margins, s):
    """Direct per-sample formula: s*cos(theta+m) for the target when theta+m<=pi,
    s*(cos-m sin m) beyond, s*cos elsewhere; cross-entropy in float64."""
    cos = cos.astype(np.float64)
    losses = []
    for c, y in zip(cos, labels):
        m = margins[y]
        theta = math.acos(c[y])
        z = c.copy()
        z[y] = math.cos(theta + m) if theta + m <= math.pi else c[y] - m * math.sin(m)
        z *= s
        losses.append(-(z[y] - z.max() - math.log(np.exp(z - z.max()).sum())))
    return np.array(losses)


def test_loss_matches_direct_formula_including_fallback():
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(64, 7, generator=g) * 2 - 1
    labels = torch.randint(0, 7, (64,), generator=g)
    cos[0, labels[0]] = -0.99  # theta + m > pi: the linear fallback branch
    margins = np.linspace(0.05, 0.5, 7)
    loss = ArcFaceLossAdaptiveMargin(margins, s=80.0)
    want = reference_loss(cos.numpy(), labels.numpy(), margins, 80.0)
    per = loss(cos, labels, 7, reduction="none")
    np.testing.assert_allclose(per.numpy(), want, rtol=2e-4, atol=2e-3)
    assert loss(cos, labels, 7).item() == pytest.approx(want.mean(), rel=2e-4)


def test_zero_margins_give_scaled_cross_entropy():
    g = torch.Generator().manual_seed(1)
    cos = torch.rand(32, 11, generator=g) * 2 - 1
    labels = torch.randint(0, 11, (32,), generator=g)
    got = ArcFaceLossAdaptiveMargin(np.zeros(11), s=80.0)(cos, labels, 11)
    torch.testing.assert_close(got, F.cross_entropy(80.0 * cos, labels), rtol=1e-5, atol=1e-5)


def test_loss_grad_finite_at_cosine_one_and_half_inputs():
    cos = torch.tensor([[1.0, 0.2], [0.3, -1.0]], requires_grad=True)
    ArcFaceLossAdaptiveMargin([0.3, 0.4])(cos, torch.tensor([0, 1]), 2).backward()
    assert torch.isfinite(cos.grad).all()
    half = torch.rand(4, 3).half()
    out = ArcFaceLossAdaptiveMargin([0.1, 0.2, 0.3])(half, torch.tensor([0, 1, 2, 0]), 3)
    assert out.dtype == torch.float32


def test_margins_follow_module_device():
    loss = ArcFaceLossAdaptiveMargin(np.array([0.1, 0.2]))
    assert isinstance(loss.margins, torch.Tensor) and "margins" in dict(loss.named_buffers())
