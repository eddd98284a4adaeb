"""scripts/bench.py: every subcommand runs on CPU at tiny sizes and prints one JSON line whose figures agree
with each other and with what can be computed directly. No speed is asserted here: speed is measured by
scripts/bench.py itself and recorded in docs/performance.md."""
import json
import os
import sys

import pytest

from conftest import ROOT, TINY_BACKBONE

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench  # noqa: E402
import bench_loader  # noqa: E402


def _run(capsys, *argv):
    bench.main(list(argv))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    return lines[0]


def _ratio(r, key, num, den):
    """A ratio of two timings is the ratio of the two throughputs printed beside it (both rounded)."""
    assert r[key] == pytest.approx(r[num] / r[den], rel=0.02, abs=0.002), r


def test_train_and_extract(capsys):
    import train
    import features
    import util
    small = ["--enet-type", "resnet10t", "--image-size", "32", "--batch-size", "2", "--steps", "2",
             "--out-dim", "20", "--rounds", "1", "--device", "cpu", "--baseline"]
    r = _run(capsys, "train", *small, "--compare-head", "--compare-format")
    assert r["what"] == "train" and r["batch_size"] == 2 and r["amp"] == "auto"
    _ratio(r, "ratio", "img_s", "baseline_img_s")
    _ratio(r, "format_ratio", "img_s", "contiguous_img_s")
    assert 1 + r["head_fp32_cost"] == pytest.approx(r["head_autocast_img_s"] / r["img_s"], rel=0.02, abs=0.002)
    r = _run(capsys, "extract", *small, "--compare-format")
    assert r["what"] == "extract" and r["precision"] == "fp32"
    _ratio(r, "ratio", "img_s", "baseline_img_s")
    _ratio(r, "format_ratio", "img_s", "contiguous_img_s")
    # nothing patched: the contiguous runs passed their format, the timed runs switched their bars off
    assert train.memory_format is util.memory_format and features.memory_format is util.memory_format
    assert train.tqdm.__module__.startswith("tqdm")


def test_onnx(capsys):
    pytest.importorskip("onnxruntime", reason="export.py's dependencies (requirements-test.txt)")
    pytest.importorskip("onnxscript", reason="torch.onnx.export's dynamo exporter needs onnxscript")
    from models import build_model
    r = _run(capsys, "onnx", "--enet-type", TINY_BACKBONE, "--image-size", "32", "--batch-size", "2", "--steps", "1",
             "--out-dim", "10", "--rounds", "1", "--threads", "1")
    assert r["what"] == "onnx"
    _ratio(r, "ratio", "img_s", "pytorch_img_s")
    # the file holds the weights in float32, and little else
    weights_mib = sum(p.numel() for p in build_model(TINY_BACKBONE, 10).state_dict().values()) * 4 / 2**20
    assert weights_mib * 0.95 <= r["file_mib"] <= weights_mib * 1.2 + 0.1, (r["file_mib"], weights_mib)


def test_loader(capsys, tmp_path):
    paths = bench_loader.make_jpegs(str(tmp_path), 4, min_size=600, max_size=1024)
    import cv2
    assert all(600 <= max(cv2.imread(p).shape[:2]) <= 1024 for p in paths)
    r = _run(capsys, "loader", "--image-size", "64", "--data-dir", str(tmp_path), "--rounds", "1", "--baseline")
    assert r["what"] == "loader" and r["images"] == 4 and r["img_s_per_core"] == r["img_s"]
    _ratio(r, "ratio", "img_s", "baseline_img_s")
    r = _run(capsys, "loader", "--image-size", "64", "--make", "3", "--rounds", "1", "--workers", "2")
    assert r["images"] == 3 and "ratio" not in r
    assert r["img_s_per_core"] == pytest.approx(r["img_s"] / 2, abs=0.01)


def test_knn(capsys):
    r = _run(capsys, "knn", "--queries", "40", "--gallery", "2000", "--dim", "32", "--models", "2",
             "--gallery-chunk", "700", "--rounds", "1", "--device", "cpu", "--baseline")
    assert r["what"] == "knn" and r["dim"] == 64
    _ratio(r, "ratio_to_matmul", "pairs_s", "matmul_pairs_s")
    _ratio(r, "ratio", "pairs_s", "baseline_pairs_s")
    # topk_cosine's bound: the queries, one float32 gallery chunk, one similarity block, one float16 staging chunk
    assert r["bound_mib"] == pytest.approx((40 * 64 * 4 + 700 * 64 * 4 + 40 * 700 * 4 + 700 * 32 * 2) / 2**20, abs=0.05)


def test_knn_memory_bound(capsys):
    """Peak memory within the queries + one chunk + 10 %: the gallery (40,000 x 256 x 2 bytes) is never whole
    in memory."""
    r = _run(capsys, "knn", "--queries", "600", "--gallery", "40000", "--dim", "256", "--gallery-chunk", "8192",
             "--rounds", "1", "--device", "cpu")
    assert r["peak_mib"] <= 1.1 * r["bound_mib"] + 4, r


def test_knn_faiss(capsys):
    """Flat finds exact search's neighbours; an IVF-PQ on a clustered gallery finds fewer from its
    codes, and its exact shortlist gets back at least as many."""
    pytest.importorskip("faiss", reason="faiss-cpu (requirements-test.txt)")
    small = ["--queries", "50", "--gallery", "3000", "--dim", "32", "--clusters", "100", "--rounds", "1",
             "--device", "cpu"]
    r = _run(capsys, "knn", *small, "--faiss", "Flat")
    assert r["what"] == "knn_faiss" and r["recall5_codes"] == r["recall5_shortlist"] == 1.0
    assert r["index_mib"] == pytest.approx(3000 * 32 * 4 / 2**20, abs=0.06)  # the vectors, float32 (0.1 MiB rounding)
    r = _run(capsys, "knn", *small, "--faiss", "IVF8,PQ4x4fs", "--nprobe", "8", "--rerank", "40")
    assert 0 < r["recall5_codes"] < r["recall5_shortlist"] and r["recall5_shortlist"] > 0.9
    assert r["index_mib"] < 3000 * 32 * 4 / 2**20


def test_ranks(capsys):
    r = _run(capsys, "ranks", "--images", "12", "--rounds", "1", "--enet-type", TINY_BACKBONE, "--image-size", "32",
             "--batch-size", "4", "--workers", "0")
    assert r["what"] == "ranks" and r["nproc"] == 2 and r["images"] == 12 + 2
    _ratio(r, "ratio", "ranks_img_s", "one_img_s")
