"""`scripts/bench.py train` and `extract`: a training step and feature extraction, the repo's against the original's.

The measured side calls train.build_training and train.train_one_epoch, features.embed_batch. The
baselines reproduce what the original code did for the same work:
- train: fp16 autocast + grad scaler (apex O1), the ArcFace head under autocast, the original loss
  (margins gathered on the host each step, dense one-hot cross-entropy), per-parameter Adam,
  contiguous memory, float32 inputs, and a per-step torch.cuda.synchronize() with the loss copied
  to the host;
- extract: float32 eager, embedding and cosines of the full forward.
--compare-format times the same path with contiguous tensors (channels-last is util.memory_format's),
--compare-head the ArcFace head left to autocast (what its float32 run costs).
"""
import math
import types
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import features  # noqa: E402
import train  # noqa: E402
from benchkit import PeakMemory, emit, interleaved, sync, warmup  # noqa: E402
from losses import dynamic_margins  # noqa: E402
from models import IMAGENET_MEAN, IMAGENET_STD, build_model  # noqa: E402
from util import memory_format  # noqa: E402


def add_parser(sub, common, default_device):
    for name, cmd in (("train", cmd_train), ("extract", cmd_extract)):
        q = sub.add_parser(name, help="a training step" if name == "train" else "feature extraction")
        common(q)
        q.set_defaults(run=cmd)
        q.add_argument("--enet-type", default="tf_efficientnet_b3_ns")
        q.add_argument("--image-size", type=int, default=256)
        q.add_argument("--batch-size", type=int, default=64)
        q.add_argument("--steps", type=int, default=10, help="steps (batches) per timed round")
        q.add_argument("--device", default=default_device)
        q.add_argument("--out-dim", type=int, default=81313, help="classes of the ArcFace head (81,313 at steps >= 1)")
        q.add_argument("--compile", action="store_true")
        q.add_argument("--compare-format", action="store_true",
                       help="also time the same path with contiguous tensors (channels-last is util.memory_format's)")
        if name == "train":
            q.add_argument("--amp", choices=["auto", "fp16", "bf16", "off"], default="auto")
            q.add_argument("--compare-head", action="store_true",
                           help="also time the ArcFace head left to autocast: what its float32 run costs")
        else:
            q.add_argument("--precision", choices=sorted(features.PRECISIONS), default=None,
                           help="default bf16 on GPUs, fp32 on CPU")


# ---------------------------------------------------------------- the original's behaviour (baselines)

def _head_under_autocast(self, x):
    """The ArcFace head left to autocast (apex O1 ran its F.linear in fp16)."""
    cos = F.linear(F.normalize(x.float()), F.normalize(self.weight.float()))
    return cos.view(-1, self.out_features, self.k).amax(dim=2)


class OriginalArcFaceLoss(torch.nn.Module):
    """The original's loss as it ran: margins indexed on the host with the
    labels copied there each step, the margin terms built on the host and sent
    back, the margin applied to the whole (B, C) matrix through a one-hot
    blend, and a dense cross-entropy against the one-hot target."""

    def __init__(self, margins, s=80.0):
        super().__init__()
        self.margins, self.s = np.asarray(margins), s

    def forward(self, logits, labels):
        dev = logits.device
        ms = self.margins[labels.cpu().numpy()]  # host round trip, every step
        cos_m = torch.from_numpy(np.cos(ms)).float().to(dev).view(-1, 1)
        sin_m = torch.from_numpy(np.sin(ms)).float().to(dev).view(-1, 1)
        th = torch.from_numpy(np.cos(math.pi - ms)).float().to(dev).view(-1, 1)
        mm = torch.from_numpy(np.sin(math.pi - ms) * ms).float().to(dev).view(-1, 1)
        onehot = F.one_hot(labels, logits.shape[1]).float()
        cosine = logits.float()
        sine = torch.sqrt((1.0 - cosine * cosine).clamp_min(0))
        phi = torch.where(cosine > th, cosine * cos_m - sine * sin_m, cosine - mm)
        output = (onehot * phi + (1.0 - onehot) * cosine) * self.s
        return -(F.log_softmax(output, dim=-1) * onehot).sum(-1).mean()


def _float_input(x):
    """uint8 CHW -> the float32 normalised tensors the original's loader produced."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return ((x.float() - mean) / std).contiguous()


def _batch(device, bs, size, out_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, out_dim, (bs,), generator=g)
    return x.to(device, memory_format=memory_format(device)), y.to(device)


def original_epoch(a, x, y, margins, device):
    """The original's training step as it ran (see the module's docstring), a.steps of them per call."""
    torch.manual_seed(0)
    model = build_model(a.enet_type, a.out_dim).to(device).train()  # contiguous memory
    model.metric_classify.forward = types.MethodType(_head_under_autocast, model.metric_classify)
    crit = OriginalArcFaceLoss(margins)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=False)  # one parameter at a time
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    xf = _float_input(x)

    def epoch():
        for _ in range(a.steps):
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                logits = model(xf)
            loss = crit(logits, y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss.detach().cpu().numpy()  # the original's per-step loss copy
            sync(device)
    return epoch


def cmd_train(a):
    device = torch.device(a.device)
    targs = train.parse_args(["--kernel-type", "bench", "--train-step", "1", "--image-size", str(a.image_size),
                              "--enet-type", a.enet_type, "--batch-size", str(a.batch_size), "--amp", a.amp,
                              "--num-workers", "0", "--log-interval", str(10**9), "--no-pretrained"]
                             + (["--compile"] if a.compile else []))
    margins = dynamic_margins(np.random.default_rng(0).integers(2, 100, a.out_dim))
    x, y = _batch(device, a.batch_size, a.image_size, a.out_dim)
    batches = [(x, y)] * a.steps
    cases, warm = {}, {}

    def ours(head_autocast=False, data=batches, fmt=None):
        torch.manual_seed(0)
        model = build_model(a.enet_type, a.out_dim)
        if head_autocast:
            model.metric_classify.forward = types.MethodType(_head_under_autocast, model.metric_classify)
        t = train.build_training(targs, model, margins, device)
        t.progress = False  # no progress bar inside timed calls
        if fmt is not None:
            t.memory_format = fmt
        return lambda: train.train_one_epoch(targs, t, data)

    with PeakMemory(device) as mem:
        cases["ours"] = ours()
        warm["ours"] = warmup(cases["ours"], device)
    peak = {"ours": mem.peak_mib}
    if a.compare_head:
        cases["head_autocast"] = ours(head_autocast=True)
        warm["head_autocast"] = warmup(cases["head_autocast"], device)
    if a.compare_format:
        cases["contiguous"] = ours(data=[(x.contiguous(), y)] * a.steps, fmt=torch.contiguous_format)
        warm["contiguous"] = warmup(cases["contiguous"], device)
    if a.baseline:
        with PeakMemory(device) as mem:
            cases["baseline"] = original_epoch(a, x, y, margins, device)
            warm["baseline"] = warmup(cases["baseline"], device)
        peak["baseline"] = mem.peak_mib
    t = interleaved(cases, device, a.rounds)
    n = a.steps * a.batch_size
    out = dict(what="train", enet_type=a.enet_type, image_size=a.image_size, batch_size=a.batch_size,
               device=str(device), amp=a.amp, compile=a.compile, img_s=round(n / t["ours"], 2),
               peak_mib=round(peak["ours"], 1), warmup_s=round(warm["ours"], 2))
    out |= _format_figures(a, t, n)
    if a.compare_head:
        out |= dict(head_autocast_img_s=round(n / t["head_autocast"], 2),
                    head_fp32_cost=round(t["ours"] / t["head_autocast"] - 1, 4))
    if a.baseline:
        out |= dict(baseline_img_s=round(n / t["baseline"], 2), baseline_peak_mib=round(peak["baseline"], 1),
                    ratio=round(t["baseline"] / t["ours"], 3))
    emit(**out)


# ---------------------------------------------------------------- extract

def cmd_extract(a):
    device = torch.device(a.device)
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model(a.enet_type, a.out_dim).to(device, memory_format=memory_format(device)).eval()
    x, _ = _batch(device, a.batch_size, a.image_size, a.out_dim)
    cases, warm, peak = {}, {}, {}
    with PeakMemory(device) as mem:
        if a.compile:
            model.neck = torch.compile(model.neck, dynamic=False)

        def ours():
            for _ in range(a.steps):
                features.embed_batch(model, x, device, precision)
        cases["ours"] = ours
        warm["ours"] = warmup(ours, device)
    peak["ours"] = mem.peak_mib
    if a.compare_format:
        torch.manual_seed(0)
        contig = build_model(a.enet_type, a.out_dim).to(device).eval()  # the same weights, contiguous
        if a.compile:
            contig.neck = torch.compile(contig.neck, dynamic=False)
        xc = x.contiguous()

        def contiguous():
            for _ in range(a.steps):
                features.embed_batch(contig, xc, device, precision, torch.contiguous_format)
        cases["contiguous"] = contiguous
        warm["contiguous"] = warmup(contiguous, device)
    if a.baseline:
        base = build_model(a.enet_type, a.out_dim).to(device).eval()  # fp32, contiguous, eager
        xf = _float_input(x)

        @torch.no_grad()
        def original():
            for _ in range(a.steps):
                base.embed_and_classify(xf)
        with PeakMemory(device) as mem:
            cases["baseline"] = original
            warm["baseline"] = warmup(original, device)
        peak["baseline"] = mem.peak_mib
    t = interleaved(cases, device, a.rounds)
    n = a.steps * a.batch_size
    out = dict(what="extract", enet_type=a.enet_type, image_size=a.image_size, batch_size=a.batch_size,
               device=str(device), precision=precision, compile=a.compile, img_s=round(n / t["ours"], 2),
               peak_mib=round(peak["ours"], 1), warmup_s=round(warm["ours"], 2))
    out |= _format_figures(a, t, n)
    if a.baseline:
        out |= dict(baseline_img_s=round(n / t["baseline"], 2), baseline_peak_mib=round(peak["baseline"], 1),
                    ratio=round(t["baseline"] / t["ours"], 3))
    emit(**out)


def _format_figures(a, t, n):
    """--compare-format: the same path with contiguous tensors, and how much slower it is."""
    if not a.compare_format:
        return {}
    return dict(contiguous_img_s=round(n / t["contiguous"], 2), format_ratio=round(t["contiguous"] / t["ours"], 3))
