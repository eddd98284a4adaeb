"""`scripts/bench.py transfer`: how well a pretrained backbone transfers to your own photos, with and without training.

    python scripts/bench.py transfer --photos DIR [--distractors DIR] --enet-type T --pretrained-path W
        [--query-frac 0.25 | --gallery-per-landmark N] [--seeds 0,1,2] [--runs zero,original,finetune]

DIR holds one folder per landmark. Per seed, a fixed share of each landmark's
photos (drawn by the seed) become queries and the rest the gallery, which is
also what the models train on; the distractors become queries of no landmark.
Each run goes through the real command lines, as a user would:

- zero:     predict.py --backbone (no training: retrieval on the pooled features);
- original: preprocess.py --from-folder, train.py with the original's step-1 recipe (new neck and head on the
            ImageNet backbone, lr 1e-4, x10 warm-up, every layer trained, fold 0 held out), predict.py --spec;
- finetune: the same with train.py --recipe finetune;

then evaluate.py's scorer (evaluate.evaluate, in this process) on each of predict.py's outputs. One JSON line per run and
seed (`retrieval`, `classifier`, `ensemble` GAP, every guess kept; with the calibrated confidence, at
predict.py's --min-confidence: `precision`, `coverage`, `distractors_answered`, and `ece`, the expected
calibration error in 10 bins; `seconds`), then one line per run with the means over the seeds
(`what: transfer_mean`).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import calibration as cal  # noqa: E402
import evaluate  # noqa: E402
from gallery import list_images  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from as_folders import _link  # noqa: E402  (hard link, or a copy across file systems)
from benchkit import emit  # noqa: E402

RUNS = ("zero", "original", "finetune")


def add_parser(sub, common=None, default_device=None):
    q = sub.add_parser("transfer", help="real-photo transfer: zero training vs the original recipe vs --recipe finetune")
    q.set_defaults(run=cmd_transfer)
    q.add_argument("--photos", required=True, help="one folder per landmark")
    q.add_argument("--distractors", default=None, help="images of no landmark (non-landmark queries)")
    q.add_argument("--enet-type", default="tf_efficientnet_lite0")
    q.add_argument("--pretrained-path", default=None, help="ImageNet weights of --enet-type")
    q.add_argument("--image-size", type=int, default=256)
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--query-frac", type=float, default=0.25, help="share of each landmark's photos that are queries")
    q.add_argument("--gallery-per-landmark", type=int, default=0, metavar="N",
                   help="instead: N gallery photos per landmark, the rest queries (few-shot)")
    q.add_argument("--seeds", default="0,1,2")
    q.add_argument("--runs", default=",".join(RUNS), help=f"any of {','.join(RUNS)}")
    q.add_argument("--original-epochs", type=int, default=6, help="epochs of the original recipe")
    q.add_argument("--train-args", default="", help="more train.py flags for the finetune run (experiments)")
    q.add_argument("--predict-args", default="",
                   help="more predict.py flags for every run, e.g. '--min-confidence 0.6' or '--no-calibrate'")
    q.add_argument("--num-workers", type=int, default=0)
    q.add_argument("--work-dir", default=None, help="keep the runs' files here (default: a temporary folder)")
    return q


def split(photos, distractors, out, seed, query_frac, gallery_per_landmark):
    """out/gallery/<landmark>/, out/queries/<landmark>__<file> and distractor__<file>,
    out/solution.csv (id = the query's file stem; landmark ids = the folders'
    ranks in sorted order, as preprocess.py --from-folder numbers them).
    Returns the landmark names."""
    names = sorted(d for d in os.listdir(photos) if os.path.isdir(os.path.join(photos, d)) and not d.startswith("."))
    rng = np.random.default_rng(seed)
    rows = []
    for lid, name in enumerate(names):
        files = list_images(os.path.join(photos, name))
        files = [files[i] for i in rng.permutation(len(files))]
        if gallery_per_landmark:
            n_q = max(len(files) - gallery_per_landmark, 0)
        else:
            n_q = min(max(1, int(round(query_frac * len(files)))), len(files) - 1)
        for i, f in enumerate(files):
            if i < len(files) - n_q:
                _link(os.path.join(photos, name, f), os.path.join(out, "gallery", name, f))
            else:
                stem = f"{name}__{os.path.splitext(f.replace(os.sep, '_'))[0]}"
                _link(os.path.join(photos, name, f), os.path.join(out, "queries", stem + os.path.splitext(f)[1]))
                rows.append((stem, str(lid)))
    for f in (list_images(distractors) if distractors else []):
        stem = f"distractor__{os.path.splitext(f.replace(os.sep, '_'))[0]}"
        _link(os.path.join(distractors, f), os.path.join(out, "queries", stem + os.path.splitext(f)[1]))
        rows.append((stem, ""))
    pd.DataFrame(rows, columns=["id", "landmarks"]).to_csv(os.path.join(out, "solution.csv"), index=False)
    return names


def _cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench transfer: {' '.join(args[:1])} failed ({p.returncode}):\n{p.stdout[-2000:]}\n"
                         f"{p.stderr[-4000:]}")
    return p.stdout


def _gap(predictions, names, solution):
    """GAP of a predictions.csv through evaluate.py (as a submission of landmark ids)."""
    p = pd.read_csv(predictions, keep_default_na=False, dtype={"landmark": str, "guess": str})
    lid = {n: i for i, n in enumerate(names)}
    named = p["guess"] if "guess" in p.columns else p["landmark"]  # every guess, sure or not: GAP orders them
    sub = pd.DataFrame({"id": [os.path.splitext(x)[0] for x in p["path"]],
                        "landmarks": [f"{lid[lm]} {float(c)!r}" if lm else "" for lm, c in
                                      zip(named, p["confidence"])]})
    path = os.path.splitext(predictions)[0] + "_submission.csv"
    sub.to_csv(path, index=False)
    return evaluate.evaluate(path, solution)[0]  # evaluate.py's scorer, in this process (no torch import per part)


def answered(predictions, names, solution):
    """At the threshold predict.py applied (--min-confidence): precision (answered and right / answered),
    coverage (answered landmark queries / landmark queries), the share of distractors answered, and the
    expected calibration error (10 bins) of the guesses' confidences, and the ECE a perfect calibration
    would score on as many answers of these confidences (its noise floor); {} without a calibration."""
    p = pd.read_csv(predictions, keep_default_na=False, dtype={"landmark": str, "guess": str})
    if "guess" not in p.columns:
        return {}
    lid = {n: str(i) for i, n in enumerate(names)}
    truth = dict(zip(*pd.read_csv(solution, keep_default_na=False, dtype=str)[["id", "landmarks"]].T.values))
    t = np.array([truth[os.path.splitext(x)[0]] for x in p["path"]])
    said = np.array([lid.get(n, "") for n in p["landmark"]])
    guess = np.array([lid.get(n, "") for n in p["guess"]])
    on, landmark = said != "", t != ""
    right = on & (said == t)
    return dict(precision=round(float(right.sum() / max(on.sum(), 1)), 4),
                coverage=round(float((on & landmark).sum() / max(landmark.sum(), 1)), 4),
                distractors_answered=round(float((on & ~landmark).sum() / max((~landmark).sum(), 1)), 4),
                ece=round(cal.expected_calibration_error(p["confidence"].to_numpy(), guess == t), 4),
                ece_floor=round(cal.ece_noise_floor(p["confidence"].to_numpy()), 4))


def run_one(run, a, work, names):
    """One run on one split: its GAPs (None where it has no such output)."""
    g, q = os.path.join(work, "gallery"), os.path.join(work, "queries")
    out = os.path.join(work, run)
    os.makedirs(out, exist_ok=True)
    common = ["--gallery-dir", g, "--query-dir", q, "--num-workers", str(a.num_workers), "--write-parts",
              "--out", os.path.join(out, "predictions.csv"), *a.predict_args.split()]
    if run == "zero":
        _cli("predict.py", "--backbone", a.enet_type, "--image-size", str(a.image_size), *common,
             *(["--pretrained-path", a.pretrained_path] if a.pretrained_path else []))
    else:
        data = os.path.join(work, "data")
        if not os.path.isfile(os.path.join(data, "train_0.csv")):
            _cli("preprocess.py", "--from-folder", g, "--out-dir", data)
        train = ["train.py", "--kernel-type", run, "--train-step", "0", "--data-dir", data,
                 "--folds-csv", os.path.join(data, "train_0.csv"), "--image-size", str(a.image_size),
                 "--enet-type", a.enet_type, "--batch-size", str(a.batch_size), "--num-workers", str(a.num_workers),
                 "--model-dir", os.path.join(out, "weights"), "--log-dir", os.path.join(out, "logs"),
                 "--seed", str(a.seed), "--overwrite"]
        train += ["--pretrained-path", a.pretrained_path] if a.pretrained_path else []
        if run == "original":
            train += ["--n-epochs", str(a.original_epochs)]
        else:
            train += ["--recipe", "finetune", *a.train_args.split()]
        _cli(*train)
        spec = os.path.join(out, "spec.json")
        with open(spec, "w") as f:
            json.dump({"models": [{"enet_type": a.enet_type, "checkpoint": os.path.join(out, "weights",
                                   f"{run}_fold0_final.pth"), "image_size": a.image_size}]}, f)
        _cli("predict.py", "--spec", spec, "--idx2landmark", os.path.join(data, "idx2landmark_id.json"), *common)
    solution = os.path.join(work, "solution.csv")
    res = {}
    for part, name in (("retrieval", "predictions_retrieval.csv"), ("classifier", "predictions_classifier.csv"),
                       ("ensemble", "predictions.csv")):
        path = os.path.join(out, name)
        res[part] = round(_gap(path, names, solution), 4) if os.path.isfile(path) and (
            run != "zero" or part == "retrieval") else None
    if run == "zero":  # no classifier: its answer is retrieval's, with the calibrated confidence
        res["ensemble"] = round(_gap(os.path.join(out, "predictions.csv"), names, solution), 4)
    return res | answered(os.path.join(out, "predictions.csv"), names, solution)


def cmd_transfer(a, emit=emit):
    runs = [r for r in a.runs.split(",") if r]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise SystemExit(f"bench transfer: --runs {bad[0]}: expected some of {','.join(RUNS)}")
    if not os.path.isdir(a.photos):
        raise SystemExit(f"bench transfer: --photos {a.photos}: no such folder")
    root = a.work_dir or tempfile.mkdtemp(prefix="transfer-")
    results = {r: [] for r in runs}
    try:
        for seed in [int(s) for s in a.seeds.split(",") if s.strip()]:
            a.seed = seed
            work = os.path.join(root, f"seed{seed}")
            shutil.rmtree(work, ignore_errors=True)
            names = split(a.photos, a.distractors, work, seed, a.query_frac, a.gallery_per_landmark)
            n_q = len(pd.read_csv(os.path.join(work, "solution.csv")))
            for run in runs:
                t0 = time.time()
                res = run_one(run, a, work, names)
                results[run].append(res)
                emit(what="transfer", run=run, seed=seed, enet_type=a.enet_type, image_size=a.image_size,
                     queries=n_q, gallery=len(list_images(os.path.join(work, "gallery"))), **res,
                     seconds=round(time.time() - t0, 1))
        for run in runs:
            keys = [k for k in results[run][0] if k not in ("seconds",)]
            mean = {k: (round(float(np.mean([r[k] for r in results[run]])), 4) if results[run][0][k] is not None
                        else None) for k in keys}
            emit(what="transfer_mean", run=run, seeds=len(results[run]), **mean)
    finally:
        if not a.work_dir:
            shutil.rmtree(root, ignore_errors=True)
