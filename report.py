"""See what the model does: one self-contained HTML file of predictions and neighbours.

    python predict.py ... --report report.html [--solution solution.csv] [--logs logs/*.txt] [--report-rows 200]
    python evaluate.py --submission S --solution T --report report.html --data-dir D [--train-csv C]

The file embeds its images as small JPEG thumbnails (data: URIs) and its
charts as PNGs, and has no scripts: it opens from disk in any browser,
offline, and can be mailed. At the top, the scores (GAP and accuracy of the
final answer and of each part), the counts and a confidence histogram of the
right and wrong predictions (and the training curves of plot_logs.py with
--logs); below, one row per selected query: its thumbnail, the prediction with
its confidence, the classifier's and retrieval's own answers, and its 5
nearest gallery images with their cosines, each marked right or wrong when
the truth is known. The rows: the most confident wrong predictions first
(those that cost GAP), then a sample of the rest (select_rows).

report.py draws; it computes no metric and reads no result of its own: callers hand it the
answers (Answers), how to show them (View) and the scores (evaluate.score_answers):
recognizer.write_report for predict.py, evaluate.write_report for a submission file. app.py draws
its answers with the same row (render_row).
"""
import base64
import html
import io
import os
from dataclasses import dataclass, field

import cv2
import numpy as np

from dataset import BadImage, read_rgb

QUERY_SIDE, NEIGHBOUR_SIDE = 128, 96  # thumbnails' longer side, px
JPEG_QUALITY = 80  # ~3-5 kB per thumbnail on photographs: 200 rows of GLDv2 stay a few MB

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.5em}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 6px;vertical-align:top;text-align:left}
table.scores td,table.scores th{padding:3px 10px}
.chart img{max-width:100%;height:auto}.q img{display:block}.qid{font-size:12px;max-width:130px;overflow-wrap:anywhere}.nb{font-size:12px;width:100px;overflow-wrap:break-word}.nb img{display:block;margin-bottom:2px}
.right{background:#e7f6e7}.wrong{background:#fbe4e4}.nonlandmark{background:#eee}
.mark{font-weight:bold}.right .mark{color:#197a19}.wrong .mark{color:#b11}
.tag{display:inline-block;padding:0 5px;border-radius:3px;font-size:12px;background:#ddd;margin:1px 0}
.tag.sunk{background:#c9d8f0}.tag.unreadable{background:#f0d9a8}.tag.wrong{background:#f3b9b9}
.tag.right{background:#b9e3b9}.tag.not-sure{background:#e4e4e4;color:#555}.unsure{color:#666}.muted{color:#777}.msg{padding:6px 10px;background:#fff3cd;border:1px solid #e0c870}
.missing{width:96px;height:64px;background:#eee;color:#777;font-size:11px;display:flex;align-items:center;
justify-content:center}
"""


class Thumbnails:
    """Images as data: URIs of small JPEGs, each file read once per report."""

    def __init__(self, limit=None):
        self.cache, self.limit = {}, limit  # limit: most files kept (app.py answers for days)

    def __call__(self, image, side):
        """image: a path or an RGB uint8 array; None when it cannot be read."""
        key = (image, side) if isinstance(image, str) else None
        if key in self.cache:
            return self.cache[key]
        try:
            rgb = read_rgb(image, min_side=side) if isinstance(image, str) else image
        except BadImage:
            rgb = None
        uri = None if rgb is None else jpeg_uri(rgb, side)
        if key is not None:
            if self.limit and len(self.cache) >= self.limit:
                self.cache.clear()
            self.cache[key] = uri
        return uri


def jpeg_uri(rgb, side):
    h, w = rgb.shape[:2]
    f = side / max(h, w)
    if f < 1:
        rgb = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode()


def png_uri(fig):
    """A matplotlib figure as a PNG data: URI, re-encoded by OpenCV so that no text
    chunk (matplotlib writes its web address into one) goes into the page."""
    import matplotlib.pyplot as plt
    b = io.BytesIO()
    fig.savefig(b, format="png", dpi=90)
    plt.close(fig)
    return _clean_png_uri(b.getvalue())


def _clean_png_uri(png):
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    return "data:image/png;base64," + base64.b64encode(cv2.imencode(".png", img)[1].tobytes()).decode()


def img_tag(uri, alt, missing="unreadable"):
    if uri is None:
        return f'<div class="missing">{html.escape(missing)}</div>'
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


# ---------------------------------------------------------------- rows

def select_rows(ids, predictions, truth=None, n=200, seed=0):
    """Indices of the queries to show: with the truth, the wrong predictions by
    decreasing confidence (at most n), then a random sample of the rest; without
    it, a random sample; all of them when n >= the number of queries (wrong
    first, then the rest). The sample is shown by decreasing confidence."""
    conf = np.array([p[1] if p is not None else -np.inf for p in predictions], np.float64)
    wrong = [i for i, (q, p) in enumerate(zip(ids, predictions))
             if truth is not None and p is not None and q in truth and mark_of(p, truth[q], True) == "wrong"]
    wrong = sorted(wrong, key=lambda i: -conf[i])[:n]
    rest = np.setdiff1d(np.arange(len(ids)), wrong)
    if len(wrong) + len(rest) > n:
        rest = np.random.default_rng(seed).choice(rest, n - len(wrong), replace=False)
    rest = sorted(rest.tolist(), key=lambda i: -conf[i])
    return wrong + rest


def mark_of(prediction, truth, known):
    """'right', 'wrong', 'nonlandmark' (no landmark and no prediction: nothing to
    get wrong), or '' when the truth is not known. Right as evaluate.is_right: the
    landmark is one of the true ones; any landmark on a non-landmark is wrong."""
    if not known:
        return ""
    if prediction is None:
        return "wrong" if truth else "nonlandmark"
    return "right" if truth and prediction[0] in truth else "wrong"


PART_WORDS = {"classifier": "by the classifier", "retrieval": "by the nearest photos",
              "ensemble": "both together"}  # what a part's answer is, in words


def wrapped(text):
    """HTML of a name that may wrap after its underscores, dashes and slashes (not inside a word)."""
    out = html.escape(text)
    for c in ("_", "-", "/"):
        out = out.replace(c, c + "<wbr>")
    return out


def confidence_text(c, calibrated):
    """A calibrated confidence as a percentage; a raw score with three decimals ('< 0.001' below)."""
    if calibrated:
        return f"{c:.0%}"
    return f"{c:.3f}" if c >= 0.001 else "&lt; 0.001"


def render_row(row, name_of, thumbs):
    """One query as a table row. row: {'id', 'image' (path or RGB array),
    'prediction' ((label, confidence) or None), 'truth' (a set of labels, None
    for a non-landmark, absent when unknown), 'answers' ({part: (label, conf)
    or None}), 'neighbours' ([(image, label, cosine or None)]), 'tags' (e.g.
    ['sunk']), 'truth_image' (optional: a gallery image of the true landmark), 'sure' (default True:
    False shows "not sure" and the prediction as a guess, in grey), 'calibrated' (the confidence is a
    probability: shown as a percentage)}. name_of(label) -> the text shown for a landmark."""
    known = "truth" in row
    truth, pred = row.get("truth"), row["prediction"]
    sure = row.get("sure", True)
    # "not sure" on a photo of no landmark claims nothing: nothing to get wrong (GAP still scores the guess)
    mark = "nonlandmark" if known and not truth and not sure else mark_of(pred, truth, known)
    tags = list(row.get("tags", ()))
    if known and not truth:
        tags.append("non-landmark")
    if mark == "wrong":
        tags.append("wrong")
    elif mark == "right":
        tags.append("right")
    if pred is not None and not sure:
        tags.append("not sure")
    tag_html = " ".join(f'<span class="tag {html.escape(t.replace(" ", "-"))}">{html.escape(t)}</span>' for t in tags)
    if pred is None:
        pred_html = '<span class="muted">no prediction</span>'
    else:
        calibrated = row.get("calibrated")
        conf = confidence_text(pred[1], calibrated)
        pred_html = (f'<b class="pred">{wrapped(name_of(pred[0]))}</b><br>' if sure else
                     f'<b class="unsure">not sure</b><br><span class="guess muted">guess: '
                     f'{wrapped(name_of(pred[0]))}</span><br>') + (
            f'{"confidence" if calibrated else "score"} <span class="conf">{conf}</span>')

    cells = [f'<td class="q">{img_tag(thumbs(row["image"], QUERY_SIDE), str(row["id"]))}'
             f'<div class="qid">{html.escape(str(row["id"]))}</div></td>',
             f'<td>{pred_html}<div>{tag_html}</div>']
    if known:
        t = ", ".join(name_of(x) for x in sorted(truth, key=str)) if truth else "non-landmark"
        cells[-1] += f'<div class="truth">truth: {html.escape(t)}</div>'
        if mark == "wrong" and row.get("truth_image"):
            cells[-1] += img_tag(thumbs(row["truth_image"], NEIGHBOUR_SIDE), "a gallery image of the truth", "")
    for part, answer in row.get("answers", {}).items():
        text = "none" if answer is None else f"{wrapped(name_of(answer[0]))} ({confidence_text(answer[1], False)})"
        cells[-1] += (f'<div class="answer {html.escape(part)}">{html.escape(PART_WORDS.get(part, part))}: '
                      f'{text}</div>')
    cells[-1] += "</td>"
    for image, label, cos in row.get("neighbours", ()):
        nb_mark = ("right" if truth and label in truth else "wrong") if known else ""
        sym = {"right": "&#10003; ", "wrong": "&#10007; "}.get(nb_mark, "")
        cos_html = "" if cos is None else f'<br><span class="cos">{cos:.3f}</span>'
        cells.append(f'<td class="nb {nb_mark}" data-landmark="{html.escape(str(label))}">'
                     f'{img_tag(thumbs(image, NEIGHBOUR_SIDE), name_of(label), "not found")}'
                     f'<span class="mark">{sym}</span>{wrapped(name_of(label))}{cos_html}</td>')
    return (f'<tr class="row {mark}" data-id="{html.escape(str(row["id"]))}" data-mark="{mark}">'
            + "".join(cells) + "</tr>")


def page(title, body):
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{CSS}</style></head><body>\n{body}\n</body></html>\n')


# ---------------------------------------------------------------- the report

def confidence_histogram(right, wrong, other, calibrated=False):
    """A PNG data: URI: the confidences of right and wrong predictions (or of all,
    without truth): a calibrated one in % from 0 to 100; a raw score on a log scale when
    they span more than two decades."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = [(np.asarray(v, np.float64), lab, col) for v, lab, col in
              ((right, "right", "#3a3"), (wrong, "wrong", "#c33"), (other, "predicted", "#58a")) if len(v)]
    allc = np.concatenate([g[0] for g in groups]) if groups else np.zeros(0)
    log = not calibrated and len(allc) and allc.min() > 0 and allc.max() / allc.min() > 100
    fig, ax = plt.subplots(figsize=(6, 2.6))
    if len(allc):
        vals = [np.log10(g[0]) if log else 100 * g[0] if calibrated else g[0] for g in groups]
        lo, hi = (0, 100) if calibrated else (min(v.min() for v in vals), max(v.max() for v in vals))
        ax.hist(vals, bins=np.linspace(lo, hi + 1e-9, 31), stacked=True, label=[g[1] for g in groups],
                color=[g[2] for g in groups])
        ax.legend(fontsize=8)
    ax.set_xlabel("confidence, %" if calibrated else "log10 score" if log else "score")
    ax.set_ylabel("queries")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return png_uri(fig)


def curves_uri(log_paths):
    import plot_logs
    b = io.BytesIO()
    plot_logs.plot(plot_logs.read_logs(log_paths, "--logs"), b)
    return _clean_png_uri(b.getvalue())


@dataclass
class Answers:
    """What was answered, per query: its id (the key of the truth) and image path; final: the answer
    scored, (label, confidence) or None; parts: {name: [per query (label, confidence) or None]}
    (e.g. classifier, retrieval), shown too; neighbours: [(gallery image, label, cosine or None)];
    sunk, unreadable: bool (what predict.py knows; evaluate.py knows neither); final_name: the
    final answer's name; neighbours_are: 'nearest' (by cosine) or 'examples' (gallery images of the
    predicted landmark); truth_images: {label: a gallery image}, shown beside a wrong prediction;
    sure: per query bool (None: all), False where the answer is unknown and final holds its guess;
    calibrated: final's confidences are probabilities (shown as percentages)."""
    ids: list
    images: list
    final: list
    parts: dict = field(default_factory=dict)
    neighbours: list = None
    sunk: object = None
    unreadable: object = None
    final_name: str = "final"
    neighbours_are: str = "nearest"
    truth_images: dict = None
    sure: object = None
    calibrated: bool = False


@dataclass
class View:
    """How a report shows them: truth ({id: set of labels, or None for a non-landmark}), names
    ({label: name}), logs (train.py logs for the curves), rows (most queries shown), title, notes
    (lines under the title)."""
    truth: dict = None
    names: dict = None
    logs: list = None
    rows: int = 200
    title: str = "Recognition report"
    notes: tuple = ()


def write_report(path, answers, view, scores=None):
    """The report of `answers` (Answers) at `path`, as `view` (View) says; returns the indices of
    the queries shown. scores: with the truth, {answer: (GAP, accuracy)} of the final answer
    (under its final_name) and the parts, as evaluate.score_answers computes them."""
    names = view.names or {}

    def name_of(label):  # the landmark's name where it has one (folder names), else its id (GLDv2)
        return str(names.get(label, label))

    shown = select_rows(answers.ids, answers.final, view.truth, view.rows)
    html_ = "\n".join(_head(answers, view, scores) + _queries(answers, view, shown, name_of))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page(view.title, html_))
    print(f"wrote {path} ({len(shown)} of {len(answers.ids)} queries, {os.path.getsize(path) / 1e6:.1f} MB)",
          flush=True)
    for name, (gap, acc) in (scores or {}).items():  # the report's scores on the console too
        print(f"GAP {gap:.4f}, accuracy {acc:.4f}: {name}", flush=True)
    return shown


def _head(answers, view, scores):
    """The title and notes, the scores table (with the truth), the counts, the confidence histogram
    and the training curves (--logs)."""
    ids, final, truth = answers.ids, answers.final, view.truth
    counts = [f"{len(ids)} queries", f"{sum(p is not None for p in final)} with a prediction"]
    if answers.unreadable is not None:
        counts.append(f"{int(np.sum(answers.unreadable))} unreadable")
    if answers.sunk is not None:
        counts.append(f"{int(np.sum(answers.sunk))} sunk as non-landmarks")
    if answers.sure is not None:
        n_sure = int(np.sum(answers.sure))
        counts.append(f"{n_sure} answered, {sum(p is not None for p in final) - n_sure} not sure (their guess kept, "
                      f"in grey)")
    head = [f"<h1>{html.escape(view.title)}</h1>"] + [f"<p>{html.escape(n)}</p>" for n in view.notes]
    if truth is not None:  # scores of the final answer and of each part, as evaluate.py computes them
        head.append('<table class="scores"><tr><th>answer</th><th>GAP</th><th>accuracy (landmark queries)</th></tr>')
        for name, (gap, acc) in scores.items():
            head.append(f'<tr class="score" data-part="{html.escape(name)}"><td>{html.escape(name)}</td>'
                        f'<td class="gap">{gap:.4f}</td><td class="acc">{acc:.4f}</td></tr>')
        head.append("</table>")
        n_l = sum(bool(truth.get(q)) for q in ids if q in truth)
        counts += [f"{n_l} landmark and {sum(q in truth for q in ids) - n_l} non-landmark queries in the solution"]
    head.append(f'<p class="counts">{", ".join(counts)}.</p>')

    marks = [mark_of(p, truth[q], True) if truth is not None and q in truth else "" for q, p in zip(ids, final)]
    conf = lambda m: [p[1] for p, k in zip(final, marks) if p is not None and k == m]  # noqa: E731
    hist = confidence_histogram(conf("right"), conf("wrong"), conf(""), answers.calibrated)
    head.append(f'<h2>Confidence of the {html.escape(answers.final_name)}</h2><div class="chart">'
                f'{img_tag(hist, "histogram")}</div>')
    if view.logs:
        head.append(f'<h2>Training</h2><div class="chart">{img_tag(curves_uri(view.logs), "training curves")}</div>')
    return head


def _queries(answers, view, shown, name_of):
    """The table of the queries shown, one render_row each."""
    ids, truth, n_q, thumbs = answers.ids, view.truth, len(answers.ids), Thumbnails()
    sunk = np.zeros(n_q, bool) if answers.sunk is None else np.asarray(answers.sunk, bool)
    unreadable = np.zeros(n_q, bool) if answers.unreadable is None else np.asarray(answers.unreadable, bool)
    what = ("the 5 nearest gallery images (their similarity)" if answers.neighbours_are == "nearest"
            else "gallery images of the predicted landmark")
    order = ("the most confident wrong predictions first, then a sample of the rest" if truth is not None
             else "a sample, by decreasing confidence")
    body = [f"<h2>Queries</h2><p>{len(shown)} of {n_q} ({order}); right: {what}.</p>",
            '<table class="queries"><tr><th>query</th><th>prediction</th>'
            + "".join(f"<th>{k}</th>" for k in range(1, 6)) + "</tr>"]
    for i in shown:
        q = ids[i]
        row = {"id": q, "image": answers.images[i], "prediction": answers.final[i],
               "answers": {k: v[i] for k, v in answers.parts.items()},
               "neighbours": answers.neighbours[i] if answers.neighbours is not None else (),
               "tags": (["sunk"] if sunk[i] else []) + (["unreadable"] if unreadable[i] else []),
               "sure": True if answers.sure is None else bool(answers.sure[i]), "calibrated": answers.calibrated}
        if truth is not None and q in truth:
            row["truth"] = truth[q]
            examples = answers.truth_images
            if truth[q] and examples:
                row["truth_image"] = next((examples[t] for t in sorted(truth[q], key=str) if t in examples), None)
        body.append(render_row(row, name_of, thumbs))
    body.append("</table>")
    return body
