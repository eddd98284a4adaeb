"""Geometric verification (verify.py, predict.py --verify): inliers, their feature in the calibration, kept features."""
import json
import os
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT

import calibration as cal
import verify


def scene(seed, h=360, w=480):
    """A textured RGB image (blurred noise, rectangles and discs): SIFT finds hundreds of keypoints."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2.0)
    for _ in range(60):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(8, 60)), y + int(rng.integers(8, 60))), color, -1)
        else:
            cv2.circle(img, (x, y), int(rng.integers(4, 30)), color, -1)
    return img


def warped(img):
    """img seen from elsewhere: a perspective warp, a little brighter."""
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[30, 10], [w - 10, 35], [w - 40, h - 5], [5, h - 30]])
    out = cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT)
    return np.clip(out.astype(np.int16) + 15, 0, 255).astype(np.uint8)


def test_inliers_separate_a_scene_from_another():
    a, b, c = scene(0), warped(scene(0)), scene(1)
    fa, fb, fc = (verify.local_features(x) for x in (a, b, c))
    assert 100 <= len(fa[0]) <= verify.N_FEATURES and fa[1].dtype == np.uint8 and fa[0].shape == (len(fa[1]), 2)
    same, other = verify.inliers(fa, fb), verify.inliers(fa, fc)
    assert same >= 100 and other < 30 and same > 5 * max(other, 1), (same, other)
    # too few features: no fundamental matrix, 0
    empty = (np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8))
    assert verify.inliers(fa, empty) == 0 and verify.inliers(empty, fa) == 0
    # RootSIFT: unit L2 length, the square root of the L1-normalised descriptor
    r = verify.root_sift(fa[1][:5])
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(r ** 2, fa[1][:5] / fa[1][:5].sum(1, keepdims=True), atol=1e-6)
    # a larger image is scaled to MAX_SIDE: keypoints lie within it
    big = cv2.resize(a, (1200, 900))
    xy, _ = verify.local_features(big)
    assert xy.max() <= verify.MAX_SIDE


def test_verifier_keeps_gallery_features_and_recomputes_changed_files(tmp_path):
    paths = []
    for i in range(3):
        p = str(tmp_path / f"g{i}.jpg")
        cv2.imwrite(p, cv2.cvtColor(scene(i) if i < 2 else warped(scene(0)), cv2.COLOR_RGB2BGR))
        paths.append(p)
    keep = str(tmp_path / "idx.local.npz")
    v = verify.Verifier(paths, k=2, names=["a", "b", "c"], keep=keep)
    q = cv2.cvtColor(cv2.imread(paths[0]), cv2.COLOR_BGR2RGB)
    inl = v.query_inliers([q, None, paths[0]], np.array([[2, 1, 0], [0, 1, 2], [2, -1, 0]]))
    assert inl.shape == (3, 2) and (inl[1] == 0).all() and inl[2, 1] == 0  # no query, no neighbour: 0
    assert inl[0, 0] == inl[2, 0] >= 50 and inl[0, 1] < 30  # a path and its decoded array agree
    assert v.extracted == 2 and v.pairs == 3
    direct = verify.inliers(verify.local_features(q), verify.local_features(cv2.cvtColor(cv2.imread(paths[2]),
                                                                                     cv2.COLOR_BGR2RGB)))
    assert inl[0, 0] == direct
    v.save()
    w = verify.Verifier(paths, k=2, names=["a", "b", "c"], keep=keep)
    assert sorted(w.feats) == [1, 2]
    for r in (1, 2):
        np.testing.assert_array_equal(w.feats[r][1], v.feats[r][1])
        np.testing.assert_array_equal(w.feats[r][0], v.feats[r][0])
    assert (w.gallery_inliers([0], [[2, 1]]) == v.gallery_inliers([0], [[2, 1]])).all() and w.extracted == 1
    # a file changed since: its features are computed again
    os.utime(paths[2], ns=(1, 1))
    assert sorted(verify.Verifier(paths, k=2, names=["a", "b", "c"], keep=keep).feats) == [1]
    # a gallery whose rows are named otherwise: nothing reused
    assert not verify.Verifier(paths, k=2, names=["x", "y", "z"], keep=keep).feats


def test_inliers_feature_and_its_noise_floor():
    sims = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, -np.inf]])
    nn_l = np.array([[3, 4, 3], [5, 5, 3]])
    inl = np.array([[12, 400, 40], [9, 30, 77]])
    x = cal.answer_features(sims, nn_l, [3, 5], [0.5, 0.4], cal.Typical({}, 0.5), inl=inl)
    # landmark 3: neighbours 0 and 2 name it (400 belongs to landmark 4); landmark 5: 0 and 1 (77 is an empty slot)
    assert x[:, -1].tolist() == [40, 30]
    names = cal.FEATURES + cal.VERIFY_FEATURES
    rng = np.random.default_rng(0)
    n = 400
    right = rng.random(n) < 0.5
    noise = rng.integers(0, 20, n)
    k = len(cal.FEATURES)  # the inliers column follows the retrieval features
    xs = np.stack([rng.random(n) for _ in range(k)] + [np.where(right & (rng.random(n) < 0.5), 200, noise)], 1)
    c = cal.fit(xs, right.astype(int), names)
    assert c.inlier_floor == pytest.approx(np.percentile(xs[~right, k], cal.NOISE_QUANTILE))
    t = xs.copy()
    t[:, k] = np.log1p(np.maximum(xs[:, k] - c.inlier_floor, 0))
    z = (t - c.mean) / c.scale @ np.array(c.coef) + c.intercept
    np.testing.assert_allclose(c(xs), 1 / (1 + np.exp(-z)))
    assert c.coef[k] > 0  # more inliers than the noise: more likely right
    # below the floor, any count is alike (0 matches says no more than the noise)
    lo = xs[:2].copy()
    lo[:, k] = [0, c.inlier_floor]
    assert c(lo)[0] == pytest.approx(c(np.concatenate([lo[:1, :k], [[c.inlier_floor]]], 1))[0])
    assert cal.Calibration.from_dict(json.loads(json.dumps(c.as_dict())))(xs).tolist() == c(xs).tolist()


def test_predict_verify_on_folders(photos, tmp_path, capsys):
    """--verify 2: the calibration learns an inliers feature, the gallery's local features are kept beside
    the index and used again; the cost is printed; mistakes are one line."""
    import subprocess

    import predict
    from util import UserError
    idx, out = str(tmp_path / "idx"), str(tmp_path / "pred.csv")
    common = ["--spec", photos["spec"], "--idx2landmark", photos["labels"], "--query-dir", photos["queries"],
              "--out", out, "--num-workers", "0", "--device", "cpu"]
    predict.main(common + ["--verify", "2", "--gallery-dir", photos["gallery"], "--save-index", idx])
    printed = capsys.readouterr().out
    assert "ms per query" in printed and "photo pairs verified" in printed
    saved = json.load(open(idx + ".json"))
    assert saved["calibration"]["fit"]["features"][-1] == "inliers" and saved["calibration"]["key"]["verify"] == 2
    with np.load(idx + ".local.npz") as z:  # a small gallery: the calibration's sample is all of it
        assert sorted(z["names"].tolist()) == sorted(saved["paths"])
    first = pd.read_csv(out)
    predict.main(common + ["--verify", "2", "--index", idx])
    assert ", 0 gallery photos' local features computed" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(out), first)
    # verification changes the confidence, not the answer
    predict.main(common + ["--index", idx, "--out", str(tmp_path / "nv.csv")])
    assert pd.read_csv(tmp_path / "nv.csv")["guess"].tolist() == first["guess"].tolist()
    with pytest.raises(UserError, match="--verify -1"):
        predict.main(common + ["--index", idx, "--verify", "-1"])
    r = subprocess.run([sys.executable, "predict.py", *common, "--index", idx, "--verify", "2", "--no-calibrate"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--calibrate" in r.stderr and "Traceback" not in r.stderr, r.stderr
