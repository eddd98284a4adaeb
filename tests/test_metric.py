import math

import pytest

from evaluate import global_average_precision_score as gap


def test_gap_all_correct_is_one():
    assert gap({0: 1, 1: 2, 2: 3}, {0: (1, 0.9), 1: (2, 0.5), 2: (3, 0.1)}) == 1.0


def test_gap_hand_worked_with_non_landmarks():
    # sorted by confidence: q1 (right), q3 (non-landmark), q0 (wrong), q2 (right); q4 landmark w/o prediction
    y_true = {0: 10, 1: 11, 2: 12, 3: None, 4: 14}
    y_pred = {0: (99, 0.5), 1: (11, 0.9), 2: (12, 0.2), 3: (5, 0.7)}
    # P(1)*1 + P(4)*1 = 1/1 + 2/4 ; M = 4 landmark queries
    assert gap(y_true, y_pred) == pytest.approx((1 + 2 / 4) / 4)


def test_gap_non_landmark_ranked_low_costs_nothing():
    y_true = {0: 1, 1: None}
    assert gap(y_true, {0: (1, 0.9), 1: (3, 0.1)}) == 1.0
    assert gap(y_true, {0: (1, 0.1), 1: (3, 0.9)}) == pytest.approx(0.5)


def test_gap_ties_keep_prediction_order():
    y_true = [1, 2]
    assert gap(y_true, [(0, 0.5), (2, 0.5)]) == pytest.approx(0.25)  # wrong first: P(2)=1/2, M=2
    assert gap(y_true, [(1, 0.5), (0, 0.5)]) == pytest.approx(0.5)   # right first: P=1, M=2


def test_gap_matches_reference_loop():
    import random
    rnd = random.Random(0)
    y_true = {i: (rnd.randrange(5) if rnd.random() < 0.7 else None) for i in range(200)}
    y_pred = {i: (rnd.randrange(5), rnd.random()) for i in range(200) if rnd.random() < 0.9}
    keys = sorted(y_pred, key=lambda k: -y_pred[k][1])
    m = sum(v is not None for v in y_true.values())
    hits, total = 0, 0.0
    for r, k in enumerate(keys, 1):
        if y_true[k] == y_pred[k][0]:
            hits += 1
            total += hits / r
    assert math.isclose(gap(y_true, y_pred), total / m, rel_tol=1e-12)
