"""scripts/bench.py runs (on CPU here, tiny sizes): the GPU harness does not rot between GPU sessions."""
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench  # noqa: E402


def test_bench_runs_on_cpu(capsys):
    bench.bench_train("resnet10t", 32, 2, "bf16", rounds=1, out_dim=20, iters=1)
    bench.bench_extract("resnet10t", 32, 2, rounds=1, out_dim=20, iters=1)
    out = capsys.readouterr().out
    assert "head fp32" in out and "head autocast" in out and "per step" in out
    assert all(f"{p} " in out for p in ("fp32", "bf16", "fp16"))
