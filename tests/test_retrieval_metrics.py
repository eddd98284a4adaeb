"""Retrieval metrics against hand-worked examples: mAP@100 of the Landmark Retrieval challenges,
and the revisited Oxford/Paris protocol (junk, queries without positives)."""
import json
import pickle

import numpy as np
import pytest

import evaluate
import evaluate_retrieval as er
from util import UserError
import features  # noqa: E402
import ensemble  # noqa: E402


def test_map_at_100_hand_example(tmp_path, capsys):
    (tmp_path / "sol.csv").write_text("id,images,Usage\nq1,a b,Public\nq2,c,Private\nq3,d,Ignored\nq4,e f g,Public\n")
    (tmp_path / "sub.csv").write_text("id,images\nq1,a x b\nq2,x c c\nq3,d\n")
    # q1: hits at 1 and 3: (1/1 + 2/3) / 2; q2: hit at 2 (the repeat counts once): (1/2) / 1; q4: no row: 0
    want = ((1 + 2 / 3) / 2 + 1 / 2 + 0) / 3
    assert evaluate.main(["--submission", str(tmp_path / "sub.csv"), "--solution", str(tmp_path / "sol.csv"),
                          "--metric", "map@100"]) == pytest.approx(want)
    assert evaluate.main(["--submission", str(tmp_path / "sub.csv"), "--solution", str(tmp_path / "sol.csv"),
                          "--metric", "map@100", "--usage", "Private"]) == pytest.approx(0.5)
    # AP divides by min(#relevant, 100): 150 relevant, all 100 predictions right -> 1
    truth = {"q": {str(i) for i in range(150)}}
    assert evaluate.mean_average_precision(truth, {"q": [str(i) for i in range(100)]}) == pytest.approx(1.0)
    # a row of more than 100 images: the first 100 are scored, as the official scorer does
    (tmp_path / "long.csv").write_text("id,images\nq1," + " ".join(str(i) for i in range(101)) + "\n")
    pred, cut = evaluate.read_retrieval_submission(str(tmp_path / "long.csv"))
    assert cut == 1 and pred["q1"] == [str(i) for i in range(100)]


def test_accuracy_metric(tmp_path):
    (tmp_path / "sol.csv").write_text("id,landmarks\na,1\nb,2\nc,\nd,4\n")
    (tmp_path / "sub.csv").write_text("id,landmarks\na,1 0.9\nb,3 0.8\nc,5 0.7\nd,\n")
    acc = evaluate.main(["--submission", str(tmp_path / "sub.csv"), "--solution", str(tmp_path / "sol.csv"),
                         "--metric", "accuracy"])
    assert acc == pytest.approx(1 / 3)  # of the 3 landmark queries, a is right; c is a non-landmark


GND = {"imlist": [f"db{i}" for i in range(6)], "qimlist": ["q0", "q1"],
       "gnd": [{"bbx": [0, 0, 10, 10], "easy": [0], "hard": [2], "junk": [1]},
               {"bbx": [1, 1, 5, 5], "easy": [5], "hard": [], "junk": []}]}
RANKS = np.array([[1, 0, 3, 2, 4, 5], [5, 0, 1, 2, 3, 4]])


def test_revisited_protocols_hand_example():
    res = er.evaluate(RANKS, GND["gnd"])
    # q0 Easy: ok {0}, ignore {1, 2}: ranking 0 3 4 5 -> AP 1. Medium: ok {0, 2}, ignore {1}: 0 3 2 4 5 ->
    # (1+1)/2/2 + (1/2+2/3)/2/2. Hard: ok {2}, ignore {1, 0}: 3 2 4 5 -> (0/1 + 1/2)/2 = 0.25. q1: AP 1 in
    # Easy and Medium, no positive in Hard (left out).
    med0 = 0.5 + (0.5 + 2 / 3) / 4
    assert res["easy"]["map"] == pytest.approx(1.0)
    assert res["medium"]["map"] == pytest.approx((med0 + 1) / 2)
    assert res["hard"]["map"] == pytest.approx(0.25) and np.isnan(res["hard"]["aps"][1])
    # mP@k at min(k, rank of the last positive): Hard q0 has its positive at 2 -> @1: 0, @5: 1/2, @10: 1/2
    assert res["hard"]["mp@k"] == pytest.approx([0.0, 0.5, 0.5])
    # Medium q0 positives at 1 and 3 -> @1: 1, @5: 2/3; q1 -> 1, 1
    assert res["medium"]["mp@k"] == pytest.approx([1.0, (2 / 3 + 1) / 2, (2 / 3 + 1) / 2])
    assert er.average_precision([0, 1, 2], 3) == pytest.approx(1.0)


def test_ground_truth_readers_and_cli(tmp_path, capsys):
    pkl = tmp_path / "gnd.pkl"
    g = {**GND, "gnd": [{**d, "bbx": np.array(d["bbx"], np.float64)} for d in GND["gnd"]]}
    with open(pkl, "wb") as f:
        pickle.dump(g, f)
    (tmp_path / "gnd.json").write_text(json.dumps(GND))
    assert er.read_gnd(str(pkl)) == er.read_gnd(str(tmp_path / "gnd.json"))
    np.save(tmp_path / "ranks.npy", RANKS)
    res = er.main(["--gnd", str(pkl), "--ranks", str(tmp_path / "ranks.npy")])
    assert "mAP  E: 100.00" in capsys.readouterr().out and res["hard"]["map"] == pytest.approx(0.25)
    # features: the same ranking from embeddings
    db = np.eye(6)
    queries = np.stack([db[RANKS[q]].T @ np.linspace(1, 0.5, 6) for q in range(2)])
    np.savez(tmp_path / "f.npz", db=db, queries=queries)
    np.testing.assert_array_equal(er.ranks_from_features(db, queries), RANKS)
    # a ground truth whose unpickling would run code: refused, nothing created
    planted = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(planted), "w"))
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({**GND, "x": Payload()}, f)
    with pytest.raises(UserError, match="not allowed"):
        er.read_gnd(str(tmp_path / "evil.pkl"))
    assert not planted.exists()


def test_queries_cropped_to_their_boxes(tmp_path, stage1):
    """--images: database images whole, queries cut to their bounding boxes before embedding."""
    import cv2
    import torch

    from conftest import TINY_BACKBONE
    rng = np.random.default_rng(0)
    names = [f"db{i}" for i in range(4)]
    for n in names + ["q0"]:
        cv2.imwrite(str(tmp_path / f"{n}.jpg"), rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    cfg = {"imlist": names, "qimlist": ["q0"], "gnd": [{"bbx": [10.4, 5.6, 50.2, 45.0], "easy": [0], "hard": [],
                                                        "junk": []}]}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": TINY_BACKBONE, "checkpoint": stage1["checkpoint"],
                                            "image_size": 40}]}))
    a = er.parse_args(["--gnd", "unused", "--images", str(tmp_path), "--spec", str(spec), "--device", "cpu",
                       "--num-workers", "0"])
    db, q = er.features_from_images(a, cfg)
    assert db.shape == (4, 512) and q.shape == (1, 512)
    crop = cv2.imread(str(tmp_path / "q0.jpg"))[6:45, 10:50]
    cv2.imwrite(str(tmp_path / "crop.png"), crop)
    model = ensemble.load_model(TINY_BACKBONE, stage1["checkpoint"])
    want = features.extract_features(model, [str(tmp_path / "crop.png")], 40,
                                     features.Extraction(torch.device("cpu"), num_workers=0), normalize=True)
    np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-6)
    # an unreadable database image: the protocol cannot rank it, and the message names it
    (tmp_path / f"{names[2]}.jpg").write_text("not an image")
    with pytest.raises(UserError, match=f"1 database image.*unreadable: {tmp_path / names[2]}.jpg"):
        er.features_from_images(a, cfg)


def test_ranks_from_predict_folders(tmp_path, stage1):
    """predict.py --retrieval-ranks on a folder gallery, scored by evaluate_retrieval.py --ranks: the
    same numbers as the features of the same models."""
    import cv2

    import predict
    from conftest import TINY_BACKBONE
    rng = np.random.default_rng(1)
    (tmp_path / "db" / "all").mkdir(parents=True)
    (tmp_path / "q").mkdir()
    for i in range(6):
        cv2.imwrite(str(tmp_path / "db" / "all" / f"db{i}.jpg"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    for n in ("q0", "q1"):
        cv2.imwrite(str(tmp_path / "q" / f"{n}.png"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": TINY_BACKBONE, "checkpoint": stage1["checkpoint"],
                                            "image_size": 40}]}))
    predict.main(["--spec", str(spec), "--gallery-dir", str(tmp_path / "db"), "--query-dir", str(tmp_path / "q"),
                  "--retrieval-ranks", str(tmp_path / "ranks.csv"), "--out", str(tmp_path / "p.csv"),
                  "--device", "cpu", "--num-workers", "0"])
    # the GND lists db images in another order than the folder listing: matched by name
    cfg = {**GND, "imlist": [f"db{i}" for i in (3, 1, 4, 0, 5, 2)]}
    ranks = er.ranks_from_csv(str(tmp_path / "ranks.csv"), cfg)
    import torch
    model = ensemble.load_model(TINY_BACKBONE, stage1["checkpoint"])
    kw = dict(how=features.Extraction(torch.device("cpu"), num_workers=0), normalize=True)
    db = features.extract_features(model, [str(tmp_path / "db" / "all" / f"{n}.jpg") for n in cfg["imlist"]], 40, **kw)
    q = features.extract_features(model, [str(tmp_path / "q" / f"{n}.png") for n in cfg["qimlist"]], 40, **kw)
    np.testing.assert_array_equal(ranks, er.ranks_from_features(db, q))
