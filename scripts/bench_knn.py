"""`scripts/bench.py knn`: nearest neighbours, retrieval.topk_cosine against the bare matmul of the
same shape and the original's (the whole gallery on the device in float32, queries in batches of 4);
with --faiss, faiss against exact search on the same vectors (recall@5 of the codes alone and after
the exact shortlist, build and search time, the index's size)."""
import shutil
import tempfile
import time
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import retrieval  # noqa: E402
from benchkit import PeakMemory, emit, interleaved, warmup  # noqa: E402


def add_parser(sub, common, default_device):
    q = sub.add_parser("knn", help="nearest-neighbour search: exact in bounded memory, or faiss")
    common(q)
    q.set_defaults(run=cmd_knn)
    q.add_argument("--queries", type=int, required=True)
    q.add_argument("--gallery", type=int, required=True)
    q.add_argument("--dim", type=int, required=True, help="embedding width of one model")
    q.add_argument("--models", type=int, default=1, help="models of the ensemble (their embeddings concatenated)")
    q.add_argument("--device", default=default_device)
    q.add_argument("--query-chunk", type=int, default=4096)
    q.add_argument("--gallery-chunk", type=int, default=32768)
    q.add_argument("--clusters", type=int, default=0, help="gallery and queries around K centres (default: uniform)")
    q.add_argument("--noise", type=float, default=0.5, help="with --clusters: the spread around a centre")
    q.add_argument("--faiss", default=None, metavar="FACTORY", help="faiss against exact search, e.g. IVF1024,PQ64")
    q.add_argument("--nprobe", type=int, default=retrieval.FAISS_NPROBE)
    q.add_argument("--ef", type=int, default=retrieval.FAISS_EF_SEARCH, help="HNSW efSearch")
    q.add_argument("--rerank", type=int, default=retrieval.FAISS_RERANK, help="the shortlist scored exactly")


def _vectors(a, rng, tmp):
    """Per model, the queries (Q, D) in memory and the gallery (N, D) float16 on disk, memory-mapped as
    predict.py's --fp16-cache: uniform on the sphere, or with --clusters each image its landmark's
    centre plus noise (recall needs structure); an image keeps its landmark in every model."""
    qs, gs = [], []
    g_lab = rng.integers(0, a.clusters, a.gallery) if a.clusters else None
    q_lab = rng.integers(0, a.clusters, a.queries) if a.clusters else None
    for j in range(a.models):
        centres = rng.standard_normal((a.clusters, a.dim), dtype=np.float32) if a.clusters else None

        def points(lab, n):
            x = rng.standard_normal((n, a.dim), dtype=np.float32)
            if centres is not None:
                x = centres[lab] + a.noise * x
            return x / np.linalg.norm(x, axis=1, keepdims=True)
        g = np.lib.format.open_memmap(os.path.join(tmp, f"g{j}.npy"), mode="w+", dtype=np.float16,
                                      shape=(a.gallery, a.dim))
        for g0 in range(0, a.gallery, 65536):
            n = min(65536, a.gallery - g0)
            g[g0:g0 + n] = points(None if g_lab is None else g_lab[g0:g0 + n], n)
        g.flush()
        del g
        gs.append(np.load(os.path.join(tmp, f"g{j}.npy"), mmap_mode="r"))
        qs.append(points(q_lab, a.queries))
    return qs, gs


def cmd_knn(a):
    device = torch.device(a.device)
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(prefix="bench_knn_")
    try:
        qs, gs = _vectors(a, rng, tmp)
        if a.faiss:
            return _knn_faiss(a, qs, gs, device, tmp)
        dtot = a.dim * a.models
        qc, gc = min(a.query_chunk, a.queries), min(a.gallery_chunk, a.gallery)
        # what topk_cosine holds at once: the queries, one float32 gallery chunk, one similarity
        # block, one model's float16 staging copy of the chunk
        bound_mib = (a.queries * dtot * 4 + gc * dtot * 4 + qc * gc * 4 + gc * a.dim * 2) / 2**20

        def ours():
            retrieval.topk_cosine(qs, gs, 5, device=device, query_chunk=a.query_chunk, gallery_chunk=a.gallery_chunk)

        with PeakMemory(device) as mem:
            warm = warmup(ours, device, calls=1)
        # the bare matrix multiply of the same shape: everything already on the device in float32
        q_all = torch.from_numpy(np.concatenate(qs, 1)).to(device)
        g_all = torch.from_numpy(np.concatenate([np.asarray(g, np.float32) for g in gs], 1)).to(device)
        cases = {"ours": ours, "matmul": lambda: torch.mm(q_all, g_all.T)}
        if a.baseline:
            def original():
                for q0 in range(0, a.queries, 4):
                    (q_all[q0:q0 + 4] @ g_all.T).topk(5, dim=1)
            cases["baseline"] = original
        warmup(cases["matmul"], device, calls=1)
        t = interleaved(cases, device, a.rounds)
        pairs = a.queries * a.gallery
        out = dict(what="knn", queries=a.queries, gallery=a.gallery, dim=dtot, models=a.models, device=str(device),
                   pairs_s=round(pairs / t["ours"]), matmul_pairs_s=round(pairs / t["matmul"]),
                   ratio_to_matmul=round(t["matmul"] / t["ours"], 3), peak_mib=round(mem.peak_mib, 1),
                   bound_mib=round(bound_mib, 1), warmup_s=round(warm, 2))
        if a.baseline:
            out |= dict(baseline_pairs_s=round(pairs / t["baseline"]), ratio=round(t["baseline"] / t["ours"], 3))
        emit(**out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _knn_faiss(a, qs, gs, device, tmp):
    """faiss (a.faiss, the factory) against exact search on the same vectors: recall@5 of the
    codes and of the exact shortlist, build time, search throughput and peak memory, index size."""
    t0 = time.perf_counter()
    with PeakMemory(device) as build_mem:
        fg = retrieval.faiss_index(gs, a.faiss)
    build_s = time.perf_counter() - t0
    fg.save(os.path.join(tmp, "index.faiss"))
    index_mib = os.path.getsize(os.path.join(tmp, "index.faiss")) / 2**20
    _, exact = retrieval.topk_cosine(qs, gs, 5, device=device)

    def search(rerank):
        how = retrieval.Search("faiss", a.faiss, a.nprobe, rerank, ef_search=a.ef)
        return lambda: retrieval.faiss_search(fg, qs, 5, how, device=device, gallery=gs)
    cases = {"exact": lambda: retrieval.topk_cosine(qs, gs, 5, device=device), "codes": search(0),
             "shortlist": search(a.rerank)}
    with PeakMemory(device) as mem:
        found = {k: cases[k]()[1] for k in ("codes", "shortlist")}
    t = interleaved(cases, device, a.rounds)
    recall = {k: float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(exact, f)])) for k, f in found.items()}
    emit(what="knn_faiss", factory=a.faiss, nprobe=a.nprobe, ef=a.ef, rerank=a.rerank, queries=a.queries,
         gallery=a.gallery, dim=a.dim * a.models, clusters=a.clusters, noise=a.noise, device=str(device),
         recall5_codes=round(recall["codes"], 4), recall5_shortlist=round(recall["shortlist"], 4),
         build_s=round(build_s, 2), build_peak_mib=round(build_mem.peak_mib, 1), index_mib=round(index_mib, 1),
         exact_q_s=round(a.queries / t["exact"], 1), codes_q_s=round(a.queries / t["codes"], 1),
         shortlist_q_s=round(a.queries / t["shortlist"], 1), search_peak_mib=round(mem.peak_mib, 1))
