"""The metrics of the Google Landmark challenges, from their files.

    python evaluate.py --submission submission.csv --solution solution.csv [--metric gap|accuracy|map@100]

gap, accuracy (recognition, the 2020 competition's files):
  submission: id,landmarks with "<landmark_id> <confidence>" (or empty: no prediction).
  solution:   id,landmarks[,Usage] with the true landmark ids, space-separated when an image shows
              several (a prediction of any of them is right), empty for a non-landmark image.
  GAP: micro average precision over the predictions sorted by confidence, ties by query id
  ascending, then landmark id (Kaggle's convention); accuracy: share of the landmark queries
  whose prediction is right.
map@100 (the Google Landmark Retrieval challenges):
  submission: id,images with space-separated gallery ids, best first; the first 100 count.
  solution:   id,images[,Usage] with the relevant gallery ids.
  mAP@100 = mean over the solution's queries of 1/min(#relevant, 100) * sum_k P(k) rel(k), k <= 100;
  a query without a submitted row scores 0, a gallery id repeated in a row counts once.

Both reproduce Google's official GLDv2 metrics (tensorflow/models, research/delf/delf/python/
datasets/google_landmarks_dataset: metrics.py and dataset_file_io.py): rows of Usage "Ignored" do
not count and their predictions are skipped, --usage Public|Private scores those rows only, and a
submitted id that the solution lacks is refused. Deliberately different: a malformed row is
refused with its line number instead of a traceback, and blank ids in a retrieval row are not
gallery ids.
"""
import math
import os

import numpy as np
import pandas as pd

from util import ArgumentParser, UserError, run_main


# ---------------------------------------------------------------- GAP

def _truth_set(v):
    """A solution value as a set of landmarks: None or an empty collection is a non-landmark."""
    if v is None:
        return frozenset()
    if isinstance(v, (set, frozenset, list, tuple)):
        return frozenset(v)
    return frozenset((v,))


def global_average_precision_score(y_true, y_pred, ties="order"):
    """Global Average Precision (micro AP), the GLDv2 / Kaggle 2020 metric.

    y_true: {query: landmark, or a collection of landmarks (a prediction of any of
            them is right), or None / empty for a non-landmark query}, or a sequence.
    y_pred: {query: (landmark, confidence)}, or a sequence; queries without a
            prediction may be left out.

    GAP = 1/M * sum_i P(i) rel(i) over all predictions sorted by decreasing
    confidence, M = number of queries that have a landmark. A prediction on a
    non-landmark query is never relevant but still occupies its rank; a
    landmark query without prediction still counts in M.

    ties: "order" keeps y_pred's order among equal confidences (a stable sort:
    the original's validation number in train.py); "id" breaks them by query id
    ascending, then predicted landmark ascending, Kaggle's convention as in the
    official GLDv2 metrics (DELF's google_landmarks_dataset/metrics.py), which
    evaluate.py uses.
    """
    if not isinstance(y_true, dict):
        y_true = dict(enumerate(y_true))
    if not isinstance(y_pred, dict):
        y_pred = dict(enumerate(y_pred))
    m = sum(bool(_truth_set(v)) for v in y_true.values())
    if m == 0 or not y_pred:
        return 0.0
    keys = list(y_pred.keys())
    if ties == "id":
        keys.sort(key=lambda k: (k, y_pred[k][0]))
    elif ties != "order":
        raise ValueError(f"ties must be 'order' or 'id', not {ties!r}")
    conf = np.array([float(y_pred[k][1]) for k in keys], dtype=np.float64)
    order = np.argsort(-conf, kind="stable")
    rel = np.array([y_pred[keys[i]][0] in _truth_set(y_true.get(keys[i])) for i in order], dtype=np.float64)
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision * rel).sum() / m)



# ---------------------------------------------------------------- files

class SubmissionError(UserError, ValueError):
    """A malformed submission or solution file: one line, exit status 2."""


def _read(path):
    if not os.path.isfile(path):
        raise SubmissionError(f"{path}: no such file")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from e


def read_submission(path):
    """{id: (landmark_id, confidence)}; rows with empty landmarks make no prediction."""
    df = _read(path)
    if list(df.columns[:2]) != ["id", "landmarks"]:
        raise SubmissionError(f"{path}: expected header id,landmarks, got {','.join(df.columns)}")
    pred = {}
    for n, (i, v) in enumerate(zip(df["id"], df["landmarks"]), start=2):  # line 1 is the header
        parts = v.split()
        if not parts:
            continue
        try:
            if len(parts) != 2:
                raise ValueError
            lid, conf = int(parts[0]), float(parts[1])
            if math.isnan(conf):
                raise ValueError
        except ValueError:
            raise SubmissionError(f"{path}, line {n} (id {i}): landmarks must be '<landmark_id> <confidence>', "
                                  f"got {v!r}") from None
        if i in pred:
            raise SubmissionError(f"{path}, line {n}: id {i} appears twice")
        pred[i] = (lid, conf)
    return pred


def _usage_rows(df, path, usage):
    """The rows that count (Usage not Ignored; only `usage` when given) and the ids of
    all rows: the official reader's split into Public, Private and Ignored."""
    all_ids = set(df["id"])
    if "Usage" not in df.columns:
        if usage:
            raise SubmissionError(f"{path}: --usage {usage} needs a Usage column")
        return df, all_ids
    bad = sorted(set(df["Usage"]) - {"Public", "Private", "Ignored"})
    if bad:
        raise SubmissionError(f"{path}: Usage must be Public, Private or Ignored, got {bad[0]!r}")
    df = df[df["Usage"] != "Ignored"]
    return (df[df["Usage"] == usage] if usage else df), all_ids


def read_solution(path, usage=None, with_ids=False):
    """{id: frozenset of landmark ids, or None for a non-landmark image} of the rows
    that count; with_ids: also the ids of every row (Ignored and other usages too)."""
    df = _read(path)
    if list(df.columns[:2]) != ["id", "landmarks"]:
        raise SubmissionError(f"{path}: expected header id,landmarks[,Usage], got {','.join(df.columns)}")
    counted, all_ids = _usage_rows(df, path, usage)
    lines = {i: n for n, i in enumerate(df["id"], start=2)}  # line 1 is the header
    truth = {}
    for i, v in zip(counted["id"], counted["landmarks"]):
        try:
            truth[i] = frozenset(int(t) for t in v.split()) or None
        except ValueError:
            raise SubmissionError(f"{path}, line {lines[i]} (id {i}): not a list of landmark ids: {v!r}") from None
    return (truth, all_ids) if with_ids else truth


def _check_known(submitted, all_ids, path):
    """The official scorer refuses a submission with an id its solution does not have."""
    unknown = [i for i in submitted if i not in all_ids]
    if unknown:
        raise SubmissionError(f"{path}: id {unknown[0]} is not in the solution"
                              + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))


def evaluate(submission, solution, usage=None):
    """(GAP, accuracy on landmark queries) of two files, as the official scorer."""
    pred = read_submission(submission)
    truth, all_ids = read_solution(solution, usage, with_ids=True)
    _check_known(pred, all_ids, submission)
    return score(pred, truth)


def is_right(prediction, truth):
    """A prediction (landmark, confidence) is right when its landmark is one of the
    query's true ones; any prediction on a non-landmark query (truth None) is wrong."""
    return bool(truth) and prediction[0] in truth


def score(pred, truth):
    """(GAP, accuracy on landmark queries) of {id: (landmark, confidence)} against
    {id: frozenset of landmarks or None}; predictions of ids the truth lacks are skipped
    (the official scorer's Ignored rows and other usages)."""
    pred = {i: p for i, p in pred.items() if i in truth}
    gap = global_average_precision_score(truth, pred, ties="id")
    landmark = [i for i, v in truth.items() if v]
    acc = sum(i in pred and is_right(pred[i], truth[i]) for i in landmark) / max(len(landmark), 1)
    return gap, acc


def score_answers(ids, answers, truth):
    """score() of each answer: {name: per query of ids (landmark, confidence) or None} ->
    {name: (GAP, accuracy)}, for report.write_report."""
    return {name: score({q: p for q, p in zip(ids, preds) if p is not None}, truth) for name, preds in answers.items()}


def read_retrieval_submission(path, k=100):
    """{query id: [gallery ids, best first]} of an id,images file, each row cut to
    its first k, and the number of rows that were cut."""
    df = _read(path)
    if list(df.columns[:2]) != ["id", "images"]:
        raise SubmissionError(f"{path}: expected header id,images, got {','.join(df.columns)}")
    pred, cut = {}, 0
    for n, (i, v) in enumerate(zip(df["id"], df["images"]), start=2):
        ids = v.split()
        if i in pred:
            raise SubmissionError(f"{path}, line {n}: id {i} appears twice")
        cut += len(ids) > k
        pred[i] = ids[:k]
    return pred, cut


def read_retrieval_solution(path, usage=None, with_ids=False):
    """{query id: list of relevant gallery ids} of an id,images[,Usage] file, without
    the rows of Usage 'Ignored' (and, with usage, only that Usage); with_ids: also
    the ids of every row. A counted row without images still counts (it scores 0),
    as in the official scorer."""
    df = _read(path)
    if list(df.columns[:2]) != ["id", "images"]:
        raise SubmissionError(f"{path}: expected header id,images[,Usage], got {','.join(df.columns)}")
    counted, all_ids = _usage_rows(df, path, usage)
    truth = {i: v.split() for i, v in zip(counted["id"], counted["images"])}
    return (truth, all_ids) if with_ids else truth


def mean_average_precision(truth, pred, k=100):
    """mAP@k (see the module's docstring); truth {query: collection of relevant ids},
    pred {query: list}. The count of relevant ids is the solution row's, as the
    official scorer counts them (at least 1: a row without images scores 0)."""
    if not truth:
        return 0.0
    total = 0.0
    for q, listed in truth.items():
        relevant = set(listed)
        hits, ap, seen = 0, 0.0, set()
        for rank, g in enumerate(pred.get(q, [])[:k], start=1):
            if g in relevant and g not in seen:
                hits += 1
                ap += hits / rank
            seen.add(g)
        total += ap / max(min(len(listed), k), 1)
    return total / len(truth)


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--submission", required=True)
    p.add_argument("--solution", required=True)
    p.add_argument("--metric", choices=["gap", "accuracy", "map@100"], default="gap")
    p.add_argument("--usage", choices=["Public", "Private"], default=None,
                   help="score the solution's rows of this Usage only")
    p.add_argument("--label", default=None, help="print one line 'GAP LABEL: x' instead")
    p.add_argument("--report", default=None, metavar="HTML",
                   help="also write a visual report of the submission (report.py): per query its thumbnail, "
                        "prediction and truth; needs --data-dir. The parts predict.py --write-parts wrote beside "
                        "the submission (*_classifier.csv, *_retrieval.csv, *_ensemble.csv) are scored in it too")
    p.add_argument("--data-dir", default=None, help="with --report: the GLDv2 layout the queries are under (test/)")
    p.add_argument("--train-csv", default=None,
                   help="with --report: the gallery (id,landmark_id or landmark_id,images); each row then shows "
                        "gallery images of the predicted landmark, and of the true one when wrong")
    p.add_argument("--report-rows", type=int, default=200, metavar="N",
                   help="queries in the report: the most confident wrong ones first, then a sample (default 200)")
    p.add_argument("--logs", nargs="+", default=None, metavar="LOG", help="with --report: train.py logs to plot")
    a = p.parse_args(argv)
    if a.report and a.metric == "map@100":
        p.error("--report goes with the recognition metrics (gap, accuracy)")
    if a.report and not a.data_dir:
        p.error("--report needs --data-dir (where the query images are)")
    if a.report_rows < 1:
        p.error(f"--report-rows {a.report_rows}: must be at least 1")
    if a.metric == "map@100":
        truth, all_ids = read_retrieval_solution(a.solution, a.usage, with_ids=True)
        pred, cut = read_retrieval_submission(a.submission)
        _check_known(pred, all_ids, a.submission)
        if cut:
            print(f"note: {cut} row(s) of {a.submission} list more than 100 images; the first 100 of each are scored")
        m = mean_average_precision(truth, pred)
        print(f"mAP@100{' ' + a.label if a.label else ''}: {m:.4f}")
        return m
    gap, acc = evaluate(a.submission, a.solution, a.usage)
    if a.metric == "accuracy":
        print(f"accuracy{' ' + a.label if a.label else ''} (landmark queries): {acc:.4f}")
    elif a.label:
        print(f"GAP {a.label}: {gap:.4f}")
    else:
        print(f"GAP: {gap:.4f}")
        print(f"accuracy (landmark queries): {acc:.4f}")
    if a.report:
        write_report(a)
    return acc if a.metric == "accuracy" else (gap, acc)


def write_report(a):
    """evaluate.py --report: the submission (and its parts beside it) against the solution."""
    import report
    from dataset import image_path
    truth = read_solution(a.solution, a.usage)
    ids = list(truth)
    as_list = lambda pred: [pred.get(i) for i in ids]  # noqa: E731
    final = as_list(read_submission(a.submission))
    stem = os.path.splitext(a.submission)[0]
    parts = {k: as_list(read_submission(f"{stem}_{k}.csv")) for k in ("ensemble", "classifier", "retrieval")
             if os.path.isfile(f"{stem}_{k}.csv")}
    neighbours, examples = None, None
    if a.train_csv:
        from preprocess import read_clean_list
        g = read_clean_list(a.train_csv)
        first = g.groupby("landmark_id", sort=False)["id"].apply(lambda s: list(s[:5]))
        examples = {int(k): image_path(a.data_dir, "train", v[0]) for k, v in first.items()}
        neighbours = [[(image_path(a.data_dir, "train", j), p[0], None) for j in first.get(p[0], [])]
                      if p is not None else [] for p in final]
    final_name = "submission"
    answers = report.Answers(ids, [image_path(a.data_dir, "test", i) for i in ids], final, parts, neighbours,
                             final_name=final_name, neighbours_are="examples", truth_images=examples)
    view = report.View(truth, logs=a.logs, rows=a.report_rows, title=f"Report: {os.path.basename(a.submission)}",
                       notes=[f"submission {a.submission}; solution {a.solution}"
                              + (f" ({a.usage} rows)" if a.usage else "")])
    report.write_report(a.report, answers, view, score_answers(ids, {final_name: final, **parts}, truth))


if __name__ == "__main__":
    run_main(main)
