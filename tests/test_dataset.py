import os

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from dataset import (Cutout, EpochSampler, FlipJpegAffineResize, LandmarkDataset, decode_min_side, flip_affine_resize_matrix,
                     get_df, get_transforms, image_path, jpeg_size, read_rgb, reference_transforms, seed_transform)


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
    assert x.shape == (3, 40, 40) and x.dtype == torch.uint8 and y.item() == df.landmark_id.iloc[3]
    # the resized RGB image, decoded at full size as the original's validation
    rgb = cv2.cvtColor(cv2.imread(df.filepath.iloc[3]), cv2.COLOR_BGR2RGB)
    ref = cv2.resize(rgb, (40, 40), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), ref)
    # the model's normalisation on the device equals the original's ImageNet normalisation
    from models import build_model
    xf, _ = LandmarkDataset(df, "train", "val", reference_transforms(40)[1])[3]
    assert xf.dtype == torch.float32
    want = (ref.astype(np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(xf.permute(1, 2, 0).numpy(), want, atol=1e-5)
    net = build_model("resnet10t", 5)
    np.testing.assert_allclose(net.normalize_input(x[None])[0].permute(1, 2, 0).numpy(), want, atol=1e-5)
    assert net.normalize_input(xf) is xf  # float input is taken as normalised already
    assert not any(k.startswith("pixel_") for k in net.state_dict())  # checkpoints keep the original's keys
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
    assert [type(t).__name__ for t in tt.transforms] == ["FlipJpegAffineResize", "Cutout"]
    g, cd = tt.transforms
    assert (g.size, g.flip_p, g.jpeg_p, g.jpeg_quality, g.affine_p, g.shift, g.scale, g.rotate) == \
        (100, 0.5, 0.5, (99, 100), 0.7, 0.2, 0.2, 10)
    assert isinstance(cd, Cutout) and cd.hole_size == 40 and cd.fill == 0 and cd.p == 0.5
    assert [type(t).__name__ for t in tv.transforms] == ["Resize"]
    assert isinstance(tt, A.Compose) and decode_min_side(tt) == 100 and decode_min_side(tv) is None
    rt, rv = reference_transforms(100)
    names = [type(t).__name__ for t in rt.transforms]
    assert names == ["HorizontalFlip", "ImageCompression", "Affine", "Resize", "Cutout", "Normalize"]
    assert rt.transforms[2].p == 0.7 and rt.transforms[4].hole_size == 40
    assert [type(t).__name__ for t in rv.transforms] == ["Resize", "Normalize"]


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


def _jpeg(path, h, w, seed=0, quality=95):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
    assert cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return str(path)


def test_reduced_decode_never_below_the_target(tmp_path):
    p = _jpeg(tmp_path / "a.jpg", 600, 800)
    assert jpeg_size(np.fromfile(p, np.uint8)) == (600, 800)
    full = read_rgb(p)
    assert full.shape == (600, 800, 3)
    # the coarsest DCT scale with both sides >= min_side: 1/2, 1/4, 1/8 or none
    for min_side, shape in ((700, (600, 800)), (300, (300, 400)), (256, (300, 400)), (150, (150, 200)),
                            (75, (75, 100)), (40, (75, 100))):
        img = read_rgb(p, min_side)
        assert img.shape[:2] == shape and min(shape) >= min(min_side, 600), (min_side, img.shape)
    # the reduced decode is a downscale of the same picture
    half = read_rgb(p, 300).astype(np.float32)
    ref = cv2.resize(full, (400, 300), interpolation=cv2.INTER_AREA).astype(np.float32)
    assert np.abs(half - ref).mean() < 3
    # odd sizes round up (libjpeg), still never below the target
    q = _jpeg(tmp_path / "b.jpg", 257, 333)
    assert read_rgb(q, 128).shape[:2] == (129, 167) and read_rgb(q, 130).shape[:2] == (257, 333)
    # not a JPEG (a PNG under a .jpg name): no header, full decode
    png = tmp_path / "c.jpg"
    cv2.imwrite(str(tmp_path / "c.png"), cv2.imread(p))
    os.replace(tmp_path / "c.png", png)
    assert jpeg_size(np.fromfile(str(png), np.uint8)) is None and read_rgb(str(png), 100).shape == (600, 800, 3)


def test_fused_warp_equals_the_original_chain():
    """flip -> albumentations Affine -> Resize, composed: the matrix is the product of
    the three maps, and the one warp's pixels match the three passes' (exactly
    without an affine, up to interpolation with one)."""
    from albumentations.augmentations.geometric import functional as fg
    img = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8), (0, 0), 3)
    h, w, size = 240, 320, 96
    for flip, aff in ((False, None), (True, None), (False, (0.1, -0.15, 1.1, 7.0)), (True, (-0.2, 0.05, 0.85, -9.5))):
        x = np.ascontiguousarray(img[:, ::-1]) if flip else img
        f = np.array([[-1.0, 0, w - 1], [0, 1, 0], [0, 0, 1]]) if flip else np.eye(3)
        a = np.eye(3)
        if aff:
            tx, ty, s, deg = aff
            a = fg.create_affine_transformation_matrix({"x": tx * w, "y": ty * h}, {"x": 0, "y": 0},
                                                       {"x": s, "y": s}, deg, fg.center((h, w)))
            x = cv2.warpAffine(x, a[:2], (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        ref = cv2.resize(x, (size, size), interpolation=cv2.INTER_LINEAR)
        r = np.array([[size / w, 0, 0.5 * size / w - 0.5], [0, size / h, 0.5 * size / h - 0.5], [0, 0, 1]])
        m = flip_affine_resize_matrix(h, w, size, flip, aff)
        np.testing.assert_allclose(m, (r @ a @ f)[:2], atol=1e-9)
        out = FlipJpegAffineResize(size).apply(img, m, flip, aff is not None)
        d = np.abs(out.astype(np.float32) - ref)
        if aff is None:
            assert d.max() == 0
        else:  # one interpolation instead of two; away from the black border
            inner = cv2.erode((ref.min(axis=2) > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            assert d[inner].mean() < 1.0 and np.percentile(d[inner], 99) < 4


def _draw_stats(transform, path, n, denorm=False):
    """Per draw: share of black pixels (border fill, cutout), and area and
    centroid of the white bar, from a gray picture with one white bar."""
    ds = LandmarkDataset(pd.DataFrame({"filepath": [path] * n}), "", "test", transform, seed=5)
    out = []
    for i in range(n):
        x = ds[i].numpy().astype(np.float32)
        if denorm:
            x = (x * np.array([0.229, 0.224, 0.225])[:, None, None] + np.array([0.485, 0.456, 0.406])[:, None, None]) * 255
        g = x.mean(0)
        bar = g > 200
        ys, xs = np.nonzero(bar)
        out.append((float((g < 40).mean()), float(bar.mean()), xs.mean() / g.shape[1] if len(xs) else np.nan,
                    ys.mean() / g.shape[0] if len(ys) else np.nan))
    return np.array(out)


def test_fast_train_transforms_keep_the_original_distribution(tmp_path):
    """get_transforms' fused pipeline (reduced decode, one warp, JPEG jitter at
    the output size) against the original's step-by-step chain on the same
    picture: two-sample KS tests on what the augmentations do to it."""
    from scipy.stats import ks_2samp
    img = np.full((240, 320, 3), 128, np.uint8)
    img[50:80, 190:270] = 255
    path = str(tmp_path / "bar.jpg")
    cv2.imwrite(path, img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    n, size = 600, 64
    fast, _ = get_transforms(size)
    assert decode_min_side(fast) == size  # decoded at 1/2 scale: 160 x 120
    ref = _draw_stats(reference_transforms(size)[0], path, n, denorm=True)
    got = _draw_stats(fast, path, n)

    def same(a, b):
        a, b = a[~np.isnan(a)], b[~np.isnan(b)]
        return ks_2samp(a, b).pvalue

    names = ["black share", "bar area", "bar x", "bar y"]
    for j, name in enumerate(names):
        assert same(ref[:, j], got[:, j]) > 1e-3, name
    # the test has power: half the shift range, or the affine half as often, is caught
    for bad in (dict(shift=0.1), dict(affine_p=0.35)):
        t = get_transforms(size)[0]
        t.transforms[0] = FlipJpegAffineResize(size, **bad)
        worse = _draw_stats(t, path, n)
        assert min(same(ref[:, j], worse[:, j]) for j in range(4)) < 1e-3, bad


def test_epoch_sampler_reaches_persistent_workers(synth):
    df, _ = get_df("k", synth, 1, os.path.join(synth, "train_0.csv"))
    df = df.iloc[:6]
    ds = LandmarkDataset(df, "train", "train", get_transforms(32)[0], seed=3)
    sampler = EpochSampler(torch.utils.data.SequentialSampler(ds))
    loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=6, num_workers=1, persistent_workers=True)
    seen = []
    for epoch in (1, 2, 1):
        sampler.set_epoch(epoch)
        x, _ = next(iter(loader))
        ds.set_epoch(epoch)  # the main process's copy: the reference
        assert torch.equal(x, torch.stack([ds[i][0] for i in range(6)]))
        assert torch.equal(x, torch.stack([ds[(epoch, i)][0] for i in range(6)]))
        seen.append(x)
    assert not torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])
