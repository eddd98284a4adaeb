"""Your own photos: a gallery from folders, queries from a folder, and a saved index.

    python predict.py --spec S --gallery-dir G --query-dir Q --out predictions.csv [--save-index I]
    python predict.py --spec S --index I --query-dir Q --out predictions.csv
    python predict.py --spec S --index I --gallery-dir G --add-to-index    # embed only G's new files

G holds one folder per landmark (G/<landmark name>/**/*.jpg, .png, ...), Q any
images (searched recursively). predictions.csv has one row per query file:
path (as found under Q), landmark (the name, empty when none), confidence, and
neighbours (JSON: the 5 nearest gallery images, paths under G, with their
cosine similarities).

A saved index is two files that never run code: I.npz (per model, the
gallery's L2-normalised embeddings in float16; the landmark ids) and I.json
(the gallery paths and landmark names, and for each model its backbone, image
size, preprocessing and the SHA-1 of its checkpoint file). An index is used
only with the models it was built with. Built with --knn faiss, it also holds
I.faiss (faiss' own format) and I.faiss.rows.npy: the faiss index of the same
embeddings, used again while the gallery and --faiss-index are the same.
"""
import hashlib
import json
import os

import numpy as np
import pandas as pd

from dataset import read_csv_checked
from util import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
NEW_LANDMARK_ID = 10**9  # ids of gallery landmarks the classifier does not know start here


def list_images(root):
    """Image files below root, recursively, as paths relative to root, sorted."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in files
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(out)


def folder_gallery(root):
    """[(path under root, landmark name)] of root/<name>/**/images."""
    if not os.path.isdir(root):
        raise UserError(f"--gallery-dir {root}: no such folder")
    rows = [(p, p.split(os.sep)[0]) for p in list_images(root) if os.sep in p]
    if not rows:
        raise UserError(f"--gallery-dir {root}: no images in its subfolders (one folder per landmark: "
                        f"{root}/<landmark name>/*.jpg)")
    return rows


def landmark_names(label_map_path):
    """{landmark id: name} from landmark_names.json beside the label map (preprocess.py
    --from-folder writes both), else {}."""
    if not label_map_path:
        return {}
    path = os.path.join(os.path.dirname(os.path.abspath(label_map_path)), "landmark_names.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {int(k): str(v) for k, v in json.load(f).items()}


def ids_for_names(names, known):
    """Landmark ids of gallery folder names: the id of a name the classifier knows
    (`known`: id -> name), else a new id from NEW_LANDMARK_ID on (retrieval alone
    can predict those). Returns (ids, id -> name for all)."""
    by_name = {v: k for k, v in known.items()}
    new = sorted({n for n in names if n not in by_name})
    by_name |= {n: NEW_LANDMARK_ID + i for i, n in enumerate(new)}
    return np.array([by_name[n] for n in names], np.int64), {i: n for n, i in by_name.items()}


def file_digest(path, chunk=1 << 20):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_signature(models, ckpts, preprocessing):
    """What an index's embeddings depend on, per model of the spec."""
    return [{"enet_type": m["enet_type"], "image_size": int(m["image_size"]), "checkpoint_sha1": file_digest(c),
             "preprocessing": p} for m, c, p in zip(models, ckpts, preprocessing)]


def _gallery_digest(paths):
    return hashlib.sha1("\n".join(paths).encode()).hexdigest()


def save_index(path, embeddings, labels, paths, names, signature, gallery_dir=None, faiss=None, whiten=None):
    """path.npz + path.json (see the module's docstring); gallery_dir, the folder
    the paths are under, is recorded for showing the images (report.py, app.py).
    faiss: a retrieval.FaissGallery of these very images (predict.py --knn faiss),
    kept as path.faiss with its factory string, the whitening it was built after
    (--backbone) and a digest of the paths, so that a later run uses it only
    for this gallery; without one, an earlier path.faiss is removed."""
    stem = path[:-4] if path.endswith(".npz") else path
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    np.savez(stem + ".npz", labels=np.asarray(labels, np.int64),
             **{f"emb{i}": np.asarray(e, np.float16) for i, e in enumerate(embeddings)})
    for f in (stem + ".faiss", stem + ".faiss.rows.npy"):
        if os.path.exists(f):
            os.remove(f)
    meta_faiss = None
    if faiss is not None:
        faiss.save(stem + ".faiss")
        meta_faiss = {"factory": faiss.factory, "whiten": whiten, "paths_sha1": _gallery_digest(paths)}
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump({"format": "glr2020-index-1", "models": signature, "paths": list(paths),
                   "names": {str(k): v for k, v in names.items()},
                   "gallery_dir": os.path.abspath(gallery_dir) if gallery_dir else None, "faiss": meta_faiss},
                  f, ensure_ascii=False)
    return stem


def saved_faiss(idx, factory, n, whiten=None):
    """The faiss index saved beside a loaded index (load_index) when it was built with this
    factory and whitening on this gallery of n images; else None (build it again)."""
    meta = idx.get("faiss")
    if (not meta or meta["factory"] != factory or meta.get("whiten") != whiten or len(idx["paths"]) != n
            or meta["paths_sha1"] != _gallery_digest(idx["paths"]) or not os.path.isfile(idx["stem"] + ".faiss")):
        return None
    from retrieval import FaissGallery
    return FaissGallery.load(idx["stem"] + ".faiss", factory)


def load_index(path, signature):
    """The index at path, checked against the current models' signature."""
    stem = path[:-4] if path.endswith(".npz") else path
    if not (os.path.isfile(stem + ".npz") and os.path.isfile(stem + ".json")):
        raise UserError(f"--index {path}: no {stem}.npz and {stem}.json (written by --save-index)")
    try:
        with open(stem + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        with np.load(stem + ".npz", allow_pickle=False) as z:
            emb = [z[f"emb{i}"] for i in range(len(meta["models"]))]
            labels = z["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--index {path}: not a readable index ({e})") from e
    if meta.get("models") != signature:
        raise UserError(f"--index {path}: built with other models than this spec (backbones, sizes, "
                        f"preprocessing or checkpoint files differ); build it again with --save-index")
    return {"emb": emb, "labels": labels, "paths": meta["paths"],
            "names": {int(k): v for k, v in meta["names"].items()}, "gallery_dir": meta.get("gallery_dir"),
            "faiss": meta.get("faiss"), "stem": stem}


def read_folder_solution(path, names):
    """The truth of your own queries for a report: a CSV path,landmark (the query's
    path under --query-dir, its gallery folder name; empty for a photo of no
    landmark) as {path: frozenset of landmark ids, or None}. names: id -> name; a
    name the gallery lacks gets an id nothing predicts."""
    read_csv_checked(path, ["path", "landmark"])  # exists, parses, has the columns and rows
    df = pd.read_csv(path, dtype=str, keep_default_na=False)  # names as written: "007" stays "007"
    ids = {v: k for k, v in names.items()}
    unknown, truth = {}, {}
    for q, name in zip(df["path"], df["landmark"]):
        if not name:
            truth[q] = None
            continue
        if name not in ids:
            unknown.setdefault(name, -(10**9) - len(unknown))
        truth[q] = frozenset({ids.get(name, unknown.get(name))})
    return truth


def predictions_frame(q_paths, landmarks, confidences, sims, nn, g_paths, names):
    """One row per query: path, landmark (name), confidence, neighbours (JSON)."""
    rows = []
    for i, q in enumerate(q_paths):
        lid = landmarks[i]
        named = lid is not None and lid == lid
        nb = [[g_paths[j], round(float(s), 6)] for s, j in zip(sims[i], nn[i]) if np.isfinite(s)]
        rows.append((q, names.get(int(lid), str(lid)) if named else "", float(confidences[i]) if named else 0.0,
                     json.dumps(nb if named else [], ensure_ascii=False)))
    return pd.DataFrame(rows, columns=["path", "landmark", "confidence", "neighbours"])
