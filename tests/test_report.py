"""The HTML report: rows, marks against evaluate.py, embedded images, no other host, and a browser opens it."""
import base64
import os
import re
from html.parser import HTMLParser

import cv2
import numpy as np
import pandas as pd
import pytest

import evaluate
import predict
import report
from util import UserError
from browser import needs_browser  # noqa: E402



class Rows(HTMLParser):
    """Each query row's id and mark, each neighbour cell's mark, every img's src, every attribute value."""

    def __init__(self):
        super().__init__()
        self.rows, self.imgs, self.values, self.scores, self._part, self._cell = [], [], [], {}, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.values += [v for v in a.values() if v]
        if tag == "tr" and "row" in a.get("class", "").split():
            self.rows.append({"id": a["data-id"], "mark": a["data-mark"], "nb": []})
        if tag == "td" and "nb" in a.get("class", "").split():
            self.rows[-1]["nb"].append(a["class"].split()[1:])
        if tag == "tr" and a.get("class") == "score":
            self._part = a["data-part"]
        if tag == "td" and a.get("class") in ("gap", "acc") and self._part:
            self._cell = a["class"]
        if tag == "img":
            self.imgs.append(a["src"])

    def handle_data(self, data):
        if self._cell:
            self.scores.setdefault(self._part, {})[self._cell] = float(data)
            self._cell = None


def parse(path):
    p = Rows()
    text = open(path, encoding="utf-8").read()
    p.feed(text)
    return p, text


def assert_self_contained(p, text):
    for src in p.imgs:
        m = re.fullmatch(r"data:image/(jpeg|png);base64,(.+)", src)
        assert m, src[:60]
        img = cv2.imdecode(np.frombuffer(base64.b64decode(m.group(2)), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.size > 0
    # no reference to another host: no URL scheme or protocol-relative address anywhere
    outside = re.sub(r'"data:image/(jpeg|png);base64,[A-Za-z0-9+/=]+"', '""', text)
    assert not re.search(r"(https?|ftp|wss?):|//[a-z0-9]", outside, re.I)
    assert "<script" not in text and "url(" not in text
    assert not [v for v in p.values if v.startswith(("http", "//"))]


def marks_from_files(submission, solution):
    """right / wrong / nonlandmark per id, computed from the two CSV files directly."""
    sub = pd.read_csv(submission, dtype=str, keep_default_na=False).set_index("id")["landmarks"]
    sol = pd.read_csv(solution, dtype=str, keep_default_na=False).set_index("id")["landmarks"]
    out = {}
    for i, t in sol.items():
        truth = set(t.split())
        pred = sub.get(i, "").split()
        out[i] = ("nonlandmark" if not truth else "wrong") if not pred else (
            "right" if pred[0] in truth else "wrong")
    return out, {i: float(v.split()[1]) for i, v in sub.items() if v}


@pytest.fixture(scope="module")
def gld_report(trained, tmp_path_factory):
    t = tmp_path_factory.mktemp("report")
    d = trained["data"]
    spec = t / "spec.json"
    spec.write_text('{"models": [{"enet_type": "%s", "checkpoint": "%s", "image_size": %d}]}'
                    % (trained["enet_type"], trained["checkpoint"], trained["image_size"]))
    sub, html_path = str(t / "submission.csv"), str(t / "report.html")
    predict.main(["--data-dir", d, "--train-csv", os.path.join(d, "train_competition.csv"),
                  "--idx2landmark", os.path.join(d, "idx2landmark_id.json"), "--spec", str(spec),
                  "--cache-dir", "", "--num-workers", "0", "--device", "cpu", "--out", sub, "--write-parts",
                  "--report", html_path, "--solution", os.path.join(d, "solution.csv"), "--report-rows", "100000",
                  "--logs", os.path.join(d, "logs", "r1.txt")])
    return {"data": d, "submission": sub, "html": html_path, "t": t}


def test_predict_report_rows_marks_and_scores(gld_report):
    d = gld_report["data"]
    solution = os.path.join(d, "solution.csv")
    p, text = parse(gld_report["html"])
    marks, conf = marks_from_files(gld_report["submission"], solution)
    assert sorted(r["id"] for r in p.rows) == sorted(marks)  # every query, once
    assert {r["id"]: r["mark"] for r in p.rows} == marks
    assert {"right", "wrong"} <= set(marks.values())
    # the wrong ones first, by decreasing confidence
    n_wrong = sum(m == "wrong" and i in conf for i, m in marks.items())
    head = [r["id"] for r in p.rows[:n_wrong]]
    assert all(marks[i] == "wrong" for i in head) and [conf[i] for i in head] == sorted(
        (conf[i] for i in head), reverse=True)
    # 5 neighbours per row, marked right exactly when their landmark is the truth
    assert all(len(r["nb"]) == 5 for r in p.rows)
    gap, acc = evaluate.evaluate(gld_report["submission"], solution)
    final = p.scores["ensemble (submitted)"]
    assert final["gap"] == pytest.approx(gap, abs=5e-5) and final["acc"] == pytest.approx(acc, abs=5e-5)
    for part in ("classifier", "retrieval"):
        g, _ = evaluate.evaluate(gld_report["submission"].replace(".csv", f"_{part}.csv"), solution)
        assert p.scores[part]["gap"] == pytest.approx(g, abs=5e-5)
    # thumbnails of every query and 5 neighbours, the histogram and the curves
    assert len(p.imgs) == 6 * len(p.rows) + 2
    assert_self_contained(p, text)


def test_evaluate_report_with_parts_and_examples(gld_report):
    d, t = gld_report["data"], gld_report["t"]
    out = str(t / "ev.html")
    solution = os.path.join(d, "solution.csv")
    evaluate.main(["--submission", gld_report["submission"], "--solution", solution, "--report", out,
                   "--data-dir", d, "--train-csv", os.path.join(d, "train_competition.csv"), "--report-rows", "7"])
    p, text = parse(out)
    marks, conf = marks_from_files(gld_report["submission"], solution)
    assert len(p.rows) == 7 and all(marks[r["id"]] == r["mark"] for r in p.rows)
    wrong = sorted((i for i, m in marks.items() if m == "wrong" and i in conf), key=lambda i: -conf[i])
    assert [r["id"] for r in p.rows] == wrong[:7]  # the 7 most confident wrong predictions
    assert set(p.scores) == {"submission", "classifier", "retrieval"}  # the parts beside it are found
    # the examples are gallery images of the predicted landmark: all marked wrong on a wrong row
    assert all(r["nb"] and all(m == ["wrong"] for m in r["nb"]) for r in p.rows)
    assert_self_contained(p, text)


def test_select_rows_hand_example():
    ids = ["a", "b", "c", "d", "e"]
    preds = [(1, 0.9), (2, 0.8), (3, 0.7), None, (5, 0.95)]
    truth = {"a": {1}, "b": {9}, "c": None, "d": {4}, "e": {5}}
    assert report.select_rows(ids, preds, truth, n=99) == [1, 2, 4, 0, 3]  # wrong b, c; then the rest by conf
    assert report.select_rows(ids, preds, truth, n=1) == [1]
    shown = report.select_rows(ids, preds, truth, n=3)
    assert shown[:2] == [1, 2] and shown[2] in (0, 3, 4)
    assert sorted(report.select_rows(ids, preds, None, n=5)) == [0, 1, 2, 3, 4]


def test_report_input_mistakes_are_one_line(tmp_path, gld_report, capsys):
    d = gld_report["data"]
    base = ["--data-dir", d, "--train-csv", os.path.join(d, "train_competition.csv"), "--idx2landmark",
            os.path.join(d, "idx2landmark_id.json"), "--spec", "x.json", "--report", str(tmp_path / "r.html")]
    with pytest.raises(UserError, match="--logs .*none.txt: no such log"):  # before any model or image
        predict.main(base + ["--logs", str(tmp_path / "none.txt")])
    with pytest.raises(UserError, match="none.csv: no such file"):
        predict.main(base + ["--solution", str(tmp_path / "none.csv")])
    with pytest.raises(UserError, match="--solution and --logs go with --report"):
        predict.main(base[:-2] + ["--solution", "s.csv"])  # --solution without --report


@needs_browser
def test_browser_opens_report_offline(gld_report):
    from browser import chrome
    with chrome() as b:
        b.get("file://" + os.path.abspath(gld_report["html"]))
        rows = b.find_elements("css selector", "tr.row")
        p, _ = parse(gld_report["html"])
        assert len(rows) == len(p.rows)
        # every image decoded by the browser itself
        bad = b.execute_script("return [...document.images].filter(i => !i.complete || i.naturalWidth == 0).length")
        assert bad == 0 and b.execute_script("return document.images.length") == len(p.imgs)


def test_rows_speak_plainly(tmp_path, capsys):
    """Names without internal ids and wrapping between words; the parts' answers in words; a raw score
    with three decimals, a calibrated confidence as a percentage; the scores on the console too."""
    names = {10**9: "saranda_kolones_paphos", 10**9 + 1: "ajloun_castle"}
    img = np.full((40, 60, 3), 128, np.uint8)
    answers = report.Answers(ids=["q1", "q2"], images=[img, img], final=[(10**9, 0.8123), (10**9 + 1, 6.514e-05)],
                             parts={"classifier": [(10**9, 0.93), None], "retrieval": [(10**9 + 1, 0.71), None]},
                             neighbours=[[(img, 10**9, 0.7)], []], calibrated=True, sure=[True, False])
    truth = {"q1": {10**9}, "q2": {10**9}}
    report.write_report(str(tmp_path / "r.html"), answers, report.View(truth=truth, names=names, rows=10),
                        scores={"final": (0.5, 0.5)})
    text = open(tmp_path / "r.html", encoding="utf-8").read()
    assert "1000000000" not in text.replace('data-landmark="1000000000"', "")
    assert "saranda_<wbr>kolones_<wbr>paphos" in text and ".nb{font-size:12px;width:100px;overflow-wrap:break-word}" in text
    assert "by the classifier: saranda_<wbr>kolones_<wbr>paphos (0.930)" in text
    assert "by the nearest photos: ajloun_<wbr>castle (0.710)" in text
    assert 'confidence <span class="conf">81%</span>' in text and 'confidence <span class="conf">0%</span>' in text
    assert "GAP 0.5000, accuracy 0.5000: final" in capsys.readouterr().out
    row = report.render_row({"id": "q", "image": img, "prediction": (1, 6.514e-05)}, str, report.Thumbnails())
    assert 'score <span class="conf">&lt; 0.001</span>' in row and "e-05" not in row
    row = report.render_row({"id": "q", "image": img, "prediction": (1, 0.25)}, str, report.Thumbnails())
    assert 'score <span class="conf">0.250</span>' in row
    # "not sure" on a photo of no landmark claims nothing: not marked wrong; a sure answer there is
    for sure, mark in ((False, "nonlandmark"), (True, "wrong")):
        row = report.render_row({"id": "q", "image": img, "prediction": (1, 0.2), "truth": None, "sure": sure,
                                 "calibrated": True}, str, report.Thumbnails())
        assert f'data-mark="{mark}"' in row
