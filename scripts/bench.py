"""GPU throughput figures: training steps, embedding extraction, retrieval.

    python scripts/bench.py [train|extract|retrieval|all] [--quick] [--rounds N]

Random weights and inputs; prints one line per measurement (flushed as it
comes). Where two variants are compared (the ArcFace head in float32 against
the head under autocast; extraction in fp32 against bf16), their timed rounds
are interleaved and each figure is the median over rounds, so drift in clocks
or temperature hits both alike.
"""
import argparse
import os
import statistics
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from losses import ArcFaceLossAdaptiveMargin  # noqa: E402
from models import build_model  # noqa: E402
from predict import PRECISIONS, topk_cosine  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU only to smoke-test this script


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()  # sync point: timing


def timed(fn, iters):
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters


def interleaved(cases, rounds, iters, warmup=3):
    """{name: median seconds per call} of the step functions in `cases`, timed
    in `rounds` interleaved rounds of `iters` calls each."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            times[k].append(timed(fn, iters))
    return {k: statistics.median(v) for k, v in times.items()}


def _head_under_autocast(self, x):
    """The ArcFace head as it ran before it left autocast: F.linear in the autocast
    dtype (bf16 cosines), for the cost comparison only."""
    cos = F.linear(F.normalize(x.float()), F.normalize(self.weight.float()))
    return cos.view(-1, self.out_features, self.k).amax(dim=2)


def train_step(enet, size, bs, amp, out_dim, head="fp32"):
    model = build_model(enet, out_dim).to(DEV).to(memory_format=torch.channels_last).train()
    if head == "autocast":
        model.metric_classify.forward = types.MethodType(_head_under_autocast, model.metric_classify)
    crit = ArcFaceLossAdaptiveMargin(np.linspace(0.05, 0.5, out_dim)).to(DEV)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(bs, 3, size, size, device=DEV).to(memory_format=torch.channels_last)
    y = torch.randint(0, out_dim, (bs,), device=DEV)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(DEV, enabled=amp == "fp16")

    def step():
        with torch.autocast(DEV, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = crit(logits, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def bench_train(enet, size, bs, amp, rounds, out_dim=81313, iters=10):
    """One training step of train.py (81,313 classes: the head is 81,313 x 3 x 512),
    with the head in float32 (TF32, as train.py under AMP) and, under AMP, against
    the head left to autocast."""
    heads = ["fp32", "autocast"] if amp != "off" else ["fp32"]
    # as train.py: TF32 for the float32 matmuls (the head) under AMP only
    torch.set_float32_matmul_precision("high" if amp != "off" else "highest")
    cases = {h: train_step(enet, size, bs, amp, out_dim, h) for h in heads}
    t = interleaved(cases, rounds, iters)
    line = f"train {enet}@{size} batch {bs} amp={amp}: " + ", ".join(
        f"head {h} {bs / t[h]:.1f} img/s ({t[h] * 1e3:.1f} ms/step)" for h in heads)
    if len(heads) == 2:
        line += f"; fp32 head costs {(t['fp32'] / t['autocast'] - 1) * 100:+.1f}% per step"
    print(line, flush=True)
    del cases
    if DEV == "cuda":
        torch.cuda.empty_cache()


def bench_extract(enet, size, bs, rounds, out_dim=81313, iters=10):
    """predict.py's extraction (model.neck) at each --precision."""
    torch.set_float32_matmul_precision("highest")  # predict.py's fp32 is plain float32
    model = build_model(enet, out_dim).to(DEV).to(memory_format=torch.channels_last).eval()
    x = torch.randn(bs, 3, size, size, device=DEV).to(memory_format=torch.channels_last)

    def step_for(dtype):
        @torch.no_grad()
        def step():
            with torch.autocast(DEV, dtype=dtype or torch.float32, enabled=dtype is not None):
                model.neck(x)
        return step

    t = interleaved({p: step_for(d) for p, d in PRECISIONS.items()}, rounds, iters, warmup=2)
    print(f"extract {enet}@{size} batch {bs}: " + ", ".join(f"{p} {bs / s:.1f} img/s" for p, s in t.items())
          + f"; bf16/fp32 {t['fp32'] / t['bf16']:.2f}x", flush=True)


def bench_retrieval(n_gallery, n_query, n_models=9, dim=512):
    rng = np.random.default_rng(0)
    g = [rng.standard_normal((n_gallery, dim), dtype=np.float32).astype(np.float16) for _ in range(n_models)]
    q = [rng.standard_normal((n_query, dim), dtype=np.float32) for _ in range(n_models)]
    t = time.perf_counter()
    topk_cosine(q, g, 5, device=DEV)
    dt = time.perf_counter() - t
    print(f"retrieval {n_query} queries x {n_gallery} gallery x {n_models * dim} dims (fp16 host storage): "
          f"{dt:.1f} s, {n_query * n_gallery / dt / 1e9:.2f} G pairs/s", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", nargs="?", choices=["train", "extract", "retrieval", "all"], default="all")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per comparison (median)")
    a = p.parse_args()
    torch.backends.cudnn.benchmark = True
    print(torch.__version__, torch.cuda.get_device_name() if DEV == "cuda" else "CPU", flush=True)
    if a.what in ("train", "all"):
        bench_train("tf_efficientnet_b3_ns", 256, 64, "bf16", a.rounds)
        if not a.quick:
            bench_train("tf_efficientnet_b3_ns", 256, 64, "off", a.rounds)
            bench_train("tf_efficientnet_b7_ns", 256, 42, "bf16", a.rounds)
    if a.what in ("extract", "all"):
        bench_extract("tf_efficientnet_b3_ns" if a.quick else "tf_efficientnet_b7_ns", 672, 16, a.rounds)
    if a.what in ("retrieval", "all"):
        bench_retrieval(200_000 if a.quick else 400_000, 10_000)
