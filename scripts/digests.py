"""Digests of what users get, to show that a change of the code changes none of it.

    python scripts/digests.py WORK_DIR [--out digests.json] [--compare REFERENCE.json] [--no-run]

Runs the CLIs on a small synthetic GLDv2 in WORK_DIR (replaced; about 2 minutes on 2 cores, one
thread a process): train.py (step 0, step 1 from it, and --recipe finetune on folders), predict.py
on the GLDv2 layout (the submission, its parts, --non-landmark with a CSV and auto, the report),
predict.py on folders (predictions.csv, --save-index, --retrieval-ranks, --add-to-index, --knn faiss,
--backbone without training, the report) and evaluate.py --report. Prints one SHA-1 per output;
--compare names every output whose digest differs from REFERENCE's and exits 1.

What is digested: CSV, HTML and JSON files byte for byte (WORK_DIR written as '<work>'); a checkpoint by its tensors (weights, optimizer state) and
epoch; a saved index's .npz by its arrays (the zip's time stamps are not content); logs not at
all (they hold times); an index's checkpoint SHA-1s left out (torch.save writes a new id into every
file). Compare runs on one machine (floating-point results differ in the last bits with the CPU).
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "mobilenetv3_small_050"


def sha1(data):
    return hashlib.sha1(data).hexdigest()


def digest_text(path, work):
    with open(path, "rb") as f:
        data = f.read().replace(os.path.abspath(work).encode(), b"<work>")
    # torch.save writes a new serialization id into every file: a checkpoint's SHA-1 (an index records
    # it) differs between two trainings of the same weights, which digest_checkpoint compares
    return sha1(re.sub(rb'"checkpoint_sha1": "[0-9a-f]{40}"', b'"checkpoint_sha1": "-"', data))


def digest_checkpoint(path):
    import torch
    ck = torch.load(path, map_location="cpu", weights_only=True)
    h = hashlib.sha1(str(ck.get("epoch")).encode())

    def walk(obj, key=""):
        if isinstance(obj, torch.Tensor):
            h.update(key.encode())
            h.update(obj.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")
        elif isinstance(obj, (int, float, bool, str)) and key.startswith(("/optimizer_state_dict", "/out_dim")):
            h.update(f"{key}={obj!r}".encode())
    walk({k: ck[k] for k in ("model_state_dict", "optimizer_state_dict", "scaler_state_dict", "out_dim") if k in ck})
    return h.hexdigest()


def digest_npz(path):
    h = hashlib.sha1()
    with np.load(path, allow_pickle=False) as z:
        for k in sorted(z.files):
            a = z[k]
            h.update(f"{k}|{a.dtype}|{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def digest(path, work):
    if path.endswith(".pth"):
        return digest_checkpoint(path)
    if path.endswith(".npz"):
        return digest_npz(path)
    return digest_text(path, work)


def sh(*cmd, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"digests: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout


def produce(w):
    """Every output of the run, as paths relative to w."""
    d, wt = os.path.join(w, "data"), os.path.join(w, "weights")
    sh("-c", f"import synthetic; synthetic.generate({d!r}, classes=12, clean_classes=8, test=24, min_size=48, "
             f"max_size=80, seed=3, non_landmark_set=10)")
    sh("preprocess.py", "--train-csv", f"{d}/train_competition.csv", "--out-dir", d)
    common = ["--data-dir", d, "--folds-csv", f"{d}/train_0.csv", "--model-dir", wt, "--log-dir", f"{w}/logs",
              "--enet-type", TINY, "--no-pretrained", "--num-workers", "0", "--batch-size", "8", "--fold", "0"]
    sh("train.py", "--kernel-type", "s0", "--train-step", "0", "--image-size", "32", "--n-epochs", "2", *common)
    sh("train.py", "--kernel-type", "s1", "--train-step", "1", "--image-size", "40", "--n-epochs", "1",
       "--load-from", f"{wt}/s0_fold0_final.pth", *common)
    sh("train.py", "--kernel-type", "s1b", "--train-step", "1", "--image-size", "32", "--n-epochs", "1",
       "--load-from", f"{wt}/s0_fold0_final.pth", "--pool", "gem", *common)
    with open(f"{w}/spec.json", "w") as f:
        json.dump({"models": [{"enet_type": TINY, "checkpoint": "weights/s1_fold0_final.pth", "image_size": 40},
                              {"enet_type": TINY, "checkpoint": "weights/s1b_fold0_final.pth", "image_size": 32}]}, f)
    pred = ["--data-dir", d, "--train-csv", f"{d}/train_competition.csv", "--idx2landmark",
            f"{d}/idx2landmark_id.json", "--spec", f"{w}/spec.json", "--cache-dir", f"{w}/cache",
            "--num-workers", "0"]
    sh("predict.py", *pred, "--out", f"{w}/sub.csv", "--write-parts", "--non-landmark", f"{d}/non_landmark.csv",
       "--report", f"{w}/report.html", "--solution", f"{d}/solution.csv")
    sh("predict.py", *pred, "--out", f"{w}/sub_auto.csv", "--non-landmark", "auto", "--write-parts")
    sh("evaluate.py", "--submission", f"{w}/sub.csv", "--solution", f"{d}/solution.csv", "--report",
       f"{w}/eval_report.html", "--data-dir", d, "--train-csv", f"{d}/train_competition.csv")

    # your own photos: the same images as folders
    ph = f"{w}/photos"
    sh("scripts/as_folders.py", "split", d, f"{d}/train_competition.csv", ph)
    g, q = f"{ph}/gallery", f"{ph}/queries"
    folders = ["--spec", f"{w}/spec.json", "--idx2landmark", f"{d}/idx2landmark_id.json", "--num-workers", "0"]
    sh("predict.py", *folders, "--gallery-dir", g, "--query-dir", q, "--out", f"{w}/pred.csv", "--save-index",
       f"{w}/index", "--retrieval-ranks", f"{w}/ranks.csv", "--write-parts", "--report", f"{w}/folder_report.html")
    # an index of half the gallery, grown with --add-to-index, then answered from with faiss
    half = f"{w}/half"
    for lm in sorted(os.listdir(g))[::2]:
        shutil.copytree(os.path.join(g, lm), os.path.join(half, lm))
    sh("predict.py", *folders, "--gallery-dir", half, "--save-index", f"{w}/grown")
    sh("predict.py", *folders, "--index", f"{w}/grown", "--gallery-dir", g, "--add-to-index")
    sh("predict.py", *folders, "--index", f"{w}/grown", "--query-dir", q, "--out", f"{w}/pred_faiss.csv",
       "--knn", "faiss", "--non-landmark", "auto", "--save-index", f"{w}/grown_faiss")
    # without training: a backbone with seeded weights standing in for ImageNet's
    sh("-c", "import torch, timm; torch.manual_seed(0); "
             f"torch.save(timm.create_model('resnet10t').state_dict(), {w + '/backbone.pth'!r})")
    sh("predict.py", "--backbone", "resnet10t", "--pretrained-path", f"{w}/backbone.pth", "--image-size", "48",
       "--whiten", "pca", "--gallery-dir", g, "--query-dir", q, "--out", f"{w}/pred_zero.csv", "--save-index",
       f"{w}/zero", "--num-workers", "0", "--report", f"{w}/zero_report.html")
    # --recipe finetune on the folders
    sh("preprocess.py", "--from-folder", g, "--out-dir", f"{w}/ft")
    sh("train.py", "--kernel-type", "ft", "--train-step", "0", "--data-dir", f"{w}/ft", "--folds-csv",
       f"{w}/ft/train_0.csv", "--model-dir", f"{w}/ft", "--log-dir", f"{w}/ft", "--enet-type", "resnet10t",
       "--pretrained-path", f"{w}/backbone.pth", "--recipe", "finetune", "--image-size", "48", "--n-epochs", "2",
       "--batch-size", "8", "--num-workers", "0")
    return outputs(w)


def outputs(w):
    return sorted(os.path.relpath(os.path.join(dp, f), w) for dp, _, fs in os.walk(w) for f in fs
                  if dp.startswith((w + "/weights", w + "/ft")) and f.endswith(".pth")
                  or (dp == w and f.endswith((".csv", ".html", ".npz", ".json")))
                  or dp == w + "/ft" and f.endswith(".json") and "args" not in f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work")
    p.add_argument("--out", default=None, help="write the digests as JSON here")
    p.add_argument("--compare", default=None, help="a JSON of digests to compare with")
    p.add_argument("--no-run", action="store_true", help="digest what WORK_DIR holds, without running anything")
    a = p.parse_args(argv)
    w = os.path.abspath(a.work)
    if not a.no_run:
        shutil.rmtree(w, ignore_errors=True)
        os.makedirs(w)
    out = {rel: digest(os.path.join(w, rel), w) for rel in (outputs(w) if a.no_run else produce(w))}
    for k, v in out.items():
        print(f"{v}  {k}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
    if a.compare:
        with open(a.compare) as f:
            ref = json.load(f)
        diff = sorted(k for k in set(ref) | set(out) if ref.get(k) != out.get(k))
        for k in diff:
            print(f"differs: {k} ({ref.get(k, 'absent')} -> {out.get(k, 'absent')})")
        print(f"{len(out)} outputs, {len(diff)} differ from {a.compare}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
