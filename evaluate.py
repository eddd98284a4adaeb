"""GAP and landmark accuracy of a submission against a solution file.

    python evaluate.py --submission submission.csv --solution solution.csv

submission: id,landmarks with "<landmark_id> <confidence>" (or empty: no prediction).
solution:   id,landmarks with the true landmark id, empty for a non-landmark image.
"""
import argparse
import math

import pandas as pd

from util import UserError, global_average_precision_score, run_main


class SubmissionError(UserError, ValueError):
    """A malformed submission or solution file: one line, exit status 2."""


def read_submission(path):
    """{id: (landmark_id, confidence)}; rows with empty landmarks make no prediction."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
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
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--submission", required=True)
    p.add_argument("--solution", required=True)
    p.add_argument("--label", default=None, help="print one line 'GAP LABEL: x' instead")
    a = p.parse_args(argv)
    gap, acc = evaluate(a.submission, a.solution)
    if a.label:
        print(f"GAP {a.label}: {gap:.4f}")
    else:
        print(f"GAP: {gap:.4f}")
        print(f"accuracy (landmark queries): {acc:.4f}")
    return gap, acc


if __name__ == "__main__":
    run_main(main)
