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

Each family of benchmarks is a module of its own with add_parser(sub, common,
default_device), which registers its subcommands and their `run`:
bench_train.py (train, extract), bench_loader.py (loader), bench_knn.py (knn),
bench_inference.py (ranks, onnx), bench_transfer.py (transfer); the harness
(JSON lines, interleaved rounds, peak memory) is benchkit.py. Each module's
docstring says what its baseline reproduces of the original code.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_inference  # noqa: E402
import bench_knn  # noqa: E402
import bench_loader  # noqa: E402
import bench_train  # noqa: E402
import bench_transfer  # noqa: E402
from util import ArgumentParser  # noqa: E402

FAMILIES = (bench_train, bench_loader, bench_knn, bench_inference, bench_transfer)


def parse_args(argv=None):
    import torch
    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (median)")
        q.add_argument("--baseline", action="store_true", help="also time the original code's behaviour")
    for family in FAMILIES:
        family.add_parser(sub, common, "cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    return a.run(a)


if __name__ == "__main__":
    main()
