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
import os

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

import ensemble
import features
from dataset import drop_excluded, image_path, read_csv_checked, resolve_paths
from features import Images
from gallery import Gallery, list_images
from preprocess import read_clean_list
from recognizer import (Recognizer, add_args as add_answer_args, check_args as check_answer_args, open_gallery,
                        settings_of)
from retrieval import FaissGallery, faiss_index, unreadable_rows
from util import (ArgumentParser, UserError, cleanup_distributed, cpu_budget, is_main, print0, read_label_map, run_main,
                  setup_distributed)


def format_submission(ids, landmarks, confidences):
    """id,landmarks with "<landmark_id> <confidence>", confidence at full precision (repr)."""
    rows = [f"{int(l)} {float(c)!r}" if l is not None and l == l else "" for l, c in zip(landmarks, confidences)]
    return pd.DataFrame({"id": list(ids), "landmarks": rows})


def _device(a):
    """--device, or CUDA where there is one; under torchrun the GPU of this rank (LOCAL_RANK)."""
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ---------------------------------------------------------------- GLDv2

def run(a):
    """The whole inference on the GLDv2 layout, from predict.py's options (parse_args or
    options()). On rank 0 (or alone) returns Recognizer.answer's result: {'ids', 'classifier',
    'retrieval', 'ensemble', ...} where each part is (landmarks, confidences); with
    a.non_landmark ('auto': mined from the queries, or a CSV of known non-landmark images,
    column `id` under DATA_DIR/non_landmark/ or column `filepath`) also 'ensemble_nl',
    'nl_flags' and 'nl_similarity' (each query's mean cosine to its nearest non-landmarks).
    Under torchrun the other ranks return None once their share of the images is embedded."""
    device = _device(a)
    settings = settings_of(a, device, folders=False)
    read_label_map(a.idx2landmark)  # a wrong label map ends the run before the CSVs are read
    gallery = read_clean_list(a.train_csv)  # id,landmark_id or GLDv2's landmark_id,images; ids as text
    sub = read_csv_checked(a.sample_submission or os.path.join(a.data_dir, "sample_submission.csv"), ["id"])
    gallery = gallery.assign(filepath=resolve_paths(gallery, a.data_dir, "train"))
    queries = sub.assign(filepath=resolve_paths(sub, a.data_dir, "test"))
    if a.exclude:  # listed images are not read: out of the gallery, and empty predictions for queries
        gallery, n_gallery_out = drop_excluded(gallery, a.exclude)
        kept, n_query_out = drop_excluded(queries, a.exclude)
        queries.loc[~queries.index.isin(kept.index), "filepath"] = f"(excluded by {a.exclude})"  # never read
        print0(f"{a.exclude}: left out {n_gallery_out} gallery images and {n_query_out} queries")
    g_paths, q_paths = list(gallery["filepath"]), list(queries["filepath"])
    gallery_digest = hashlib.sha1("\n".join(gallery["id"]).encode()).hexdigest()  # once, not per model

    ens = ensemble.load(a, device)  # every model checked before any image is read
    lists = [Images("gallery", g_paths, keep_in=a.cache_dir or None, digest=gallery_digest,
                    dtype=np.float16 if a.fp16_cache else np.float32), Images("queries", q_paths, neck=True)]
    nl_paths = _non_landmark_paths(a.non_landmark, a.data_dir)
    if nl_paths is not None:
        lists.append(Images("non-landmarks", nl_paths))
    emb = features.embed_all(a, ens, lists, device)
    if not is_main():
        return None
    g_emb = emb.features["gallery"]
    if settings.search.kind == "faiss" and a.cache_dir:
        settings.search.index = _cached_faiss(a, ens, g_emb, gallery_digest)
    rec = Recognizer(ens, Gallery(g_paths, gallery["landmark_id"].to_numpy(), g_emb, ens.known), emb.heads, settings)
    res = rec.answer(emb.features["queries"], emb.features.get("non-landmarks"), ids=list(sub["id"]),
                     query_paths=q_paths)
    res["scratch"] = emb.scratch
    return res


def _cached_faiss(a, ens, g_emb, gallery_digest):
    """--knn faiss on the GLDv2 layout: the gallery's faiss index, kept in --cache-dir beside the
    features it indexes (training an IVF on 1.58 M images is not to be repeated per run). Its
    name follows from the factory and from each model's features file, its name, size and
    modification time: features embedded again give a new index."""
    ident = [a.faiss_index]
    for m in ens.members:
        for size in m.sizes:  # every scale's features file (--scales)
            f = os.path.join(a.cache_dir, features.cache_key(m.checkpoint, size, gallery_digest, a.precision,
                                                             m.cache_ident) + ".npy")
            st = os.stat(f)
            ident.append(f"{os.path.basename(f)}|{st.st_size}|{st.st_mtime_ns}")
    path = os.path.join(a.cache_dir, "faiss-" + hashlib.sha1("\n".join(ident).encode()).hexdigest()[:20])
    if os.path.exists(path + ".faiss") and os.path.exists(path + ".faiss.rows.npy"):
        print(f"faiss index {a.faiss_index!r}: read from {path}.faiss", flush=True)
        return FaissGallery.load(path + ".faiss", a.faiss_index)
    bad = unreadable_rows(*g_emb)
    fg = faiss_index(g_emb, a.faiss_index, exclude=bad if bad.any() else None)
    tmp = f"{path}.part{os.getpid()}"
    fg.save(tmp)  # then renamed: a run killed while writing leaves no index that looks whole
    os.replace(tmp + ".rows.npy", path + ".faiss.rows.npy")
    os.replace(tmp, path + ".faiss")
    print(f"faiss index {a.faiss_index!r}: {len(fg)} gallery images, kept in {path}.faiss", flush=True)
    return fg


# ---------------------------------------------------------------- your own photos

def _check_folder_options(a):
    if a.index is None and a.gallery_dir is None:
        raise UserError("give --gallery-dir (one folder per landmark) or --index (a saved one)")
    if a.add_to_index and (a.index is None or a.gallery_dir is None):
        raise UserError("--add-to-index needs --index (the one to grow) and --gallery-dir (where the new files are)")
    if a.query_dir is not None and not os.path.isdir(a.query_dir):
        raise UserError(f"--query-dir {a.query_dir}: no such folder")
    q_rel = list_images(a.query_dir) if a.query_dir else []
    if a.query_dir and not q_rel:
        raise UserError(f"--query-dir {a.query_dir}: no images in it")
    return q_rel


def run_folders(a):
    """Recognition on your own photos (see gallery.py), from predict.py's options: a
    gallery from folders (--gallery-dir) or a saved index (--index), queries from a
    folder (--query-dir). With --retrieval-ranks, also a CSV of each query's gallery
    images by decreasing similarity (the first a.ranks_k), for evaluate_retrieval.py
    --ranks. --backbone in place of --spec: recognition without training, by
    retrieval on the pretrained backbone's pooled features, whitened on the
    gallery (an index holds the raw features; the whitening is learnt again from the
    whole gallery at each run). --knn faiss: a saved index keeps its faiss index
    beside it (PATH.faiss), used again while the gallery and the factory are the same.
    Returns (predictions frame or None, the answer or None); under torchrun, (None, None)
    on ranks other than 0."""
    device = _device(a)
    settings = settings_of(a, device)
    q_rel = _check_folder_options(a)
    ens = ensemble.load(a, device)
    gallery, todo = open_gallery(ens, a.index, a.gallery_dir, add=a.add_to_index)
    q_paths = [os.path.join(a.query_dir, p) for p in q_rel]
    lists = [Images("gallery", [os.path.join(a.gallery_dir, p) for p, _ in todo]),
             Images("queries", q_paths, neck=True)]
    nl_paths = _non_landmark_paths(a.non_landmark)
    if nl_paths is not None:
        lists.append(Images("non-landmarks", nl_paths))
    emb = features.embed_all(a, ens, lists, device)
    if not is_main():
        return None, None
    bad_gallery = gallery.extend(todo, emb.features["gallery"])
    rec = Recognizer(ens, gallery, emb.heads, settings)
    if a.save_index or a.add_to_index:
        gallery.save(a.save_index or a.index, ens.signature(), faiss=rec.search.index, whiten=rec.space.whiten,
                     calibration=rec.saved_calibration())
    if not q_paths:
        rec.keep_local_features()
        features.remove_scratch(a.cache_dir, emb.scratch)
        return None, None
    before = rec.verifier.seconds if rec.verifier is not None else 0.0  # the calibration's share
    res = rec.answer(emb.features["queries"], emb.features.get("non-landmarks"), ids=q_rel, query_paths=q_paths)
    if rec.verifier is not None:
        rec.keep_local_features()
        spent = rec.verifier.seconds - before
        print(f"verification: {len(q_paths)} queries, each with its first {a.verify} neighbours, in {spent:.1f} s "
              f"({1000 * spent / len(q_paths):.0f} ms per query); with the calibration's: {rec.verifier.cost()}",
              flush=True)
    if a.retrieval_ranks:
        ranked = rec.ranking(res, a.ranks_k)
        pd.DataFrame({"path": q_rel, "ranked": [" ".join(gallery.paths[j] for j in row) for row in ranked]}
                     ).to_csv(a.retrieval_ranks, index=False)
        print(f"wrote {a.retrieval_ranks} (the first {min(a.ranks_k, len(gallery))} gallery images of each query)",
              flush=True)
    res |= {"frames": rec.predictions(res), "scratch": emb.scratch,
            "unreadable_paths": [("gallery", os.path.join(a.gallery_dir, p)) for p in bad_gallery]
            + [("query", p) for p, bad in zip(q_paths, res["unreadable"][0]) if bad]}
    return res["frames"][rec.final], res


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


# ---------------------------------------------------------------- the command line

def build_parser():
    """predict.py's options, the one place they are defined: parse_args (the CLI) and
    options() (other callers) both start from here."""
    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--data-dir", help="GLDv2 layout: holds train/, test/ and sample_submission.csv")
    p.add_argument("--train-csv", help="GLDv2 layout: the gallery, the clean train list (id,landmark_id)")
    ensemble.add_args(p)  # --spec or --backbone and its options, --idx2landmark, the re-ranking
    features.add_args(p)  # --device, --precision
    p.add_argument("--gallery-dir", help="your photos: one folder per landmark, GALLERY_DIR/<name>/*.jpg")
    p.add_argument("--query-dir", help="your photos: the images to recognise (recursive)")
    p.add_argument("--index", help="a saved gallery index (PATH.npz + PATH.json) to answer from")
    p.add_argument("--save-index", help="save the gallery's embeddings as an index at PATH")
    p.add_argument("--retrieval-ranks", default=None, metavar="CSV",
                   help="with folders: also write each query's gallery images by decreasing similarity "
                        "(path,ranked), for evaluate_retrieval.py --ranks")
    p.add_argument("--add-to-index", action="store_true",
                   help="with --index and --gallery-dir: embed only the gallery files the index lacks, and save it")
    p.add_argument("--out", default=None, help="default submission.csv (GLDv2), predictions.csv (folders)")
    p.add_argument("--sample-submission", default=None, help="query ids (default DATA_DIR/sample_submission.csv)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cache-dir", default="./cache", help="gallery features; '' disables the cache")
    p.add_argument("--fp16-cache", action="store_true", help="store gallery features in float16 (half the memory)")
    p.add_argument("--exclude", default=None,
                   help="CSV of images not to read (column id or path, as preprocess.py --check-images writes)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model's backbone (worth it on GPUs for large galleries)")
    p.add_argument("--non-landmark", default=None, metavar="auto|CSV",
                   help="sink queries that look like non-landmarks (beyond the original): 'auto' mines them from "
                        "the queries, or a CSV of known non-landmark images (id under DATA_DIR/non_landmark/, or filepath)")
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
    add_answer_args(p)  # --knn and the faiss flags, --calibrate, --min-confidence
    p.add_argument("--dist-timeout", type=float, default=60,
                   help="under torchrun: minutes a rank waits for the others (their share of the images) before "
                        "the run fails (default 60)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # torch.distributed.launch passes it; torchrun sets LOCAL_RANK
    p.set_defaults(ranks_k=10000)  # --retrieval-ranks: how many gallery images per query
    return p


def check_options(a):
    """The options' consistency, and the derived a.folders and a.out; a UserError names what is wrong."""
    a.folders = any(v is not None for v in (a.gallery_dir, a.query_dir, a.index))
    if (a.spec is None) == (a.backbone is None):
        raise UserError("give --spec (trained models) or --backbone (no training, with folders), not both")
    if a.backbone and not a.folders:
        raise UserError("--backbone works with folders (--gallery-dir/--index and --query-dir)")
    if a.image_size <= 0:
        raise UserError(f"--image-size {a.image_size}: must be positive")
    if not a.folders and not (a.data_dir and a.train_csv and a.idx2landmark):
        raise UserError("give --data-dir, --train-csv and --idx2landmark (GLDv2 layout), or --gallery-dir/--index "
                        "and --query-dir (your photos)")
    a.out = a.out or ("predictions.csv" if a.folders else "submission.csv")
    if a.report_rows < 1:
        raise UserError(f"--report-rows {a.report_rows}: must be at least 1")
    if not a.report and (a.solution or a.logs):
        raise UserError("--solution and --logs go with --report")
    check_answer_args(a)  # --knn's faiss flags, --min-confidence, --unknown-share, --verify
    return a


def parse_args(argv=None):
    return check_options(build_parser().parse_args(argv))


def options(base=None, **overrides):
    """predict.py's options for a caller other than its command line (the notebook, tests): the parser's defaults, then the attributes of namespace `base` that predict.py
    knows, then `overrides` (by attribute name: data_dir=..., spec=...), checked as the CLI
    checks them."""
    a = build_parser().parse_args([])
    known = set(vars(a))
    for k, v in (vars(base) if base is not None else {}).items():
        if k in known:
            setattr(a, k, v)
    for k, v in overrides.items():
        if k not in known:
            raise TypeError(f"predict.py has no option {k!r}")
        setattr(a, k, v)
    return check_options(a)


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
    """predict.py --report: recognizer.write_report with the truth of --solution."""
    import report
    from gallery import read_folder_solution
    from recognizer import write_report as write
    if a.solution and a.folders:
        truth = read_folder_solution(a.solution, names)
    notes = [f"spec {a.spec}" if a.spec else f"backbone {a.backbone} without training",
             f"answer: {'ensemble with non-landmarks sunk (' + a.non_landmark + ')' if a.non_landmark else 'ensemble'}"
             f"; truth: {a.solution or 'not given'}"]
    write(a.report, res, report.View(truth, names, a.logs, a.report_rows, notes=notes), bool(a.non_landmark))


def main(argv=None):
    a = parse_args(argv)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched and int(os.environ["WORLD_SIZE"]) > 1 and not a.cache_dir:
        raise UserError("--cache-dir '': under torchrun the ranks hand their features over through --cache-dir; "
                        "give a folder every rank can read and write")
    if launched:
        setup_distributed(a.local_rank, a.dist_timeout)
        # the node's cores shared by its ranks: loader workers and intra-op threads (as train.py)
        a.num_workers, threads = cpu_budget(a.num_workers)
        torch.set_num_threads(threads)
    try:
        features.check_shared_cache(a.cache_dir)
        truth = check_report_inputs(a) if a.report else None
        return answer_folders(a) if a.folders else answer_gldv2(a, truth)
    finally:
        cleanup_distributed()


def write_parts(a, write):
    """--write-parts: OUT's classifier-only, retrieval-only (and with --non-landmark plain ensemble)
    answers beside it, write(part, path) writing each."""
    stem = os.path.splitext(a.out)[0]
    for part in ("classifier", "retrieval") + (("ensemble",) if a.non_landmark else ()):
        write(part, f"{stem}_{part}.csv")


def write_unreadable(a, rows):
    """The images that could not be read ([(role, path)]), named: the first few printed, all of them
    in OUT_unreadable.csv beside the output."""
    if not rows:
        return
    path = os.path.splitext(a.out)[0] + "_unreadable.csv"
    pd.DataFrame(rows, columns=["role", "path"]).to_csv(path, index=False)
    first = ", ".join(p for _, p in rows[:3])
    print(f"unreadable images: {len(rows)} ({first}{', ...' if len(rows) > 3 else ''}); all of them in {path}",
          flush=True)


def answer_folders(a):
    frame, res = run_folders(a)
    if frame is None:  # no queries (an index built or grown), or torchrun's rank > 0
        return res
    frame.to_csv(a.out, index=False)
    write_unreadable(a, res["unreadable_paths"])
    if a.report:
        write_report(a, res, res["names"])
    print(f"wrote {a.out} ({len(frame)} rows, {int((frame['landmark'] != '').sum())} with a landmark)")
    if a.write_parts:  # --backbone: no classifier
        write_parts(a, lambda part, path: part in res["frames"] and res["frames"][part].to_csv(path, index=False))
    features.remove_scratch(a.cache_dir, res["scratch"])
    return res


def answer_gldv2(a, truth):
    res = run(a)
    if res is None:  # torchrun, rank > 0: its share is embedded; rank 0 answers
        return None
    final = "ensemble_nl" if a.non_landmark else "ensemble"
    # --calibrate: every guess kept, ordered by its calibrated confidence (GAP never loses by a late guess)
    format_submission(res["ids"], res[final][0], res.get("calibrated", res[final][1])).to_csv(a.out, index=False)
    q_bad, g_bad = res["unreadable"]
    write_unreadable(a, [("gallery", p) for p, bad in zip(res["gallery_paths"], g_bad) if bad]
                     + [("query", p) for p, bad in zip(res["query_paths"], q_bad) if bad])
    if a.write_parts:
        write_parts(a, lambda part, path: format_submission(res["ids"], *res[part]).to_csv(path, index=False))
    if a.non_landmark:
        print(f"non-landmark handling ({a.non_landmark}): {int(res['nl_flags'].sum())} of {len(res['ids'])} "
              f"queries sunk")
    print(f"wrote {a.out} ({len(res['ids'])} rows)")
    if a.report:
        write_report(a, res, ensemble.landmark_names(a.idx2landmark), truth)
    features.remove_scratch(a.cache_dir, res["scratch"])
    return res


if __name__ == "__main__":
    run_main(main)
