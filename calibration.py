"""A calibrated confidence: the probability that an answer's landmark is right, learnt from the gallery alone.

Arrays in, arrays out (as retrieval.py). No labels beyond the gallery's own: a sample of gallery
photos is answered as queries twice,

- leave-one-out: against the gallery without the photo itself. Its answer can be right or wrong,
  as a query's of a place the gallery holds;
- leave-landmark-out: against the gallery without any photo of its landmark, and with the
  classifier's class of that landmark masked: the answer to a photo of a place the gallery does
  not hold, wrong by construction (the distractor a user meets).

A logistic regression (scikit-learn; Platt's scaling, generalised to a few features) maps the
features of each answer (answer_features: the cosine of the best neighbour of the answered
landmark, its margin over the best other landmark, the share of the neighbours that name it (of as
many as it has photos), the mean cosine of the neighbours, how alike the answered landmark's photos
are (Typical), with a classifier its cosine and the re-ranked score, and with --verify the inliers
of the answered landmark's neighbours above the noise of wrong answers) to P(right). The two kinds of sample
are weighed so that the leave-landmark-out answers carry a share of the whole (--unknown-share, 1/3
without training, 1/2 with a trained model: UNKNOWN_SHARE): the prior it learns, the share of
queries that show a place the gallery does not hold.
With --whiten learned (a space learnt from the gallery's landmarks), each group of the sample is
answered in a space learnt without it (held_out_refit).

A photo whose landmark has a single gallery photo cannot be answered right by leave-one-out: it
is a negative, as it should be (the gallery knows that place from nothing else).
"""
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from retrieval import CLS_TOP_K, TOP_K, classifier_topk, rerank, topk_cosine, unreadable_rows

SAMPLE = 1000  # gallery photos answered twice to learn the calibration: bounds its cost on large galleries
VERIFY_SAMPLE = 300  # with --verify: each of them verified against k neighbours twice (25-50 ms a pair on a CPU)
FEATURES = ("cosine", "margin", "vote_share", "neighbourhood", "typical")
TYPICAL_CAP = 50  # photos per landmark that set how alike its photos are: bounds the cost on GLDv2's landmarks
# A landmark's spread from at least 3 photos. Of 2, it is their cosine to each other: a gallery photo asked
# without itself is answered at that very cosine, and the fit learnt from a feature that equals the answer
# (realhard, 2 a landmark, 10 splits: 10.5 % of the distractors named against 4.9 %, precision 0.91 against
# 0.95; realdev the same: 2.0 against 1.3 %, coverage 0.85 against 0.82; from 3 photos up, unchanged).
TYPICAL_MIN = 3
CLS_FEATURES = ("cls_cosine", "log_score")
VERIFY_FEATURES = ("inliers",)
# The share of the fit the leave-landmark-out answers weigh (--unknown-share): the prior share of
# photos of places the gallery does not hold, and how hard those answers are beside real ones.
# Without training, one in three: they are the gallery's own look-alike landmarks, harder than most
# photos of other places, and at one in two the confidence was cautious on both real sets (realhard, 10
# splits: 82 % of the landmark photos answered at a precision of 0.99, no distractor; one in three:
# 86 % at 0.98, 0.7 % of the distractors, ECE 0.093 -> 0.075). With a trained model, one in two: it
# learnt the very photos left out, its leave-landmark-out answers are easy, and its confidence already
# leans high (realhard, `--recipe finetune`, seeds 0-2: one in three named 19 % of the distractors
# against 15 %, ECE 0.12 against 0.08). docs/transfer.md.
UNKNOWN_SHARE = 1 / 3
UNKNOWN_SHARE_TRAINED = 0.5
FOLDS = 5  # held_out_refit: the groups answered each in a space learnt without them
NOISE_QUANTILE = 95  # the inlier count wrong answers reach 95 % of the time: verification's noise floor


@dataclass
class Typical:
    """How alike each landmark's gallery photos are: values {landmark: the mean over its photos of
    each one's best cosine to another of its photos}, default (their mean) for a landmark of fewer
    than TYPICAL_MIN photos. A photo of a whole site, or of a place in other seasons, matches its own
    landmark's photos at a lower cosine than a photo of a facade does: this says which cosine is high for the
    landmark answered (on realhard, 10 splits, the distractors answered went from 5.1 to 3.7 % and
    the precision at 85 % coverage from 0.888 to 0.923, docs/transfer.md). counts: each landmark's
    readable photos, for the vote share (reachable)."""
    values: dict
    default: float
    counts: dict = field(default_factory=dict)  # readable gallery photos per landmark

    def of(self, landmarks):
        return np.array([self.values.get(v, self.default) if v is not None and v == v else self.default
                         for v in landmarks], np.float64)

    def reachable(self, landmarks, left_out=None):
        """How many of the TOP_K neighbours can name each landmark: its readable photos, at most TOP_K
        (TOP_K where counts are unknown). left_out (bool per answer): a gallery photo asked without
        itself and answered with its own landmark, which has one photo fewer for it."""
        n = np.array([self.counts.get(v, TOP_K) if v is not None and v == v else TOP_K for v in landmarks],
                     np.float64)
        if left_out is not None:
            n = n - np.asarray(left_out, bool)
        return np.clip(n, 1, TOP_K)


def typical_of(g_emb, g_labels, bad=None, cap=TYPICAL_CAP):
    """The Typical of a gallery (per model its compared unit vectors, its landmark ids; bad: its
    unreadable rows), with topk_cosine's similarity (the mean of the models' inner products): for
    each landmark of at least TYPICAL_MIN readable photos, its first `cap` of them compared with
    each other, each one's best cosine to another, averaged (the others take the default)."""
    labels = np.asarray(g_labels)
    bad = unreadable_rows(*g_emb) if bad is None else bad
    good = np.flatnonzero(~bad)
    order = good[np.argsort(labels[good], kind="stable")]
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    values = {}
    for a, b in zip(starts, np.r_[starts[1:], len(order)]):
        rows = order[a:min(b, a + cap)]
        if len(rows) < TYPICAL_MIN:
            continue
        vs = [np.asarray(g[rows], np.float64) for g in g_emb]  # each model's rows read once
        s = sum(v @ v.T for v in vs) / len(vs)
        np.fill_diagonal(s, -np.inf)
        values[labels[rows[0]].item()] = float(s.max(1).mean())
    lms, n = np.unique(labels[good], return_counts=True)
    return Typical(values, float(np.mean(list(values.values()))) if values else 0.0,
                   {k.item(): int(c) for k, c in zip(lms, n)})


def answer_features(sims, nn_l, landmarks, confidences, typical, cls=None, inl=None, left_out=None):
    """(Q, F) features of answers: per query the cosine of the best neighbour naming the answered
    landmark (0 when none does), its margin over the best neighbour of another landmark (or over
    the last neighbour when all name it), the share of the neighbours that name it among as many
    as could (its photos, at most TOP_K: typical.reachable, left_out as there; a landmark of two
    photos fills at most two of five places, and the gallery's photos asked without themselves
    have one photo fewer of their own landmark than a query meets. Counted over all five, 2
    photos a landmark answered 4-35 % of the landmark photos at 0.5 against 33-80 % so, ECE
    0.50-0.58 against 0.16-0.31, on realhard and realdev, 5 splits, docs/transfer.md), and the mean
    cosine of its neighbours (a photo close to everything, a street or a generic ruin, is less
    likely right at a given cosine: on realhard it cut the distractors answered from 7 to 5 %, 10
    splits, docs/transfer.md), and how alike the answered landmark's photos are (typical: a
    Typical); with cls
    = (cls_scores, cls_landmarks), the classifier's cosine of the answered landmark (its lowest
    top-k score when outside its top k) and log10 of the re-ranked score; with inl ((Q, k): the
    inliers of the first k neighbours, verify.py), the most inliers of a neighbour naming the
    answered landmark (raw: Calibration maps it above the noise floor)."""
    sims = np.asarray(sims, np.float64)
    nn_l = np.asarray(nn_l)
    ans = np.asarray([-1 if v is None or v != v else v for v in landmarks]).astype(np.int64)[:, None]
    finite = np.isfinite(sims)
    named = (nn_l == ans) & finite
    other = (nn_l != ans) & finite
    s = np.where(finite, sims, 0.0)
    s_ans = np.where(named.any(1), np.where(named, s, -np.inf).max(1), 0.0)
    last = np.where(finite, s, np.inf).min(1)
    s_other = np.where(other.any(1), np.where(other, s, -np.inf).max(1), np.where(finite.any(1), last, 0.0))
    n = np.maximum(finite.sum(1), 1)
    share = named.sum(1) / np.maximum(np.minimum(n, typical.reachable(landmarks, left_out)), 1)
    cols = [s_ans, s_ans - s_other, share, s.sum(1) / n, typical.of(landmarks)]
    if cls is not None:
        cls_s, cls_l = (np.asarray(a) for a in cls)
        hit = cls_l == ans
        cols += [np.where(hit.any(1), np.where(hit, cls_s, -np.inf).max(1), cls_s.min(1)),
                 np.log10(np.clip(np.asarray(confidences, np.float64), 1e-300, None))]
    if inl is not None:
        inl = np.asarray(inl, np.float64)
        cols.append(np.where(named[:, :inl.shape[1]], inl, 0.0).max(1, initial=0.0))
    return np.stack(cols, 1)


def held_out(g_emb, g_labels, rows, leave_landmark, device="cpu", cap=256, bad=None):
    """The TOP_K neighbours (sims, gallery rows) of gallery `rows` as queries, each without
    itself (leave-one-out) or without every photo of its landmark (leave_landmark), and which
    rows could be answered so (a landmark of more than `cap` photos is not left out whole). bad:
    the gallery's unreadable rows when already known (retrieval.unreadable_rows)."""
    labels = np.asarray(g_labels)
    rows = np.asarray(rows)
    own = labels[rows]
    if leave_landmark:
        counts = dict(zip(*np.unique(labels, return_counts=True)))
        n_own = np.array([counts[v] for v in own])
        usable = n_own <= cap
        extra = int(n_own[usable].max()) if usable.any() else 1
    else:
        usable, extra = np.ones(len(rows), bool), 1
    bad = unreadable_rows(*g_emb) if bad is None else bad
    q = [np.asarray(g[rows], np.float32) for g in g_emb]
    sims, nn = topk_cosine(q, g_emb, TOP_K + extra, device=device, exclude=bad if bad.any() else None)
    drop = (labels[nn] == own[:, None]) if leave_landmark else (nn == rows[:, None])
    order = np.argsort(drop, axis=1, kind="stable")[:, :TOP_K]  # the first TOP_K kept, in their order
    sims, nn = np.take_along_axis(sims, order, 1), np.take_along_axis(nn, order, 1)
    sims = np.where(np.take_along_axis(drop, order, 1), -np.inf, sims)  # too few left: empty slots
    return sims, nn, usable


def held_out_refit(refit, g_labels, rows, leave_landmark, device="cpu", bad=None):
    """held_out's (sims, nn, usable) of gallery `rows` when the space that compares photos is
    itself learnt from the gallery's landmarks (refit: keep, a bool per gallery row -> the gallery's
    side in the space learnt from those rows; ensemble.Space.refit). Each group of rows is answered
    in a space learnt without it: leave-one-out in FOLDS folds of the rows, leave-landmark-out in
    FOLDS groups of their landmarks, each without every photo of its landmarks. Answered in the
    space learnt from all, a held-out photo would meet a space that it and its landmark shaped, and
    its answers would not look like a query's (realhard, 10 splits: a calibration learnt so answered
    55 % of the landmark photos against 82 %, ECE 0.21 against 0.09, docs/transfer.md). Five
    groups of landmarks rather than one landmark at a time: as many refits at any gallery size,
    and on realhard the distractors answered 0 % against 2.3 %."""
    labels = np.asarray(g_labels)
    rows = np.asarray(rows)
    bad = np.zeros(len(labels), bool) if bad is None else bad
    pos = np.arange(len(rows))
    if leave_landmark:
        lms = np.unique(labels[rows])
        groups = [pos[np.isin(labels[rows], lms[i::FOLDS])] for i in range(FOLDS)]
    else:
        groups = [pos[i::FOLDS] for i in range(FOLDS)]
    sims = np.full((len(rows), TOP_K), -np.inf)
    nn = np.zeros((len(rows), TOP_K), np.int64)
    usable = np.zeros(len(rows), bool)
    for grp in groups:
        if not len(grp):
            continue
        learn_from = ~bad  # the space learns without the group's photos, or all of its landmarks'
        if leave_landmark:
            learn_from &= ~np.isin(labels, labels[rows[grp]])
        else:
            learn_from[rows[grp]] = False
        sims[grp], nn[grp], usable[grp] = held_out(refit(learn_from), labels, rows[grp], leave_landmark, device,
                                                   bad=bad)
    return sims, nn, usable


def held_out_answers(g_emb, g_labels, rows, classifier=None, rerank_with=("sum", 9, 10), device="cpu", bad=None,
                     verifier=None, typical=None, refit=None):
    """The features, labels (1: right) and kinds (True: asked without its landmark, a place the gallery
    does not hold) of the sample's leave-one-out and leave-landmark-out answers.
    classifier: (heads, idx2lid) of trained models, or None (retrieval alone answers). bad: as held_out.
    verifier: a verify.Verifier of the gallery, or None (no verification). typical: the gallery's
    Typical (default: typical_of it; the whole gallery's, the sampled photo included, as a query
    meets it). refit: a space learnt from the gallery's landmarks (held_out_refit), or None."""
    labels = np.asarray(g_labels)
    bad = unreadable_rows(*g_emb) if bad is None else bad  # one pass over the gallery, not one per kind
    typical = typical_of(g_emb, labels, bad) if typical is None else typical
    feats, right, unknown = [], [], []
    cls_all = None
    if classifier is not None:
        heads, idx2lid = classifier
        lid_of = np.array([idx2lid[i] for i in range(len(idx2lid))])
        present = np.isin(lid_of, np.unique(labels))
        # one more class than used: the leave-landmark-out answer drops its own
        cls_s, cls_i = classifier_topk([np.asarray(g[rows], np.float32) for g in g_emb], heads, present,
                                       k=CLS_TOP_K + 1, device=device)
        cls_all = (cls_s, lid_of[cls_i])
    for leave_landmark in (False, True):
        sims, nn, usable = (held_out(g_emb, labels, rows, leave_landmark, device, bad=bad) if refit is None else
                            held_out_refit(refit, labels, rows, leave_landmark, device, bad))
        own = labels[rows][usable]
        sims, nn_l = sims[usable], labels[nn[usable]]
        cls = None
        if cls_all is None:
            landmarks, conf = nn_l[:, 0], sims[:, 0]
        else:
            cls_s, cls_l = cls_all[0][usable], cls_all[1][usable]
            drop = (cls_l == own[:, None]) if leave_landmark else np.zeros(cls_l.shape, bool)
            order = np.argsort(drop, axis=1, kind="stable")[:, :CLS_TOP_K]
            cls = (np.take_along_axis(cls_s, order, 1), np.take_along_axis(cls_l, order, 1))
            vote, sim_power, cls_power = rerank_with
            landmarks, conf = rerank(sims, nn_l, *cls, sim_power, cls_power, vote=vote)
        inl = None
        if verifier is not None:  # empty slots (too few photos left) are not verified
            inl = verifier.gallery_inliers(rows[usable], np.where(np.isfinite(sims), nn[usable], -1))
        left_out = None if leave_landmark else np.asarray(landmarks) == own  # its own landmark, one photo fewer
        feats.append(answer_features(sims, nn_l, landmarks, conf, typical, cls, inl, left_out))
        right.append(np.zeros(len(own), bool) if leave_landmark else np.asarray(landmarks) == own)
        unknown.append(np.full(len(own), leave_landmark))
    return np.concatenate(feats), np.concatenate(right).astype(np.int64), np.concatenate(unknown)


def above_noise(x, names, floor):
    """answer_features x with its inliers column (if any) as log(1 + inliers above floor): eight matches
    fit a fundamental matrix whatever they are, so counts up to the noise floor say nothing, and 0
    (too few matches) says no more than the floor does."""
    x = np.array(x, np.float64)
    if "inliers" in names:
        c = list(names).index("inliers")
        x[:, c] = np.log1p(np.maximum(x[:, c] - floor, 0.0))
    return x


@dataclass
class Calibration:
    """P(right) = sigmoid(coef . (x - mean) / scale + intercept) of answer_features x (the inliers
    above inlier_floor, above_noise); what it was learnt on (samples, share right) is kept with it."""
    features: list
    mean: list
    scale: list
    coef: list
    intercept: float
    samples: int
    right: float
    inlier_floor: float = 0.0
    unknown_share: float = None  # the prior learn() weighed its answers with (prior_weights); None: fit alone

    def __call__(self, x):
        x = above_noise(x, self.features, self.inlier_floor)
        z = (x - self.mean) / self.scale @ np.asarray(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def as_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


def prior_weights(unknown, share):
    """Per-answer weights (mean 1) under which the answers of places the gallery does not hold
    (unknown: True) carry `share` of the whole and the others 1 - share: a logistic fit learns
    prior odds of (1 - share) / share that a photo shows a place the gallery holds (its mean
    confidence is the weighted share of right answers). None where either kind is missing."""
    unknown = np.asarray(unknown, bool)
    n_u, n_k = unknown.sum(), (~unknown).sum()
    if not n_u or not n_k:
        return None
    return np.where(unknown, share / n_u, (1 - share) / n_k) * len(unknown)


def fit(x, y, names, c=1.0, weight=None):
    """The logistic regression of labels y (1: right) on features x, standardised (scikit-learn's
    LogisticRegression, L2 strength 1/c), each answer's loss times its `weight` (None: alike; learn
    gives prior_weights). With one class only (a gallery too small to be wrong, or
    to be right), the constant share of right answers. An inliers column is taken above the count
    that NOISE_QUANTILE % of the wrong answers reach (above_noise)."""
    from sklearn.linear_model import LogisticRegression
    y = np.asarray(y, np.int64)
    floor = 0.0
    if "inliers" in names and (y == 0).any():
        floor = float(np.percentile(np.asarray(x, np.float64)[y == 0, list(names).index("inliers")], NOISE_QUANTILE))
    x = above_noise(x, names, floor)
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    share = float(y.mean()) if len(y) else 0.0
    if len(np.unique(y)) < 2:
        p = min(max(share, 1e-6), 1 - 1e-6)
        return Calibration(list(names), mean.tolist(), scale.tolist(), [0.0] * x.shape[1],
                           float(np.log(p / (1 - p))), len(y), share, floor)
    lr = LogisticRegression(C=c, max_iter=1000).fit((x - mean) / scale, y, sample_weight=weight)
    return Calibration(list(names), mean.tolist(), scale.tolist(), lr.coef_[0].tolist(), float(lr.intercept_[0]),
                       len(y), share, floor)


def feature_names(classifier, verifier):
    return FEATURES + (CLS_FEATURES if classifier else ()) + (VERIFY_FEATURES if verifier else ())


def default_unknown_share(trained):
    """--unknown-share's default: UNKNOWN_SHARE_TRAINED for trained models (a classifier), else UNKNOWN_SHARE."""
    return UNKNOWN_SHARE_TRAINED if trained else UNKNOWN_SHARE


def learn(g_emb, g_labels, classifier=None, rerank_with=("sum", 9, 10), device="cpu", sample=SAMPLE, seed=0,
          verifier=None, typical=None, refit=None, unknown_share=None):
    """The Calibration of a gallery (per model its compared embeddings, its landmark ids): a sample of
    at most `sample` readable photos (VERIFY_SAMPLE with a verifier), drawn with `seed`, answered by
    held_out_answers (typical, refit: as there), its answers of places the gallery does not hold
    weighing unknown_share of the whole (prior_weights; None: default_unknown_share)."""
    if unknown_share is None:
        unknown_share = default_unknown_share(classifier is not None)
    bad = unreadable_rows(*g_emb)
    good = np.flatnonzero(~bad)
    n = min(sample, VERIFY_SAMPLE) if verifier is not None else sample
    rows = np.sort(np.random.default_rng(seed).choice(good, min(n, len(good)), replace=False))
    x, y, unknown = held_out_answers(g_emb, g_labels, rows, classifier, rerank_with, device, bad, verifier, typical,
                                     refit)
    c = fit(x, y, feature_names(classifier is not None, verifier is not None),
            weight=prior_weights(unknown, unknown_share))
    return replace(c, unknown_share=unknown_share)


def expected_calibration_error(p, right, bins=10):
    """ECE: the mean over equal-width bins of |share right - mean confidence|, weighted by the bin's
    share of answers."""
    p, right = np.asarray(p, np.float64), np.asarray(right, np.float64)
    if not len(p):
        return 0.0
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(right[idx == b].mean() - p[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))


def ece_noise_floor(p, bins=10, draws=2000, seed=0):
    """The ECE a perfectly calibrated confidence scores on these answers: the mean of
    expected_calibration_error over outcomes drawn right with probability p. On a hundred answers
    it is about 0.05: a measured ECE near it cannot tell the calibration from a perfect one."""
    p = np.asarray(p, np.float64)
    rng = np.random.default_rng(seed)
    return float(np.mean([expected_calibration_error(p, rng.random(len(p)) < p, bins) for _ in range(draws)]))
