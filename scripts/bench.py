"""GPU throughput figures: training steps, embedding extraction, retrieval.

    python scripts/bench.py [--quick]

Random weights and inputs; prints one line per measurement (flushed as it comes).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from losses import ArcFaceLossAdaptiveMargin  # noqa: E402
from models import build_model  # noqa: E402
from predict import topk_cosine  # noqa: E402


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()  # sync point: timing
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()  # sync point: timing
    return (time.perf_counter() - t) / iters


def bench_train(enet, size, bs, amp, out_dim=81313, iters=10):
    model = build_model(enet, out_dim).cuda().to(memory_format=torch.channels_last).train()
    crit = ArcFaceLossAdaptiveMargin(np.linspace(0.05, 0.5, out_dim)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(bs, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, out_dim, (bs,), device="cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    def step():
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = crit(logits, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    dt = timed(step, 3, iters)
    print(f"train {enet}@{size} batch {bs} amp={amp}: {bs / dt:.1f} img/s", flush=True)


@torch.no_grad()
def bench_extract(enet, size, bs, out_dim=81313, iters=10):
    model = build_model(enet, out_dim).cuda().to(memory_format=torch.channels_last).eval()
    x = torch.randn(bs, 3, size, size, device="cuda").to(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.embed_and_classify(x)

    dt = timed(step, 2, iters)
    print(f"extract {enet}@{size} batch {bs} bf16: {bs / dt:.1f} img/s", flush=True)


def bench_retrieval(n_gallery, n_query, n_models=9, dim=512):
    rng = np.random.default_rng(0)
    g = [rng.standard_normal((n_gallery, dim), dtype=np.float32).astype(np.float16) for _ in range(n_models)]
    q = [rng.standard_normal((n_query, dim), dtype=np.float32) for _ in range(n_models)]
    t = time.perf_counter()
    topk_cosine(q, g, 5, device="cuda")
    dt = time.perf_counter() - t
    print(f"retrieval {n_query} queries x {n_gallery} gallery x {n_models * dim} dims (fp16 host storage): "
          f"{dt:.1f} s, {n_query * n_gallery / dt / 1e9:.2f} G pairs/s", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    torch.backends.cudnn.benchmark = True
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    bench_train("tf_efficientnet_b3_ns", 256, 64, "bf16")
    bench_train("tf_efficientnet_b3_ns", 256, 64, "off")
    if not a.quick:
        bench_train("tf_efficientnet_b7_ns", 256, 42, "bf16")
        bench_extract("tf_efficientnet_b7_ns", 672, 16)
    bench_retrieval(200_000 if a.quick else 400_000, 10_000)
