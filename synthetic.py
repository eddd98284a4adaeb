"""A GLDv2-shaped data set made on the spot, for tests and the demo.

Each landmark is a fixed random scene (gradient sky, textured ground, a few
coloured shapes); each image is another view of it: perspective warp, crop and
scale, light, blur, noise, partial occlusion, at varied sizes and aspect
ratios, saved as JPEG. Writes exactly the layout the pipeline reads:

  DIR/train/a/b/c/<id>.jpg    DIR/train.csv              id,url,landmark_id  (full set, all classes)
  DIR/test/a/b/c/<id>.jpg     DIR/train_competition.csv  id,landmark_id      (the competition's clean
  DIR/sample_submission.csv                                                   list: clean classes only)
  DIR/solution.csv            id,landmarks (empty for non-landmark test images)

Class sizes are long-tailed like GLDv2's; landmark test images are new views
of clean classes, non-landmark test images are scenes of no class: half of
them landmark-like scenes of no known landmark, half cluttered surfaces with no
landmark at all. `--non-landmark-set N` also writes N other
non-landmark images, DIR/non_landmark/a/b/c/<id>.jpg listed in
DIR/non_landmark.csv (id), for predict.py's optional non-landmark handling.
Deterministic for a seed.
"""
import os

import cv2
import numpy as np
import pandas as pd

from util import ArgumentParser

SCENE = 192  # side of the canvas a scene is drawn on


def _rng(*keys):
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def _color(rng):
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def make_scene(rng):
    """A random 'landmark': sky gradient, textured ground, shapes. uint8 RGB."""
    s = SCENE
    y = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    c0, c1 = rng.integers(0, 256, (2, 3)).astype(np.float32)
    img = (c0 * (1 - y) + c1 * y) * np.ones((1, s, 1), np.float32)
    # ground band with stripes at a random frequency and angle
    horizon = int(rng.uniform(0.45, 0.8) * s)
    yy, xx = np.mgrid[horizon:s, 0:s].astype(np.float32)
    ang, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.4)
    stripes = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(ang) + yy * np.sin(ang)))
    g0, g1 = rng.integers(0, 256, (2, 3)).astype(np.float32)
    img[horizon:] = g0 * stripes[..., None] + g1 * (1 - stripes[..., None])
    img = np.ascontiguousarray(img.clip(0, 255).astype(np.uint8))
    # a few shapes; the first is large (the 'building') and anchors the identity
    for k in range(int(rng.integers(4, 8))):
        big = k == 0
        r = int(rng.uniform(0.18, 0.3) * s) if big else int(rng.uniform(0.04, 0.14) * s)
        cx, cy = (int(v) for v in rng.uniform(0.15, 0.85, 2) * s)
        col = _color(rng)
        kind = int(rng.integers(0, 5))
        if kind == 0:
            cv2.circle(img, (cx, cy), r, col, -1, cv2.LINE_AA)
        elif kind == 1:
            w, h = (int(v) for v in rng.uniform(0.5, 1.5, 2) * r)
            cv2.rectangle(img, (cx - w, cy - h), (cx + w, cy + h), col, -1)
        elif kind == 2:
            n = int(rng.integers(3, 7))
            a = np.sort(rng.uniform(0, 2 * np.pi, n))
            pts = np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1).astype(np.int32)
            cv2.fillPoly(img, [pts], col, cv2.LINE_AA)
        elif kind == 3:
            cv2.ellipse(img, (cx, cy), (r, max(2, r // 2)), float(rng.uniform(0, 180)), 0, 360, col, -1,
                        cv2.LINE_AA)
        else:  # a checkered block: texture at a scale of its own
            w = max(4, r)
            cell = int(rng.integers(3, 9))
            x0, y0 = max(0, cx - w), max(0, cy - w)
            blk = img[y0:cy + w, x0:cx + w]
            by, bx = np.mgrid[0:blk.shape[0], 0:blk.shape[1]]
            mask = ((by // cell + bx // cell) % 2).astype(bool)
            blk[mask] = col
            blk[~mask] = _color(rng)
    return img


def make_clutter(rng):
    """A non-landmark scene: no sky or ground, a tiled surface with many small
    objects (what indoor shots, food and people are to GLDv2: no landmark, and
    alike among themselves more than like any landmark)."""
    s = SCENE
    cell = int(rng.integers(8, 24))
    yy, xx = np.mgrid[0:s, 0:s]
    tiles = ((yy // cell + xx // cell) % 2).astype(np.float32)[..., None]
    c0, c1 = rng.integers(0, 256, (2, 3)).astype(np.float32)
    img = np.ascontiguousarray((c0 * tiles + c1 * (1 - tiles)).astype(np.uint8))
    for _ in range(int(rng.integers(10, 20))):
        cx, cy = (int(v) for v in rng.uniform(0, 1, 2) * s)
        r = int(rng.uniform(0.03, 0.08) * s)
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), r, _color(rng), -1, cv2.LINE_AA)
        else:
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), _color(rng), -1)
    return img


def make_view(scene, rng, min_size, max_size):
    """Another photograph of `scene`: warp, crop/scale, light, blur, noise, occlusion."""
    s = scene.shape[0]
    # perspective: jitter the four corners
    src = np.float32([[0, 0], [s, 0], [s, s], [0, s]])
    dst = (src + rng.uniform(-0.16, 0.16, (4, 2)) * s).astype(np.float32)
    H = cv2.getPerspectiveTransform(src, dst)
    img = cv2.warpPerspective(scene, H, (s, s), borderMode=cv2.BORDER_REFLECT)
    # crop a random part and resize to a random size / aspect ratio
    area, aspect = rng.uniform(0.4, 1.0), np.exp(rng.uniform(-0.35, 0.35))
    cw = int(np.clip(s * np.sqrt(area * aspect), 16, s))
    ch = int(np.clip(s * np.sqrt(area / aspect), 16, s))
    x0, y0 = int(rng.integers(0, s - cw + 1)), int(rng.integers(0, s - ch + 1))
    img = img[y0:y0 + ch, x0:x0 + cw]
    long_side = int(rng.integers(min_size, max_size + 1))
    scale = long_side / max(cw, ch)
    img = cv2.resize(img, (max(8, round(cw * scale)), max(8, round(ch * scale))), interpolation=cv2.INTER_LINEAR)
    # light: contrast, brightness, colour cast (float32 throughout: this is the hot loop)
    contrast, brightness, cast = rng.uniform(0.6, 1.4), rng.uniform(-45, 45), rng.uniform(-20, 20, 3)
    f = img.astype(np.float32) * np.float32(contrast) + (128 * (1 - contrast) + brightness + cast).astype(np.float32)
    if rng.random() < 0.3:
        f = cv2.GaussianBlur(f, (0, 0), rng.uniform(0.5, 1.8))
    # sensor noise; OpenCV's generator, seeded from rng, is 3x faster than numpy's normal
    sigma = float(rng.uniform(0, 8))
    cv2.setRNGSeed(int(rng.integers(2**31)))
    noise = np.empty_like(f)
    cv2.randn(noise, (0.0, 0.0, 0.0), (sigma, sigma, sigma))
    f += noise
    img = f.clip(0, 255).astype(np.uint8)
    if rng.random() < 0.5:  # something in front of the landmark
        h, w = img.shape[:2]
        oh, ow = int(h * rng.uniform(0.2, 0.5)), int(w * rng.uniform(0.2, 0.5))
        oy, ox = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
        img[oy:oy + oh, ox:ox + ow] = _color(rng)
    return img


def non_landmark_kind(q):
    """What the q-th test image (row q of sample_submission.csv) shows when it is
    not a landmark of the train set: half are landmark-like scenes of no known
    landmark, half no landmark at all (GLDv2's test set has both kinds)."""
    return "scene" if q % 2 else "clutter"


def class_sizes(n_classes, rng, head=40, alpha=1.3):
    """Long-tailed like GLDv2: a few classes with many images, most with 2-5."""
    rank = rng.permutation(n_classes) + 1
    n = head * rank.astype(np.float64) ** -alpha * rng.uniform(0.8, 1.25, n_classes)
    return np.maximum(2, np.round(n)).astype(int) + rng.integers(0, 3, n_classes)


def _new_id(rng, used):
    while True:
        i = rng.bytes(8).hex()
        if i not in used:
            used.add(i)
            return i


def _write(root, split, image_id, img, rng):
    d = os.path.join(root, split, image_id[0], image_id[1], image_id[2])
    os.makedirs(d, exist_ok=True)
    ok = cv2.imwrite(os.path.join(d, f"{image_id}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                     [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(75, 96))])
    if not ok:
        raise OSError(f"could not write {image_id}.jpg under {d}")


def generate(out, classes=60, clean_classes=40, test=120, non_landmark_frac=0.5,
             min_size=96, max_size=320, seed=0, non_landmark_set=0):
    if not 0 < clean_classes <= classes:
        raise ValueError("need 0 < clean_classes <= classes")
    rng = _rng(seed, 0)
    used = set()
    landmark_ids = np.sort(rng.choice(200_000, classes, replace=False))  # sparse, like GLDv2's
    sizes = class_sizes(classes, rng)
    clean = set(rng.choice(landmark_ids, clean_classes, replace=False).tolist())
    scenes = {int(l): make_scene(_rng(seed, 1, l)) for l in landmark_ids}

    rows, clean_rows = [], []
    for lid, n in zip(landmark_ids.tolist(), sizes.tolist()):
        r = _rng(seed, 2, lid)
        ids = [_new_id(rng, used) for _ in range(n)]
        for i in ids:
            _write(out, "train", i, make_view(scenes[lid], r, min_size, max_size), r)
            rows.append((i, f"https://synthetic.invalid/{i}.jpg", lid))
        if lid in clean:  # the clean list keeps part of a clean class's images (GLDv2's clean set is ~40% of the full one)
            keep = max(2, int(round(n * r.uniform(0.35, 0.75))))
            clean_rows += [(i, lid) for i in sorted(r.choice(ids, keep, replace=False).tolist())]
    order = rng.permutation(len(rows))
    df = pd.DataFrame([rows[i] for i in order], columns=["id", "url", "landmark_id"])
    df_clean = pd.DataFrame(clean_rows, columns=["id", "landmark_id"])
    df_clean = df_clean.iloc[rng.permutation(len(df_clean))]

    n_non = int(round(test * non_landmark_frac))
    clean_sorted = np.array(sorted(clean))
    truth = [int(v) for v in rng.choice(clean_sorted, test - n_non)] + [None] * n_non
    truth = [truth[i] for i in rng.permutation(test)]
    test_ids, sol = [], []
    for q, lid in enumerate(truth):
        r = _rng(seed, 3, q)
        if lid is not None:
            scene = scenes[lid]
        else:
            scene = (make_clutter if non_landmark_kind(q) == "clutter" else make_scene)(_rng(seed, 4, q))
        i = _new_id(rng, used)
        _write(out, "test", i, make_view(scene, r, min_size, max_size), r)
        test_ids.append(i)
        sol.append("" if lid is None else str(lid))

    if non_landmark_set:
        nl_ids = []
        for j in range(non_landmark_set):
            r = _rng(seed, 5, j)
            i = _new_id(rng, used)
            _write(out, "non_landmark", i, make_view(make_clutter(_rng(seed, 6, j)), r, min_size, max_size), r)
            nl_ids.append(i)
        pd.DataFrame({"id": nl_ids}).to_csv(os.path.join(out, "non_landmark.csv"), index=False)

    df.to_csv(os.path.join(out, "train.csv"), index=False)
    df_clean.to_csv(os.path.join(out, "train_competition.csv"), index=False)
    pd.DataFrame({"id": test_ids, "landmarks": ""}).to_csv(os.path.join(out, "sample_submission.csv"), index=False)
    pd.DataFrame({"id": test_ids, "landmarks": sol}).to_csv(os.path.join(out, "solution.csv"), index=False)
    return df, df_clean


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=60)
    p.add_argument("--clean-classes", type=int, default=40)
    p.add_argument("--test", type=int, default=120)
    p.add_argument("--non-landmark-frac", type=float, default=0.5)
    p.add_argument("--min-size", type=int, default=96)
    p.add_argument("--max-size", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--non-landmark-set", type=int, default=0, help="also write N known non-landmark images")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    df, df_clean = generate(a.out, a.classes, a.clean_classes, a.test, a.non_landmark_frac,
                            a.min_size, a.max_size, a.seed, a.non_landmark_set)
    print(f"{len(df)} train images over {df.landmark_id.nunique()} classes; clean list "
          f"{len(df_clean)} images over {df_clean.landmark_id.nunique()} classes; {a.test} test images -> {a.out}")


if __name__ == "__main__":
    main()
