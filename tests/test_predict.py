import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate
import predict
import dataset  # noqa: E402
import features  # noqa: E402
import ensemble  # noqa: E402
import retrieval
import synthetic
from conftest import ROOT, TINY_BACKBONE
from models import build_model


def rerank_reference(sims, nn_l, cls_s, cls_l, sim_power=9, cls_power=10):
    """The original notebook's loop, written out."""
    preds, confs = [], []
    for i in range(len(sims)):
        cls = {cls_l[i, j]: cls_s[i, j] for j in range(cls_l.shape[1])}
        tmp = {}
        for k in range(sims.shape[1]):
            lid = nn_l[i, k]
            tmp[lid] = tmp.get(lid, 0.0) + float(sims[i, k]) ** sim_power * float(cls.get(lid, 1e-8)) ** cls_power
        p, c = max(tmp.items(), key=lambda x: x[1])
        preds.append(p)
        confs.append(c)
    return np.array(preds), np.array(confs)


def test_rerank_equals_direct_computation():
    rng = np.random.default_rng(0)
    q = 500
    sims = np.sort(rng.uniform(0.2, 1.0, (q, 5)), axis=1)[:, ::-1].astype(np.float32)
    nn_l = rng.integers(0, 8, (q, 5))          # few landmarks: repeats within a row
    cls_l = np.stack([rng.choice(12, 5, replace=False) for _ in range(q)])
    cls_s = np.sort(rng.uniform(0.0, 0.9, (q, 5)), axis=1)[:, ::-1].astype(np.float32)
    got_l, got_c = retrieval.rerank(sims, nn_l, cls_s, cls_l)
    want_l, want_c = rerank_reference(sims, nn_l, cls_s, cls_l)
    np.testing.assert_array_equal(got_l, want_l)
    np.testing.assert_allclose(got_c, want_c, rtol=1e-12, atol=0)
    # rows whose neighbours all miss the classifier's list score ~1e-80 x sim^9: float64 keeps them apart
    tiny = got_c[got_c < 1e-70]
    assert len(tiny) > 0 and len(np.unique(tiny)) == len(tiny) and np.all(tiny > 0)


def test_rerank_hand_example():
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    nn_l = np.array([[1, 2, 2, 3, 2]])
    cls_l = np.array([[2, 1, 7, 8, 9]])
    cls_s = np.array([[0.6, 0.5, 0.1, 0.1, 0.1]])
    l, c = retrieval.rerank(sims, nn_l, cls_s, cls_l)
    s2 = (0.8 ** 9 + 0.7 ** 9 + 0.5 ** 9) * 0.6 ** 10
    s1 = 0.9 ** 9 * 0.5 ** 10
    assert s2 > s1 and l[0] == 2 and c[0] == pytest.approx(s2, rel=1e-12)


def test_rerank_vote_max():
    """vote max: each landmark scored by its best neighbour, not the sum. In the hand
    example the sum lets landmark 2's three photos win; its best photo (0.8) against
    landmark 1's (0.9): landmark 1 only if its classifier score is close enough."""
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    nn_l = np.array([[1, 2, 2, 3, 2]])
    cls_l = np.array([[2, 1, 7, 8, 9]])
    cls_s = np.array([[0.6, 0.55, 0.1, 0.1, 0.1]])
    l, c = retrieval.rerank(sims, nn_l, cls_s, cls_l)
    assert l[0] == 2  # summed: (0.8^9 + 0.7^9 + 0.5^9) 0.6^10 > 0.9^9 0.55^10 > 0.8^9 0.6^10
    l, c = retrieval.rerank(sims, nn_l, cls_s, cls_l, vote="max")
    assert l[0] == 1 and c[0] == pytest.approx(0.9 ** 9 * 0.55 ** 10, rel=1e-12)
    # random rows against a direct loop
    rng = np.random.default_rng(3)
    q = 300
    sims = np.sort(rng.uniform(0.2, 1.0, (q, 5)), axis=1)[:, ::-1]
    nn_l = rng.integers(0, 6, (q, 5))
    cls_l = np.stack([rng.choice(9, 5, replace=False) for _ in range(q)])
    cls_s = np.sort(rng.uniform(0.0, 0.9, (q, 5)), axis=1)[:, ::-1]
    got_l, got_c = retrieval.rerank(sims, nn_l, cls_s, cls_l, vote="max")
    for i in range(q):
        cls = dict(zip(cls_l[i], cls_s[i]))
        best = {}
        for k in range(5):
            v = sims[i, k] ** 9 * cls.get(nn_l[i, k], 1e-8) ** 10
            best[nn_l[i, k]] = max(best.get(nn_l[i, k], 0.0), v)
        want = max(best.values())
        # approx, not ==: numpy's vectorised pow and Python's ** may differ in the last bit
        assert got_c[i] == pytest.approx(want, rel=1e-12)
        assert best[got_l[i]] == pytest.approx(got_c[i], rel=1e-12)
    assert retrieval.resolve_rerank("auto", None, ["finetune", "finetune"]) == ("max", 9, 3)
    assert retrieval.resolve_rerank("auto", None, ["finetune", None]) == ("sum", 9, 10)  # an original model
    assert retrieval.resolve_rerank("sum", 10, ["finetune"]) == ("sum", 9, 10.0)  # given values win
    assert retrieval.resolve_rerank("max", None, []) == ("max", 9, 10)
    # the CLI: a power that is not a number is a user mistake naming the flag
    folders = ["--spec", "s.json", "--query-dir", "q", "--gallery-dir", "g"]
    with pytest.raises(SystemExit) as e:
        predict.parse_args(folders + ["--rerank-cls-power", "x"])
    assert e.value.code == 2
    assert predict.parse_args(folders + ["--rerank-cls-power", "2.5"]).rerank_cls_power == 2.5


@pytest.mark.parametrize("fp16", [False, True])
def test_topk_equals_bruteforce_across_chunks(fp16):
    rng = np.random.default_rng(1)
    dt = np.float16 if fp16 else np.float32
    qa, qb = rng.normal(size=(37, 16)), rng.normal(size=(37, 8))
    ga, gb = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 8))
    sims, idx = retrieval.topk_cosine([qa.astype(np.float32), qb.astype(np.float32)], [ga.astype(dt), gb.astype(dt)],
                                    k=5, query_chunk=10, gallery_chunk=64)
    full = (qa @ ga.astype(dt).astype(np.float64).T + qb @ gb.astype(dt).astype(np.float64).T) / 2
    want = np.argsort(-full, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(sims, np.take_along_axis(full, want, 1), rtol=1e-4, atol=1e-4)
    # a gallery smaller than k
    s, i = retrieval.topk_cosine(qa[:3].astype(np.float32), ga[:2].astype(np.float32), k=5)
    assert i.shape == (3, 2)


def test_pred_mask_pushes_absent_classes_down():
    cos = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.95, 0.1, 0.0]], np.float32)
    present = np.array([False, True, True, True])
    s, i = retrieval.pred_mask_topk(cos, present, k=4)
    np.testing.assert_array_equal(i, [[2, 3, 1, 0], [1, 2, 3, 0]])
    np.testing.assert_allclose(s[0], [0.5, 0.3, 0.1, 0.9 - 1], rtol=1e-6)


def _write(path, rows):
    pd.DataFrame(rows, columns=["id", "landmarks"]).to_csv(path, index=False)


def test_evaluate_hand_made_files(tmp_path, capsys):
    _write(tmp_path / "sol.csv", [("a", "1"), ("b", "2"), ("c", ""), ("d", "4")])
    # ranks: b (right), c (non-landmark, wrong), a (wrong), d: no prediction
    _write(tmp_path / "sub.csv", [("a", "9 0.5"), ("b", "2 0.9"), ("c", "3 0.7"), ("d", "")])
    gap, acc = evaluate.main(["--submission", str(tmp_path / "sub.csv"), "--solution", str(tmp_path / "sol.csv")])
    assert gap == pytest.approx(1 / 3) and acc == pytest.approx(1 / 3)
    assert "GAP: 0.3333" in capsys.readouterr().out
    _write(tmp_path / "bad.csv", [("a", "9 0.5"), ("b", "2")])
    with pytest.raises(evaluate.SubmissionError, match="line 3 .id b."):
        evaluate.evaluate(str(tmp_path / "bad.csv"), str(tmp_path / "sol.csv"))
    _write(tmp_path / "bad2.csv", [("a", "x 0.5")])
    with pytest.raises(evaluate.SubmissionError, match="line 2"):
        evaluate.evaluate(str(tmp_path / "bad2.csv"), str(tmp_path / "sol.csv"))


def test_original_format_checkpoint_loads_in_predict(tmp_path):
    torch.manual_seed(0)
    m = build_model(TINY_BACKBONE, out_dim=7).eval()
    torch.save({"epoch": 1, "model_state_dict": {f"module.{k}": v for k, v in m.state_dict().items()},
                "optimizer_state_dict": {}}, tmp_path / "o.pth")
    m2 = ensemble.load_model(TINY_BACKBONE, str(tmp_path / "o.pth"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x))
        torch.testing.assert_close(m2.embed(x), m.embed(x))


def last_bar(err):
    """The last state tqdm drew on stderr."""
    return [seg for seg in err.replace("\r", "\n").split("\n") if "|" in seg][-1]


def test_feature_cache_reuses_and_resumes(stage1, tmp_path, capsys):
    d = stage1["data"]
    model = ensemble.load_model(TINY_BACKBONE, stage1["checkpoint"])
    ids = pd.read_csv(os.path.join(d, "train_competition.csv"))["id"].tolist()[:20]
    paths = [os.path.join(d, "train", i[0], i[1], i[2], f"{i}.jpg") for i in ids]
    kw = dict(how=features.Extraction(torch.device("cpu"), batch_size=6, num_workers=0),
              store=features.Store(str(tmp_path), "k"), normalize=True)
    full = np.array(features.extract_features(model, paths, 40, **kw))
    bar = last_bar(capsys.readouterr().err)  # 20 rows, batches of 6
    assert "100%" in bar and " 4/4 " in bar, bar
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1, rtol=1e-5)
    with torch.no_grad():
        x = torch.stack([dataset.LandmarkDataset(pd.DataFrame({"filepath": paths[:2]}), "", "test",
                                                 dataset.get_transforms(40, model.preprocessing["interpolation"])[1])[i]
                         for i in range(2)])
        np.testing.assert_allclose(full[:2], model.embed(x).numpy(), rtol=1e-4, atol=1e-5)
    # an interrupted run: 12 rows done, the rest garbage -> resumed from row 12
    arr = np.load(tmp_path / "k.npy", mmap_mode="r+")
    arr[12:] = 0
    arr.flush()
    (tmp_path / "k.done").write_text("12")
    np.testing.assert_allclose(np.array(features.extract_features(model, paths, 40, **kw)), full, rtol=1e-5, atol=1e-6)
    bar = last_bar(capsys.readouterr().err)  # the 2 batches done before counted, the bar at its total
    assert "100%" in bar and " 4/4 " in bar, bar
    # complete: a second call reads the file and runs no model
    model.neck = None
    np.testing.assert_array_equal(np.array(features.extract_features(model, paths, 40, **kw)), full)


def test_predict_cli_writes_submission_in_sample_order(stage1, tmp_path):
    d = stage1["data"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": TINY_BACKBONE, "checkpoint": stage1["checkpoint"],
                                            "image_size": 40}] * 2}))
    out = tmp_path / "sub.csv"
    res = predict.main(["--data-dir", d, "--train-csv", os.path.join(d, "train_competition.csv"),
                        "--idx2landmark", os.path.join(d, "idx2landmark_id.pkl"), "--spec", str(spec),
                        "--out", str(out), "--device", "cpu", "--batch-size", "16", "--num-workers", "0",
                        "--cache-dir", str(tmp_path / "cache"), "--write-parts"])
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    sample = pd.read_csv(os.path.join(d, "sample_submission.csv"))
    assert list(sub["id"]) == list(sample["id"])
    with open(os.path.join(d, "idx2landmark_id.pkl"), "rb") as f:
        classes = set(pickle.load(f).values())
    for v in sub["landmarks"]:
        lid, conf = v.split()
        assert int(lid) in classes and float(conf) == float(conf)
    assert os.path.exists(tmp_path / "sub_classifier.csv") and os.path.exists(tmp_path / "sub_retrieval.csv")
    # neighbour similarities are cosines, best first
    sims, nn_l = res["neighbours"]
    assert np.all(sims[:, :-1] >= sims[:, 1:] - 1e-6) and np.all(sims <= 1 + 1e-5)
    gap, _ = evaluate.evaluate(str(out), os.path.join(d, "solution.csv"))
    assert 0 <= gap <= 1


def test_notebook_runs_end_to_end(stage1, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient
    d = stage1["data"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": TINY_BACKBONE, "checkpoint": stage1["checkpoint"],
                                            "image_size": 40}]}))
    nb = nbformat.read(os.path.join(ROOT, "submission.ipynb"), as_version=4)
    i = next(n for n, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    out = tmp_path / "submission.csv"
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(
        f"REPO_DIR = {ROOT!r}\nDATA_DIR = {d!r}\nTRAIN_CSV = {os.path.join(d, 'train_competition.csv')!r}\n"
        f"IDX2LANDMARK = {os.path.join(d, 'idx2landmark_id.pkl')!r}\nSPEC = {str(spec)!r}\nOUT = {str(out)!r}\n"
        f"DEVICE = 'cpu'\nNUM_WORKERS = 0\n"))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    sub = pd.read_csv(out)
    assert list(sub["id"]) == list(pd.read_csv(os.path.join(d, "sample_submission.csv"))["id"])
    evaluate.evaluate(str(out), os.path.join(d, "solution.csv"))  # parses: every row well formed


def test_non_landmark_flags_closed_form():
    # 2-d embeddings: landmarks near the x axis, non-landmarks near the y axis
    def unit(a):
        return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)
    q = unit(np.array([0.0, 0.1, 1.5, 1.4, 0.8]))
    s_lm = np.array([0.99, 0.98, 0.30, 0.50, 0.90])   # cosine to each query's best gallery image
    nl = unit(np.array([1.55, 1.45, 1.5]))
    flags, s_nl = retrieval.non_landmark_flags(q, s_lm, nl, k=2)
    want = np.sort(q @ nl.T, axis=1)[:, ::-1][:, :2].mean(1)
    np.testing.assert_allclose(s_nl, want, rtol=1e-5)
    np.testing.assert_array_equal(flags, want > s_lm)
    assert flags.tolist() == [False, False, True, True, False]
    # mined from the queries: the 2 least-close queries form the set, never matching themselves
    flags, s_nl = retrieval.non_landmark_flags(q, s_lm, None, mine_frac=0.4, k=1)
    assert s_nl[2] == pytest.approx(float(q[2] @ q[3]), rel=1e-5) and s_nl[3] == pytest.approx(float(q[3] @ q[2]))
    conf = np.array([1e-3, 1e-80, 0.5, 1e-20, 1e-5])
    out = retrieval.apply_non_landmark(conf, np.array([False, False, True, True, False]))
    assert out.max() == 1e-3 and out[2] < 1e-80 and out[3] < out[2]  # below all others, order kept


def test_non_landmark_handling_measured_on_synthetic(trained, tmp_path):
    """GAP with and without, on the synthetic non-landmark queries: flagged queries
    are mostly non-landmarks, and sinking them does not lower the GAP."""
    d = trained["data"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{k: trained[k] for k in ("enet_type", "checkpoint", "image_size")}]}))
    truth = evaluate.read_solution(os.path.join(d, "solution.csv"))
    is_nl = np.array([truth[i] is None for i in pd.read_csv(os.path.join(d, "sample_submission.csv"))["id"]])
    report = {}
    for mode in ("auto", os.path.join(d, "non_landmark.csv")):
        res = predict.run(predict.options(data_dir=d, train_csv=os.path.join(d, "train_competition.csv"),
                                          idx2landmark=os.path.join(d, "idx2landmark_id.pkl"), spec=str(spec),
                                          device="cpu", num_workers=0, non_landmark=mode))
        ids = res["ids"]
        gap = [evaluate.global_average_precision_score(truth, dict(zip(ids, zip(*res[k]))))
               for k in ("ensemble", "ensemble_nl")]
        flags, s_nl = res["nl_flags"], res["nl_similarity"]
        report[os.path.basename(mode)] = {"gap": gap, "flagged": int(flags.sum()),
                                          "flagged non-landmarks": int((flags & is_nl).sum())}
        # what is sunk is mostly non-landmarks, and sinking it does not cost GAP
        assert (flags & is_nl).sum() >= (flags & ~is_nl).sum()
        assert gap[1] >= gap[0] - 0.01
        if mode != "auto":
            # the known set is clutter: clutter queries are closer to it than landmark queries are
            clutter = is_nl & np.array([synthetic.non_landmark_kind(q) == "clutter" for q in range(len(ids))])
            assert s_nl[clutter].mean() > s_nl[~is_nl].mean()
            assert flags.sum() > 0
    print(report)


def test_classifier_topk_averages_models_across_chunks():
    from models import ArcMarginProductSubcenter
    torch.manual_seed(0)
    heads = [ArcMarginProductSubcenter(512, 50), ArcMarginProductSubcenter(512, 50)]
    zs = [np.random.default_rng(i).normal(size=(10, 512)).astype(np.float32) for i in range(2)]
    present = np.arange(50) % 7 != 0
    s, i = retrieval.classifier_topk(zs, heads, present, k=5, chunk=3)
    with torch.no_grad():
        cos = (heads[0](torch.tensor(zs[0])) + heads[1](torch.tensor(zs[1]))) / 2
    want = cos.numpy() + present - 1.0
    np.testing.assert_array_equal(i, np.argsort(-want, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(s, np.take_along_axis(want, i, 1), rtol=1e-5, atol=1e-6)


def test_extraction_precision(stage1, tmp_path):
    """--precision: fp32 (the default, as the original notebook) is the plain
    float32 forward; bf16 runs the backbone under autocast: close, not equal;
    the cache keeps the precisions apart."""
    d = stage1["data"]
    model = ensemble.load_model(TINY_BACKBONE, stage1["checkpoint"])
    ids = pd.read_csv(os.path.join(d, "train_competition.csv"))["id"].tolist()[:8]
    paths = [os.path.join(d, "train", i[0], i[1], i[2], f"{i}.jpg") for i in ids]
    how = {p: features.Extraction(torch.device("cpu"), batch_size=4, num_workers=0, precision=p) for p in features.PRECISIONS}
    with torch.no_grad():
        x = torch.stack([dataset.LandmarkDataset(pd.DataFrame({"filepath": paths}), "", "test",
                                                 dataset.get_transforms(40, model.preprocessing["interpolation"])[1])[i]
                         for i in range(8)])
        want = model.neck(x).numpy()
    fp32 = features.extract_features(model, paths, 40, features.Extraction(torch.device("cpu"), 4, 0))
    np.testing.assert_allclose(fp32, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(features.extract_features(model, paths, 40, how["fp32"]), fp32)
    bf16 = features.extract_features(model, paths, 40, how["bf16"])
    assert bf16.dtype == np.float32 and not np.allclose(bf16, fp32, rtol=1e-4, atol=1e-5)
    cos = (bf16 * fp32).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cos.min() > 0.99
    ck = stage1["checkpoint"]
    keys = {features.cache_key(ck, 40, "ids", p) for p in ("fp32", "bf16", "fp16")}
    assert len(keys) == 3 and features.cache_key(ck, 40, "ids") == features.cache_key(ck, 40, "ids", "fp32")
    assert predict.parse_args(["--data-dir", "D", "--train-csv", "t", "--idx2landmark", "i",
                               "--spec", "s"]).precision == "fp32"
    with pytest.raises(SystemExit):
        predict.parse_args(["--data-dir", "D", "--train-csv", "t", "--idx2landmark", "i", "--spec", "s",
                            "--precision", "fp8"])


def test_check_models_maps_checkpoints_and_reads_legacy_files(tmp_path, monkeypatch):
    """check_models reads shapes from memory-mapped checkpoints (the weights stay on disk); a file in
    torch's pre-1.6 format, which cannot be mapped, is read in full and checked the same."""
    import zipfile

    import util
    torch.manual_seed(0)
    m = build_model(TINY_BACKBONE, out_dim=7)
    sd = {f"module.{k}": v for k, v in m.state_dict().items()}
    torch.save({"model_state_dict": sd}, tmp_path / "zip.pth")
    torch.save({"model_state_dict": sd}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert zipfile.is_zipfile(tmp_path / "zip.pth") and not zipfile.is_zipfile(tmp_path / "legacy.pth")
    seen = []
    real = torch.load
    monkeypatch.setattr(util.torch, "load", lambda *a, **kw: seen.append(kw.get("mmap")) or real(*a, **kw))
    models = [{"enet_type": TINY_BACKBONE, "checkpoint": str(tmp_path / f), "image_size": 32}
              for f in ("zip.pth", "legacy.pth")]
    paths, n, _, _ = ensemble.check_models(models, str(tmp_path), None, None)
    assert n == 7 and paths == [str(tmp_path / "zip.pth"), str(tmp_path / "legacy.pth")] and seen == [True, False]
    sd_zip, _ = util.load_checkpoint(str(tmp_path / "zip.pth"), mmap=True)
    sd_legacy, _ = util.load_checkpoint(str(tmp_path / "legacy.pth"), mmap=True)
    assert all(torch.equal(sd_zip[k], sd_legacy[k]) for k in sd_zip)
    with pytest.raises(util.UserError, match="the model has 7 classes but"):
        ensemble.check_models(models[:1], str(tmp_path), 8, "idx2landmark_id.json")
