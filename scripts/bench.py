"""Throughput benchmarks on the code paths train.py and predict.py run, with the original's behaviour as baseline.

    python scripts/bench.py train   [--enet-type T] [--image-size S] [--batch-size B] [--steps N] [--device D]
                                    [--amp A] [--compile] [--baseline] [--compare-head] [--compare-format]
    python scripts/bench.py extract [--enet-type T] [--image-size S] [--batch-size B] [--steps N] [--device D]
                                    [--precision P] [--compile] [--baseline] [--compare-format]
    python scripts/bench.py loader  --image-size S [--data-dir D | --make N] [--workers W] [--baseline]
    python scripts/bench.py knn     --queries Q --gallery G --dim D [--models M] [--device D] [--baseline]
                                    [--clusters K --noise S] [--faiss FACTORY [--nprobe N] [--ef N] [--rerank N]]
    python scripts/bench.py ranks   --images N [--nproc W] [--enet-type T] [--image-size S]
                                    (predict.py's extraction, one process against W torchrun ranks)
    python scripts/bench.py onnx    [--enet-type T] [--image-size S] [--batch-size B] [--threads N]
                                    (export.py's file in onnxruntime against the same model in PyTorch)
    python scripts/bench.py transfer --photos DIR [--distractors DIR] --enet-type T --pretrained-path W
                                    (real photos: zero training vs the original recipe vs --recipe finetune;
                                    scripts/bench_transfer.py)

Each measurement prints one JSON line, flushed as it is produced: `what`,
`img_s` (or `pairs_s`), `peak_mib`, `warmup_s` (first calls: cuDNN autotuning,
compilation; not timed), and with --baseline `baseline_img_s` and `ratio`.
Timed rounds of the variants compared are interleaved and each figure is the
median over rounds, so drifting clocks or a noisy neighbour hit all alike.

The measured side calls the repo's own functions (train.build_training and
train.train_one_epoch, features.embed_batch, dataset.LandmarkDataset with
get_transforms and train.loader_kwargs, retrieval.topk_cosine). The baselines
reproduce what the original code did for the same work:
- train: fp16 autocast + grad scaler (apex O1), the ArcFace head under autocast,
  the original loss (margins gathered on the host each step, dense one-hot
  cross-entropy), per-parameter Adam, contiguous memory, float32 inputs, and a
  per-step torch.cuda.synchronize() with the loss copied to the host;
- extract: float32 eager, embedding and cosines of the full forward;
- loader: full-size decode, the augmentations at full size step by step, then
  resize and normalise to float32 CHW (dataset.reference_transforms);
- knn: the whole gallery on the device in float32, queries in batches of 4.
With --faiss the knn figures are faiss' against exact search on the same vectors
(recall@5 of the codes alone and after the exact shortlist, build and search
time, the index's size); `ranks` times whole predict.py runs; `onnx` times
export.py's file in onnxruntime (CPU) against PyTorch eager on the same uint8
batch, both computing the embedding and the class cosines (export.Serving).
"""
import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import types

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import bench_transfer  # noqa: E402
import features  # noqa: E402
import retrieval  # noqa: E402
import train  # noqa: E402
from losses import dynamic_margins  # noqa: E402
from models import IMAGENET_MEAN, IMAGENET_STD, build_model  # noqa: E402
from util import memory_format  # noqa: E402

train.tqdm = lambda iterable, **kw: iterable  # no progress bars inside timed calls


# ---------------------------------------------------------------- timing and memory

def emit(**kw):
    print(json.dumps(kw), flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync point: timing


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(cases, device, rounds):
    """{name: median seconds of one call} over `rounds` interleaved rounds."""
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def _rss_anon_mib():
    """Anonymous resident memory of this process (file-backed pages, e.g. a
    memory-mapped gallery, are not counted: they are the page cache's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakMemory:
    """Peak memory above the level at entry, in MiB: the CUDA allocator's peak
    on GPUs; on CPU, anonymous RSS polled every millisecond."""

    def __init__(self, device):
        self.device, self.peak_mib = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base, self.high, self.stop = _rss_anon_mib(), 0.0, threading.Event()

            def poll():
                while not self.stop.is_set():
                    self.high = max(self.high, _rss_anon_mib())
                    time.sleep(0.001)
            self.thread = threading.Thread(target=poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.peak_mib = max(self.high, _rss_anon_mib()) - self.base


@contextlib.contextmanager
def _memory_format(module, fmt):
    """module.memory_format (train's or predict's util.memory_format) answering fmt meanwhile:
    --compare-format times the same code path with contiguous tensors."""
    saved = module.memory_format
    module.memory_format = lambda device: fmt
    try:
        yield
    finally:
        module.memory_format = saved


def _warmup(fn, device, calls=2):
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return time.perf_counter() - t


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


class OriginalLandmarkDataset(torch.utils.data.Dataset):
    """The original's dataset item as it ran: cv2.imread at full size, a reversed
    channel view, the albumentations chain, .astype(float32) (a copy: Normalize
    already returns float32), a transposed view and torch.tensor (a strided
    copy). No per-sample seeding (albumentations 0.4 drew from the global RNG)."""

    def __init__(self, filepaths, transform):
        self.filepaths, self.transform = list(filepaths), transform

    def __len__(self):
        return len(self.filepaths)

    def __getitem__(self, index):
        image = cv2.imread(self.filepaths[index])[:, :, ::-1]
        image = self.transform(image=image)["image"].astype(np.float32)
        return torch.tensor(image.transpose(2, 0, 1)), torch.tensor(0)


def _float_input(x):
    """uint8 CHW -> the float32 normalised tensors the original's loader produced."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return ((x.float() - mean) / std).contiguous()


# ---------------------------------------------------------------- train

def _batch(device, bs, size, out_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, out_dim, (bs,), generator=g)
    return x.to(device, memory_format=memory_format(device)), y.to(device)


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

    def ours(head_autocast=False, data=batches):
        torch.manual_seed(0)
        model = build_model(a.enet_type, a.out_dim)
        if head_autocast:
            model.metric_classify.forward = types.MethodType(_head_under_autocast, model.metric_classify)
        t = train.build_training(targs, model, margins, device)
        return lambda: train.train_one_epoch(targs, t.train_model, data, t.optimizer, t.train_criterion, t.scaler,
                                             t.autocast, device)

    def original():
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

    with PeakMemory(device) as mem:
        cases["ours"] = ours()
        warm["ours"] = _warmup(cases["ours"], device)
    peak = {"ours": mem.peak_mib}
    if a.compare_head:
        cases["head_autocast"] = ours(head_autocast=True)
        warm["head_autocast"] = _warmup(cases["head_autocast"], device)
    if a.compare_format:
        with _memory_format(train, torch.contiguous_format):
            epoch = ours(data=[(x.contiguous(), y)] * a.steps)

        def contiguous():
            with _memory_format(train, torch.contiguous_format):
                epoch()
        cases["contiguous"] = contiguous
        warm["contiguous"] = _warmup(contiguous, device)
    if a.baseline:
        with PeakMemory(device) as mem:
            cases["baseline"] = original()
            warm["baseline"] = _warmup(cases["baseline"], device)
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
        warm["ours"] = _warmup(ours, device)
    peak["ours"] = mem.peak_mib
    if a.compare_format:
        torch.manual_seed(0)
        contig = build_model(a.enet_type, a.out_dim).to(device).eval()  # the same weights, contiguous
        if a.compile:
            contig.neck = torch.compile(contig.neck, dynamic=False)
        xc = x.contiguous()

        def contiguous():
            with _memory_format(features, torch.contiguous_format):
                for _ in range(a.steps):
                    features.embed_batch(contig, xc, device, precision)
        cases["contiguous"] = contiguous
        warm["contiguous"] = _warmup(contiguous, device)
    if a.baseline:
        base = build_model(a.enet_type, a.out_dim).to(device).eval()  # fp32, contiguous, eager
        xf = _float_input(x)

        @torch.no_grad()
        def original():
            for _ in range(a.steps):
                base.embed_and_classify(xf)
        with PeakMemory(device) as mem:
            cases["baseline"] = original
            warm["baseline"] = _warmup(original, device)
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


# ---------------------------------------------------------------- loader

def make_jpegs(out_dir, n, seed=0, min_size=600, max_size=1024):
    """n GLDv2-sized JPEGs (long side 600-1024 px, quality 85-95) of synthetic.py's scenes."""
    import synthetic
    rng = np.random.default_rng(seed)
    scenes = [synthetic.make_scene(rng) for _ in range(8)]
    paths = []
    for i in range(n):
        img = synthetic.make_view(scenes[i % len(scenes)], rng, min_size, max_size)
        p = os.path.join(out_dir, f"{i:06d}.jpg")
        if not cv2.imwrite(p, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(85, 96))]):
            raise OSError(f"could not write {p}")
        paths.append(p)
    return paths


def _image_paths(data_dir):
    csv = os.path.join(data_dir, "train.csv")
    if os.path.exists(csv):
        ids = pd.read_csv(csv, dtype={"id": str})["id"]
        return [dataset.image_path(data_dir, "train", i) for i in ids]
    return sorted(glob.glob(os.path.join(data_dir, "**", "*.jpg"), recursive=True))


def cmd_loader(a):
    tmp = None
    if a.make:
        tmp = tempfile.mkdtemp(prefix="bench_jpegs_")
        paths = make_jpegs(tmp, a.make)
    elif a.data_dir:
        paths = _image_paths(a.data_dir)
    else:
        sys.exit("bench.py loader: give --data-dir D or --make N")
    try:
        paths = paths[:a.images]
        if not paths:
            sys.exit(f"bench.py loader: no images under {a.data_dir}")
        if a.workers == 0:
            cv2.setNumThreads(1)  # one core: the workers' setting (dataset.worker_init)
        targs = types.SimpleNamespace(batch_size=a.batch_size, num_workers=a.workers)
        kw = train.loader_kwargs(targs, torch.device("cpu"))
        df = pd.DataFrame({"filepath": paths, "landmark_id": np.zeros(len(paths), np.int64)})

        def loader_for(ds, sampler, **kw):
            loader = torch.utils.data.DataLoader(ds, sampler=sampler, **kw)
            epoch = [0]

            def run():
                epoch[0] += 1
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch[0])
                for _ in loader:
                    pass
            return run

        cpu = torch.device("cpu")
        ours = dataset.LandmarkDataset(df, "train", "train", dataset.get_transforms(a.image_size)[0])
        cases = {"ours": loader_for(ours, dataset.EpochSampler(torch.utils.data.SequentialSampler(ours)), **kw)}
        with PeakMemory(cpu) as mem:  # this process only: with workers, their memory is their own
            warm = {"ours": _warmup(cases["ours"], cpu, calls=1)}
        if a.baseline:
            # the original's DataLoader: default collate (float32), the same workers and batch
            base = OriginalLandmarkDataset(paths, dataset.reference_transforms(a.image_size)[0])
            base_kw = {k: v for k, v in kw.items() if k != "collate_fn"}
            cases["baseline"] = loader_for(base, torch.utils.data.SequentialSampler(base), **base_kw)
            warm["baseline"] = _warmup(cases["baseline"], cpu, calls=1)
        t = interleaved(cases, cpu, a.rounds)
        n, cores = len(paths), max(a.workers, 1)
        out = dict(what="loader", image_size=a.image_size, images=n, workers=a.workers,
                   source="make" if a.make else a.data_dir, img_s=round(n / t["ours"], 2),
                   img_s_per_core=round(n / t["ours"] / cores, 2), peak_mib=round(mem.peak_mib, 1), warmup_s=round(warm["ours"], 2))
        if a.baseline:
            out |= dict(baseline_img_s=round(n / t["baseline"], 2), ratio=round(t["baseline"] / t["ours"], 3))
        emit(**out)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- knn

def cmd_knn(a):
    device = torch.device(a.device)
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(prefix="bench_knn_")
    try:
        qs, gs = [], []
        # uniform on the sphere, or --clusters: each image its landmark's centre plus noise (recall needs
        # structure); an image keeps its landmark in every model of the ensemble
        g_lab = rng.integers(0, a.clusters, a.gallery) if a.clusters else None
        q_lab = rng.integers(0, a.clusters, a.queries) if a.clusters else None
        for j in range(a.models):  # float16 galleries on disk, memory-mapped, as predict.py's --fp16-cache
            centres = rng.standard_normal((a.clusters, a.dim), dtype=np.float32) if a.clusters else None

            def points(lab, n):
                x = rng.standard_normal((n, a.dim), dtype=np.float32)
                if centres is not None:
                    x = centres[lab] + a.noise * x
                return x / np.linalg.norm(x, axis=1, keepdims=True)
            g = np.lib.format.open_memmap(os.path.join(tmp, f"g{j}.npy"), mode="w+", dtype=np.float16,
                                          shape=(a.gallery, a.dim))
            for g0 in range(0, a.gallery, 65536):
                n = min(65536, a.gallery - g0)
                g[g0:g0 + n] = points(None if g_lab is None else g_lab[g0:g0 + n], n)
            g.flush()
            del g
            gs.append(np.load(os.path.join(tmp, f"g{j}.npy"), mmap_mode="r"))
            qs.append(points(q_lab, a.queries))
        if a.faiss:
            return _knn_faiss(a, qs, gs, device, tmp)
        dtot = a.dim * a.models
        qc, gc = min(a.query_chunk, a.queries), min(a.gallery_chunk, a.gallery)
        # what topk_cosine holds at once: the queries, one float32 gallery chunk, one similarity
        # block, one model's float16 staging copy of the chunk
        bound_mib = (a.queries * dtot * 4 + gc * dtot * 4 + qc * gc * 4 + gc * a.dim * 2) / 2**20

        def ours():
            retrieval.topk_cosine(qs, gs, 5, device=device, query_chunk=a.query_chunk, gallery_chunk=a.gallery_chunk)

        with PeakMemory(device) as mem:
            warm = _warmup(ours, device, calls=1)
        # the bare matrix multiply of the same shape: everything already on the device in float32
        q_all = torch.from_numpy(np.concatenate(qs, 1)).to(device)
        g_all = torch.from_numpy(np.concatenate([np.asarray(g, np.float32) for g in gs], 1)).to(device)
        cases = {"ours": ours, "matmul": lambda: torch.mm(q_all, g_all.T)}
        if a.baseline:
            def original():
                for q0 in range(0, a.queries, 4):
                    (q_all[q0:q0 + 4] @ g_all.T).topk(5, dim=1)
            cases["baseline"] = original
        _warmup(cases["matmul"], device, calls=1)
        t = interleaved(cases, device, a.rounds)
        pairs = a.queries * a.gallery
        out = dict(what="knn", queries=a.queries, gallery=a.gallery, dim=dtot, models=a.models, device=str(device),
                   pairs_s=round(pairs / t["ours"]), matmul_pairs_s=round(pairs / t["matmul"]),
                   ratio_to_matmul=round(t["matmul"] / t["ours"], 3), peak_mib=round(mem.peak_mib, 1),
                   bound_mib=round(bound_mib, 1), warmup_s=round(warm, 2))
        if a.baseline:
            out |= dict(baseline_pairs_s=round(pairs / t["baseline"]), ratio=round(t["baseline"] / t["ours"], 3))
        emit(**out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _knn_faiss(a, qs, gs, device, tmp):
    """faiss (a.faiss, the factory) against exact search on the same vectors: recall@5 of the
    codes and of the exact shortlist, build time, search throughput and peak memory, index size."""
    t0 = time.perf_counter()
    with PeakMemory(device) as build_mem:
        fg = retrieval.faiss_index(gs, a.faiss)
    build_s = time.perf_counter() - t0
    fg.save(os.path.join(tmp, "index.faiss"))
    index_mib = os.path.getsize(os.path.join(tmp, "index.faiss")) / 2**20
    _, exact = retrieval.topk_cosine(qs, gs, 5, device=device)

    def search(rerank):
        return lambda: retrieval.faiss_search(fg, qs, 5, a.nprobe, device=device, rerank=rerank, gallery=gs,
                                              ef_search=a.ef)
    cases = {"exact": lambda: retrieval.topk_cosine(qs, gs, 5, device=device), "codes": search(0),
             "shortlist": search(a.rerank)}
    with PeakMemory(device) as mem:
        found = {k: cases[k]()[1] for k in ("codes", "shortlist")}
    t = interleaved(cases, device, a.rounds)
    recall = {k: float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(exact, f)])) for k, f in found.items()}
    emit(what="knn_faiss", factory=a.faiss, nprobe=a.nprobe, ef=a.ef, rerank=a.rerank, queries=a.queries,
         gallery=a.gallery, dim=a.dim * a.models, clusters=a.clusters, noise=a.noise, device=str(device),
         recall5_codes=round(recall["codes"], 4), recall5_shortlist=round(recall["shortlist"], 4),
         build_s=round(build_s, 2), build_peak_mib=round(build_mem.peak_mib, 1), index_mib=round(index_mib, 1),
         exact_q_s=round(a.queries / t["exact"], 1), codes_q_s=round(a.queries / t["codes"], 1),
         shortlist_q_s=round(a.queries / t["shortlist"], 1), search_peak_mib=round(mem.peak_mib, 1))


# ---------------------------------------------------------------- ranks

def cmd_ranks(a):
    """Whole predict.py runs (folders, --save-index: the gallery and the queries embedded) in one
    process against --nproc torchrun ranks on this machine, interleaved rounds, fresh caches each."""
    import subprocess
    tmp = tempfile.mkdtemp(prefix="bench_ranks_")
    try:
        gal = os.path.join(tmp, "gallery")
        paths = make_jpegs(tmp, a.images, min_size=a.image_size, max_size=2 * a.image_size)
        for i, p in enumerate(paths):  # 8 "landmarks"
            os.makedirs(os.path.join(gal, f"l{i % 8}"), exist_ok=True)
            os.rename(p, os.path.join(gal, f"l{i % 8}", os.path.basename(p)))
        qdir = os.path.join(tmp, "queries")
        shutil.copytree(os.path.join(gal, "l0"), qdir)
        net = build_model(a.enet_type, 8, pretrained=False)
        ckpt = os.path.join(tmp, "model.pth")
        torch.save({"model_state_dict": net.state_dict()}, ckpt)
        spec = os.path.join(tmp, "spec.json")
        with open(spec, "w") as f:
            json.dump({"models": [{"enet_type": a.enet_type, "checkpoint": ckpt, "image_size": a.image_size}]}, f)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

        def cmd(kind, k):
            args = ["predict.py", "--spec", spec, "--gallery-dir", gal, "--query-dir", qdir, "--device", "cpu",
                    "--batch-size", str(a.batch_size), "--num-workers", str(a.workers),
                    "--out", os.path.join(tmp, f"{kind}{k}.csv"), "--save-index", os.path.join(tmp, f"{kind}{k}"),
                    "--cache-dir", os.path.join(tmp, f"cache_{kind}{k}")]
            if kind == "one":
                return [sys.executable, *args]
            return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.nproc}", *args]
        times, k = {"one": [], "ranks": []}, 0
        for _ in range(a.rounds):
            for kind in times:
                k += 1
                t0 = time.perf_counter()
                subprocess.run(cmd(kind, k), cwd=root, check=True, capture_output=True)
                times[kind].append(time.perf_counter() - t0)
        one, ranks = statistics.median(times["one"]), statistics.median(times["ranks"])
        n = a.images + len(os.listdir(qdir))
        emit(what="ranks", images=n, enet_type=a.enet_type, image_size=a.image_size, nproc=a.nproc,
             cores=len(os.sched_getaffinity(0)), one_s=round(one, 2), ranks_s=round(ranks, 2),
             one_img_s=round(n / one, 2), ranks_img_s=round(n / ranks, 2), ratio=round(one / ranks, 3),
             rounds=a.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_onnx(a):
    """export.py's ONNX file in onnxruntime against PyTorch (eager, fp32, channels-last, the same
    threads) on one uint8 batch: the serving path's throughput, one process, CPU."""
    import onnxruntime as ort

    import export
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    net = build_model(a.enet_type, a.out_dim, pretrained=False).eval()
    net.metric_classify.normalize_weight_()  # as predict.load_model gives export.py its model
    tmp = tempfile.mkdtemp(prefix="bench_onnx_")
    try:
        path = os.path.join(tmp, "model.onnx")
        t0 = time.perf_counter()
        export.export_one(net, path, a.image_size, {})
        export_s = time.perf_counter() - t0
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).integers(0, 256, (a.batch_size, 3, a.image_size, a.image_size), dtype=np.uint8)
        device = torch.device("cpu")
        # PyTorch as predict.py runs it: channels-last (util.memory_format)
        net = net.to(memory_format=memory_format(device))
        serving, xt = export.Serving(net).eval(), torch.from_numpy(x).to(memory_format=memory_format(device))

        @torch.no_grad()
        def pytorch():
            for _ in range(a.steps):
                serving(xt)

        def onnxruntime():
            for _ in range(a.steps):
                sess.run(["embedding", "cosines"], {"images": x})
        cases = {"onnxruntime": onnxruntime, "pytorch": pytorch}
        warm = {k: _warmup(fn, device, calls=1) for k, fn in cases.items()}
        t = interleaved(cases, device, a.rounds)
        n = a.steps * a.batch_size
        emit(what="onnx", enet_type=a.enet_type, image_size=a.image_size, batch_size=a.batch_size,
             out_dim=a.out_dim, threads=a.threads, ort_version=ort.__version__, export_s=round(export_s, 1),
             img_s=round(n / t["onnxruntime"], 2), pytorch_img_s=round(n / t["pytorch"], 2),
             ratio=round(t["pytorch"] / t["onnxruntime"], 3), warmup_s=round(warm["onnxruntime"], 2),
             file_mib=round(os.path.getsize(path) / 2**20, 1), rounds=a.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    def common(q):
        q.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (median)")
        q.add_argument("--baseline", action="store_true", help="also time the original code's behaviour")

    for name in ("train", "extract"):
        q = sub.add_parser(name)
        common(q)
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
    q = sub.add_parser("loader")
    common(q)
    q.add_argument("--image-size", type=int, required=True)
    q.add_argument("--data-dir", default=None, help="GLDv2 layout (train.csv + train/a/b/c/) or any folder of .jpg")
    q.add_argument("--make", type=int, default=0, metavar="N", help="write N GLDv2-sized JPEGs first (synthetic.py)")
    q.add_argument("--workers", type=int, default=0, help="0: in this process, i.e. one core")
    q.add_argument("--images", type=int, default=256, help="images per timed round")
    q.add_argument("--batch-size", type=int, default=32)
    q = sub.add_parser("knn")
    common(q)
    q.add_argument("--queries", type=int, required=True)
    q.add_argument("--gallery", type=int, required=True)
    q.add_argument("--dim", type=int, required=True, help="embedding width of one model")
    q.add_argument("--models", type=int, default=1, help="models of the ensemble (their embeddings concatenated)")
    q.add_argument("--device", default=default_device)
    q.add_argument("--query-chunk", type=int, default=4096)
    q.add_argument("--gallery-chunk", type=int, default=32768)
    q.add_argument("--clusters", type=int, default=0, help="gallery and queries around K centres (default: uniform)")
    q.add_argument("--noise", type=float, default=0.5, help="with --clusters: the spread around a centre")
    q.add_argument("--faiss", default=None, metavar="FACTORY", help="faiss against exact search, e.g. IVF1024,PQ64")
    q.add_argument("--nprobe", type=int, default=retrieval.FAISS_NPROBE)
    q.add_argument("--ef", type=int, default=retrieval.FAISS_EF_SEARCH, help="HNSW efSearch")
    q.add_argument("--rerank", type=int, default=retrieval.FAISS_RERANK, help="the shortlist scored exactly")
    q = sub.add_parser("ranks")
    q.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    q.add_argument("--images", type=int, default=400)
    q.add_argument("--nproc", type=int, default=2)
    q.add_argument("--enet-type", default="tf_efficientnet_lite0")
    q.add_argument("--image-size", type=int, default=256)
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--workers", type=int, default=1, help="loader workers asked of each process")
    q = sub.add_parser("onnx")
    q.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (median)")
    q.add_argument("--enet-type", default="tf_efficientnet_lite0")
    q.add_argument("--image-size", type=int, default=256)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--steps", type=int, default=4, help="batches per timed round")
    q.add_argument("--out-dim", type=int, default=81313, help="classes of the ArcFace head")
    q.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="compute threads of both")
    bench_transfer.add_parser(sub)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.cmd == "transfer":
        return bench_transfer.cmd_transfer(a, emit)
    {"train": cmd_train, "extract": cmd_extract, "loader": cmd_loader, "knn": cmd_knn, "ranks": cmd_ranks,
     "onnx": cmd_onnx}[a.cmd](a)


if __name__ == "__main__":
    main()
