"""The calibrated confidence and the "unknown" answer: the fit against a direct one, the held-out answers
really held out, the threshold in predictions.csv and the report, the index keeping (and refusing) the
calibration, the GLDv2 submission unchanged without --calibrate."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

import calibration as cal
import predict
from retrieval import TOP_K


def _logistic_direct(x, y, c=1.0, iters=50, weight=None):
    """L2-penalised logistic regression (the intercept free), each sample's loss times its weight, by
    Newton's method on standardised x."""
    z = (x - x.mean(0)) / x.std(0)
    a = np.hstack([z, np.ones((len(z), 1))])
    s = np.ones(len(y)) if weight is None else np.asarray(weight, np.float64)
    w = np.zeros(a.shape[1])
    penalty = np.diag([1.0 / c] * z.shape[1] + [0.0])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-a @ w))
        grad = a.T @ (s * (p - y)) + penalty @ w
        hess = a.T @ (a * (s * p * (1 - p))[:, None]) + penalty
        w -= np.linalg.solve(hess, grad)
    return 1 / (1 + np.exp(-a @ w))


def test_fit_equals_a_direct_logistic_regression():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)) * [1.0, 0.1, 5.0] + [0.5, 0.0, -2.0]
    y = (rng.random(400) < 1 / (1 + np.exp(-(2 * x[:, 0] - 10 * x[:, 1])))).astype(int)
    c = cal.fit(x, y, ("a", "b", "c"))
    np.testing.assert_allclose(c(x), _logistic_direct(x, y), atol=2e-4)
    assert c.samples == 400 and c.right == pytest.approx(y.mean())
    # kept as JSON and read back: the same map
    again = cal.Calibration.from_dict(json.loads(json.dumps(c.as_dict())))
    np.testing.assert_array_equal(again(x), c(x))
    # one class only: the constant share
    only = cal.fit(x, np.ones(400, int), ("a", "b", "c"))
    assert np.allclose(only(x), 1 - 1e-6)


def test_prior_weights_and_the_weighted_fit():
    """The answers of unknown places weigh `share` of the whole; the weighted fit is a direct weighted
    logistic regression, and its intercept's score equation holds: the weighted mean confidence is the
    weighted share of right answers, (1 - share) times the known answers' rate of right ones."""
    unknown = np.array([True, True, False, False, False, False])
    w = cal.prior_weights(unknown, 0.5)
    np.testing.assert_allclose(w, [1.5, 1.5, 0.75, 0.75, 0.75, 0.75])
    w = cal.prior_weights(unknown, 0.2)
    assert w.mean() == pytest.approx(1) and w[unknown].sum() / w.sum() == pytest.approx(0.2)
    assert cal.prior_weights(np.zeros(3, bool), 0.3) is None and cal.prior_weights(np.ones(3, bool), 0.3) is None
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 2))
    kind = np.arange(300) >= 100  # 100 known, 200 unknown answers
    y = (~kind & (rng.random(300) < 1 / (1 + np.exp(-2 * x[:, 0])))).astype(int)
    for share in (0.5, 0.25):
        w = cal.prior_weights(kind, share)
        c = cal.fit(x, y, ("a", "b"), weight=w)
        np.testing.assert_allclose(c(x), _logistic_direct(x, y, weight=w), atol=2e-4)
        # known answers right at rate r: weighted mean confidence (1 - share) r
        r = y[~kind].mean()
        assert np.average(c(x), weights=w) == pytest.approx((1 - share) * r, abs=1e-4)


def test_expected_calibration_error_by_hand():
    p = np.array([0.05, 0.15, 0.15, 0.95, 0.95, 0.95, 0.95])
    right = np.array([0, 1, 0, 1, 1, 1, 0])
    # bins: [0, .1): 1 answer, conf .05, right 0; [.1, .2): 2, conf .15, right .5; [.9, 1]: 4, conf .95, right .75
    want = (1 * abs(0 - 0.05) + 2 * abs(0.5 - 0.15) + 4 * abs(0.75 - 0.95)) / 7
    assert cal.expected_calibration_error(p, right) == pytest.approx(want)


def test_ece_noise_floor_against_the_binomial():
    """Answers of one confidence fill one bin: a perfect calibration's ECE is E|K/n - p| for K of
    Binomial(n, p), computed from its probabilities."""
    from scipy.stats import binom
    for n, q in ((10, 0.5), (40, 0.73)):
        k = np.arange(n + 1)
        want = float((binom.pmf(k, n, q) * abs(k / n - q)).sum())
        assert cal.ece_noise_floor(np.full(n, q), draws=5000) == pytest.approx(want, rel=0.05)  # ~4 standard errors


def test_answer_features_by_hand():
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.8, 0.7, 0.6, -np.inf]])
    nn_l = np.array([[3, 4, 3, 3, 4], [3, 3, 3, 3, 3]])
    typical = cal.Typical({3: 0.8, 4: 0.6}, 0.7)
    x = cal.answer_features(sims, nn_l, [3, 3], [0.9, 0.9], typical)
    np.testing.assert_allclose(x[0], [0.9, 0.9 - 0.8, 3 / 5, 3.5 / 5, 0.8])
    # all name it: the margin over the last neighbour; an empty slot counts in neither votes nor mean
    np.testing.assert_allclose(x[1], [0.9, 0.9 - 0.6, 1.0, 3.0 / 4, 0.8])
    # a landmark of one photo (none in values) and no answer: the default
    np.testing.assert_allclose(cal.answer_features(sims, nn_l, [9, None], [0.9, 0.9], typical)[:, 4], [0.7, 0.7])
    cls = (np.array([[0.7, 0.2], [0.4, 0.1]]), np.array([[5, 3], [5, 6]]))
    x = cal.answer_features(sims, nn_l, [3, 3], [1e-20, 0.5], typical, cls)
    k = len(cal.FEATURES)
    np.testing.assert_allclose(x[:, k:], [[0.2, -20.0], [0.1, np.log10(0.5)]])  # not in its top k: the lowest
    # the vote share counts as many places as the landmark has photos (at most 5), one fewer for a gallery
    # photo asked without itself and answered with its own landmark
    counted = cal.Typical({3: 0.8, 4: 0.6}, 0.7, {3: 4, 4: 9})
    x = cal.answer_features(sims, nn_l, [3, 4], [0.9, 0.9], counted)
    np.testing.assert_allclose(x[:, 2], [3 / 4, 0.0])
    x = cal.answer_features(sims[:1], nn_l[:1], [4], [0.9], counted)
    np.testing.assert_allclose(x[0, 2], 2 / 5)
    x = cal.answer_features(sims[:1], nn_l[:1], [3], [0.9], cal.Typical({}, 0.7, {3: 3}))
    np.testing.assert_allclose(x[0, 2], 3 / 3)
    two = np.array([[3, 4, 4, 4, 4]])  # one of a landmark of 2 photos, asked without one of them
    x = cal.answer_features(sims[:1], two, [3], [0.9], cal.Typical({}, 0.7, {3: 2}), left_out=[True])
    np.testing.assert_allclose(x[0, 2], 1.0)
    np.testing.assert_allclose(cal.answer_features(sims[:1], two, [3], [0.9], cal.Typical({}, 0.7, {3: 2}))[0, 2], 0.5)


def test_typical_by_hand():
    """Typical: per landmark the mean of each photo's best cosine to another of its photos, with the
    mean of two models' inner products; unreadable rows left out, and landmarks of fewer than
    TYPICAL_MIN (3) readable photos (they take the default); capped."""
    rng = np.random.default_rng(0)
    labels = np.array([5, 7, 5, 5, 7, 9, 7, 5])
    g = [rng.normal(size=(8, 4)), rng.normal(size=(8, 3))]
    g = [(a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32) for a in g]
    g[0][4] = np.nan  # an unreadable photo of landmark 7: 2 readable photos left
    g[1][4] = np.nan
    t = cal.typical_of(g, labels)

    def sim(i, j):
        return (g[0][i] @ g[0][j] + g[1][i] @ g[1][j]) / 2
    five = [0, 2, 3, 7]
    want5 = np.mean([max(sim(i, j) for j in five if j != i) for i in five])
    assert cal.TYPICAL_MIN == 3 and t.values.keys() == {5} and t.values[5] == pytest.approx(want5)
    assert t.default == pytest.approx(want5) and t.of([7, 9])[0] == pytest.approx(want5)
    assert t.counts == {5: 4, 7: 2, 9: 1}  # readable photos per landmark
    capped = cal.typical_of(g, labels, cap=3)  # the first three photos of each landmark
    want3 = np.mean([max(sim(0, 2), sim(0, 3)), max(sim(2, 0), sim(2, 3)), max(sim(3, 0), sim(3, 2))])
    assert capped.values[5] == pytest.approx(want3)


def _clustered(n_landmarks=12, per=6, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_landmarks, dim))
    labels = np.repeat(np.arange(n_landmarks) + 100, per)
    g = centres[labels - 100] + 0.6 * rng.normal(size=(len(labels), dim))
    return [(g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)], labels


def test_held_out_answers_exclude_the_photo_or_its_landmark():
    g, labels = _clustered()
    rows = np.arange(0, len(labels), 3)
    sims, nn, usable = cal.held_out(g, labels, rows, leave_landmark=False)
    assert usable.all() and not (nn == rows[:, None]).any()
    assert (labels[nn[:, 0]] == labels[rows]).mean() > 0.5  # its own landmark's other photos are there
    # the next best after itself: the exact top 6 without row itself
    full = g[0][rows] @ g[0].T
    for i, r in enumerate(rows):
        order = [j for j in np.argsort(-full[i], kind="stable") if j != r][:TOP_K]
        np.testing.assert_array_equal(nn[i], order)
    sims, nn, usable = cal.held_out(g, labels, rows, leave_landmark=True)
    assert usable.all() and not (labels[nn] == labels[rows][:, None]).any() and np.isfinite(sims).all()
    # a landmark of more photos than the cap is not left out whole: not usable
    _, _, usable = cal.held_out(g, labels, rows, leave_landmark=True, cap=5)
    assert not usable.any()


def test_held_out_vote_share_counts_the_photos_left():
    """Two photos a landmark: asked without itself, a photo answered with its own landmark has one photo of
    it left (share 1 when it is among the neighbours); asked without its landmark, the answer's two photos."""
    g, labels = _clustered(per=2)
    rows = np.arange(len(labels))
    x, right, _ = cal.held_out_answers(g, labels, rows)
    n = len(rows)
    own = right[:n] == 1
    assert own.sum() > 5 and (x[:n][own, 2] == 1.0).all()
    sims, nn, _ = cal.held_out(g, labels, rows, leave_landmark=True)
    named = (labels[nn] == labels[nn[:, :1]]).sum(1)
    np.testing.assert_allclose(x[n:, 2], named / 2)


def test_held_out_classifier_answers_drop_their_own_class():
    g, labels = _clustered()

    class Head(torch.nn.Module):  # cosines to the landmarks' centres: a classifier that knows them all
        def __init__(self, emb, lab):
            super().__init__()
            self.w = torch.stack([torch.as_tensor(emb[lab == v].mean(0)) for v in np.unique(lab)])

        def forward(self, x):
            return torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(self.w).T

    heads = [Head(g[0], labels)]
    idx2lid = {i: int(v) for i, v in enumerate(np.unique(labels))}
    rows = np.arange(len(labels))
    x, right, unknown = cal.held_out_answers(g, labels, rows, (heads, idx2lid))
    n = len(rows)
    k = len(cal.FEATURES)  # the classifier's cosine follows the retrieval features
    assert x.shape == (2 * n, k + 2) and right[n:].sum() == 0 and right[:n].mean() > 0.8
    # leave-landmark-out: the classifier's own class masked, its cosine is another class's (below the own one)
    own_cls = x[:n, k]
    assert (x[n:, k] < own_cls).mean() > 0.9
    assert unknown.sum() == n and unknown[n:].all()
    c = cal.learn(g, labels, (heads, idx2lid), sample=50)
    assert c.features == list(cal.FEATURES + cal.CLS_FEATURES) and c.samples == 100
    assert c.unknown_share == cal.UNKNOWN_SHARE_TRAINED == 0.5  # a trained model's default prior
    p = c(x)
    assert p[:n][right[:n] == 1].mean() > 0.7 > 0.3 > p[n:].mean()


def test_held_out_refit_answers_in_a_space_learnt_without_them():
    """held_out_refit: every group is answered in a space learnt without it (leave-one-out: without its
    photos; leave-landmark-out: without every photo of its landmarks), and with a space that does not
    depend on what it learns from, the answers are held_out's."""
    g, labels = _clustered()
    rows = np.arange(0, len(labels), 2)
    seen = []

    def refit(keep):
        seen.append(keep.copy())
        return g

    for leave_landmark in (False, True):
        seen.clear()
        got = cal.held_out_refit(refit, labels, rows, leave_landmark)
        ref = cal.held_out(g, labels, rows, leave_landmark)
        np.testing.assert_allclose(got[0], ref[0], atol=1e-6)  # float32 products, summed in other chunks
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_array_equal(got[2], ref[2])
        assert len(seen) == cal.FOLDS
        answered = np.zeros(len(labels), bool)
        for keep in seen:
            out = ~keep
            if leave_landmark:  # whole landmarks out, and each of them a landmark of the sample
                assert np.array_equal(out, np.isin(labels, labels[out])) and set(labels[out]) <= set(labels[rows])
            else:
                assert set(np.flatnonzero(out)) <= set(rows)
            answered |= out
        # the groups cover the sample
        assert set(rows) <= set(np.flatnonzero(answered))
    # a space that learns: its learn_within_whitening from the kept rows alone
    from retrieval import learn_within_whitening, learned_whitened
    sims, nn, _ = cal.held_out_refit(lambda keep: [learned_whitened(g[0], learn_within_whitening(g[0][keep],
                                                                                                 labels[keep]))],
                                     labels, rows[:1], False)
    keep = np.ones(len(labels), bool)
    keep[rows[0]] = False  # one row: the only member of its fold
    direct = learned_whitened(g[0], learn_within_whitening(g[0][keep], labels[keep]))
    s = direct[rows[0]] @ direct.T
    s[rows[0]] = -np.inf
    np.testing.assert_array_equal(nn[0], np.argsort(-s, kind="stable")[:TOP_K])
    np.testing.assert_allclose(sims[0], np.sort(s)[::-1][:TOP_K], rtol=1e-5)


def test_learned_whitening_by_hand():
    """learn_within_whitening whitens the shrunk scatter of the photos about their landmark's mean (computed
    here from its definition), and learned_whitened compares by the mean of that space's cosine and the raw
    cosine (the whitened cosine computed with scipy's inverse square root: any rotation gives it)."""
    from scipy.linalg import fractional_matrix_power
    from retrieval import LEARNED_SHRINK, learn_within_whitening, learned_whitened
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 8)) + 3 * rng.normal(size=(1, 8))
    labels = np.r_[np.repeat([1, 2, 3, 4, 5], 7), [6, 7, 8, 9, 10]]  # five landmarks of one photo: no scatter
    x[-1] = np.nan  # unreadable
    P, m = learn_within_whitening(x, labels)
    u = x[:-1] / np.linalg.norm(x[:-1], axis=1, keepdims=True)
    lab = labels[:-1]
    d = np.concatenate([u[lab == v] - u[lab == v].mean(0) for v in (1, 2, 3, 4, 5)])
    scatter = d.T @ d / len(d)
    blended = (1 - LEARNED_SHRINK) * scatter + LEARNED_SHRINK * np.trace(scatter) / 8 * np.eye(8)
    np.testing.assert_allclose(P @ blended @ P.T, np.eye(8), atol=1e-9)
    np.testing.assert_allclose(m, u.mean(0), atol=1e-12)
    q = rng.normal(size=(3, 8))
    e = learned_whitened(np.r_[q, x], (P, m))
    assert np.isnan(e[-1]).all() and np.isfinite(e[:-1]).all()
    root = fractional_matrix_power(blended, -0.5).real
    def cos(a, b):
        a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
        return a @ b.T
    qu = q / np.linalg.norm(q, axis=1, keepdims=True)
    want = 0.5 * cos((qu - m) @ root, (u - m) @ root) + 0.5 * cos(qu, u)
    np.testing.assert_allclose(e[:3] @ e[3:-1].T, want, atol=1e-5)


def test_learned_whitening_without_scatter():
    """Landmarks of one photo each (no scatter to learn), or nothing to learn from (a refit leaving every
    photo out): the whitening is a scaled rotation about the mean, and the space compares as the centred
    cosine and the raw one."""
    from retrieval import learn_within_whitening, learned_whitened
    x = np.random.default_rng(4).normal(size=(6, 5))
    P, m = learn_within_whitening(x, np.arange(6))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(P @ P.T, np.eye(5) * (P @ P.T)[0, 0], atol=1e-9)  # a multiple of a rotation
    np.testing.assert_allclose(m, u.mean(0), atol=1e-12)
    e = learned_whitened(x, (P, m))
    c = (u - m) / np.linalg.norm(u - m, axis=1, keepdims=True)
    np.testing.assert_allclose(e @ e.T, 0.5 * c @ c.T + 0.5 * u @ u.T, atol=1e-5)
    P, m = learn_within_whitening(x[:0], np.arange(0))
    assert np.isfinite(P).all() and not m.any()


# ---------------------------------------------------------------- through predict.py

def _run(ph, tmp, *extra, out="pred.csv"):
    path = str(tmp / out)
    res = predict.main(["--spec", ph["spec"], "--query-dir", ph["queries"], "--idx2landmark", ph["labels"],
                        "--out", path, "--device", "cpu", "--num-workers", "0", *extra])
    return pd.read_csv(path, keep_default_na=False, dtype={"landmark": str, "guess": str}), res


def test_unknown_below_the_threshold_and_the_index_keeps_the_calibration(photos, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    df, res = _run(photos, tmp_path, "--gallery-dir", photos["gallery"], "--save-index", idx, "--report",
                   str(tmp_path / "r.html"), "--min-confidence", "0.6")
    out = capsys.readouterr().out  # a trained model: the prior of one in two (calibration.UNKNOWN_SHARE_TRAINED)
    assert "confidence calibrated on" in out and "prior: 50% of photos show places" in out
    assert list(df.columns) == ["path", "landmark", "guess", "confidence", "neighbours"]
    p = res["calibrated"]
    np.testing.assert_allclose(df["confidence"], p)
    assert ((p >= 0) & (p <= 1)).all() and (df["guess"] != "").all()
    sure = df["confidence"] >= 0.6
    assert (df["landmark"][sure] == df["guess"][sure]).all() and (df["landmark"][~sure] == "").all()
    # the report counts and marks them
    html = open(tmp_path / "r.html", encoding="utf-8").read()
    assert f"{int(sure.sum())} answered, {int((~sure).sum())} not sure" in html
    assert html.count('class="unsure"') == min(int((~sure).sum()), len(df))
    # the index keeps the calibration: used again, not learnt again, with the same answers
    meta = json.load(open(idx + ".json"))
    assert meta["calibration"]["fit"]["samples"] == res_samples(meta) and meta["calibration"]["key"]["sample"] == cal.SAMPLE
    again, _ = _run(photos, tmp_path, "--index", idx, "--min-confidence", "0.6", out="again.csv")
    assert "confidence calibrated on" not in capsys.readouterr().out
    assert list(again["landmark"]) == list(df["landmark"])
    # another re-ranking: the saved calibration does not fit, it is learnt again
    _run(photos, tmp_path, "--index", idx, "--rerank-cls-power", "2", out="other.csv")
    assert "confidence calibrated on" in capsys.readouterr().out
    # another prior: learnt again, said in the log; a more cautious one answers with less confidence
    mid, _ = _run(photos, tmp_path, "--index", idx, "--unknown-share", "0.6", out="mid.csv")
    assert "prior: 60% of photos show places" in capsys.readouterr().out
    assert mid["confidence"].mean() < again["confidence"].mean() - 0.02
    from util import UserError
    with pytest.raises(UserError, match="--unknown-share 1.0: a share of the photos"):
        _run(photos, tmp_path, "--index", idx, "--unknown-share", "1")
    # thresholds 0 and 1: everything answered, nothing answered
    all_, _ = _run(photos, tmp_path, "--index", idx, "--min-confidence", "0", out="all.csv")
    none, _ = _run(photos, tmp_path, "--index", idx, "--min-confidence", "1", out="none.csv")
    assert (all_["landmark"] == all_["guess"]).all() and (none["landmark"] == "").all()
    # --no-calibrate: the raw re-ranked score, as before
    raw, res = _run(photos, tmp_path, "--index", idx, "--no-calibrate", out="raw.csv")
    assert list(raw.columns) == ["path", "landmark", "confidence", "neighbours"]
    np.testing.assert_allclose(raw["confidence"], res["ensemble"][1])


def res_samples(meta):
    """The calibration's sample: two answers of each sampled gallery photo (at most SAMPLE photos)."""
    return 2 * min(cal.SAMPLE, len(meta["paths"]))


def test_gldv2_submission_is_the_original_without_calibrate(stage1, tmp_path):
    d = stage1["data"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": [{"enet_type": "mobilenetv3_small_050", "checkpoint": stage1["checkpoint"],
                                            "image_size": 40}]}))
    base = ["--data-dir", d, "--train-csv", os.path.join(d, "train_competition.csv"), "--idx2landmark",
            os.path.join(d, "idx2landmark_id.json"), "--spec", str(spec), "--cache-dir", str(tmp_path / "c"),
            "--num-workers", "0", "--device", "cpu"]
    plain = predict.main(base + ["--out", str(tmp_path / "plain.csv")])
    assert "calibrated" not in plain
    sub = pd.read_csv(tmp_path / "plain.csv", keep_default_na=False)
    want = predict.format_submission(plain["ids"], *plain["ensemble"])
    assert list(sub["landmarks"]) == list(want["landmarks"])
    calibrated = predict.main(base + ["--out", str(tmp_path / "cal.csv"), "--calibrate"])
    sub2 = pd.read_csv(tmp_path / "cal.csv", keep_default_na=False)
    # the same guesses, every one kept, with probabilities as confidences
    assert [s.split()[0] for s in sub2["landmarks"]] == [s.split()[0] for s in sub["landmarks"]]
    conf = np.array([float(s.split()[1]) for s in sub2["landmarks"]])
    np.testing.assert_allclose(conf, calibrated["calibrated"])
    assert ((conf >= 0) & (conf <= 1)).all()
