"""evaluate.py and evaluate_retrieval.py against the official scorers' definitions.

The references below are written here from the published definitions (Google's GLDv2
metrics: GAP over predictions sorted by score, ties by query id then class, a prediction
right when it is any of the row's landmarks, M = rows with a landmark; mAP@100 over the
first 100 predictions, duplicates skipped, divided by min(#relevant, 100), averaged over
the solution's rows), not from this repository's code, and compared on hand-worked and
random files."""
import io
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

import evaluate
import evaluate_retrieval as er
from conftest import ROOT
from util import DataUnpickler, UserError, load_data_file


# ---------------------------------------------------------------- references from the definitions

def ref_gap(solution, predictions):
    """solution {id: [landmark ids]} ([] = non-landmark), predictions {id: (class, score)}."""
    ranked = sorted(predictions.items(), key=lambda kv: (-kv[1][1], kv[0], kv[1][0]))
    right, total = 0, 0.0
    for n, (qid, (cls, _)) in enumerate(ranked, start=1):
        if cls in solution[qid]:
            right += 1
            total += right / n
    return total / sum(1 for v in solution.values() if v)


def ref_accuracy(solution, predictions):
    rows = [q for q, v in solution.items() if v]
    return sum(q in predictions and predictions[q][0] in solution[q] for q in rows) / len(rows)


def ref_map100(solution, predictions):
    """solution {id: [relevant ids]}, predictions {id: [ids, best first]}."""
    total = 0.0
    for q, relevant in solution.items():
        found, ap, seen = 0, 0.0, []
        for n, g in enumerate(predictions.get(q, [])[:100], start=1):
            if g in seen:
                continue
            seen.append(g)
            if g in relevant:
                found += 1
                ap += found / n
        total += ap / min(len(relevant), 100)
    return total / len(solution)


def _write(path, header, rows):
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return str(path)


def _cli(*args):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True)


# ---------------------------------------------------------------- recognition: GAP and accuracy

def test_several_landmarks_in_a_solution_row(tmp_path):
    sol = _write(tmp_path / "sol.csv", "id,landmarks", [("q", "2 0")])
    sub = _write(tmp_path / "sub.csv", "id,landmarks", [("q", "0 0.36")])
    assert evaluate.evaluate(sub, sol) == (1.0, 1.0)  # 0 is one of the image's landmarks
    sub = _write(tmp_path / "sub2.csv", "id,landmarks", [("q", "5 0.36")])
    assert evaluate.evaluate(sub, sol) == (0.0, 0.0)


def test_ties_broken_by_query_id(tmp_path):
    sol = _write(tmp_path / "sol.csv", "id,landmarks", [("a", "1"), ("b", "2")])
    sub = _write(tmp_path / "sub.csv", "id,landmarks", [("b", "7 0.5"), ("a", "1 0.5")])
    gap, acc = evaluate.evaluate(sub, sol)
    assert gap == pytest.approx(0.5) and acc == pytest.approx(0.5)  # a (right) ranks first: 1/1 over M = 2
    # train.py's validation keeps the original's stable order: b's wrong prediction first
    from evaluate import global_average_precision_score
    assert global_average_precision_score({"a": 1, "b": 2}, {"b": (7, 0.5), "a": (1, 0.5)}) == pytest.approx(0.25)


def test_usage_column_and_ignored_rows(tmp_path):
    sol = _write(tmp_path / "sol.csv", "id,landmarks,Usage",
                 [("a", "1", "Public"), ("b", "2", "Private"), ("c", "3", "Ignored"), ("d", "", "Public")])
    sub = _write(tmp_path / "sub.csv", "id,landmarks", [("c", "3 0.9"), ("d", "4 0.8"), ("a", "1 0.7"), ("b", "2 0.1")])
    # c (Ignored) is skipped: d (non-landmark) 0.8, a right at 2, b right at 3: (1/2 + 2/3) / 2
    assert evaluate.evaluate(sub, sol)[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert evaluate.evaluate(sub, sol, "Public")[0] == pytest.approx(1 / 2)
    assert evaluate.evaluate(sub, sol, "Private")[0] == pytest.approx(1.0)
    unknown = _write(tmp_path / "unknown.csv", "id,landmarks", [("zz", "1 0.5")])
    r = _cli("--submission", unknown, "--solution", sol)
    assert r.returncode == 2 and "zz" in r.stderr and "Traceback" not in r.stderr


def _random_case(rnd, n=60):
    solution, predictions = {}, {}
    for i in range(n):
        qid = f"{rnd.randrange(16 ** 6):06x}"
        r = rnd.random()
        solution[qid] = [] if r < 0.3 else rnd.sample(range(8), 1 if r < 0.7 else rnd.randint(2, 3))
        if rnd.random() < 0.85:  # some landmark queries have no prediction
            score = rnd.choice([0.1, 0.5, 0.9]) if rnd.random() < 0.4 else round(rnd.random(), 3)  # many ties
            predictions[qid] = (rnd.randrange(8), score)
    return solution, predictions


def test_gap_and_accuracy_match_the_definition_on_random_files(tmp_path):
    rnd = random.Random(0)
    worst = 0.0
    for case in range(200):
        solution, predictions = _random_case(rnd)
        if not any(solution.values()):
            continue
        sol = _write(tmp_path / "sol.csv", "id,landmarks", [(q, " ".join(map(str, v))) for q, v in solution.items()])
        rows = list(predictions.items())
        rnd.shuffle(rows)  # file order must not matter
        sub = _write(tmp_path / "sub.csv", "id,landmarks", [(q, f"{c} {s}") for q, (c, s) in rows])
        gap, acc = evaluate.evaluate(sub, sol)
        worst = max(worst, abs(gap - ref_gap(solution, predictions)), abs(acc - ref_accuracy(solution, predictions)))
    assert worst < 1e-12


# ---------------------------------------------------------------- retrieval: mAP@100

def test_map_truncates_long_rows_and_says_so(tmp_path, capsys):
    sol = _write(tmp_path / "sol.csv", "id,images", [("q", "g100 g0")])
    sub = _write(tmp_path / "sub.csv", "id,images", [("q", " ".join(f"g{i}" for i in range(1, 150)))])
    # g100 at rank 100 counts (1/100), g0 is absent; nothing beyond 100 counts
    m = evaluate.main(["--submission", sub, "--solution", sol, "--metric", "map@100"])
    assert m == pytest.approx((1 / 100) / 2)
    assert capsys.readouterr().out.count("more than 100") == 1


def test_map_refuses_a_query_the_solution_lacks(tmp_path):
    sol = _write(tmp_path / "sol.csv", "id,images,Usage", [("q", "a", "Public"), ("p", "b", "Private")])
    sub = _write(tmp_path / "sub.csv", "id,images", [("q", "a"), ("p", "b"), ("stranger", "a")])
    r = _cli("--submission", sub, "--solution", sol, "--metric", "map@100")
    assert r.returncode == 2 and "stranger" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a query of the other usage is not a stranger: it is skipped
    sub = _write(tmp_path / "sub2.csv", "id,images", [("q", "a"), ("p", "x")])
    assert evaluate.main(["--submission", sub, "--solution", sol, "--metric", "map@100", "--usage", "Public"]) == 1.0


def test_map_matches_the_definition_on_random_files(tmp_path):
    rnd = random.Random(1)
    gallery = [f"g{i}" for i in range(300)]
    worst = 0.0
    for case in range(60):
        solution = {f"q{i}": rnd.sample(gallery, rnd.choice([1, 3, 20, 120])) for i in range(12)}
        predictions = {q: [rnd.choice(gallery + solution[q] * 3) for _ in range(rnd.choice([0, 5, 100, 130]))]
                       for q in solution if rnd.random() < 0.9}
        sol = _write(tmp_path / "sol.csv", "id,images", [(q, " ".join(v)) for q, v in solution.items()])
        sub = _write(tmp_path / "sub.csv", "id,images", [(q, " ".join(v)) for q, v in predictions.items()])
        pred, _ = evaluate.read_retrieval_submission(sub)
        m = evaluate.mean_average_precision(evaluate.read_retrieval_solution(sol), pred)
        worst = max(worst, abs(m - ref_map100(solution, predictions)))
    assert worst < 1e-12


# ---------------------------------------------------------------- revisited ground truth and protocols

GND = {"imlist": ["d0", "d1", "d2"], "qimlist": ["q0"],
       "gnd": [{"bbx": np.array([0.0, 1.5, 10.0, 12.0]), "easy": np.array([0], np.int64),
                "hard": np.array([2], np.int32), "junk": np.array([], np.int64)}]}


@pytest.mark.parametrize("protocol", range(6))
def test_ground_truth_pickles_at_every_protocol(tmp_path, protocol):
    data = {**GND, "arrays": [(np.arange(6) % 4).astype(t).reshape(2, 3)
                              for t in (np.float32, np.float64, np.int64, np.uint8, np.bool_)]
            + [np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.array(["ab", "c"]), np.float64(2.5)]}
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    back = load_data_file(str(path))
    for a, b in zip(back["arrays"], data["arrays"]):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert er.read_gnd(str(path))["gnd"][0]["bbx"] == [0.0, 1.5, 10.0, 12.0]


@pytest.mark.parametrize("protocol", range(6))
def test_planted_payloads_stay_refused(tmp_path, protocol):
    planted = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(planted), "w"))

    class Codec:  # the allowed _codecs.encode asked for something other than latin-1 bytes
        def __reduce__(self):
            import _codecs
            return (_codecs.encode, ("x", "rot13"))

    class Huge:  # the allowed bytes() asked to allocate from a number
        def __reduce__(self):
            return (bytes, (10 ** 12,))

    for bad in (Payload(), Codec(), Huge()):
        with pytest.raises(pickle.UnpicklingError):
            DataUnpickler(io.BytesIO(pickle.dumps({"gnd": [bad]}, protocol=protocol))).load()
    assert not planted.exists()


def test_a_protocol_without_positives_says_so(tmp_path, capsys):
    gnd = {"imlist": ["d0", "d1"], "qimlist": ["q0"], "gnd": [{"bbx": [0, 0, 1, 1], "easy": [0], "hard": [],
                                                                 "junk": []}]}
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(gnd))
    np.save(tmp_path / "ranks.npy", np.array([[0, 1]]))
    er.main(["--gnd", str(path), "--ranks", str(tmp_path / "ranks.npy")])
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "mP@k H: no query has a positive in the Hard protocol" in out
    assert "E: 100.00" in out


def test_bad_usage_value_is_one_line(tmp_path):
    sol = _write(tmp_path / "sol.csv", "id,landmarks,Usage", [("a", "1", "Secret")])
    sub = _write(tmp_path / "sub.csv", "id,landmarks", [("a", "1 0.5")])
    with pytest.raises(UserError, match="Usage"):
        evaluate.evaluate(sub, sol)
