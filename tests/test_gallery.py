"""Your own photos: folders in, predictions.csv out, a saved index reused and grown."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_BACKBONE
import predict
import retrieval
from util import UserError


def _predict(ph, *extra, out="pred.csv"):
    path = str(ph["t"] / out)
    predict.main(["--spec", ph["spec"], "--query-dir", ph["queries"], "--idx2landmark", ph["labels"],
                  "--out", path, "--device", "cpu", "--num-workers", "0", *extra])
    return pd.read_csv(path, keep_default_na=False)


def test_predictions_from_folders(photos):
    df = _predict(photos, "--gallery-dir", photos["gallery"], "--save-index", str(photos["t"] / "idx"))
    assert list(df.columns) == ["path", "landmark", "guess", "confidence", "neighbours"]
    assert len(df) == photos["n_queries"] and df["path"].str.match(r"day[01]/[0-9a-f]+\.jpg").all()
    names = set(os.listdir(photos["gallery"]))
    assert set(df["guess"]) <= names and (df["guess"] != "").all()
    # the landmark where the calibrated confidence reaches --min-confidence (0.5), else unknown
    sure = df["confidence"] >= 0.5
    assert (df["landmark"][sure] == df["guess"][sure]).all() and (df["landmark"][~sure] == "").all()
    for row in df.itertuples():
        nb = json.loads(row.neighbours)
        assert len(nb) == 5 and all(os.path.exists(os.path.join(photos["gallery"], p)) for p, _ in nb)
        sims = [s for _, s in nb]
        assert sims == sorted(sims, reverse=True) and -1 <= sims[-1] <= sims[0] <= 1 + 1e-5
    # a saved index answers the same, without the gallery
    again = _predict(photos, "--index", str(photos["t"] / "idx"), out="pred2.csv")
    assert list(again["guess"]) == list(df["guess"])
    np.testing.assert_allclose(again["confidence"], df["confidence"], rtol=0.05, atol=0.01)
    with open(photos["t"] / "idx.json") as f:
        meta = json.load(f)
    assert meta["models"][0]["enet_type"] == TINY_BACKBONE and len(meta["models"][0]["checkpoint_sha1"]) == 40
    assert meta["models"][0]["preprocessing"]["interpolation"] == "bicubic"


def test_index_refuses_other_models_and_grows_with_new_files(photos, tmp_path, capsys):
    # its own index of the whole gallery: under xdist this test may run before, or beside, the one above
    base = ["--spec", photos["spec"], "--device", "cpu", "--num-workers", "0", "--idx2landmark", photos["labels"]]
    idx = tmp_path / "idx"
    predict.main([*base, "--gallery-dir", photos["gallery"], "--save-index", str(idx), "--no-calibrate"])
    # other weights: refused
    import torch
    ck = json.load(open(photos["spec"]))["models"][0]["checkpoint"]
    other = torch.load(ck, weights_only=True)
    other["model_state_dict"]["feat.bias"] += 1
    torch.save(other, tmp_path / "other.pth")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": TINY_BACKBONE, "checkpoint": str(tmp_path / "other.pth"),
                                            "image_size": 32}]}))
    with pytest.raises(UserError, match="other models"):
        predict.run_folders(predict.options(spec=str(spec), query_dir=photos["queries"], index=str(idx),
                                            device="cpu", num_workers=0))
    # an index of all but one landmark, then --add-to-index embeds that landmark's files alone
    part = tmp_path / "gallery"
    shutil.copytree(photos["gallery"], part)
    last = sorted(os.listdir(part))[-1]
    n_last = len(os.listdir(part / last))
    shutil.rmtree(part / last)
    predict.main([*base, "--gallery-dir", str(part), "--save-index", str(tmp_path / "grow")])
    capsys.readouterr()
    predict.main([*base, "--gallery-dir", photos["gallery"], "--index", str(tmp_path / "grow"), "--add-to-index"])
    assert f"embedded {n_last} gallery images" in capsys.readouterr().out
    full = json.load(open(tmp_path / "idx.json"))
    grown = json.load(open(tmp_path / "grow.json"))
    assert sorted(grown["paths"]) == sorted(full["paths"]) and grown["names"] == full["names"]
    a, b = np.load(tmp_path / "idx.npz"), np.load(tmp_path / "grow.npz")
    order = [grown["paths"].index(p) for p in full["paths"]]
    np.testing.assert_array_equal(b["labels"][order], a["labels"])
    np.testing.assert_allclose(b["emb0"][order].astype(np.float32), a["emb0"].astype(np.float32), atol=2e-3)


def test_non_landmark_handling_with_folders(photos, tmp_path):
    """A known non-landmark set that holds each query three times: every query's 3 nearest
    non-landmarks are itself (cosine 1), closer than any gallery image, so every confidence is
    sunk by the factor 1e-100: every answer is unknown, its guess kept."""
    import glob
    kw = dict(spec=photos["spec"], query_dir=photos["queries"], gallery_dir=photos["gallery"],
              idx2landmark=photos["labels"], device="cpu", num_workers=0)
    plain, _ = predict.run_folders(predict.options(**kw))
    qs = sorted(glob.glob(os.path.join(photos["queries"], "**", "*.jpg"), recursive=True))
    pd.DataFrame({"filepath": qs * 3}).to_csv(tmp_path / "nl.csv", index=False)  # its 3 nearest: itself
    frame, res = predict.run_folders(predict.options(non_landmark=str(tmp_path / "nl.csv"), **kw))
    assert res["nl_flags"].all() and list(frame["guess"]) == list(plain["guess"]) and (frame["landmark"] == "").all()
    np.testing.assert_allclose(frame["confidence"], plain["confidence"] * retrieval.NL_FACTOR, rtol=1e-6)


def test_folder_mode_user_mistakes(photos, tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        predict.run_folders(predict.options(spec=photos["spec"], query_dir=str(tmp_path / "nope"),
                                            gallery_dir=photos["gallery"], device="cpu"))
    with pytest.raises(UserError, match="--gallery-dir"):
        predict.run_folders(predict.options(spec=photos["spec"], query_dir=photos["queries"], device="cpu"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="one folder per landmark"):
        predict.run_folders(predict.options(spec=photos["spec"], query_dir=photos["queries"],
                                            gallery_dir=str(tmp_path / "flat"), device="cpu"))
