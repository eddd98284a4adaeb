"""Odd but valid images read correctly; bad ones are named, skipped and counted."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, train_cmd
from dataset import BadImage, LandmarkDataset, collate, get_transforms, read_rgb


def _gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 90)], 2).astype(np.uint8)


def test_odd_but_valid_images(tmp_path):
    rgb = _gradient(60, 80)
    # grayscale JPEG -> 3 equal channels
    cv2.imwrite(str(tmp_path / "gray.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    g = read_rgb(str(tmp_path / "gray.jpg"))
    assert g.shape == (60, 80, 3) and (g[..., 0] == g[..., 2]).all()
    # 16-bit PNG under a .jpg name -> 8 bit
    cv2.imwrite(str(tmp_path / "deep.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    os.replace(tmp_path / "deep.png", tmp_path / "deep.jpg")
    d = read_rgb(str(tmp_path / "deep.jpg"))
    assert d.dtype == np.uint8 and np.abs(d.astype(int) - rgb).max() <= 1
    # PNG with alpha under a .jpg name -> RGB, alpha dropped
    rgba = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.full((60, 80), 128, np.uint8)])
    cv2.imwrite(str(tmp_path / "alpha.png"), rgba)
    os.replace(tmp_path / "alpha.png", tmp_path / "alpha.jpg")
    assert np.array_equal(read_rgb(str(tmp_path / "alpha.jpg"), 32), rgb)
    # CMYK JPEG -> RGB close to the original colours
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    c = read_rgb(str(tmp_path / "cmyk.jpg"))
    assert c.shape == (60, 80, 3) and np.abs(c.astype(int) - rgb).mean() < 12
    # EXIF orientation 6 (rotate 90 clockwise to display): portrait out, at full and reduced scale
    big = _gradient(400, 600)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(big).save(tmp_path / "exif.jpg", quality=95, exif=exif)
    want = np.rot90(big, -1)
    for min_side in (None, 150):
        e = read_rgb(str(tmp_path / "exif.jpg"), min_side)
        ref = want if min_side is None else cv2.resize(want, (e.shape[1], e.shape[0]), interpolation=cv2.INTER_AREA)
        assert e.shape[0] > e.shape[1] and np.abs(e.astype(int) - ref).mean() < 6, min_side
    # 2 x 2 px through both transforms
    cv2.imwrite(str(tmp_path / "tiny.jpg"), np.full((2, 2, 3), 200, np.uint8))
    df = pd.DataFrame({"filepath": [str(tmp_path / n) for n in ("tiny.jpg", "gray.jpg", "cmyk.jpg", "exif.jpg")],
                       "landmark_id": [0, 1, 2, 3]})
    for t in get_transforms(48):
        x, y = collate([LandmarkDataset(df, "", "train", t)[i] for i in range(4)])
        assert x.shape == (4, 3, 48, 48) and y.tolist() == [0, 1, 2, 3]


def _bad_files(d):
    """Missing, empty, truncated and non-image files in d; returns {name: reason}."""
    cv2.imwrite(str(d / "good.jpg"), _gradient(300, 400))
    (d / "empty.jpg").write_bytes(b"")
    data = (d / "good.jpg").read_bytes()
    (d / "cut.jpg").write_bytes(data[:len(data) // 2])
    (d / "page.jpg").write_text("<html>404 Not Found</html>")
    return {"missing.jpg": "missing", "empty.jpg": "empty file", "cut.jpg": "truncated JPEG",
            "page.jpg": "not a readable image"}


def test_bad_files_are_named(tmp_path):
    for name, reason in _bad_files(tmp_path).items():
        with pytest.raises(BadImage) as e:
            read_rgb(str(tmp_path / name), 64)
        assert e.value.reason == reason and str(tmp_path / name) in str(e.value)
    assert read_rgb(str(tmp_path / "good.jpg"), 64).shape == (75, 100, 3)  # 1/4 scale, >= 64


def test_bad_samples_replaced_deterministically(tmp_path):
    bad = _bad_files(tmp_path)
    names = ["good.jpg"] * 6 + list(bad)
    df = pd.DataFrame({"filepath": [str(tmp_path / n) for n in names], "landmark_id": range(len(names))})
    tt, _ = get_transforms(32)
    ds = LandmarkDataset(df, "", "train", tt, seed=1, skip_bad=True)
    items = [ds[(3, i)] for i in range(len(ds))]
    assert [it[2] for it in items[:6]] == [""] * 6
    for i, it in enumerate(items[6:], 6):
        assert str(tmp_path / names[i]) in it[2].split("\n")
        assert it[1].item() < 6  # replaced by a good row, whose label comes with it
    again = [ds[(3, i)] for i in range(len(ds))]
    assert all(a[1] == b[1] and (a[0] == b[0]).all() for a, b in zip(items, again))
    # test mode: a black image and the path, for the caller to mark
    x, why = LandmarkDataset(df, "", "test", get_transforms(32)[1], skip_bad=True)[7]
    assert x.shape == (3, 32, 32) and int(x.max()) == 0 and why == str(tmp_path / names[7])
    with pytest.raises(BadImage):
        LandmarkDataset(df, "", "train", tt)[7]  # without skip_bad: an error, as before


def _small_data(tmp_path):
    import preprocess
    import synthetic
    d = str(tmp_path / "data")
    synthetic.generate(d, classes=12, clean_classes=8, test=10, min_size=40, max_size=64, seed=3)
    preprocess.main(["--train-csv", os.path.join(d, "train_competition.csv"), "--out-dir", d])
    return d


def test_training_skips_counts_and_logs_bad_images(tmp_path):
    d = _small_data(tmp_path)
    ids = pd.read_csv(os.path.join(d, "train.csv"), dtype={"id": str})["id"].tolist()
    path = lambda i: os.path.join(d, "train", i[0], i[1], i[2], f"{i}.jpg")  # noqa: E731
    os.remove(path(ids[0]))
    open(path(ids[1]), "wb").close()
    data = open(path(ids[2]), "rb").read()
    open(path(ids[2]), "wb").write(data[:len(data) // 3])
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, *train_cmd(d, "bad", 0, "--max-bad-frac", "0.1", epochs=2)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "epoch 1: skipped" in p.stdout and "epoch 2: skipped" in p.stdout
    listed = open(os.path.join(d, "logs", "bad_bad_images.txt")).read()
    for i in ids[:3]:
        assert path(i) in listed
    # the same damage with a lower tolerance stops the run with one line
    p = subprocess.run([sys.executable, *train_cmd(d, "bad2", 0, "--max-bad-frac", str(1 / len(ids)), epochs=2)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "data set is broken" in p.stderr and "Traceback" not in p.stderr
    # --exclude leaves them out up front: nothing to skip
    pd.DataFrame({"id": ids[:3], "path": [path(i) for i in ids[:3]], "reason": "x"}).to_csv(
        os.path.join(d, "bad.csv"), index=False)
    p = subprocess.run([sys.executable, *train_cmd(d, "ex", 0, "--exclude", os.path.join(d, "bad.csv"), epochs=1)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "left out 3 images" in p.stdout and "skipped" not in p.stdout, p.stderr[-2000:]


def test_predict_with_unreadable_queries_and_gallery_images(stage1, tmp_path, capsys):
    import json
    import shutil

    import predict
    import retrieval
    from conftest import TINY_BACKBONE
    d = str(tmp_path / "copy")
    shutil.copytree(stage1["data"], d, ignore=shutil.ignore_patterns("weights", "logs"))
    gallery = pd.read_csv(os.path.join(d, "train_competition.csv"), dtype={"id": str})
    queries = pd.read_csv(os.path.join(d, "sample_submission.csv"), dtype={"id": str})
    path = lambda split, i: os.path.join(d, split, i[0], i[1], i[2], f"{i}.jpg")  # noqa: E731
    bad_g, bad_q = gallery["id"].iloc[[0, 5]].tolist(), queries["id"].iloc[[2]].tolist()
    os.remove(path("train", bad_g[0]))
    open(path("train", bad_g[1]), "w").write("not an image")
    data = open(path("test", bad_q[0]), "rb").read()
    open(path("test", bad_q[0]), "wb").write(data[:len(data) // 2])
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": TINY_BACKBONE, "checkpoint": stage1["checkpoint"],
                                            "image_size": 40}]}))
    kw = dict(data_dir=d, train_csv=os.path.join(d, "train_competition.csv"),
              idx2landmark=os.path.join(d, "idx2landmark_id.json"), spec=str(spec), device="cpu", batch_size=16,
              num_workers=0, cache_dir=str(tmp_path / "cache"))
    res = predict.run(predict.options(**kw))
    assert "unreadable images: 2 of" in capsys.readouterr().out
    q_bad, g_bad = res["unreadable"]
    assert q_bad.sum() == 1 and q_bad[2] and g_bad.sum() == 2 and g_bad[0] and g_bad[5]
    sub = predict.format_submission(res["ids"], *res["ensemble"])
    assert list(sub["id"]) == list(queries["id"]) and sub["landmarks"][2] == ""
    assert (sub["landmarks"] != "").sum() == len(queries) - 1
    # an excluded gallery row is never a neighbour, even a query's exact twin
    sims, idx = retrieval.topk_cosine(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), k=3,
                                    exclude=np.array([True, False, False]))
    assert 0 not in idx[:, :2] and sims[0, 0] == 0 and np.isneginf(sims[:, 2]).all()
    # the cached run (NaN rows kept in the cache) finds the same
    res2 = predict.run(predict.options(**kw))
    assert (res2["unreadable"][1] == g_bad).all() and list(res2["ensemble"][0]) == list(res["ensemble"][0])
    # the command line names them: the first few printed, all in OUT_unreadable.csv
    capsys.readouterr()
    predict.main(["--data-dir", d, "--train-csv", kw["train_csv"], "--idx2landmark", kw["idx2landmark"], "--spec",
                  str(spec), "--device", "cpu", "--num-workers", "0", "--cache-dir", kw["cache_dir"],
                  "--out", str(tmp_path / "sub.csv")])
    listed = pd.read_csv(tmp_path / "sub_unreadable.csv")
    assert sorted(zip(listed["role"], listed["path"])) == sorted(
        [("gallery", path("train", i)) for i in bad_g] + [("query", path("test", bad_q[0]))])
    assert f"unreadable images: 3 ({path('train', bad_g[0])}" in capsys.readouterr().out
    # --exclude: the listed files are not read at all
    pd.DataFrame({"id": bad_g + bad_q}).to_csv(tmp_path / "bad.csv", index=False)
    res3 = predict.run(predict.options(exclude=str(tmp_path / "bad.csv"), **kw))
    assert "left out 2 gallery images and 1 queries" in capsys.readouterr().out
    assert res3["unreadable"][0].sum() == 1 and res3["unreadable"][1].sum() == 0


def test_check_images_lists_the_bad_files(tmp_path, capsys):
    import preprocess
    d = _small_data(tmp_path)
    ids = pd.read_csv(os.path.join(d, "train.csv"), dtype={"id": str})["id"].tolist()
    q = pd.read_csv(os.path.join(d, "sample_submission.csv"), dtype={"id": str})["id"].tolist()
    path = lambda split, i: os.path.join(d, split, i[0], i[1], i[2], f"{i}.jpg")  # noqa: E731
    os.remove(path("train", ids[0]))
    open(path("train", ids[1]), "wb").close()
    data = open(path("test", q[0]), "rb").read()
    open(path("test", q[0]), "wb").write(data[:len(data) // 2])
    bad = preprocess.main(["--check-images", "--data-dir", d, "--out-dir", str(tmp_path), "--workers", "2"])
    got = pd.read_csv(tmp_path / "bad_images.csv", dtype={"id": str})
    assert dict(zip(got["id"], got["reason"])) == {ids[0]: "missing", ids[1]: "empty file", q[0]: "truncated JPEG"}
    assert list(got["path"]) == list(bad["path"]) and got["path"].iloc[0] == path("train", ids[0])
    assert "3 of" in capsys.readouterr().out


def test_all_digit_ids_run_end_to_end(tmp_path):
    """Ids of digits only (e.g. 0123...): read as text everywhere, leading zeros kept."""
    import json

    import evaluate
    import predict
    import synthetic
    d = str(tmp_path / "data")
    synthetic.generate(d, classes=10, clean_classes=6, test=8, min_size=40, max_size=64, seed=4)
    new = {}
    for split, csv in (("train", "train.csv"), ("test", "sample_submission.csv")):
        for k, i in enumerate(pd.read_csv(os.path.join(d, csv), dtype={"id": str})["id"]):
            j = f"{len(new):016d}" if split == "train" else f"0{9 * 10**14 + k:015d}"
            new[i] = j
            dst = os.path.join(d, split, j[0], j[1], j[2])
            os.makedirs(dst, exist_ok=True)
            os.replace(os.path.join(d, split, i[0], i[1], i[2], f"{i}.jpg"), os.path.join(dst, f"{j}.jpg"))
    for csv in ("train.csv", "train_competition.csv", "sample_submission.csv", "solution.csv"):
        df = pd.read_csv(os.path.join(d, csv), dtype=str, keep_default_na=False)
        df["id"] = df["id"].map(new)
        df.to_csv(os.path.join(d, csv), index=False)
    assert pd.read_csv(os.path.join(d, "train.csv"))["id"].dtype.kind == "i"  # what pandas makes of them
    import preprocess
    preprocess.main(["--train-csv", os.path.join(d, "train_competition.csv"), "--out-dir", d])
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for step in (0, 1):
        extra = ["--load-from", os.path.join(d, "weights", "dig0_fold0_final.pth")] if step else []
        p = subprocess.run([sys.executable, *train_cmd(d, f"dig{step}", step, *extra, epochs=1)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": "mobilenetv3_small_050",
                                            "checkpoint": os.path.join(d, "weights", "dig1_fold0_final.pth"),
                                            "image_size": 32}]}))
    out = tmp_path / "sub.csv"
    predict.main(["--data-dir", d, "--train-csv", os.path.join(d, "train_competition.csv"), "--idx2landmark",
                  os.path.join(d, "idx2landmark_id.json"), "--spec", str(spec), "--out", str(out), "--device", "cpu",
                  "--num-workers", "0", "--cache-dir", ""])
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sub["id"].iloc[0].startswith("09") and (sub["landmarks"] != "").all()
    evaluate.evaluate(str(out), os.path.join(d, "solution.csv"))


def test_own_photos_from_folders(tmp_path):
    """preprocess.py --from-folder: one folder per landmark (names kept), any image type,
    train.py and predict.py run on it unchanged through the filepath column."""
    import json

    import predict

    import preprocess
    import synthetic
    from util import read_label_map
    d = str(tmp_path / "gld")
    synthetic.generate(d, classes=6, clean_classes=6, test=6, min_size=40, max_size=64, seed=7)
    full = pd.read_csv(os.path.join(d, "train.csv"), dtype={"id": str})
    photos = tmp_path / "photos"
    for k, (i, lid) in enumerate(zip(full["id"], full["landmark_id"])):
        folder = photos / f"Place {lid} été"
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        img = cv2.imread(os.path.join(d, "train", i[0], i[1], i[2], f"{i}.jpg"))
        ext = (".jpg", ".png", ".JPEG")[k % 3]
        cv2.imwrite(str((folder / "sub" if k % 4 == 0 else folder) / f"{i}{ext}"), img)
    (photos / "Place x").mkdir()
    (photos / "Place x" / "notes.txt").write_text("not an image")  # no images: not a landmark
    out = str(tmp_path / "own")
    df = preprocess.main(["--from-folder", str(photos), "--out-dir", out])
    assert len(df) == len(full) and df["landmark_id"].nunique() == full["landmark_id"].nunique()
    names = json.load(open(os.path.join(out, "landmark_names.json")))
    assert sorted(names.values()) == sorted(f"Place {lid} été" for lid in full["landmark_id"].unique())
    assert read_label_map(os.path.join(out, "idx2landmark_id.json")) == {int(k): int(k) for k in names}
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    common = ["--data-dir", out, "--folds-csv", os.path.join(out, "train_0.csv"), "--model-dir", out, "--log-dir", out,
              "--enet-type", "mobilenetv3_small_050", "--no-pretrained", "--num-workers", "0", "--batch-size", "8",
              "--image-size", "32", "--n-epochs", "1"]
    for step, extra in ((0, []), (1, ["--load-from", os.path.join(out, "own0_fold0_final.pth")])):
        p = subprocess.run([sys.executable, "train.py", "--kernel-type", f"own{step}", "--train-step", str(step),
                            *common, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": "mobilenetv3_small_050",
                                            "checkpoint": os.path.join(out, "own1_fold0_final.pth"), "image_size": 32}]}))
    res = predict.run(predict.options(data_dir=d, train_csv=os.path.join(out, "train_0.csv"),
                                      idx2landmark=os.path.join(out, "idx2landmark_id.json"), spec=str(spec),
                                      device="cpu", num_workers=0, cache_dir=None))
    assert set(res["ensemble"][0]) <= {int(k) for k in names} and not res["unreadable"][1].any()


def test_folders_name_bad_files_and_empty_landmarks(photos, tmp_path, capsys):
    """Your photos: preprocess.py --from-folder decodes every file (a text file named .jpg is left out,
    named, and listed in bad_images.csv) and names empty landmark folders; predict.py names unreadable
    gallery and query files and lists them all in OUT_unreadable.csv."""
    import shutil

    import predict
    import preprocess
    g, q = tmp_path / "gallery", tmp_path / "queries"
    shutil.copytree(photos["gallery"], g)
    shutil.copytree(photos["queries"], q)
    first = sorted(p for p in os.listdir(g) if not p.startswith("."))[0]
    (g / first / "notes.jpg").write_text("not a photo")
    (g / "Empty place").mkdir()
    (q / "day0" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    df = preprocess.main(["--from-folder", str(g), "--out-dir", str(tmp_path / "data")])
    out = capsys.readouterr().out
    assert f"1 of {len(df) + 1} files are not readable images, left out: {first}/notes.jpg" in out
    assert "1 landmark folder(s) with no readable images, left out: Empty place" in out
    assert not df["filepath"].str.endswith("notes.jpg").any()
    bad = pd.read_csv(tmp_path / "data" / "bad_images.csv")
    assert bad["path"].tolist() == [str(g / first / "notes.jpg")]
    predict.main(["--spec", photos["spec"], "--idx2landmark", photos["labels"], "--gallery-dir", str(g),
                  "--query-dir", str(q), "--out", str(tmp_path / "pred.csv"), "--device", "cpu", "--num-workers", "0"])
    out = capsys.readouterr().out
    assert "landmark folder(s) of --gallery-dir with no images, left out: Empty place" in out
    assert f"unreadable gallery images: 1 of {len(df) + 1}, not indexed: {os.path.join(first, 'notes.jpg')}" in out
    listed = pd.read_csv(tmp_path / "pred_unreadable.csv")
    assert sorted(zip(listed["role"], listed["path"])) == [("gallery", str(g / first / "notes.jpg")),
                                                           ("query", str(q / "day0" / "broken.jpg"))]
    assert "//" not in out
