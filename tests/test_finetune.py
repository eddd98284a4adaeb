"""Fine-tuning on small data (finetune.py, train.py's flags) and recognition without training (predict.py --backbone)."""
import json
import os
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY_BACKBONE, run, train_cmd


# ---------------------------------------------------------------- units against direct computations

def _shrunk_cov(x):
    """The covariance learn_whitening must whiten, computed here from its definition."""
    from sklearn.covariance import ledoit_wolf_shrinkage
    n, c = x.shape
    beta = max(ledoit_wolf_shrinkage(x - x.mean(0), assume_centered=True), 1 - n / c)
    xc = x - (1 - beta) * x.mean(0)  # the mean shrunk towards 0 by the same beta
    s = xc.T @ xc / n
    return (1 - beta) * s + beta * np.trace(s) / c * np.eye(c), beta


@pytest.mark.parametrize("n,c,dim", [(40, 64, 32), (500, 48, 48), (300, 64, 80)])
def test_whitening_whitens_the_shrunk_covariance(n, c, dim):
    from finetune import learn_whitening, whiten
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, c)) @ rng.normal(size=(c, c)) + 5.0  # correlated, off-centre
    P, m = learn_whitening(x, dim)
    cov, beta = _shrunk_cov(x)
    d = min(dim, c)
    assert P.shape == (d, c) and np.allclose(m, (1 - beta) * x.mean(0))
    assert np.allclose(P @ cov @ P.T, np.eye(d), atol=1e-8)
    # the leading components: P's rows span the top-d eigenvectors of the shrunk covariance
    w, u = np.linalg.eigh(cov)
    top = u[:, np.argsort(w)[::-1][:d]]
    assert np.allclose(np.abs(np.linalg.svd(top.T @ (P.T / np.linalg.norm(P, axis=1)))[1]), 1, atol=1e-6)
    assert (beta > 0.3) == (n < c)  # few images: strongly shrunk
    y = whiten(x, P, m)
    assert np.allclose(y, (x - m) @ P.T, atol=1e-4)


@pytest.mark.parametrize("beta", [None, 1.0])
def test_pca_neck_embeddings_keep_the_whitened_cosines(beta):
    """A model whose neck is set by --init-neck pca: its initial embeddings of
    images it did not see have the cosines of the whitened (beta = 1: projected)
    pooled features, computed directly (P (f - m)), to 1e-3."""
    from finetune import learn_whitening, neck_from_whitening, swish_linear_scale, whiten
    from models import build_model
    torch.manual_seed(0)
    model = build_model("resnet10t", 5).eval()
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(48, 3, 32, 32, generator=gen) * 255).to(torch.uint8)
    with torch.no_grad():
        f = model.extract(x).double().numpy()
    P, m = learn_whitening(f[:32], model.feat.out_features, beta=beta)
    w, b, scale = neck_from_whitening(P, m, model.feat.out_features, f[:32])
    with torch.no_grad():
        model.feat.weight.copy_(w)
        model.feat.bias.copy_(b)
        e = model.embed(x[32:]).double()
    y = F.normalize(torch.from_numpy((f[32:] - m) @ P.T), dim=1)
    assert (e @ e.T - y @ y.T).abs().max() < 1e-3
    # the rotation spreads the energy: a scale at least as large as without it keeps the same tolerance
    assert scale >= swish_linear_scale(whiten(f[:32], P, m))
    if beta == 1.0:
        assert not m.any() and not b.any()  # no centring


def test_spherical_kmeans_subcentres():
    """Each sub-centre is within 0.99 cosine of a centre of sklearn's k-means of
    its class's embeddings (well separated clusters: a unique solution), or of
    the class's mean for classes with fewer than 3 images; sub-centres of a
    class differ; classes without images are left out."""
    from sklearn.cluster import KMeans

    from finetune import imprint_subcenters
    rng = np.random.default_rng(0)
    emb, labels = [], []
    for c in range(6):
        n = [9, 10, 4, 2, 1, 7][c]
        centres = rng.normal(size=(3, 64))
        for i in range(n):
            emb.append(centres[i % 3] + 0.05 * rng.normal(size=64))
            labels.append(c)
    emb = F.normalize(torch.tensor(np.array(emb), dtype=torch.float32), dim=1).numpy()
    labels = np.array(labels)
    w, have = imprint_subcenters(emb, labels, 7, k=3, seed=0)
    assert w.shape == (21, 64) and list(have) == [True] * 6 + [False]
    for c in range(6):
        sub = F.normalize(w[3 * c:3 * c + 3], dim=1).numpy()
        e = emb[labels == c]
        if len(e) >= 3:
            km = KMeans(3, n_init=10, random_state=0).fit(e).cluster_centers_
            ref = km / np.linalg.norm(km, axis=1, keepdims=True)
            assert (sub @ ref.T).max(1).min() > 0.99, c
        else:
            mean = e.mean(0) / np.linalg.norm(e.mean(0))
            assert (sub @ mean).min() > 0.99, c
        assert (sub @ sub.T)[~np.eye(3, dtype=bool)].max() < 1 - 1e-6  # distinct sub-centres
    assert torch.equal(w[18:], torch.zeros(3, 64))


def test_init_sample_bounds():
    import pandas as pd

    from finetune import init_sample
    df = pd.DataFrame({"landmark_id": np.repeat(np.arange(20), np.arange(1, 21))})
    pca, imp = init_sample(df, 50, 4, seed=0)
    assert len(pca) == 50 and len(set(pca)) == 50
    counts = np.bincount(df["landmark_id"].to_numpy()[imp], minlength=20)
    assert list(counts) == [min(n, 4) for n in range(1, 21)]
    assert np.array_equal(init_sample(df, 50, 4, seed=0)[1], imp)  # deterministic


# ---------------------------------------------------------------- train.py

def _sd(path):
    return torch.load(path, weights_only=True)


def test_recipe_sets_only_what_was_not_given():
    from finetune import RECIPES
    from train import parse_args
    base = ["--kernel-type", "k", "--train-step", "0", "--image-size", "64", "--enet-type", "resnet10t"]
    a = parse_args(base)  # the original's defaults, untouched
    assert (a.freeze_backbone_epochs, a.backbone_lr_mult, a.warmup_factor, a.freeze_bn, a.init_neck, a.init_head,
            a.valid_stride, a.recipe_values) == (0, 1.0, 10.0, False, "random", "random", 15, {})
    a = parse_args(base + ["--recipe", "finetune", "--n-epochs", "5", "--backbone-lr-mult=0.5"])
    r = RECIPES["finetune"]
    assert (a.n_epochs, a.backbone_lr_mult) == (5, 0.5)
    assert (a.init_lr, a.freeze_backbone_epochs, a.freeze_bn, a.init_neck, a.init_head, a.valid_stride) == \
        (r["init_lr"], r["freeze_backbone_epochs"], r["freeze_bn"], "pca", "imprint", r["valid_stride"])
    assert "n_epochs" not in a.recipe_values and a.recipe_values["init_lr"] == r["init_lr"]
    a = parse_args(base + ["--recipe", "finetune", "--load-from", "x.pth"])  # keeps the loaded neck and head
    assert (a.init_neck, a.init_head) == ("random", "random")
    a = parse_args([*base[:3], "1", *base[4:], "--recipe", "finetune", "--load-from", "x.pth"])
    assert (a.init_neck, a.init_head) == ("random", "imprint")  # step 1: a new head


def test_inits_from_train_py_match_direct_computation(synth, tmp_path):
    """--init-neck pca --init-head imprint with lr 0 and the backbone frozen: the
    checkpoint holds the initial weights. Its embeddings of the training images
    keep the whitened cosines of its pooled features; each sub-centre is within
    0.99 cosine of the normalised mean of the class embeddings nearest to it (a
    k-means fixed point) or, below 3 images, of the class's mean."""
    from dataset import LandmarkDataset, get_df, get_transforms
    from models import build_model
    p = run([sys.executable, *train_cmd(synth, "init", 1, "--init-neck", "pca", "--init-head", "imprint",
                                        "--init-lr", "0", "--freeze-backbone-epochs", "1", "--valid-stride", "0",
                                        "--model-dir", str(tmp_path), "--init-samples-per-class", "5")], cwd=ROOT)
    # fewer images than WHITEN_MIN_RATIO per dimension: the projection, no whitening
    assert "--init-neck pca: projection (no whitening below 2 images per dimension)" in p.stdout
    assert "--init-head imprint: 3 sub-centres of 24 classes" in p.stdout
    ckpt = _sd(tmp_path / "init_fold0_final.pth")
    m = build_model(TINY_BACKBONE, ckpt["out_dim"], preprocessing=ckpt["args"]["preprocessing"])
    m.load_state_dict(ckpt["model_state_dict"])
    m.eval()
    df, _ = get_df("init", synth, 1, os.path.join(synth, "train_0.csv"))
    ds = LandmarkDataset(df, "train", "val", get_transforms(32, ckpt["args"]["preprocessing"]["interpolation"])[1])
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        f = m.extract(x).double()
        e = m.embed(x).double()
        lin = F.normalize(f @ m.feat.weight.double().T + m.feat.bias.double(), dim=1)
    assert (e @ e.T - lin @ lin.T).abs().max() < 1e-3
    # the projection onto the sample's leading directions (uncentred, beta = 1): no bias, orthogonal rows,
    # and the sampled images' embeddings keep the cosines of their raw pooled features
    w = m.feat.weight.detach().double().numpy()
    assert np.abs(m.feat.bias.detach().numpy()).max() == 0
    k = min(np.linalg.matrix_rank(f.numpy()), *w.shape)
    g = w[:k] @ w[:k].T
    assert np.allclose(g / g[0, 0], np.eye(k), atol=1e-5)
    fn = F.normalize(f, dim=1)
    assert (e @ e.T - fn @ fn.T).abs().max() < 1e-3
    # imprinting: the sample it read (init_sample, tested above), each sub-centre the normalised
    # mean of the sampled embeddings nearest to it (a fixed point of spherical k-means)
    from finetune import init_sample
    rows = init_sample(df, 20000, 5, seed=0)[1]
    labels = df["landmark_id"].to_numpy()[rows]
    es = e[torch.from_numpy(rows)]
    sub = F.normalize(m.metric_classify.weight.detach().double(), dim=1).view(-1, 3, 512)
    n_kmeans = 0
    for c in np.unique(labels):
        ec = es[torch.from_numpy(labels == c)]
        if len(ec) < 3:
            assert (sub[c] @ F.normalize(ec.mean(0), dim=0)).min() > 0.99
            continue
        n_kmeans += 1
        assign = (ec @ sub[c].T).argmax(1)
        for j in range(3):
            mine = ec[assign == j]
            assert len(mine) and float(sub[c, j] @ F.normalize(mine.mean(0), dim=0)) > 0.99, (c, j)
    assert n_kmeans >= 5


def test_inits_under_ddp_equal_one_process(synth, tmp_path):
    """2 gloo ranks, each reading its share of the init sample: the same initial
    neck and head as one process (rank 0 computes from the gathered rows)."""
    from conftest import free_port
    extra = ["--init-neck", "pca", "--init-head", "imprint", "--init-lr", "0", "--freeze-backbone-epochs", "1",
             "--valid-stride", "0"]
    run([sys.executable, *train_cmd(synth, "one", 1, *extra, "--model-dir", str(tmp_path / "a"))], cwd=ROOT)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         *train_cmd(synth, "two", 1, *extra, "--model-dir", str(tmp_path / "b"))], cwd=ROOT)
    # compared as functions on the training images: with fewer images than dimensions the
    # whitening's components beyond the images' span are any basis of a degenerate eigenspace
    from dataset import LandmarkDataset, get_df, get_transforms
    from models import build_model
    df, out_dim = get_df("x", synth, 1, os.path.join(synth, "train_0.csv"))
    outs = []
    for path in (tmp_path / "a" / "one_fold0_final.pth", tmp_path / "b" / "two_fold0_final.pth"):
        ckpt = _sd(path)
        m = build_model(TINY_BACKBONE, out_dim, preprocessing=ckpt["args"]["preprocessing"])
        m.load_state_dict(ckpt["model_state_dict"])
        m.eval()
        ds = LandmarkDataset(df, "train", "val", get_transforms(32, m.preprocessing["interpolation"])[1])
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            e, cos = m.embed_and_classify(x)
        outs.append((e @ e.T, cos))
    (ea, ca), (eb, cb) = outs
    assert (ea - eb).abs().max() < 1e-3 and (ca - cb).abs().max() < 1e-3
    assert ca.argmax(1).eq(torch.tensor(df["landmark_id"].to_numpy())).float().mean() > 0.5  # imprinted: it knows


def test_freezing_keeps_backbone_and_bn_then_releases_them(ddp_run, tmp_path):
    """--freeze-backbone-epochs 1: after epoch 1 every backbone weight and batch-norm
    buffer is bit-identical to the loaded ones and the neck moved; after epoch 2
    both changed. --freeze-bn: the batch-norm buffers and affine weights stay all run
    while the rest of the backbone trains."""
    synth, w = ddp_run["data"], str(tmp_path)
    source = os.path.join(synth, "weights", "ddp0_fold0.pth")  # the session's step-0 run: a trained source
    src = _sd(source)["model_state_dict"]
    load = ["--load-from", source, "--model-dir", w]
    run([sys.executable, *train_cmd(synth, "frz", 0, *load, "--freeze-backbone-epochs", "1", "--save-epochs", "1",
                                    "--init-lr", "1e-3", epochs=2)], cwd=ROOT)
    e1, e2 = (_sd(tmp_path / n)["model_state_dict"] for n in ("frz_fold0_ep1.pth", "frz_fold0_final.pth"))
    backbone = [k for k in src if k.startswith("enet.")]
    bn_buffers = [k for k in backbone if "running_" in k]
    assert bn_buffers and all(torch.equal(e1[k], src[k]) for k in backbone)
    assert not torch.equal(e1["feat.weight"], src["feat.weight"])
    assert not all(torch.equal(e2[k], src[k]) for k in backbone if "running_" not in k and "num_batches" not in k)
    assert not all(torch.equal(e2[k], src[k]) for k in bn_buffers)

    run([sys.executable, *train_cmd(synth, "fbn", 0, *load, "--freeze-bn", "--init-lr", "1e-3", epochs=2)], cwd=ROOT)
    fb = _sd(tmp_path / "fbn_fold0_final.pth")["model_state_dict"]
    from models import build_model
    m = build_model(TINY_BACKBONE, 36)
    bn_keys = {f"{name}.{k}" for name, mod in m.named_modules() if mod in m.backbone_batchnorms()
               for k in mod.state_dict()}
    assert bn_keys and all(torch.equal(fb[k], src[k]) for k in bn_keys)
    convs = [k for k in backbone if k not in bn_keys]
    assert not all(torch.equal(fb[k], src[k]) for k in convs)


def test_two_learning_rates_per_epoch(synth, tmp_path):
    from util import get_lr
    run([sys.executable, *train_cmd(synth, "lr2", 0, "--backbone-lr-mult", "0.1", "--warmup-factor", "4",
                                    "--init-lr", "1e-3", "--save-epochs", "1,2,3", "--model-dir", str(tmp_path),
                                    epochs=4)], cwd=ROOT)
    from models import build_model
    n_backbone = len(list(build_model(TINY_BACKBONE, 36).enet.parameters()))
    for e in (1, 2, 3, 4):
        name = f"lr2_fold0_ep{e}.pth" if e < 4 else "lr2_fold0_final.pth"
        groups = _sd(tmp_path / name)["optimizer_state_dict"]["param_groups"]
        lr = get_lr(e, 1e-3, 4, 4.0)
        assert [g["lr"] for g in groups] == pytest.approx([0.1 * lr, lr], rel=1e-12), e
        assert [g["lr_mult"] for g in groups] == [0.1, 1.0] and len(groups[0]["params"]) == n_backbone
    assert get_lr(2, 1e-3, 4, 4.0) == pytest.approx(4e-3)


def test_resume_with_two_groups_and_a_freeze(synth, tmp_path):
    """3 epochs in one go == 2 epochs, stop, --resume auto, with a frozen first
    epoch, two parameter groups and --freeze-bn: the same weights bit for bit."""
    extra = ["--freeze-backbone-epochs", "1", "--backbone-lr-mult", "0.1", "--freeze-bn", "--init-lr", "1e-3",
             "--init-neck", "pca", "--model-dir", str(tmp_path)]
    run([sys.executable, *train_cmd(synth, "ftfull", 0, *extra, epochs=3)], cwd=ROOT)
    run([sys.executable, *train_cmd(synth, "fthalf", 0, *extra, "--stop-at-epoch", "2", epochs=3)], cwd=ROOT)
    run([sys.executable, *train_cmd(synth, "fthalf", 0, *extra, "--resume", "auto", epochs=3)], cwd=ROOT)
    a, b = _sd(tmp_path / "ftfull_fold0_final.pth"), _sd(tmp_path / "fthalf_fold0_final.pth")
    assert a["epoch"] == b["epoch"] == 3
    groups = a["optimizer_state_dict"]["param_groups"]
    assert [g["name"] for g in groups] == ["backbone", "neck", "head"] and 0 < groups[1]["lr_mult"] != 1.0
    for k, v in a["model_state_dict"].items():
        assert torch.equal(v, b["model_state_dict"][k]), k
    assert [g["lr"] for g in a["optimizer_state_dict"]["param_groups"]] == \
        [g["lr"] for g in b["optimizer_state_dict"]["param_groups"]]
    # another --backbone-lr-mult than the checkpoint's groups: one line, exit 2
    p = __import__("subprocess").run([sys.executable, *train_cmd(synth, "fthalf", 0, "--resume", "auto",
                                                                 "--model-dir", str(tmp_path), epochs=4)],
                                     cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "parameter group" in p.stderr and "Traceback" not in p.stderr


def test_valid_stride_and_gem_from_avg(synth, tmp_path):
    """--valid-stride 0: every image trains, no validation (nan in the log, the
    summary says so); the default warns when fewer than 30 images are validated.
    --pool gem from an avg checkpoint starts p at 3 with a note."""
    from plot_logs import read_log
    p = run([sys.executable, *train_cmd(synth, "vs0", 0, "--valid-stride", "0", "--model-dir", str(tmp_path))],
            cwd=ROOT)
    assert "no epoch was validated" in p.stdout
    row = read_log(os.path.join(synth, "logs", "vs0.txt"))[0]
    assert np.isnan(row["gap"]) and np.isnan(row["valid_loss"])
    # a chart only for what was measured: the loss alone
    import plot_logs
    assert plot_logs.plot(plot_logs.read_logs([os.path.join(synth, "logs", "vs0.txt")]), tmp_path / "c.png") == \
        ["loss"]
    p = run([sys.executable, *train_cmd(synth, "vs15", 0, "--model-dir", str(tmp_path))], cwd=ROOT)
    assert "warning: only" in p.stdout
    p = run([sys.executable, *train_cmd(synth, "gem", 0, "--pool", "gem", "--model-dir", str(tmp_path),
                                        "--load-from", str(tmp_path / "vs0_fold0_final.pth"), "--init-lr", "0")],
            cwd=ROOT)
    assert "has no GeM p" in p.stdout
    assert _sd(tmp_path / "gem_fold0_final.pth")["model_state_dict"]["pool.p"].item() == pytest.approx(3.0)


def test_valid_stride_zero_trains_every_image(synth):
    import train
    from dataset import get_df
    df, _ = get_df("x", synth, 0, os.path.join(synth, "train_0.csv"))
    seen = {}

    class Stop(Exception):
        pass

    def fake_train_one_epoch(args, model, loader, *a, **kw):
        seen["n"] = len(loader.dataset)
        raise Stop

    orig = train.train_one_epoch
    train.train_one_epoch = fake_train_one_epoch
    try:
        for stride, n in ((0, len(df)), (15, int((df["fold"] != 0).sum()))):
            with pytest.raises(Stop):
                train.main(train_cmd(synth, f"vsz{stride}", 0, "--valid-stride", str(stride), "--overwrite")[1:])
            assert seen["n"] == n
    finally:
        train.train_one_epoch = orig


# ---------------------------------------------------------------- recognition without training

def _photo_folders(root, n_landmarks=3, per=4, size=64, seed=0):
    """Folders of images of a few 'landmarks': each a fixed random pattern, with noise per photo."""
    rng = np.random.default_rng(seed)
    for lm in range(n_landmarks):
        base = rng.integers(0, 255, (8, 8, 3)).astype(np.float32)
        for i in range(per):
            img = cv2.resize(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8), (size, size),
                             interpolation=cv2.INTER_NEAREST)
            os.makedirs(os.path.join(root, f"lm{lm}"), exist_ok=True)
            cv2.imwrite(os.path.join(root, f"lm{lm}", f"{i}.jpg"), img)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A timm state dict (random weights) standing in for ImageNet weights: --pretrained-path."""
    import timm
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    return str(path)


def test_letterbox_extent_and_pooling_within():
    """models.letterbox_extent reads the picture's rows and columns from the pixels (the fill at the
    bottom and right); pool_within averages (or GeM-pools) exactly the cells the picture starts in."""
    from models import letterbox_extent, pool_within
    fill = np.array([124, 116, 104], np.uint8)
    x = torch.from_numpy(np.broadcast_to(fill.reshape(1, 3, 1, 1), (4, 3, 64, 64)).copy())
    x[0, :, :32, :64] = 7          # a wide picture: 32 rows, 64 columns
    x[1, 1, :64, :20] = 200        # a tall one: one channel differs from the fill
    x[2, :, :40, :50] = 9
    x[2, :, 30:40, :] = torch.from_numpy(fill).view(3, 1, 1)  # its own last rows are the fill colour
    # x[3]: the fill colour alone keeps its whole extent
    np.testing.assert_array_equal(letterbox_extent(x, fill).numpy(), [[32, 64], [64, 20], [30, 50], [64, 64]])
    f = torch.randn(4, 5, 4, 4).abs()  # a map of stride 16: a picture of 30 rows starts in rows 0 and 1
    ext = letterbox_extent(x, fill)
    got = pool_within(f, ext, (64, 64))
    want = torch.stack([f[0, :, :2, :4].mean((1, 2)), f[1, :, :4, :2].mean((1, 2)), f[2, :, :2, :4].mean((1, 2)),
                        f[3].mean((1, 2))])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(pool_within(f, ext, (64, 64), p=3.0)[1], f[1, :, :4, :2].pow(3).mean((1, 2)).pow(1 / 3))


def test_keep_aspect_backbone_equals_direct_letterbox(tmp_path, weights_file):
    """--backbone keeps each photo's aspect by default: its longer side at the size, on a square of the
    mean colour, pooled over the picture's cells; checked against the letterbox made by hand and the
    map cropped by hand. The index records the resize; a square one is refused with the flags that
    read it; keep-aspect is refused with --spec and with a backbone without a spatial map."""
    import predict
    from models import build_model
    from util import UserError
    rng = np.random.default_rng(0)
    for d, shapes in (("g", [(48, 96), (96, 48), (64, 64), (48, 96)]), ("q", [(96, 48), (48, 96)])):
        for i, (h, w) in enumerate(shapes):
            os.makedirs(tmp_path / d / f"lm{i % 2}", exist_ok=True)
            img = cv2.resize(rng.integers(0, 255, (h // 16, w // 16, 3)).astype(np.uint8), (w, h),
                             interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(tmp_path / d / f"lm{i % 2}" / f"{i}.png"), img)
    common = ["--backbone", "resnet10t", "--pretrained-path", weights_file, "--image-size", "64", "--scales", "1",
              "--query-dir", str(tmp_path / "q"), "--num-workers", "0", "--no-calibrate", "--whiten", "off"]
    res = predict.main([*common, "--gallery-dir", str(tmp_path / "g"), "--out", str(tmp_path / "p.csv"),
                        "--save-index", str(tmp_path / "idx")])
    net = build_model("resnet10t", 1, pretrained=True, pretrained_path=weights_file, pool="gem").eval()
    fill = np.round(np.array(net.preprocessing["mean"]) * 255).astype(np.uint8)

    def feat(path):
        im = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        h, w = im.shape[:2]
        hh, ww = h * 64 // max(h, w), w * 64 // max(h, w)  # whole pixels for these shapes
        canvas = np.empty((64, 64, 3), np.uint8)
        canvas[:] = fill
        canvas[:hh, :ww] = cv2.resize(im, (ww, hh), interpolation=cv2.INTER_CUBIC)
        with torch.no_grad():
            m = net.enet(net.normalize_input(torch.from_numpy(canvas).permute(2, 0, 1)[None]))[0]  # stride 32: 2x2
        return F.normalize(m[:, :hh // 32, :ww // 32].mean((1, 2)), dim=0)
    g = sorted(str(p) for p in (tmp_path / "g").rglob("*.png"))
    q = sorted(str(p) for p in (tmp_path / "q").rglob("*.png"))
    s = torch.stack([feat(p) for p in q]) @ torch.stack([feat(p) for p in g]).T
    np.testing.assert_allclose(np.sort(res["neighbours"][0][:, :4], 1), np.sort(s.numpy(), 1), atol=1e-4)
    assert json.load(open(tmp_path / "idx.json"))["models"][0]["resize"] == "keep-aspect"
    with pytest.raises(UserError, match="other models.*built with --scales 1 --resize keep-aspect"):
        predict.main([*common, "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "p.csv"), "--resize", "square"])
    with pytest.raises(UserError, match="--resize keep-aspect goes with --backbone"):
        predict.main(["--spec", "s.json", "--gallery-dir", str(tmp_path / "g"), "--query-dir", str(tmp_path / "q"),
                      "--resize", "keep-aspect"])
    with pytest.raises(UserError, match="--resize keep-aspect: rex20 gives no spatial map"):
        predict.main(["--backbone", "rex20", "--gallery-dir", str(tmp_path / "g"), "--query-dir", str(tmp_path / "q"),
                      "--resize", "keep-aspect"])


def test_zero_training_on_folders_equals_direct_retrieval(tmp_path, weights_file, capsys):
    import predict
    from dataset import get_transforms, read_rgb
    from models import build_model
    _photo_folders(tmp_path / "g")
    _photo_folders(tmp_path / "q", per=2, seed=0)
    qdir = tmp_path / "queries"
    os.makedirs(qdir)
    for lm in range(3):
        for i in range(2):
            os.link(tmp_path / "q" / f"lm{lm}" / f"{i}.jpg", qdir / f"lm{lm}_{i}.jpg")
    out = tmp_path / "pred.csv"
    # --no-calibrate: the confidence is the best cosine itself, checked below against a direct computation
    common = ["--backbone", "resnet10t", "--pretrained-path", weights_file, "--image-size", "48",
              "--query-dir", str(qdir), "--num-workers", "0", "--no-calibrate", "--scales", "1"]
    predict.main([*common, "--gallery-dir", str(tmp_path / "g"), "--out", str(out), "--save-index",
                  str(tmp_path / "idx"), "--whiten", "off"])
    got = __import__("pandas").read_csv(out)
    # direct: the timm model's pooled features of the same inputs, nearest gallery image by cosine
    net = build_model("resnet10t", 1, pretrained=True, pretrained_path=weights_file).eval()
    val = get_transforms(48, net.preprocessing["interpolation"])[1]

    def feats(paths):
        x = torch.stack([torch.from_numpy(val(image=read_rgb(p))["image"]).permute(2, 0, 1) for p in paths])
        with torch.no_grad():
            return F.normalize(net.extract(x), dim=1)

    from gallery import folder_gallery, list_images
    g = folder_gallery(str(tmp_path / "g"))
    gf = feats([os.path.join(tmp_path, "g", p) for p, _ in g])
    qs = list_images(str(qdir))
    s = feats([os.path.join(qdir, q) for q in qs]) @ gf.T
    best = s.max(1).values
    assert list(got["path"]) == qs
    assert list(got["landmark"]) == [g[j][1] for j in s.argmax(1).tolist()]
    assert np.allclose(got["confidence"], best.numpy(), atol=1e-4)
    # --whiten learned: the mean of the raw cosine and the cosine after the whitening of the gallery's
    # within-landmark scatter (retrieval.learn_within_whitening, tested by hand in test_calibration.py)
    from retrieval import learn_within_whitening, learned_whitened
    out3 = tmp_path / "pred3.csv"
    predict.main([*common, "--gallery-dir", str(tmp_path / "g"), "--out", str(out3), "--whiten", "learned"])
    got3 = __import__("pandas").read_csv(out3)
    w = learn_within_whitening(gf.numpy(), np.array([lm for _, lm in g]))
    s3 = torch.from_numpy(learned_whitened(feats([str(qdir / q) for q in qs]).numpy(), w)
                          @ learned_whitened(gf.numpy(), w).T)
    assert list(got3["landmark"]) == [g[j][1] for j in s3.argmax(1).tolist()]
    # the whitening magnifies the extraction's last bits (here 3e-4); the raw cosines differ by far more
    assert np.allclose(got3["confidence"], s3.max(1).values.numpy(), atol=1e-3)
    assert not np.allclose(got3["confidence"], best.numpy(), atol=1e-2)
    # calibrated without training: the prior of one in three (calibration.UNKNOWN_SHARE), the index key keeps it
    capsys.readouterr()
    predict.main([*common, "--gallery-dir", str(tmp_path / "g"), "--out", str(tmp_path / "pred4.csv"), "--calibrate",
                  "--save-index", str(tmp_path / "idx4")])
    assert "prior: 33% of photos show places" in capsys.readouterr().out
    key = json.load(open(tmp_path / "idx4.json"))["calibration"]["key"]
    assert key["unknown_share"] == pytest.approx(1 / 3)
    # the saved index answers the same; another backbone's signature is refused
    out2 = tmp_path / "pred2.csv"
    predict.main([*common, "--index", str(tmp_path / "idx"), "--out", str(out2), "--whiten", "off"])
    assert __import__("pandas").read_csv(out2)[["landmark"]].equals(got[["landmark"]])
    with pytest.raises(Exception, match="other models"):
        predict.main([*common[:4], "--image-size", "40", *common[6:], "--index", str(tmp_path / "idx"),
                      "--out", str(out2)])


def test_zero_training_whitening_is_learnt_on_the_gallery(tmp_path, weights_file):
    """--whiten pca: retrieval on P (f - m) with (P, m) learnt from the gallery's pooled features."""
    import retrieval
    from finetune import learn_whitening, whiten
    g = np.random.default_rng(0).normal(size=(30, 16)).astype(np.float32)
    q = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    gw, qw, none = retrieval.whitened_embeddings(g, q, None, whiten_mode="pca")
    P, m = learn_whitening(g)
    ref = whiten(q, P, m)
    assert none is None and np.allclose(qw, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    # auto: a gallery of fewer than WHITEN_MIN_RATIO images per dimension stays as it is
    gw, qw = retrieval.whitened_embeddings(g, q, whiten_mode="auto")
    assert np.allclose(qw, q / np.linalg.norm(q, axis=1, keepdims=True), atol=1e-6)
    big = np.random.default_rng(2).normal(size=(16 * retrieval.WHITEN_MIN_RATIO, 16)).astype(np.float32)
    gw, qw = retrieval.whitened_embeddings(big, q, whiten_mode="auto")
    P, m = learn_whitening(big)
    ref = whiten(q, P, m)
    assert np.allclose(qw, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)


def test_learned_whitening_needs_the_gallery_landmarks():
    """--whiten learned learns from the gallery's landmarks: a database without them (evaluate_retrieval.py)
    is refused as a user mistake; with them, the space refits on the rows it is told to learn from."""
    from types import SimpleNamespace
    from ensemble import Ensemble
    from util import UserError
    ens = Ensemble([SimpleNamespace(classifies=False)], None, {}, ("sum", 9, 10), "test", whiten="learned")
    g = np.random.default_rng(0).normal(size=(12, 6)).astype(np.float32)
    with pytest.raises(UserError, match="--whiten learned"):
        ens.fit([g])
    labels = np.repeat([1, 2, 3], 4)
    space = ens.fit([g], labels)
    assert space.whiten == "learned" and space.gallery[0].shape == (12, 12)
    keep = labels != 3
    from retrieval import learn_within_whitening, learned_whitened
    np.testing.assert_allclose(space.refit(keep)[0], learned_whitened(g, learn_within_whitening(g[keep], labels[keep])))
    assert not np.allclose(space.refit(keep)[0], space.gallery[0], atol=1e-3)


def test_predict_backbone_flag_errors(tmp_path):
    p = __import__("subprocess").run([sys.executable, "predict.py", "--backbone", "resnet10t", "--spec", "s.json",
                                      "--gallery-dir", "g", "--query-dir", "q"], cwd=ROOT, capture_output=True,
                                     text=True)
    assert p.returncode == 2 and "not both" in p.stderr


# ---------------------------------------------------------------- the benchmark

def test_bench_transfer_smoke(tmp_path, weights_file):
    """scripts/bench.py transfer at a tiny size: every run through the real CLIs, one JSON line each."""
    _photo_folders(tmp_path / "photos", n_landmarks=3, per=5, size=48)
    _photo_folders(tmp_path / "distract", n_landmarks=1, per=2, size=48, seed=5)
    p = run([sys.executable, "scripts/bench.py", "transfer", "--photos", str(tmp_path / "photos"),
             "--distractors", str(tmp_path / "distract" / "lm0"), "--enet-type", "resnet10t",
             "--pretrained-path", weights_file, "--image-size", "32", "--batch-size", "4", "--seeds", "0",
             "--original-epochs", "1", "--train-args", "--n-epochs 2 --freeze-backbone-epochs 1"], cwd=ROOT)
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    runs = {r["run"]: r for r in lines if r["what"] == "transfer"}
    assert set(runs) == {"zero", "original", "finetune"}
    assert runs["zero"]["classifier"] is None and 0 <= runs["zero"]["retrieval"] <= 1
    for r in ("original", "finetune"):
        assert all(0 <= runs[r][k] <= 1 for k in ("retrieval", "classifier", "ensemble"))
        assert runs[r]["queries"] == 3 + 2 and runs[r]["gallery"] == 3 * 4
    assert {r["run"] for r in lines if r["what"] == "transfer_mean"} == {"zero", "original", "finetune"}


def test_from_folder_with_fewer_photos_than_folds(tmp_path):
    """Two photos per landmark (StratifiedKFold refuses it): folds dealt round-robin, balanced, reproducible."""
    import pandas as pd

    import preprocess
    _photo_folders(tmp_path / "p", n_landmarks=7, per=2, size=16)
    preprocess.main(["--from-folder", str(tmp_path / "p"), "--out-dir", str(tmp_path / "d")])
    df = pd.read_csv(tmp_path / "d" / "train_0.csv")
    counts = np.bincount(df["fold"], minlength=5)
    assert counts.sum() == 14 and counts.max() - counts.min() <= 1
    assert (df.groupby("landmark_id")["fold"].nunique() == 2).all()  # a landmark's photos in different folds
    preprocess.main(["--from-folder", str(tmp_path / "p"), "--out-dir", str(tmp_path / "d2")])
    assert pd.read_csv(tmp_path / "d2" / "train_0.csv").equals(df)


def test_multiscale_descriptors_and_gem_p(tmp_path, weights_file):
    """--scales: every image embedded at each multiple of the size, unit-length features averaged
    (checked against the model run directly at both sizes); the index records the scales and refuses
    another set; --gem-p sets GeM's exponent of a --backbone --pool gem."""
    import ensemble
    import predict
    from dataset import get_transforms, read_rgb
    from features import multiscale
    from gallery import folder_gallery, list_images
    from models import build_model
    from util import UserError
    a = np.array([[3.0, 4.0], [np.nan, np.nan]], np.float32)
    b = np.array([[0.0, 2.0], [1.0, 0.0]], np.float32)
    np.testing.assert_allclose(multiscale([a, b]), [[0.3, 0.9], [np.nan, np.nan]])
    _photo_folders(tmp_path / "g")
    _photo_folders(tmp_path / "q", per=2, seed=0)
    common = ["--backbone", "resnet10t", "--pretrained-path", weights_file, "--image-size", "48",
              "--query-dir", str(tmp_path / "q"), "--num-workers", "0", "--no-calibrate", "--whiten", "off"]
    out = tmp_path / "pred.csv"
    res = predict.main([*common, "--gallery-dir", str(tmp_path / "g"), "--out", str(out), "--save-index",
                        str(tmp_path / "idx"), "--scales", "1,1.5"])
    net = build_model("resnet10t", 1, pretrained=True, pretrained_path=weights_file).eval()

    def feats(paths):
        per = []
        for size in (48, 72):
            val = get_transforms(size, net.preprocessing["interpolation"])[1]
            x = torch.stack([torch.from_numpy(val(image=read_rgb(p))["image"]).permute(2, 0, 1) for p in paths])
            with torch.no_grad():
                per.append(F.normalize(net.extract(x), dim=1))
        return F.normalize((per[0] + per[1]) / 2, dim=1)
    g = folder_gallery(str(tmp_path / "g"))
    qs = list_images(str(tmp_path / "q"))
    s = feats([os.path.join(tmp_path, "q", q) for q in qs]) @ feats([os.path.join(tmp_path, "g", p) for p, _ in g]).T
    np.testing.assert_allclose(res["neighbours"][0][:, 0], s.max(1).values.numpy(), atol=1e-4)
    assert [g[j][1] for j in s.argmax(1).tolist()] == list(__import__("pandas").read_csv(out)["landmark"])
    assert json.load(open(tmp_path / "idx.json"))["models"][0]["scales"] == [1.0, 1.5]
    with pytest.raises(UserError, match="other models.*built with --scales 1,1.5"):  # one scale: refused, hinted
        predict.main([*common, "--index", str(tmp_path / "idx"), "--out", str(out), "--scales", "1"])
    # the defaults (chosen on the real sets): a CNN backbone without training keeps the aspect at 1, 1.4, 2;
    # squares at 0.7, 1, 1.4 (asked for, or a backbone without a spatial map); one square scale for --spec
    for argv, resize, scales in ((["--backbone", "resnet10t"], "keep-aspect", (1.0, 1.4, 2.0)),
                                 (["--backbone", "resnet10t", "--resize", "square"], "square", (0.7, 1.0, 1.4)),
                                 (["--backbone", "rex20"], "square", (0.7, 1.0, 1.4)),
                                 (["--backbone", "vit_small_patch16_224"], "square", (0.7, 1.0, 1.4)),
                                 (["--spec", "s.json"], "square", (1.0,))):
        a = predict.parse_args([*argv, "--gallery-dir", "g"])
        assert (ensemble.resize_of(a), ensemble.scales_of(a)) == (resize, scales), argv
    # --gem-p: the exponent of the backbone's GeM, recorded in the signature
    m = ensemble.PretrainedBackbone("resnet10t", weights_file, pool="gem", image_size=48, gem_p=4.5)
    assert m.model.net.pool.p.item() == 4.5 and m.signature()["gem_p"] == 4.5
    with pytest.raises(UserError, match="--gem-p"):
        ensemble.PretrainedBackbone("resnet10t", weights_file, pool="avg", image_size=48, gem_p=4.5)
