"""The metrics of the Google Landmark challenges, from their files.

    python evaluate.py --submission submission.csv --solution solution.csv [--metric gap|accuracy|map@100]

gap, accuracy (recognition, the 2020 competition's files):
  submission: id,landmarks with "<landmark_id> <confidence>" (or empty: no prediction).
  solution:   id,landmarks with the true landmark id, empty for a non-landmark image.
  GAP: micro average precision over the predictions sorted by confidence; accuracy: share of the
  landmark queries whose prediction is right.
map@100 (the Google Landmark Retrieval challenges):
  submission: id,images with up to 100 space-separated gallery ids, best first.
  solution:   id,images,Usage with the relevant gallery ids; rows of Usage "Ignored" do not count,
              --usage Public|Private keeps those rows only.
  mAP@100 = mean over the solution's queries of 1/min(#relevant, 100) * sum_k P(k) rel(k), k <= 100;
  a query without a submitted row scores 0, a gallery id repeated in a row counts once.
"""
import argparse
import math
import os

import pandas as pd

from util import UserError, global_average_precision_score, run_main


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


def read_solution(path):
    """{id: landmark_id or None}."""
    df = _read(path)
    if list(df.columns[:2]) != ["id", "landmarks"]:
        raise SubmissionError(f"{path}: expected header id,landmarks, got {','.join(df.columns)}")
    truth = {}
    for n, (i, v) in enumerate(zip(df["id"], df["landmarks"]), start=2):
        v = v.strip()
        try:
            truth[i] = int(v.split()[0]) if v else None
        except ValueError:
            raise SubmissionError(f"{path}, line {n} (id {i}): not a landmark id: {v!r}") from None
    return truth


def evaluate(submission, solution):
    """(GAP, accuracy on landmark queries) of two files."""
    pred, truth = read_submission(submission), read_solution(solution)
    unknown = set(pred) - set(truth)
    if unknown:
        raise SubmissionError(f"{submission}: ids not in the solution, e.g. {sorted(unknown)[0]}")
    gap = global_average_precision_score(truth, pred)
    landmark = [i for i, v in truth.items() if v is not None]
    acc = sum(i in pred and pred[i][0] == truth[i] for i in landmark) / max(len(landmark), 1)
    return gap, acc


def read_retrieval_submission(path, k=100):
    """{query id: [gallery ids, best first]} of an id,images file."""
    df = _read(path)
    if list(df.columns[:2]) != ["id", "images"]:
        raise SubmissionError(f"{path}: expected header id,images, got {','.join(df.columns)}")
    pred = {}
    for n, (i, v) in enumerate(zip(df["id"], df["images"]), start=2):
        ids = v.split()
        if len(ids) > k:
            raise SubmissionError(f"{path}, line {n} (id {i}): {len(ids)} images, at most {k} count")
        if i in pred:
            raise SubmissionError(f"{path}, line {n}: id {i} appears twice")
        pred[i] = ids
    return pred


def read_retrieval_solution(path, usage=None):
    """{query id: set of relevant gallery ids} of an id,images,Usage file,
    without the rows of Usage 'Ignored' (and, with usage, only that Usage)."""
    df = _read(path)
    if list(df.columns[:2]) != ["id", "images"]:
        raise SubmissionError(f"{path}: expected header id,images[,Usage], got {','.join(df.columns)}")
    if "Usage" in df.columns:
        df = df[df["Usage"] != "Ignored"]
        if usage:
            df = df[df["Usage"] == usage]
    return {i: set(v.split()) for i, v in zip(df["id"], df["images"]) if v.split()}


def mean_average_precision(truth, pred, k=100):
    """mAP@k (see the module's docstring); truth {query: set}, pred {query: list}."""
    if not truth:
        return 0.0
    total = 0.0
    for q, relevant in truth.items():
        hits, ap, seen = 0, 0.0, set()
        for rank, g in enumerate(pred.get(q, [])[:k], start=1):
            if g in relevant and g not in seen:
                hits += 1
                ap += hits / rank
            seen.add(g)
        total += ap / min(len(relevant), k)
    return total / len(truth)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--submission", required=True)
    p.add_argument("--solution", required=True)
    p.add_argument("--metric", choices=["gap", "accuracy", "map@100"], default="gap")
    p.add_argument("--usage", choices=["Public", "Private"], default=None, help="map@100: score these rows only")
    p.add_argument("--label", default=None, help="print one line 'GAP LABEL: x' instead")
    a = p.parse_args(argv)
    if a.metric == "map@100":
        m = mean_average_precision(read_retrieval_solution(a.solution, a.usage), read_retrieval_submission(a.submission))
        print(f"mAP@100{' ' + a.label if a.label else ''}: {m:.4f}")
        return m
    gap, acc = evaluate(a.submission, a.solution)
    if a.metric == "accuracy":
        print(f"accuracy{' ' + a.label if a.label else ''} (landmark queries): {acc:.4f}")
        return acc
    if a.label:
        print(f"GAP {a.label}: {gap:.4f}")
    else:
        print(f"GAP: {gap:.4f}")
        print(f"accuracy (landmark queries): {acc:.4f}")
    return gap, acc


if __name__ == "__main__":
    run_main(main)
