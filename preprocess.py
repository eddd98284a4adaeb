"""Assign stratified folds to the competition's clean train list.

As the original: reads ./train.csv (id,landmark_id), writes ./train_0.csv (the
input columns plus `fold`, from StratifiedKFold(5, shuffle=True,
random_state=233)) and ./idx2landmark_id.pkl (class index -> landmark_id over
the sorted unique landmark ids), which the original's notebook uses, and the
same map as ./idx2landmark_id.json, which predict.py reads.

GLDv2's own `train_clean.csv` (landmark_id,images with space-separated ids) is
accepted too and expanded to id,landmark_id rows first.
"""
import argparse
import json
import os
import pickle

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from dataset import read_csv_checked
from util import UserError, run_main


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
    for i, (_, valid_idx) in enumerate(skf.split(df, df["landmark_id"])):
        fold[valid_idx] = i
    df["fold"] = fold
    return df


def idx2landmark_id(landmark_ids):
    return {i: lid for i, lid in enumerate(sorted(pd.unique(np.asarray(landmark_ids)).tolist()))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-csv", default="./train.csv", help="clean list: id,landmark_id or landmark_id,images")
    p.add_argument("--out-dir", default=".", help="where train_0.csv and idx2landmark_id.pkl go")
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=233)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    df = assign_folds(read_clean_list(args.train_csv), args.n_folds, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    df.to_csv(os.path.join(args.out_dir, "train_0.csv"), index=False)
    mapping = idx2landmark_id(df["landmark_id"])
    # the original's pickle (its notebook reads it), and JSON, which predict.py prefers: it runs no code
    with open(os.path.join(args.out_dir, "idx2landmark_id.pkl"), "wb") as f:
        pickle.dump(mapping, f)
    with open(os.path.join(args.out_dir, "idx2landmark_id.json"), "w") as f:
        json.dump({str(k): int(v) for k, v in mapping.items()}, f)
    print(f"{len(df)} images, {len(mapping)} classes, {args.n_folds} folds -> {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
