import hashlib
import os

import numpy as np
import pandas as pd

import synthetic


def _digest(root):
    h = hashlib.sha1()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(d, f), "rb").read())
    return h.hexdigest()


def test_deterministic_for_a_seed_and_layout(tmp_path):
    kw = dict(classes=12, clean_classes=8, test=10, min_size=48, max_size=96, non_landmark_set=3)
    synthetic.generate(str(tmp_path / "a"), seed=3, **kw)
    synthetic.generate(str(tmp_path / "b"), seed=3, **kw)
    synthetic.generate(str(tmp_path / "c"), seed=4, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")

    root = tmp_path / "a"
    full = pd.read_csv(root / "train.csv")
    clean = pd.read_csv(root / "train_competition.csv")
    sol = pd.read_csv(root / "solution.csv", dtype=str, keep_default_na=False)
    sub = pd.read_csv(root / "sample_submission.csv")
    assert list(full.columns) == ["id", "url", "landmark_id"] and list(clean.columns) == ["id", "landmark_id"]
    assert full.landmark_id.nunique() == 12 and clean.landmark_id.nunique() == 8
    assert set(clean.id) <= set(full.id) and full.id.is_unique
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in full.id)
    for i in full.id:
        assert (root / "train" / i[0] / i[1] / i[2] / f"{i}.jpg").exists()
    assert list(sol.id) == list(sub.id) and len(sub) == 10
    lm = sol[sol.landmarks != ""]
    assert len(lm) == 5 and set(lm.landmarks.astype(int)) <= set(clean.landmark_id)
    # long tail: the biggest class is several times the median
    counts = full.landmark_id.value_counts()
    assert counts.max() >= 3 * counts.median() and counts.min() >= 2


def test_views_of_a_landmark_differ_but_resemble():
    rng = np.random.default_rng(0)
    scene = synthetic.make_scene(rng)
    a = synthetic.make_view(scene, np.random.default_rng(1), 96, 96)
    b = synthetic.make_view(scene, np.random.default_rng(2), 96, 96)
    other = synthetic.make_view(synthetic.make_scene(np.random.default_rng(9)), np.random.default_rng(1), 96, 96)
    assert not np.array_equal(a, b) and max(a.shape[:2]) == 96

    def hist(img):
        h = np.concatenate([np.histogram(img[..., c], bins=8, range=(0, 256))[0] for c in range(3)])
        return h / h.sum()
    assert np.abs(hist(a) - hist(b)).sum() < np.abs(hist(a) - hist(other)).sum()
