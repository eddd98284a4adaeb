"""Assign stratified folds to the competition's clean train list.

As the original: reads ./train.csv (id,landmark_id), writes ./train_0.csv (the
input columns plus `fold`, from StratifiedKFold(5, shuffle=True,
random_state=233)) and ./idx2landmark_id.pkl (class index -> landmark_id over
the sorted unique landmark ids), which the original's notebook uses, and the
same map as ./idx2landmark_id.json, which predict.py reads.

GLDv2's own `train_clean.csv` (landmark_id,images with space-separated ids) is
accepted too and expanded to id,landmark_id rows first.

`--check-images --data-dir D` instead scans every image D's CSVs name and
writes the unusable ones to bad_images.csv (id, path, reason), for train.py's
and predict.py's --exclude.
"""
import hashlib
import json
import multiprocessing
import os
import pickle
import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold
from tqdm import tqdm

from dataset import BadImage, image_path, read_csv_checked, read_rgb, worker_init
from gallery import list_images
from util import ArgumentParser, UserError, run_main


def read_clean_list(path):
    """The clean list as id,landmark_id rows (ids as text), checked: a user
    mistake in it is a UserError."""
    df = read_csv_checked(path, ["landmark_id"])
    if "images" in df.columns and "id" not in df.columns:
        # GLDv2 train_clean.csv: one row per landmark, image ids space-separated
        df = (df.assign(id=df["images"].str.split(" ")).explode("id")[["id", "landmark_id"]]
              .reset_index(drop=True))
    if "id" not in df.columns:
        raise UserError(f"{path}: expected columns id,landmark_id (or landmark_id,images), got {list(df.columns)}")
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise UserError(f"{path}: id {dup.iloc[0]} appears more than once")
    return df


def assign_folds(df, n_folds=5, seed=233):
    """Same split as the original: folds from skf.split(df, df.landmark_id) in row order."""
    df = df.reset_index(drop=True).copy()
    fold = np.full(len(df), -1, dtype=np.int64)
    skf = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    rare = int((df["landmark_id"].value_counts() < n_folds).sum())
    with warnings.catch_warnings():  # scikit-learn's "least populated class" warning: our own note below
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for i, (_, valid_idx) in enumerate(skf.split(df, df["landmark_id"])):
            fold[valid_idx] = i
    if rare:
        print(f"note: {rare} landmark(s) have fewer than {n_folds} images, so some validation folds lack them")
    df["fold"] = fold
    return df


def assign_folds_small(df, n_folds=5, seed=233):
    """Folds for a collection where no landmark has n_folds images (StratifiedKFold
    refuses it): each landmark's images in a seeded random order are dealt to
    folds round-robin, continuing from one landmark to the next, so every fold
    gets about the same number of images and of each landmark's."""
    df = df.reset_index(drop=True).copy()
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(df), np.int64)
    nxt = 0
    for _, rows in df.groupby("landmark_id", sort=True).indices.items():
        rows = rng.permutation(rows)
        fold[rows] = (nxt + np.arange(len(rows))) % n_folds
        nxt = (nxt + len(rows)) % n_folds
    df["fold"] = fold
    return df


def idx2landmark_id(landmark_ids):
    return {i: lid for i, lid in enumerate(sorted(pd.unique(np.asarray(landmark_ids)).tolist()))}


def from_folder(root, out_dir, n_folds=5, seed=233, workers=1):
    """A data set from one folder per landmark: root/<landmark name>/**/*.jpg|png|...

    Writes out_dir/train.csv (id, landmark_id, filepath: every image; paths
    relative to root's parent are made absolute), out_dir/train_0.csv (the same
    with folds, the clean list of train.py's steps >= 1 and predict.py's
    gallery), idx2landmark_id.json and landmark_names.json (landmark id ->
    folder name). Landmark ids are the folders' ranks in sorted order; image ids
    are hashes of the paths below root. Returns the frame."""
    if not os.path.isdir(root):
        raise UserError(f"--from-folder {root}: no such folder")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    rows = [(hashlib.sha1(os.path.join(name, rel).encode()).hexdigest()[:16], lid,
             os.path.abspath(os.path.join(root, name, rel)))
            for lid, name in enumerate(names) for rel in list_images(os.path.join(root, name))]
    os.makedirs(out_dir, exist_ok=True)
    # every file decoded (at 1/8 scale for a JPEG): a text file named .jpg is not a photo
    reasons = image_problems([p for _, _, p in rows], workers)
    bad = [(i, p, r) for (i, _, p), r in zip(rows, reasons) if r]
    if bad:
        out = os.path.join(out_dir, "bad_images.csv")
        pd.DataFrame(bad, columns=["id", "path", "reason"]).to_csv(out, index=False)
        first = "; ".join(f"{os.path.relpath(p, root)} ({r})" for _, p, r in bad[:3])
        print(f"{len(bad)} of {len(rows)} files are not readable images, left out: {first}"
              f"{'; ...' if len(bad) > 3 else ''} (all of them in {out})")
        rows = [row for row, r in zip(rows, reasons) if not r]
    if not rows:
        raise UserError(f"--from-folder {root}: no readable images in its subfolders (one folder per landmark: "
                        f"{os.path.join(root, '<landmark name>', '*.jpg')})")
    df = pd.DataFrame(rows, columns=["id", "landmark_id", "filepath"])
    used = sorted(set(df["landmark_id"]))
    empty = [names[i] for i in range(len(names)) if i not in set(used)]
    if empty:
        print(f"warning: {len(empty)} landmark folder(s) with no readable images, left out: "
              f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}")
    df.to_csv(os.path.join(out_dir, "train.csv"), index=False)
    few = df["landmark_id"].value_counts().max() < n_folds  # StratifiedKFold needs one landmark with n_folds
    (assign_folds_small if few else assign_folds)(df, n_folds, seed).to_csv(os.path.join(out_dir, "train_0.csv"),
                                                                            index=False)
    write_label_map(idx2landmark_id(df["landmark_id"]), out_dir)
    with open(os.path.join(out_dir, "landmark_names.json"), "w") as f:
        json.dump({str(i): names[i] for i in used}, f, indent=1, ensure_ascii=False)
    print(f"{len(df)} images, {len(used)} landmarks from {root} -> {out_dir} (train.csv, train_0.csv, "
          f"idx2landmark_id.json, landmark_names.json)")
    return df


def write_label_map(mapping, out_dir):
    """The original's pickle (its notebook reads it), and JSON, which predict.py prefers: it runs no code."""
    with open(os.path.join(out_dir, "idx2landmark_id.pkl"), "wb") as f:
        pickle.dump(mapping, f)
    with open(os.path.join(out_dir, "idx2landmark_id.json"), "w") as f:
        json.dump({str(k): int(v) for k, v in mapping.items()}, f)


def check_image(path):
    """None if `path` is a readable image, else why not (missing, empty, truncated, ...)."""
    try:
        read_rgb(path, min_side=1)  # 1/8-scale decode: the whole file is parsed, little is computed
        return None
    except BadImage as e:
        return e.reason


POOL_MIN_FILES = 1000  # fewer files are checked in this process: spawned workers take seconds to import OpenCV


def image_problems(paths, workers=1):
    """Per path None (a readable image) or why not (check_image), in `workers` processes when there
    are at least POOL_MIN_FILES of them."""
    if workers > 1 and len(paths) >= POOL_MIN_FILES:
        with multiprocessing.get_context("spawn").Pool(workers, initializer=worker_init, initargs=(0,)) as pool:
            return list(tqdm(pool.imap(check_image, paths, chunksize=64), total=len(paths), desc="check images",
                             mininterval=2.0))
    return [check_image(p) for p in tqdm(paths, desc="check images", mininterval=2.0)]


def check_images(data_dir, out_dir, workers):
    """Scan every image that data_dir's CSVs name (train.csv, sample_submission.csv,
    non_landmark.csv) in worker processes; write the bad ones to
    out_dir/bad_images.csv (id, path, reason), which train.py and predict.py
    take as --exclude. Returns that frame."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: no such folder")
    rows = []
    for split, name in (("train", "train.csv"), ("test", "sample_submission.csv"),
                        ("non_landmark", "non_landmark.csv")):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            rows += [(i, image_path(data_dir, split, i)) for i in read_csv_checked(path, ["id"])["id"]]
    if not rows:
        raise UserError(f"--data-dir {data_dir}: no train.csv or sample_submission.csv to take image names from")
    reasons = image_problems([p for _, p in rows], workers)
    bad = pd.DataFrame([(i, p, r) for (i, p), r in zip(rows, reasons) if r], columns=["id", "path", "reason"])
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "bad_images.csv")
    bad.to_csv(out, index=False)
    counts = ", ".join(f"{n} {r}" for r, n in bad["reason"].value_counts().items())
    print(f"{len(bad)} of {len(rows)} images unusable ({counts or 'none'}) -> {out}; "
          f"pass it to train.py and predict.py as --exclude {out}")
    return bad


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--train-csv", default="./train.csv", help="clean list: id,landmark_id or landmark_id,images")
    p.add_argument("--out-dir", default=".", help="where train_0.csv and idx2landmark_id.pkl go")
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=233)
    p.add_argument("--from-folder", default=None, metavar="DIR",
                   help="instead: a data set from DIR/<landmark name>/*.jpg (your own photos) -> OUT_DIR")
    p.add_argument("--check-images", action="store_true",
                   help="instead: scan every image DATA_DIR's CSVs name and write OUT_DIR/bad_images.csv")
    p.add_argument("--data-dir", default="./data", help="with --check-images: train.csv, train/, test/, ...")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="with --check-images or --from-folder: processes that decode the images")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.check_images:
        return check_images(args.data_dir, args.out_dir, max(1, args.workers))
    if args.from_folder:
        return from_folder(args.from_folder, args.out_dir, args.n_folds, args.seed, max(1, args.workers))
    df = assign_folds(read_clean_list(args.train_csv), args.n_folds, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    df.to_csv(os.path.join(args.out_dir, "train_0.csv"), index=False)
    mapping = idx2landmark_id(df["landmark_id"])
    write_label_map(mapping, args.out_dir)
    print(f"{len(df)} images, {len(mapping)} classes, {args.n_folds} folds -> {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
