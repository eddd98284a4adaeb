"""Revisited Oxford and Paris (Radenovic, Iscen, Tolias, Avrithis, Chum, CVPR 2018): mAP and mP@k
for the Easy, Medium and Hard protocols.

    python evaluate_retrieval.py --gnd gnd_roxford5k.pkl --features feats.npz   # arrays `db` (N, D), `queries` (Q, D)
    python evaluate_retrieval.py --gnd gnd_roxford5k.pkl --ranks ranks.npy      # (Q, N) database indices, best first
    python evaluate_retrieval.py --gnd gnd_roxford5k.pkl --ranks ranks.csv      # predict.py --retrieval-ranks
    python evaluate_retrieval.py --gnd gnd_roxford5k.pkl --images roxford5k/jpg --spec S [--device cuda]

The ground truth is the protocol's file (a pickle of dicts of lists and arrays,
read by util.DataUnpickler, which builds nothing else) or the same structure as JSON:
{"imlist": [...], "qimlist": [...], "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [...],
"hard": [...], "junk": [...]}, ...]}. With --images and --spec, the models of
the spec embed DIR/<name>.jpg for the database and the queries cropped to
their bounding boxes, as the protocol says; similarities are the mean of the
models' cosines.

Protocols: Easy counts the easy images as positives and ignores hard and junk
ones; Medium counts easy and hard, ignores junk; Hard counts hard, ignores easy
and junk. Ignored images are taken out of the ranking before scoring. AP is the
protocol's (trapezoidal over the recall steps); mP@k is the precision at
min(k, rank of the last positive). Queries without a positive in a protocol do
not count in its means.
"""
import json
import os
import pickle
import tempfile
from types import SimpleNamespace

import numpy as np

from util import ArgumentParser, UserError, load_data_file, run_main

PROTOCOLS = {"easy": (("easy",), ("junk", "hard")),
             "medium": (("easy", "hard"), ("junk",)),
             "hard": (("hard",), ("junk", "easy"))}
KAPPAS = (1, 5, 10)


def read_gnd(path):
    """The protocol's ground truth: {'imlist', 'qimlist', 'gnd'} from its pickle or a JSON equivalent."""
    if not os.path.isfile(path):
        raise UserError(f"--gnd {path}: no such file")
    try:
        cfg = load_data_file(path)  # plain data only: a planted payload cannot run
        gnd = [{k: np.asarray(v).ravel().tolist() for k, v in g.items()} for g in cfg["gnd"]]
        return {"imlist": list(cfg.get("imlist", [])), "qimlist": list(cfg.get("qimlist", [])), "gnd": gnd}
    except (pickle.UnpicklingError, json.JSONDecodeError, KeyError, TypeError, ValueError, EOFError) as e:
        raise UserError(f"--gnd {path}: not a revisited Oxford/Paris ground truth ({e})") from e


def average_precision(pos, n_positives):
    """The protocol's AP: pos are the 0-based ranks of the positives found, ignored
    images taken out, ascending; trapezoids between the precisions before and at
    each positive, over recall steps of 1/n_positives."""
    ap = 0.0
    for j, r in enumerate(pos):
        before = j / r if r > 0 else 1.0
        at = (j + 1) / (r + 1)
        ap += (before + at) / 2 / n_positives
    return ap


def evaluate(ranks, gnd, kappas=KAPPAS):
    """{protocol: {'map', 'mp@k': [...], 'aps': per query (NaN: no positive)}}; ranks (Q, N) best first."""
    out = {}
    for name, (ok_keys, junk_keys) in PROTOCOLS.items():
        aps, prs = [], []
        for order, g in zip(ranks, gnd):
            ok = {i for k in ok_keys for i in g.get(k, [])}
            if not ok:
                aps.append(float("nan"))
                prs.append([float("nan")] * len(kappas))
                continue
            junk = {i for k in junk_keys for i in g.get(k, [])} - ok
            order = [i for i in np.asarray(order).tolist() if i not in junk]
            pos = np.flatnonzero(np.isin(order, list(ok)))
            aps.append(average_precision(pos, len(ok)))
            if len(pos):
                last = pos.max() + 1
                prs.append([float((pos + 1 <= min(last, k)).sum() / min(last, k)) for k in kappas])
            else:
                prs.append([0.0] * len(kappas))
        aps, prs = np.array(aps), np.array(prs)
        out[name] = {"map": float(np.nanmean(aps)) if np.isfinite(aps).any() else float("nan"),
                     "mp@k": np.nanmean(prs, axis=0).tolist() if np.isfinite(aps).any() else [float("nan")] * len(kappas),
                     "aps": aps}
    return out


def ranks_from_csv(path, cfg):
    """(Q, N) database indices from predict.py --retrieval-ranks' CSV (path,ranked):
    files are matched to qimlist and imlist by their names without folder and
    extension; images the ranking lacks are appended at its end."""
    import pandas as pd

    def stem(p):
        return os.path.splitext(os.path.basename(p))[0]
    df = pd.read_csv(path, keep_default_na=False, dtype=str)
    if list(df.columns[:2]) != ["path", "ranked"]:
        raise UserError(f"--ranks {path}: expected columns path,ranked (predict.py --retrieval-ranks)")
    by_query = {stem(q): r.split() for q, r in zip(df["path"], df["ranked"])}
    db = {n: i for i, n in enumerate(cfg["imlist"])}
    ranks = []
    for q in cfg["qimlist"]:
        if q not in by_query:
            raise UserError(f"--ranks {path}: no row for query {q}")
        row = [db[stem(p)] for p in by_query[q] if stem(p) in db]
        seen = set(row)
        ranks.append(row + [i for i in range(len(db)) if i not in seen])
    return np.array(ranks)


def ranks_from_features(db, queries):
    """(Q, N) database indices by decreasing cosine similarity."""
    db = db / np.linalg.norm(db, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(queries @ db.T), axis=1, kind="stable")


def features_from_images(a, cfg):
    """The database's and the queries' (cropped to their bounding boxes) embeddings by the models of
    --spec or --backbone (ensemble.load, checked before any image is read), compared as
    predict.py compares them (a backbone's whitened on the database), concatenated over the
    models and scaled by 1/sqrt(M), so that inner products are the mean of the models' cosines."""
    import cv2
    import torch

    import ensemble
    import features
    from retrieval import unreadable_rows
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ens = ensemble.load(a, device)
    db_paths = [os.path.join(a.images, n + ".jpg") for n in cfg["imlist"]]
    with tempfile.TemporaryDirectory() as tmp:
        q_paths = []
        for n, g in zip(cfg["qimlist"], cfg["gnd"]):
            img = cv2.imread(os.path.join(a.images, n + ".jpg"), cv2.IMREAD_COLOR)
            if img is None:
                raise UserError(f"{os.path.join(a.images, n + '.jpg')}: cannot read the query image")
            x1, y1, x2, y2 = (int(round(v)) for v in g["bbx"])  # the protocol's crop (PIL rounds)
            q_paths.append(os.path.join(tmp, f"{len(q_paths)}.png"))  # lossless: no second compression
            cv2.imwrite(q_paths[-1], img[max(y1, 0):y2, max(x1, 0):x2])
        emb = features.embed_all(SimpleNamespace(batch_size=a.batch_size, num_workers=a.num_workers,
                                                 precision=a.precision, cache_dir=None), ens,
                                 [features.Images("database", db_paths),
                                  features.Images("queries", q_paths, neck=True)],
                                 device)
    bad = unreadable_rows(*emb.features["database"])
    if bad.any():  # the protocol ranks every database image: a missing one would be scored as a miss
        names = [db_paths[i] for i in np.flatnonzero(bad)]
        raise UserError(f"--images: {len(names)} database image(s) unreadable: {', '.join(names[:3])}"
                        f"{', ...' if len(names) > 3 else ''}")
    space = ens.fit(emb.features["database"])
    qs = space.embeddings(space.inputs(emb.features["queries"]))
    scale = 1 / np.sqrt(len(qs))
    return np.concatenate(space.gallery, 1) * scale, np.concatenate(qs, 1) * scale


def format_results(res, kappas=KAPPAS):
    """The protocol's printout; a protocol in which no query has a positive says so
    in its line instead of printing NaN."""
    def pct(v):
        return f"{100 * v:.2f}" if np.isfinite(v) else "-"
    lines = ["mAP  " + ", ".join(f"{name[0].upper()}: {pct(res[name]['map'])}" for name in PROTOCOLS)]
    for name in PROTOCOLS:
        if not np.isfinite(res[name]["map"]):
            lines.append(f"mP@k {name[0].upper()}: no query has a positive in the {name.capitalize()} protocol")
            continue
        mp = ", ".join(f"@{k}: {pct(v)}" for k, v in zip(kappas, res[name]["mp@k"]))
        lines.append(f"mP@k {name[0].upper()}: {mp}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--gnd", required=True, help="gnd_roxford5k.pkl / gnd_rparis6k.pkl, or the same as JSON")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help=".npz with arrays db (N, D) and queries (Q, D)")
    src.add_argument("--ranks", help=".npy (Q, N): database indices per query, best first; or the CSV of "
                                     "predict.py --retrieval-ranks")
    src.add_argument("--images", help="folder of <name>.jpg for imlist and qimlist (with --spec or --backbone)")
    import ensemble
    import features
    ensemble.add_args(p)  # with --images: --spec (trained models) or --backbone (no training), as predict.py
    features.add_args(p)  # --device, --precision
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    a = p.parse_args(argv)
    if a.images and (a.spec is None) == (a.backbone is None):
        p.error("--images needs --spec (trained models) or --backbone (no training)")
    return a


def main(argv=None):
    a = parse_args(argv)
    cfg = read_gnd(a.gnd)
    if a.features:
        if not os.path.isfile(a.features):
            raise UserError(f"--features {a.features}: no such file")
        with np.load(a.features, allow_pickle=False) as z:
            if not {"db", "queries"} <= set(z.files):
                raise UserError(f"--features {a.features}: expected arrays db and queries, got {z.files}")
            ranks = ranks_from_features(z["db"], z["queries"])
    elif a.ranks:
        if not os.path.isfile(a.ranks):
            raise UserError(f"--ranks {a.ranks}: no such file")
        ranks = ranks_from_csv(a.ranks, cfg) if a.ranks.endswith(".csv") else np.load(a.ranks, allow_pickle=False)
    else:
        ranks = ranks_from_features(*features_from_images(a, cfg))
    if len(ranks) != len(cfg["gnd"]):
        raise UserError(f"{len(ranks)} ranked queries, but the ground truth has {len(cfg['gnd'])}")
    res = evaluate(ranks, cfg["gnd"])
    print(format_results(res))
    return res


if __name__ == "__main__":
    run_main(main)
