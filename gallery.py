"""Your own photos: a Gallery from folders, saved and loaded as an index, grown; queries from a folder.

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
embeddings, used again while the gallery and --faiss-index are the same. With
--verify, I.local.npz keeps the gallery's local features (verify.py).
"""
import hashlib
import json
import os

import numpy as np
import pandas as pd

from dataset import read_csv_checked
from retrieval import FaissGallery, faiss_index, unreadable_rows
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
                        f"{os.path.join(root, '<landmark name>', '*.jpg')})")
    named = {n for _, n in rows}
    empty = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
                   and d not in named)
    if empty:
        print(f"warning: {len(empty)} landmark folder(s) of --gallery-dir with no images, left out: "
              f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}", flush=True)
    return rows


def ids_for_names(names, known):
    """Landmark ids of gallery folder names: the id of a name the classifier knows
    (`known`: id -> name), else a new id from NEW_LANDMARK_ID on (retrieval alone
    can predict those). Returns (ids, id -> name for all)."""
    by_name = {v: k for k, v in known.items()}
    new = sorted({n for n in names if n not in by_name})
    by_name |= {n: NEW_LANDMARK_ID + i for i, n in enumerate(new)}
    return np.array([by_name[n] for n in names], np.int64), {i: n for n, i in by_name.items()}


def gallery_digest(paths):
    return hashlib.sha1("\n".join(paths).encode()).hexdigest()


def _flags_hint(saved, current):
    """When the models differ only in how images are sized (--scales, --resize): the flags that read
    the index as it was built."""
    if not isinstance(saved, list) or len(saved) != len(current):
        return ""
    strip = lambda sig: [{k: v for k, v in m.items() if k not in ("scales", "resize")} for m in sig]  # noqa: E731
    if strip(saved) != strip(current):
        return ""
    built = {(tuple(m.get("scales", [1.0])), m.get("resize", "square")) for m in saved}
    if len(built) != 1:
        return ""
    scales, resize = next(iter(built))
    flags = f"--scales {','.join(f'{v:g}' for v in scales)}"
    if any("resize" in m for m in saved + current):  # a backbone's (trained models see squares only)
        flags += f" --resize {resize}"
    return f"; it was built with {flags}"


def _stem(path):
    return path[:-4] if path.endswith(".npz") else path


def local_features_path(index):
    """Where the gallery's local features (predict.py --verify, verify.py) are kept beside an index."""
    return _stem(index) + ".local.npz"


class Gallery:
    """The photos answers are drawn from: paths (under root, the folder they were found in, or
    as given when root is None), labels (landmark ids), names (landmark id -> name), emb (per
    model of the ensemble, (N, D) float16: embeddings, or a backbone's raw pooled features).

    Built from folders (Gallery(...) empty, then extend), loaded from a saved index (load),
    grown with the files a folder adds (missing, extend) and saved (save). An index is used only
    with the models it was built with (signature: ensemble.Ensemble.signature)."""

    def __init__(self, paths=(), labels=None, emb=None, names=None, root=None):
        self.paths, self.emb, self.root = list(paths), emb, root
        self.labels = np.zeros(0, np.int64) if labels is None else np.asarray(labels)
        self.names = dict(names or {})
        self._saved_faiss = None  # (metadata, path) of the faiss index saved beside a loaded index
        self.saved_calibration = None  # {"key", "fit"} saved with a loaded index (recognizer.Recognizer)

    def __len__(self):
        return len(self.paths)

    @property
    def image_paths(self):
        """Where the photos are now (shown by the report and the page)."""
        return [os.path.join(self.root, p) if self.root else p for p in self.paths]

    @classmethod
    def load(cls, path, signature, known=None, root=None):
        """The index at path (PATH.npz + PATH.json), checked against the current models' signature;
        its names over `known` (the classifier's); root: where its photos are now (default: the
        folder it was built from)."""
        stem = _stem(path)
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
                            f"preprocessing or checkpoint files differ){_flags_hint(meta.get('models'), signature)}; "
                            f"build it again with --save-index")
        names = dict(known or {}) | {int(k): v for k, v in meta["names"].items()}
        g = cls(meta["paths"], labels, emb, names, root or meta.get("gallery_dir"))
        if meta.get("faiss") and os.path.isfile(stem + ".faiss"):
            g._saved_faiss = (meta["faiss"], stem + ".faiss")
        g.saved_calibration = meta.get("calibration")
        return g

    def missing(self, folder):
        """[(path under folder, landmark name)] of the photos of folder/<name>/ this gallery lacks."""
        have = set(self.paths)
        return [(p, n) for p, n in folder_gallery(folder) if p not in have]

    def extend(self, todo, new_emb):
        """Adds todo's photos ([(path under root, landmark name)]) with their features (per model,
        NaN rows for unreadable images, which are left out and named); a name it does not know gets
        a new id. Returns the paths left out."""
        if not todo:
            return []
        new_ids, by_id = ids_for_names([n for _, n in todo], self.names)
        self.names |= by_id
        good = ~unreadable_rows(*new_emb)
        bad = [p for (p, _), ok in zip(todo, good) if not ok]
        if bad:
            print(f"unreadable gallery images: {len(bad)} of {len(good)}, not indexed: {', '.join(bad[:3])}"
                  f"{', ...' if len(bad) > 3 else ''}", flush=True)
        keep = [p for (p, _), ok in zip(todo, good) if ok]
        self.paths += keep
        self.labels = np.concatenate([self.labels, new_ids[good]])
        self.emb = [np.asarray(e[good], np.float16) if self.emb is None else
                    np.concatenate([self.emb[i], np.asarray(e[good], np.float16)]) for i, e in enumerate(new_emb)]
        print(f"embedded {len(keep)} gallery images ({len(self.paths)} in all, {len(set(self.labels.tolist()))} "
              f"landmarks)", flush=True)
        return bad

    def faiss_index(self, factory, vectors, whiten=None):
        """The gallery's faiss index of `vectors` (what is searched: the embeddings, or the whitened
        pooled features): the one saved beside the loaded index when it was built with this factory
        and whitening on this very gallery, else built now."""
        if self._saved_faiss:
            meta, path = self._saved_faiss
            if (meta["factory"] == factory and meta.get("whiten") == whiten
                    and meta["paths_sha1"] == gallery_digest(self.paths)):
                return FaissGallery.load(path, factory)
        bad = unreadable_rows(*vectors)  # a GLDv2 gallery's unreadable images; folders index readable ones only
        fg = faiss_index(vectors, factory, exclude=bad if bad.any() else None)
        print(f"faiss index {factory!r}: {len(fg)} gallery images", flush=True)
        return fg

    def save(self, path, signature, faiss=None, whiten=None, calibration=None):
        """path.npz + path.json (see the module's docstring); the root is recorded for showing
        the images (report.py, app.py). faiss: a retrieval.FaissGallery of these very images,
        kept as path.faiss with its factory string, the whitening it was built after (--backbone)
        and a digest of the paths, so that a later run uses it only for this gallery; without
        one, an earlier path.faiss is removed. calibration: {"key", "fit"} of the confidence's
        calibration (recognizer.Recognizer), used again while its key holds. Returns the stem."""
        stem = _stem(path)
        os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
        np.savez(stem + ".npz", labels=np.asarray(self.labels, np.int64),
                 **{f"emb{i}": np.asarray(e, np.float16) for i, e in enumerate(self.emb)})
        for f in (stem + ".faiss", stem + ".faiss.rows.npy"):
            if os.path.exists(f):
                os.remove(f)
        meta_faiss = None
        if faiss is not None:
            faiss.save(stem + ".faiss")
            meta_faiss = {"factory": faiss.factory, "whiten": whiten, "paths_sha1": gallery_digest(self.paths)}
        with open(stem + ".json", "w", encoding="utf-8") as f:
            json.dump({"format": "glr2020-index-1", "models": signature, "paths": list(self.paths),
                       "names": {str(k): v for k, v in self.names.items()},
                       "gallery_dir": os.path.abspath(self.root) if self.root else None, "faiss": meta_faiss,
                       "calibration": calibration}, f, ensure_ascii=False)
        print(f"index: {stem}.npz, {stem}.json ({len(self.paths)} images)", flush=True)
        return stem


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


def predictions_frame(q_paths, landmarks, confidences, sims, nn, g_paths, names, min_confidence=None):
    """One row per query: path, landmark (name), confidence, neighbours (JSON). With min_confidence
    (a calibrated confidence: the probability that the landmark is right), also guess: the best
    landmark whatever its confidence, and landmark only where the confidence reaches min_confidence
    (empty: unknown, "not sure")."""
    rows = []
    for i, q in enumerate(q_paths):
        lid = landmarks[i]
        named = lid is not None and lid == lid
        name = names.get(int(lid), str(lid)) if named else ""
        conf = float(confidences[i]) if named else 0.0
        nb = [[g_paths[j], round(float(s), 6)] for s, j in zip(sims[i], nn[i]) if np.isfinite(s)]
        row = (q, name if min_confidence is None or conf >= min_confidence else "", conf,
               json.dumps(nb if named else [], ensure_ascii=False))
        rows.append(row if min_confidence is None else (*row[:2], name, *row[2:]))
    columns = ["path", "landmark", "confidence", "neighbours"]
    if min_confidence is not None:
        columns.insert(2, "guess")
    return pd.DataFrame(rows, columns=columns)
