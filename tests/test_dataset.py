import os

import numpy as np
import pandas as pd
import pytest
import torch

from dataset import Cutout, LandmarkDataset, get_df, get_transforms, image_path, seed_transform


def _original_get_df(data_dir, train_step, folds_csv):
    """The original repo's get_df, written out in pandas as a reference."""
    df = pd.read_csv(folds_csv)
    full = pd.read_csv(os.path.join(data_dir, "train.csv")).drop(columns=["url"])
    if train_step > 0:
        full = full.set_index("landmark_id").loc[df.landmark_id.unique()].reset_index()
    full["filepath"] = full["id"].apply(lambda x: os.path.join(data_dir, "train", x[0], x[1], x[2], f"{x}.jpg"))
    df = full.merge(df, on=["id", "landmark_id"], how="left")
    m = {l: i for i, l in enumerate(sorted(df["landmark_id"].unique()))}
    df["landmark_id"] = df["landmark_id"].map(m)
    return df, df.landmark_id.nunique()


@pytest.mark.parametrize("step", [0, 1, 2])
def test_get_df_equals_original_semantics(synth, step):
    folds = os.path.join(synth, "train_0.csv")
    got, out_dim = get_df("k", synth, step, folds)
    want, want_dim = _original_get_df(synth, step, folds)
    assert out_dim == want_dim
    for c in ["id", "landmark_id", "filepath"]:
        assert (got[c].to_numpy() == want[c].to_numpy()).all(), c
    np.testing.assert_array_equal(got["fold"].to_numpy(), want["fold"].to_numpy())


def test_step0_all_classes_step1_clean_classes(synth):
    full = pd.read_csv(os.path.join(synth, "train.csv"))
    clean = pd.read_csv(os.path.join(synth, "train_competition.csv"))
    df0, d0 = get_df("k", synth, 0, os.path.join(synth, "train_0.csv"))
    df1, d1 = get_df("k", synth, 1, os.path.join(synth, "train_0.csv"))
    assert d0 == full.landmark_id.nunique() and len(df0) == len(full)
    assert d1 == clean.landmark_id.nunique() < d0
    # step 1: every image of the clean classes from the full set, not only the clean list's
    assert len(df1) == full.landmark_id.isin(clean.landmark_id).sum() > len(clean)
    assert df1["fold"].isna().sum() == len(df1) - len(clean)
    # labels are indices over the sorted landmark ids, the order of idx2landmark_id.pkl
    import pickle
    with open(os.path.join(synth, "idx2landmark_id.pkl"), "rb") as f:
        idx2lid = pickle.load(f)
    ids = full.set_index("id").loc[df1["id"], "landmark_id"].to_numpy()
    assert [idx2lid[i] for i in df1["landmark_id"]] == ids.tolist()


def test_dataset_items_and_modes(synth):
    df, _ = get_df("k", synth, 1, os.path.join(synth, "train_0.csv"))
    _, tv = get_transforms(40)
    x, y = LandmarkDataset(df, "train", "val", tv)[3]
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and y.item() == df.landmark_id.iloc[3]
    # ImageNet normalisation of the resized RGB image
    import cv2
    rgb = cv2.cvtColor(cv2.imread(df.filepath.iloc[3]), cv2.COLOR_BGR2RGB)
    ref = cv2.resize(rgb, (40, 40), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    ref = (ref - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-4)
    t = LandmarkDataset(df, "train", "test", tv)[0]
    assert isinstance(t, torch.Tensor) and t.shape == (3, 40, 40)
    assert image_path("D", "test", "abcdef") == os.path.join("D", "test", "a", "b", "c", "abcdef.jpg")


def test_augmentation_reproducible_per_seed_epoch_rank_index(synth):
    df, _ = get_df("k", synth, 1, os.path.join(synth, "train_0.csv"))
    tt, _ = get_transforms(48)
    a = LandmarkDataset(df, "train", "train", tt, seed=7, rank=0)
    b = LandmarkDataset(df, "train", "train", get_transforms(48)[0], seed=7, rank=0)
    for ds in (a, b):
        ds.set_epoch(3)
    assert torch.equal(a[5][0], b[5][0])           # same keys: same augmentation
    assert torch.equal(a[5][0], a[5][0])           # and repeatable
    views = {tuple(a[5][0].flatten()[::97].tolist())}
    for e in range(4, 12):
        a.set_epoch(e)
        views.add(tuple(a[5][0].flatten()[::97].tolist()))
    assert len(views) > 5                          # epochs differ
    c = LandmarkDataset(df, "train", "train", tt, seed=7, rank=1)
    c.set_epoch(3), a.set_epoch(3)
    assert not torch.equal(a[5][0], c[5][0])       # ranks differ


def test_train_transform_contents():
    import albumentations as A
    tt, tv = get_transforms(100)
    names = [type(t).__name__ for t in tt.transforms]
    assert names == ["HorizontalFlip", "ImageCompression", "Affine", "Resize", "Cutout", "Normalize"]
    cd = tt.transforms[4]
    assert isinstance(cd, Cutout) and cd.hole_size == 40 and cd.fill == 0 and cd.p == 0.5
    af = tt.transforms[2]
    assert af.p == 0.7
    assert [type(t).__name__ for t in tv.transforms] == ["Resize", "Normalize"]
    assert isinstance(tt, A.Compose)


def _holes(transform, n, shape=(256, 256), seed=0):
    """The hole mask of n draws (True = blanked), transform applied to a white image."""
    img = np.full(shape, 255, np.uint8)
    seeds = np.random.SeedSequence(seed).generate_state(n)
    out = np.empty((n, *shape), bool)
    for i, s in enumerate(seeds):
        seed_transform(transform, int(s))
        out[i] = transform(image=img)["image"] == 0
    return out


def test_cutout_coverage_matches_the_original_closed_form():
    """The original's Cutout (albumentations 0.4.6) draws the centre over [0, H]
    and clips: per axis, a middle pixel is covered with probability h/(H+1), the
    first and last ones with (h//2+1)/(H+1); a pixel is covered when both of its
    axes are (rows and columns are drawn independently)."""
    t = next(t for t in get_transforms(256)[0].transforms if isinstance(t, Cutout))
    t.p = 1.0
    H, h, n = 256, t.hole_size, 4000
    assert h == 102
    m = _holes(t, n)
    p_mid, p_edge = h / (H + 1), (h // 2 + 1) / (H + 1)
    assert (p_mid, p_edge) == pytest.approx((0.397, 0.202), abs=1e-3)

    def check(got, p):
        sd = np.sqrt(p * (1 - p) / n)
        assert abs(got - p) < 4.5 * sd, (got, p, sd)

    rows = m.any(axis=2)  # (n, H): row r lies inside the hole's rows
    cols = m.any(axis=1)
    for axis in (rows, cols):
        check(axis[:, 128].mean(), p_mid)
        check(axis[:, 0].mean(), p_edge)
        check(axis[:, H - 1].mean(), p_edge)
    check(m[:, 128, 128].mean(), p_mid ** 2)           # ~0.158; CoarseDropout gave ~0.42
    for y, x in ((0, 0), (0, H - 1), (H - 1, 0), (H - 1, H - 1)):
        check(m[:, y, x].mean(), p_edge ** 2)          # ~0.041; CoarseDropout gave 0
    # the hole is a rectangle of height h unless the bottom border cuts it short
    top = rows.argmax(axis=1)
    height = rows.sum(axis=1)
    np.testing.assert_array_equal(height, np.minimum(h, H - top))
    assert (height < h).any() and (top == 0).mean() == pytest.approx(p_edge, abs=4.5 * np.sqrt(p_edge / n))


def test_cutout_probability_fill_and_seeding():
    t = Cutout(10, fill=0, p=0.5)
    m = _holes(t, 2000, shape=(32, 48))
    applied = m.any(axis=(1, 2))
    assert abs(applied.mean() - 0.5) < 4.5 * np.sqrt(0.25 / 2000)
    assert np.array_equal(m, _holes(t, 2000, shape=(32, 48)))            # same seeds, same holes
    assert not np.array_equal(m, _holes(t, 2000, shape=(32, 48), seed=1))
    img = np.random.default_rng(0).integers(1, 256, (20, 30, 3), dtype=np.uint8)
    t = Cutout(6, fill=0, p=1.0)
    t.set_random_seed(3)
    out = t(image=img)["image"]
    hole = (out == 0).all(axis=2)
    assert np.array_equal(out[~hole], img[~hole]) and 0 < hole.sum() <= 36 and (img > 0).all()
