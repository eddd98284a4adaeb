"""Ensemble inference with retrieval re-ranking, the original's Kaggle notebook as a module and CLI.

For every model of the spec: the L2-normalised 512-d embeddings of the gallery
(the clean train list) and of the queries (sample_submission's ids), and the
queries' sub-center cosines. Embeddings of the models are concatenated and
normalised, cosines averaged. Each query's 5 nearest gallery images are
re-ranked with the classifier: score(l) = sum sim^9 * cls(l)^10.

    python predict.py --data-dir D --train-csv CLEAN_LIST --idx2landmark idx2landmark_id.json \
        --spec specs/default.json --out submission.csv [--device cpu|cuda] [--batch-size N] [--precision fp32|bf16|fp16]

Your own photos (gallery.py): --gallery-dir G (one folder per landmark) or --index I, and --query-dir Q,
write predictions.csv (path, landmark, confidence, neighbours); --save-index / --add-to-index keep the
gallery's embeddings.
"""
import argparse
import hashlib
import json
import os
from contextlib import nullcontext

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dataset import (LandmarkDataset, collate, drop_excluded, get_transforms, image_path, read_csv_checked,
                     resolve_paths, worker_init)
from finetune import WHITEN_MIN_RATIO
from models import build_model, check_enet_type, preprocessing_for
from preprocess import read_clean_list
from util import UserError, load_checkpoint, load_fitting, memory_format, read_label_map, run_main

TOP_K = 5        # gallery neighbours per query
CLS_TOP_K = 5    # classifier candidates per query
CLS_MISSING = 1e-8  # cls(l) of a neighbour's landmark outside the classifier's top CLS_TOP_K
NL_FACTOR = 1e-100  # confidence factor of a query that looks like a non-landmark: below every
                    # unflagged confidence (those are >= ~1e-90: sim^9 * (1e-8)^10 at worst)


# ---------------------------------------------------------------- models

def load_spec(path):
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot read the spec ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e})") from e
    models = spec.get("models") if isinstance(spec, dict) else spec
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise UserError(f'{path}: expected {{"models": [{{"enet_type", "checkpoint", "image_size"}}, ...]}}')
    base = os.path.dirname(os.path.abspath(path))
    for m in models:
        missing = {"enet_type", "checkpoint", "image_size"} - set(m)
        if missing:
            raise UserError(f"{path}: model entry {m} lacks {sorted(missing)}")
    return models, base


def resolve_checkpoint(path, base):
    """A relative checkpoint path is looked up next to the spec file, then in the
    working directory (where Kaggle's ../input/... paths live)."""
    for p in ([path] if os.path.isabs(path) else [os.path.join(base, path), path]):
        if os.path.exists(p):
            return p
    raise UserError(f"checkpoint {path} not found (looked in {base} and {os.getcwd()})")


def load_model(enet_type, checkpoint, device="cpu", trust=False, image_size=None):
    """A model from a checkpoint of ours or of the original code (strict), fed
    as it was trained: the pooling and preprocessing recorded in our
    checkpoints' args, else the original's (avg, or GeM where the weights hold
    `pool.p`; the backbone's mean/std)."""
    sd, trained = load_checkpoint(checkpoint, trust=trust)
    if "metric_classify.weight" not in sd:
        raise UserError(f"{checkpoint}: no 'metric_classify.weight': not a checkpoint of this model")
    pool = trained.get("pool") or ("gem" if "pool.p" in sd else "avg")
    model = build_model(enet_type, sd["metric_classify.weight"].shape[0] // 3, pretrained=False, pool=pool,
                        preprocessing=trained.get("preprocessing"), image_size=image_size)
    load_fitting(model, sd, checkpoint)
    return model.to(device, memory_format=memory_format(torch.device(device))).eval()


def check_models(models, base, n_classes, label_map, trust=False):
    """Every model of the spec, checked before any image is read (an ensemble's
    extraction takes hours): its checkpoint exists and loads, its backbone name
    is known, its image size is a positive integer, its head has one class per
    entry of the label map (n_classes None, no label map: the models agree among
    themselves). Each checkpoint is read once here. Returns (the resolved
    checkpoint paths, the number of classes, each model's preprocessing, each
    model's train.py --recipe or None)."""
    paths, pres, recipes = [], [], []
    for m in models:
        ckpt = resolve_checkpoint(m["checkpoint"], base)
        check_enet_type(m["enet_type"])
        if not str(m["image_size"]).isdigit() or int(m["image_size"]) <= 0:
            raise UserError(f"{ckpt}: image_size {m['image_size']!r} is not a positive integer")
        sd, trained = load_checkpoint(ckpt, trust=trust)
        if "metric_classify.weight" not in sd:
            raise UserError(f"{ckpt}: no 'metric_classify.weight': not a checkpoint of this model")
        n = sd["metric_classify.weight"].shape[0] // 3
        if n_classes is None:
            n_classes, label_map = n, paths[0] if paths else ckpt
        if n != n_classes:
            raise UserError(f"{ckpt}: the model has {n} classes but {label_map} maps {n_classes}")
        paths.append(ckpt)
        pres.append(trained.get("preprocessing") or preprocessing_for(m["enet_type"]))
        recipes.append(trained.get("recipe"))
        del sd
    return paths, n_classes, pres, recipes


# How the re-ranking scores a landmark, per kind of model: (vote, sim power, cls power).
# The original's sum of sim^9 cls^10 over the top 5 is kept for its models and GLDv2,
# where the classifier, trained on 1.5 M images, beats retrieval. A --recipe finetune
# model's head is imprinted from the very gallery photos and trained for a few dozen
# steps on them: it knows nothing the neighbours don't, and its class prototypes are
# coarser than the photos themselves (on realdev its GAP is below retrieval's on
# average). So each landmark is scored by its best neighbour (a landmark's photo count
# does not vote) and the classifier's cosine counts a third as much as retrieval's:
# it breaks near-ties and lifts the confidence where both agree. Chosen on realdev
# seeds 0-2 and held on seeds 3-5: cls^2-3 keep retrieval's GAP or add to it on both
# splits, cls^10 falls below retrieval with a quarter of the photos as queries
# (docs/transfer.md).
RERANK = {"original": ("sum", 9, 10), "finetune": ("max", 9, 3)}


def resolve_rerank(vote, cls_power, recipes):
    """--rerank-vote 'auto' and --rerank-cls-power None: the finetune scheme when
    every model was trained with --recipe finetune, else the original's.
    Returns (vote, sim_power, cls_power)."""
    scheme = "finetune" if recipes and all(r == "finetune" for r in recipes) else "original"
    d_vote, sim_power, d_cls = RERANK[scheme]
    vote = d_vote if vote == "auto" else vote
    cls_power = d_cls if cls_power is None else float(cls_power)
    if scheme == "finetune":
        how = "its best neighbour" if vote == "max" else "the sum over its neighbours"
        print(f"re-ranking for --recipe finetune models: each landmark scored by {how}, sim^{sim_power} "
              f"cls^{cls_power:g} (--rerank-vote, --rerank-cls-power)", flush=True)
    return vote, sim_power, cls_power


# ---------------------------------------------------------------- features

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> autocast dtype


def _cache_key(checkpoint, image_size, ids_digest, precision="fp32"):
    st = os.stat(checkpoint)
    key = f"{os.path.abspath(checkpoint)}|{st.st_size}|{st.st_mtime_ns}|{image_size}|{ids_digest}|{precision}"
    return hashlib.sha1(key.encode()).hexdigest()[:20]


@torch.no_grad()
def embed_batch(model, x, device, precision="fp32"):
    """The neck output z (B, 512), float32, of one batch of images (uint8 from
    the loader: the model normalises them). extract_features stores these;
    scripts/bench.py extract times this very function."""
    amp_dtype = PRECISIONS[precision]
    with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
        return model.neck(x.to(device, non_blocking=True, memory_format=memory_format(device))).float()


@torch.no_grad()
def extract_features(model, paths, image_size, device, batch_size=64, num_workers=2, cache_dir=None,
                     key=None, dtype=np.float32, normalize=False, desc="extract", precision="fp32"):
    """The neck output z (N, 512) of every image, or with normalize=True the
    embedding normalize(z) (`model.embed`). Cosines are the head applied to z,
    so a query's embedding and cosines come from this one pass.

    precision: the backbone and neck run in float32 ('fp32', as the original
    notebook), or under autocast in 'bf16' or 'fp16'; z is returned in float32
    either way, and the head always runs in float32.

    With cache_dir, rows are written to a memory-mapped .npy as they come and
    the count done is recorded after each batch: a second run reads the file,
    an interrupted one resumes where it stopped.

    An unreadable image (missing, empty, truncated, not an image) gets a row
    of NaN, in the cache too: `unreadable_rows` finds them.
    """
    n = len(paths)
    val = get_transforms(image_size, model.preprocessing["interpolation"])[1]  # as the model was validated
    ds = LandmarkDataset(pd.DataFrame({"filepath": paths}), "", "test", transform=val, skip_bad=True)
    done, out = 0, None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        f_arr, f_done = os.path.join(cache_dir, f"{key}.npy"), os.path.join(cache_dir, f"{key}.done")
        if os.path.exists(f_arr) and os.path.exists(f_done):
            done = int(open(f_done).read() or 0)
            out = np.load(f_arr, mmap_mode="r+")
            if out.shape != (n, model.neck_dim) or out.dtype != dtype:
                done, out = 0, None
        if out is None:
            out = np.lib.format.open_memmap(f_arr, mode="w+", dtype=dtype, shape=(n, model.neck_dim))
    else:
        out = np.empty((n, model.neck_dim), dtype)
    if done >= n:
        return out
    loader = DataLoader(Subset(ds, range(done, n)), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=worker_init if num_workers else None,
                        collate_fn=collate)
    for x, bad in tqdm(loader, desc=desc, initial=done // batch_size, total=(n + batch_size - 1) // batch_size,
                       mininterval=2.0):
        z = embed_batch(model, x, device, precision)
        if normalize:
            z = F.normalize(z, dim=1)
        if any(bad):
            z[torch.tensor([bool(b) for b in bad], device=z.device)] = float("nan")
        out[done:done + len(z)] = z.cpu().numpy().astype(dtype)
        done += len(z)
        if cache_dir is not None:
            out.flush()
            with open(f_done, "w") as f:
                f.write(str(done))
    return out


def unreadable_rows(*features):
    """Rows (bool) that any of the feature arrays marks as unreadable (NaN),
    read in chunks: the arrays may be large memory maps."""
    n = len(features[0])
    bad = np.zeros(n, bool)
    for f in features:
        for r0 in range(0, n, 65536):
            bad[r0:r0 + 65536] |= np.isnan(np.asarray(f[r0:r0 + 65536, 0], np.float32))
    return bad


@torch.no_grad()
def classifier_topk(zs, heads, present, k=CLS_TOP_K, device="cpu", chunk=1024):
    """Top-k classes of the ensemble, query chunk by query chunk.

    zs: per model, the queries' neck outputs (Q, 512); heads: per model, its
    ArcMarginProductSubcenter. The sub-center cosines are averaged over the
    models, then ranked after the original's pred_mask (pred_mask_topk). Only
    a (chunk x out_dim) block exists at a time: the (Q, out_dim) matrix of a
    large test set (81,313 classes) would not fit in memory.
    """
    s_all, i_all = [], []
    for q0 in range(0, len(zs[0]), chunk):
        cos = sum(h(torch.as_tensor(np.asarray(z[q0:q0 + chunk], np.float32), device=device)).float()
                  for z, h in zip(zs, heads)) / len(heads)
        s, i = pred_mask_topk(cos, present, k)
        s_all.append(s)
        i_all.append(i)
    return np.concatenate(s_all), np.concatenate(i_all)


# ---------------------------------------------------------------- retrieval

def topk_cosine(queries, gallery, k=TOP_K, device="cpu", query_chunk=4096, gallery_chunk=32768, exclude=None):
    """Top-k neighbours of each query by inner product, in bounded memory.

    queries, gallery: arrays (Q, D), (N, D), or lists of such (one per model),
    in which case the similarity is the mean of the per-model inner products:
    with normalised per-model embeddings that is the cosine of the normalised
    concatenation. It is computed as one matmul over the concatenated
    dimensions, the queries scaled by 1/n_models. Arrays may be float16 and
    memory-mapped: the gallery is streamed chunk by chunk into one reused
    float32 buffer on the device (bf16/fp16 matmuls are slow on CPU, and
    sim^9 in the re-ranking wants float32 similarities), and every chunk's
    similarities land in one reused block, so the loop allocates nothing.
    Peak memory: the queries, one gallery chunk and one (query_chunk x
    gallery_chunk) block, plus a per-model float16 staging copy of the chunk.
    exclude: (N,) bool, gallery rows never returned (unreadable images).
    Returns (sims (Q, k) float32, indices (Q, k) int64), best first.
    """
    qs = queries if isinstance(queries, (list, tuple)) else [queries]
    gs = gallery if isinstance(gallery, (list, tuple)) else [gallery]
    device = torch.device(device)
    nq, ng = len(qs[0]), len(gs[0])
    k_eff = min(k, ng)
    dims = np.cumsum([0] + [g.shape[1] for g in gs])
    qt = torch.cat([torch.as_tensor(np.asarray(q, np.float32)) for q in qs], 1).to(device) / len(gs)
    gbuf = torch.empty((min(gallery_chunk, ng), dims[-1]), device=device)
    sbuf = torch.empty((min(query_chunk, nq), len(gbuf)), device=device)
    best_s = torch.full((nq, k_eff), -float("inf"), device=device)
    best_i = torch.zeros((nq, k_eff), dtype=torch.int64, device=device)
    for g0 in range(0, ng, gallery_chunk):
        m = min(gallery_chunk, ng - g0)
        gc = gbuf[:m]
        for g, d0, d1 in zip(gs, dims[:-1], dims[1:]):
            # np.array: a private copy of the (memory-mapped, maybe read-only) rows, in their stored dtype
            gc[:, d0:d1].copy_(torch.from_numpy(np.array(g[g0:g0 + m])).to(device, non_blocking=True))
        skip = None
        if exclude is not None and exclude[g0:g0 + m].any():
            skip = torch.from_numpy(np.flatnonzero(exclude[g0:g0 + m])).to(device)
            gc[skip] = 0.0  # no NaN into the matmul
        for q0 in range(0, nq, query_chunk):
            sl = slice(q0, q0 + query_chunk)
            sim = torch.mm(qt[sl], gc.T, out=sbuf[:len(qt[sl]), :m])
            if skip is not None:
                sim[:, skip] = -float("inf")
            s, i = sim.topk(min(k_eff, m), dim=1)
            s = torch.cat([best_s[sl], s], 1)
            i = torch.cat([best_i[sl], i + g0], 1)
            # merge with the best so far; a stable sort keeps the lower gallery index first on ties
            order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k_eff]
            best_s[sl] = s.gather(1, order)
            best_i[sl] = i.gather(1, order)
    return best_s.cpu().numpy(), best_i.cpu().numpy()


# ---------------------------------------------------------------- classifier and re-ranking

def pred_mask_topk(cos, present, k=CLS_TOP_K):
    """Classifier top-k after the original's pred_mask: +1 on the classes present
    in the gallery list, then -1 on all, so an absent class scores cos - 1 and
    only enters the top-k below every present class that scores above it.
    cos (Q, C) array or tensor, present (C,) bool. Returns (scores, class indices), best first."""
    cos = torch.as_tensor(cos, dtype=torch.float32)
    t = cos + torch.as_tensor(present, dtype=torch.float32, device=cos.device) - 1.0
    s, i = t.topk(min(k, t.shape[1]), dim=1)
    return s.cpu().numpy(), i.cpu().numpy()


def rerank(sims, nn_landmarks, cls_scores, cls_landmarks, sim_power=9, cls_power=10, vote="sum"):
    """The original's re-ranking of retrieval neighbours by classifier scores.

    score(l) = sum over the neighbours j with landmark l of sims[j]**sim_power *
    cls(l)**cls_power, cls(l) = l's classifier score if l is among the query's
    cls_landmarks, else 1e-8. Predict the best l with its score. Computed in
    float64: scores reach ~1e-84, which float32 flushes to 0.
    vote 'max' (beyond the original) takes the best neighbour of l instead of the
    sum: in a gallery of a few photos per landmark, the sum counts how many
    photos a landmark has among the top 5 as much as how well they match, and
    a landmark with 20 photos outvotes the right one with 2 (realdev, lr 1e-4:
    ensemble 0.930 summed, 0.978 with max; docs/transfer.md). RERANK says which
    scheme serves which models.
    Inputs (Q, TOP_K) and (Q, CLS_TOP_K); returns (landmarks, confidences).
    """
    sims = np.asarray(sims, np.float64)
    nn_l = np.asarray(nn_landmarks)
    cls_s = np.asarray(cls_scores, np.float64)
    cls_l = np.asarray(cls_landmarks)
    match = nn_l[:, :, None] == cls_l[:, None, :]                        # (Q, K, C)
    # the first classifier slot naming the landmark gives its score
    first = np.argmax(match, axis=2)
    c = np.where(match.any(axis=2), np.take_along_axis(cls_s, first, axis=1), CLS_MISSING)
    per_nb = sims ** sim_power * c ** cls_power                          # (Q, K)
    same = nn_l[:, :, None] == nn_l[:, None, :]                          # (Q, K, K)
    if vote == "max":
        total = (same * per_nb[:, None, :]).max(axis=2)                  # each neighbour's landmark: its best
    elif vote == "sum":
        total = (same * per_nb[:, None, :]).sum(axis=2)                  # score of each neighbour's landmark
    else:
        raise ValueError(f"vote must be 'sum' or 'max', not {vote!r}")
    j = np.argmax(total, axis=1)  # ties: the landmark met first among the neighbours
    q = np.arange(len(sims))
    return nn_l[q, j], total[q, j]


def non_landmark_flags(q_emb, s_landmark, nl_emb=None, mine_frac=0.25, k=3, margin=0.0, device="cpu"):
    """Which queries look like non-landmarks (beyond the original; off by default).

    A query is flagged when its mean cosine to its k nearest known non-landmark
    images is above its cosine to its nearest gallery image (+ margin). Without
    a known set (nl_emb None), the set is mined from the queries themselves:
    the `mine_frac` of them whose nearest gallery image is the least close
    (a query is never its own neighbour). Non-landmarks look more like each
    other than like any landmark, so this catches those that happen to retrieve
    something fairly close. Returns (flags (Q,) bool, s_nl (Q,)).
    """
    qs = q_emb if isinstance(q_emb, (list, tuple)) else [q_emb]
    s_landmark = np.asarray(s_landmark, np.float64)
    own = None
    if nl_emb is None:
        own = np.argsort(s_landmark, kind="stable")[:max(k + 1, int(round(mine_frac * len(s_landmark))))]
        nl_emb = [q[own] for q in qs]
    nls = nl_emb if isinstance(nl_emb, (list, tuple)) else [nl_emb]
    s, i = topk_cosine(qs, nls, k + (own is not None), device=device)
    s = s.astype(np.float64)
    if own is not None:  # drop each mined query's match with itself, keep k
        self_hit = own[i] == np.arange(len(s))[:, None]
        s = np.where(self_hit, -np.inf, s)
        s = -np.sort(-s, axis=1)[:, :k]
    s_nl = s.mean(axis=1)
    return s_nl > s_landmark + margin, s_nl


def apply_non_landmark(confidences, flags):
    """Sink the flagged queries: confidence x NL_FACTOR keeps their order among
    themselves and puts them below every unflagged query."""
    return np.where(flags, np.asarray(confidences, np.float64) * NL_FACTOR, confidences)


def format_submission(ids, landmarks, confidences):
    """id,landmarks with "<landmark_id> <confidence>", confidence at full precision (repr)."""
    rows = [f"{int(l)} {float(c)!r}" if l is not None and l == l else "" for l, c in zip(landmarks, confidences)]
    return pd.DataFrame({"id": list(ids), "landmarks": rows})


# ---------------------------------------------------------------- pipeline

def run(data_dir, train_csv, idx2landmark, spec, device=None, batch_size=64, num_workers=2,
        cache_dir=None, sample_submission=None, fp16_cache=False, non_landmark=None, precision="fp32",
        compile=False, trust_checkpoint=False, exclude=None, vote="auto", cls_power=None):
    """The whole inference. Returns {'ids', 'classifier', 'retrieval', 'ensemble'}
    where each part is (landmarks, confidences); with non_landmark ('auto': mined
    from the queries, or a CSV of known non-landmark images, column `id` under
    DATA_DIR/non_landmark/ or column `filepath`) also 'ensemble_nl', 'nl_flags' and
    'nl_similarity' (each query's mean cosine to its nearest non-landmarks)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: expected one of {sorted(PRECISIONS)}")
    models, base = load_spec(spec) if isinstance(spec, str) else (spec, os.getcwd())
    idx2lid = read_label_map(idx2landmark)
    gallery = read_clean_list(train_csv)  # id,landmark_id or GLDv2's landmark_id,images; ids as text
    sub = read_csv_checked(sample_submission or os.path.join(data_dir, "sample_submission.csv"), ["id"])
    gallery = gallery.assign(filepath=resolve_paths(gallery, data_dir, "train"))
    queries = sub.assign(filepath=resolve_paths(sub, data_dir, "test"))
    if exclude:  # listed images are not read: out of the gallery, and empty predictions for queries
        gallery, n_gallery_out = drop_excluded(gallery, exclude)
        kept, n_query_out = drop_excluded(queries, exclude)
        queries.loc[~queries.index.isin(kept.index), "filepath"] = f"(excluded by {exclude})"  # never read
        print(f"{exclude}: left out {n_gallery_out} gallery images and {n_query_out} queries", flush=True)
    g_paths, q_paths = list(gallery["filepath"]), list(queries["filepath"])
    nl_paths = _non_landmark_paths(non_landmark, data_dir)
    dtype = np.float16 if fp16_cache else np.float32
    gallery_digest = hashlib.sha1("\n".join(gallery["id"]).encode()).hexdigest()  # once, not per model

    ckpts, _, _, recipes = check_models(models, base, len(idx2lid), idx2landmark, trust_checkpoint)  # before any image
    rerank_with = resolve_rerank(vote, cls_power, recipes)
    kw = dict(device=device, batch_size=batch_size, num_workers=num_workers, precision=precision, compile=compile,
              trust=trust_checkpoint)
    g_emb, zqs, heads, nl_emb = embed_all(models, ckpts, g_paths, q_paths, nl_paths, gallery_dtype=dtype,
                                          cache_dir=cache_dir, gallery_digest=gallery_digest, **kw)
    res = recognize(zqs, g_emb, heads, gallery["landmark_id"].to_numpy(), idx2lid, device=device,
                    non_landmark=non_landmark, nl_emb=nl_emb, rerank_with=rerank_with)
    res |= {"ids": list(sub["id"]), "query_paths": q_paths, "gallery_paths": g_paths,
            "gallery_labels": gallery["landmark_id"].to_numpy()}
    return res


def embed_all(models, ckpts, g_paths, q_paths, nl_paths=None, device="cpu", batch_size=64, num_workers=2,
              precision="fp32", compile=False, trust=False, gallery_dtype=np.float32, cache_dir=None,
              gallery_digest="", gallery=None):
    """Per model of the spec: the gallery's embeddings (N, 512) (unless `gallery`,
    embeddings from a saved index, is given), the queries' neck outputs (Q, 512),
    its ArcFace head, and the non-landmark set's embeddings. One model on the
    device at a time. Returns (g_emb, zqs, heads, nl_emb) as lists over models."""
    g_emb, zqs, heads, nl_emb = [], [], [], []
    for i, (m, ckpt) in enumerate(zip(models, ckpts)):
        size = int(m["image_size"])
        model = load_model(m["enet_type"], ckpt, device, trust, image_size=size)
        if compile:  # the backbone and neck; a ragged last batch compiles once more
            model.neck = torch.compile(model.neck)
        kw = dict(device=torch.device(device), batch_size=batch_size, num_workers=num_workers, precision=precision)
        if gallery is None:
            g_emb.append(extract_features(model, g_paths, size, cache_dir=cache_dir, normalize=True,
                                          key=_cache_key(ckpt, size, gallery_digest, precision),
                                          desc=f"gallery {os.path.basename(ckpt)}@{size}", dtype=gallery_dtype, **kw))
        zqs.append(extract_features(model, q_paths, size, desc=f"queries {os.path.basename(ckpt)}@{size}", **kw))
        heads.append(model.metric_classify)  # the head alone is kept: (out_dim * 3, 512)
        if nl_paths is not None:
            nl_emb.append(extract_features(model, nl_paths, size, normalize=True, desc=f"non-landmarks @{size}",
                                           **kw))
        del model
    return (g_emb if gallery is None else gallery), zqs, heads, nl_emb


def recognize(zqs, g_emb, heads, g_labels, idx2lid, device="cpu", non_landmark=None, nl_emb=None,
              rerank_with=RERANK["original"]):
    """Classifier, retrieval and their re-ranked ensemble for the queries.

    zqs: per model, the queries' neck outputs; g_emb: per model, the gallery's
    embeddings; g_labels: the gallery's landmark ids (ids beyond the label map
    are fine: retrieval can predict them, the classifier cannot); rerank_with:
    (vote, sim power, cls power), see RERANK. heads None
    (no classifier: predict.py --backbone): retrieval alone, also as 'ensemble'.
    Returns {'classifier', 'retrieval', 'ensemble': (landmarks, confidences),
    'neighbours': (sims, gallery rows), 'cls_top', 'unreadable': (queries,
    gallery)}, and with non_landmark also 'ensemble_nl', 'nl_flags', 'nl_similarity'."""
    # unreadable images: left out of the gallery; a query gets an empty prediction
    g_bad, q_bad = unreadable_rows(*g_emb), unreadable_rows(*zqs)
    if g_bad.any() or q_bad.any():
        print(f"unreadable images: {int(g_bad.sum())} of {len(g_bad)} gallery images (left out of retrieval), "
              f"{int(q_bad.sum())} of {len(q_bad)} queries (empty predictions)", flush=True)
        for z in zqs:
            z[q_bad] = 0.0
    q_emb = [F.normalize(torch.as_tensor(z), dim=1).numpy() for z in zqs]
    # The original normalised only its last query batch, so its gallery rows had
    # norm 3 and its similarities were 3x the cosine; rankings and GAP are the
    # same. Here both sides are unit vectors: sims are cosines.
    sims, nn = topk_cosine(q_emb, g_emb, TOP_K, device=device, exclude=g_bad if g_bad.any() else None)
    nn_l = np.asarray(g_labels)[nn]

    def blank(part):  # an unreadable query: no prediction
        landmarks, conf = part
        return (np.where(q_bad, None, landmarks.astype(object)), np.where(q_bad, 0.0, conf))

    res = {"retrieval": blank((nn_l[:, 0], sims[:, 0])), "neighbours": (sims, nn), "neighbour_landmarks": nn_l,
           "unreadable": (q_bad, g_bad)}
    if heads is None:
        res["ensemble"] = res["retrieval"]
    else:
        lid_of = np.array([idx2lid[i] for i in range(len(idx2lid))])
        present = np.isin(lid_of, np.unique(g_labels))
        cls_s, cls_i = classifier_topk(zqs, heads, present, device=device)
        cls_l = lid_of[cls_i]
        vote, sim_power, cls_power = rerank_with
        res |= {"classifier": blank((cls_l[:, 0], cls_s[:, 0])),
                "ensemble": blank(rerank(sims, nn_l, cls_s, cls_l, sim_power, cls_power, vote=vote)),
                "cls_top": (cls_s, cls_l)}
    if non_landmark is not None:
        flags, s_nl = non_landmark_flags(q_emb, sims[:, 0], nl_emb or None, device=device)
        res["nl_flags"], res["nl_similarity"] = flags, s_nl
        res["ensemble_nl"] = (res["ensemble"][0], apply_non_landmark(res["ensemble"][1], flags))
    return res


class PooledFeatures(torch.nn.Module):
    """Recognition without training: a pretrained backbone's pooled features
    stand in for the neck output (predict.py --backbone)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.preprocessing = net, net.preprocessing
        self.neck_dim = net.feat.in_features

    def neck(self, x):
        return self.net.extract(x)


def zero_training_model(backbone, pretrained_path=None, pool="avg", image_size=256, device="cpu"):
    """The backbone with its ImageNet weights (a --pretrained-path file, or timm's
    download/cache) as a PooledFeatures, and its signature for a saved index."""
    from gallery import file_digest
    check_enet_type(backbone)
    if pretrained_path is not None and not os.path.isfile(pretrained_path):
        raise UserError(f"--pretrained-path {pretrained_path}: no such file")
    net = build_model(backbone, 1, pretrained=True, pretrained_path=pretrained_path, pool=pool, image_size=image_size)
    model = PooledFeatures(net).to(device, memory_format=memory_format(torch.device(device))).eval()
    signature = [{"enet_type": backbone, "image_size": int(image_size), "pool": pool, "features": "pooled",
                  "weights_sha1": file_digest(pretrained_path) if pretrained_path else f"timm:{backbone}",
                  "preprocessing": net.preprocessing}]
    return model, signature


def whitened_embeddings(g_raw, *others, whiten_mode="auto"):
    """The gallery's and the others' embeddings for zero-training retrieval, L2-normalised,
    float32: PCA-whitened with a whitening learnt on the gallery (finetune.learn_whitening),
    or the pooled features as they are. 'auto' whitens galleries of at least
    WHITEN_MIN_RATIO images per dimension: a whitening learnt on fewer is mostly noise
    and costs retrieval (docs/transfer.md: GAP 0.975 raw, 0.960 whitened with a shrunk
    estimate, on 141 photos)."""
    w = whitening_of(g_raw, whiten_mode)
    return [None if a is None else whitened(a, w) for a in (g_raw, *others)]


def whitening_of(g_raw, whiten_mode="auto"):
    """(P, m) of the whitening learnt on the gallery's features, or None (see whitened_embeddings)."""
    from finetune import learn_whitening
    g = np.asarray(g_raw, np.float32)
    on = whiten_mode == "pca" or (whiten_mode == "auto" and len(g) >= WHITEN_MIN_RATIO * g.shape[1])
    return learn_whitening(g) if on else None


def whitened(a, w):
    """Features a whitened with w = (P, m) (None: as they are), L2-normalised, float32."""
    from finetune import whiten
    return F.normalize(torch.from_numpy(whiten(a, *w) if w else np.asarray(a, np.float32)), dim=1).numpy()


@torch.no_grad()
def embed_images(model, images, image_size, device, precision="fp32", batch_size=32):
    """extract_features of RGB uint8 images in memory (app.py): the same resize as
    validation and the same embed_batch. The neck outputs z (N, C), float32."""
    val = get_transforms(image_size, model.preprocessing["interpolation"])[1]
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(val(image=im)["image"])).permute(2, 0, 1)
                         for im in images[i:i + batch_size]])
        out.append(embed_batch(model, x, torch.device(device), precision).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.neck_dim), np.float32)


def folder_models(spec=None, zero=None, idx2landmark=None, device="cpu", trust_checkpoint=False, vote="auto",
                  cls_power=None):
    """What recognition on folders needs before any image: the spec's models checked
    (or, with zero, the pretrained backbone built), their signature for an index, the
    re-ranking, the label map and the names of the classes it knows. A namespace."""
    from gallery import landmark_names, model_signature
    idx2lid = read_label_map(idx2landmark) if idx2landmark else None
    # the classes' names: landmark_names.json beside the label map, else the landmark ids themselves
    # (GLDv2's landmarks have no other name): a gallery folder named so is a class the classifier knows
    known = landmark_names(idx2landmark) or ({lid: str(lid) for lid in idx2lid.values()} if idx2lid else {})
    setup = argparse.Namespace(zero=zero, known=known, idx2lid=idx2lid, rerank_with=RERANK["original"])
    if zero is None:
        models, base = load_spec(spec) if isinstance(spec, str) else (spec, os.getcwd())
        n_known = len(idx2lid) if idx2lid else None
        ckpts, n, pres, recipes = check_models(models, base, n_known, idx2landmark, trust_checkpoint)
        setup.rerank_with = resolve_rerank(vote, cls_power, recipes)
        if idx2lid is None:  # anonymous classes: the classifier can name no gallery landmark
            setup.idx2lid = {i: -1 - i for i in range(n)}
        setup.models, setup.ckpts, setup.signature = models, ckpts, model_signature(models, ckpts, pres)
    else:
        setup.size = int(zero.get("image_size", 256))
        setup.zmodel, setup.signature = zero_training_model(zero["enet_type"], zero.get("pretrained_path"),
                                                            zero.get("pool", "avg"), setup.size, device)
    return setup


def folder_answer(setup, zqs, g_emb, heads, g_labels, device="cpu", non_landmark=None, nl_emb=None,
                  whitening=None):
    """recognize() of folder_models' setup: with trained models as it is; without
    training (setup.zero), by retrieval on the features whitened on the gallery
    (whitening: (w, whitened gallery) when already learnt, as app.py keeps it).
    Returns (result, the queries' and the gallery's embeddings as compared)."""
    if setup.zero is None:
        res = recognize(zqs, g_emb, heads, g_labels, setup.idx2lid, device=device, non_landmark=non_landmark,
                        nl_emb=nl_emb, rerank_with=setup.rerank_with)
        return res, [F.normalize(torch.as_tensor(z), dim=1).numpy() for z in zqs], g_emb
    if whitening is None:
        w = whitening_of(g_emb[0], setup.zero.get("whiten", "auto"))
        whitening = (w, whitened(g_emb[0], w))
    w, g_w = whitening
    q_w = whitened(zqs[0], w)
    nl_w = [whitened(nl_emb[0], w)] if nl_emb else None
    res = recognize([q_w], [g_w], None, g_labels, None, device=device, non_landmark=non_landmark, nl_emb=nl_w)
    return res, [q_w], [g_w]


def run_folders(spec, query_dir=None, gallery_dir=None, index=None, save_index=None, add_to_index=False,
                idx2landmark=None, device=None, batch_size=64, num_workers=2, precision="fp32", compile=False,
                trust_checkpoint=False, non_landmark=None, retrieval_ranks=None, ranks_k=10000, zero=None,
                vote="auto", cls_power=None):
    """Recognition on your own photos (see gallery.py): a gallery from folders or
    a saved index, queries from a folder. With retrieval_ranks, also a CSV of
    each query's gallery images by decreasing similarity (the first ranks_k),
    for evaluate_retrieval.py --ranks. zero ({enet_type, pretrained_path,
    image_size, pool}) in place of spec: recognition without training, by
    retrieval on the pretrained backbone's pooled features, PCA-whitened on
    the gallery (an index holds the raw features; the whitening is learnt
    again from the whole gallery at each answer). Returns (predictions frame
    or None, the recognize() result or None)."""
    from gallery import folder_gallery, ids_for_names, list_images, load_index, save_index as write_index
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if index is None and gallery_dir is None:
        raise UserError("give --gallery-dir (one folder per landmark) or --index (a saved one)")
    if add_to_index and (index is None or gallery_dir is None):
        raise UserError("--add-to-index needs --index (the one to grow) and --gallery-dir (where the new files are)")
    if query_dir is not None and not os.path.isdir(query_dir):
        raise UserError(f"--query-dir {query_dir}: no such folder")
    q_rel = list_images(query_dir) if query_dir else []
    if query_dir and not q_rel:
        raise UserError(f"--query-dir {query_dir}: no images in it")
    setup = folder_models(spec, zero, idx2landmark, device, trust_checkpoint, vote, cls_power)
    signature, known = setup.signature, setup.known

    g_rel, g_labels, g_emb, names = [], np.zeros(0, np.int64), None, dict(known)
    g_root = gallery_dir
    if index is not None:
        idx = load_index(index, signature)
        g_rel, g_labels, g_emb, names = idx["paths"], idx["labels"], idx["emb"], known | idx["names"]
        g_root = gallery_dir or idx["gallery_dir"]
    todo = []
    if gallery_dir is not None:
        have = set(g_rel)
        todo = [(p, n) for p, n in folder_gallery(gallery_dir) if p not in have]
        if index is not None and not add_to_index:
            todo = []  # an index answers the queries; --add-to-index grows it
    q_paths = [os.path.join(query_dir, p) for p in q_rel]
    new_paths = [os.path.join(gallery_dir, p) for p, _ in todo]
    nl_paths = _non_landmark_paths(non_landmark)
    kw = dict(device=device, batch_size=batch_size, num_workers=num_workers, precision=precision)
    if zero is None:
        new_emb, zqs, heads, nl_emb = embed_all(setup.models, setup.ckpts, new_paths, q_paths, nl_paths,
                                                compile=compile, trust=trust_checkpoint, **kw)
    else:
        zmodel, size, heads = setup.zmodel, setup.size, None
        new_emb = [extract_features(zmodel, new_paths, size, desc="gallery", **kw)]
        zqs = [extract_features(zmodel, q_paths, size, desc="queries", **kw)]
        nl_emb = [extract_features(zmodel, nl_paths, size, desc="non-landmarks", **kw)] if nl_paths else []
    if todo:
        new_ids, by_id = ids_for_names([n for _, n in todo], {i: v for i, v in names.items()})
        names |= by_id
        good = ~unreadable_rows(*new_emb)
        if not good.all():
            print(f"unreadable gallery images: {int((~good).sum())} of {len(good)} (not indexed)", flush=True)
        keep = [p for (p, _), g in zip(todo, good) if g]
        g_rel = list(g_rel) + keep
        g_labels = np.concatenate([g_labels, new_ids[good]])
        g_emb = [np.asarray(e[good], np.float16) if g_emb is None else
                 np.concatenate([g_emb[i], np.asarray(e[good], np.float16)]) for i, e in enumerate(new_emb)]
        print(f"embedded {len(keep)} gallery images ({len(g_rel)} in all, {len(set(g_labels.tolist()))} landmarks)",
              flush=True)
    if g_emb is None or not len(g_rel):
        raise UserError("the gallery is empty: nothing to retrieve from")
    if save_index or add_to_index:
        stem = write_index(save_index or index, g_emb, g_labels, g_rel, names, signature, g_root)
        print(f"index: {stem}.npz, {stem}.json ({len(g_rel)} images)", flush=True)
    if not q_paths:
        return None, None
    res, q_emb, g_emb = folder_answer(setup, zqs, g_emb, heads, g_labels, device, non_landmark, nl_emb)
    final = "ensemble_nl" if non_landmark is not None else "ensemble"
    if retrieval_ranks:
        g_bad = res["unreadable"][1]
        _, order = topk_cosine(q_emb, g_emb, min(ranks_k, len(g_rel)), device=device,
                               exclude=g_bad if g_bad.any() else None)
        pd.DataFrame({"path": q_rel, "ranked": [" ".join(g_rel[j] for j in row if not g_bad[j]) for row in order]}
                     ).to_csv(retrieval_ranks, index=False)
        print(f"wrote {retrieval_ranks} (the first {order.shape[1]} gallery images of each query)", flush=True)
    sims, nn = res["neighbours"]
    from gallery import predictions_frame
    res["frames"] = {part: predictions_frame(q_rel, *res[part], sims, nn, g_rel, names)
                     for part in ("classifier", "retrieval", "ensemble", "ensemble_nl") if part in res}
    res |= {"ids": q_rel, "query_paths": q_paths, "gallery_labels": np.asarray(g_labels), "names": names,
            "gallery_paths": [os.path.join(g_root, p) if g_root else p for p in g_rel]}
    return res["frames"][final], res


def _non_landmark_paths(non_landmark, data_dir=""):
    """Paths of a known non-landmark set (a CSV: column filepath, or id under
    DATA_DIR/non_landmark/), None for 'auto' or no set."""
    if non_landmark in (None, "auto"):
        return None
    nl = read_csv_checked(non_landmark, [])
    if "filepath" not in nl.columns and "id" not in nl.columns:
        raise UserError(f"--non-landmark {non_landmark}: expected a column id or filepath")
    return (list(nl["filepath"]) if "filepath" in nl.columns
            else [image_path(data_dir, "non_landmark", i) for i in nl["id"]])


def _auto_or_power(v):
    if v == "auto":
        return None
    try:
        f = float(v)
    except ValueError:
        f = -1.0
    if not f >= 0:
        raise argparse.ArgumentTypeError(f"{v!r} is neither 'auto' nor a power >= 0")
    return f


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--data-dir", help="GLDv2 layout: holds train/, test/ and sample_submission.csv")
    p.add_argument("--train-csv", help="GLDv2 layout: the gallery, the clean train list (id,landmark_id)")
    p.add_argument("--idx2landmark",
                   help="idx2landmark_id.json (or the original's .pkl) from preprocess.py; with folders, optional "
                        "(landmark_names.json beside it names the classes)")
    p.add_argument("--gallery-dir", help="your photos: one folder per landmark, GALLERY_DIR/<name>/*.jpg")
    p.add_argument("--query-dir", help="your photos: the images to recognise (recursive)")
    p.add_argument("--index", help="a saved gallery index (PATH.npz + PATH.json) to answer from")
    p.add_argument("--save-index", help="save the gallery's embeddings as an index at PATH")
    p.add_argument("--retrieval-ranks", default=None, metavar="CSV",
                   help="with folders: also write each query's gallery images by decreasing similarity "
                        "(path,ranked), for evaluate_retrieval.py --ranks")
    p.add_argument("--add-to-index", action="store_true",
                   help="with --index and --gallery-dir: embed only the gallery files the index lacks, and save it")
    p.add_argument("--spec", help='JSON: {"models": [{"enet_type", "checkpoint", "image_size"}]}')
    p.add_argument("--backbone", metavar="NAME",
                   help="with folders, in place of --spec: no training, retrieval on this pretrained backbone's "
                        "pooled features, PCA-whitened on the gallery (a timm name, e.g. tf_efficientnet_b3_ns)")
    p.add_argument("--pretrained-path", default=None, help="with --backbone: its ImageNet weights file")
    p.add_argument("--image-size", type=int, default=256, help="with --backbone: the input size (default 256)")
    p.add_argument("--pool", choices=["avg", "gem"], default="avg", help="with --backbone: global pooling")
    p.add_argument("--whiten", choices=["auto", "pca", "off"], default="auto",
                   help="with --backbone: PCA whitening learnt on the gallery (auto: when the gallery has at least "
                        f"{WHITEN_MIN_RATIO} images per feature dimension)")
    p.add_argument("--out", default=None, help="default submission.csv (GLDv2), predictions.csv (folders)")
    p.add_argument("--sample-submission", default=None, help="query ids (default DATA_DIR/sample_submission.csv)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cache-dir", default="./cache", help="gallery features; '' disables the cache")
    p.add_argument("--fp16-cache", action="store_true", help="store gallery features in float16 (half the memory)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="backbone arithmetic for feature extraction: fp32 as the original notebook (default), or "
                        "bf16/fp16 autocast (faster on GPUs; the ArcFace head stays fp32)")
    p.add_argument("--exclude", default=None,
                   help="CSV of images not to read (column id or path, as preprocess.py --check-images writes)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the spec's checkpoints in full, objects included (only for files you trust)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model's backbone (worth it on GPUs for large galleries)")
    p.add_argument("--non-landmark", default=None, metavar="auto|CSV",
                   help="sink queries that look like non-landmarks (beyond the original): 'auto' mines them from "
                        "the queries, or a CSV of known non-landmark images (id under DATA_DIR/non_landmark/, or filepath)")
    p.add_argument("--rerank-vote", choices=["auto", "sum", "max"], default="auto",
                   help="re-ranking: a landmark's score sums its neighbours among the top 5 (sum, the original) or "
                        "takes its best (max); auto: max when every model was trained with --recipe finetune")
    p.add_argument("--rerank-cls-power", type=_auto_or_power, default=None, metavar="auto|P",
                   help="re-ranking: the power of the classifier's cosine in sim^9 cls^P; auto: the original's 10, "
                        "3 when every model was trained with --recipe finetune")
    p.add_argument("--report", default=None, metavar="HTML",
                   help="also write a visual report: per query its thumbnail, prediction and 5 nearest gallery "
                        "images, with the scores and a confidence histogram (one self-contained file, report.py)")
    p.add_argument("--report-rows", type=int, default=200, metavar="N",
                   help="queries in the report: the most confident wrong ones first (with --solution), then a "
                        "sample of the rest; all of them when N >= the number of queries (default 200)")
    p.add_argument("--solution", default=None, metavar="CSV",
                   help="with --report, the truth: GLDv2 layout, the competition's id,landmarks[,Usage]; folders, "
                        "path,landmark (the query's path under --query-dir, its gallery folder name; empty for none)")
    p.add_argument("--logs", nargs="+", default=None, metavar="LOG",
                   help="with --report, train.py logs whose curves go into it")
    p.add_argument("--write-parts", action="store_true",
                   help="also write OUT's classifier-only, retrieval-only (and, with --non-landmark, plain "
                        "re-ranked) submissions or predictions: *_classifier.csv, *_retrieval.csv, *_ensemble.csv")
    a = p.parse_args(argv)
    a.folders = any(v is not None for v in (a.gallery_dir, a.query_dir, a.index))
    if (a.spec is None) == (a.backbone is None):
        p.error("give --spec (trained models) or --backbone (no training, with folders), not both")
    if a.backbone and not a.folders:
        p.error("--backbone works with folders (--gallery-dir/--index and --query-dir)")
    if a.image_size <= 0:
        p.error(f"--image-size {a.image_size}: must be positive")
    if not a.folders and not (a.data_dir and a.train_csv and a.idx2landmark):
        p.error("give --data-dir, --train-csv and --idx2landmark (GLDv2 layout), or --gallery-dir/--index and "
                "--query-dir (your photos)")
    a.out = a.out or ("predictions.csv" if a.folders else "submission.csv")
    if a.report_rows < 1:
        p.error(f"--report-rows {a.report_rows}: must be at least 1")
    if not a.report and (a.solution or a.logs):
        p.error("--solution and --logs go with --report")
    return a


def check_report_inputs(a):
    """--solution and --logs read before any image: a wrong file ends the run at once.
    Returns the GLDv2 truth (folders: read once the gallery's names are known)."""
    import plot_logs
    from evaluate import read_solution
    plot_logs.read_logs(a.logs or (), "--logs")
    if a.solution and a.folders:
        read_csv_checked(a.solution, ["path", "landmark"])
    return read_solution(a.solution) if a.solution and not a.folders else None


def write_report(a, res, names, truth=None):
    """predict.py --report: report.report_from_result with the truth of --solution."""
    import report
    from gallery import read_folder_solution
    if a.solution and a.folders:
        truth = read_folder_solution(a.solution, names)
    notes = [f"spec {a.spec}" if a.spec else f"backbone {a.backbone} without training",
             f"answer: {'ensemble with non-landmarks sunk (' + a.non_landmark + ')' if a.non_landmark else 'ensemble'}"
             f"; truth: {a.solution or 'not given'}"]
    report.report_from_result(a.report, res, names, truth, bool(a.non_landmark), a.logs, a.report_rows,
                              notes=notes)


def main(argv=None):
    a = parse_args(argv)
    truth = check_report_inputs(a) if a.report else None
    if a.folders:
        zero = ({"enet_type": a.backbone, "pretrained_path": a.pretrained_path, "image_size": a.image_size,
                 "pool": a.pool, "whiten": a.whiten} if a.backbone else None)
        frame, res = run_folders(a.spec, a.query_dir, a.gallery_dir, a.index, a.save_index, a.add_to_index,
                                 a.idx2landmark, a.device, a.batch_size, a.num_workers, a.precision, a.compile,
                                 a.trust_checkpoint, a.non_landmark, a.retrieval_ranks, zero=zero,
                                 vote=a.rerank_vote, cls_power=a.rerank_cls_power)
        if frame is not None:
            frame.to_csv(a.out, index=False)
            if a.report:
                write_report(a, res, res["names"])
            print(f"wrote {a.out} ({len(frame)} rows, {int((frame['landmark'] != '').sum())} with a landmark)")
            if a.write_parts:
                stem = os.path.splitext(a.out)[0]
                for part in ("classifier", "retrieval") + (("ensemble",) if a.non_landmark else ()):
                    if part in res["frames"]:  # --backbone: no classifier
                        res["frames"][part].to_csv(f"{stem}_{part}.csv", index=False)
        return res
    res = run(a.data_dir, a.train_csv, a.idx2landmark, a.spec, a.device, a.batch_size, a.num_workers,
              a.cache_dir or None, a.sample_submission, a.fp16_cache, a.non_landmark, a.precision, a.compile,
              a.trust_checkpoint, a.exclude, a.rerank_vote, a.rerank_cls_power)
    final = "ensemble_nl" if a.non_landmark else "ensemble"
    format_submission(res["ids"], *res[final]).to_csv(a.out, index=False)
    if a.write_parts:
        stem = os.path.splitext(a.out)[0]
        for part in ("classifier", "retrieval") + (("ensemble",) if a.non_landmark else ()):
            format_submission(res["ids"], *res[part]).to_csv(f"{stem}_{part}.csv", index=False)
    if a.non_landmark:
        print(f"non-landmark handling ({a.non_landmark}): {int(res['nl_flags'].sum())} of {len(res['ids'])} "
              f"queries sunk")
    print(f"wrote {a.out} ({len(res['ids'])} rows)")
    if a.report:
        from gallery import landmark_names
        write_report(a, res, landmark_names(a.idx2landmark), truth)
    return res


if __name__ == "__main__":
    run_main(main)
