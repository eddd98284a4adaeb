"""One recognizer: models, a gallery, a search and the re-ranking, built once and asked to answer.

    rec = Recognizer(ens, gallery, heads, settings_of(a, device))   # the calibration learnt (or read) here
    res = rec.answer(zqs)               # zqs: per model the queries' features (features.embed_all)
    rec.predictions(res)                # predictions.csv, one frame per part
    rec.answers(res)                    # per query: landmark or "not sure", guess, confidence, neighbours

predict.py's folder mode and GLDv2 run, app.py and evaluate_retrieval.py all answer through it, so
that a photo gets the same answer whichever of them is asked. The maths is retrieval.py's; this
module only puts the pieces together: the ensemble's Space (a backbone's whitening, learnt once on
the gallery), the faiss index when asked for, the calibration of the confidence (calibration.py,
learnt once on the gallery), the geometric verification of the nearest photos when asked for
(verify.py: its inliers are one of the calibration's features), the threshold below which an answer
is unknown, and the names of the landmarks.
"""
import argparse
import json
import time
from dataclasses import dataclass

import numpy as np
import torch

import calibration as cal
import verify
from gallery import Gallery, gallery_digest, local_features_path, predictions_frame
from retrieval import (FAISS_EF_SEARCH, FAISS_NPROBE, FAISS_RERANK, Rules, Search, apply_non_landmark, import_faiss,
                       recognize, topk_cosine)
from util import UserError

PARTS = ("classifier", "retrieval", "ensemble", "ensemble_nl")
MIN_CONFIDENCE = 0.5  # --min-confidence: below it the answer is unknown (more likely wrong than right)


def add_args(p):
    """How answers are found and given, on predict.py's parser and app.py's: --knn and the faiss flags
    (search_of reads them), --calibrate, --min-confidence, --unknown-share (settings_of)."""
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="a calibrated confidence, the probability that the landmark is right, learnt from the "
                        "gallery (leave-one-out and leave-landmark-out answers of a sample of its photos) and kept "
                        "in a saved index; default: on for your own photos, off on GLDv2 (the original's "
                        "submission)")
    p.add_argument("--min-confidence", type=float, default=MIN_CONFIDENCE, metavar="P",
                   help="with a calibrated confidence: below P the answer is unknown ('not sure': predictions.csv's "
                        f"landmark empty, its guess kept); default {MIN_CONFIDENCE}: more likely right than wrong")
    p.add_argument("--unknown-share", type=float, default=None, metavar="U",
                   help="with a calibrated confidence: the share of your photos you expect to show a place the "
                        "gallery does not hold, the prior the confidence is learnt with; more makes it more "
                        "cautious. Default: 1/3 without training, 1/2 with a trained model (it learnt the "
                        "gallery's photos, and its confidence already leans high: docs/transfer.md)"),
    p.add_argument("--verify", type=int, default=0, metavar="K",
                   help="geometric verification: each answer's first K neighbours matched to the photo by local "
                        "features (SIFT, MAGSAC), the inliers a feature of the calibrated confidence; the gallery's "
                        "local features are kept beside a saved index (INDEX.local.npz). About 50 ms per photo "
                        "pair on a CPU core; default 0: off (docs/transfer.md: it did not pay on the real sets)")
    p.add_argument("--knn", choices=["exact", "faiss"], default="exact",
                   help="nearest-neighbour search: exact (the original's, in bounded memory) or faiss (pip install "
                        "faiss-cpu, or faiss-gpu) with the index of --faiss-index")
    p.add_argument("--faiss-index", default="Flat", metavar="FACTORY",
                   help="with --knn faiss: a faiss index_factory string, by inner product; Flat is exact, e.g. "
                        "IVF65536,PQ64 answers from 64-byte codes, trained on a sample of the gallery (default Flat)")
    p.add_argument("--faiss-nprobe", type=int, default=FAISS_NPROBE, metavar="N",
                   help=f"with an IVF index: inverted lists visited per query (default {FAISS_NPROBE})")
    p.add_argument("--faiss-ef", type=int, default=FAISS_EF_SEARCH, metavar="N",
                   help="with an HNSW index (e.g. HNSW32): search depth, efSearch; more finds more of the exact "
                        f"neighbours, slower (default {FAISS_EF_SEARCH}; faiss' own is 16)")
    p.add_argument("--faiss-rerank", type=int, default=FAISS_RERANK, metavar="N",
                   help="with --knn faiss: the index's N best candidates are scored again by their exact cosines "
                        "(read for those rows alone from the features) and give the top 5; 0: the codes' own "
                        f"similarities (default {FAISS_RERANK})")


def check_args(a):
    """The options of add_args, each in its range, checked where they are parsed (predict.py's
    check_options, app.py's parse_args): a user's mistake is refused before a gallery is embedded."""
    if a.faiss_nprobe < 1:
        raise UserError(f"--faiss-nprobe {a.faiss_nprobe}: must be at least 1")
    if a.faiss_ef < 1:
        raise UserError(f"--faiss-ef {a.faiss_ef}: must be at least 1")
    if a.faiss_rerank < 0:
        raise UserError(f"--faiss-rerank {a.faiss_rerank}: must be 0 or more")
    if not 0 <= a.min_confidence <= 1:
        raise UserError(f"--min-confidence {a.min_confidence}: a probability, between 0 and 1")
    if a.unknown_share is not None and not 0 < a.unknown_share < 1:
        raise UserError(f"--unknown-share {a.unknown_share}: a share of the photos, strictly between 0 and 1")
    if a.verify < 0:
        raise UserError(f"--verify {a.verify}: the number of neighbours to verify, 0 (off) or more")


def settings_of(a, device, folders=True):
    """The Settings of the options of add_args (and --non-landmark, --index, --save-index where the
    caller has them), already checked by check_args where they were parsed (predict.py's check_options,
    also behind predict.options; app.py's parse_args)."""
    calibrate = folders if a.calibrate is None else a.calibrate
    if a.verify and not calibrate:
        raise UserError("--verify: its inliers are a feature of the calibrated confidence, which is off here "
                        "(--calibrate turns it on)")
    index = getattr(a, "save_index", None) or getattr(a, "index", None)
    return Settings(search_of(a), device, getattr(a, "non_landmark", None), calibrate, a.min_confidence, a.verify,
                    local_features_path(index) if index and a.verify else None, a.unknown_share)


def search_of(a):
    """--knn exact|faiss, --faiss-index, --faiss-nprobe, --faiss-ef, --faiss-rerank as a retrieval.Search."""
    if a.knn == "faiss":
        import_faiss()  # missing: one line now, not after hours of extraction
    return Search(a.knn, a.faiss_index, a.faiss_nprobe, a.faiss_rerank, ef_search=a.faiss_ef)


def open_gallery(ens, index=None, gallery_dir=None, add=False):
    """The gallery of a saved index (checked against the ensemble) or a new one of gallery_dir, and
    the files of gallery_dir it lacks, to embed: all of them for a new gallery, those the index does
    not hold with add (--add-to-index), none otherwise (gallery_dir then says where its photos are)."""
    gallery = (Gallery.load(index, ens.signature(), ens.known, root=gallery_dir) if index is not None
               else Gallery(names=ens.known, root=gallery_dir))
    todo = gallery.missing(gallery_dir) if gallery_dir is not None else []  # checks the folder either way
    return gallery, (todo if index is None or add else [])


def pairs(part):
    """recognize()'s (landmarks, confidences) as [(landmark id, confidence) or None] per query."""
    landmarks, conf = part
    return [None if (lid is None or lid != lid) else (int(lid), float(c)) for lid, c in zip(landmarks, conf)]


@dataclass
class Settings:
    """How a Recognizer answers. search: a retrieval.Search (its faiss index built at start when it has
    none); device; non_landmark: None, 'auto' (mined from the queries) or anything true with nl_emb
    given to answer (a known set); calibrate: learn (or read from the saved index) the calibration
    of the confidence (calibration.py); min_confidence: below it, with a calibration, the answer is
    unknown (its landmark a guess); verify: the neighbours verified per answer (0: none);
    keep_local: the file the gallery's local features are read from and kept in (verify.Verifier);
    unknown_share: the calibration's prior share of photos of places the gallery does not hold (None:
    calibration.default_unknown_share)."""
    search: Search = None
    device: object = "cpu"
    non_landmark: object = None
    calibrate: bool = True
    min_confidence: float = MIN_CONFIDENCE
    verify: int = 0
    keep_local: str = None
    unknown_share: float = None


class Recognizer:
    """ens: an ensemble.Ensemble; gallery: a gallery.Gallery with ens's features; heads: per model
    its ArcFace head (features.embed_all gives them; None for a backbone without training);
    settings: Settings."""

    def __init__(self, ens, gallery, heads, settings=None):
        if gallery.emb is None or not len(gallery):
            raise UserError("the gallery is empty: nothing to retrieve from")
        s = settings or Settings()
        self.ens, self.gallery, self.heads, self.settings = ens, gallery, heads, s
        self.device, self.non_landmark = torch.device(s.device), s.non_landmark
        # a backbone's whitening: learnt from the gallery (its landmarks) once, not per answer
        self.space = ens.fit(gallery.emb, gallery.labels)
        self.image_paths = gallery.image_paths  # where the gallery's photos are shown from
        self.search = s.search or Search()
        if self.search.kind == "faiss" and self.search.index is None:
            self.search.index = gallery.faiss_index(self.search.factory, self.space.gallery, self.space.whiten)
        self.verifier = (verify.Verifier(self.image_paths, s.verify, names=gallery.paths, keep=s.keep_local)
                         if s.verify else None)
        # the calibration's prior: the user's, else one by whether the models were trained (calibration.py)
        self.unknown_share = (s.unknown_share if s.unknown_share is not None
                              else cal.default_unknown_share(heads is not None))
        # how alike each landmark's photos are: a feature of every answer's calibrated confidence
        self.typical = cal.typical_of(self.space.gallery, self.gallery.labels) if s.calibrate else None
        self.calibration = self._calibration() if s.calibrate else None

    def saved_calibration(self):
        """What Gallery.save keeps of the calibration (None without one)."""
        return None if self.calibration is None else {"key": self.calibration_key(), "fit": self.calibration.as_dict()}

    def calibration_key(self):
        """What a calibration depends on beyond the models (the index's signature): the gallery's
        photos, the features it maps (and how: TYPICAL_MIN), the re-ranking, the whitening, the sample's
        size and the prior."""
        return json.loads(json.dumps({"paths_sha1": gallery_digest(self.gallery.paths), "sample": cal.SAMPLE,
                                      "unknown_share": self.unknown_share, "typical_min": cal.TYPICAL_MIN,
                                      "features": cal.feature_names(self.heads is not None, self.verifier is not None),
                                      "rerank_with": self.ens.rerank_with, "whiten": self.space.whiten}
                                     | ({"verify": self.settings.verify, "local": verify.PARAMS,
                                         "verify_sample": cal.VERIFY_SAMPLE} if self.settings.verify else {})))

    def _calibration(self):
        """The saved index's calibration when it was learnt on this very gallery and re-ranking, else
        one learnt now (calibration.learn: a bounded sample of the gallery answered held out)."""
        saved = self.gallery.saved_calibration
        if saved and saved.get("key") == self.calibration_key():
            return cal.Calibration.from_dict(saved["fit"])
        t0 = time.time()
        c = cal.learn(self.space.gallery, self.gallery.labels,
                      (self.heads, self.ens.idx2lid) if self.heads is not None else None, self.ens.rerank_with,
                      self.device, verifier=self.verifier, typical=self.typical, refit=self.space.refit,
                      unknown_share=self.unknown_share)
        print(f"confidence calibrated on {c.samples} held-out answers of gallery photos ({c.right:.0%} of them "
              f"right; prior: {c.unknown_share:.0%} of photos show places the gallery does not hold) in "
              f"{time.time() - t0:.1f} s", flush=True)
        return c

    def name_of(self, label):
        return self.gallery.names.get(label, str(label))

    def keep_local_features(self):
        """Save the gallery's local features computed so far (with --verify and a saved index)."""
        if self.verifier is not None:
            self.verifier.save()

    def answer(self, zqs, nl_emb=None, ids=None, query_paths=None, images=None):
        """retrieval.recognize's result for the queries' features (per model), with the queries'
        ids and paths (default: their indices) and the gallery's paths, labels and names. With
        verification, the queries' photos are read from query_paths, or given as RGB arrays
        (images)."""
        sp = self.space
        inputs = sp.inputs(zqs)  # recognize() zeroes an unreadable query's row in them: ranking() reads them after
        res = recognize(inputs, sp.gallery, self.gallery.labels, self.heads, self.ens.idx2lid,
                        sp.inputs(nl_emb) if nl_emb else nl_emb,
                        Rules(self.ens.rerank_with, self.search, self.non_landmark, self.device))
        if self.verifier is not None:
            if images is None and query_paths is None:
                raise ValueError("verification needs the queries' photos: query_paths or images")
            sims, nn = res["neighbours"]
            res["inliers"] = self.verifier.query_inliers(images if images is not None else query_paths,
                                                         np.where(np.isfinite(sims), nn, -1))
        if self.calibration is not None:
            landmarks, conf = res["ensemble"]  # the features of the answer before non-landmarks are sunk
            p = self.calibration(cal.answer_features(res["neighbours"][0], res["neighbour_landmarks"], landmarks,
                                                     conf, self.typical, res.get("cls_top"), res.get("inliers")))
            p = np.where(res["unreadable"][0], 0.0, p)
            res["calibrated"] = apply_non_landmark(p, res["nl_flags"]) if "nl_flags" in res else p
            res["sure"] = res["calibrated"] >= self.settings.min_confidence
        ids = list(range(len(zqs[0]))) if ids is None else ids
        return res | {"query_inputs": inputs, "ids": ids,
                      "query_paths": query_paths if query_paths is not None else ids, "gallery_paths": self.image_paths, "gallery_labels": np.asarray(self.gallery.labels),
                      "names": self.gallery.names}

    @property
    def final(self):
        """The part of an answer given: the ensemble, with its non-landmarks sunk when asked for."""
        return "ensemble_nl" if self.non_landmark is not None else "ensemble"

    def ranking(self, res, k):
        """Each query of an answer: its first k gallery rows by decreasing similarity
        (--retrieval-ranks), unreadable gallery images left out."""
        g_bad = res["unreadable"][1]
        k = min(k, len(self.gallery))
        _, order = topk_cosine(self.space.embeddings(res["query_inputs"]), self.space.gallery, k,
                               device=self.device, exclude=g_bad if g_bad.any() else None)
        return [[j for j in row if not g_bad[j]] for row in order]

    def predictions(self, res):
        """{part: predictions.csv's frame}: path, landmark (name), confidence, neighbours (JSON). The
        final answer's, with a calibration: its calibrated confidence, a guess column, and an empty
        landmark below --min-confidence (unknown)."""
        sims, nn = res["neighbours"]
        paths, names = self.gallery.paths, self.gallery.names
        frames = {part: predictions_frame(res["ids"], *res[part], sims, nn, paths, names)
                  for part in PARTS if part in res}
        if "calibrated" in res:
            frames[self.final] = predictions_frame(res["ids"], res[self.final][0], res["calibrated"], sims, nn, paths,
                                                   names, self.settings.min_confidence)
        return frames

    def answers(self, res):
        """Per query {'landmark' (name; '' for none, or when not sure), 'guess' (the best landmark's
        name, sure or not), 'landmark_id', 'confidence' (calibrated where there is a calibration),
        'sure' (the confidence reaches --min-confidence), 'calibrated', 'prediction' ((id,
        confidence) or None), 'answers' ({part: (id, confidence) or None}: the classifier's and
        retrieval's own, with trained models), 'neighbours' ([(path under the gallery, photo path,
        landmark id, cosine)])}."""
        sims, nn = res["neighbours"]
        parts = {k: pairs(res[k]) for k in ("classifier", "retrieval") if k in res and self.heads}
        g_rel, g_paths, g_labels = self.gallery.paths, self.image_paths, self.gallery.labels
        calibrated = res.get("calibrated")
        out = []
        for i, pred in enumerate(pairs(res[self.final])):
            if pred is not None and calibrated is not None:
                pred = (pred[0], float(calibrated[i]))
            sure = pred is not None and (calibrated is None or bool(res["sure"][i]))
            guess = self.name_of(pred[0]) if pred else ""
            out.append({"landmark": guess if sure else "", "guess": guess, "landmark_id": pred[0] if sure else None,
                        "confidence": pred[1] if pred else 0.0, "sure": sure, "calibrated": calibrated is not None,
                        "prediction": pred, "answers": {k: v[i] for k, v in parts.items()},
                        "neighbours": [(g_rel[j], g_paths[j], int(g_labels[j]), float(c))
                                       for c, j in zip(sims[i], nn[i]) if np.isfinite(c)]})
        return out


def write_report(path, res, view, non_landmark=False):
    """report.write_report of an answer (Recognizer.answer's result): the final answer (the re-ranked
    ensemble, with its non-landmarks sunk when non_landmark), the other parts, each query's 5 nearest
    gallery images, and with the truth the scores of evaluate.py. view: a report.View."""
    import report
    from evaluate import score_answers
    final_key = "ensemble_nl" if non_landmark else "ensemble"
    parts = {k: pairs(res[k]) for k in ("ensemble", "classifier", "retrieval")
             if k in res and k != final_key and not (k == "retrieval" and "classifier" not in res)}
    sims, nn = res["neighbours"]
    ids, g_paths, g_labels = res["ids"], res["gallery_paths"], np.asarray(res["gallery_labels"])
    neighbours = [[(g_paths[j], int(g_labels[j]), float(s)) for s, j in zip(sims[i], nn[i]) if np.isfinite(s)]
                  for i in range(len(ids))]
    final_name = "ensemble + non-landmarks sunk (submitted)" if non_landmark else "ensemble (submitted)"
    calibrated = "calibrated" in res
    landmarks = res[final_key][0]
    final = pairs((landmarks, res["calibrated"]) if calibrated else res[final_key])
    answers = report.Answers(ids, res["query_paths"], final, parts, neighbours, sunk=res.get("nl_flags"),
                             unreadable=res["unreadable"][0], final_name=final_name, sure=res.get("sure"),
                             calibrated=calibrated)
    scores = score_answers(ids, {final_name: final, **parts}, view.truth) if view.truth is not None else None
    return report.write_report(path, answers, view, scores)
