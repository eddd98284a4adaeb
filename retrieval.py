"""Retrieval and re-ranking on arrays: no files, no images, no models (features.py extracts, gallery.py keeps
indexes, recognizer.py puts them together). Importing it loads numpy and torch, nothing that reads images.

Embeddings come in as lists over the models of arrays (N, 512), maybe float16 and memory-mapped; the
similarity of two images is the mean of the models' cosines, the cosine of the normalised concatenation.

- nearest neighbours: exact search in bounded memory (topk_cosine, the original's matmul made to
  stream), or faiss (faiss_index / faiss_search) for galleries beyond it; knn() picks one;
- the classifier's top-k after the original's pred_mask (classifier_topk, pred_mask_topk);
- the original's re-ranking score(l) = sum sim^9 cls(l)^10 over the top 5 (rerank, RERANK);
- non-landmark queries flagged and sunk (non_landmark_flags, apply_non_landmark);
- recognize(): all of it, for the queries' neck outputs against a gallery's embeddings;
- PCA whitening learnt on a gallery, for recognition without training and finetune.py's neck (learn_whitening,
  whiten, whitening_of, whitened);
- the learned whitening of a labelled gallery (--whiten learned: learn_within_whitening, learned_whitened).
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from util import UserError

TOP_K = 5        # gallery neighbours per query
CLS_TOP_K = 5    # classifier candidates per query
CLS_MISSING = 1e-8  # cls(l) of a neighbour's landmark outside the classifier's top CLS_TOP_K
# whiten only from at least this many images per feature dimension (the --init-neck pca sample,
# predict.py --whiten auto's gallery): learnt from fewer, even shrunk, a whitening costs retrieval
# (realdev, 141 photos, C = 1280, mean of 5 splits: raw 0.975, shrunk by 1 - N/C 0.960, Ledoit-Wolf
# 0.90; docs/transfer.md)
WHITEN_MIN_RATIO = 2
NL_FACTOR = 1e-100  # confidence factor of a query that looks like a non-landmark: below every
                    # unflagged confidence (those are >= ~1e-90: sim^9 * (1e-8)^10 at worst)

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


# ---------------------------------------------------------------- nearest neighbours

def unreadable_rows(*features):
    """Rows (bool) that any of the feature arrays marks as unreadable (NaN),
    read in chunks: the arrays may be large memory maps."""
    n = len(features[0])
    bad = np.zeros(n, bool)
    for f in features:
        for r0 in range(0, n, 65536):
            bad[r0:r0 + 65536] |= np.isnan(np.asarray(f[r0:r0 + 65536, 0], np.float32))
    return bad


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


# faiss (optional: faiss-cpu, or faiss-gpu where installed) for galleries beyond exact search. The models'
# embeddings are concatenated and each scaled by 1/sqrt(M), so that an inner product of two such vectors is
# the mean of the models' cosines, topk_cosine's similarity. 'Flat' is exact search; a compressed index
# ('IVF65536,PQ64': 64 bytes an image instead of 2 KB a model) is trained on a sample of the gallery and
# answers from codes, approximately.
FAISS_NPROBE = 32      # inverted lists visited per query (faiss' own default, 1, loses most neighbours)
FAISS_EF_SEARCH = 64   # HNSW: candidates kept while walking the graph (faiss' default, 16, gave recall@5
                       # 0.85 on bench.py knn's clustered 100k x 512, 64 gives 0.98; docs/performance.md)
FAISS_RERANK = 50      # candidates from the codes whose exact cosines pick the top 5 (0: the codes' own)
FAISS_TRAIN_MIN = 1 << 16  # training sample: at least this many vectors, and 40 per inverted list
                           # (faiss warns below 39 per centroid), never more than the gallery
FAISS_TRAIN_BYTES = 4 << 30  # nor more than 4 GiB of float32: GLDv2 x 9 models is 4608-d, where 40 x 65536
                             # vectors would be 48 GB ('PCA512,IVF65536,PQ64' trains on 9x more per GiB)


def import_faiss(flag="--knn faiss"):
    try:
        import faiss
    except ImportError:
        raise UserError(f"{flag} needs faiss: pip install faiss-cpu (or faiss-gpu on a CUDA machine)") from None
    return faiss


class FaissGallery:
    """A faiss inner-product index of a gallery and, per faiss id, the gallery row it holds
    (unreadable rows are left out of the index, so ids and rows differ)."""

    def __init__(self, index, rows, factory):
        self.index, self.rows, self.factory = index, np.asarray(rows, np.int64), factory

    def __len__(self):
        return int(self.index.ntotal)

    def save(self, path):
        """PATH (faiss' own format, no pickle) and PATH.rows.npy."""
        import_faiss().write_index(self.index, path)
        np.save(path + ".rows.npy", self.rows)

    @classmethod
    def load(cls, path, factory):
        faiss = import_faiss()
        return cls(faiss.read_index(path), np.load(path + ".rows.npy", allow_pickle=False), factory)


def _stacked(arrays, rows):
    """Rows of each model's embeddings, float32, concatenated and scaled by 1/sqrt(M)."""
    scale = np.float32(1 / np.sqrt(len(arrays)))
    return np.ascontiguousarray(np.concatenate([np.asarray(a[rows], np.float32) for a in arrays], 1) * scale)


def faiss_index(gallery, factory="Flat", exclude=None, train_size=None, seed=0, chunk=16384):
    """A FaissGallery of the gallery (a list over models of (N, D) arrays, maybe memory-mapped
    float16) built by faiss' index_factory(factory) with inner products. An index that needs
    training (IVF, PQ) is trained on `train_size` gallery rows drawn with `seed` (default:
    40 per inverted list, at least FAISS_TRAIN_MIN, at most the gallery and
    FAISS_TRAIN_BYTES). Rows are added
    chunk by chunk: only one chunk is ever in float32. exclude: (N,) bool, rows left out."""
    faiss = import_faiss()
    gs = gallery if isinstance(gallery, (list, tuple)) else [gallery]
    keep = np.arange(len(gs[0])) if exclude is None else np.flatnonzero(~np.asarray(exclude, bool))
    dim = sum(g.shape[1] for g in gs)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UserError(f"--faiss-index {factory!r}: not a faiss index factory string "
                        f"({str(e).strip().splitlines()[-1]})") from None
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        n = train_size or min(max(FAISS_TRAIN_MIN, 40 * (ivf.nlist if ivf is not None else 0)),
                              FAISS_TRAIN_BYTES // (4 * dim))
        n = min(n, len(keep))
        sample = np.sort(np.random.default_rng(seed).choice(keep, n, replace=False))
        try:
            index.train(_stacked(gs, sample))
        except RuntimeError as e:  # e.g. fewer training vectors than centroids
            raise UserError(f"--faiss-index {factory!r}: cannot train on {n} gallery images "
                            f"({str(e).strip().splitlines()[-1]})") from None
    for c0 in range(0, len(keep), chunk):
        index.add(_stacked(gs, keep[c0:c0 + chunk]))
    return FaissGallery(index, keep, factory)


def faiss_search(fg, queries, k=TOP_K, search=None, device="cpu", gallery=None, chunk=1024):
    """topk_cosine's answer from a FaissGallery: (sims (Q, k) float32, gallery rows (Q, k) int64),
    best first; a slot the index cannot fill (fewer than k images in the visited lists) has
    similarity -inf and row 0, as topk_cosine's beyond a too small gallery. search: a Search
    (its nprobe, ef_search and rerank; default Search('faiss', rerank=0)).

    rerank > k, with the gallery's embeddings (a list over models, maybe memory-mapped): the
    index gives `rerank` candidates from its codes and their exact cosines, read from the
    embeddings for those rows alone, give the k. The re-ranking raises these similarities
    to the 9th power: approximate ones would carry the codes' error into the answer.

    nprobe: an IVF index's inverted lists visited per query; ef_search: an HNSW graph's
    (or an HNSW coarse quantizer's) search depth, through faiss' ParameterSpace, which
    reaches it inside a PCA or other pre-transform; faiss searches at least k deep anyway."""
    faiss = import_faiss()
    search = search or Search("faiss", rerank=0)
    nprobe, rerank, ef_search = search.nprobe, search.rerank, search.ef_search
    qs = queries if isinstance(queries, (list, tuple)) else [queries]
    gs = None if gallery is None else (gallery if isinstance(gallery, (list, tuple)) else [gallery])
    index = fg.index
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(min(nprobe, ivf.nlist))
    graph = "HNSW" in fg.factory.upper()
    if graph:
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", int(ef_search))
    if (torch.device(device).type == "cuda" and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus()
            and not graph):  # faiss-gpu has no HNSW (its cloner throws for one): a graph searches on the CPU
        index = faiss.index_cpu_to_all_gpus(index)  # faiss-gpu: the search on the GPUs
    k_eff = min(k, len(fg))
    shortlist = min(max(rerank, k_eff), len(fg)) if gs is not None and rerank > k_eff else k_eff
    s_all, i_all = [], []
    for q0 in range(0, len(qs[0]), chunk):
        s, i = index.search(_stacked(qs, slice(q0, q0 + chunk)), shortlist)
        missing = i < 0
        rows = np.where(missing, 0, fg.rows[np.maximum(i, 0)])
        s = np.where(missing, -np.inf, s).astype(np.float32)
        if shortlist > k_eff:
            s = _exact_on_shortlist([q[q0:q0 + chunk] for q in qs], gs, rows, missing)
            order = np.lexsort((rows, -s), axis=1)[:, :k_eff]  # ties: the lower gallery row first, as topk_cosine
            s, rows = np.take_along_axis(s, order, 1), np.take_along_axis(rows, order, 1)
        s_all.append(s)
        i_all.append(rows)
    if not s_all:
        return np.zeros((0, k_eff), np.float32), np.zeros((0, k_eff), np.int64)
    return np.concatenate(s_all), np.concatenate(i_all)


def _exact_on_shortlist(qs, gs, rows, missing):
    """The mean over models of the exact inner products of each query with its candidate rows
    (Q, S); each model's candidates read once (sorted, unique) from its maybe memory-mapped array."""
    uniq, inv = np.unique(rows, return_inverse=True)
    inv = inv.reshape(rows.shape)
    sims = np.zeros(rows.shape, np.float32)
    for q, g in zip(qs, gs):
        cand = np.asarray(g[uniq], np.float32)                                  # (U, D)
        sims += np.einsum("qd,qsd->qs", np.asarray(q, np.float32), cand[inv])
    sims /= len(gs)
    return np.where(missing, -np.inf, sims).astype(np.float32)


class Search:
    """How neighbours are found: kind 'exact' (topk_cosine) or 'faiss' (factory, nprobe,
    ef_search, and rerank, the shortlist re-scored exactly; `index` a FaissGallery already built
    for this very gallery, e.g. from a saved index)."""

    def __init__(self, kind="exact", factory="Flat", nprobe=FAISS_NPROBE, rerank=FAISS_RERANK, index=None,
                 ef_search=FAISS_EF_SEARCH):
        if kind not in ("exact", "faiss"):
            raise ValueError(f"kind must be 'exact' or 'faiss', not {kind!r}")
        self.kind, self.factory, self.nprobe, self.rerank, self.index = kind, factory, nprobe, rerank, index
        self.ef_search = ef_search


def knn(queries, gallery, k=TOP_K, device="cpu", exclude=None, search=None):
    """The k nearest gallery rows of each query, exactly (topk_cosine) or by faiss (search.kind).
    Returns (sims, rows, the FaissGallery used or None)."""
    if search is None or search.kind == "exact":
        return (*topk_cosine(queries, gallery, k, device=device, exclude=exclude), None)
    fg = search.index
    if fg is None:
        fg = faiss_index(gallery, search.factory, exclude=exclude)
    return (*faiss_search(fg, queries, k, search, device=device, gallery=gallery), fg)

# ---------------------------------------------------------------- classifier and re-ranking

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
    # an empty slot (similarity -inf: a gallery of fewer than K images) votes nothing; 0 * -inf would be NaN
    per_nb = np.where(np.isfinite(sims), per_nb, 0.0)
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


# ---------------------------------------------------------------- the whole answer

@dataclass
class Rules:
    """How recognize() answers: rerank_with, (vote, sim power, cls power) of rerank (RERANK);
    search, a Search (None: exact); non_landmark: None (off), 'auto' (mined from the queries) or
    anything else with nl_emb given (a known set); device, where the maths runs."""
    rerank_with: tuple = RERANK["original"]
    search: Search = None
    non_landmark: object = None
    device: object = "cpu"


def recognize(zqs, g_emb, g_labels, heads=None, idx2lid=None, nl_emb=None, rules=None):
    """Classifier, retrieval and their re-ranked ensemble for the queries.

    zqs: per model, the queries' neck outputs; g_emb: per model, the gallery's
    embeddings; g_labels: the gallery's landmark ids (ids beyond the label map
    are fine: retrieval can predict them, the classifier cannot); heads: per model
    its ArcFace head and idx2lid its classes' landmark ids, or None (no classifier:
    predict.py --backbone): retrieval alone, also as 'ensemble'; nl_emb: per model
    a known non-landmark set's embeddings; rules: Rules.
    Returns {'classifier', 'retrieval', 'ensemble': (landmarks, confidences),
    'neighbours': (sims, gallery rows), 'cls_top', 'unreadable': (queries,
    gallery), 'faiss': the FaissGallery searched or None}, and with non_landmark also 'ensemble_nl',
    'nl_flags', 'nl_similarity'."""
    rules = rules or Rules()
    device, non_landmark = rules.device, rules.non_landmark
    # unreadable images: left out of the gallery; a query gets an empty prediction
    # the queries in memory, float32 (they may come as read-only memory maps: predict.py under torchrun)
    zqs = [z if type(z) is np.ndarray and z.dtype == np.float32 and z.flags.writeable else np.array(z, np.float32)
           for z in zqs]
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
    sims, nn, fg = knn(q_emb, g_emb, TOP_K, device=device, exclude=g_bad if g_bad.any() else None,
                        search=rules.search)
    nn_l = np.asarray(g_labels)[nn]

    def blank(part):  # an unreadable query: no prediction
        landmarks, conf = part
        return (np.where(q_bad, None, landmarks.astype(object)), np.where(q_bad, 0.0, conf))

    res = {"retrieval": blank((nn_l[:, 0], sims[:, 0])), "neighbours": (sims, nn), "neighbour_landmarks": nn_l,
           "unreadable": (q_bad, g_bad), "faiss": fg}
    if heads is None:
        res["ensemble"] = res["retrieval"]
    else:
        lid_of = np.array([idx2lid[i] for i in range(len(idx2lid))])
        present = np.isin(lid_of, np.unique(g_labels))
        cls_s, cls_i = classifier_topk(zqs, heads, present, device=device)
        cls_l = lid_of[cls_i]
        vote, sim_power, cls_power = rules.rerank_with
        res |= {"classifier": blank((cls_l[:, 0], cls_s[:, 0])),
                "ensemble": blank(rerank(sims, nn_l, cls_s, cls_l, sim_power, cls_power, vote=vote)),
                "cls_top": (cls_s, cls_l)}
    if non_landmark is not None:
        flags, s_nl = non_landmark_flags(q_emb, sims[:, 0], nl_emb or None, device=device)
        res["nl_flags"], res["nl_similarity"] = flags, s_nl
        res["ensemble_nl"] = (res["ensemble"][0], apply_non_landmark(res["ensemble"][1], flags))
    return res


# ---------------------------------------------------------------- PCA whitening (zero training, finetune's neck)

def learn_whitening(features, dim=None, beta=None):
    """PCA whitening of `features` (N, C): (P (D, C), m (C,)) in float64 such
    that P (f - m) has identity covariance over the features, D = min(dim, C)
    leading components.

    The estimate is shrunk by beta: the covariance towards a multiple mu of the
    identity, the mean towards 0, i.e. m = (1 - beta) mean and the covariance
    about m blended with beta * mu * I (same eigenvectors, eigenvalues blended).
    By default beta is the larger of Ledoit and Wolf's estimate (sklearn) and
    1 - N/C: with fewer images than dimensions the sample covariance is
    singular, and a whitening that trusts it blows up the directions the
    sample did not see; its mean is noisy too. beta = 1 whitens nothing: P is
    the projection onto the D leading directions of the uncentred second
    moment (over 1/sqrt(mu)), which ranks the sampled images as the raw
    features do. Returns (P, m)."""
    from sklearn.covariance import ledoit_wolf_shrinkage
    x = np.asarray(features, np.float64)
    n, c = x.shape
    mean = x.mean(axis=0)
    if beta is None:
        beta = max(ledoit_wolf_shrinkage(x - mean, assume_centered=True) if n > 1 else 1.0, 1.0 - n / c)
    m = (1 - beta) * mean
    xc = x - m
    cov = xc.T @ xc / max(n, 1)
    mu = np.trace(cov) / c if np.trace(cov) > 0 else 1.0
    w, u = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1][:min(dim or c, c)]
    w = np.maximum((1 - beta) * w[order] + beta * mu, mu * 1e-12)  # a zero eigenvalue (constant features): no division by 0
    u = u[:, order]
    u *= np.sign(u[np.abs(u).argmax(0), np.arange(u.shape[1])])  # each component's largest entry positive: reproducible
    return u.T / np.sqrt(w)[:, None], m


def whiten(features, P, m):
    """The whitened features P (f - m), float32."""
    return ((np.asarray(features, np.float64) - m) @ P.T).astype(np.float32)


def whitened_embeddings(g_raw, *others, whiten_mode="auto"):
    """The gallery's and the others' embeddings for zero-training retrieval, L2-normalised,
    float32: PCA-whitened with a whitening learnt on the gallery (learn_whitening),
    or the pooled features as they are. 'auto' whitens galleries of at least
    WHITEN_MIN_RATIO images per dimension: a whitening learnt on fewer is mostly noise
    and costs retrieval (docs/transfer.md: GAP 0.975 raw, 0.960 whitened with a shrunk
    estimate, on 141 photos)."""
    w = whitening_of(g_raw, whiten_mode)
    return [None if a is None else whitened(a, w) for a in (g_raw, *others)]


def whitening_of(g_raw, whiten_mode="auto"):
    """(P, m) of the whitening learnt on the gallery's features, or None (see whitened_embeddings)."""
    g = np.asarray(g_raw, np.float32)
    on = whiten_mode == "pca" or (whiten_mode == "auto" and len(g) >= WHITEN_MIN_RATIO * g.shape[1])
    return learn_whitening(g) if on else None


def whitened(a, w):
    """Features a whitened with w = (P, m) (None: as they are), L2-normalised, float32."""
    return F.normalize(torch.from_numpy(whiten(a, *w) if w else np.asarray(a, np.float32)), dim=1).numpy()


# ---------------------------------------------------------------- learned whitening (--whiten learned)

# The within-landmark scatter's estimate is blended half with the identity (times its mean
# eigenvalue): chosen on realhard and realdev over 10 splits among 0.2-0.7 (docs/transfer.md).
LEARNED_SHRINK = 0.5


def learn_within_whitening(features, labels, shrink=LEARNED_SHRINK):
    """(P (C, C), m (C,)) in float64 that whiten the scatter of the gallery's photos about their
    landmark's mean: the supervised whitening of Radenovic, Tolias and Chum (TPAMI 2018, "Lw"),
    with classes in place of matching pairs, at full dimension (a rotation after it changes no
    cosine). The directions in which photos of one landmark differ (the season, the distance, the
    part of a site) are shrunk, those that tell landmarks apart kept. Features (N, C) are taken
    at unit length; rows that are not finite (unreadable photos) and landmarks of one photo add
    no scatter. The scatter S is blended with the identity: (1 - shrink) S + shrink tr(S)/C I,
    since a dozen photos per landmark cannot estimate C x C entries; m is the photos' mean."""
    x = np.asarray(features, np.float64)
    ok = np.isfinite(x).all(1)
    x, lab = x[ok], np.asarray(labels)[ok]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    c = x.shape[1]
    _, inv, counts = np.unique(lab, return_inverse=True, return_counts=True)
    means = np.zeros((len(counts), c))
    np.add.at(means, inv, x)
    means /= np.maximum(counts, 1)[:, None]
    d = (x - means[inv])[counts[inv] > 1]
    scatter = d.T @ d / max(len(d), 1)
    mu = np.trace(scatter) / c if np.trace(scatter) > 0 else 1.0
    w, u = np.linalg.eigh((1 - shrink) * scatter + shrink * mu * np.eye(c))
    return u.T / np.sqrt(np.maximum(w, mu * 1e-12))[:, None], x.mean(0) if len(x) else np.zeros(c)


def learned_whitened(a, w):
    """Features a (N, C) as --whiten learned compares them, with w = learn_within_whitening's (P, m):
    the unit vectors of their learned-whitened and of their raw features side by side, over sqrt 2,
    so that the inner product of two rows is the mean of the two cosines (float32). The raw cosine
    stays in: alone, the whitening learnt on a dozen photos a landmark lost to the raw features on
    realdev more than the mean does (docs/transfer.md). A NaN row stays NaN (unreadable)."""
    a = np.asarray(a, np.float32)
    raw = F.normalize(torch.from_numpy(a), dim=1).numpy()
    out = np.concatenate([whitened(raw, w), raw], 1) / np.sqrt(2.0)
    return out.astype(np.float32)
