"""Sub-center ArcFace loss with dynamic (per-class) margins."""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def dynamic_margins(class_counts, power=0.25, m_min=0.05, m_max=0.5):
    """Per-class margins that shrink with class size (paper, sec. 3.2).

    m_c = m_min + (m_max - m_min) * (t_c - min t) / (max t - min t), t_c = n_c^-power.
    The defaults give the original's `tmp = sqrt(1/sqrt(n))`,
    `(tmp - tmp.min()) / (tmp.max() - tmp.min()) * 0.45 + 0.05`.
    If every class has the same size the spread is 0/0; all classes then get m_min.
    """
    t = np.asarray(class_counts, dtype=np.float64) ** (-power)
    span = t.max() - t.min()
    if span == 0:
        return np.full_like(t, m_min)
    return (t - t.min()) / span * (m_max - m_min) + m_min


class ArcFaceLossAdaptiveMargin(nn.Module):
    """Additive angular margin loss (ArcFace) with a margin per class.

    For the target class: phi = cos(theta + m) when theta + m <= pi (cos theta >
    cos(pi - m)), else the linear fallback cos theta - m sin m, as in the
    original (and in InsightFace's `easy_margin=False`). Logits are scaled by s
    and fed to the cross-entropy, all in float32 with autocast disabled.

    The margin table is a buffer: it follows the module to the model's device,
    so a step does no host round trip (the original indexed a NumPy array with
    `labels.cpu().numpy()` and copied the result back to the GPU every step).
    """

    def __init__(self, margins, s=80.0):
        super().__init__()
        self.s = s
        self.register_buffer("margins", torch.as_tensor(np.asarray(margins), dtype=torch.float32))

    def forward(self, logits, labels, out_dim=None, reduction="mean"):
        # float32 even when called inside torch.autocast, like the head that feeds it
        with torch.autocast(logits.device.type, enabled=False):
            return self._forward(logits.float(), labels, out_dim, reduction)

    def _forward(self, cosine, labels, out_dim, reduction):
        out_dim = cosine.shape[1] if out_dim is None else out_dim
        # The margin only touches the target column: work on that (B, 1) slice
        # and write it back, which is the original's one-hot blend without the
        # (B, C) sqrt and without 0 * inf gradients from the other columns.
        m = self.margins[labels].unsqueeze(1)
        c = cosine.gather(1, labels.unsqueeze(1))
        # clamp: a cosine of exactly +-1 would give sqrt(0) and an infinite gradient
        sine = (1.0 - c * c).clamp_min(1e-12).sqrt()
        phi = c * torch.cos(m) - sine * torch.sin(m)
        # theta + m > pi (cos theta <= cos(pi - m)): fall back to cos theta - m sin m
        phi = torch.where(c > torch.cos(math.pi - m), phi, c - torch.sin(math.pi - m) * m)
        if out_dim != cosine.shape[1]:
            raise ValueError(f"out_dim {out_dim} but {cosine.shape[1]} cosines per sample")
        # s * cosine with the target column replaced by s * phi: one (B, C) tensor, written
        # in place. The original's dense cross-entropy against a one-hot target is
        # F.cross_entropy with class indices, without the (B, C) one-hot and product.
        logits = (cosine * self.s).scatter_(1, labels.unsqueeze(1), phi * self.s)
        return F.cross_entropy(logits, labels, reduction="none" if reduction == "none" else "mean")
