import os
import pickle

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

import preprocess


def _clean_list(path, rng):
    lids = rng.choice(np.arange(1000, 9000), 40, replace=False)
    rows = [(f"{rng.integers(0, 2**63):016x}", int(l)) for l in lids for _ in range(int(rng.integers(5, 12)))]
    df = pd.DataFrame(rows, columns=["id", "landmark_id"]).sample(frac=1, random_state=3)
    df.to_csv(path, index=False)
    return df.reset_index(drop=True)


def test_folds_equal_direct_stratified_kfold(tmp_path):
    df = _clean_list(tmp_path / "train.csv", np.random.default_rng(0))
    preprocess.main(["--train-csv", str(tmp_path / "train.csv"), "--out-dir", str(tmp_path)])
    out = pd.read_csv(tmp_path / "train_0.csv")
    want = np.full(len(df), -1)
    for i, (_, v) in enumerate(StratifiedKFold(5, shuffle=True, random_state=233).split(df, df["landmark_id"])):
        want[v] = i
    assert list(out.columns) == ["id", "landmark_id", "fold"]
    assert (out["id"] == df["id"]).all()
    np.testing.assert_array_equal(out["fold"].to_numpy(), want)
    with open(tmp_path / "idx2landmark_id.pkl", "rb") as f:
        m = pickle.load(f)
    assert m == dict(enumerate(sorted(df["landmark_id"].unique().tolist())))


def test_default_paths_are_cwd(tmp_path, monkeypatch):
    _clean_list(tmp_path / "train.csv", np.random.default_rng(1))
    monkeypatch.chdir(tmp_path)
    preprocess.main([])
    assert os.path.exists("train_0.csv") and os.path.exists("idx2landmark_id.pkl")


def test_gldv2_train_clean_format_is_expanded(tmp_path):
    df = _clean_list(tmp_path / "a.csv", np.random.default_rng(2))
    grouped = df.groupby("landmark_id", sort=False)["id"].apply(" ".join).reset_index(name="images")
    grouped.to_csv(tmp_path / "train_clean.csv", index=False)
    got = preprocess.read_clean_list(tmp_path / "train_clean.csv")
    assert list(got.columns) == ["id", "landmark_id"]
    pd.testing.assert_frame_equal(got.sort_values("id").reset_index(drop=True),
                                  df.sort_values("id").reset_index(drop=True), check_dtype=False)
