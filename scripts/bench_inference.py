"""`scripts/bench.py ranks` and `onnx`: whole predict.py runs in one process against torchrun ranks,
and export.py's file in onnxruntime (CPU) against PyTorch eager on the same uint8 batch, both
computing the embedding and the class cosines (export.Serving)."""
import json
import shutil
import statistics
import tempfile
import time
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_loader import make_jpegs  # noqa: E402
from benchkit import emit, interleaved, warmup  # noqa: E402
from models import build_model  # noqa: E402
from util import memory_format  # noqa: E402


def add_parser(sub, common, default_device):
    q = sub.add_parser("ranks", help="predict.py in one process against torchrun ranks")
    q.set_defaults(run=cmd_ranks)
    q.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    q.add_argument("--images", type=int, default=400)
    q.add_argument("--nproc", type=int, default=2)
    q.add_argument("--enet-type", default="tf_efficientnet_lite0")
    q.add_argument("--image-size", type=int, default=256)
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--workers", type=int, default=1, help="loader workers asked of each process")
    q = sub.add_parser("onnx", help="export.py's file in onnxruntime against PyTorch")
    q.set_defaults(run=cmd_onnx)
    q.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (median)")
    q.add_argument("--enet-type", default="tf_efficientnet_lite0")
    q.add_argument("--image-size", type=int, default=256)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--steps", type=int, default=4, help="batches per timed round")
    q.add_argument("--out-dim", type=int, default=81313, help="classes of the ArcFace head")
    q.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="compute threads of both")


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
    net.metric_classify.normalize_weight_()  # as ensemble.load_model gives export.py its model
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
        warm = {k: warmup(fn, device, calls=1) for k, fn in cases.items()}
        t = interleaved(cases, device, a.rounds)
        n = a.steps * a.batch_size
        emit(what="onnx", enet_type=a.enet_type, image_size=a.image_size, batch_size=a.batch_size,
             out_dim=a.out_dim, threads=a.threads, ort_version=ort.__version__, export_s=round(export_s, 1),
             img_s=round(n / t["onnxruntime"], 2), pytorch_img_s=round(n / t["pytorch"], 2),
             ratio=round(t["pytorch"] / t["onnxruntime"], 3), warmup_s=round(warm["onnxruntime"], 2),
             file_mib=round(os.path.getsize(path) / 2**20, 1), rounds=a.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
