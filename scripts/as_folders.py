"""Write a GLDv2-layout data set as your-own-photos folders (hard links, no copies), and turn a
predictions.csv of those folders back into a submission: the demo's check that both paths agree.

    python scripts/as_folders.py split DATA_DIR CLEAN_LIST OUT      # OUT/gallery/<landmark id>/<id>.jpg, OUT/queries/<id>.jpg
    python scripts/as_folders.py submission PREDICTIONS_CSV OUT_CSV  # id,landmarks from path,landmark,confidence
"""
import os
import sys

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset import image_path  # noqa: E402


def _link(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system
        import shutil
        shutil.copy(src, dst)


def split(data_dir, clean_list, out):
    g = pd.read_csv(clean_list, dtype={"id": str})
    for i, lid in zip(g["id"], g["landmark_id"]):
        _link(image_path(data_dir, "train", i), os.path.join(out, "gallery", str(lid), f"{i}.jpg"))
    for i in pd.read_csv(os.path.join(data_dir, "sample_submission.csv"), dtype={"id": str})["id"]:
        _link(image_path(data_dir, "test", i), os.path.join(out, "queries", f"{i}.jpg"))


def submission(predictions, out):
    p = pd.read_csv(predictions, keep_default_na=False, dtype={"landmark": str, "guess": str})
    ids = [os.path.splitext(os.path.basename(x))[0] for x in p["path"]]
    # every guess, sure or not (predictions.csv's guess column): GAP orders them by confidence
    named = p["guess"] if "guess" in p.columns else p["landmark"]
    rows = [f"{lm} {float(c)!r}" if lm else "" for lm, c in zip(named, p["confidence"])]
    pd.DataFrame({"id": ids, "landmarks": rows}).to_csv(out, index=False)


if __name__ == "__main__":
    {"split": split, "submission": submission}[sys.argv[1]](*sys.argv[2:])
