"""app.py: answers as predict.py's, bad uploads answered with a message, 10 requests at once, its temporary
folder removed, and the page driven by a headless browser."""
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, free_port
import predict
from browser import needs_browser  # noqa: E402

pytest.importorskip("fastapi", reason="app.py's dependencies: make app, or make test (requirements-test.txt)")
pytest.importorskip("multipart", reason="python-multipart: make app")
pytest.importorskip("uvicorn", reason="uvicorn: make app")

MAX_MB = 0.05  # 50 kB: the synthetic photos are a few kB; an "oversized" one is easy to make


def multipart(files):
    """A multipart/form-data body of [(file name, bytes)] under field `photos`."""
    boundary = uuid.uuid4().hex
    b = io.BytesIO()
    for name, data in files:
        b.write(f'--{boundary}\r\nContent-Disposition: form-data; name="photos"; filename="{name}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n".encode())
        b.write(data + b"\r\n")
    b.write(f"--{boundary}--\r\n".encode())
    return b.getvalue(), f"multipart/form-data; boundary={boundary}"


def post(url, files, timeout=120):
    body, ctype = multipart(files)
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def server(photos, tmp_path_factory):
    t = tmp_path_factory.mktemp("app")
    index, pred = str(t / "idx"), str(t / "pred.csv")
    common = ["--spec", photos["spec"], "--query-dir", photos["queries"], "--idx2landmark", photos["labels"],
              "--out", pred, "--device", "cpu", "--num-workers", "0"]
    predict.main(common + ["--gallery-dir", photos["gallery"], "--save-index", index])
    # a threshold between the answers' confidences: the page shows sure and "not sure" answers both
    conf = np.sort(pd.read_csv(pred)["confidence"].to_numpy())
    threshold = f"{(conf[len(conf) // 2 - 1] + conf[len(conf) // 2]) / 2:.6f}"
    predict.main(common + ["--index", index, "--min-confidence", threshold])
    tmp = t / "tmp"
    tmp.mkdir()
    port = free_port()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "app.py", "--spec", photos["spec"], "--index", index,
                             "--idx2landmark", photos["labels"], "--port", str(port), "--device", "cpu",
                             "--max-upload-mb", str(MAX_MB), "--min-confidence", threshold], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read())
            time.sleep(0.5)
    else:
        proc.kill()
        raise AssertionError("app.py did not start")
    yield {"url": url, "proc": proc, "tmp": tmp, "pred": pd.read_csv(pred, keep_default_na=False),
           "queries": photos["queries"], "gallery": photos["gallery"]}
    if proc.poll() is None:
        proc.kill()


def _query(server, k):
    row = server["pred"].iloc[k]
    with open(os.path.join(server["queries"], row["path"]), "rb") as f:
        return os.path.basename(row["path"]), f.read(), row


def test_answers_are_predict_py_answers_and_ten_at_once(server):
    jobs = [_query(server, k % len(server["pred"])) for k in range(10)]
    with ThreadPoolExecutor(10) as ex:  # ten requests at the same time
        out = list(ex.map(lambda j: post(server["url"] + "/api/recognize", [(j[0], j[1])]), jobs))
    assert [s for s, _ in out] == [200] * 10
    for (name, _, row), (_, body) in zip(jobs, out):
        r = json.loads(body)["results"]
        assert len(r) == 1 and r[0]["file"] == name
        assert r[0]["landmark"] == row["landmark"] and r[0]["guess"] == row["guess"]
        # a probability: the page's decode and resize of one upload differ from the loader's in float noise
        assert r[0]["confidence"] == pytest.approx(row["confidence"], abs=2e-3)
        assert [n["path"] for n in r[0]["neighbours"]] == [p for p, _ in json.loads(row["neighbours"])]


def png_header(w, h):
    """A PNG whose header says w x h (one empty data chunk): PIL reads the size without decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_bad_uploads_get_a_message_and_the_app_goes_on(server):
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    big = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    assert len(big) > MAX_MB * 2**20
    bad = [("notes.txt", b"not a photo at all\n"), ("empty.jpg", b""), ("big.jpg", big),
           ("huge.png", png_header(20000, 20000)), ("cut.jpg", _query(server, 0)[1][:300])]
    for name, data in bad:
        status, body = post(server["url"] + "/", [(name, data)])
        assert status == 400 and 'class="msg"' in body and name in body, (name, status)
        assert 'class="row' not in body
    status, body = post(server["url"] + "/api/recognize", bad)
    errors = json.loads(body)["errors"]
    assert status == 400 and len(errors) == len(bad)
    assert any("empty file" in e for e in errors) and any("not an image" in e for e in errors)
    assert any("megapixels" in e for e in errors) and any("MB" in e for e in errors)
    # a good photo beside bad ones: answered, the others named
    name, data, row = _query(server, 1)
    status, body = post(server["url"] + "/api/recognize", [(name, data), bad[0]])
    r = json.loads(body)
    assert status == 200 and r["results"][0]["landmark"] == row["landmark"] and len(r["errors"]) == 1
    # a request far over the limit is refused before it is parsed
    # (its headers alone: the answer comes before any of the body is read)
    import http.client
    c = http.client.HTTPConnection(server["url"].split("//")[1], timeout=30)
    c.putrequest("POST", "/")
    c.putheader("Content-Type", "multipart/form-data; boundary=x")
    c.putheader("Content-Length", str(10 * 2**30))
    c.endheaders()
    r = c.getresponse()
    assert r.status == 413 and "larger than" in r.read().decode()
    c.close()
    assert urllib.request.urlopen(server["url"] + "/healthz", timeout=5).status == 200


def _answer(row):
    """What a row of the page says: (the landmark or "not sure", the landmark guessed)."""
    sure = row.find_elements("css selector", "b.pred")
    if sure:
        return sure[0].text, sure[0].text
    return row.find_element("css selector", "b.unsure").text, row.find_element(
        "css selector", "span.guess").text.removeprefix("guess: ")


@needs_browser
def test_browser_picks_or_drops_photos_and_sees_landmark_and_neighbours(server):
    from browser import chrome
    pred = server["pred"]
    assert (pred["landmark"] == "").any() and (pred["landmark"] != "").any()
    row = pred[pred["landmark"] == ""].iloc[0]  # picked: a "not sure" answer
    with chrome() as b:
        b.get(server["url"] + "/")
        assert b.find_elements("css selector", "input[type=file]") and b.find_elements("id", "go")  # for keyboards
        about = b.find_element("css selector", "p.about").text
        assert about.startswith("gallery: ") and "model(s): " in about and "(trained)" in about, about
        assert "'not sure'" in about
        # picking is enough: the page sends the photos at once, no second click
        b.find_element("id", "photos").send_keys(os.path.join(server["queries"], row["path"]))
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(b, 60).until(lambda d: d.find_elements("css selector", "tr.row"))  # the answer page loaded
        rows = b.find_elements("css selector", "tr.row")
        assert len(rows) == 1, b.page_source[-3000:]
        assert _answer(rows[0]) == (row["landmark"] or "not sure", row["guess"])
        nbs = rows[0].find_elements("css selector", "td.nb")
        assert len(nbs) == 5
        decoded = b.execute_script("return [...document.querySelectorAll('td.nb img')]"
                                   ".filter(i => i.complete && i.naturalWidth > 0).length")
        assert decoded == 5
        names = [p.split(os.sep)[0] for p, _ in json.loads(row["neighbours"])]
        assert [n.text.splitlines()[-2] for n in nbs] == names  # each neighbour's landmark, then its cosine

        # Dropping: a browser under WebDriver cannot drag a file from the desktop, so the test builds what the
        # desktop would hand over, a DataTransfer holding real File objects (read from disk through a second,
        # hidden input), and dispatches a 'drop' on the zone. The page's own handler does the rest.
        b.get(server["url"] + "/")
        b.execute_script("const i = document.createElement('input'); i.type = 'file'; i.multiple = true;"
                         "i.id = 'src'; i.style.display = 'none'; document.body.appendChild(i);")
        two = [pred[pred["landmark"] != ""].iloc[0], pred[pred["landmark"] == ""].iloc[-1]]  # dropped: one of each
        b.find_element("id", "src").send_keys("\n".join(os.path.join(server["queries"], r["path"]) for r in two))
        b.execute_script("const dt = new DataTransfer();"
                         "for (const f of document.getElementById('src').files) dt.items.add(f);"
                         "const z = document.getElementById('drop');"
                         "z.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));"
                         "z.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));")
        WebDriverWait(b, 60).until(lambda d: d.find_elements("css selector", "tr.row"))
        rows = b.find_elements("css selector", "tr.row")
        assert [_answer(r) for r in rows] == [(r["landmark"] or "not sure", r["guess"]) for r in two]
        assert all(len(r.find_elements("css selector", "td.nb")) == 5 for r in rows)


@needs_browser
def test_screenshots_of_the_report_and_the_page(server, tmp_path):
    """scripts/screenshots.py: the page's answers to picked photos and a report, as PNGs of the window's size."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import screenshots
    report_html = tmp_path / "r.html"
    report_html.write_text("<!DOCTYPE html><html><body><h1>Recognition report</h1></body></html>")
    photos = [os.path.join(server["queries"], p) for p in server["pred"]["path"][:2]]
    screenshots.main(["--report", str(report_html), "--app", server["url"], "--photos", *photos,
                      "--out", str(tmp_path / "shots"), "--width", "800", "--height", "600"])
    for name in ("report.png", "app.png"):
        img = cv2.imread(str(tmp_path / "shots" / name))
        assert img is not None and img.shape[:2] == (600, 800), name
        assert img.std() > 5  # something drawn, not a blank window


def test_temporary_folder_removed_at_stop(server):
    # a photo over the form parser's 1 MB spool goes to disk: inside the app's own folder
    noise = np.random.default_rng(1).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    png = cv2.imencode(".png", noise)[1].tobytes()
    assert len(png) > 2**20
    status, _ = post(server["url"] + "/api/recognize", [("noise.png", png)])
    assert status == 400  # over the 50 kB limit: refused, but parsed
    inside = os.listdir(server["tmp"])
    assert len(inside) == 1 and inside[0].startswith("landmark-app-")
    server["proc"].send_signal(signal.SIGTERM)
    server["proc"].wait(timeout=60)
    assert os.listdir(server["tmp"]) == []


def test_bad_answer_options_are_refused_before_the_gallery_is_embedded(tmp_path, capsys):
    import app
    with pytest.raises(SystemExit) as e:
        app.parse_args(["--backbone", "resnet10t", "--gallery-dir", str(tmp_path), "--unknown-share", "1"])
    assert e.value.code == 2 and "--unknown-share 1.0: a share of the photos" in capsys.readouterr().err
    # the answer's other options are checked as predict.py checks them (recognizer.check_args)
    for flag, value, says in (("--faiss-nprobe", "0", "--faiss-nprobe 0: must be at least 1"),
                              ("--min-confidence", "1.5", "--min-confidence 1.5: a probability"),
                              ("--verify", "-1", "--verify -1: the number of neighbours")):
        with pytest.raises(SystemExit) as e:
            app.parse_args(["--backbone", "resnet10t", "--gallery-dir", str(tmp_path), flag, value])
        assert e.value.code == 2 and says in capsys.readouterr().err
