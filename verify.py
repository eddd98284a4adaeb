"""Geometric verification: does a query show the same scene as a gallery photo?

    v = Verifier(gallery_image_paths, k=5, keep="index.local.npz")   # the gallery's local features, kept
    inl = v.query_inliers(queries, nn)      # (Q, k): inliers of each query with its first k neighbours
    v.save()

Local features are OpenCV's SIFT on the image's grey levels, longer side at most MAX_SIDE, compared as
RootSIFT (Arandjelovic & Zisserman, CVPR 2012: the Hellinger kernel of the L1-normalised descriptors);
matches pass Lowe's ratio test (IJCV 2004) both ways' best, and the inliers are those of a fundamental
matrix fitted by MAGSAC (OpenCV's USAC_MAGSAC; Barath et al., CVPR 2019 / 2020). A fundamental matrix,
not a homography: a landmark is a 3-D scene seen from anywhere.

Inliers are evidence, not the answer. Eight matches fit a fundamental matrix whatever they are, so any
pair of photos scores some inliers: on the real sets (docs/transfer.md) unrelated pairs score 7-20,
right pairs of wide-baseline photos (night and day, far apart) as little, and right pairs that
verify score hundreds. calibration.py turns the count into a feature above the noise its own
wrong answers show, and learns its weight.

A gallery photo's features are computed once, when first needed (the calibration's sample and each
query's neighbours), and kept in `keep` (an .npz of arrays: no code runs on load) for the next run,
keyed by the photo's path under the gallery, its size and its modification time.
"""
import os
import time

import cv2
import numpy as np

from dataset import BadImage, read_rgb

MAX_SIDE = 640      # the longer side SIFT sees: finer costs twice the time and did not separate better
N_FEATURES = 1000   # SIFT's strongest keypoints per image
RATIO = 0.8         # Lowe's ratio test on the two nearest descriptors
THRESHOLD = 1.0     # MAGSAC's inlier threshold, pixels at MAX_SIDE
MIN_MATCHES = 8     # fewer matches fit no fundamental matrix: 0 inliers
PARAMS = {"max_side": MAX_SIDE, "n_features": N_FEATURES, "descriptor": "sift"}


def local_features(rgb):
    """(xy float32 (N, 2), descriptors uint8 (N, 128)) of an RGB uint8 image: SIFT's N_FEATURES
    strongest keypoints of its grey levels with the longer side scaled down to MAX_SIDE. OpenCV's
    SIFT descriptors are integers in 0..255, kept as uint8 without loss."""
    g = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    s = MAX_SIDE / max(g.shape)
    if s < 1:
        g = cv2.resize(g, (max(1, round(g.shape[1] * s)), max(1, round(g.shape[0] * s))),
                       interpolation=cv2.INTER_AREA)
    kp, d = cv2.SIFT_create(nfeatures=N_FEATURES).detectAndCompute(g, None)
    if d is None or not len(kp):
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8)
    return np.array([k.pt for k in kp], np.float32), np.clip(np.rint(d), 0, 255).astype(np.uint8)


def root_sift(d):
    """RootSIFT: the square root of the L1-normalised descriptor (unit L2 length), float32."""
    d = np.asarray(d, np.float32)
    return np.sqrt(d / np.maximum(d.sum(1, keepdims=True), 1e-7))


def inliers(a, b):
    """Inliers of the fundamental matrix MAGSAC fits to the ratio-test matches of local features a
    and b ((xy, descriptors) each); 0 with fewer than MIN_MATCHES matches."""
    (xa, da), (xb, db) = a, b
    if len(da) < MIN_MATCHES or len(db) < 2:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(root_sift(da), root_sift(db), k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < MIN_MATCHES:
        return 0
    pa = xa[[m.queryIdx for m in good]]
    pb = xb[[m.trainIdx for m in good]]
    try:
        _, mask = cv2.findFundamentalMat(pa, pb, cv2.USAC_MAGSAC, THRESHOLD, 0.999, 10000)
    except cv2.error:  # USAC asserts on degenerate samples (e.g. all matches on one line) instead of failing
        return 0
    return 0 if mask is None else int(mask.sum())


def _stamp(path):
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


class Verifier:
    """Inliers of queries and gallery photos with their nearest gallery photos. gallery_paths: each
    gallery row's image file; names: the keys its features are kept under (its path under the
    gallery; default the paths); k: neighbours verified per query; keep: the .npz the gallery's
    features are read from and saved to (None: memory only)."""

    def __init__(self, gallery_paths, k=5, names=None, keep=None):
        self.paths, self.k, self.keep = list(gallery_paths), int(k), keep
        self.names = list(names) if names is not None else self.paths
        self.feats = {}  # gallery row -> (xy, descriptors)
        self.seconds, self.pairs, self.extracted = 0.0, 0, 0
        if keep and os.path.isfile(keep):
            self._load(keep)

    def _load(self, path):
        """The kept features of rows whose file is unchanged (same name, size and time)."""
        with np.load(path, allow_pickle=False) as z:
            if str(z["params"]) != str(PARAMS):
                return  # other SIFT settings: computed again
            kept = dict(zip(z["names"].tolist(), range(len(z["names"]))))
            stamps, off, xy, desc = z["stamps"], z["offsets"], z["xy"], z["desc"]
            for row, name in enumerate(self.names):
                i = kept.get(name)
                if i is not None and os.path.exists(self.paths[row]) and stamps[i] == _stamp(self.paths[row]):
                    self.feats[row] = (xy[off[i]:off[i + 1]], desc[off[i]:off[i + 1]])

    def save(self, path=None):
        """Write the gallery features computed so far to `path` (default: keep)."""
        path = path or self.keep
        if not path:
            return
        rows = sorted(self.feats)
        sizes = [len(self.feats[r][0]) for r in rows]
        off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        xy = np.concatenate([self.feats[r][0] for r in rows]) if rows else np.zeros((0, 2), np.float32)
        desc = np.concatenate([self.feats[r][1] for r in rows]) if rows else np.zeros((0, 128), np.uint8)
        tmp = path + ".tmp.npz"
        np.savez(tmp, params=np.array(str(PARAMS)), names=np.array([self.names[r] for r in rows], dtype=str),
                 stamps=np.array([_stamp(self.paths[r]) for r in rows], dtype=str), offsets=off, xy=xy, desc=desc)
        os.replace(tmp, path)

    def gallery_features(self, row):
        """The local features of a gallery row (computed on first use; none for an unreadable photo)."""
        if row not in self.feats:
            try:
                self.feats[row] = local_features(read_rgb(self.paths[row]))
            except BadImage:
                self.feats[row] = (np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8))
            self.extracted += 1
        return self.feats[row]

    def _count(self, query_feats, nn):
        t0 = time.time()
        out = np.zeros(nn.shape, np.int64)
        for i, (q, row) in enumerate(zip(query_feats, nn)):
            if q is None:
                continue
            for j, g in enumerate(row):
                if g >= 0:
                    out[i, j] = inliers(q, self.gallery_features(int(g)))
                    self.pairs += 1
        self.seconds += time.time() - t0
        return out

    def query_inliers(self, queries, nn):
        """(Q, k) inliers of each query (an image path or an RGB uint8 array; None or an unreadable
        file: zeros) with its first k neighbours (nn: gallery rows by decreasing similarity, -1
        for none)."""
        t0 = time.time()
        feats = []
        for q in queries:
            try:
                feats.append(None if q is None else local_features(read_rgb(q) if isinstance(q, str) else q))
            except BadImage:
                feats.append(None)
        self.seconds += time.time() - t0
        return self._count(feats, np.asarray(nn)[:, :self.k])

    def gallery_inliers(self, rows, nn):
        """(R, k) inliers of gallery rows (as queries) with their first k held-out neighbours nn."""
        return self._count([self.gallery_features(int(r)) for r in rows], np.asarray(nn)[:, :self.k])

    def cost(self):
        """What verification has cost so far, in words."""
        return (f"{self.pairs} photo pairs verified, {self.extracted} gallery photos' local features computed, "
                f"in {self.seconds:.1f} s")
