"""Shared fixtures: one synthetic data set and one trained DDP run per session."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test's workers share the machine's cores: one thread each (as the subprocesses of run() below),
    # set before torch is imported; two workers of two threads each on 2 cores run slower than one
    os.environ["OMP_NUM_THREADS"] = "1"

TINY_BACKBONE = "mobilenetv3_small_050"  # timm, has fused BatchNormAct2d layers, fast on CPU


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (make test: -n 2 --dist loadgroup) the tests of the `trained` model run on one
    worker: it is the slowest fixture (24 epochs), and each worker would train its own."""
    for item in items:
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("trained"))


def free_port():
    """A TCP port free right now: two test runs on one machine must not share a rendezvous port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, cwd, env=None, timeout=600):
    e = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A small synthetic GLDv2 (train/, test/, csvs) with train_0.csv and idx2landmark_id.pkl."""
    import preprocess
    import synthetic
    d = str(tmp_path_factory.mktemp("gld"))
    synthetic.generate(d, classes=36, clean_classes=24, test=40, min_size=48, max_size=96, seed=1, non_landmark_set=20)
    preprocess.main(["--train-csv", os.path.join(d, "train_competition.csv"), "--out-dir", d])
    return d


def train_cmd(data_dir, kernel, step, *extra, size=32, epochs=1):
    return ["train.py", "--kernel-type", kernel, "--train-step", str(step), "--data-dir", data_dir,
            "--image-size", str(size), "--enet-type", TINY_BACKBONE, "--batch-size", "8",
            "--num-workers", "0", "--n-epochs", str(epochs), "--no-pretrained",
            "--folds-csv", os.path.join(data_dir, "train_0.csv"),
            "--model-dir", os.path.join(data_dir, "weights"), "--log-dir", os.path.join(data_dir, "logs"), *extra]


@pytest.fixture(scope="session")
def ddp_run(synth):
    """Step 0 trained for one epoch by 2 gloo processes through torch.distributed.launch."""
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", f"--master_port={free_port()}",
           *train_cmd(synth, "ddp0", 0, "--fold", "0")]
    p = run(cmd, cwd=ROOT)
    return {"data": synth, "kernel": "ddp0", "stdout": p.stdout, "stderr": p.stderr}


@pytest.fixture(scope="session")
def stage1(ddp_run):
    """Step 1 (clean classes, new head) from the DDP step-0 checkpoint, one process."""
    d = ddp_run["data"]
    w = os.path.join(d, "weights")
    run([sys.executable, *train_cmd(d, "s1", 1, "--load-from", os.path.join(w, "ddp0_fold0.pth"),
                                    "--save-epochs", "1", size=40)], cwd=ROOT)
    return {"data": d, "checkpoint": os.path.join(w, "s1_fold0_final.pth"), "image_size": 40}


@pytest.fixture(scope="session")
def trained(synth):
    """A small model that has learnt something: resnet10t, step 0 then step 1, one process."""
    w = os.path.join(synth, "weights")
    common = ["--enet-type", "resnet10t", "--batch-size", "16", "--n-epochs", "12"]
    run([sys.executable, *train_cmd(synth, "r0", 0, size=48), *common], cwd=ROOT)
    run([sys.executable, *train_cmd(synth, "r1", 1, "--load-from", os.path.join(w, "r0_fold0_final.pth"), size=64),
         *common], cwd=ROOT)
    return {"data": synth, "checkpoint": os.path.join(w, "r1_fold0_final.pth"), "image_size": 64,
            "enet_type": "resnet10t"}


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """Gallery folders (clean classes, one folder per landmark), a query folder, and a model trained on them."""
    import preprocess
    import synthetic
    import pandas as pd
    t = tmp_path_factory.mktemp("photos")
    d = str(t / "gld")
    synthetic.generate(d, classes=8, clean_classes=6, test=12, min_size=40, max_size=64, seed=9)
    clean = pd.read_csv(os.path.join(d, "train_competition.csv"), dtype={"id": str})
    g = t / "gallery"
    for i, lid in zip(clean["id"], clean["landmark_id"]):
        (g / f"Place {lid}").mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(d, "train", i[0], i[1], i[2], f"{i}.jpg"), g / f"Place {lid}" / f"{i}.jpg")
    q = t / "queries"
    for k, i in enumerate(pd.read_csv(os.path.join(d, "sample_submission.csv"), dtype={"id": str})["id"]):
        (q / f"day{k % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(d, "test", i[0], i[1], i[2], f"{i}.jpg"), q / f"day{k % 2}" / f"{i}.jpg")
    out = str(t / "model")
    preprocess.main(["--from-folder", str(g), "--out-dir", out])
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "train.py", "--kernel-type", "p", "--train-step", "0", "--data-dir", out,
                        "--folds-csv", os.path.join(out, "train_0.csv"), "--model-dir", out, "--log-dir", out,
                        "--enet-type", TINY_BACKBONE, "--no-pretrained", "--num-workers", "0", "--batch-size", "8",
                        "--image-size", "32", "--n-epochs", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    spec = t / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": TINY_BACKBONE, "checkpoint": os.path.join(out, "p_fold0_final.pth"),
                                            "image_size": 32}]}))
    return {"t": t, "gallery": str(g), "queries": str(q), "labels": os.path.join(out, "idx2landmark_id.json"),
            "spec": str(spec), "n_queries": len(list(q.rglob("*.jpg")))}
