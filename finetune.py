"""Fine-tuning from pretrained weights on a small or new data set (beyond the original).

The original recipe is built for GLDv2's 1.58 M images: a new neck and head
from random, every layer and batch-norm statistic trained at 10x the base
rate. On a few hundred photos that forgets what the ImageNet backbone knows
(docs/transfer.md). What protects it, each a train.py flag:

- the neck `Linear(C, 512)` starts as the PCA whitening of the backbone's
  pooled features (`learn_whitening`, `neck_from_whitening`): the first
  embeddings rank images as the whitened features do, which are a better
  retrieval descriptor than the raw ones given enough images (Jegou & Chum,
  ECCV 2012; Radenovic et al.'s learned whitening, TPAMI 2018, has the same
  weight = P, bias = -P m form). From fewer than WHITEN_MIN_RATIO images per
  dimension it is the projection onto their leading directions without
  whitening, which ranks them as the raw features do;
- each class's sub-centres start at its training images' embeddings (weight
  imprinting, Qi, Brown & Lowe, CVPR 2018; `imprint_subcenters`): the
  classifier starts as nearest-class-mean retrieval instead of random;
- the backbone frozen for the first epochs, then trained at a fraction of the
  rate, with its batch-norm statistics fixed (models.Net.set_frozen);
- `--recipe finetune` sets all of these at once (RECIPES).

Both inits read one bounded sample of the training images through the
validation transform, sharded over the ranks under DDP (imprinting reads only
the rows the PCA sample lacks); rank 0 computes the weights and broadcasts them.
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dataset import LandmarkDataset, collate
from retrieval import WHITEN_MIN_RATIO, learn_whitening, whiten
from util import memory_format, print0

# the largest pre-activation scale at which Swish still keeps the whitened cosines to this
# tolerance on the init sample (measured, not assumed: it depends on the features)
SWISH_LINEAR_TOL = 5e-4
SCALE_GRID = (0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 5e-4, 2e-4, 1e-4)
SUBCENTER_NOISE = 0.05  # norm of the noise that separates the sub-centres of a class with fewer than k images


def _cosines(x):
    x = F.normalize(torch.as_tensor(x, dtype=torch.float64), dim=1)
    return x @ x.T


def swish_linear_scale(whitened, tol=SWISH_LINEAR_TOL):
    """The largest scale a of SCALE_GRID at which the cosines of swish(a y)
    equal those of the whitened y to `tol` on these rows (a sample): Swish
    (x sigmoid x) is x/2 + x^2/4 + O(x^4) near 0, so its distortion of the
    cosines falls with a."""
    y = torch.as_tensor(np.asarray(whitened[:256]), dtype=torch.float64)
    ref = _cosines(y)
    for a in SCALE_GRID:
        if (_cosines(F.silu(a * y)) - ref).abs().max() <= tol:
            return a
    return SCALE_GRID[-1]


def spread_rotation(d, seed=0):
    """A fixed random orthogonal (d, d) matrix (QR of a seeded Gaussian, signs fixed)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def neck_from_whitening(P, m, out_dim, sample):
    """Weight (out_dim, C), bias (out_dim,) and scale a of the neck Linear: a R P and
    -a R P m, R = spread_rotation: rows beyond P's components are 0 (their Swish
    output is 0, a direction training can still open: the gradient of Swish at 0
    is 1/2). R changes no cosine but spreads each image's energy over all
    outputs: without it the leading component (the features' mean direction,
    when the mean is kept) holds most of it, and Swish bends that one coordinate
    most; spread, the near-linear scale measured on `sample` (raw features, N x C)
    is about 10 times larger (realdev: 1e-3 against 1e-4 for the same 5e-4), the
    neck's weights that much further from float16's subnormals."""
    C = P.shape[1]
    d = min(out_dim, len(P))
    Q = spread_rotation(d) @ P[:d]
    scale = swish_linear_scale(whiten(sample, Q, m))
    weight, bias = np.zeros((out_dim, C)), np.zeros(out_dim)
    weight[:d] = scale * Q
    bias[:d] = -scale * (Q @ m)
    return torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32), scale


# ---------------------------------------------------------------- imprinting

def _spherical_kmeans(x, mask, k, iters=20):
    """Batched spherical k-means: x (B, L, D) unit rows, mask (B, L) valid rows
    (each batch row has >= k valid). Initialised by farthest points (the row
    closest to the mean first), deterministic. Returns (B, k, D) unit centres."""
    B, L, _ = x.shape
    neg = torch.finfo(x.dtype).min
    mean = F.normalize((x * mask[..., None]).sum(1), dim=1)
    score = torch.where(mask, (x @ mean[:, :, None]).squeeze(2), neg)
    picks = [score.argmax(1)]
    best = torch.full((B, L), 2.0, dtype=x.dtype, device=x.device)  # max cosine to the chosen centres
    for _ in range(1, k):
        c = x[torch.arange(B), picks[-1]]
        best = torch.minimum(best, 1 - (x @ c[:, :, None]).squeeze(2))  # cosine distance to the nearest pick
        picks.append(torch.where(mask, best, neg).argmax(1))
    centres = torch.stack([x[torch.arange(B), p] for p in picks], 1)  # (B, k, D)
    for _ in range(iters):
        assign = (x @ centres.transpose(1, 2)).argmax(2)                # (B, L)
        onehot = F.one_hot(assign, k).to(x.dtype) * mask[..., None]   # (B, L, k)
        sums = onehot.transpose(1, 2) @ x                               # (B, k, D)
        empty = onehot.sum(1) == 0                                      # a centre that lost its points stays
        centres = torch.where(empty[..., None], centres, F.normalize(sums, dim=2))
    return centres


def imprint_subcenters(embeddings, labels, n_classes, k=3, seed=0, chunk=4096):
    """Sub-centre weights (n_classes * k, D) from unit embeddings (N, D) of
    training images with class labels (N,): row c*k + j is class c's j-th
    sub-centre (models.ArcMarginProductSubcenter's layout). A class with >= k
    images gets the k centres of a spherical k-means of its embeddings, one
    with fewer gets their normalised mean plus noise of norm SUBCENTER_NOISE
    per sub-centre (distinct, cosine ~0.999 to the mean). Also returns the
    (n_classes,) mask of the classes set; the others keep their weights."""
    emb = F.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=1)
    labels = np.asarray(labels, np.int64)
    D = emb.shape[1]
    out = torch.zeros(n_classes, k, D)
    counts = np.bincount(labels, minlength=n_classes)
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    gen = torch.Generator().manual_seed(seed)
    few = np.flatnonzero((counts > 0) & (counts < k))
    for c in few:
        mean = F.normalize(emb[order[starts[c]:starts[c + 1]]].mean(0), dim=0)
        noise = torch.randn(k, D, generator=gen)
        out[c] = F.normalize(mean + SUBCENTER_NOISE * F.normalize(noise, dim=1), dim=1)
    many = np.flatnonzero(counts >= k)
    for b0 in range(0, len(many), chunk):
        cls = many[b0:b0 + chunk]
        L = int(counts[cls].max())
        x = torch.zeros(len(cls), L, D)
        mask = torch.zeros(len(cls), L, dtype=torch.bool)
        for r, c in enumerate(cls):
            n = counts[c]
            x[r, :n] = emb[order[starts[c]:starts[c] + n]]
            mask[r, :n] = True
        out[cls] = _spherical_kmeans(x, mask, k)
    return out.reshape(n_classes * k, D), counts > 0


# ---------------------------------------------------------------- the init pass

def init_sample(df, n_max, per_class, seed):
    """Rows of df for the inits: up to n_max at random (PCA), and up to
    per_class of each class (imprinting), as two index arrays."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(df))
    pca = np.sort(perm[:n_max])
    labels = df["landmark_id"].to_numpy()[perm]
    rank = pd.Series(labels).groupby(labels).cumcount().to_numpy()  # the first per_class of each class, permuted
    imprint = np.sort(perm[rank < per_class])
    return pca, imprint


def _all_rows(local, n, world_size):
    """Rows r, r+W, ... from each rank r (local) -> all n rows in order, on every rank."""
    if world_size == 1:
        return local
    size = math.ceil(n / world_size)
    padded = torch.zeros((size, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, 1).reshape(size * world_size, *local.shape[1:])[:n]


@dataclass
class Reader:
    """How the init passes read their sample: the validation transform, the device, batch_size and
    num_workers of the loader, the autocast context of the training step, this rank and the
    number of ranks (rank r reads rows r, r+W, ...)."""
    transform: object
    device: torch.device
    batch_size: int
    num_workers: int
    autocast: object
    rank: int = 0
    world_size: int = 1


@torch.no_grad()
def pass_over(fn, dim, model, df, reader):
    """fn(model, x) (width dim) of every row of df (validation transform, eval
    mode), each rank reading its share; every rank gets all rows, float32."""
    device = reader.device
    idx = np.arange(reader.rank, len(df), reader.world_size)
    ds = LandmarkDataset(df.iloc[idx], "train", "val", reader.transform, skip_bad=True)
    loader = DataLoader(ds, batch_size=reader.batch_size, num_workers=reader.num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    out = []
    for x, _, _ in loader:
        with reader.autocast():
            out.append(fn(model, x.to(device, non_blocking=True, memory_format=memory_format(device))).float())
    model.train(was_training)
    local = torch.cat(out) if out else torch.zeros((0, dim), device=device)
    return _all_rows(local, len(df), reader.world_size)


def init_neck_and_head(model, df_train, reader, args):
    """--init-neck pca and --init-head imprint, in place on `model` (before the
    first step), from the sample init_sample draws of df_train. Every rank reads
    its share of the sample (reader: a Reader); rank 0 computes and broadcasts,
    so all ranks start from the same weights.

    Returns the neck's learning-rate multiplier with --init-neck pca (else None):
    the RMS of its new weights over that of the default init it replaced. The
    near-linear scale makes the whitening's weights orders of magnitude smaller
    than a default Linear's, and Adam's steps are absolute (about lr per weight
    whatever its size): at the schedule's rate the first steps would erase the
    whitening. Scaled so, the neck moves relative to its size as a default neck
    does at the schedule's rate."""
    neck_mult, f = None, None
    pca_rows, imprint_rows = init_sample(df_train, args.init_samples, args.init_samples_per_class, args.seed)
    if args.init_neck == "pca":
        f, neck_mult = init_neck(model, df_train.iloc[pca_rows], reader)
    if args.init_head == "imprint":
        init_head(model, df_train, (pca_rows, f), imprint_rows, reader, args.seed)
    return neck_mult


def init_neck(model, sample, reader):
    """--init-neck pca: the neck from the PCA whitening of the sample's pooled features. Returns
    (those features, the neck's learning-rate multiplier)."""
    t0 = time.time()
    f = pass_over(lambda m, x: m.extract(x), model.feat.in_features, model, sample, reader)
    weight = torch.empty_like(model.feat.weight)
    bias = torch.empty_like(model.feat.bias)
    # fewer than WHITEN_MIN_RATIO images per dimension: no whitening, the projection onto the
    # sample's leading directions (beta = 1), which keeps the pooled features' ranking
    few = len(f) < WHITEN_MIN_RATIO * f.shape[1]
    if reader.rank == 0:
        P, mean = learn_whitening(f.cpu().numpy(), model.feat.out_features, beta=1.0 if few else None)
        w, b, _ = neck_from_whitening(P, mean, model.feat.out_features, f.cpu().numpy())
        weight.copy_(w)
        bias.copy_(b)
    if reader.world_size > 1:
        dist.broadcast(weight, 0)
        dist.broadcast(bias, 0)
    neck_mult = float(weight.pow(2).mean().sqrt() / model.feat.weight.detach().pow(2).mean().sqrt())
    with torch.no_grad():
        model.feat.weight.copy_(weight)
        model.feat.bias.copy_(bias)
    what = "projection (no whitening below %d images per dimension)" % WHITEN_MIN_RATIO if few else "PCA whitening"
    print0(f"--init-neck pca: {what} of {len(sample)} images' pooled features "
           f"({min(model.feat.in_features, model.feat.out_features)} components; the neck's lr x{neck_mult:.3g}) "
           f"in {time.time() - t0:.1f} s")
    return f, neck_mult


def init_head(model, df_train, pca, imprint_rows, reader, seed):
    """--init-head imprint: each class's sub-centres from the embeddings of its sample rows. pca:
    (the rows the neck's PCA pass read, their pooled features or None): those rows' embeddings
    come from the held features through the new neck, not a second read of the images."""
    t0, device = time.time(), reader.device
    pca_rows, f = pca
    emb = torch.zeros((len(imprint_rows), model.neck_dim), device=device)
    held = np.zeros(len(imprint_rows), bool)
    if f is not None:
        # rows the PCA pass read already (all of them on a small set)
        pos = np.searchsorted(pca_rows, imprint_rows).clip(max=len(pca_rows) - 1)
        held = pca_rows[pos] == imprint_rows
        with torch.no_grad():
            emb[torch.from_numpy(held).to(device)] = F.normalize(
                model.swish(model.feat(f[torch.from_numpy(pos[held]).to(device)])).float())
    if not held.all():
        emb[torch.from_numpy(~held).to(device)] = pass_over(
            lambda m, x: m.embed(x), model.neck_dim, model, df_train.iloc[imprint_rows[~held]], reader)
    head = model.metric_classify
    weight = head.weight.detach().clone()
    if reader.rank == 0:
        labels = df_train["landmark_id"].to_numpy()[imprint_rows]
        sub, have = imprint_subcenters(emb.cpu(), labels, head.out_features, head.k, seed)
        # keep the rows' norm as initialised: Adam's steps are absolute, so the head's
        # angular learning speed stays the original's
        norm = weight.norm(dim=1, keepdim=True).mean()
        rows = torch.as_tensor(np.repeat(have, head.k))
        weight[rows.to(weight.device)] = (sub[rows] * norm.cpu()).to(weight.device)
    if reader.world_size > 1:
        dist.broadcast(weight, 0)
    with torch.no_grad():
        head.weight.copy_(weight)
    n_cls = len(np.unique(df_train["landmark_id"].to_numpy()[imprint_rows]))
    print0(f"--init-head imprint: {head.k} sub-centres of {n_cls} classes from {len(imprint_rows)} images "
           f"({int(held.sum())} of them from the PCA pass's features) in {time.time() - t0:.1f} s")


# ---------------------------------------------------------------- recipes

# --recipe finetune: chosen on the real-photo benchmark (scripts/bench.py transfer, docs/transfer.md).
# The backbone stays frozen for the whole run: on a few hundred photos every backbone rate we measured
# either changed nothing (1e-7 to 1e-6 with fixed batch norm: the same GAP to 4 digits as frozen, at
# twice the time) or cost GAP (1e-5 to 1e-4, the table). With --freeze-backbone-epochs below
# n_epochs (a larger set), the backbone then trains at backbone_lr_mult with its batch norm fixed.
RECIPES = {
    "finetune": {
        "init_lr": 3e-5,                # the head (the neck: x its init scale); 1e-4 to 1e-3 lose the classifier
        "n_epochs": 8,
        "warmup_factor": 1.0,
        "freeze_backbone_epochs": 8,
        "backbone_lr_mult": 0.01,
        "freeze_bn": True,
        "init_neck": "pca",
        "init_head": "imprint",
        "valid_stride": 0,              # every image trains: a small set cannot spare a fold
    },
}


def apply_recipe(args, explicit):
    """Set the recipe's values on args wherever the user gave no flag (`explicit`:
    the dests given on the command line). With --load-from the loaded neck is
    kept (init_neck random), and the loaded head too unless step 1 makes a new
    one. Returns {dest: value} of what the recipe set."""
    if not args.recipe:
        return {}
    values = dict(RECIPES[args.recipe])
    if args.load_from:
        values["init_neck"] = "random"
        if args.train_step != 1:
            values["init_head"] = "random"
    set_ = {k: v for k, v in values.items() if k not in explicit}
    for k, v in set_.items():
        setattr(args, k, v)
    return set_
